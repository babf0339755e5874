"""Width-versus-depth sweeps: a grid of data variant x router x depth x width x seed over one base
experiment, run point by point in this process, or written out as one launch command per point.

A sweep YAML (every key but `base` and `grid` optional):

  base: ../deep_L64_lime.yaml     # experiment config, relative to this file (it may have bases)
  overrides: [run.steps=200]      # section.key=value on every point
  out_dir: runs/sweeps/deep       # point P runs in <out_dir>/<P>/
  variants:                       # name -> overrides; e.g. the text corpus and some tasks
    text: []
    mqar: [task.name=mqar, task.difficulty=4, task.seq_len=64]
  methods:                        # named methods: a known method, then overrides
    lime-baseline-init: [kv-static, model.kv_init=baseline]
  grid:
    routers: [none, kv-static, lime-baseline-init]  # methods: routers, connections or `methods`
    depths: [32, 64, 128]
    widths: [256]                 # fixed width; or, instead:
    param_budget: 25165824        # fixed budget: width derived from depth (see below)
    head_size: 32                 # Hd kept fixed (default: the base's)
    ffn_mult: 4                   # F = ffn_mult * D
    seeds: [0, 1, 2]
  seed_keys: [run.seed]           # the config keys a point's seed is written to
  hbm_gib: 80                     # skip points that plan.check_fit says do not fit ...
  devices: 8                      # ... on this many devices (default 1)
  compiled_memory: false          # also record the compiled step's temp memory (one more compile)

Widths: a point of width D gets H = D / Hd heads, R = H / g kv heads (g = the base's query heads
per kv head), F = ffn_mult * D. Without `widths` and `param_budget` the base's width is kept
as it is. In budget mode D is the multiple of Hd * g whose baseline (router none) non-embedding
parameter count (flops.non_embedding_params) is closest to the budget; both routers at a depth
get that width, so LIMe's few router parameters come on top. results.csv records every point's
achieved count.

Points run in order variant, depth, width, router, seed (seeds innermost, so consecutive points
reuse the compiled step). A point whose final checkpoint (step run.steps) exists is not trained
again (unless its checkpoint holds another config: then it is reported failed, with none of
that run's numbers); an interrupted one resumes from its latest checkpoint (run.resume=auto).
Results: `results.csv` (one row per point), `results.md` (mean and 95% t-interval over seeds, the
method - baseline difference paired by seed, and each method at L against the baseline at 2L
where the grid has both depths, and the environments the points trained on: points from
different jaxlibs or host CPUs are not bitwise comparable), and PNGs per variant: validation
loss vs training FLOPs per depth, final validation loss (and task accuracy) vs depth. FLOPs
come from flops.py.

Every error in a sweep file is a one-line ValueError naming the file and the key.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import json
import math
import os
import shlex
import sys
import time
from typing import Any, Mapping, Sequence

from lime_jax.config import CONNECTIONS, ROUTERS, build_dataclass, require_positive_int
from lime_jax.data import sources
from lime_jax.errors import one_line
from lime_jax.model import flops as flops_lib
from lime_jax.train import plan
from lime_jax.train import checkpoint as ckpt
from lime_jax.train import environment
from lime_jax.train import loop as train_lib
from lime_jax.train.experiment import ExperimentConfig, load_experiment, read_yaml, read_yaml_file
from lime_jax.train.metrics import read_metrics

KNOWN_METHODS = ROUTERS + CONNECTIONS[1:]
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
POINT_FILE = "sweep_point.json"  # per point: wall time over all invocations that trained it
COMMANDS_FILE = "commands.sh"
BUDGET_TOLERANCE = 0.25  # a derived width further than this from the budget is an error
CSV_FIELDS = ("point", "variant", "router", "L", "D", "H", "R", "F", "seed", "params",
              "non_embedding_params", "steps", "tokens", "train_flops", "final_val_loss",
              "best_val_loss", "final_val_accuracy", "chance", "tokens_per_s",
              "compiled_temp_mib", "wall_s", "environment", "status")


@dataclasses.dataclass(frozen=True)
class GridConfig:
  routers: list = dataclasses.field(default_factory=lambda: ["none", "kv-static"])
  depths: list | None = None  # None: the base's depth
  widths: list | None = None  # fixed-width mode
  param_budget: int | None = None  # fixed-budget mode: non-embedding parameters per point
  head_size: int | None = None  # None: the base's Hd
  ffn_mult: int = 4
  seeds: list = dataclasses.field(default_factory=lambda: [0])

  def __post_init__(self):
    _require_list("grid.routers", self.routers)  # names are checked with `methods` (SweepConfig)
    for name in ("depths", "widths", "seeds"):
      values = getattr(self, name)
      if values is None:
        continue
      _require_list(f"grid.{name}", values)
      for i, value in enumerate(values):
        if name == "seeds":
          if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"grid.seeds[{i}]: must be a non-negative integer, got {value!r}")
        else:
          require_positive_int(f"grid.{name}[{i}]", value)
    if self.widths is not None and self.param_budget is not None:
      raise ValueError("grid: give widths (fixed width) or param_budget (fixed budget), not both")
    for name in ("param_budget", "head_size"):
      if getattr(self, name) is not None:
        require_positive_int(f"grid.{name}", getattr(self, name))
    require_positive_int("grid.ffn_mult", self.ffn_mult)

  @property
  def mode(self) -> str:
    return "budget" if self.param_budget is not None else "width"


def _require_list(where: str, values: Any) -> None:
  if not isinstance(values, list) or not values:
    raise ValueError(f"{where}: expected a non-empty list, got {values!r}")
  if len(set(map(repr, values))) != len(values):
    raise ValueError(f"{where}: repeated entries in {values!r}")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  base: str  # experiment YAML, resolved against the sweep file's directory
  grid: GridConfig
  overrides: list = dataclasses.field(default_factory=list)
  out_dir: str = "runs/sweep"
  variants: dict = dataclasses.field(default_factory=lambda: {"": []})
  seed_keys: list = dataclasses.field(default_factory=lambda: ["run.seed"])
  hbm_gib: float | None = None
  devices: int = 1
  compiled_memory: bool = False
  methods: dict = dataclasses.field(default_factory=dict)  # name -> [known method, overrides...]

  def __post_init__(self):
    if not isinstance(self.methods, dict):
      raise ValueError(f"methods: expected a mapping name -> [method, overrides...], got"
                       f" {self.methods!r}")
    for name, spec in self.methods.items():
      if not isinstance(name, str) or not name.replace("-", "").isalnum():
        raise ValueError(f"methods: names must be letters, digits and '-', got {name!r}")
      if name in KNOWN_METHODS:
        raise ValueError(f"methods.{name}: the name of a built-in method; choose another")
      if (not isinstance(spec, list) or not spec or not all(isinstance(v, str) for v in spec)
          or spec[0] not in KNOWN_METHODS):
        raise ValueError(f"methods.{name}: expected [a method from {KNOWN_METHODS},"
                         f" overrides...], got {spec!r}")
    for router in self.grid.routers:
      if router not in KNOWN_METHODS and router not in self.methods:
        raise ValueError(f"grid.routers: unknown method {router!r}; choose from"
                         f" {KNOWN_METHODS} or the sweep's methods {sorted(self.methods)}")
    for name in ("overrides", "seed_keys"):
      values = getattr(self, name)
      if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{name}: expected a list of strings, got {values!r}")
    if not self.seed_keys:
      raise ValueError("seed_keys: expected at least one key such as run.seed")
    if not isinstance(self.variants, dict) or not self.variants:
      raise ValueError(f"variants: expected a mapping name -> list of overrides, got"
                       f" {self.variants!r}")
    for name, values in self.variants.items():
      if not isinstance(name, str) or (name and not name.replace("-", "").isalnum()):
        raise ValueError(f"variants: names must be letters, digits and '-', got {name!r}")
      if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"variants.{name}: expected a list of overrides, got {values!r}")
    if not isinstance(self.out_dir, str) or not self.out_dir:
      raise ValueError(f"out_dir: must be a non-empty path, got {self.out_dir!r}")
    if self.hbm_gib is not None and not self.hbm_gib > 0:
      raise ValueError(f"hbm_gib: must be > 0 or null, got {self.hbm_gib!r}")
    require_positive_int("devices", self.devices)


def load_sweep(path: str, overrides: Sequence[str] = ()) -> SweepConfig:
  """Reads a sweep YAML; `overrides` are extra experiment overrides for every point."""
  where = f"sweep file {path}"
  values = read_yaml_file(path)  # here `base` names the experiment, not a sweep to compose
  try:
    values = dict(values)
    if "base" not in values or "grid" not in values:
      raise ValueError("needs keys 'base' (an experiment YAML) and 'grid'")
    grid = values.pop("grid")
    grid = build_dataclass(GridConfig, grid if grid is not None else {}, "grid")
    if not isinstance(values["base"], str):
      raise ValueError(f"base: expected a path, got {values['base']!r}")
    values["base"] = os.path.normpath(
        os.path.join(os.path.dirname(os.path.abspath(path)), values["base"]))
    read_yaml(values["base"])  # a missing experiment file or a cycle in its bases fails here
    cfg = build_dataclass(SweepConfig, {**values, "grid": grid}, "sweep")
    if overrides:
      cfg = dataclasses.replace(cfg, overrides=[*cfg.overrides, *overrides])
  except ValueError as err:
    raise ValueError(f"{where}: {one_line(err)}") from None
  return cfg


# ---------------------------------------------------------------------------------------------
# The grid.


@dataclasses.dataclass(frozen=True)
class Point:
  name: str
  variant: str
  router: str
  L: int
  D: int
  seed: int
  overrides: tuple[str, ...]  # on top of the base file: everything that makes this point
  cfg: ExperimentConfig


def method_overrides(method: str, methods: Mapping[str, Sequence[str]] | None = None
                     ) -> tuple[str, ...]:
  """The model overrides that select a cross-layer method by name: a router, a baseline's
  connections (with router none), or a sweep's named method (a known one plus overrides)."""
  if methods and method in methods:
    known, *extra = methods[method]
    return (*method_overrides(known), *extra)
  if method in CONNECTIONS and method != "none":
    return ("model.router=none", f"model.connections={method}")
  return (f"model.router={method}", "model.connections=none")

