"""Probe (not library code): what one layer costs in the scanned train step, by the TPU compiler
on a CPU-only machine, and which of the loop bodies' instructions the compiler expects to take
the time.

`lime-jax plan --cost scaled` counts a layer as the step compiled with two layers per loop body
minus the step with one; this prints that difference itself (bytes, FLOPs, step estimate) next
to both programs' totals, so that variants of one layer can be compared without the rest of the
step. With `--top N` it also lists, for each loop body of both programs, the N
instructions with the most `estimated_cycles` in the compiler's codegen dump (the per-instruction
view `cost_analysis()` does not give), grouped by the operation they came from.

    JAX_PLATFORMS=cpu python experiments/probes/scaled_layer_cost.py \
        --config configs/deep_L64_lime.yaml --top 15 mesh.data=1 mesh.fsdp=-1 model.router_window=8

Measured 2026-12-06 (jax 0.10.2, v5p:2x2x1, deep setup): a layer of the baseline 3.25 GB, of the
window of 8 3.86 GB. The bodies' cycles showed why, and what the difference misses: a copy of the
whole kv buffer into another layout (935.6 k cycles) inside the window's backward branch, and,
in a variant without that branch, two such copies in every loop body whether it held one layer
or two, which the difference cancels (README, "What the scanned window cost"). 2026-12-07, with
the window read in the buffer's layout: a layer of the window 3.46 GB, its backward body 1896.4 k
cycles against 3193.7 k. `--keep-dump DIR` keeps both programs' dumps (DIR/1, DIR/2) to read
an instruction whole. The dump's format is the compiler's and may change.
"""

import argparse
import collections
import contextlib
import glob
import os
import re
import sys
import tempfile


def _body_cycles(dump_dir: str) -> dict[str, collections.Counter]:
  """{loop body: Counter(operation -> estimated cycles)} from the one codegen dump in `dump_dir`;
  the branches of a conditional in a body count in it, marked with the branch's name (each runs
  only when taken)."""
  (path,) = glob.glob(os.path.join(dump_dir, "*after_codegen.txt"))
  with open(path, encoding="utf-8") as f:
    text = f.read()
  per_computation, branches, computation = {}, {}, None
  for line in text.splitlines():
    if not line.startswith(" "):  # a computation's header, or its closing brace
      name = re.match(r"^(?:ENTRY )?%?([\w.\-]+) ", line)
      computation = name.group(1) if name and line.rstrip().endswith("{") else None
      continue
    if computation is None:
      continue
    called = re.search(r"branch_computations=\{([^}]*)\}", line)
    if called:
      branches.setdefault(computation, []).extend(re.findall(r"%([\w.\-]+)", called.group(1)))
    estimate = re.search(r'"estimated_cycles":"(\d+)"', line)
    if estimate:
      op_name = re.search(r'op_name="([^"]*)"', line)
      # The operation's name past the loop body, without the transforms' wrappers.
      where = re.sub(r".*while/body/", "", op_name.group(1)) if op_name else line.split("=")[0]
      where = re.sub(r"closed_call/|checkpoint/|rematted_computation/", "", where.strip())
      per_computation.setdefault(computation, collections.Counter())[where] += int(
          estimate.group(1))
  cycles = {}
  for body in set(re.findall(r"body=%([\w.\-]+)", text)):
    cycles[body] = collections.Counter(per_computation.get(body, {}))
    for branch in branches.get(body, []):
      for where, n in per_computation.get(branch, {}).items():
        cycles[body][f"[branch {branch}] {where}"] += n
  return cycles


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--topology", default="v5p:2x2x1")
  parser.add_argument("--top", type=int, default=0, help="list each loop body's N costliest ops")
  parser.add_argument("--keep-dump", metavar="DIR",
                      help="write the codegen dumps under DIR (kept) instead of a temporary one")
  parser.add_argument("overrides", nargs="*")
  args = parser.parse_args(argv)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()
  from lime_jax.parallel import backends, topology
  from lime_jax.train import plan
  from lime_jax.train.experiment import load_experiment

  backends.avoid_absent_tpu()  # libtpu is only the compiler here
  tpu = topology.tpu_slice(args.topology)
  cfg = load_experiment(args.config, args.overrides)
  with (contextlib.nullcontext(args.keep_dump) if args.keep_dump
        else tempfile.TemporaryDirectory(prefix="scaled_layer_cost_")) as dump_dir:
    costs = []
    for per_body in (1, 2):
      one = cfg.replace(model=cfg.model.replace(scan_unroll=per_body))
      compiled, _, _ = plan._compile(one, list(tpu.devices),
                                     os.path.join(dump_dir, str(per_body))
                                     if args.top or args.keep_dump else None)
      costs.append(plan.compiled_cost(compiled))
    (flops_1, bytes_1, step_1), (flops_2, bytes_2, step_2) = costs
    _, scaled_bytes, _ = plan.scaled_cost(*costs, cfg.model.L)
    print(f"one layer per body: {bytes_1 / 1e9:.2f} GB, {flops_1 / 1e12:.3f} TFLOPs,"
          f" step estimate {step_1 * 1e3:.3f} ms; two: {bytes_2 / 1e9:.2f} GB,"
          f" {flops_2 / 1e12:.3f} TFLOPs, {step_2 * 1e3:.3f} ms")
    print(f"a layer: {(bytes_2 - bytes_1) / 1e6:.1f} MB, {(flops_2 - flops_1) / 1e9:.2f} GFLOPs,"
          f" {(step_2 - step_1) * 1e6:.1f} us; the step scaled to {cfg.model.L} layers"
          f" (plan --cost scaled): {scaled_bytes / 1e9:.1f} GB")
    for per_body in (1, 2) if args.top else ():
      for body, by_op in _body_cycles(os.path.join(dump_dir, str(per_body))).items():
        print(f"{per_body} layer(s) per body, loop body {body}:"
              f" {sum(by_op.values()) / 1e3:.1f} k estimated cycles")
        for where, n in by_op.most_common(args.top):
          print(f"  {n / 1e3:9.1f} k  {where}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
