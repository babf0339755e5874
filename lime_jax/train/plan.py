"""Will this config fit, and how long will a step take, before anything runs (`lime-jax plan`).

The sharded train step (the same jitted function `train.py` runs) is lowered and compiled ahead
of time for N devices of the config's mesh: fake CPU devices stand in for the accelerators
(`--devices N` creates them when JAX has not started yet), or the devices of a real TPU topology
(`--topology v5p:2x2x1`, parallel/topology.py), compiled by the TPU compiler on any machine.

With a topology, `topology_plan` compiles twice: the scanned program (what training runs) for
the memory, and the same program with every scan iteration unrolled (`scan_unroll: L`: the
same segments, push or pull forms and masked work) for the cost, because XLA's
`cost_analysis()` counts a while-loop (scan) body once. The unrolled step's `flops`,
`bytes accessed` and `optimal_seconds` (the compiler's step estimate) are per device with every
layer counted; the roofline is max(flops / peak, bytes / HBM bandwidth) with the chip's
published figures. `cost="scaled"` counts the scanned program itself instead: compiled with
`scan_unroll` 1 and 2 (one and two layers per loop body), a layer's cost is the difference and
the step's is c1 + (L - 1) (c2 - c1). That is the program training runs, and deep stacks compile
in a minute where unrolling takes several; it needs one layer loop of the same body each way
(one scan segment, an even L) and would count every branch of a conditional in the body at
every layer (no accepted program has one: test_plan checks). Being a difference of two
programs, it also drops what they share once per loop body, such as a layout copy at the body's
edges, which training's program (one layer a body) runs at every layer;
experiments/probes/scaled_layer_cost.py shows each body's instructions.

CPU plans report per device:

- memory of one micro-batch step, from the compiled `memory_analysis()`: arguments (this device's shards of the state
  and batch) + outputs + temporaries - aliased bytes (the donated state's buffers are reused
  for the new state, so they count once). This is XLA's buffer assignment for the CPU
  compiler: layouts and fusion on a TPU or GPU differ, so treat it as an estimate with a
  margin, not as the accelerator's exact peak;
- FLOPs per optimizer step from `flops.py` only. XLA's `cost_analysis()` counts a scanned
  (while-loop) layer body once, so it under-reports scanned programs by about L;
- the FLOPs-bound step time flops / (N x peak) for each accelerator in `ACCELERATORS`, a lower
  bound (real steps reach some fraction of peak: the MFU).

`check_fit(cfg, num_devices, hbm_gib)` is the one function sweeps call to skip points that
cannot fit.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax

from lime_jax.config import ModelConfig
from lime_jax.data import sources
from lime_jax.errors import one_line
from lime_jax.model import flops as flops_lib
from lime_jax.model import mixers
from lime_jax.parallel import sharding as sharding_lib
from lime_jax.parallel.topology import Slice
from lime_jax.train import loop as train_lib
from lime_jax.train import metrics as metrics_lib
from lime_jax.train.experiment import ExperimentConfig

GIB = 2 ** 30

# name: (key of metrics.PEAK_FLOPS, the one table of dense bf16 peaks per chip; vendor HBM in GB).
# Peaks: Google Cloud TPU docs (v4 275, v5e 197, v5p 459, v6e 918 TFLOP/s) and NVIDIA's
# datasheets (H100 SXM and H200 989 TFLOP/s dense, without 2:4 sparsity).
ACCELERATORS = {
    "v4": ("TPU v4", 32),
    "v5e": ("TPU v5e", 16),
    "v5p": ("TPU v5p", 95),
    "v6e": ("TPU v6e", 32),
    "h100": ("NVIDIA H100", 80),
    "h200": ("NVIDIA H200", 141),
}


class NotEnoughDevices(ValueError):
  """JAX started with fewer CPU devices than the plan needs."""


def peak_flops(accelerator: str) -> float:
  return metrics_lib.PEAK_FLOPS[ACCELERATORS[accelerator][0]]


def hbm_gib(accelerator: str) -> float:
  return ACCELERATORS[accelerator][1] * 1e9 / GIB


def ensure_cpu_devices(n: int) -> list[jax.Device]:
  """The first n CPU devices; creates them if JAX's backends have not started yet."""
  try:
    jax.config.update("jax_num_cpu_devices", max(n, 1))
  except RuntimeError:
    pass  # JAX already started; use what it has
  devices = jax.devices("cpu")
  if len(devices) < n:
    raise NotEnoughDevices(
        f"plan: JAX started with {len(devices)} CPU device(s), {n} needed; run `lime-jax plan"
        f" --devices {n}` in a fresh process, or set XLA_FLAGS="
        f"--xla_force_host_platform_device_count={n} before JAX starts")
  return devices[:n]


