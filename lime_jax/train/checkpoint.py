"""Checkpoints of a run: orbax CheckpointManager over `<out_dir>/checkpoints/<step>/`.

Each step directory holds three items:
- `state`: the array tree {params, opt_state, step, rng} (orbax StandardSave);
- `data`: the training iterator's JSON state, so a resumed run reads exactly the next batch;
- `config`: the resolved ExperimentConfig as JSON, so `eval` and `resume` need no YAML.

Saves are asynchronous (arrays are copied off the device before `save` returns, so the train
step may donate them right after) and keep the last `keep` steps. A step becomes visible only
when orbax renames its temporary directory after the last byte is written: a process killed
mid-save leaves the previous step as the latest, and the half-written directory is removed by
the next writer.

Every failure to find or read a checkpoint is a one-line `CheckpointError` (a ValueError).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from etils import epath

from lime_jax.errors import one_line

SUBDIR = "checkpoints"
STATE, DATA, CONFIG = "state", "data", "config"


class CheckpointError(ValueError):
  pass


def _registry() -> ocp.handlers.CheckpointHandlerRegistry:
  # Named handlers let a reader see item metadata before it restores anything.
  return ocp.handlers.create_default_handler_registry(**{
      STATE: ocp.StandardCheckpointHandler(),
      DATA: ocp.JsonCheckpointHandler(),
      CONFIG: ocp.JsonCheckpointHandler()})


def _is_url(path: str) -> bool:
  return "://" in path  # gs://bucket/run and the like; orbax opens them through etils.epath


def _absolute(path: str) -> str:
  return path if _is_url(path) else os.path.abspath(path)  # orbax wants absolute paths


def checkpoint_dir(out_dir: str) -> str:
  return os.path.join(out_dir, SUBDIR)


def resolve_dir(path: str) -> tuple[str, int | None]:
  """(manager directory, step or None) for a run dir, its checkpoints/ dir, or one step dir."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint {path}: no such directory")
  if os.path.isdir(os.path.join(path, SUBDIR)):
    return os.path.join(path, SUBDIR), None
  name = os.path.basename(path)
  if name.isdigit() and os.path.isdir(os.path.join(path, STATE)):
    return os.path.dirname(path), int(name)
  return path, None


