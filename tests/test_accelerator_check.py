"""experiments/accelerator_check.sh's measurements (studies/accelerator_check.py), on a tiny
setup on the CPU; the real check needs a GPU or TPU."""

import pytest

from lime_jax.studies import accelerator_check as check

TINY = """\
model: {V: 64, D: 32, L: 3, H: 2, F: 64, T: 16, router: ROUTER}
data: {seq_len: 16, batch_size: 2}
"""


def test_a_point_reports_speed_memory_and_mfu(tmp_path, monkeypatch):
  for router, suffix in check.ROUTERS:
    (tmp_path / f"tiny_{suffix}.yaml").write_text(TINY.replace("ROUTER", router))
  monkeypatch.setattr(check, "SETUPS", (("tiny", "tiny_{router}.yaml", 2, 16),))
  record = check.measure_point(str(tmp_path), 1, steps=2)
  assert (record["setup"], record["router"], record["batch"], record["length"]) == (
      "tiny", "kv-static", 2, 16)
  assert record["step_s"] > 0 and record["tokens_per_s"] == pytest.approx(32 / record["step_s"])
  assert record["temp_bytes"] > 0
  assert record["mfu"] is None  # the CPU has no peak in the table
  assert record["environment"]["device_kind"] == record["device"]


def test_refuses_to_run_without_an_accelerator(capsys):
  assert check.main(["--out", "unused.json"]) == 2
  assert "no accelerator" in capsys.readouterr().err