@dataclasses.dataclass
class Plan:
  num_devices: int
  mesh: dict[str, int]
  argument_bytes: int  # per device
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  flops_per_step: int  # whole step, all devices, from flops.py
  compile_s: float
  # TPU topology plans only: the TPU compiler's cost of the unrolled step, per device.
  topology: str | None = None
  xla_flops: float | None = None
  xla_bytes: float | None = None
  compiler_step_s: float | None = None  # cost_analysis()["optimal_seconds"]
  roofline_step_s: float | None = None
  cost_method: str | None = None  # "unrolled" or "scaled" (module doc)

  @property
  def per_device_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  def step_time_s(self, accelerator: str) -> float:
    return self.flops_per_step / (self.num_devices * peak_flops(accelerator))

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["per_device_bytes"] = self.per_device_bytes
    out["step_time_s"] = {name: self.step_time_s(name) for name in ACCELERATORS}
    return out


def abstract_batch(cfg: ExperimentConfig, layout: sharding_lib.Layout) -> dict[str, Any]:
  """One global batch of `cfg` as shapes, dtypes and `layout`'s batch sharding, for lowering."""
  # Task batches carry answer-only loss weights; the format knows, no data is built.
  return sources.batch_format(cfg.data, cfg.task).abstract_batch(
      layout.batch_sharding(cfg.batch_size))


def _compile(cfg: ExperimentConfig, devices, dump_dir: str | None = None
             ) -> tuple[Any, sharding_lib.Layout, float]:
  """(compiled train step, layout, seconds) on `devices`; ValueError if the mesh, batch or a
  parameter cannot be split over them. `dump_dir`: where the compiler writes its HLO, buffer
  assignment and memory-usage report (what holds the memory)."""
  cfg.mesh.resolve(len(devices))  # the mesh must use exactly these devices
  layout = sharding_lib.Layout.from_config(cfg.mesh, devices)
  sharding_lib.check_batch(cfg.batch_size, layout,
                           sources.batch_format(cfg.data, cfg.task).batch_size_field)
  start = time.perf_counter()
  init, step, _ = train_lib.jitted_fns(cfg.model, cfg.optim, cfg.run.seed, layout)
  options = {"xla_dump_to": dump_dir} if dump_dir else None
  compiled = step.lower(train_lib.abstract_state(init), abstract_batch(cfg, layout)).compile(
      compiler_options=options)
  return compiled, layout, time.perf_counter() - start


def compile_step(cfg: ExperimentConfig, num_devices: int, dump_dir: str | None = None) -> Plan:
  """Compiles the sharded train step for `num_devices` CPU devices; ValueError if the mesh,
  batch or a parameter cannot be split that way."""
  return compile_on(cfg, ensure_cpu_devices(num_devices), dump_dir)


def compile_on(cfg: ExperimentConfig, devices, dump_dir: str | None = None) -> Plan:
  """The plan of the sharded train step compiled for `devices` (any platform's, a topology's
  included: its compiler's memory)."""
  return _plan(cfg, *_compile(cfg, devices, dump_dir))


COST_METHODS = ("unrolled", "scaled")


def topology_plan(cfg: ExperimentConfig, tpu: Slice, dump_dir: str | None = None,
                  cost: str = "unrolled") -> Plan:
  """The step compiled by the TPU compiler for `tpu`'s devices: memory of the scanned program,
  cost (every layer) of the unrolled one, or of the scanned one scaled (`cost`); see the module
  doc. `dump_dir`: the compiler's dumps of each program, in its `scanned/` and `unrolled/` (or
  `unroll2/`)."""
  if cost not in COST_METHODS:
    raise ValueError(f"--cost: expected one of {', '.join(COST_METHODS)}, got {cost!r}")
  if cost == "scaled":
    _check_scalable(cfg.model)
  dump = lambda name: dump_dir and os.path.join(dump_dir, name)  # noqa: E731
  compiled, layout, compile_s = _compile(cfg, list(tpu.devices), dump("scanned"))
  plan = _plan(cfg, compiled, layout, compile_s)
  if cost == "unrolled":
    # The same program with every scan iteration unrolled (segments, pull forms and masked
    # work as training runs them), so that cost_analysis counts every layer.
    unrolled = cfg.replace(model=cfg.model.replace(scan_unroll=cfg.model.L))
    cost_compiled, _, cost_s = _compile(unrolled, list(tpu.devices), dump("unrolled"))
    flops, bytes_, step_s = compiled_cost(cost_compiled)
  else:
    one = compiled
    cost_s = 0.0
    if cfg.model.scan_unroll != 1:
      one, _, cost_s = _compile(cfg.replace(model=cfg.model.replace(scan_unroll=1)),
                                list(tpu.devices))
    two, _, two_s = _compile(cfg.replace(model=cfg.model.replace(scan_unroll=2)),
                             list(tpu.devices), dump("unroll2"))
    cost_s += two_s
    flops, bytes_, step_s = scaled_cost(compiled_cost(one), compiled_cost(two), cfg.model.L)
  return dataclasses.replace(
      plan, compile_s=compile_s + cost_s, topology=tpu.name, xla_flops=flops, xla_bytes=bytes_,
      compiler_step_s=step_s, roofline_step_s=tpu.roofline_s(flops, bytes_), cost_method=cost)


