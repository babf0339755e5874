import json
import os

import jax
import jax.numpy as jnp
import pytest

from lime_jax.studies import bench
from lime_jax.cli.main import main
from lime_jax.config import ModelConfig
from lime_jax.train import environment
import model_checks

SMALL = ModelConfig(V=64, D=64, L=4, H=4, R=4, F=128, T=64)


def _naive_carried_buffer_temp_bytes(L: int, B=2, T=64, R=4, Hd=16) -> int:
  """The spec's memory trap: carry the whole kv buffer and read it (masked) in every layer."""
  def loss(w_LxRxLxR, kv_LxBxTxRx2xHd):
    def body(buf, inputs):
      w_RxLxR, kv_BxTxRx2xHd, l = inputs
      buf = jax.lax.dynamic_update_index_in_dim(buf, kv_BxTxRx2xHd, l, 0)
      routed = jnp.einsum("rjs,jbtscd->btrcd", w_RxLxR, buf)
      return buf, jnp.tanh(routed).sum()
    buf = jnp.zeros_like(kv_LxBxTxRx2xHd)
    _, outs = jax.lax.scan(body, buf, (w_LxRxLxR, kv_LxBxTxRx2xHd, jnp.arange(L)))
    return outs.sum()
  w = jax.ShapeDtypeStruct((L, R, L, R), jnp.float32)
  kv = jax.ShapeDtypeStruct((L, B, T, R, 2, Hd), jnp.float32)
  compiled = model_checks.compiled_as_users(jax.jit(jax.grad(loss)).lower(w, kv))
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("segments", [1, 2])
def test_lime_training_memory_grows_linearly_with_depth(segments):
  cfg = SMALL.replace(scan_segments=segments)
  temp_L = model_checks.train_step_temp_bytes(cfg.replace(L=4))
  temp_2L = model_checks.train_step_temp_bytes(cfg.replace(L=8))
  assert temp_2L <= 2.1 * temp_L, (temp_L, temp_2L)
  # LIMe stays close to the baseline at the deeper point too.
  base_2L = model_checks.train_step_temp_bytes(cfg.replace(L=8, router="none"))
  assert temp_2L <= 1.5 * base_2L, (temp_2L, base_2L)


def test_memory_check_catches_the_quadratic_trap():
  """The same criterion fails for the naive carried buffer, so the check above can fail."""
  assert _naive_carried_buffer_temp_bytes(16) > 2.1 * _naive_carried_buffer_temp_bytes(8)


def test_bench_cli_writes_records(tmp_path, capsys):
  out = tmp_path / "bench.json"
  code = main(["bench", "--depths", "2,4", "--width", "32", "--heads", "2", "--kv-heads", "2",
               "--mlp", "64", "--batch", "2", "--length", "16", "--steps", "1",
               "--json", str(out)])
  assert code == 0
  records = json.loads(out.read_text())
  assert [(r["router"], r["depth"]) for r in records] == [
      ("none", 2), ("kv-static", 2), ("none", 4), ("kv-static", 4)]
  for r in records:
    assert set(r) == set(bench.RECORD_KEYS)  # no decode keys without --decode
    assert r["width"] == 32 and r["temp_bytes"] > 0 and r["flops"] > 0
    assert r["compile_s"] > 0 and r["step_s"] > 0
    assert r["environment"]["host_cpu"] == environment.host_cpu()
    assert r["environment"]["jax"] == jax.__version__
  by_key = {(r["router"], r["depth"]): r for r in records}
  assert by_key["kv-static", 4]["flops"] > by_key["none", 4]["flops"]
  # XLA counts a loop body once; the bench unrolls the scan, so FLOPs grow with depth.
  assert by_key["none", 4]["flops"] > 1.3 * by_key["none", 2]["flops"]
  printed = capsys.readouterr().out
  assert "method/base temp mem" in printed
  host_line = printed.splitlines()[0]  # the environment first, the malloc setting with it
  assert host_line.startswith(f"host {environment.host_cpu()}, jax {jax.__version__}")
  assert f"GLIBC_TUNABLES {os.environ.get('GLIBC_TUNABLES') or '(none)'}" in host_line


