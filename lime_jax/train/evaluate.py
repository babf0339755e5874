"""Validation loss and perplexity: in the training loop and of a saved checkpoint.

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
import functools
import json
import math
from typing import Any, Callable, Sequence

import jax

from lime_jax.train import checkpoint as ckpt
from lime_jax.data import tasks as tasks_lib
from lime_jax.config import ModelConfig
from lime_jax.train.experiment import ExperimentConfig, apply_overrides, check_vocab


def validation_loss(params: Any, val_batches: Sequence[dict[str, Any]],
                    eval_fn: Callable[[Any, dict[str, Any]], jax.Array]) -> tuple[float, int]:
  """(token-weighted mean loss in nats, tokens) over the batches; all dispatched, one fetch."""
  if not val_batches:
    raise ValueError("data: no validation batches")
  losses = [eval_fn(params, batch) for batch in val_batches]
  # Weighted batches (tasks) average over scored tokens only, as the loss itself does.
  tokens = [int(batch["weights"].sum()) if "weights" in batch else int(batch["targets"].size)
            for batch in val_batches]
  losses = jax.device_get(losses)
  total = sum(float(l) * t for l, t in zip(losses, tokens))
  return total / sum(tokens), sum(tokens)


@functools.lru_cache(maxsize=8)
def apply_fn(model_cfg: ModelConfig) -> Callable[[Any, jax.Array], jax.Array]:
  """params, inputs_BxT -> logits_BxTxV; one function per config so its jit is cached."""
  from lime_jax.model.transformer import Transformer  # pylint: disable=g-import-not-at-top

  def logits(params: Any, inputs_BxT: jax.Array) -> jax.Array:
    return Transformer(model_cfg).apply({"params": params}, inputs_BxT)
  return logits


def task_metrics(params: Any, model_cfg: ModelConfig,
                 task_cfg: tasks_lib.TaskConfig) -> dict[str, float]:
  """{"val_accuracy", "chance", "majority"} on the task's whole test split."""
  result = tasks_lib.evaluate_task(apply_fn(model_cfg), params, task_cfg)
  return {"val_accuracy": result["accuracy"], "chance": result["chance"],
          "majority": result["majority"]}


def evaluate_checkpoint(path: str, *, step: int | None = None, overrides: Sequence[str] = (),
                        task: str | None = None) -> dict[str, Any]:
  """{"checkpoint", "step", "val_loss", "val_ppl", "val_tokens"} of a saved checkpoint; with
  `task`, the loss is on that task's answers and "task", "difficulty", "accuracy", "chance",
  "majority", "num_examples" are added."""
  # Imported here: train imports this module.
  from lime_jax.data import text as data_lib  # pylint: disable=g-import-not-at-top
  from lime_jax.data.tokenizers import load_tokenizer  # pylint: disable=g-import-not-at-top
  from lime_jax.train.loop import abstract_state, jitted_fns  # pylint: disable=g-import-not-at-top

  directory, dir_step = ckpt.resolve_dir(path)
  if step is not None and dir_step is not None and step != dir_step:
    raise ValueError(f"--step {step} disagrees with the step directory {path}")
  step, saved = ckpt.read_config(directory, step if step is not None else dir_step)
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
  if cfg.task is not None:
    val_batches = tasks_lib.make_test_batches(cfg.task)
  else:
    val_batches = data_lib.make_val_batches(cfg.data, tokenizer)
  init_fn, _, eval_fn = jitted_fns(cfg.model, cfg.optim, cfg.run.seed)
  restored = ckpt.restore(directory, abstract_state(init_fn), step)
  params = restored.state["params"]
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
