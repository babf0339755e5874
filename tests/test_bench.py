import json

import jax
import jax.numpy as jnp
import pytest

from lime_jax.studies import bench
from lime_jax.cli.main import main
from lime_jax.config import ModelConfig

SMALL = ModelConfig(V=64, D=64, L=4, H=4, R=4, F=128, T=64)


def _train_step_temp_bytes(cfg: ModelConfig, batch: int = 2) -> int:
  return bench.bench_point(cfg, batch, steps=0, measure_flops=False)["temp_bytes"]


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
  compiled = jax.jit(jax.grad(loss)).lower(w, kv).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("segments", [1, 2])
def test_lime_training_memory_grows_linearly_with_depth(segments):
  cfg = SMALL.replace(scan_segments=segments)
  temp_L = _train_step_temp_bytes(cfg.replace(L=4))
  temp_2L = _train_step_temp_bytes(cfg.replace(L=8))
  assert temp_2L <= 2.1 * temp_L, (temp_L, temp_2L)
  # LIMe stays close to the baseline at the deeper point too.
  base_2L = _train_step_temp_bytes(cfg.replace(L=8, router="none"))
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
  by_key = {(r["router"], r["depth"]): r for r in records}
  assert by_key["kv-static", 4]["flops"] > by_key["none", 4]["flops"]
  # XLA counts a loop body once; the bench unrolls the scan, so FLOPs grow with depth.
  assert by_key["none", 4]["flops"] > 1.3 * by_key["none", 2]["flops"]
  printed = capsys.readouterr().out
  assert "method/base temp mem" in printed


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
