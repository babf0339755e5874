"""The `mesh` config section: mesh axis sizes and the logical-axis rules, validated without JAX
(so reading an experiment's YAML does not start Flax); sharding.py builds meshes from it."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

from lime_jax.config import build_dataclass

MESH_AXES = ("data", "fsdp", "tensor")

# Order matters: an earlier rule claims its mesh axes first within one array.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("act_embed", None),  # the residual stream x_BxTxD: replicated across tensor (Megatron)
    ("length", None),
    ("head_dim", None),
    ("norm", None),
    ("readers", None),
    ("sources", None),
    ("layers", None),
)


def _rules_as_lists(rules) -> list[list[Any]]:
  return [[name, list(axes) if isinstance(axes, tuple) else axes] for name, axes in rules]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes (-1: the rest of the devices) and logical-axis rules (see module doc)."""

  data: int = 1
  fsdp: int = 1
  tensor: int = 1
  rules: list = dataclasses.field(default_factory=lambda: _rules_as_lists(DEFAULT_RULES))

  def __post_init__(self):
    for name in MESH_AXES:
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or not (value >= 1 or value == -1):
        raise ValueError(f"mesh.{name}: must be a positive integer or -1 (the rest), got {value!r}")
    if [getattr(self, n) for n in MESH_AXES].count(-1) > 1:
      raise ValueError("mesh: at most one of data, fsdp, tensor may be -1")
    rules_tuple(self.rules)  # validates

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(getattr(self, n) for n in MESH_AXES)

  def resolve(self, num_devices: int) -> tuple[int, ...]:
    """Axis sizes with -1 filled in; their product must be `num_devices`."""
    sizes = list(self.shape)
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % known:
        raise ValueError(
            f"mesh: {self._describe()} cannot fill {num_devices} devices ({num_devices} is not"
            f" divisible by {known})")
      sizes[sizes.index(-1)] = num_devices // known
    elif known != num_devices:
      raise ValueError(
          f"mesh: {self._describe()} needs {known} devices, but {num_devices} are in use;"
          " set one axis to -1 (e.g. mesh.data=-1) to take the rest")
    return tuple(sizes)

  def _describe(self) -> str:
    return " x ".join(f"{n}={getattr(self, n)}" for n in MESH_AXES)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any], where: str = "mesh") -> "MeshConfig":
    return build_dataclass(cls, values, where)


def rules_tuple(rules: Sequence[Any]) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  """The config's rules as the hashable tuples Flax expects; one-line ValueError if malformed."""
  if not isinstance(rules, (list, tuple)):
    raise ValueError(f"mesh.rules: expected a list of [logical, mesh axes] pairs, got {rules!r}")
  out = []
  for i, rule in enumerate(rules):
    if not isinstance(rule, (list, tuple)) or len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f"mesh.rules[{i}]: expected [logical name, mesh axes], got {rule!r}")
    name, axes = rule
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
      bad = [a for a in axes if a not in MESH_AXES]
    else:
      bad = [] if axes is None or axes in MESH_AXES else [axes]
    if bad:
      raise ValueError(f"mesh.rules[{i}] ({name}): unknown mesh axis {bad[0]!r}; mesh axes are"
                       f" {list(MESH_AXES)} or null")
    out.append((name, axes))
  names = [name for name, _ in out]
  dups = sorted({n for n in names if names.count(n) > 1})
  if dups:
    raise ValueError(f"mesh.rules: logical axis {dups[0]!r} has more than one rule")
  return tuple(out)
