"""`lime-jax export`: a training checkpoint -> model.safetensors + config.json (HF Llama names)."""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

from lime_jax.config import ModelConfig
from lime_jax.interop import hf
from lime_jax.train import params as params_lib

LoadParams = Callable[..., tuple[Any, ModelConfig]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--checkpoint", required=True,
                      help="run directory, its checkpoints/ directory, or one step directory")
  parser.add_argument("--step", type=int, default=None, help="step to export (default: latest)")
  parser.add_argument("--out", required=True,
                      help="directory for model.safetensors and config.json (HF Llama names)")


def load_model_params(path: str, step: int | None = None) -> tuple[Any, ModelConfig]:
  """(params, model config) of a checkpoint: what an export needs of it."""
  loaded = params_lib.load_params(path, step)
  return loaded.params, loaded.config.model


def run(args: argparse.Namespace, load_params: LoadParams = load_model_params) -> int:
  """`load_params(checkpoint, step=None) -> (params, ModelConfig)` is injectable for tests."""
  if args.step is None:
    params, cfg = load_params(args.checkpoint)
  else:
    params, cfg = load_params(args.checkpoint, step=args.step)
  hf.export_params(params, cfg, args.out)
  print(json.dumps({"out": args.out, "router": cfg.router, "layers": cfg.L,
                    "tensors": len(hf.expected_shapes(cfg))}))
  return 0
