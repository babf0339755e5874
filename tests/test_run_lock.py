"""One training process per run.out_dir: two real `lime-jax train` processes on one out_dir, the
second refused naming the first; a lock left by a killed process does not block."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, child_env

from lime_jax.train import run_lock

TINY = ["model.D=32", "model.L=2", "model.H=2", "model.F=64", "model.T=16", "data.seq_len=16",
        "data.batch_size=2", "run.log_every=1000", "run.eval_every=100000",
        "run.checkpoint_every=100000", "run.progress=false", "run.tensorboard=false"]


def _train(out_dir, steps: int) -> list:
  return [sys.executable, "-m", "lime_jax", "train", *TINY, f"run.steps={steps}",
          f"run.out_dir={out_dir}"]


def _wait_for_holder(path: str, pid: int, proc: subprocess.Popen, timeout_s: float = 300) -> dict:
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    try:
      with open(path, encoding="utf-8") as f:
        holder = json.loads(f.read())
      if holder.get("pid") == pid:
        return holder
    except (FileNotFoundError, json.JSONDecodeError):
      pass
    time.sleep(0.2)
  raise AssertionError(f"{path}: no lock record of pid {pid} after {timeout_s} s")


def test_second_train_on_the_same_out_dir_is_refused_naming_the_holder(tmp_path):
  out = tmp_path / "run"
  first = subprocess.Popen(_train(out, 10**9), cwd=REPO, env=child_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    holder = _wait_for_holder(run_lock.lock_path(str(out)), first.pid, first)
    assert holder["host"] == socket.gethostname()
    second = subprocess.run(_train(out, 10**9), cwd=REPO, env=child_env(), capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 2, second.stderr[-3000:]
    err = second.stderr.strip()
    assert "\n" not in err and err.startswith("lime-jax train: run.out_dir: "), err
    assert f"pid {first.pid} on host {socket.gethostname()}" in err
    assert first.poll() is None  # the first run goes on
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    first.stdout.close()
    first.stderr.close()
  # The killed holder's record is still on disk, but the kernel dropped its lock with it.
  with open(run_lock.lock_path(str(out)), encoding="utf-8") as f:
    assert json.load(f)["pid"] == first.pid
  with run_lock.acquire(str(out)) as lock:
    with open(lock.path, encoding="utf-8") as f:
      assert json.load(f)["pid"] == os.getpid()
  assert not os.path.exists(run_lock.lock_path(str(out)))  # released: removed


def test_a_held_lock_refuses_in_process_and_names_the_holder(tmp_path):
  with run_lock.acquire(str(tmp_path)):
    with pytest.raises(run_lock.RunLockedError,
                       match=f"pid {os.getpid()} on host {socket.gethostname()}, since "):
      run_lock.acquire(str(tmp_path))  # a second open file description: flock refuses it too
  with run_lock.acquire(str(tmp_path)):  # released, so free again
    pass
