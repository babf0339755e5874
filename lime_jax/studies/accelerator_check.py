"""One accelerator check (`experiments/accelerator_check.sh`): LIMe against the baseline on the
device this runs on, at the paper's 1.2B-class 16-layer setup and the deep 64-layer setup.

For each setup and router (`none`, `kv-static`), the full train step (loss, gradient, AdamW) is
compiled and run on synthetic tokens (nothing is downloaded): median step time, tokens/s, MFU
against the device's dense bf16 peak (train/metrics.py PEAK_FLOPS, model FLOPs from flops.py),
the device's peak memory in use (`memory_stats()`), the compiled temp bytes and the environment
(train/environment.py). Writes one JSON object with the records and the LIMe/baseline
step-time ratio per setup, rewritten after every point (a failed point is recorded with its
error, and the rest run). bf16 compute, `attention_impl: dot_product` (cuDNN flash attention
on NVIDIA GPUs) over all queries at once (a fused kernel skips the masked work itself), remat
as the configs say, LIMe as `routing_impl: pull` over one segment. Each point runs in its own
process, so each peak memory is that point's alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

import jax

from lime_jax.model import flops
from lime_jax.studies.bench import bench_point
from lime_jax.train import metrics
from lime_jax.train.experiment import load_experiment

# (name, config file, micro-batch sized for one 80-141 GB device, sequence length)
SETUPS = (
    ("paper_1p2b_L16", "configs/paper_1p2b_{router}.yaml", 4, 2048),
    ("deep_D256_L64", "configs/deep_L64_{router}.yaml", 16, 1024),
)
# (router, config suffix, overrides): LIMe in its accelerator form, the pull over one scan
# segment (README: the least HBM and bytes of the forms on the TPU compiler at both setups;
# both setups' LIMe configs set it; the overrides hold it whatever a config says).
ROUTERS = (("none", "none", ()),
           ("kv-static", "lime", ("model.routing_impl=pull", "model.scan_segments=1")))


def point_of(index: int) -> tuple[tuple[str, str, int, int], tuple[str, str, tuple[str, ...]]]:
  """Point `index` of SETUPS x ROUTERS: (its setup, its router) entries."""
  return SETUPS[index // len(ROUTERS)], ROUTERS[index % len(ROUTERS)]


def measure_point(repo: str, index: int, steps: int) -> dict[str, Any]:
  """Point `index` of SETUPS x ROUTERS, measured in this process."""
  (setup, path, batch, length), (router, suffix, overrides) = point_of(index)
  device = jax.devices()[0]
  exp = load_experiment(os.path.join(repo, path.format(router=suffix)),
                        ["model.attention_impl=dot_product", "model.attention_query_blocks=1",
                         f"model.T={length}",
                         f"data.seq_len={length}", f"data.batch_size={batch}", *overrides])
  start = time.perf_counter()
  point = bench_point(exp.model, batch, steps, measure_flops=False)
  stats = device.memory_stats() or {}
  tokens_per_s = batch * length / point["step_s"]
  model_flops_per_s = flops.train_flops_per_token(exp.model, length) * tokens_per_s
  return {"setup": setup, "router": router, "routing_impl": exp.model.routing_impl,
          "scan_segments": exp.model.scan_segments, "attention_impl": exp.model.attention_impl,
          "attention_query_blocks": exp.model.attention_query_blocks,
          "batch": batch, "length": length, "step_s": point["step_s"],
          "tokens_per_s": tokens_per_s,
          "mfu": metrics.mfu(model_flops_per_s, metrics.device_peak_flops(device.device_kind)),
          "compile_s": point["compile_s"], "temp_bytes": point["temp_bytes"],
          "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
          "wall_s": time.perf_counter() - start, "device": device.device_kind,
          "environment": point["environment"]}


def check(repo: str, steps: int, out_path: str) -> dict[str, Any]:
  """Every point in a fresh process; the records and LIMe/baseline step ratios. A point that
  fails is recorded with its error and the rest still run; `out_path` is rewritten after every
  point, so a check cut short by its time limit keeps what it measured."""
  records = []
  for index in range(len(SETUPS) * len(ROUTERS)):
    (setup, *_), (router, *_) = point_of(index)
    proc = subprocess.run([sys.executable, "-m", "lime_jax.studies.accelerator_check",
                           "--repo", repo, "--steps", str(steps), "--point", str(index)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
      records.append({"setup": setup, "router": router,
                      "error": error_line(proc.stderr, proc.returncode),
                      "stderr_tail": proc.stderr[-2000:]})
    else:
      records.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(json.dumps(records[-1]), flush=True)
    result = summary(records)
    with open(out_path, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
  return result


def error_line(stderr: str, returncode: int) -> str:
  """The exception line of a failed point's stderr (`Type: message`; JAX prints a note after
  it), else its last line."""
  lines = [line for line in stderr.strip().splitlines() if line.strip()]
  exceptions = [line for line in lines if re.match(r"[A-Za-z_][\w.]*: ", line)]
  return (exceptions or lines or [f"exit code {returncode}"])[-1][:500]


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
  """The records so far and the LIMe/baseline step ratio of each setup whose two points ran."""
  ratios = {}
  for setup, *_ in SETUPS:
    by_router = {r["router"]: r for r in records if r["setup"] == setup and "error" not in r}
    if {"none", "kv-static"} <= by_router.keys():
      ratios[setup] = by_router["kv-static"]["step_s"] / by_router["none"]["step_s"]
  measured = [r for r in records if "error" not in r]
  return {"device": measured[0]["device"] if measured else None, "jax": jax.__version__,
          "environment": measured[0]["environment"] if measured else None, "records": records,
          "lime_over_baseline_step": ratios,
          "failed": [f"{r['setup']}/{r['router']}" for r in records if "error" in r]}


def output_path(out: str) -> str:
  """The JSON file for `--out`: the path itself, or `accelerator_check.json` in it when it is a
  directory (a device runner's output folder); ValueError if it cannot be written there."""
  if not out:
    raise ValueError("--out: empty; name a JSON file or a folder")
  path = os.path.join(out, "accelerator_check.json") if os.path.isdir(out) else out
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
    raise ValueError(f"--out {out}: cannot write {path} (no such writable directory: {folder})")
  return path


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lime_jax.studies.accelerator_check",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=None, help="the JSON file to write")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per point (median)")
  parser.add_argument("--repo", default=".", help="the repository root (configs/ is read)")
  parser.add_argument("--point", type=int, default=None, help=argparse.SUPPRESS)  # one, here
  args = parser.parse_args(argv)
  if args.point is None:  # before any device time is spent
    if args.out is None:
      parser.error("--out is required")
    try:
      out_path = output_path(args.out)
    except ValueError as err:
      print(f"accelerator_check: {err}", file=sys.stderr)
      return 2
  if jax.devices()[0].platform == "cpu":
    print("accelerator_check: JAX sees no accelerator (only the CPU); nothing measured",
          file=sys.stderr)
    return 2
  if args.point is not None:
    print(json.dumps(measure_point(args.repo, args.point, args.steps)))
    return 0
  result = check(args.repo, args.steps, out_path)
  print(f"{out_path}: LIMe/baseline step {json.dumps(result['lime_over_baseline_step'])}"
        + (f"; failed: {', '.join(result['failed'])}" if result["failed"] else ""))
  return 1 if result["failed"] else 0


if __name__ == "__main__":
  sys.exit(main())
