"""The embedded default job (`make train`, `lime-jax train --default`): LIMe vs the baseline.

Trains a small LIMe model and the same-size Llama baseline on the embedded corpus (the standard
library's pydoc topics, byte tokenizer) on CPU, one after the other, into
`runs/default/lime` and `runs/default/baseline`; prints both final validation losses and
writes `runs/default/val_loss_vs_flops.png`. Sized to finish in about 5 minutes on 2 CPU cores.

Running it again resumes (or, when finished, just reports) the same runs.
`configs/cpu_small_lime.yaml` and `configs/cpu_small_none.yaml` hold the same settings.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from lime_jax.cli.quiet import quiet_libraries
from lime_jax.parallel.backends import avoid_absent_tpu
from lime_jax.errors import one_line
from lime_jax.studies.plots import plot_val_loss_vs_flops
from lime_jax.train.experiment import load_experiment
from lime_jax.train.loop import NonFiniteLossError, train

DEFAULT_OUT = os.path.join("runs", "default")
RUNS = (("lime", "kv-static"), ("baseline", "none"))

# Shared by both runs; the router and out_dir are set per run.
# Measured on 2 CPU cores shared with other jobs: 262 s for both runs, compilation included. Short
# sequences and many small steps learn this corpus fastest per second; 8 layers give routing depth.
CONFIG: dict[str, Any] = {
    "model": {"D": 64, "L": 8, "H": 4, "F": 256, "T": 64},
    "data": {"source": "embedded", "tokenizer": "byte", "seq_len": 64, "batch_size": 16,
             "val_batches": 4},
    "optim": {"lr": 3e-3, "warmup_steps": 30},
    "run": {"steps": 360, "log_every": 10, "eval_every": 30, "checkpoint_every": 120,
            "keep_checkpoints": 1},
}


def run_config(name: str, router: str, out_dir: str, overrides: Sequence[str] = ()):
  return load_experiment(None, [*overrides, f"model.router={router}",
                                f"run.out_dir={os.path.join(out_dir, name)}"], base=CONFIG)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lime_jax.cli.default_run", description=__doc__)
  parser.add_argument("--out-dir", default=DEFAULT_OUT)
  parser.add_argument("overrides", nargs="*", help="section.key=value, applied to both runs")
  args = parser.parse_args(argv)

  avoid_absent_tpu()
  quiet_libraries()
  try:
    configs = [(name, run_config(name, router, args.out_dir, args.overrides))
               for name, router in RUNS]  # both validated before either trains
    results = {name: train(cfg) for name, cfg in configs}
    png = plot_val_loss_vs_flops([r.out_dir for r in results.values()],
                                 os.path.join(args.out_dir, "val_loss_vs_flops.png"),
                                 labels=[f"{name} ({cfg.model.router})" for name, cfg in configs],
                                 title="embedded corpus, byte tokenizer: LIMe vs baseline")
  except (ValueError, NonFiniteLossError) as err:
    print(f"lime-jax train: {one_line(err)}", file=sys.stderr)
    return 2
  for name, result in results.items():
    print(f"{name:8s} final validation loss {result.val_loss:.4f}"
          f" (train loss {result.loss:.4f}, {result.wall_s:.1f} s) in {result.out_dir}")
  print(f"wrote {png}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
