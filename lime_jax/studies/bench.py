"""`lime-jax bench`: memory, FLOPs, compile and step time of a full training step vs depth.

For each depth, the baseline (`none`) and each requested method's train step (loss, gradient,
AdamW update; LIMe `kv-static` by default, or any router or cross-layer baseline) are compiled
at one fixed shape. Reported per point:
- temp_bytes: compiled `memory_analysis().temp_size_in_bytes` (deterministic);
- flops: `cost_analysis()` of the same step lowered with the layer scan unrolled. XLA's
  cost analysis counts a while-loop body once, so the scanned program under-reports;
  unrolling the scan keeps the same operations and makes the count honest;
- compile_s: lowering + compiling the scanned step;
- step_s: median wall time of `--steps` executed steps after one warm-up; step_times, all of
  them, in the order they ran;
- environment: what the step ran on (train/environment.py: versions, backend, host CPU,
  XLA_FLAGS, commit). Step times move with the host, and records from different runs get
  compared: the README's CPU figures changed host between two days unnoticed.
Step times are taken in rounds (`time_rounds`): every variant at a depth runs one step per
round, so a slowdown of the shared machine lands on all of them alike, and a step ratio is the
median over rounds of the ratio within each round (`timing: interleaved`). `--sequential` times
each point on its own instead, one after the other, as earlier tables were (`timing:
sequential`; the ratio of the medians). PyTorch's Llama (`--against-torch`) runs in a process of
its own (studies/torch_reference.py), in the rounds too unless `--sequential`.

With a TPU topology (`topology_point`), the sharded step (fsdp over the slice) is compiled by
the TPU compiler instead and nothing runs: per-device HBM of the scanned step, and XLA FLOPs,
bytes accessed, the compiler's step estimate and the roofline of the unrolled step
(train/plan.py `topology_plan`).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lime_jax.inference import decode
from lime_jax.model import flops
from lime_jax.config import CONNECTIONS, ModelConfig
from lime_jax.model.transformer import init_params
from lime_jax.parallel.topology import Slice
from lime_jax.studies import plan_table
from lime_jax.train import environment, plan
from lime_jax.train.experiment import ExperimentConfig
from lime_jax.train.optimizer import OptimConfig, make_optimizer
from lime_jax.train.step import init_train_state, train_step

RECORD_KEYS = ("router", "depth", "width", "temp_bytes", "flops", "compile_s", "step_s",
               "step_times", "timing", "environment")
TORCH_LLAMA = "torch-llama"  # studies/torch_reference.py's records (`--against-torch`)


def _cost_flops(lowered_or_compiled) -> float:
  cost = lowered_or_compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])


@dataclasses.dataclass
class ReadyPoint:
  """A compiled point, ready to time: `record` holds what compiling measured, `step()` runs one
  training step and returns its wall seconds, `finite()` whether the last step's loss was."""

  record: dict[str, Any]
  step: Callable[[], float]
  finite: Callable[[], bool]


def prepare_point(cfg: ModelConfig, batch: int, seed: int = 0, measure_flops: bool = True,
                  compiler_options: dict[str, Any] | None = None) -> ReadyPoint:
  """The train step at `cfg` on `batch` random sequences, compiled (its temp memory, and the
  unrolled step's FLOPs unless not `measure_flops`); no step has run yet. `compiler_options`:
  XLA options for the step's compile, over XLA_FLAGS (None: XLA_FLAGS' alone)."""
  tx = make_optimizer(OptimConfig(total_steps=1000, warmup_steps=10))
  step_fn = functools.partial(train_step, model_cfg=cfg, tx=tx)
  rng = jax.random.key(seed)
  state = jax.jit(init_train_state, static_argnums=(0, 1))(cfg, tx, rng)
  tokens = np.random.default_rng(seed).integers(0, cfg.V, (batch, cfg.T + 1), dtype=np.int32)
  batch_arrays = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}

  jitted = jax.jit(step_fn, donate_argnums=(0,))
  start = time.perf_counter()
  compiled = jitted.lower(state, batch_arrays).compile(compiler_options=compiler_options)
  compile_s = time.perf_counter() - start
  temp_bytes = int(compiled.memory_analysis().temp_size_in_bytes)

  step_flops = float("nan")
  if measure_flops:
    unrolled_step = functools.partial(train_step, model_cfg=cfg.replace(scan_unroll=cfg.L), tx=tx)
    step_flops = _cost_flops(jax.jit(unrolled_step).lower(state, batch_arrays))

  live = {"state": state, "loss": float("nan")}

  def step() -> float:
    start = time.perf_counter()
    live["state"], metrics = compiled(live["state"], batch_arrays)
    live["loss"] = jax.block_until_ready(metrics["loss"])
    return time.perf_counter() - start

  record = {"router": cfg.router, "depth": cfg.L, "width": cfg.D, "temp_bytes": temp_bytes,
            "flops": step_flops, "compile_s": compile_s}
  return ReadyPoint(record, step, lambda: bool(np.isfinite(float(live["loss"]))))


