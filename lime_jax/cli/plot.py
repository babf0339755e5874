"""`lime-jax plot`: validation loss vs training FLOPs of runs, one PNG."""

from __future__ import annotations

import argparse

from lime_jax.studies.plots import plot_val_loss_vs_flops


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
  parser.add_argument("--out", required=True, help="PNG path to write")
  parser.add_argument("--labels", default=None, help="comma-separated labels, one per run")
  parser.add_argument("--title", default=None)


def run(args: argparse.Namespace) -> int:
  labels = args.labels.split(",") if args.labels else None
  path = plot_val_loss_vs_flops(args.runs, args.out, labels, args.title)
  print(f"wrote {path}")
  return 0