def compiled_cost(compiled) -> tuple[float, float, float]:
  """(flops, bytes accessed, the compiler's step estimate) of a compiled program, per device."""
  cost = compiled.cost_analysis()
  return (float(cost["flops"]), float(cost["bytes accessed"]), float(cost["optimal_seconds"]))


def scaled_cost(one_layer: tuple[float, ...], two_layers: tuple[float, ...],
                L: int) -> tuple[float, ...]:
  """An L-layer loop's cost from its programs with one and two layers per loop body (XLA counts
  a body once): a layer costs the difference, the step c1 + (L - 1) (c2 - c1)."""
  return tuple(c1 + (L - 1) * (c2 - c1) for c1, c2 in zip(one_layer, two_layers))


def _check_scalable(model: ModelConfig) -> None:
  """The scaled cost needs one loop over the layers each way, every iteration the same body."""
  segments = len(mixers.build(model).segments())
  if not model.scan_layers or segments != 1 or model.L % 2:
    raise ValueError(
        "--cost scaled: needs one scanned layer loop over an even number of layers"
        " (model.scan_layers true, one scan segment, model.L even); got scan_layers"
        f" {model.scan_layers}, {segments} segments (model.scan_segments), L {model.L}")


def _plan(cfg: ExperimentConfig, compiled, layout: sharding_lib.Layout, compile_s: float) -> Plan:
  memory = compiled.memory_analysis()
  flops = flops_lib.train_flops_per_token(cfg.model, cfg.seq_len) * cfg.tokens_per_step
  return Plan(num_devices=layout.mesh.size, mesh=dict(layout.mesh.shape),
              argument_bytes=int(memory.argument_size_in_bytes),
              output_bytes=int(memory.output_size_in_bytes),
              alias_bytes=int(memory.alias_size_in_bytes),
              temp_bytes=int(memory.temp_size_in_bytes),
              flops_per_step=int(flops), compile_s=compile_s)


def breakdown(plan: Plan) -> str:
  return (f"arguments {plan.argument_bytes / GIB:.3f} + outputs {plan.output_bytes / GIB:.3f}"
          f" - donated {plan.alias_bytes / GIB:.3f} + temp {plan.temp_bytes / GIB:.3f} GiB")


def mesh_text(plan: Plan) -> str:
  return " x ".join(f"{k}={v}" for k, v in plan.mesh.items())


def fit_line(plan: Plan, hbm: float) -> tuple[bool, str]:
  fits = plan.per_device_bytes <= hbm * GIB
  verdict = "fits" if fits else "does not fit"
  return fits, (f"{verdict}: {plan.per_device_bytes / GIB:.3f} GiB per device of {hbm:g} GiB"
                f" ({breakdown(plan)}) on {plan.num_devices} devices, mesh {mesh_text(plan)}")


def check_fit(exp_cfg: ExperimentConfig, num_devices: int, hbm_gib: float) -> tuple[bool, str]:
  """(fits?, one-line reason with the numbers) for training `exp_cfg` on `num_devices` devices
  with `hbm_gib` GiB each. A mesh, batch or parameter that cannot be split over that many
  devices is (False, reason); too few CPU devices in this process raises NotEnoughDevices."""
  try:
    plan = compile_step(exp_cfg, num_devices)
  except NotEnoughDevices:
    raise
  except ValueError as err:
    return False, f"cannot shard on {num_devices} devices: {one_line(err)}"
  return fit_line(plan, hbm_gib)
