"""`lime-jax plan`: compile the sharded step for N devices; memory per device, FLOPs, fit.

`--topology v5p:2x2x1` compiles with the TPU compiler for that slice instead of fake CPU devices
(libtpu needed, no TPU): per-device HBM, XLA FLOPs and bytes with every layer counted, the
compiler's step estimate and the roofline. Exit code 0 when the step fits the accelerator's
memory, 1 when it does not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os

from lime_jax.config import require_positive_int
from lime_jax.parallel import topology
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
  parser.add_argument("--topology", default=None,
                      help="a TPU slice, e.g. v5p:2x2x1, v4:2x2x1, v5e:2x2, v6e:2x2: compile with"
                           " the TPU compiler (needs libtpu: pip install 'lime_jax[tpu]')")
  parser.add_argument("--cost", default="unrolled", choices=plan_lib.COST_METHODS,
                      help="with --topology: count every layer's cost on the unrolled program"
                           " (default) or on the scanned one, scaled from unroll 1 and 2")
  parser.add_argument("--json", default=None, help="also write the plan as JSON here")
  parser.add_argument("--xla-dump", default=None, metavar="DIR",
                      help="have the compiler write its HLO, buffer assignment and"
                           " memory-usage report (what holds the memory) under DIR")
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
  if args.topology is not None:
    return _run_topology(args)
  if args.cost != "unrolled":
    raise ValueError(f"--cost {args.cost}: needs --topology (a CPU plan reports no compiler cost)")
  plan_lib.ensure_cpu_devices(args.devices)  # before anything else starts JAX
  cfg = load_experiment(args.config, args.overrides)
  hbm = args.hbm_gib if args.hbm_gib is not None else plan_lib.hbm_gib(args.accelerator)
  plan = plan_lib.compile_step(cfg, args.devices, args.xla_dump)
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


def _run_topology(args: argparse.Namespace) -> int:
  tpu = topology.tpu_slice(args.topology)
  cfg = load_experiment(args.config, args.overrides)
  hbm = args.hbm_gib if args.hbm_gib is not None else tpu.device_hbm_bytes / plan_lib.GIB
  plan = plan_lib.topology_plan(cfg, tpu, args.xla_dump, args.cost)
  fits, line = plan_lib.fit_line(plan, hbm)
  compiled, counted = {"unrolled": ("scanned + unrolled", "unrolled step"),
                       "scaled": ("scanned at 1 and 2 layers per body",
                                  "scanned step, scaled from 1 and 2 layers per loop body")
                       }[args.cost]
  print(f"{tpu.name}: {len(tpu.devices)} x {tpu.devices[0].device_kind}, mesh"
        f" {plan_lib.mesh_text(plan)}; compiled ({compiled}) in {plan.compile_s:.1f} s")
  print(f"HBM per device (TPU compiler, scanned step): {plan.per_device_bytes / plan_lib.GIB:.3f}"
        f" GiB = {plan_lib.breakdown(plan)}")
  print(f"per device, every layer counted ({counted}): XLA FLOPs {plan.xla_flops:.4g},"
        f" bytes accessed {plan.xla_bytes:.4g}")
  print(f"step estimate: TPU compiler {plan.compiler_step_s:.4g} s; roofline"
        f" {plan.roofline_step_s:.4g} s (peak {tpu.device_peak_flops / 1e12:.0f} TFLOP/s,"
        f" HBM {tpu.device_hbm_bytes_per_s / 1e9:.0f} GB/s per device)")
  print(line)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"router": cfg.model.router, "connections": cfg.model.connections,
                 "topology": tpu.name, "devices": len(tpu.devices),
                 "per_device_bytes": plan.per_device_bytes, "xla_flops": plan.xla_flops,
                 "xla_bytes": plan.xla_bytes, "compiler_step_s": plan.compiler_step_s,
                 "roofline_step_s": plan.roofline_step_s, "fits": fits, "hbm_gib": hbm,
                 **{k: v for k, v in plan.to_dict().items() if k != "step_time_s"}},
                f, indent=2)
  return 0 if fits else 1