def time_rounds(points: Sequence[ReadyPoint], steps: int) -> list[list[float]]:
  """Each point's wall seconds for `steps` steps, taken in rounds in which every point runs one
  timed step, in reverse order every other round (so none always runs right after the same
  one). A timed step always follows a step of its own point: where the point before it was
  another one, it runs one untimed step first. Switching programs costs the next step (64
  layers: LIMe's step 6.0 s right after the baseline's, 5.6 s after its own), and the first
  call pays one-off allocation costs."""
  times: list[list[float]] = [[] for _ in points]
  previous = None
  for round_idx in range(steps):
    order = range(len(points)) if round_idx % 2 == 0 else reversed(range(len(points)))
    for i in order:
      if previous != i:
        points[i].step()
      times[i].append(points[i].step())
      previous = i
  return times


def finish_point(point: ReadyPoint, times: list[float], timing: str) -> dict[str, Any]:
  """The point's record with its step times (`timing`: interleaved or sequential)."""
  if times and not point.finite():
    raise RuntimeError(f"bench: non-finite loss at router={point.record['router']}"
                       f" depth={point.record['depth']}")
  return dict(point.record, step_s=statistics.median(times) if times else float("nan"),
              step_times=list(times), timing=timing, environment=environment.describe())


def bench_point(cfg: ModelConfig, batch: int, steps: int, seed: int = 0,
                measure_flops: bool = True,
                compiler_options: dict[str, Any] | None = None) -> dict[str, Any]:
  """One point compiled and timed on its own."""
  point = prepare_point(cfg, batch, seed, measure_flops, compiler_options)
  (times,) = time_rounds([point], steps)
  return finish_point(point, times, "sequential")


def step_ratio(method: dict[str, Any], base: dict[str, Any]) -> tuple[float, float, float]:
  """method/base step time: (ratio, lowest, highest). Timed in the same rounds, the median of
  the per-round ratios and their range; otherwise the ratio of the medians (no range: NaN)."""
  paired = (method.get("timing") == base.get("timing") == "interleaved"
            and len(method["step_times"]) == len(base["step_times"]) > 0)
  if not paired:
    return method["step_s"] / base["step_s"], float("nan"), float("nan")
  ratios = [m / b for m, b in zip(method["step_times"], base["step_times"])]
  return statistics.median(ratios), min(ratios), max(ratios)


TOPOLOGY_KEYS = tuple(column.field for column in plan_table.COLUMNS)


def topology_point(cfg: ModelConfig, tpu: Slice, batch: int) -> dict[str, Any]:
  """The step at `cfg` with a global batch of `batch` x cfg.T, fsdp over `tpu`'s devices,
  compiled by the TPU compiler (see the module doc)."""
  exp_cfg = ExperimentConfig.from_dict({
      "model": cfg.to_dict(), "data": {"seq_len": cfg.T, "batch_size": batch},
      "mesh": {"data": 1, "fsdp": -1, "tensor": 1}})
  result = plan.topology_plan(exp_cfg, tpu)
  return {"router": cfg.router, "depth": cfg.L, "width": cfg.D, "topology": tpu.name,
          "devices": len(tpu.devices), "compile_s": result.compile_s,
          **{key: getattr(result, key) for key in TOPOLOGY_KEYS}}


