"""Probe (not library code): what the TPU compiler counts for the validation step, under the
mesh's scope (as `train.loop.sharded_eval` runs it) and outside it (as it ran before
2026-12-05), for each config given.

    JAX_PLATFORMS=cpu python experiments/probes/eval_step_cost.py \
        configs/paper_1p2b_none.yaml configs/paper_1p2b_lime.yaml

Each config runs on `v5p:2x2x1` with fsdp over its 4 chips and one batch of `data.batch_size`
rows. Cost as `lime-jax plan --cost scaled` counts it: the scanned program compiled with one and
with two layers per loop body, a layer the difference (one scan segment, an even L). Prints per
program: XLA FLOPs, bytes accessed and the compiler's step estimate per device, and the
temporaries of the one-layer-a-body program's `memory_analysis()`.
"""

import argparse
import functools

import jax

from lime_jax.parallel import backends, topology

backends.avoid_absent_tpu()

from lime_jax.parallel import sharding as sharding_lib  # noqa: E402
from lime_jax.train import loop as train_lib  # noqa: E402
from lime_jax.train import plan as plan_lib  # noqa: E402
from lime_jax.train.experiment import load_experiment  # noqa: E402
from lime_jax.train.step import eval_step  # noqa: E402


def _compiled(cfg, layout, scan_unroll: int, scoped: bool):
  model_cfg = cfg.model.replace(scan_unroll=scan_unroll)
  init, _, _ = train_lib.jitted_fns(model_cfg, cfg.optim, cfg.run.seed, layout)
  params = train_lib.abstract_state(init)["params"]
  batch = plan_lib.abstract_batch(cfg, layout)
  if scoped:
    fn = train_lib.sharded_eval(model_cfg, layout)
  else:
    fn = jax.jit(functools.partial(eval_step, model_cfg=model_cfg),
                 out_shardings=layout.replicated)
  return fn.lower(params, batch).compile()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("configs", nargs="+")
  parser.add_argument("--topology", default="v5p:2x2x1")
  args = parser.parse_args()
  tpu = topology.tpu_slice(args.topology)
  for path in args.configs:
    cfg = load_experiment(path, ["mesh.data=1", "mesh.fsdp=-1"])
    cfg.mesh.resolve(len(tpu.devices))
    layout = sharding_lib.Layout.from_config(cfg.mesh, list(tpu.devices))
    for scoped in (True, False):
      one, two = (_compiled(cfg, layout, unroll, scoped) for unroll in (1, 2))
      flops, bytes_, step_s = plan_lib.scaled_cost(
          plan_lib.compiled_cost(one), plan_lib.compiled_cost(two), cfg.model.L)
      temp = one.memory_analysis().temp_size_in_bytes
      print(f"{path} {'in the mesh scope' if scoped else 'outside it'}: XLA FLOPs {flops:.4g},"
            f" bytes accessed {bytes_ / 1e9:.1f} GB, step estimate {step_s:.4f} s, temp"
            f" {temp / 1e9:.2f} GB per device", flush=True)


if __name__ == "__main__":
  main()
