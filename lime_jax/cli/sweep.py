"""`lime-jax sweep`: router x depth x width x seed grid: run, resume, report (or print commands).

Exit code 1 when a point failed (the others still ran and are reported), 2 on bad input.
"""

from __future__ import annotations

import argparse
import os
import sys

from lime_jax.studies.sweep import (COMMANDS_FILE, expand, load_sweep, run_sweep, select,
                                    write_commands)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", required=True, help="sweep YAML (configs/sweeps/NAME.yaml)")
  parser.add_argument("--print-commands", action="store_true",
                      help=f"write <out_dir>/{COMMANDS_FILE}, one launch command per point,"
                           " and train nothing")
  parser.add_argument("--only", nargs="+", default=None, metavar="PATTERN",
                      help="only the points whose name matches one of these fnmatch patterns")
  parser.add_argument("overrides", nargs="*",
                      help="section.key=value experiment overrides for every point")


def run(args: argparse.Namespace) -> int:
  cfg = load_sweep(args.config, args.overrides)
  points = select(expand(cfg), args.only)
  if args.print_commands:
    path = write_commands(cfg, points, os.path.join(cfg.out_dir, COMMANDS_FILE))
    print(f"wrote {path} ({len(points)} commands)")
    return 0
  rows, paths = run_sweep(cfg, args.only)
  for path in paths:
    print(f"wrote {path}")
  failed = [r["point"] for r in rows if r["status"].startswith("failed")]
  if failed:
    print(f"sweep: {len(failed)} point(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0
