"""TPU topologies compiled by the TPU compiler on a CPU-only machine (parallel/topology.py,
train/plan.py topology_plan, `lime-jax plan/bench --topology`). Needs libtpu (the `tpu` extra,
which `make test` installs); without it only the error paths run."""

import importlib.util
import json
import subprocess
import sys

import pytest

from lime_jax.parallel import topology
from conftest import REPO, child_env

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed (pip install '.[tpu]')")
TINY = ["model.D=64", "model.L=2", "model.H=4", "model.F=128", "model.T=32", "model.V=256",
        "data.seq_len=32", "data.batch_size=8", "mesh.data=1", "mesh.fsdp=-1"]


@pytest.mark.parametrize("name", ["v5p", "v5p:2x2x1x1", "tpu:2x2", "v5p-8", "h100:2x2"])
def test_bad_topology_names_are_one_line_errors(name):
  with pytest.raises(ValueError, match=r"--topology: expected <chip>:<AxB\[xC\]>"):
    topology.check_name(name)


def test_chip_count_and_figures():
  assert topology.check_name("v5p:2x2x1") == ("v5p", 4)
  assert topology.check_name("v5e:4x4") == ("v5e", 16)
  tpu = topology.Slice("v4:2x2x1", tuple(range(8)), topology.CHIPS["v4"], 4)  # 2 cores a chip
  assert tpu.devices_per_chip == 2
  assert tpu.device_peak_flops == topology.CHIPS["v4"].peak_flops / 2
  flops, bytes_ = 1e12, 1e9
  assert tpu.roofline_s(flops, bytes_) == max(flops / tpu.device_peak_flops,
                                               bytes_ / tpu.device_hbm_bytes_per_s)


def test_without_libtpu_the_flag_says_how_to_get_it(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else real(name, *a))
  with pytest.raises(ValueError, match=r"needs libtpu.*pip install 'lime_jax\[tpu\]'"):
    topology.tpu_slice("v5p:2x2x1")


@needs_libtpu
def test_plan_compiles_a_tiny_model_for_a_tpu_slice(tmp_path):
  """`lime-jax plan --topology`: the TPU compiler's memory and cost, every layer counted."""
  out = tmp_path / "plan.json"
  dump = tmp_path / "dump"
  proc = subprocess.run([sys.executable, "-m", "lime_jax", "plan", "--topology", "v5p:2x2x1",
                         "--json", str(out), "--xla-dump", str(dump), *TINY,
                         "model.router=kv-static"],
                        capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=600)
  assert proc.returncode == 0, proc.stderr
  plan = json.loads(out.read_text())
  for key in ("router", "topology", "devices", "per_device_bytes", "xla_flops", "xla_bytes",
              "compiler_step_s", "roofline_step_s", "fits"):
    assert key in plan, key
  assert (plan["router"], plan["topology"], plan["devices"], plan["fits"]) == (
      "kv-static", "v5p:2x2x1", 4, True)
  chip = topology.CHIPS["v5p"]
  assert plan["roofline_step_s"] == pytest.approx(max(plan["xla_flops"] / chip.peak_flops,
                                                      plan["xla_bytes"] / chip.hbm_bytes_per_s))
  # Every layer counted: the unrolled step's FLOPs per device are those of flops.py per device
  # (the model FLOPs; XLA adds the optimizer, norms and softmax on top).
  model_flops_per_device = plan["flops_per_step"] / plan["devices"]
  assert model_flops_per_device < plan["xla_flops"] < 1.5 * model_flops_per_device
  assert 0 < plan["per_device_bytes"] < 2**30 and plan["compiler_step_s"] > 0
  assert "TPU compiler" in proc.stdout and "roofline" in proc.stdout
  # --xla-dump: the TPU compiler's own account of what holds the memory, for both programs.
  for program in ("scanned", "unrolled"):
    assert list((dump / program).glob("*train_step*memory-usage-report.txt")), program


@needs_libtpu
def test_scaled_cost_counts_every_layer_of_the_scanned_program(tmp_path):
  """`--cost scaled`: the scanned program at 1 and 2 layers per loop body, scaled to L layers,
  does the unrolled program's FLOPs (the same layers; bytes differ with the program's shape)."""
  plans = {}
  for method in ("unrolled", "scaled"):
    out = tmp_path / f"{method}.json"
    proc = subprocess.run([sys.executable, "-m", "lime_jax", "plan", "--topology", "v5p:2x2x1",
                           "--cost", method, "--json", str(out), *TINY, "model.L=4",
                           "model.router=none"],
                          capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    plans[method] = json.loads(out.read_text())
  assert plans["scaled"]["cost_method"] == "scaled"
  assert plans["scaled"]["xla_flops"] == pytest.approx(plans["unrolled"]["xla_flops"], rel=0.03)
  assert plans["scaled"]["xla_bytes"] > 0 and plans["scaled"]["compiler_step_s"] > 0


@pytest.mark.parametrize("args, message", [
    (["--topology", "v5p:2x2x1", "model.router=kv-static", "model.scan_segments=2"],
     "needs one scanned layer loop"),
    (["model.L=3"], "needs --topology")])
def test_scaled_cost_refuses_what_it_cannot_scale(args, message):
  if "--topology" in args and not HAS_LIBTPU:
    pytest.skip("libtpu not installed")
  proc = subprocess.run([sys.executable, "-m", "lime_jax", "plan", "--cost", "scaled", *args,
                         *TINY], capture_output=True, text=True, cwd=REPO, env=child_env(),
                        timeout=300)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], proc.stderr


@needs_libtpu
def test_unknown_topology_is_a_one_line_error():
  proc = subprocess.run([sys.executable, "-m", "lime_jax", "plan", "--topology", "v6e:1x1", *TINY],
                        capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=300)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("lime-jax plan: --topology v6e:1x1: libtpu refused it")
