"""One experiment = model + data + optim + run configs, loaded from YAML with `key.sub=value`
overrides.

A YAML file has up to five top-level sections, each optional:

  model: {D: 128, L: 8, router: kv-static, ...}   # ModelConfig
  data:  {source: embedded, seq_len: 128, ...}     # DataConfig
  optim: {lr: 3.0e-3, warmup_steps: 50, ...}       # OptimConfig
  run:   {out_dir: runs/x, steps: 600, ...}        # RunConfig
  task:  {name: mqar, difficulty: 4, ...}          # tasks.TaskConfig; replaces data when present
  mesh:  {data: -1, fsdp: 1, tensor: 1, rules: ...}  # parallel/mesh_config.MeshConfig; default: one device

With a `task` section the run trains on that synthetic task (answer-only loss) and evaluates on
its test split; the `data` section is then unused except for its tokenizer, which must be
"byte". Without one (or with `task: null`) nothing changes.

Overrides such as `model.D=64` or `run.steps=10` are applied on top; each value is parsed as a
YAML scalar (`true`, `null`, `1e-3`, `[1, 2]`). Floats may be written `1e-3` in both places
(YAML 1.1 alone would read that as a string).

Derived defaults, applied only when the key is absent after overrides:
- `model.V` is the tokenizer's vocab_size (the byte tokenizer: 258). An explicit V must be
  >= the tokenizer's vocab_size (larger values pad the embedding, e.g. 50304 for GPT-2); that
  check runs where the tokenizer is loaded (`check_vocab`), so configs naming a tokenizer file
  that is not on this machine still validate.
- `optim.total_steps` (the cosine horizon) is `run.steps`.
Always checked: `model.T >= data.seq_len` (`task.seq_len` when training on a task).

A file may name `base: other.yaml` (or a list of files), relative to itself: the bases are read
first (each may have its own base), merged in order, and the file is merged on top, section by
section and key by key (nested mappings merge too; any other value, null included, replaces).
So a router variant states only what differs from its setup. `read_yaml` returns the resolved
mapping, without `base`; that is what is validated and saved with a run. A cycle or a missing
base is an error naming the file.

Every error is a one-line ValueError naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Sequence

import yaml

from lime_jax.config import COMPUTATION_FIELDS, ModelConfig, build_dataclass
from lime_jax.data import sources
from lime_jax.data.tasks import TaskConfig
from lime_jax.data.text import DataConfig
from lime_jax.data.tokenizers import load_tokenizer
from lime_jax.errors import one_line
from lime_jax.parallel.mesh_config import MeshConfig
from lime_jax.train.optimizer import OptimConfig

SECTIONS = ("model", "data", "optim", "run", "task", "mesh")
# Sections that may differ when a run is resumed: a checkpoint restores onto any mesh.
RESUMABLE_SECTIONS = ("mesh",)
OPTIONAL_SECTIONS = ("task",)  # None when absent; left out of to_dict then
RESUME_MODES = ("auto", "always", "never")

# A run resumes with config.COMPUTATION_FIELDS changed, with a warning (loop.resume_step): their
# defaults move as the code learns faster forms (attention_impl and push_raw_kv on 2026-12-06,
# attention_query_blocks on 2026-12-07), and a run started before a change must resume after it.
_RESUMABLE_MODEL_NAMES = frozenset(f"model.{key}" for key in COMPUTATION_FIELDS)
# Run fields that may change when a run is resumed; every other field must match the checkpoint.
RESUMABLE_RUN_FIELDS = ("out_dir", "steps", "log_every", "eval_every", "checkpoint_every",
                        "keep_checkpoints", "resume", "progress", "peak_flops", "tensorboard",
                        "async_checkpointing", "checkpoint_dir", "wandb_project")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Where the run writes and how often it logs, evaluates and checkpoints (optimizer steps)."""

  out_dir: str = "runs/default"
  steps: int = 1000  # optimizer steps (each is optim.grad_accum_steps micro-batches)
  log_every: int = 10
  eval_every: int = 200  # also evaluated after the last step
  checkpoint_every: int = 500  # also saved after the last step
  keep_checkpoints: int = 3
  seed: int = 0  # parameter init
  resume: str = "auto"  # auto: resume if out_dir holds a checkpoint; always: require one; never
  progress: bool = True  # tqdm progress bar
  peak_flops: float | None = None  # per-run peak FLOP/s for MFU; None: look up the device kind
  tensorboard: bool = True
  async_checkpointing: bool = True
  checkpoint_dir: str | None = None  # default <out_dir>/checkpoints; may be a bucket URL (gs://)
  wandb_project: str | None = None  # also log to this Weights & Biases project (train/metrics.py)

  def __post_init__(self):
    for name in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"run.{name}: must be a positive integer, got {value!r}")
    if not isinstance(self.out_dir, str) or not self.out_dir:
      raise ValueError(f"run.out_dir: must be a non-empty path, got {self.out_dir!r}")
    if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
      raise ValueError(f"run.seed: must be a non-negative integer, got {self.seed!r}")
    if self.resume not in RESUME_MODES:
      raise ValueError(f"run.resume: must be one of {RESUME_MODES}, got {self.resume!r}")
    if self.wandb_project is not None and (not isinstance(self.wandb_project, str)
                                           or not self.wandb_project):
      raise ValueError(f"run.wandb_project: must be a non-empty name or null, got"
                       f" {self.wandb_project!r}")
    if self.peak_flops is not None and not self.peak_flops > 0:
      raise ValueError(f"run.peak_flops: must be > 0 or null, got {self.peak_flops!r}")

  @classmethod
  def from_dict(cls, values: Mapping[str, Any], where: str = "run") -> "RunConfig":
    return build_dataclass(cls, values, where)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  model: ModelConfig
  data: DataConfig
  optim: OptimConfig
  run: RunConfig
  task: TaskConfig | None = None  # train and evaluate on a synthetic task instead of data
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)  # devices and sharding rules

  def replace(self, **changes: Any) -> "ExperimentConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    """Plain JSON/YAML data; `from_dict(to_dict())` gives the same config."""
    return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS
            if getattr(self, name) is not None}

  @classmethod
  def from_dict(cls, values: Mapping[str, Any], *, vocab_size: int | None = None,
                where: str = "config") -> "ExperimentConfig":
    """Builds and cross-checks the four sections; see the module docstring for the defaults.

    `vocab_size` supplies model.V when absent; without it the tokenizer named by data.tokenizer
    is loaded to read it.
    """
    try:
      return _build(values, vocab_size)
    except ValueError as err:
      raise ValueError(f"{where}: {one_line(err)}") from None

  @property
  def micro_steps_per_step(self) -> int:
    return self.optim.grad_accum_steps

  @property
  def seq_len(self) -> int:
    """T of the training batches: the task's when training on a task, else the data's."""
    return sources.batch_format(self.data, self.task).seq_len

  @property
  def batch_size(self) -> int:
    return sources.batch_format(self.data, self.task).batch_size

  @property
  def tokens_per_step(self) -> int:
    """Tokens per optimizer step (all micro-batches)."""
    return self.batch_size * self.seq_len * self.optim.grad_accum_steps


def _build(values: Mapping[str, Any], vocab_size: int | None) -> ExperimentConfig:
  if not isinstance(values, Mapping):
    raise ValueError(f"expected a mapping of sections {list(SECTIONS)}, got {type(values).__name__}")
  unknown = sorted(set(values) - set(SECTIONS))
  if unknown:
    raise ValueError(f"unknown section(s) {unknown}; known sections: {list(SECTIONS)}")
  sections = {}
  for name in SECTIONS:
    if name in OPTIONAL_SECTIONS and values.get(name) is None:
      continue
    section = values.get(name) or {}
    if not isinstance(section, Mapping):
      raise ValueError(f"{name}: expected a mapping, got {type(section).__name__} {section!r}")
    sections[name] = dict(section)
  run = RunConfig.from_dict(sections["run"])
  data = DataConfig.from_dict(sections["data"])
  optim_values = sections["optim"]
  optim_values.setdefault("total_steps", run.steps)
  optim = OptimConfig.from_dict(optim_values)
  model_values = sections["model"]
  if "V" not in model_values:
    if vocab_size is None:
      vocab_size = load_tokenizer(data.tokenizer).vocab_size
    model_values["V"] = vocab_size
  model = _model_from_dict(model_values)
  task = TaskConfig.from_dict(sections["task"]) if "task" in sections else None
  if task is not None:
    if data.tokenizer != "byte":
      raise ValueError(f"data.tokenizer: tasks are byte-tokenized, got {data.tokenizer!r}")
    if model.T < task.seq_len:
      raise ValueError(f"model.T: {model.T} must be >= task.seq_len {task.seq_len}")
  elif model.T < data.seq_len:
    raise ValueError(f"model.T: {model.T} must be >= data.seq_len {data.seq_len}")
  mesh = MeshConfig.from_dict(sections["mesh"])
  return ExperimentConfig(model=model, data=data, optim=optim, run=run, task=task, mesh=mesh)


def _model_from_dict(values: Mapping[str, Any]) -> ModelConfig:
  try:
    return ModelConfig.from_dict(values)
  except ValueError as err:  # ModelConfig says "ModelConfig.D"; configs say "model.D"
    raise ValueError(str(err).replace("ModelConfig.", "model.", 1)) from None


def check_vocab(cfg: ExperimentConfig, vocab_size: int) -> None:
  """An explicit model.V must hold every token id of the tokenizer."""
  if cfg.model.V < vocab_size:
    raise ValueError(
        f"model.V: {cfg.model.V} is smaller than the tokenizer's vocab_size {vocab_size}"
        f" ({cfg.data.tokenizer}); omit model.V to use the tokenizer's")


# ---------------------------------------------------------------------------------------------
# YAML.


class _Loader(yaml.SafeLoader):
  """SafeLoader that also reads `1e-3` (no dot) as a float, as YAML 1.2 and Python do."""


_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X)
# Replace the float resolver (not add a second one): resolvers are tried in order per first char.
_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:float"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse_yaml(text: str, where: str) -> Any:
  try:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only
  except yaml.YAMLError as err:
    raise ValueError(f"{where}: invalid YAML: {one_line(err)}") from None


BASE_KEY = "base"


def read_yaml_file(path: str) -> dict[str, Any]:
  """One YAML file as a mapping, `base` left as written (sweep files use that key otherwise)."""
  if not os.path.isfile(path):
    raise ValueError(f"config file {path}: no such file")
  with open(path, encoding="utf-8") as f:
    values = parse_yaml(f.read(), f"config file {path}")
  if values is None:
    return {}
  if not isinstance(values, dict):
    raise ValueError(f"config file {path}: expected a mapping of sections, got {type(values).__name__}")
  return values


def read_yaml(path: str) -> dict[str, Any]:
  """An experiment file resolved over its `base` chain: plain sections, no `base` key."""
  return _resolve(path, ())


def _resolve(path: str, chain: tuple[str, ...]) -> dict[str, Any]:
  """`path` over its bases; `chain` holds the files that led here, to name a cycle."""
  values = read_yaml_file(path)
  if BASE_KEY not in values:
    return values
  bases = values.pop(BASE_KEY)
  if isinstance(bases, str):
    bases = [bases]
  if not isinstance(bases, list) or not bases or not all(isinstance(b, str) and b for b in bases):
    raise ValueError(f"config file {path}: base: expected a path or a list of paths, got"
                     f" {bases!r}")
  chain = (*chain, path)
  merged: dict[str, Any] = {}
  for base in bases:
    base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
    if not os.path.isfile(base_path):
      raise ValueError(f"config file {path}: base {base!r}: no such file {base_path}")
    if any(os.path.samefile(base_path, p) for p in chain):
      raise ValueError(f"config file {path}: base {base!r} makes a cycle:"
                       f" {' -> '.join((*chain, base_path))}")
    merged = merge_configs(merged, _resolve(base_path, chain))
  return merge_configs(merged, values)


def merge_configs(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
  """`overlay` on top of `base`: mappings merge key by key, any other value (null too) replaces."""
  out = dict(base)
  for key, value in overlay.items():
    if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
      out[key] = merge_configs(out[key], value)
    else:
      out[key] = value
  return out


def apply_overrides(values: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
  """`section.key=value` overrides on a copy of `values`; the value is YAML."""
  out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in values.items()}
  for item in overrides:
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
      raise ValueError(f"override {item!r}: expected section.key=value, e.g. model.D=128")
    section, name = parts
    if section not in SECTIONS:
      raise ValueError(f"override {item!r}: unknown section {section!r}; known: {list(SECTIONS)}")
    value = parse_yaml(text, f"override {item!r}")
    current = out.get(section)
    if current is None:
      current = out[section] = {}
    elif not isinstance(current, dict):
      raise ValueError(f"override {item!r}: section {section!r} is not a mapping")
    current[name] = value
  return out


def load_experiment(path: str | None, overrides: Sequence[str] = (), *,
                    base: Mapping[str, Any] | None = None,
                    vocab_size: int | None = None) -> ExperimentConfig:
  """Reads `path` (or starts from `base`, or from all defaults), applies overrides, validates."""
  values = read_yaml(path) if path is not None else dict(base or {})
  values = apply_overrides(values, overrides)
  where = f"config file {path}" if path is not None else "config"
  if overrides:
    where += " (with overrides)"
  return ExperimentConfig.from_dict(values, vocab_size=vocab_size, where=where)


_SECTION_TYPES = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig,
                  "run": RunConfig, "task": TaskConfig}


def _field_default(section: str, key: str) -> Any:
  """The default of a section's field; "<absent>" for a field without one (or no such field)."""
  for field in dataclasses.fields(_SECTION_TYPES[section]):
    if field.name == key and field.default is not dataclasses.MISSING:
      return field.default
  return "<absent>"


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, str]]:
  """('section.key', 'section.key: saved -> current') for every field that differs; a field
  missing on one side counts as its default."""
  diffs = []
  for section in SECTIONS:
    if section in RESUMABLE_SECTIONS:
      continue
    a, b = saved.get(section) or {}, current.get(section) or {}
    both = bool(a) and bool(b)  # an optional section (task) on one side only differs in full
    for key in sorted(set(a) | set(b)):
      if section == "run" and key in RESUMABLE_RUN_FIELDS:
        continue
      default = _field_default(section, key) if both else "<absent>"
      before, after = a.get(key, default), b.get(key, default)
      if before != after:
        diffs.append((f"{section}.{key}", f"{section}.{key}: {before!r} -> {after!r}"))
  return diffs


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """`section.key: saved -> current` for every field that must match to resume a run.

  A field missing on one side counts as its default: a checkpoint saved before a field existed
  resumes when the field keeps its default."""
  return [text for name, text in _differences(saved, current)
          if name not in _RESUMABLE_MODEL_NAMES]


def computation_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """`model.key: saved -> current` for the config.COMPUTATION_FIELDS that differ."""
  return [text for name, text in _differences(saved, current) if name in _RESUMABLE_MODEL_NAMES]