def _shape_overrides(base: ExperimentConfig, D: int, head_size: int, ffn_mult: int) -> list[str]:
  group = base.model.H // base.model.R  # query heads per kv head, kept from the base
  if D % (head_size * group):
    raise ValueError(f"grid.widths: width {D} is not a multiple of head size {head_size} x"
                     f" {group} query heads per kv head")
  H = D // head_size
  return [f"model.D={D}", f"model.H={H}", f"model.R={H // group}", f"model.Hd={head_size}",
          f"model.F={ffn_mult * D}"]


def budget_width(base: ExperimentConfig, L: int, budget: int, head_size: int,
                 ffn_mult: int) -> tuple[int, int]:
  """(D, achieved non-embedding params of the baseline at D): the multiple of head_size x
  (query heads per kv head) whose count at depth L is closest to `budget`."""
  group = base.model.H // base.model.R
  step = head_size * group
  best = None
  k = 1
  while True:
    D = k * step
    H = D // head_size
    model = base.model.replace(D=D, L=L, H=H, R=H // group, Hd=head_size, F=ffn_mult * D,
                               router="none")
    params = flops_lib.non_embedding_params(model)
    if best is None or abs(params - budget) < abs(best[1] - budget):
      best = (D, params)
    if params >= budget:
      return best
    k += 1


