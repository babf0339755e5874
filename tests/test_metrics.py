"""Metrics: deferred fetching, throughput, MFU peaks, the JSONL/TensorBoard/W&B writer, the bar."""

import json
import math
import os
import struct
import sys
import time
from types import SimpleNamespace

import jax.numpy as jnp
import pytest

from lime_jax.train import metrics


def test_deferred_fetch_returns_the_previous_step():
  fetch = metrics.DeferredFetch()
  assert fetch.push(1, {"loss": jnp.float32(3.0)}) is None  # nothing is read on first push
  step, values = fetch.push(2, {"loss": jnp.float32(2.0)})
  assert step == 1 and values == {"loss": 3.0} and isinstance(values["loss"], float)
  assert fetch.flush() == (2, {"loss": 2.0})
  assert fetch.flush() is None


def test_throughput_ignores_the_first_step_and_restarts():
  clock = metrics.Throughput()
  assert clock.rate() is None
  clock.add(100)  # the compile step only starts the clock
  assert clock.rate() is None
  time.sleep(0.01)
  clock.add(100)
  clock.add(100)
  rate = clock.take()
  assert rate is not None and 0 < rate < 200 / 0.01
  assert clock.rate() is None  # take() starts a new window
  clock.restart()
  clock.add(50)
  assert clock.rate() > 0


@pytest.mark.parametrize("kind, peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5p", 459e12), ("TPU v6 lite", 918e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("cpu", None), ("Some NPU", None)])
def test_peak_flops_table(kind, peak):
  assert metrics.device_peak_flops(kind) == peak


def test_peak_flops_sums_devices_and_prefers_the_config():
  h100 = SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")
  assert metrics.peak_flops(None, [h100, h100]) == 2 * 989e12
  assert metrics.peak_flops(None, [SimpleNamespace(device_kind="cpu")]) is None
  assert metrics.peak_flops(1e12, [SimpleNamespace(device_kind="cpu")]) == 1e12
  assert metrics.peak_flops(None) is None  # this test machine is a CPU
  assert metrics.mfu(5e11, 1e12) == 0.5
  assert metrics.mfu(5e11, None) is None and metrics.mfu(None, 1e12) is None


def test_writer_jsonl_tensorboard_and_resume_truncation(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path))
  for step in (1, 2, 3):
    writer.write({"step": step, "loss": 1.0 / step, "mfu": None, "val_loss": float("nan")})
  writer.close()
  records = metrics.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [1, 2, 3]
  assert records[0]["val_loss"] is None  # NaN is not JSON: written as null
  with open(tmp_path / metrics.METRICS_FILE) as f:
    assert all(json.loads(line) for line in f)
  events = os.listdir(tmp_path / metrics.TENSORBOARD_DIR)
  assert events and all("tfevents" in e for e in events)
  assert os.path.getsize(tmp_path / metrics.TENSORBOARD_DIR / events[0]) > 0

  resumed = metrics.MetricsWriter(str(tmp_path), resume_step=2, tensorboard=False)
  resumed.write({"step": 3, "loss": 0.25})
  resumed.close()
  assert [(r["step"], r["loss"]) for r in metrics.read_metrics(str(tmp_path))] == [
      (1, 1.0), (2, 0.5), (3, 0.25)]


def test_read_metrics_tolerates_only_a_torn_last_line(tmp_path):
  path = tmp_path / metrics.METRICS_FILE
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
  assert metrics.read_metrics(str(path)) == [{"step": 1, "loss": 2.0}]
  path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 2.0}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:1: not a JSON object"):
    metrics.read_metrics(str(path))
  assert metrics.read_metrics(str(tmp_path / "absent")) == []


