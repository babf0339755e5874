"""`lime-jax eval`: validation loss and perplexity of a saved checkpoint, or a task's accuracy.

`lime-jax eval --checkpoint DIR` takes a run directory, its `checkpoints/` directory or one
step directory, rebuilds the model from the config saved in the checkpoint (no YAML needed),
and evaluates on that config's validation split. `data.key=value` overrides evaluate on other
data (e.g. `data.val_batches=64`, or another corpus with the same tokenizer).

`lime-jax eval --checkpoint DIR --task NAME [task.key=value ...]` reports the exact-match accuracy
on a synthetic task's test split beside its chance level (uniform guessing) and the majority
answer's share. The task settings are the checkpoint's own when it was trained on task NAME,
else the task's defaults with task.seq_len = model.T; `task.*` overrides apply on top.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any, Sequence

from lime_jax.data import sources
from lime_jax.data import tasks as tasks_lib
from lime_jax.data.tokenizers import load_tokenizer
from lime_jax.train import loop
from lime_jax.train import params as params_lib
from lime_jax.train.evaluate import apply_fn, validation_loss
from lime_jax.train.experiment import ExperimentConfig, apply_overrides, check_vocab


def evaluate_checkpoint(path: str, *, step: int | None = None, overrides: Sequence[str] = (),
                        task: str | None = None) -> dict[str, Any]:
  """{"checkpoint", "step", "val_loss", "val_ppl", "val_tokens"} of a saved checkpoint; with
  `task`, the loss is on that task's answers and "task", "difficulty", "accuracy", "chance",
  "majority", "num_examples" are added."""
  directory, step, saved = params_lib.saved_config(path, step)
  allowed = ("data.", "task.") if task is not None else ("data.",)
  bad = [o for o in overrides if not o.strip().startswith(allowed)]
  if bad:
    only = "data.* and task.*" if task is not None else "data.*"
    raise ValueError(f"override {bad[0]!r}: eval accepts only {only} overrides")
  where = f"checkpoint {directory}/{step} config"
  values = dict(saved)
  if task is not None:
    own = saved.get("task")
    values["task"] = (dict(own) if own and own.get("name") == task
                      else {"name": task, "seq_len": saved["model"]["T"]})
  cfg = ExperimentConfig.from_dict(apply_overrides(values, overrides), where=where)
  tokenizer = load_tokenizer(cfg.data.tokenizer)
  check_vocab(cfg, tokenizer.vocab_size)
  val_batches = sources.eval_batches(cfg.data, cfg.task, tokenizer)
  params = params_lib.load_params(directory, step).params
  _, _, eval_fn = loop.jitted_fns(cfg.model, cfg.optim, cfg.run.seed)
  loss, tokens = validation_loss(params, val_batches, eval_fn)
  result = {"checkpoint": directory, "step": step, "val_loss": loss,
            "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": tokens}
  if task is not None:
    counts = tasks_lib.evaluate_task(apply_fn(cfg.model), params, cfg.task)
    result.update({"task": cfg.task.name, "difficulty": cfg.task.difficulty,
                   "accuracy": counts["accuracy"], "chance": counts["chance"],
                   "majority": counts["majority"], "num_examples": counts["num_examples"]})
  return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--checkpoint", required=True,
                      help="run directory, its checkpoints/ directory, or one step directory")
  parser.add_argument("--step", type=int, default=None, help="step to evaluate (default: latest)")
  parser.add_argument("--json", default=None, help="also write the result to this JSON file")
  parser.add_argument("--task", default=None, choices=tasks_lib.TASK_NAMES,
                      help="exact-match accuracy on this synthetic task, beside chance level")
  parser.add_argument("overrides", nargs="*", help="data.key=value (and task.key=value) overrides")


def run(args: argparse.Namespace) -> int:
  result = evaluate_checkpoint(args.checkpoint, step=args.step, overrides=args.overrides,
                               task=args.task)
  if args.task is not None:
    print(f"{result['task']} (difficulty {result['difficulty']}): accuracy"
          f" {result['accuracy']:.4f}, chance {result['chance']:.4g}, majority answer"
          f" {result['majority']:.4f}, over {result['num_examples']} test examples")
  print(json.dumps(result))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  return 0