def expand(cfg: SweepConfig) -> list[Point]:
  """Every point, validated (ValueError before anything is written)."""
  base = load_experiment(cfg.base, cfg.overrides)
  grid = cfg.grid
  head_size = grid.head_size or base.model.Hd
  depths = grid.depths or [base.model.L]
  points = []
  for variant, variant_overrides in cfg.variants.items():
    for L in depths:
      if grid.mode == "budget":
        D, achieved = budget_width(base, L, grid.param_budget, head_size, grid.ffn_mult)
        if abs(achieved - grid.param_budget) > BUDGET_TOLERANCE * grid.param_budget:
          raise ValueError(
              f"grid.param_budget: {grid.param_budget} parameters at {L} layers: the nearest"
              f" width {D} gives {achieved}; use a larger budget or a smaller head_size")
        widths = [D]
      else:
        widths = grid.widths or [base.model.D]
      for D in widths:
        shape = ([] if grid.mode == "width" and grid.widths is None
                 else _shape_overrides(base, D, head_size, grid.ffn_mult))
        for router in grid.routers:
          for seed in grid.seeds:
            name = "_".join(p for p in (variant, router, f"L{L}", f"D{D}", f"s{seed}") if p)
            overrides = (*cfg.overrides, *variant_overrides, *method_overrides(router, cfg.methods),
                         f"model.L={L}", *shape, *(f"{key}={seed}" for key in cfg.seed_keys),
                         f"run.out_dir={os.path.join(cfg.out_dir, name)}")
            try:
              point_cfg = load_experiment(cfg.base, overrides)
            except ValueError as err:
              raise ValueError(f"sweep point {name}: {one_line(err)}") from None
            points.append(Point(name, variant, router, L, D, seed, overrides, point_cfg))
  return points


def select(points: Sequence[Point], only: Sequence[str] | None) -> list[Point]:
  """The points whose name matches any of the fnmatch patterns (all when none are given)."""
  if not only:
    return list(points)
  chosen = [p for p in points if any(fnmatch.fnmatchcase(p.name, pat) for pat in only)]
  if not chosen:
    raise ValueError(f"--only {' '.join(only)}: matches none of the {len(points)} points"
                     f" (e.g. {points[0].name})")
  return chosen


def commands(cfg: SweepConfig, points: Sequence[Point]) -> list[str]:
  """One `lime-jax train` command per point (the base file plus the point's overrides)."""
  base = os.path.relpath(cfg.base) if not os.path.relpath(cfg.base).startswith("..") else cfg.base
  return [shlex.join(["lime-jax", "train", "--config", base, *p.overrides]) for p in points]


