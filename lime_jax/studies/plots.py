"""Validation loss against training FLOPs for several runs, one PNG (matplotlib, Agg).

FLOPs are the cumulative `flops` that training logged (lime_jax.model.flops, the single source), so
LIMe's routing cost is on the x axis and the comparison is per unit of compute.
"""

from __future__ import annotations

import os
from typing import Sequence

from lime_jax.train.metrics import read_metrics


def val_curve(run_dir: str) -> tuple[list[float], list[float]]:
  """(flops, val_loss) of every evaluation a run logged, in step order."""
  records = [r for r in read_metrics(run_dir) if r.get("val_loss") is not None]
  records.sort(key=lambda r: r["step"])
  return [float(r["flops"]) for r in records], [float(r["val_loss"]) for r in records]


def plot_val_loss_vs_flops(run_dirs: Sequence[str], out_path: str,
                           labels: Sequence[str] | None = None, title: str | None = None) -> str:
  """Writes the PNG and returns its path. Every run must have logged a validation loss."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  if not run_dirs:
    raise ValueError("plot: no runs given")
  labels = list(labels) if labels is not None else [os.path.basename(os.path.normpath(d))
                                                    for d in run_dirs]
  if len(labels) != len(run_dirs):
    raise ValueError(f"plot: {len(labels)} labels for {len(run_dirs)} runs")
  curves = []
  for run_dir in run_dirs:
    if not os.path.isdir(run_dir):
      raise ValueError(f"plot: run directory {run_dir}: no such directory")
    flops_N, loss_N = val_curve(run_dir)
    if not flops_N:
      raise ValueError(f"plot: run directory {run_dir}: metrics.jsonl has no val_loss records")
    curves.append((flops_N, loss_N))

  fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
  for label, (flops_N, loss_N) in zip(labels, curves):
    final = f" (final {loss_N[-1]:.3f})"
    ax.plot(flops_N, loss_N, marker="o", markersize=3, label=label + final)
  ax.set_xlabel("training FLOPs")
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title(title or "validation loss vs training compute")
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  fig.savefig(out_path)
  plt.close(fig)
  return out_path
