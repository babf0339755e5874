"""Validation loss and perplexity: in the training loop and of a saved checkpoint.

`lime-jax eval --checkpoint DIR` takes a run directory, its `checkpoints/` directory or one
step directory, rebuilds the model from the config saved in the checkpoint (no YAML needed),
and evaluates on that config's validation split. `data.key=value` overrides evaluate on other
data (e.g. `data.val_batches=64`, or another corpus with the same tokenizer).
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any, Callable, Sequence

import jax

from lime_jax import checkpoint as ckpt
from lime_jax.experiment import ExperimentConfig, apply_overrides, check_vocab


def validation_loss(params: Any, val_batches: Sequence[dict[str, Any]],
                    eval_fn: Callable[[Any, dict[str, Any]], jax.Array]) -> tuple[float, int]:
  """(token-weighted mean loss in nats, tokens) over the batches; all dispatched, one fetch."""
  if not val_batches:
    raise ValueError("data: no validation batches")
  losses = [eval_fn(params, batch) for batch in val_batches]
  tokens = [int(batch["targets"].size) for batch in val_batches]
  losses = jax.device_get(losses)
  total = sum(float(l) * t for l, t in zip(losses, tokens))
  return total / sum(tokens), sum(tokens)


def evaluate_checkpoint(path: str, *, step: int | None = None,
                        overrides: Sequence[str] = ()) -> dict[str, Any]:
  """{"checkpoint", "step", "val_loss", "val_ppl", "val_tokens"} of a saved checkpoint."""
  # Imported here: train imports this module.
  from lime_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from lime_jax.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  from lime_jax.train import abstract_state, jitted_fns  # pylint: disable=g-import-not-at-top

  directory, dir_step = ckpt.resolve_dir(path)
  if step is not None and dir_step is not None and step != dir_step:
    raise ValueError(f"--step {step} disagrees with the step directory {path}")
  step, saved = ckpt.read_config(directory, step if step is not None else dir_step)
  bad = [o for o in overrides if not o.strip().startswith("data.")]
  if bad:
    raise ValueError(f"override {bad[0]!r}: eval accepts only data.* overrides")
  where = f"checkpoint {directory}/{step} config"
  cfg = ExperimentConfig.from_dict(apply_overrides(saved, overrides), where=where)
  tokenizer = load_tokenizer(cfg.data.tokenizer)
  check_vocab(cfg, tokenizer.vocab_size)
  val_batches = data_lib.make_val_batches(cfg.data, tokenizer)
  init_fn, _, eval_fn = jitted_fns(cfg.model, cfg.optim, cfg.run.seed)
  restored = ckpt.restore(directory, abstract_state(init_fn), step)
  loss, tokens = validation_loss(restored.state["params"], val_batches, eval_fn)
  return {"checkpoint": directory, "step": step, "val_loss": loss,
          "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": tokens}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--checkpoint", required=True,
                      help="run directory, its checkpoints/ directory, or one step directory")
  parser.add_argument("--step", type=int, default=None, help="step to evaluate (default: latest)")
  parser.add_argument("--json", default=None, help="also write the result to this JSON file")
  parser.add_argument("overrides", nargs="*", help="data.key=value overrides")


def run(args: argparse.Namespace) -> int:
  result = evaluate_checkpoint(args.checkpoint, step=args.step, overrides=args.overrides)
  print(json.dumps(result))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  return 0