def write_commands(cfg: SweepConfig, points: Sequence[Point], path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write("#!/bin/sh\n# One training run per sweep point; each resumes if interrupted.\nset -e\n")
    f.writelines(line + "\n" for line in commands(cfg, points))
  os.chmod(path, 0o755)
  return path


# ---------------------------------------------------------------------------------------------
# Running.


def check_fit(cfg: SweepConfig, point_cfg: ExperimentConfig) -> tuple[bool, str]:
  """plan.check_fit when the sweep sets hbm_gib; always fits otherwise."""
  if cfg.hbm_gib is None:
    return True, ""
  return plan.check_fit(point_cfg, cfg.devices, cfg.hbm_gib)


def _finished(point: Point) -> bool:
  latest = ckpt.latest_step(train_lib.checkpoint_dir(point.cfg))
  return latest is not None and latest >= point.cfg.run.steps


def _finished_status(point: Point) -> tuple[str, bool]:
  """A finished point's (status, foreign): "finished earlier", or "failed: ..." when its
  checkpoint does not read or holds a run of another config (foreign: the sweep's overrides
  changed since it trained), whose numbers must not be reported as this point's."""
  try:
    train_lib.resume_step(point.cfg, "auto")
  except train_lib.ConfigMismatchError as err:
    return f"failed: {one_line(err)}", True
  except ValueError as err:  # an unreadable checkpoint (CheckpointError)
    return f"failed: {one_line(err)}", False
  return "finished earlier", False


def _read_point_file(out_dir: str) -> dict[str, Any]:
  path = os.path.join(out_dir, POINT_FILE)
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _write_point_file(out_dir: str, values: Mapping[str, Any]) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, POINT_FILE), "w", encoding="utf-8") as f:
    json.dump(dict(values), f)


def compiled_temp_mib(point_cfg: ExperimentConfig) -> float | None:
  """Temp memory of the compiled train step (XLA memory_analysis), MiB; one extra compile."""
  init, step, _ = train_lib.jitted_fns(point_cfg.model, point_cfg.optim, point_cfg.run.seed)
  batch = sources.batch_format(point_cfg.data, point_cfg.task).abstract_batch()
  analysis = step.lower(train_lib.abstract_state(init), batch).compile().memory_analysis()
  return None if analysis is None else analysis.temp_size_in_bytes / 2**20


def run_points(cfg: SweepConfig, points: Sequence[Point], *, log=None) -> list[dict]:
  """Trains the points one after another; returns one results row per point."""
  log = log or sys.stderr
  if cfg.hbm_gib is not None:  # the fit check compiles on `devices` fake CPU devices
    plan.ensure_cpu_devices(cfg.devices)  # before any training starts JAX, or a one-line error
  rows = []
  for i, point in enumerate(points):
    out_dir = point.cfg.run.out_dir
    fits, reason = check_fit(cfg, point.cfg)
    extra = {}
    if not fits:
      status = f"skipped: {reason}"
    elif _finished(point):
      status, extra["foreign"] = _finished_status(point)
    else:
      print(f"[{i + 1}/{len(points)}] {point.name}", file=log, flush=True)
      try:
        result = train_lib.train(point.cfg)
        status = ("trained" if result.resumed_from is None
                  else f"resumed from step {result.resumed_from}")
        record = _read_point_file(out_dir)
        _write_point_file(out_dir, {**record, "wall_s": record.get("wall_s", 0.0) + result.wall_s})
      except (ValueError, train_lib.NonFiniteLossError) as err:
        status = f"failed: {one_line(err)}"
    if fits and cfg.compiled_memory and not status.startswith("failed"):
      extra["compiled_temp_mib"] = compiled_temp_mib(point.cfg)
    print(f"[{i + 1}/{len(points)}] {point.name}: {status}", file=log, flush=True)
    rows.append(collect(point, status, **extra))
  return rows


def point_environment(out_dir: str) -> str | None:
  """The numeric environment a point trained on ('A + B' when its starts differed), None for a
  run that recorded none (trained before environment.jsonl existed)."""
  labels = []
  for env in environment.read(out_dir):
    label = environment.numeric_signature(env)
    if label not in labels:
      labels.append(label)
  return " + ".join(labels) or None