def test_progress_bar_shows_step_loss_throughput_mfu_and_eta(capsys):
  bar = metrics.ProgressBar(total=10, initial=0, enabled=True, desc="run")
  bar.update(5, {"loss": 2.5, "tokens_per_s": 12_345.0, "mfu": 0.42, "val_loss": 2.25})
  bar.close()
  err = capsys.readouterr().err
  assert "5/10" in err and "loss=2.500" in err and "tok/s=12.3k" in err
  assert "mfu=42.0%" in err and "val=2.250" in err and "<" in err  # elapsed<remaining
  cpu = metrics.ProgressBar(total=10, initial=4, enabled=True)
  cpu.update(6, {"loss": 1.0, "tokens_per_s": None, "mfu": None})
  cpu.close()
  err = capsys.readouterr().err
  assert "6/10" in err and "mfu=-" in err and "tok/s=-" in err
  quiet = metrics.ProgressBar(total=10, initial=0, enabled=False)
  quiet.update(1, {"loss": 1.0})
  quiet.close()
  assert capsys.readouterr().err == ""


# --- Weights & Biases, offline ------------------------------------------------------------------


def _wandb_records(path: str):
  """The protobuf records of an offline run's .wandb file: W&B's leveldb-style log (a 7-byte
  header, then 32 KiB blocks of checksum/length/type-framed chunks)."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  block = 32768
  with open(path, "rb") as f:
    data = f.read()
  assert struct.unpack("<4sHB", data[:7])[0] == b":W&B"
  pos, parts = 7, []
  while pos + 7 <= len(data):
    left = block - pos % block
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
    if kind == 0:  # the zero padding at a block's end
      pos += left
      continue
    if pos + 7 + length > len(data):
      return  # a chunk still being written
    parts.append(data[pos + 7:pos + 7 + length])
    pos += 7 + length
    if kind in (1, 4):  # a full record, or the last chunk of one
      record = wandb_internal_pb2.Record()
      record.ParseFromString(b"".join(parts))
      parts = []
      yield record


@pytest.mark.integration
def test_wandb_offline_logs_the_same_metrics_and_the_config(tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                     "WANDB_CONFIG_DIR": str(tmp_path / "config"),
                     "WANDB_CACHE_DIR": str(tmp_path / "cache")}.items():
    monkeypatch.setenv(key, value)
  out = tmp_path / "run"
  config = {"model": {"D": 32, "router": "kv-static"}, "run": {"out_dir": str(out)}}
  records = [{"step": 1, "loss": 5.5, "lr": 0.0, "tokens_per_s": None, "mfu": None},
             {"step": 2, "loss": 5.25, "lr": 1e-3, "val_loss": 5.375, "tokens": 64,
              "grad_norm": float("nan")}]
  writer = metrics.MetricsWriter(str(out), tensorboard=False, wandb_project="lime-test",
                                 config=config)
  for record in records:
    writer.write(record)
  writer.close()
  files = [os.path.join(root, f) for root, _, names in os.walk(out / "wandb") for f in names
           if f.endswith(".wandb")]
  assert len(files) == 1 and "offline-run-" in files[0]
  run_id = (out / metrics.WANDB_ID_FILE).read_text().strip()
  # wandb's service process writes the file behind finish(): wait for the run's exit record.
  deadline = time.monotonic() + 60
  while not any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(files[0])):
    assert time.monotonic() < deadline, f"{files[0]}: no exit record after 60 s"
    time.sleep(0.1)
  history, run = [], None
  for record in _wandb_records(files[0]):
    kind = record.WhichOneof("record_type")
    if kind == "history":
      items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
               for item in record.history.item}
      history.append({k: v for k, v in items.items() if not k.startswith("_") or k == "_step"})
    elif kind == "run":
      run = record.run
  assert run.run_id == run_id and run.project == "lime-test" and run.display_name == "run"
  logged_config = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                   for item in run.config.update}
  assert {k: v for k, v in logged_config.items() if k != "_wandb"} == config
  # What TensorBoard gets: each record's numbers but its step (None dropped, NaN kept).
  assert [h.pop("_step") for h in history] == [1, 2]
  assert history[0] == {"loss": 5.5, "lr": 0.0}
  assert math.isnan(history[1].pop("grad_norm"))
  assert history[1] == {"loss": 5.25, "lr": 1e-3, "val_loss": 5.375, "tokens": 64}
  assert [r["step"] for r in metrics.read_metrics(str(out))] == [1, 2]


def test_wandb_project_without_the_package_is_a_one_line_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
  with pytest.raises(ValueError, match=r"^run.wandb_project: .* needs the wandb package"):
    metrics.import_wandb()
