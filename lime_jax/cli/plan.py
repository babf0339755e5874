"""`lime-jax plan`: compile the sharded step for N devices; memory per device, FLOPs, fit.

Exit code 0 when the step fits the accelerator's memory, 1 when it does not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os

from lime_jax.config import require_positive_int
from lime_jax.train import plan as plan_lib
from lime_jax.train.experiment import load_experiment


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", default=None, help="YAML file (default: all defaults)")
  parser.add_argument("--devices", type=int, default=8,
                      help="devices to plan for (fake CPU devices; default 8)")
  parser.add_argument("--hbm-gib", type=float, default=None,
                      help="memory per device in GiB (default: the accelerator's)")
  parser.add_argument("--accelerator", default="v5e", choices=sorted(plan_lib.ACCELERATORS),
                      help="the accelerator whose HBM and step time the verdict uses")
  parser.add_argument("--json", default=None, help="also write the plan as JSON here")
  parser.add_argument("overrides", nargs="*", help="e.g. mesh.fsdp=-1 data.batch_size=256")


def run(args: argparse.Namespace) -> int:
  require_positive_int("--devices", args.devices)
  if args.hbm_gib is not None and not args.hbm_gib > 0:
    raise ValueError(f"--hbm-gib: must be > 0, got {args.hbm_gib}")
  if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    # Nothing runs, so skip LLVM's optimizations: compiles several-fold faster, and buffer
    # assignment (memory_analysis) happens before them.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()
  plan_lib.ensure_cpu_devices(args.devices)  # before anything else starts JAX
  cfg = load_experiment(args.config, args.overrides)
  hbm = args.hbm_gib if args.hbm_gib is not None else plan_lib.hbm_gib(args.accelerator)
  plan = plan_lib.compile_step(cfg, args.devices)
  fits, line = plan_lib.fit_line(plan, hbm)
  print(f"mesh {plan_lib.mesh_text(plan)} on {plan.num_devices} devices; compiled in"
        f" {plan.compile_s:.1f} s")
  print(f"memory per device: {plan.per_device_bytes / plan_lib.GIB:.3f} GiB ="
        f" {plan_lib.breakdown(plan)}")
  print(f"FLOPs per optimizer step (flops.py): {plan.flops_per_step:.4g}"
        f" ({cfg.tokens_per_step} tokens x {plan.flops_per_step // cfg.tokens_per_step} per token;"
        f" {cfg.optim.grad_accum_steps} micro-batch(es) of the compiled step)")
  print("FLOPs-bound optimizer step time (100% MFU, a lower bound):")
  print(f"  {'accelerator':<12} {'peak TFLOP/s':>12} {'HBM GB':>7} {'step s':>10}")
  for name, (_, hbm_gb) in plan_lib.ACCELERATORS.items():
    mark = " <-" if name == args.accelerator else ""
    print(f"  {name:<12} {plan_lib.peak_flops(name) / 1e12:>12.0f} {hbm_gb:>7} "
          f"{plan.step_time_s(name):>10.4g}{mark}")
  print(line)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({**plan.to_dict(), "hbm_gib": hbm, "fits": fits,
                 "accelerator": args.accelerator}, f, indent=2)
  return 0 if fits else 1