def collect(point: Point, status: str, foreign: bool = False,
            compiled_temp_mib: float | None = None) -> dict[str, Any]:
  """The results row of a point, from its metrics.jsonl and flops.py; none of its run's numbers
  when the run directory holds another config's run."""
  cfg = point.cfg
  model = cfg.model
  records = [] if foreign else read_metrics(cfg.run.out_dir)
  evals = [r for r in records if r.get("val_loss") is not None]
  steps = max((r["step"] for r in records), default=0)
  rates = sorted(r["tokens_per_s"] for r in records if r.get("tokens_per_s") is not None)
  tokens = steps * cfg.tokens_per_step
  last = evals[-1] if evals else {}
  return {
      "point": point.name, "variant": point.variant, "router": point.router, "L": model.L,
      "D": model.D, "H": model.H, "R": model.R, "F": model.F, "seed": point.seed,
      "params": flops_lib.total_params(model),
      "non_embedding_params": flops_lib.non_embedding_params(model),
      "steps": steps, "tokens": tokens,
      "train_flops": tokens * flops_lib.train_flops_per_token(model, cfg.seq_len),
      "final_val_loss": last.get("val_loss"),
      "best_val_loss": min((r["val_loss"] for r in evals), default=None),
      "final_val_accuracy": last.get("val_accuracy"),
      "chance": last.get("chance"),
      "tokens_per_s": rates[len(rates) // 2] if rates else None,  # median: robust to hiccups
      "compiled_temp_mib": compiled_temp_mib,
      "wall_s": None if foreign else _read_point_file(cfg.run.out_dir).get("wall_s"),
      "environment": None if foreign else point_environment(cfg.run.out_dir),
      "status": status,
  }


# ---------------------------------------------------------------------------------------------
# Statistics.

# Two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30 (standard table values).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
  if df < 1:
    raise ValueError(f"t interval: needs at least 2 values, got df {df}")
  if df <= len(_T975):
    return _T975[df - 1]
  z = 1.959964  # Cornish-Fisher expansion; within 0.001 of the exact value beyond df 30
  return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values: Sequence[float]) -> tuple[float, float | None]:
  """(mean, half-width of the 95% t-interval); None for the width of a single value."""
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return mean, None
  sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
  return mean, t975(n - 1) * sd / math.sqrt(n)


# ---------------------------------------------------------------------------------------------
# Reports.