class Checkpointer:
  """Writes checkpoints of one run; the caller decides when (`save` always writes)."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = _absolute(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=1, create=True,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)  # leftovers of a killed save
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          handler_registry=_registry())

  def save(self, step: int, state: Any, data_state: Mapping[str, Any],
           config: Mapping[str, Any]) -> None:
    self._manager.save(step, force=True, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(state),
        DATA: ocp.args.JsonSave(dict(data_state)),
        CONFIG: ocp.args.JsonSave(dict(config))}))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def close(self) -> None:
    self._manager.close()


def _reader(directory: str) -> ocp.CheckpointManager:
  directory = _absolute(directory)
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory, options=options, handler_registry=_registry())


def all_steps(directory: str) -> list[int]:
  """Finalized steps in `directory` (an unfinished save is not one); [] if it does not exist."""
  if not (_is_url(directory) or os.path.isdir(directory)):
    return []
  if _is_url(directory):
    if not epath.Path(directory).exists():
      return []
  with _reader(directory) as manager:
    return sorted(manager.all_steps())


def latest_step(directory: str) -> int | None:
  steps = all_steps(directory)
  return steps[-1] if steps else None


def _pick_step(directory: str, step: int | None) -> int:
  steps = all_steps(directory)
  if not steps:
    raise CheckpointError(f"checkpoint {directory}: holds no finished checkpoint")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise CheckpointError(f"checkpoint {directory}: no step {step}; available steps: {steps}")
  return step


def read_config(directory: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
  """(step, saved config dict) without touching the arrays."""
  step = _pick_step(directory, step)
  try:
    with _reader(directory) as manager:
      restored = manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
  except Exception as err:  # orbax raises many types; all mean "unreadable"
    raise CheckpointError(
        f"checkpoint {directory}/{step}: cannot read its config: {one_line(err, limit=300)}") from None
  config = restored[CONFIG]
  if not isinstance(config, dict):
    raise CheckpointError(f"checkpoint {directory}/{step}: config is not a JSON object")
  return step, config


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  data_state: dict[str, Any]
  config: dict[str, Any]


def restore(directory: str, abstract_state: Any, step: int | None = None) -> Restored:
  """Restores a step (default: the latest) into the structure, shapes and dtypes of
  `abstract_state` (e.g. from `jax.eval_shape`); any mismatch or damage is a CheckpointError."""
  step = _pick_step(directory, step)
  _check_shapes(directory, step, abstract_state)
  try:
    with _reader(directory) as manager:
      restored = manager.restore(step, args=ocp.args.Composite(**{
          STATE: ocp.args.StandardRestore(abstract_state),
          DATA: ocp.args.JsonRestore(),
          CONFIG: ocp.args.JsonRestore()}))
  except Exception as err:  # orbax raises many types; all mean "unreadable"
    raise CheckpointError(f"checkpoint {directory}/{step}: cannot restore: {one_line(err, limit=300)}") from None
  return Restored(step=step, state=restored[STATE], data_state=restored[DATA] or {},
                  config=restored[CONFIG] or {})


def older_readable_step(directory: str, abstract_state: Any, below: int) -> int | None:
  """The newest step before `below` whose config and arrays restore; None if none does."""
  for step in reversed([s for s in all_steps(directory) if s < below]):
    try:
      read_config(directory, step)
      restore(directory, abstract_state, step)
    except CheckpointError:
      continue
    return step
  return None


def unreadable(directory: str, step: int, err: CheckpointError,
               abstract_state: Any) -> CheckpointError:
  """`err` (step `step` cannot be read) with the newest older step that can, and how to resume
  from it. Resuming from it silently would drop the newer steps' training and rewrite their
  metrics; the damage may be a passing one (a storage hiccup), so the user decides."""
  good = older_readable_step(directory, abstract_state, step)
  if good is None:
    return err
  return CheckpointError(
      f"{err}; step {good} reads fine: to resume from it, move step {step} aside (e.g. mv"
      f" {directory}/{step} {directory}/{step}.damaged) and run again")


def _check_shapes(directory: str, step: int, abstract_state: Any) -> None:
  """Names the first array whose stored shape or presence differs from the target's."""
  try:
    with _reader(directory) as manager:
      metadata = manager.item_metadata(step)[STATE]
  except Exception as err:
    raise CheckpointError(
        f"checkpoint {directory}/{step}: cannot read its metadata: {one_line(err, limit=300)}") from None
  if metadata is None:
    raise CheckpointError(f"checkpoint {directory}/{step}: has no '{STATE}' item")
  stored = _flat(metadata)
  wanted = _flat(abstract_state)
  # Parameters first: their names say the most about which model differs.
  for key in sorted(wanted, key=lambda k: not k.startswith("params/")):
    leaf = wanted[key]
    if key not in stored:
      raise CheckpointError(
          f"checkpoint {directory}/{step}: has no array {key} (was it written by a different"
          " model or optimizer config?)")
    stored_shape = tuple(getattr(stored[key], "shape", ()) or ())
    if stored_shape != tuple(leaf.shape):
      raise CheckpointError(
          f"checkpoint {directory}/{step}: array {key} has shape {stored_shape}, the model"
          f" expects {tuple(leaf.shape)}")
  extra = sorted(set(stored) - set(wanted))
  if extra:
    raise CheckpointError(
        f"checkpoint {directory}/{step}: has arrays the model lacks, e.g. {extra[0]}")


def _flat(tree: Any) -> dict[str, Any]:
  """Leaves by a '/'-joined path; metadata turns namedtuples into dicts, so names, not types."""
  def name(key) -> str:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  return {"/".join(name(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
