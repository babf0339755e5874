"""Sweeps: grid expansion in both modes, resume and skip, the fit check, reports, bad configs."""

import csv
import dataclasses
import math
import os
import types

import pytest

from lime_jax.train import checkpoint as ckpt
from lime_jax.train import environment
from lime_jax.model import flops as flops_lib
from lime_jax.studies import sweep
from lime_jax.cli.main import main
from lime_jax.train.metrics import read_metrics
from lime_jax.train.loop import train

BASE = """\
model: {D: 32, L: 2, H: 2, F: 64, T: 32, router: none}
data: {seq_len: 32, batch_size: 4, val_batches: 2}
optim: {warmup_steps: 2, total_steps: 4}
run: {steps: 4, log_every: 1, eval_every: 2, checkpoint_every: 2, progress: false,
      tensorboard: false, async_checkpointing: false}
"""


def _write(tmp_path, grid, **top):
  (tmp_path / "base.yaml").write_text(BASE)
  lines = ["base: base.yaml", f"out_dir: {tmp_path / 'out'}", f"grid: {grid}"]
  lines += [f"{key}: {value}" for key, value in top.items()]
  path = tmp_path / "sweep.yaml"
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def _rows(path):
  with open(path, encoding="utf-8") as f:
    return {row["point"]: row for row in csv.DictReader(f)}


def test_grid_takes_connections_as_methods(tmp_path):
  """A baseline's connections name in `routers` selects it with router none; a router's name
  clears any connections of the base."""
  cfg = sweep.load_sweep(_write(tmp_path, "{routers: [none, kv-static, attn-res], depths: [2]}"))
  methods = {p.name: (p.cfg.model.router, p.cfg.model.connections) for p in sweep.expand(cfg)}
  assert methods == {"none_L2_D32_s0": ("none", "none"), "kv-static_L2_D32_s0": ("kv-static", "none"),
                     "attn-res_L2_D32_s0": ("none", "attn-res")}


def test_named_methods_add_overrides_to_a_known_method(tmp_path):
  cfg = sweep.load_sweep(_write(
      tmp_path, "{routers: [none, lime-base-init], depths: [2]}",
      methods="{lime-base-init: [kv-static, model.kv_init=baseline, model.router_init_scale=0.5]}"))
  models = {p.name: p.cfg.model for p in sweep.expand(cfg)}
  assert set(models) == {"none_L2_D32_s0", "lime-base-init_L2_D32_s0"}
  lime = models["lime-base-init_L2_D32_s0"]
  assert (lime.router, lime.kv_init, lime.router_init_scale) == ("kv-static", "baseline", 0.5)
  assert models["none_L2_D32_s0"].kv_init == "reference"