def write_csv(rows: Sequence[Mapping[str, Any]], path: str) -> str:
  with open(path, "w", encoding="utf-8", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows({k: ("" if row.get(k) is None else row[k]) for k in CSV_FIELDS}
                     for row in rows)
  return path


def _done(rows):
  return [r for r in rows if r["final_val_loss"] is not None and not r["status"].startswith(
      ("skipped", "failed", "not run"))]


def _groups(rows) -> dict[tuple, list[dict]]:
  groups: dict[tuple, list[dict]] = {}
  for row in _done(rows):
    groups.setdefault((row["variant"], row["L"], row["D"], row["router"]), []).append(row)
  return groups


def _fmt(mean: float | None, ci: float | None, digits: int = 4) -> str:
  if mean is None:
    return "-"
  return f"{mean:.{digits}f}" + (f" ± {ci:.{digits}f}" if ci is not None else "")


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  """Mean ± 95% t-interval over seeds per variant x depth x width x router, then the paired
  method - baseline differences (LIMe or any other cross-layer method), then the skipped and
  failed points."""
  lines = ["| variant | router | L | D | params | seeds | final val loss | best val loss |"
           " accuracy | chance | tokens/s | train FLOPs |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  groups = _groups(rows)
  for (variant, L, D, router), members in sorted(groups.items()):
    final = mean_ci([r["final_val_loss"] for r in members])
    best = mean_ci([r["best_val_loss"] for r in members])
    accs = [r["final_val_accuracy"] for r in members if r["final_val_accuracy"] is not None]
    acc = mean_ci(accs) if accs else (None, None)
    rates = [r["tokens_per_s"] for r in members if r["tokens_per_s"] is not None]
    chance = members[0]["chance"]
    lines.append(
        f"| {variant or '-'} | {router} | {L} | {D} | {members[0]['params']:,} | {len(members)}"
        f" | {_fmt(*final)} | {_fmt(*best)} | {_fmt(*acc, digits=3)}"
        f" | {'-' if chance is None else f'{chance:.3g}'}"
        f" | {'-' if not rates else f'{sum(rates) / len(rates):,.0f}'}"
        f" | {members[0]['train_flops']:.3g} |")
  diff_lines = []
  for (variant, L, D, router), lime in sorted(groups.items()):
    base = groups.get((variant, L, D, "none"))
    if router == "none" or base is None:
      continue
    pairs, loss, lime_wins = _paired(lime, base)
    if not pairs:
      continue
    acc_pairs = [(a["final_val_accuracy"], b["final_val_accuracy"]) for a, b in pairs
                 if a["final_val_accuracy"] is not None and b["final_val_accuracy"] is not None]
    acc = mean_ci([a - b for a, b in acc_pairs]) if acc_pairs else (None, None)
    diff_lines.append(
        f"| {variant or '-'} | {router} | {L} | {D} | {len(pairs)} | {_fmt(*loss)}"
        f" | {_fmt(*acc, digits=3)} | {lime_wins}/{len(pairs)} | {_verdict(*loss)} |")
  out = ["## Mean ± 95% t-interval over seeds", "", *lines]
  if diff_lines:
    out += ["", "## Method - baseline, paired by seed (negative loss difference: the method"
            " lower)", "",
            "| variant | method | L | D | pairs | final val loss diff | accuracy diff |"
            " seeds method lower | 95% interval says |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|", *diff_lines]
  by_depth = _by_depth_lines(rows, groups)
  if by_depth:
    out += ["", "## By depth: each method's mean and its difference to the baseline (bold: the"
            " paired 95% interval excludes 0; (k/n): seeds on which the method is lower, or its"
            " accuracy higher)", "", *by_depth]
  twice = _twice_depth_lines(groups)
  if twice:
    out += ["", "## Method at L - baseline at 2L, paired by seed (the paper's depth claim in"
            " miniature)", "",
            "| variant | method | L, D | baseline L, D | pairs | final val loss diff |"
            " train FLOPs method/baseline | seeds method lower | 95% interval says |",
            "|---|---|---|---|---:|---:|---:|---:|---|", *twice]
  out += _environment_lines(rows)
  other = [r for r in rows if r["status"].startswith(("skipped", "failed", "not run"))]
  if other:
    out += ["", "## Not run", "", "| point | status |", "|---|---|",
            *(f"| {r['point']} | {r['status']} |" for r in other)]
  return "\n".join(out) + "\n"


def _environment_lines(rows) -> list[str]:
  """Which environments the reported points trained on; a warning when they differ, since
  runs are bitwise reproducible on one environment only (train/environment.py)."""
  counts: dict[str, int] = {}
  for row in _done(rows):
    label = row.get("environment") or "not recorded"
    counts[label] = counts.get(label, 0) + 1
  if not counts:
    return []
  lines = ["", "## Environments", ""]
  if len(counts) > 1:
    lines += ["**The points ran on different environments**: a re-run on one environment"
              " will not reproduce every point bit for bit.", ""]
  return lines + [f"- {n} point{'s' * (n != 1)}: {label}" for label, n in counts.items()]


def _by_depth_lines(rows, groups: Mapping[tuple, list[dict]]) -> list[str]:
  """Per variant, method x depth tables (rows in the grid's order, the baseline first): final
  validation loss, its paired difference to the baseline, and the same for accuracy where the
  variant has one. A variant with several widths at one depth (a width sweep) has none."""
  order = list(dict.fromkeys(["none"] + [r["router"] for r in rows]))
  lines: list[str] = []
  for variant in sorted({k[0] for k in groups}, key=str):
    keys = [k for k in groups if k[0] == variant]
    width_of = {}
    for _, L, D, _ in keys:
      width_of.setdefault(L, set()).add(D)
    if any(len(widths) > 1 for widths in width_of.values()) or len(width_of) < 2:
      continue
    depths = sorted(width_of)
    width_of = {L: next(iter(width_of[L])) for L in depths}
    same_width = len(set(width_of.values())) == 1
    header = ["L {}".format(L) if same_width else f"L {L} (D {width_of[L]})" for L in depths]
    routers = [r for r in order if any(k[3] == r for k in keys)]
    has_acc = any(r["final_val_accuracy"] is not None for k in keys for r in groups[k])
    for metric, label, digits in [("final_val_loss", "final val loss", 3)] + (
        [("final_val_accuracy", "accuracy", 3)] if has_acc else []):
      means, diffs = [], []
      for router in routers:
        cells, diff_cells = [], []
        for L in depths:
          members = groups.get((variant, L, width_of[L], router), [])
          values = [r[metric] for r in members if r[metric] is not None]
          cells.append(_fmt(*mean_ci(values), digits=digits) if values else "-")
          pairs, diff, better = _paired(
              members, groups.get((variant, L, width_of[L], "none"), []), metric)
          if router == "none" or not pairs:
            diff_cells.append("-")
            continue
          mean, ci = diff
          text = _fmt(mean, ci, digits=digits)
          if ci is not None and abs(mean) > ci:
            text = f"**{text}**"
          diff_cells.append(f"{text} ({better}/{len(pairs)})")
        means.append(f"| {router} | " + " | ".join(cells) + " |")
        if router != "none":
          diffs.append(f"| {router} | " + " | ".join(diff_cells) + " |")
      rule = "|---|" + "---:|" * len(depths)
      lines += [f"{variant or '-'}: {label}", "", "| method | " + " | ".join(header) + " |",
                rule, *means, "", "| method - baseline | " + " | ".join(header) + " |", rule,
                *diffs, ""]
  return lines[:-1] if lines else lines


def _paired(method_rows, base_rows, metric: str = "final_val_loss"):
  """(pairs of rows with the same seed and a value of `metric` in both, mean_ci of method -
  baseline, how many seeds the method is better on: lower loss, higher accuracy); no pairs:
  ([], None, 0)."""
  by_seed = {r["seed"]: r for r in base_rows if r[metric] is not None}
  pairs = [(r, by_seed[r["seed"]]) for r in method_rows
           if r[metric] is not None and r["seed"] in by_seed]
  if not pairs:
    return [], None, 0
  diffs = [a[metric] - b[metric] for a, b in pairs]
  better = sum((d < 0) if metric == "final_val_loss" else (d > 0) for d in diffs)
  return pairs, mean_ci(diffs), better


def _twice_depth_lines(groups: Mapping[tuple, list[dict]]) -> list[str]:
  """Each method at depth L against the baseline at 2L: the same width, or the one width the
  grid gives 2L (budget mode). The baseline's own row (none at L against none at 2L) is the
  reference: where depth does not yet pay, every shallow model wins this comparison."""
  lines = []
  for (variant, L, D, router), members in sorted(groups.items(), key=lambda kv: (
      kv[0][0], kv[0][1], kv[0][2], kv[0][3] != "none", kv[0][3])):
    deeper = sorted(k for k in groups if k[0] == variant and k[1] == 2 * L and k[3] == "none")
    same_width = [k for k in deeper if k[2] == D]
    key = same_width[0] if same_width else (deeper[0] if len(deeper) == 1 else None)
    if key is None:
      continue
    pairs, loss, wins = _paired(members, groups[key])
    if not pairs:
      continue
    flops_ratio = pairs[0][0]["train_flops"] / pairs[0][1]["train_flops"]
    lines.append(f"| {variant or '-'} | {router} | {L}, {D} | {key[1]}, {key[2]} | {len(pairs)}"
                 f" | {_fmt(*loss)} | {flops_ratio:.2f} | {wins}/{len(pairs)}"
                 f" | {_verdict(*loss)} |")
  return lines


def _verdict(mean: float, ci: float | None) -> str:
  if ci is None:
    return "one seed: no interval"
  if mean + ci < 0:
    return "method lower"
  if mean - ci > 0:
    return "baseline lower"
  return "no clear difference (interval covers 0)"


def _mean_curves(members: Sequence[Mapping[str, Any]], out_dirs: Mapping[str, str]):
  """(flops, mean val loss, CI half-width) over seeds at the eval steps all seeds logged."""
  curves = []
  for row in members:
    records = [r for r in read_metrics(out_dirs[row["point"]]) if r.get("val_loss") is not None]
    curves.append({r["step"]: (r["flops"], r["val_loss"]) for r in records})
  steps = sorted(set.intersection(*(set(c) for c in curves)))
  flops = [curves[0][s][0] for s in steps]
  stats = [mean_ci([c[s][1] for c in curves]) for s in steps]
  return flops, [m for m, _ in stats], [ci or 0.0 for _, ci in stats]


def plot(rows: Sequence[Mapping[str, Any]], out_dirs: Mapping[str, str], out_dir: str) -> list[str]:
  """Per variant: val loss vs training FLOPs (one panel per depth and width, both routers, mean
  over seeds with a 95% band), and final val loss (and accuracy) vs depth with 95% error bars."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  groups = _groups(rows)
  written = []
  for variant in sorted({k[0] for k in groups}):
    suffix = f"_{variant}" if variant else ""
    label = variant or "sweep"
    shapes = sorted({(L, D) for v, L, D, _ in groups if v == variant})
    routers = sorted({r for v, _, _, r in groups if v == variant})
    fig, axes = plt.subplots(1, len(shapes), figsize=(max(3.6 * len(shapes), 6.0), 3.6),
                             dpi=110, squeeze=False, sharey=True)
    for ax, (L, D) in zip(axes[0], shapes):
      for router in routers:
        members = groups.get((variant, L, D, router))
        if not members:
          continue
        flops, mean, ci = _mean_curves(members, out_dirs)
        line, = ax.plot(flops, mean, marker="o", markersize=2.5,
                        label=f"{router} (n={len(members)})")
        ax.fill_between(flops, [m - c for m, c in zip(mean, ci)],
                        [m + c for m, c in zip(mean, ci)], color=line.get_color(), alpha=0.2)
      ax.set_title(f"L {L}, D {D}", fontsize=9)
      ax.set_xlabel("training FLOPs")
      ax.grid(True, alpha=0.3)
      ax.legend(fontsize=7)
    axes[0][0].set_ylabel("validation loss (nats/token)")
    fig.suptitle(f"{label}: validation loss vs training FLOPs\n(mean over seeds, 95% t-band)",
                 fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, f"val_loss_vs_flops{suffix}.png")
    fig.savefig(path)
    plt.close(fig)
    written.append(path)

    has_acc = any(r["final_val_accuracy"] is not None for k, m in groups.items()
                  if k[0] == variant for r in m)
    panels = [("final_val_loss", "final validation loss")]
    if has_acc:
      panels.append(("final_val_accuracy", "test exact-match accuracy"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), dpi=110,
                             squeeze=False)
    depths = sorted({L for L, _ in shapes})
    width_of = _width_per_depth(shapes)
    name_widths = width_of is not None and len(set(width_of.values())) > 1
    depth_labels = [f"{L}\n(D {width_of[L]})" if name_widths else str(L) for L in depths]
    for ax, (key, ylabel) in zip(axes[0], panels):
      for name, pts in _depth_series(groups, variant, routers, key):
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                    yerr=[p[2] or 0.0 for p in pts], marker="o", capsize=3, label=name)
      if key == "final_val_accuracy":
        chance = next((r["chance"] for k, m in groups.items() if k[0] == variant for r in m
                       if r["chance"] is not None), None)
        if chance is not None:
          ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label="chance")
      ax.set_xscale("log", base=2)
      ax.set_xticks(depths, depth_labels)
      ax.minorticks_off()
      ax.set_xlabel("layers")
      ax.set_ylabel(ylabel)
      ax.grid(True, alpha=0.3)
      ax.legend(fontsize=7)
    fig.suptitle(f"{label}: final values vs depth (mean, 95% interval over seeds)", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, f"final_vs_depth{suffix}.png")
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
  return written


def _width_per_depth(shapes: Sequence[tuple[int, int]]) -> dict[int, int] | None:
  """{L: D} when every depth has one width (a fixed budget sets it), else None (a width sweep)."""
  width_of = dict(shapes)
  return width_of if len(width_of) == len(shapes) else None


def _depth_series(groups: Mapping[tuple, list[dict]], variant, routers: Sequence[str],
                  key: str) -> list[tuple[str, list[tuple[int, float, float | None]]]]:
  """The final-vs-depth plot's lines: (label, [(L, mean, ci)]) per router, and per width when
  a depth has several (a width sweep); with one width per depth (a fixed budget, the width
  set by the depth) one line per router runs across the widths."""
  shapes = sorted({(L, D) for v, L, D, _ in groups if v == variant})
  width_of = _width_per_depth(shapes)
  depths = sorted({L for L, _ in shapes})
  lines = []
  for router in routers:
    for D in [None] if width_of is not None else sorted({D for _, D in shapes}):
      pts = []
      for L in depths:
        members = groups.get((variant, L, width_of[L] if D is None else D, router), [])
        values = [r[key] for r in members if r[key] is not None]
        if values:
          pts.append((L, *mean_ci(values)))
      if pts:
        lines.append((router if D is None else f"{router} D {D}", pts))
  return lines


def report(cfg: SweepConfig, points: Sequence[Point], rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """results.csv, results.md and the PNGs in the sweep's out_dir; returns the paths."""
  os.makedirs(cfg.out_dir, exist_ok=True)
  paths = [write_csv(rows, os.path.join(cfg.out_dir, RESULTS_CSV))]
  md_path = os.path.join(cfg.out_dir, RESULTS_MD)
  with open(md_path, "w", encoding="utf-8") as f:
    f.write(markdown(rows))
  paths.append(md_path)
  paths += plot(rows, {p.name: p.cfg.run.out_dir for p in points}, cfg.out_dir)
  return paths


def run_sweep(cfg: SweepConfig, only: Sequence[str] | None = None, *,
              log=None) -> tuple[list[dict], list[str]]:
  """Expands, trains what is not finished (of the points `only` selects), and reports on every
  point of the sweep: (rows of the points run, written paths)."""
  log = log or sys.stderr
  points = expand(cfg)
  chosen = select(points, only)
  t0 = time.perf_counter()
  rows = run_points(cfg, chosen, log=log)
  print(f"sweep: {len(chosen)} points in {time.perf_counter() - t0:.1f} s", file=log)
  by_name = {row["point"]: row for row in rows}
  # Points left out by --only still appear in the report, as their run dirs hold them.
  every = [by_name.get(p.name) or _row_of_unselected(p) for p in points]
  return rows, report(cfg, points, every)


def _row_of_unselected(point: Point) -> dict[str, Any]:
  if _finished(point):
    return collect(point, *_finished_status(point))
  return collect(point, "not run (--only)")
