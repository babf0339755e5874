"""One accelerator check (`experiments/accelerator_check.sh`): LIMe against the baseline on the
device this runs on, at the paper's 1.2B-class 16-layer setup and the deep 64-layer setup.

For each setup and router (`none`, `kv-static`), the full train step (loss, gradient, AdamW) is
compiled and run on synthetic tokens (nothing is downloaded): median step time, tokens/s, MFU
against the device's dense bf16 peak (train/metrics.py PEAK_FLOPS, model FLOPs from flops.py),
the device's peak memory in use (`memory_stats()`), the compiled temp bytes and the environment
(train/environment.py). Writes one JSON object with the records and the LIMe/baseline
step-time ratio per setup. bf16 compute, `attention_impl: dot_product` (cuDNN flash attention
on NVIDIA GPUs), remat as the configs say. Each point runs in its own process, so each peak
memory is that point's alone.
"""

from __future__ import annotations

import argparse
import json
import os
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
ROUTERS = (("none", "none"), ("kv-static", "lime"))


def measure_point(repo: str, index: int, steps: int) -> dict[str, Any]:
  """Point `index` of SETUPS x ROUTERS, measured in this process."""
  (setup, path, batch, length), (router, suffix) = SETUPS[index // 2], ROUTERS[index % 2]
  device = jax.devices()[0]
  exp = load_experiment(os.path.join(repo, path.format(router=suffix)),
                        ["model.attention_impl=dot_product", f"model.T={length}",
                         f"data.seq_len={length}", f"data.batch_size={batch}"])
  start = time.perf_counter()
  point = bench_point(exp.model, batch, steps, measure_flops=False)
  stats = device.memory_stats() or {}
  tokens_per_s = batch * length / point["step_s"]
  model_flops_per_s = flops.train_flops_per_token(exp.model, length) * tokens_per_s
  return {"setup": setup, "router": router, "batch": batch, "length": length,
          "step_s": point["step_s"], "tokens_per_s": tokens_per_s,
          "mfu": metrics.mfu(model_flops_per_s, metrics.device_peak_flops(device.device_kind)),
          "compile_s": point["compile_s"], "temp_bytes": point["temp_bytes"],
          "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
          "wall_s": time.perf_counter() - start, "device": device.device_kind,
          "environment": point["environment"]}


def check(repo: str, steps: int) -> dict[str, Any]:
  """Every point in a fresh process; the records and LIMe/baseline step ratios."""
  records = []
  for index in range(len(SETUPS) * len(ROUTERS)):
    proc = subprocess.run([sys.executable, "-m", "lime_jax.studies.accelerator_check",
                           "--repo", repo, "--steps", str(steps), "--point", str(index)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
      raise RuntimeError(f"accelerator_check: point {index} failed: {proc.stderr[-2000:]}")
    records.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(json.dumps(records[-1]), flush=True)
  ratios = {}
  for setup, *_ in SETUPS:
    by_router = {r["router"]: r for r in records if r["setup"] == setup}
    ratios[setup] = by_router["kv-static"]["step_s"] / by_router["none"]["step_s"]
  return {"device": records[0]["device"], "jax": jax.__version__,
          "environment": records[0]["environment"], "records": records,
          "lime_over_baseline_step": ratios}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lime_jax.studies.accelerator_check",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=None, help="the JSON file to write")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per point (median)")
  parser.add_argument("--repo", default=".", help="the repository root (configs/ is read)")
  parser.add_argument("--point", type=int, default=None, help=argparse.SUPPRESS)  # one, here
  args = parser.parse_args(argv)
  if jax.devices()[0].platform == "cpu":
    print("accelerator_check: JAX sees no accelerator (only the CPU); nothing measured",
          file=sys.stderr)
    return 2
  if args.point is not None:
    print(json.dumps(measure_point(args.repo, args.point, args.steps)))
    return 0
  if args.out is None:
    parser.error("--out is required")
  result = check(args.repo, args.steps)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result["lime_over_baseline_step"]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
