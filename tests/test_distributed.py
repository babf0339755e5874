"""Multi-host start-up: which settings reach jax.distributed, and a real two-process run on
localhost (CPU collectives over gloo) that matches one process with the same global batch."""

import argparse
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, child_env

from lime_jax.parallel import distributed
from lime_jax.train import loop as train_lib
from lime_jax.train.experiment import load_experiment
from lime_jax.train.metrics import read_metrics


def _args(**kw):
  values = {"coordinator": None, "num_processes": None, "process_id": None, "distributed": False}
  return argparse.Namespace(**{**values, **kw})


def test_settings_from_flags_environment_and_slurm():
  assert distributed.settings(_args(), {}) is None  # one process: jax.distributed stays off
  assert distributed.settings(_args(coordinator="10.0.0.1:1234", num_processes=4, process_id=3),
                              {}) == {"coordinator_address": "10.0.0.1:1234",
                                      "num_processes": 4, "process_id": 3}
  env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  assert distributed.settings(_args(), env) == {"coordinator_address": "h:1",
                                                "num_processes": 2, "process_id": 1}
  assert distributed.settings(_args(distributed=True), {}) == {}  # JAX detects TPU pods etc.
  assert distributed.settings(_args(), {"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}) == {}
  assert distributed.settings(_args(), {"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
  with pytest.raises(ValueError, match=r"--coordinator needs --num-processes and --process-id"):
    distributed.settings(_args(coordinator="h:1"), {})
  with pytest.raises(ValueError, match=r"--process-id must be in \[0, 2\), got 2"):
    distributed.settings(_args(coordinator="h:1", num_processes=2, process_id=2), {})
  with pytest.raises(ValueError, match=r"--coordinator must be HOST:PORT"):
    distributed.settings(_args(coordinator="h", num_processes=2, process_id=0), {})


# Model, optimizer and mesh as in test_sharding.py, so a whole-suite run compiles the
# one-process reference once.
TINY = ["model.D=32", "model.L=2", "model.H=4", "model.F=64", "model.T=16", "model.V=264",
        "data.seq_len=16", "data.batch_size=8", "optim.warmup_steps=1", "optim.total_steps=8",
        "run.steps=3", "run.log_every=1", "run.eval_every=3", "run.checkpoint_every=3",
        "run.progress=false", "run.tensorboard=false"]
MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_on_localhost_match_one_process(tmp_path):
  out_two, out_one = tmp_path / "two", tmp_path / "one"
  env = child_env()
  # Four CPU devices per process: one data=2 x fsdp=2 x tensor=2 mesh over both processes.
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                            env.get("XLA_FLAGS", "")) + " --xla_force_host_platform_device_count=4"
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "lime_jax", "train", *TINY, *MESH, f"run.out_dir={out_two}",
       "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=600))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for proc, (_, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-3000:]
  # Only process 0 logs: the summary line and metrics.jsonl.
  assert f"{out_two}: step 3" in outputs[0][0] and "step 3" not in outputs[1][0]
  assert sorted(os.listdir(out_two)) == ["checkpoints", "config.yaml", "environment.jsonl",
                                         "metrics.jsonl"]
  assert os.listdir(out_two / "checkpoints") == ["3"]

  # The same global batch in one process, on the same mesh over this process's 8 devices.
  train_lib.train(load_experiment(None, [*TINY, *MESH, f"run.out_dir={out_one}"]))
  two, one = read_metrics(str(out_two)), read_metrics(str(out_one))
  assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]
  np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
  np.testing.assert_allclose(two[-1]["val_loss"], one[-1]["val_loss"], rtol=1e-5)
  assert two[0]["tokens"] == one[0]["tokens"] == 8 * 16  # the global batch, not a half
