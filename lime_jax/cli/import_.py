"""`lime-jax import`: read and check an exported (or plain HF Llama) directory; with `--out`,
write it as step 0 of a training run.

`--out OUT` takes the rest of the experiment like `lime-jax train` does (`--config` and
section.key=value overrides; the model section defaults to the directory's model and may differ
from it only in layout: scan_layers, dtypes, remat, T), sets run.out_dir=OUT, and writes
OUT/config.yaml and OUT/checkpoints/0 (the parameters, a fresh optimizer state, the data
iterator at its start). `lime-jax train --config OUT/config.yaml` then trains from the imported
parameters, and `lime-jax eval --checkpoint OUT` evaluates them.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

import jax
import numpy as np

from lime_jax.config import ModelConfig
from lime_jax.interop import hf
from lime_jax.train import params as params_lib
from lime_jax.train.experiment import ExperimentConfig, load_experiment

SaveParams = Callable[[Any, ModelConfig, str], None]


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--hf-dir", required=True,
                      help="directory with model.safetensors and config.json")
  parser.add_argument("--out", default=None,
                      help="run directory to write the parameters to as step 0 of a training run"
                           " (default: only check them)")
  parser.add_argument("--config", default=None,
                      help="with --out: YAML of the run (default: the directory's model and"
                           " otherwise all defaults)")
  parser.add_argument("overrides", nargs="*",
                      help="with --out: section.key=value overrides, e.g. data.seq_len=256")


def run_config(args: argparse.Namespace, model_cfg: ModelConfig) -> ExperimentConfig:
  """The run `--out` starts: --config and overrides over the imported model, out_dir = --out."""
  overrides = [*args.overrides, f"run.out_dir={args.out}"]
  if args.config is None:
    return load_experiment(None, overrides, base={"model": model_cfg.to_dict()})
  return load_experiment(args.config, overrides)


def save_checkpoint(args: argparse.Namespace) -> SaveParams:
  """The default `--out` writer: a training checkpoint (lime_jax.train.params.save_params)."""
  def save(params: Any, model_cfg: ModelConfig, out: str) -> None:
    del out  # run_config puts it in run.out_dir
    cfg = run_config(args, model_cfg)
    if cfg.model != model_cfg:  # same model in another layout, or a one-line error naming the field
      params, _ = hf.import_params(args.hf_dir, cfg.model)
    params_lib.save_params(params, cfg)
  return save


def run(args: argparse.Namespace, save_params: SaveParams | None = None) -> int:
  """Imports and checks a directory; with --out, `save_params(params, cfg, out)` writes it
  (default: `save_checkpoint(args)`). Overrides without --out are refused."""
  if args.out is None and (args.config is not None or args.overrides):
    raise ValueError("--config and overrides describe the run --out writes; give --out too")
  params, cfg = hf.import_params(args.hf_dir)
  if args.out is not None:
    (save_params or save_checkpoint(args))(params, cfg, args.out)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  print(json.dumps({"hf_dir": args.hf_dir, "out": args.out, "router": cfg.router,
                    "layers": cfg.L, "params": num_params}))
  return 0
