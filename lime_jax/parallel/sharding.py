"""Device meshes and logical-axis rules: where every parameter, optimizer slot and batch lives.

Sharding is data. `MeshConfig` (the config's `mesh` section) names the mesh's axis sizes and
the rules that map the logical axis names modules annotate (`layers.logical`,
`layers.constrain`) to mesh axes:

  data    pure data parallelism: parameters replicated, batch rows split;
  fsdp    batch rows split too, and parameters/optimizer state split along `embed` (gathered
          per layer for the matmuls, gradients reduce-scattered), ZeRO-3 style;
  tensor  Megatron-style model parallelism over heads, kv heads, MLP width and vocabulary.

One axis may be -1, "the rest of the devices". The default is one device; set e.g.
`mesh.data=-1` to use all of them. Rules are ordered pairs [logical name, mesh axes] (a mesh
axis, a list of them, or null). When one array names two logical axes that map to the same mesh
axis, the earlier rule wins and the later axis stays unsharded (Flax's rule semantics).

Layout of the LIMe accumulator acc_IxRxBxTx2xHd: (readers, kv_heads, batch, length, -, head_dim)
-> (None, tensor, data+fsdp, None, None, None). A layer's kv leaves its projection split by kv
head over `tensor`; the push mixes over *source* heads, so the layer's raw kv B*T*R*2*Hd is
all-gathered over `tensor` once per layer (the backward pass reduces its gradient likewise),
each device then writes only its own reader heads, and nothing crosses data or fsdp. Router
weights are tiny ([L, R, R] per layer) and replicated.

Parameters and optimizer state are born sharded: `state_shardings` maps an abstract state
(`jax.eval_shape` of the unsharded init) to NamedShardings, and the caller jits its init with
those as `out_shardings`. Every sharded dimension must be divisible by its mesh axes' size; a
one-line ValueError names the array and the rule otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from lime_jax.model import transformer as model_lib
from lime_jax.config import ModelConfig
from lime_jax.parallel.mesh_config import MESH_AXES, MeshConfig, rules_tuple

# ---------------------------------------------------------------------------------------------
# Meshes.


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh with Auto axes (Linen's logical rules need them) over `devices` (default: all).

  A mesh smaller than the device list takes its first devices; across processes it must span
  every device, because each process feeds its own devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  fixed = -1 not in cfg.shape
  wanted = math.prod(cfg.shape) if fixed else len(devices)
  if fixed and wanted < len(devices):
    if jax.process_count() > 1:
      raise ValueError(
          f"mesh: {cfg._describe()} uses {wanted} of {len(devices)} devices across"
          f" {jax.process_count()} processes; set one axis to -1 (e.g. mesh.data=-1)")
    devices = devices[:wanted]
  shape = cfg.resolve(len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


@dataclasses.dataclass(frozen=True)
class Layout:
  """A mesh and the rules over it; hashable, so jitted functions can be cached per layout."""

  mesh: jax.sharding.Mesh
  rules: tuple

  @classmethod
  def from_config(cls, cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> "Layout":
    return cls(make_mesh(cfg, devices), rules_tuple(cfg.rules))

  @contextlib.contextmanager
  def scope(self):
    """Mesh and rules in effect: activation constraints resolve only inside."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def sharding(self, logical: Sequence[str | None], shape: Sequence[int] | None = None,
               what: str = "array") -> NamedSharding:
    """NamedSharding for logical axis names; with `shape`, checks every split divides."""
    spec = nn.logical_to_mesh_axes(tuple(logical), self.rules)
    if shape is not None:
      for dim, (size, axes, name) in enumerate(zip(shape, spec, logical)):
        parts = math.prod(self.mesh.shape[a] for a in _axes(axes))
        if size % parts:
          raise ValueError(
              f"sharding: {what} dimension {dim} ({name}) has size {size}, not divisible by"
              f" {parts} (mesh axes {'x'.join(_axes(axes))}); change the mesh, the size, or map"
              f" {name!r} to null in mesh.rules")
    return NamedSharding(self.mesh, spec)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batch_shards(self) -> int:
    """Into how many row blocks a batch is split."""
    spec = nn.logical_to_mesh_axes(("batch", "length"), self.rules)
    return math.prod(self.mesh.shape[a] for a in _axes(spec[0]))

  def batch_sharding(self, batch_size: int) -> NamedSharding:
    return self.sharding(("batch", "length"), (batch_size, 1), what="batch")


