"""`lime-jax` command line: one subcommand per job. `python -m lime_jax` is the same."""

from __future__ import annotations

import argparse
import sys


def _bench(args: argparse.Namespace) -> int:
  from lime_jax import bench
  return bench.run(args)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="lime-jax", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)

  from lime_jax import bench
  bench_parser = sub.add_parser("bench", help="memory/FLOPs/time of a train step vs depth")
  bench.add_arguments(bench_parser)
  bench_parser.set_defaults(func=_bench)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  return args.func(args)


if __name__ == "__main__":
  sys.exit(main())