def test_bench_times_a_depths_variants_in_rounds(tmp_path, capsys):
  """By default each depth's variants run one step per round, and the printed step ratio is the
  median of the per-round ratios; --sequential times each point on its own."""
  argv = ["bench", "--depths", "2", "--width", "32", "--heads", "2", "--kv-heads", "2",
          "--mlp", "64", "--batch", "2", "--length", "16", "--steps", "3"]
  out = tmp_path / "bench.json"
  assert main(argv + ["--json", str(out)]) == 0
  base, lime = json.loads(out.read_text())
  assert base["timing"] == lime["timing"] == "interleaved"
  assert len(base["step_times"]) == len(lime["step_times"]) == 3
  assert base["step_s"] == sorted(base["step_times"])[1]
  ratios = sorted(m / b for m, b in zip(lime["step_times"], base["step_times"]))
  printed = capsys.readouterr().out
  assert f"| kv-static | 2 | {lime['temp_bytes'] / base['temp_bytes']:.3f} | {ratios[1]:.3f} |" \
         f" {ratios[0]:.3f}-{ratios[2]:.3f} |" in printed

  assert main(argv + ["--sequential", "--json", str(out)]) == 0
  base, lime = json.loads(out.read_text())
  assert base["timing"] == lime["timing"] == "sequential"
  assert len(lime["step_times"]) == 3
  printed = capsys.readouterr().out
  assert f"| {lime['step_s'] / base['step_s']:.3f} |  |" in printed  # no rounds, no range


def test_a_variant_of_the_baseline_gets_its_ratios(capsys):
  """`none:key=value` is compared with the baseline like a method; flops.py predicts no
  overhead for it, so measured/formula is n/a (it used to divide by zero)."""
  assert main(["bench", "--depths", "2", "--width", "32", "--heads", "2", "--kv-heads", "2",
               "--mlp", "64", "--batch", "2", "--length", "16", "--steps", "1",
               "--routers", "none,none:remat_policy=full"]) == 0
  row = next(line for line in capsys.readouterr().out.splitlines()
             if line.startswith("| none:remat_policy=full | 2 | ") and line.count("|") == 10)
  assert row.endswith(" | 0.000 | n/a |"), row


def test_a_variant_is_compared_with_the_baseline_of_its_settings(capsys):
  """A setting that changes the baseline's step too (here the attention by query blocks) is
  compared on both sides: kv-static:X against none:X where the run has it, else against none."""
  argv = ["bench", "--depths", "2", "--width", "32", "--heads", "2", "--kv-heads", "2",
          "--mlp", "64", "--batch", "2", "--length", "16", "--steps", "1", "--routers"]
  blocks = "attention_query_blocks=4"
  assert main([*argv, f"none,none:{blocks},kv-static,kv-static:{blocks}"]) == 0
  rows = [line for line in capsys.readouterr().out.splitlines() if line.count("|") == 10]
  method_cells = [row.split(" | ")[0] for row in rows]
  assert method_cells == ["| method", "|---|---:|---:|---:|---|---:|---:|---:|---:|",
                          f"| none:{blocks}", "| kv-static",
                          f"| kv-static:{blocks} (vs none:{blocks})"]
  # The routing's FLOPs measured over its own baseline: as without the blocks (over plain
  # none it would lose the blocks' saving, and come out below zero here).
  plain, blocked = (float(row.split(" | ")[-1].rstrip(" |")) for row in rows[3:])
  assert blocked == pytest.approx(plain, rel=0.05), rows
  assert main([*argv, f"none,kv-static:{blocks}"]) == 0  # no such baseline: plain none
  assert any(line.startswith(f"| kv-static:{blocks} | 2 | ")
             for line in capsys.readouterr().out.splitlines())


def test_topology_ratios_take_the_baseline_of_the_variants_settings():
  def record(router, scale):
    return dict({k: scale for k in bench.TOPOLOGY_KEYS}, router=router, depth=16)

  table = bench.topology_table([record("none", 1.0), record("none:attention_query_blocks=4", 2.0),
                                record("kv-static:attention_query_blocks=4", 3.0),
                                record("kv-static:router_window=4", 4.0)])
  assert ("| kv-static:attention_query_blocks=4 (vs none:attention_query_blocks=4) | 16 | "
          + " | ".join(["1.500"] * 5) + " |") in table
  assert "| kv-static:router_window=4 | 16 | " + " | ".join(["4.000"] * 5) + " |" in table