def topology_table(records: list[dict[str, Any]]) -> str:
  """Per point, and each variant over its baseline (`baseline_of`) at the same depth."""
  columns = plan_table.COLUMNS
  rule = "|---|---:|" + "---:|" * len(columns)
  lines = ["| router | depth | " + " | ".join(c.header for c in columns) + " |", rule]
  for r in records:
    lines.append(f"| {r['router']} | {r['depth']} | "
                 + " | ".join(c.format(r) for c in columns) + " |")
  by_key = {(r["router"], r["depth"]): r for r in records}
  lines += ["", "| router | depth | " + " | ".join(f"{c.ratio_name} ratio" for c in columns)
            + " |", rule]
  for r in records:
    base_name = baseline_of(r["router"], r["depth"], by_key)
    b = by_key.get((base_name, r["depth"]))
    if r["router"] == "none" or b is None:
      continue
    ratios = [r[k] / b[k] for k in TOPOLOGY_KEYS]
    lines.append(f"| {_method_label(r['router'], base_name)} | {r['depth']} | "
                 + " | ".join(f"{x:.3f}" for x in ratios) + " |")
  return "\n".join(lines)


def bench_decode(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int,
                 repeats: int = 3, seed: int = 0) -> dict[str, Any]:
  """Greedy cached decoding: median tokens/s over `repeats` calls and the KV cache's bytes."""
  params = init_params(cfg, jax.random.key(seed))
  prompts = np.random.default_rng(seed).integers(0, cfg.V, (batch, prompt_len)).tolist()
  rates = []
  for _ in range(repeats + 1):  # the first call compiles
    # Speed only, of random parameters: decoding past the trained length T is fine here.
    generation = decode.generate(params, cfg, prompts, new_tokens, jax.random.key(seed),
                                 temperature=0.0, allow_past_length=True)
    if generation.compile_s == 0.0:
      rates.append(generation.tokens_per_s)
  cache = decode.init_cache(cfg, batch, prompt_len + new_tokens - 1)
  return {"decode_tokens_per_s": statistics.median(rates),
          "cache_bytes": decode.cache_bytes(cache)}


def baseline_of(variant: str, depth: int, by_key: dict[tuple[str, int], Any]) -> str:
  """The baseline a `--routers` variant is compared with: `none` with the variant's overrides
  (`kv-static:attention_query_blocks=4` against `none:attention_query_blocks=4`, so a setting
  that changes the baseline's step too is on both sides) where `by_key` (records by router and
  depth) has it at `depth`; else `none`."""
  name, sep, overrides = variant.partition(":")
  same_settings = f"none:{overrides}"
  return same_settings if sep and name != "none" and (same_settings, depth) in by_key else "none"


def _method_label(variant: str, base_name: str) -> str:
  """A ratio row's method cell: the variant, and its baseline where that is not plain `none`."""
  return variant if base_name == "none" else f"{variant} (vs {base_name})"


def ratio_rows(records: list[dict[str, Any]], batch: int) -> list[dict[str, Any]]:
  """Method/baseline ratios per depth (LIMe or another cross-layer method), and the method's
  FLOP overhead against flops.py's formula."""
  by_key = {(r["router"], r["depth"]): r for r in records}
  rows = []
  routers = [r for r in dict.fromkeys(r["router"] for r in records)
             if r not in ("none", TORCH_LLAMA)]
  for depth, router in ((d, r) for d in sorted({r["depth"] for r in records}) for r in routers):
    base_name = baseline_of(router, depth, by_key)
    base, lime = by_key.get((base_name, depth)), by_key.get((router, depth))
    if not (base and lime):
      continue
    cfg = lime["_cfg"]
    ratio, low, high = step_ratio(lime, base)
    formula = flops.mixer_train_flops(cfg, batch * cfg.T)
    rows.append({
        "router": router,
        "base": base_name,
        "depth": depth,
        "mem_ratio": lime["temp_bytes"] / base["temp_bytes"],
        "step_ratio": ratio,
        "step_ratio_range": (low, high),
        "compile_ratio": lime["compile_s"] / base["compile_s"],
        "flops_overhead": lime["flops"] - base["flops"],
        "flops_overhead_formula": formula,
    })
  return rows