def _axes(axes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def single_device() -> Layout:
  """The one-device layout of the default MeshConfig (what unsharded callers used to get)."""
  return Layout.from_config(MeshConfig(), jax.devices()[:1])


class OnMesh:
  """A jitted function that traces, lowers and runs inside `layout.scope()`."""

  def __init__(self, jitted: Callable[..., Any], layout: Layout):
    self.jitted, self.layout = jitted, layout

  def __call__(self, *args, **kwargs):
    with self.layout.scope():
      return self.jitted(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with self.layout.scope():
      return self.jitted.lower(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Parameter and state shardings.


def param_logical_axes(model_cfg: ModelConfig) -> dict[tuple[str, ...], tuple[str | None, ...]]:
  """{parameter path: logical axis names}, from the boxed init, without allocating."""
  boxed = jax.eval_shape(lambda: model_lib.boxed_params(model_cfg, jax.random.key(0)))
  specs = nn.get_partition_spec(boxed)
  flat = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
  return {_dict_path(path): tuple(spec) for path, spec in flat}


def _dict_path(path) -> tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _trailing_dict_path(path) -> tuple[str, ...]:
  keys = []
  for k in reversed(path):
    if not isinstance(k, jax.tree_util.DictKey):
      break
    keys.append(str(k.key))
  return tuple(reversed(keys))


def state_shardings(abstract_state: Any, model_cfg: ModelConfig, layout: Layout) -> Any:
  """NamedShardings for a train state {params, opt_state, ...} (or a bare params tree).

  Parameters follow their logical axes. Optimizer slots (Adam's mu/nu, accumulated gradients)
  mirror the parameter tree in optax, so a leaf whose trailing dict path is a parameter's and
  whose shape matches gets that parameter's sharding; counters, step and RNG are replicated.
  """
  logical = param_logical_axes(model_cfg)

  def leaf_sharding(path, leaf):
    key = _trailing_dict_path(path)
    if key and key[0] in ("params", "opt_state"):
      key = key[1:]
    names = logical.get(key)
    if names is None or len(names) != len(leaf.shape):
      return layout.replicated
    return layout.sharding(names, leaf.shape, what="/".join(key))

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)


def place_local_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's rows -> global arrays; every process passes its equal share, in order."""
  out = {}
  for key, local in batch.items():
    local = np.asarray(local)
    global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
    out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
  return out


def place_global_batch(batch: Mapping[str, np.ndarray], layout: Layout) -> dict[str, jax.Array]:
  """A batch every process holds in full (validation) -> global arrays, rows split over the batch
  shards (ValueError if they do not divide)."""
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    sharding = layout.batch_sharding(value.shape[0])
    out[key] = jax.make_array_from_callback(value.shape, sharding, lambda idx, v=value: v[idx])
  return out


def check_batch(batch_size: int, layout: Layout, where: str = "data.batch_size") -> None:
  """The global batch must split evenly over batch shards and processes."""
  shards, procs = layout.batch_shards, jax.process_count()
  if batch_size % shards:
    raise ValueError(f"{where}: global batch {batch_size} is not divisible by the {shards} batch"
                     f" shards of the mesh ({dict(layout.mesh.shape)})")
  if procs > 1 and shards % procs:
    raise ValueError(f"mesh: batch shards ({shards}) must be divisible by the {procs} processes,"
                     " so that each process feeds only its own rows")
