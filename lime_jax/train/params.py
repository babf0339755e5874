"""Parameters in and out of training checkpoints: the one way from a checkpoint to params.

`load_params` restores a checkpoint's whole train state into the tree a fresh init of its own
saved config gives (so a foreign or damaged checkpoint is a one-line CheckpointError) and keeps
the parameters; `eval`, `generate`, `export` and `analyze` all read checkpoints through it.

`save_params` goes the other way for `import --out`: parameters made elsewhere become step 0 of
a run, with a fresh optimizer state and the data iterator at its start, so `lime-jax train`
with the same config resumes from them and `lime-jax eval` reads them like any checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import yaml

from lime_jax.data.tokenizers import load_tokenizer
from lime_jax.train import checkpoint as ckpt
from lime_jax.train import loop
from lime_jax.train.experiment import ExperimentConfig, check_vocab
from lime_jax.train.optimizer import make_optimizer

IMPORT_STEP = 0  # the step `save_params` writes: no training has happened in this run yet


@dataclasses.dataclass(frozen=True)
class Loaded:
  params: Any
  config: ExperimentConfig  # the config saved with the checkpoint
  directory: str  # the checkpoints/ directory
  step: int


def saved_config(path: str, step: int | None = None) -> tuple[str, int, dict[str, Any]]:
  """(checkpoints directory, step, saved config as a dict) of a run directory, its checkpoints/
  directory or one step directory, without touching the arrays. Default step: the latest."""
  directory, dir_step = ckpt.resolve_dir(path)
  if step is not None and dir_step is not None and step != dir_step:
    raise ValueError(f"--step {step} disagrees with the step directory {path}")
  step, saved = ckpt.read_config(directory, step if step is not None else dir_step)
  return directory, step, saved


def load_params(path: str, step: int | None = None) -> Loaded:
  """The parameters of a checkpoint (default: its latest step) on one device, with its config."""
  directory, step, saved = saved_config(path, step)
  cfg = ExperimentConfig.from_dict(saved, where=f"checkpoint {directory}/{step} config")
  init, _, _ = loop.jitted_fns(cfg.model, cfg.optim, cfg.run.seed)
  restored = ckpt.restore(directory, loop.abstract_state(init), step)
  return Loaded(params=restored.state["params"], config=cfg, directory=directory, step=step)


def save_params(params: Any, cfg: ExperimentConfig) -> str:
  """Writes `params` as step IMPORT_STEP of a new run in `cfg.run.out_dir` (its config.yaml and
  checkpoints/); returns the checkpoint directory. Refuses an out_dir that holds a checkpoint,
  a tokenizer the model cannot embed, and parameters of another shape than `cfg.model`'s."""
  tokenizer = load_tokenizer(cfg.data.tokenizer)
  check_vocab(cfg, tokenizer.vocab_size)
  loop.resume_step(cfg, "never")
  data_iter, _ = loop.make_batches(cfg, tokenizer)
  init, _, _ = loop.jitted_fns(cfg.model, cfg.optim, cfg.run.seed)
  state = init()
  params = _like(state["params"], params, cfg)
  # A fresh optimizer state for these parameters, as a fresh run's init makes one.
  state = dict(state, params=params, opt_state=make_optimizer(cfg.optim).init(params))
  directory = loop.checkpoint_dir(cfg)
  os.makedirs(cfg.run.out_dir, exist_ok=True)
  with open(os.path.join(cfg.run.out_dir, loop.CONFIG_FILE), "w", encoding="utf-8") as f:
    yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
  checkpointer = ckpt.Checkpointer(directory, keep=cfg.run.keep_checkpoints, async_save=False)
  try:
    checkpointer.save(IMPORT_STEP, state, data_iter.get_state(), cfg.to_dict())
    checkpointer.wait()
  finally:
    checkpointer.close()
  return directory


def _like(init_params: Any, params: Any, cfg: ExperimentConfig) -> Any:
  """`params` in the structure, dtypes and shardings of a fresh init of `cfg.model`."""
  if jax.tree.structure(init_params) != jax.tree.structure(params):
    raise ValueError(f"run.out_dir {cfg.run.out_dir}: the parameters do not have the tree of"
                     f" model {cfg.model.router!r} L={cfg.model.L} D={cfg.model.D}")

  def cast(like, x):
    if tuple(x.shape) != tuple(like.shape):
      raise ValueError(f"run.out_dir {cfg.run.out_dir}: a parameter has shape {tuple(x.shape)},"
                       f" the model expects {tuple(like.shape)}")
    return jax.device_put(jnp.asarray(x, like.dtype), like.sharding)
  return jax.tree.map(cast, init_params, params)
