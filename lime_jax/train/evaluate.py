"""Validation loss and task accuracy of parameters: what the training loop evaluates.

`lime-jax eval` (lime_jax/cli/eval.py) evaluates a saved checkpoint with the same functions.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from lime_jax.config import ModelConfig
from lime_jax.data import tasks as tasks_lib
from lime_jax.model.transformer import Transformer
from lime_jax.parallel.sharding import Layout


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


def filled_to_multiple(batch: Mapping[str, Any], multiple: int) -> dict[str, np.ndarray]:
  """`batch` with copies of its first row appended at zero loss weight until its rows divide
  by `multiple` (the batch shards), so that it splits over them as training's batches do. The
  loss is a mean over weighted tokens, so the filler rows leave it as it was."""
  batch = {key: np.asarray(value) for key, value in batch.items()}
  rows = len(batch["targets"])
  fill = -rows % multiple
  if not fill:
    return batch
  if "weights" not in batch:
    batch["weights"] = np.ones(batch["targets"].shape, np.float32)
  filled = {key: np.concatenate([value, np.repeat(value[:1], fill, axis=0)])
            for key, value in batch.items()}
  filled["weights"][rows:] = 0
  return filled


@functools.lru_cache(maxsize=8)
def apply_fn(model_cfg: ModelConfig) -> Callable[[Any, jax.Array], jax.Array]:
  """params, inputs_BxT -> logits_BxTxV; one function per config so its jit is cached."""
  def logits(params: Any, inputs_BxT: jax.Array) -> jax.Array:
    return Transformer(model_cfg).apply({"params": params}, inputs_BxT)
  return logits


def task_metrics(params: Any, model_cfg: ModelConfig, task_cfg: tasks_lib.TaskConfig,
                 layout: Layout | None = None) -> dict[str, float]:
  """{"val_accuracy", "chance", "majority"} on the task's whole test split. Traced under
  `layout`'s mesh scope when given, as the step is, so that the test rows split over the batch
  shards (outside it the compiler may give every device every row: train/loop.sharded_eval)."""
  with layout.scope() if layout is not None else contextlib.nullcontext():
    result = tasks_lib.evaluate_task(apply_fn(model_cfg), params, task_cfg)
  return {"val_accuracy": result["accuracy"], "chance": result["chance"],
          "majority": result["majority"]}