def torch_table(records: list[dict[str, Any]]) -> str:
  """Each of our variants' step time over PyTorch Llama's (`--against-torch`) at its depth."""
  torch_by_depth = {r["depth"]: r for r in records if r["router"] == TORCH_LLAMA}
  lines = ["| router | depth | step s | PyTorch Llama step s | ours/PyTorch | rounds' range |",
           "|---|---:|---:|---:|---:|---|"]
  for r in records:
    theirs = torch_by_depth.get(r["depth"])
    if r["router"] == TORCH_LLAMA or theirs is None:
      continue
    ratio, low, high = step_ratio(r, theirs)
    lines.append(f"| {r['router']} | {r['depth']} | {r['step_s']:.3f} | {theirs['step_s']:.3f} |"
                 f" {ratio:.3f} | {_range(low, high)} |")
  return "\n".join(lines)


def _range(low: float, high: float) -> str:
  return "" if low != low else f"{low:.3f}-{high:.3f}"  # NaN: not timed in rounds


def format_tables(records: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
  decode_lines = []
  if records and "cache_bytes" in records[0]:
    decode_lines = ["", "| router | depth | decode tokens/s | KV cache MiB |", "|---|---:|---:|---:|"]
    decode_lines += [f"| {r['router']} | {r['depth']} | {r['decode_tokens_per_s']:.1f} |"
                     f" {r['cache_bytes'] / 2**20:.2f} |" for r in records]
  lines = ["| router | depth | width | temp MiB | GFLOPs/step | compile s | step s |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for r in (r for r in records if r["router"] != TORCH_LLAMA):  # torch's: torch_table
    lines.append(f"| {r['router']} | {r['depth']} | {r['width']} | {r['temp_bytes'] / 2**20:.1f} |"
                 f" {r['flops'] / 1e9:.2f} | {r['compile_s']:.2f} | {r['step_s']:.3f} |")
  lines += ["", "| method | depth | method/base temp mem | method/base step time |"
            " rounds' range | method/base compile | method GFLOPs measured | flops.py formula |"
            " measured/formula |", "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
  for row in rows:
    lines.append(
        f"| {_method_label(row['router'], row['base'])} | {row['depth']} |"
        f" {row['mem_ratio']:.3f} | {row['step_ratio']:.3f} |"
        f" {_range(*row['step_ratio_range'])} |"
        f" {row['compile_ratio']:.3f} | {row['flops_overhead'] / 1e9:.3f} |"
        f" {row['flops_overhead_formula'] / 1e9:.3f} | {_measured_over_formula(row)} |")
  return "\n".join(lines + decode_lines)


def _measured_over_formula(row: dict[str, Any]) -> str:
  """The FLOP overhead measured over flops.py's; n/a where the formula has none (a variant of
  the baseline itself, e.g. `none:attention_impl=dot_product`)."""
  if row["flops_overhead_formula"] == 0:
    return "n/a"
  return f"{row['flops_overhead'] / row['flops_overhead_formula']:.3f}"


def variant_config(variant: str, **base: Any) -> ModelConfig:
  """A `--routers` entry: `name[:key=value...]`, name a router (none, kv-static, ...) or a
  cross-layer baseline (config.CONNECTIONS: hyper-*, denseformer, attn-res, ...; router none), with
  ModelConfig overrides, e.g. `kv-static:router_window=4`, `hyper-dynamic:hc_expansion=2`."""
  name, *overrides = variant.split(":")
  values = dict(base, router=name)
  if name in CONNECTIONS and name != "none":
    values.update(router="none", connections=name)
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"--routers {variant!r}: expected key=value after ':', got {item!r}")
    values[key] = int(text) if text.lstrip("-").isdigit() else text
  return ModelConfig.from_dict(values, where=f"--routers {variant}")
