"""With libtpu installed (for --topology compiles), a CPU-only machine's commands must behave as
without it (parallel/backends.py)."""

import importlib.util
import os
import subprocess
import sys

import pytest

from lime_jax.parallel import backends
from conftest import REPO, child_env

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


@pytest.fixture
def recorded(monkeypatch):
  calls = []
  monkeypatch.setattr(backends.jax.config, "update", lambda *args: calls.append(args))
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  return calls


def _machine(monkeypatch, installed, tpu):
  monkeypatch.setattr(backends, "_installed", lambda module: module in installed)
  monkeypatch.setattr(backends, "tpu_attached", lambda: tpu)


def test_libtpu_without_a_tpu_keeps_jax_on_the_cpu(monkeypatch, recorded):
  _machine(monkeypatch, {"libtpu"}, tpu=False)
  assert backends.avoid_absent_tpu() == "cpu"
  assert recorded == [("jax_platforms", "cpu")] and os.environ["JAX_PLATFORMS"] == "cpu"


@pytest.mark.parametrize("installed, tpu", [
    (set(), False),  # no libtpu: JAX never probes a TPU
    ({"libtpu"}, True),  # a TPU VM: use it
    ({"libtpu", "jax_cuda12_plugin"}, False),  # a GPU machine: JAX must still find the GPU
])
def test_left_alone_otherwise(monkeypatch, recorded, installed, tpu):
  _machine(monkeypatch, installed, tpu)
  assert backends.avoid_absent_tpu() is None
  assert recorded == [] and "JAX_PLATFORMS" not in os.environ


def test_an_explicit_choice_wins(monkeypatch, recorded):
  _machine(monkeypatch, {"libtpu"}, tpu=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu,tpu")
  assert backends.avoid_absent_tpu() is None and recorded == []


@pytest.mark.skipif(not HAS_LIBTPU or backends.tpu_attached(), reason="needs libtpu and no TPU")
def test_a_command_on_a_cpu_machine_with_libtpu_is_quiet(tmp_path):
  """Unguarded, JAX's first device query here starts libtpu, which prints TPU errors; a
  `lime-jax` command prints none and runs on the CPU."""
  env = {k: v for k, v in child_env().items() if k != "JAX_PLATFORMS"}
  probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices()[0].platform)"],
                         capture_output=True, text=True, env=env, timeout=300)
  assert "TPU" in probe.stderr  # what the guard is for (so this test can fail)
  proc = subprocess.run(
      [sys.executable, "-m", "lime_jax", "plan", "--devices", "1", "--json", str(tmp_path / "p.json"),
       "model.D=32", "model.L=1", "model.H=2", "model.F=64", "model.T=16", "model.V=64",
       "data.seq_len=16", "data.batch_size=2"],
      capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "TPU" not in proc.stderr and "E0000" not in proc.stderr, proc.stderr