def _fake_points(seconds_by_point, log):
  """Points whose i-th step takes seconds_by_point[p][i] (index 0: the warm-up)."""
  def point(p):
    calls = iter(seconds_by_point[p])
    def step():
      log.append(p)
      return next(calls)
    return bench.ReadyPoint({"router": p, "depth": 1}, step, lambda: True)
  return [point(p) for p in seconds_by_point]


def test_rounds_alternate_their_order_and_time_a_step_only_after_its_own():
  log = []
  points = _fake_points({"a": [9, 1, 9, 2, 3], "b": [9, 4, 5, 9, 6]}, log)
  assert bench.time_rounds(points, 3) == [[1, 2, 3], [4, 5, 6]]
  # Round 0: a, b; round 1: b, a; round 2: a, b. An untimed step (9) wherever the step before
  # was the other point's: first calls included.
  assert log == ["a", "a", "b", "b", "b", "a", "a", "a", "b", "b"]
  log.clear()
  (alone,) = _fake_points({"a": [9, 1, 2, 3]}, log)
  assert bench.time_rounds([alone], 3) == [[1, 2, 3]]  # one warm-up, then its own steps
  assert log == ["a"] * 4


def test_a_ratio_in_rounds_cancels_what_slows_the_whole_machine():
  """The machine slows down 1x, 3x, 1.5x over three rounds, hitting both points alike: the
  per-round ratios are the method's 1.2x in every round."""
  slow = [1.0, 3.0, 1.5]
  base = {"step_s": 1.5, "step_times": [1.0 * f for f in slow], "timing": "interleaved"}
  method = {"step_s": 1.8, "step_times": [1.2 * f for f in slow], "timing": "interleaved"}
  ratio, low, high = bench.step_ratio(method, base)
  assert (ratio, low, high) == pytest.approx((1.2, 1.2, 1.2))
  # Pairs are rounds: the same times in another order are other ratios.
  reordered = dict(method, step_times=[1.2 * f for f in slow[::-1]])
  assert bench.step_ratio(reordered, base)[1:] == pytest.approx((0.8, 1.8))
  # Points timed one after the other, the machine slow during the method's: the ratio of the
  # medians, no range.
  base = {"step_s": 1.0, "step_times": [1.0, 1.0, 1.0], "timing": "sequential"}
  method = {"step_s": 3.6, "step_times": [3.6, 1.8, 3.6], "timing": "sequential"}
  ratio, low, high = bench.step_ratio(method, base)
  assert ratio == pytest.approx(3.6) and low != low and high != high


@pytest.mark.parametrize("argv, message", [
    (["--depths", "8,x"], "--depths must be comma-separated integers"),
    (["--depths", "0"], "--depths needs positive integers"),
    (["--heads", "4", "--kv-heads", "3"], "ModelConfig.R"),
    (["--routers", "dense"], "ModelConfig.router"),
])
def test_bench_bad_flags_fail_with_one_line(argv, message, capsys):
  """Usage errors exit 2, like every other command's, with one line naming the flag."""
  with pytest.raises(SystemExit) as err:
    main(["bench"] + argv)
  assert err.value.code == 2
  stderr = capsys.readouterr().err
  assert stderr.startswith("lime-jax bench: ") and message in stderr
  assert stderr.count("\n") == 1


def test_bench_decode_reports_equal_cache_bytes(tmp_path, capsys):
  out = tmp_path / "bench.json"
  assert main(["bench", "--depths", "2", "--width", "32", "--heads", "2", "--kv-heads", "2",
               "--mlp", "64", "--batch", "2", "--length", "16", "--steps", "1", "--decode",
               "--decode-tokens", "4", "--json", str(out)]) == 0
  records = json.loads(out.read_text())
  assert [r["router"] for r in records] == ["none", "kv-static"]
  assert all(r["decode_tokens_per_s"] > 0 for r in records)
  # LIMe caches routed k/v per layer, exactly like the baseline: 2 * L * B * S * R * Hd floats
  # plus one int32 length per row.
  kv_bytes = 2 * 2 * 2 * (8 + 4 - 1) * 2 * 16 * 4
  assert records[0]["cache_bytes"] == records[1]["cache_bytes"] == kv_bytes + 2 * 4
  assert "decode tokens/s" in capsys.readouterr().out