def test_fixed_width_grid(tmp_path):
  cfg = sweep.load_sweep(_write(
      tmp_path, "{routers: [none, kv-static], depths: [2, 4], widths: [32, 64], head_size: 16,"
                " seeds: [0, 1]}"))
  points = sweep.expand(cfg)
  assert len(points) == 2 * 2 * 2 * 2
  assert [p.name for p in points[:3]] == ["none_L2_D32_s0", "none_L2_D32_s1",
                                          "kv-static_L2_D32_s0"]  # seeds innermost
  for p in points:
    m = p.cfg.model
    assert (m.router, m.L, m.D, p.cfg.run.seed) == (p.router, p.L, p.D, p.seed)
    assert (m.Hd, m.H, m.F) == (16, p.D // 16, 4 * p.D)
    assert p.cfg.run.out_dir == os.path.join(cfg.out_dir, p.name)
  assert [p.name for p in sweep.select(points, ["*L4_D64*"])] == [
      "none_L4_D64_s0", "none_L4_D64_s1", "kv-static_L4_D64_s0", "kv-static_L4_D64_s1"]
  script = sweep.write_commands(cfg, points, str(tmp_path / "cmds.sh"))
  lines = [l for l in open(script, encoding="utf-8") if l.startswith("lime-jax train")]
  assert len(lines) == 16 and "model.L=4" in lines[-1] and "run.seed=1" in lines[-1]


def test_param_budget_grid_holds_the_budget(tmp_path):
  budget = 3_000_000
  cfg = sweep.load_sweep(_write(
      tmp_path, f"{{routers: [none, kv-static], depths: [2, 4, 8, 16], param_budget: {budget},"
                " head_size: 16, seeds: [0]}"))
  points = sweep.expand(cfg)
  widths = {p.L: p.D for p in points}
  assert widths[2] > widths[4] > widths[8] > widths[16]  # deeper is narrower
  for p in points:
    m = p.cfg.model
    assert m.D % 16 == 0 and m.F == 4 * m.D and m.Hd == 16
    baseline = flops_lib.non_embedding_params(m.replace(router="none"))
    # The nearest width: one head more or fewer is not closer to the budget.
    for other in (m.D - 16, m.D + 16):
      if other > 0:
        neighbour = m.replace(D=other, H=other // 16, R=other // 16, F=4 * other, router="none")
        assert abs(baseline - budget) <= abs(flops_lib.non_embedding_params(neighbour) - budget)
    assert abs(baseline - budget) / budget < 0.15
    if p.router == "kv-static":  # LIMe's routers come on top, R^2 (L(L+1)/2 - 1)
      assert flops_lib.non_embedding_params(m) - baseline == m.R**2 * (m.L * (m.L + 1) // 2 - 1)


def test_bad_sweep_configs_are_one_line_errors(tmp_path, capsys):
  def error(grid, **top):
    with pytest.raises(SystemExit) as exc:
      main(["sweep", "--config", _write(tmp_path, grid, **top)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("lime-jax sweep: "), err
    return err

  assert "grid.routers: unknown method 'dense'" in error("{routers: [dense]}")
  assert "methods.a: expected [a method from" in error("{routers: [a]}", methods="{a: [dense]}")
  assert "methods.mhc: the name of a built-in method" in error("{}", methods="{mhc: [none]}")
  assert "sweep point a_L2_D32_s0: " in error("{routers: [a]}",
                                              methods="{a: [kv-static, model.kv_init=x]}")
  assert "not both" in error("{widths: [32], param_budget: 1000}")
  assert "grid: unknown key(s) ['depth']" in error("{depth: [2]}")
  assert "sweep: unknown key(s) ['hbm']" in error("{depths: [2]}", hbm="80")
  assert "grid.seeds[1]: must be a non-negative integer" in error("{seeds: [0, -1]}")
  assert "not a multiple of head size 16" in error("{widths: [40], head_size: 16}")
  assert "model: unknown key(s) ['X']" in error("{}", overrides="[model.X=1]")
  err = error("{}", variants="{ok: [], bad: [model.H=3]}")
  assert err.startswith("lime-jax sweep: sweep point bad_none_L2_D32_s0: config file") and "H=3" in err
  assert not (tmp_path / "out").exists()  # nothing written


def test_skipped_by_the_fit_check_with_its_reason(tmp_path, monkeypatch):
  calls = []

  def check_fit(exp_cfg, num_devices, hbm_gib):
    calls.append((exp_cfg.model.L, num_devices, hbm_gib))
    fits = exp_cfg.model.L < 4
    return fits, "" if fits else f"needs {exp_cfg.model.L * 100} GiB per device, has {hbm_gib}"

  fake = types.ModuleType("lime_jax.train.plan")
  fake.check_fit = check_fit  # the interface lime_jax/plan.py provides
  fake.ensure_cpu_devices = lambda n: calls.append(("devices", n))
  monkeypatch.setattr(sweep, "plan", fake)
  cfg = sweep.load_sweep(_write(tmp_path, "{routers: [none], depths: [2, 4], seeds: [3]}",
                                hbm_gib=16, devices=8))
  rows, paths = sweep.run_sweep(cfg)
  assert calls == [("devices", 8), (2, 8, 16.0), (4, 8, 16.0)]  # devices made before training
  assert [r["status"] for r in rows] == ["trained", "skipped: needs 400 GiB per device, has 16.0"]
  assert not os.path.exists(os.path.join(cfg.out_dir, "none_L4_D32_s3"))  # never trained
  csv_rows = _rows(paths[0])
  assert csv_rows["none_L4_D32_s3"]["status"] == "skipped: needs 400 GiB per device, has 16.0"
  assert csv_rows["none_L4_D32_s3"]["final_val_loss"] == ""
  assert float(csv_rows["none_L2_D32_s3"]["final_val_loss"]) > 0
  assert "| none_L4_D32_s3 | skipped: needs 400 GiB" in open(paths[1], encoding="utf-8").read()


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  """A 2-point sweep (both routers); the kv-static point was interrupted at step 2."""
  tmp_path = tmp_path_factory.mktemp("sweep")
  cfg = sweep.load_sweep(_write(tmp_path, "{routers: [none, kv-static], seeds: [3]}",
                                compiled_memory="true"))
  points = sweep.expand(cfg)
  interrupted = points[1].cfg
  train(interrupted.replace(run=dataclasses.replace(interrupted.run, steps=2)))
  rows, paths = sweep.run_sweep(cfg)
  return {"cfg": cfg, "points": points, "rows": rows, "paths": paths}


def test_sweep_trains_resumes_and_reports_measured_numbers(swept):
  cfg, points, rows = swept["cfg"], swept["points"], swept["rows"]
  assert [r["status"] for r in rows] == ["trained", "resumed from step 2"]
  csv_rows = _rows(swept["paths"][0])
  for point in points:
    row, run_cfg = csv_rows[point.name], point.cfg
    evals = [r for r in read_metrics(run_cfg.run.out_dir) if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert float(row["final_val_loss"]) == pytest.approx(evals[-1]["val_loss"], rel=1e-12)
    assert float(row["best_val_loss"]) == pytest.approx(min(r["val_loss"] for r in evals))
    assert int(row["params"]) == flops_lib.total_params(run_cfg.model)
    assert int(row["non_embedding_params"]) == flops_lib.non_embedding_params(run_cfg.model)
    tokens = 4 * 4 * 32
    assert int(row["tokens"]) == tokens
    assert int(row["train_flops"]) == tokens * flops_lib.train_flops_per_token(run_cfg.model, 32)
    assert int(row["train_flops"]) == evals[-1]["flops"]  # the number training logged
    assert float(row["tokens_per_s"]) > 0 and float(row["wall_s"]) > 0
    assert float(row["compiled_temp_mib"]) > 0
  table = open(swept["paths"][1], encoding="utf-8").read()
  lime = csv_rows["kv-static_L2_D32_s3"]
  diff = float(lime["final_val_loss"]) - float(csv_rows["none_L2_D32_s3"]["final_val_loss"])
  assert f"| {float(lime['final_val_loss']):.4f} |" in table  # one seed: no interval
  assert f"| {diff:.4f} |" in table and "one seed: no interval" in table
  for png in swept["paths"][2:]:
    with open(png, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert sorted(os.path.basename(p) for p in swept["paths"][2:]) == [
      "final_vs_depth.png", "val_loss_vs_flops.png"]
  here = environment.numeric_signature(environment.describe())
  assert {row["environment"] for row in csv_rows.values()} == {here}
  assert f"## Environments\n\n- 2 points: {here}\n" in table
  assert "different environments" not in table


def test_points_from_different_environments_are_flagged():
  def row(point, env):
    return {"point": point, "variant": "", "router": "none", "L": 2, "D": 32, "seed": 0,
            "params": 10, "final_val_loss": 1.0, "best_val_loss": 1.0,
            "final_val_accuracy": None, "chance": None, "tokens_per_s": 1.0,
            "train_flops": 1.0, "environment": env, "status": "trained"}

  one, two = "jax 1, jaxlib 1, cpu (X)", "jax 2, jaxlib 2, cpu (X)"
  same = sweep.markdown([row("a", one), row("b", one)])
  assert f"- 2 points: {one}" in same and "different environments" not in same
  mixed = sweep.markdown([row("a", one), row("b", two), row("c", None)])
  assert "**The points ran on different environments**" in mixed
  for line in ("- 1 point: jax 1, jaxlib 1, cpu (X)", "- 1 point: jax 2, jaxlib 2, cpu (X)",
               "- 1 point: not recorded"):
    assert line in mixed


def test_finished_points_are_skipped(swept, capsys):
  cfg, points = swept["cfg"], swept["points"]
  before = {p.name: (ckpt.all_steps(ckpt.checkpoint_dir(p.cfg.run.out_dir)),
                     read_metrics(p.cfg.run.out_dir)) for p in points}
  config = os.path.join(os.path.dirname(cfg.base), "sweep.yaml")
  assert main(["sweep", "--config", config, "--only", "kv-static_*"]) == 0
  assert "[1/1] kv-static_L2_D32_s3: finished earlier" in capsys.readouterr().err
  after = {p.name: (ckpt.all_steps(ckpt.checkpoint_dir(p.cfg.run.out_dir)),
                    read_metrics(p.cfg.run.out_dir)) for p in points}
  assert after == before
  rows = _rows(os.path.join(cfg.out_dir, sweep.RESULTS_CSV))  # every point, not only those run
  assert list(rows) == ["none_L2_D32_s3", "kv-static_L2_D32_s3"]
  for old in swept["rows"]:
    assert rows[old["point"]]["final_val_loss"] == str(old["final_val_loss"])
    assert rows[old["point"]]["status"] == "finished earlier"


def test_a_finished_point_of_another_config_is_failed_not_reported(tmp_path):
  """The sweep's overrides changed after its points trained: their runs must not stand for the
  new config's points, whether this invocation selects them (s4) or --only leaves them out (s3)."""
  path = _write(tmp_path, "{routers: [none], depths: [2], seeds: [3, 4]}")
  assert main(["sweep", "--config", path]) == 0
  with open(path, "a", encoding="utf-8") as f:
    f.write("overrides: [optim.lr=0.01]\n")
  rows, paths = sweep.run_sweep(sweep.load_sweep(path), ["none_L2_D32_s4"])
  assert len(rows) == 1
  csv_rows = _rows(paths[0])
  table = open(paths[1], encoding="utf-8").read()
  for name in ("none_L2_D32_s3", "none_L2_D32_s4"):
    row = csv_rows[name]
    assert row["status"].startswith("failed: run.out_dir: "), row["status"]
    assert "of a different config: optim.lr: 0.001 -> 0.01" in row["status"]
    assert row["final_val_loss"] == row["best_val_loss"] == row["wall_s"] == ""
    assert row["environment"] == ""
    assert f"| {name} | {row['status']} |" in table
  assert rows[0]["status"] == csv_rows["none_L2_D32_s4"]["status"]
  assert "## Environments" not in table  # no point is reported


def test_mean_ci_and_paired_table():
  mean, half = sweep.mean_ci([1.0, 2.0, 3.0])
  assert mean == 2.0 and half == pytest.approx(4.303 / math.sqrt(3))
  assert sweep.mean_ci([5.0]) == (5.0, None)
  assert sweep.t975(40) == pytest.approx(2.021, abs=1e-3)

  def row(router, seed, loss, acc):
    return {"point": f"{router}{seed}", "variant": "mqar", "router": router, "L": 4, "D": 64,
            "seed": seed, "params": 1000, "final_val_loss": loss, "best_val_loss": loss,
            "final_val_accuracy": acc, "chance": 0.01, "tokens_per_s": 10.0,
            "train_flops": 1e9, "status": "trained"}

  rows = [row("none", s, l, a) for s, l, a in [(0, 2.0, 0.1), (1, 2.2, 0.2), (2, 2.4, 0.3)]]
  rows += [row("kv-static", s, l, a) for s, l, a in [(0, 1.8, 0.3), (1, 2.0, 0.3), (2, 2.19, 0.6)]]
  table = sweep.markdown(rows)
  assert "| mqar | none | 4 | 64 | 1,000 | 3 | 2.2000 ± 0.4969 |" in table  # sd 0.2
  # Paired differences -0.2, -0.2, -0.21: a tight interval below zero.
  sd = math.sqrt(((1 / 300) ** 2 * 2 + (2 / 300) ** 2) / 2)
  assert f"| -0.2033 ± {4.303 * sd / math.sqrt(3):.4f} |" in table
  assert "| 0.200 ± 0.248 | 3/3 | method lower |" in table
  rows[3]["final_val_loss"] = 2.5  # now LIMe is worse on one seed: the interval covers 0
  assert "| 2/3 | no clear difference (interval covers 0) |" in sweep.markdown(rows)
  assert "baseline at 2L" not in table  # no depth 8 in the grid


def test_method_at_L_against_baseline_at_2L():
  def row(router, L, seed, loss, flops):
    return {"point": f"{router}{L}{seed}", "variant": "text", "router": router, "L": L, "D": 64,
            "seed": seed, "params": 1000, "final_val_loss": loss, "best_val_loss": loss,
            "final_val_accuracy": None, "chance": None, "tokens_per_s": 10.0,
            "train_flops": flops, "status": "trained"}

  rows = [row("none", 8, s, l, 2e9) for s, l in [(0, 3.0), (1, 3.1), (2, 3.2)]]
  rows += [row("none", 4, s, 3.5, 1e9) for s in range(3)]
  rows += [row("kv-static", 4, s, l, 1.1e9) for s, l in [(0, 2.9), (1, 3.0), (2, 3.1)]]
  table = sweep.markdown(rows)
  assert "## Method at L - baseline at 2L" in table
  # kv-static at 4 minus none at 8, paired: -0.1 on every seed (sd 0).
  assert "| text | kv-static | 4, 64 | 8, 64 | 3 | -0.1000 ± 0.0000 | 0.55 | 3/3 | method lower |" in table
  # The baseline's own row comes first: none at 4 - none at 8 = 0.5, 0.4, 0.3.
  none_row = "| text | none | 4, 64 | 8, 64 | 3 | 0.4000 ± 0.2484 | 0.50 | 0/3 | baseline lower |"
  assert none_row in table and table.index(none_row) < table.index("| text | kv-static | 4, 64")


def test_the_real_fit_check_skips_a_point_that_cannot_fit(tmp_path):
  cfg = sweep.load_sweep(_write(tmp_path, "{routers: [none], depths: [2], seeds: [3]}",
                                hbm_gib=1e-6, devices=1))
  rows, _ = sweep.run_sweep(cfg)
  assert rows[0]["status"].startswith("skipped: does not fit"), rows[0]["status"]
  assert "GiB per device" in rows[0]["status"]
  assert not os.path.exists(os.path.join(cfg.out_dir, "none_L2_D32_s3"))


def test_by_depth_tables():
  """The compact method x depth tables (RESULTS.md's): means, and paired differences in bold
  where the interval excludes 0, with the seeds the method wins on; budget grids name widths."""
  def row(router, L, D, seed, loss, acc=None):
    return {"point": f"{router}{L}{seed}", "variant": "mqar", "router": router, "L": L, "D": D,
            "seed": seed, "params": 1000, "final_val_loss": loss, "best_val_loss": loss,
            "final_val_accuracy": acc, "chance": 0.01, "tokens_per_s": 10.0,
            "train_flops": 1e9, "status": "trained"}

  rows = [row("none", L, 64, s, 2.0 + 0.1 * s, 0.1) for L in (4, 8) for s in range(3)]
  rows += [row("kv-static", 4, 64, s, 1.8 + 0.1 * s, 0.2) for s in range(3)]  # -0.2 each seed
  rows += [row("kv-static", 8, 64, s, l, 0.1) for s, l in [(0, 1.9), (1, 2.3), (2, 2.2)]]
  table = sweep.markdown(rows)
  assert "| method | L 4 | L 8 |" in table
  assert "| none | 2.100 ± 0.248 | 2.100 ± 0.248 |" in table
  # At 8 layers the differences are -0.1, 0.2, 0.0: mean 0.033, sd 0.153, one seed lower.
  assert "| kv-static | **-0.200 ± 0.000** (3/3) | 0.033 ± 0.379 (1/3) |" in table
  assert "| kv-static | **0.100 ± 0.000** (3/3) | 0.000 ± 0.000 (0/3) |" in table  # accuracy
  budget = [dict(r, D=96 if r["L"] == 4 else 64) for r in rows]
  assert "| method | L 4 (D 96) | L 8 (D 64) |" in sweep.markdown(budget)
  widths = rows + [row("none", 4, 32, s, 2.0) for s in range(3)]  # two widths at one depth
  assert "## By depth" not in sweep.markdown(widths)


def test_final_vs_depth_draws_one_line_per_router_across_a_budgets_widths():
  """A fixed budget sets one width per depth: each router is one line over the depths (not one
  single-point line per width); a width sweep keeps one line per router and width."""
  def row(router, L, D, seed, loss):
    return {"variant": "", "router": router, "L": L, "D": D, "seed": seed,
            "final_val_loss": loss, "status": "trained"}
  budget = [row(r, L, D, s, 5.0 + L / 10 + (r == "kv-static") + s / 100)
            for r in ("none", "kv-static") for L, D in ((4, 96), (8, 64), (16, 48))
            for s in (0, 1)]
  lines = sweep._depth_series(sweep._groups(budget), "", ["none", "kv-static"], "final_val_loss")
  assert [name for name, _ in lines] == ["none", "kv-static"]
  none_pts = dict(lines)["none"]
  assert [p[0] for p in none_pts] == [4, 8, 16]
  assert none_pts[0][1] == pytest.approx(5.405)
  widths = [row("none", L, D, 0, 5.0 + L + D / 1000) for L in (4, 8) for D in (32, 64)]
  lines = sweep._depth_series(sweep._groups(widths), "", ["none"], "final_val_loss")
  assert [(name, [p[0] for p in pts]) for name, pts in lines] == [
      ("none D 32", [4, 8]), ("none D 64", [4, 8])]
