"""`lime-jax plan` / plan.check_fit: per-device memory of the compiled sharded step, FLOPs from
flops.py, and the fit verdict, on the 8 fake CPU devices of conftest."""

import json

import pytest

import model_checks
from lime_jax.config import CONNECTIONS, ROUTERS, ModelConfig
from lime_jax.model import flops as flops_lib
from lime_jax.train import plan
from lime_jax.cli.main import main
from lime_jax.train.experiment import load_experiment

# Wide enough that parameters and Adam state dominate the arguments.
SMALL = ["model.D=128", "model.L=2", "model.H=4", "model.F=512", "model.T=16", "model.V=264",
         "data.seq_len=16", "data.batch_size=8"]


def test_fsdp_splits_the_state_and_flops_come_from_flops_py():
  fsdp = plan.compile_step(load_experiment(None, [*SMALL, "mesh.fsdp=-1"]), 8)
  data = plan.compile_step(load_experiment(None, [*SMALL, "mesh.data=-1"]), 8)
  assert fsdp.mesh == {"data": 1, "fsdp": 8, "tensor": 1}
  assert data.mesh == {"data": 8, "fsdp": 1, "tensor": 1}
  # data=8 replicates params and optimizer state on every device; fsdp=8 keeps 1/8 of them.
  assert 6 < data.argument_bytes / fsdp.argument_bytes <= 8
  assert data.alias_bytes > 0  # the donated state is reused for the new one
  assert data.per_device_bytes == (data.argument_bytes + data.output_bytes - data.alias_bytes
                                   + data.temp_bytes)
  cfg = load_experiment(None, SMALL)
  assert fsdp.flops_per_step == flops_lib.train_flops_per_token(cfg.model, 16) * 8 * 16
  assert fsdp.step_time_s("v5e") == pytest.approx(fsdp.flops_per_step / (8 * 197e12))

  fits, line = plan.fit_line(fsdp, 16.0)
  assert fits and line.startswith("fits: ") and "on 8 devices, mesh data=1 x fsdp=8" in line
  fits, line = plan.fit_line(fsdp, fsdp.per_device_bytes / 2 / plan.GIB)
  assert not fits and line.startswith("does not fit: ")


def test_check_fit_and_its_refusals():
  cfg = load_experiment(None, [*SMALL, "mesh.fsdp=-1"])
  fits, line = plan.check_fit(cfg, 8, 16.0)
  assert fits and "GiB per device of 16 GiB" in line and "\n" not in line
  fits, line = plan.check_fit(load_experiment(None, [*SMALL, "mesh.tensor=8"]), 8, 16.0)
  assert not fits and line.startswith("cannot shard on 8 devices: sharding: ")
  fits, line = plan.check_fit(load_experiment(None, [*SMALL, "mesh.data=3"]), 8, 16.0)
  assert not fits and "needs 3 devices, but 8 are in use" in line
  with pytest.raises(plan.NotEnoughDevices, match=r"JAX started with 8 CPU device\(s\), 64 needed"):
    plan.check_fit(cfg, 64, 16.0)


def test_cli_prints_the_table_and_exits_by_the_verdict(capsys, tmp_path):
  out = tmp_path / "plan.json"
  args = ["plan", "--devices", "8", "--accelerator", "h100", "--json", str(out), *SMALL,
          "mesh.fsdp=-1"]
  assert main(args) == 0
  text = capsys.readouterr().out
  for name in plan.ACCELERATORS:
    assert f"\n  {name} " in text
  assert "h100" in text and text.rstrip().splitlines()[-1].startswith("fits: ")
  saved = json.loads(out.read_text())
  assert saved["fits"] and saved["accelerator"] == "h100" and saved["hbm_gib"] == pytest.approx(
      80e9 / 2 ** 30)
  assert main([*args, "--hbm-gib", "1e-6"]) == 1
  assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("does not fit: ")


# A small model in the form `--cost scaled` accepts: one scan segment, an even L.
SCALABLE = ModelConfig(V=64, D=32, L=6, H=4, R=4, F=64, T=8, scan_segments=1)


@pytest.mark.parametrize("changes", [
    *({"router": router} for router in ROUTERS),
    *({"router": "none", "connections": c} for c in CONNECTIONS
      if c not in ("none", "block-attn-res")),
    {"router": "none", "connections": "block-attn-res", "attn_res_blocks": 4},
    {"router": "kv-static", "router_window": 2},
    {"router": "kv-static", "routing_impl": "pull"},
    {"router": "kv-static", "routing_impl": "pull", "router_window": 2}], ids=str)
def test_programs_the_scaled_cost_counts_branch_on_no_value(changes):
  """`--cost scaled` counts one loop body per layer, and the TPU compiler counts every branch
  of a conditional in that body, though one runs: layer 0's branch in the windowed pull's
  backward, a read of all L slots, was charged to every layer (deep setup, window 8: 400.8 k
  estimated cycles a layer). No program that the count accepts may branch on a computed
  value."""
  cfg = SCALABLE.replace(**changes)
  plan._check_scalable(cfg)  # the count accepts it
  assert model_checks.value_branches(model_checks.grad_jaxpr(cfg)) == 0
