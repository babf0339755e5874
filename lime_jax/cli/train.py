"""`lime-jax train`: train a model from a YAML config with section.key=value overrides.

On several hosts every host runs the same command; the multi-host flags below go to
lime_jax/parallel/distributed.py, which starts jax.distributed before anything starts a JAX
backend. `--default` runs the embedded default job (lime_jax/cli/default_run.py) instead.
"""

from __future__ import annotations

import argparse

import jax

from lime_jax.cli import default_run
from lime_jax.parallel import distributed
from lime_jax.train import loop
from lime_jax.train.experiment import load_experiment


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", default=None, help="YAML file (default: all defaults)")
  parser.add_argument("--resume", action="store_true",
                      help="require a checkpoint in run.out_dir and continue from it")
  parser.add_argument("--default", action="store_true",
                      help="the embedded default job: LIMe vs baseline on CPU, then a plot")
  parser.add_argument("overrides", nargs="*", help="e.g. model.D=128 run.steps=100")
  group = parser.add_argument_group("multi-host (jax.distributed)")
  group.add_argument("--coordinator", default=None,
                     help="HOST:PORT of process 0's coordinator (with --num-processes, --process-id)")
  group.add_argument("--num-processes", type=int, default=None, help="processes in the job")
  group.add_argument("--process-id", type=int, default=None, help="this process, 0-based")
  group.add_argument("--distributed", action="store_true",
                     help="let JAX detect the cluster (Cloud TPU pod, SLURM, Open MPI)")


def run(args: argparse.Namespace) -> int:
  if args.default:
    if args.config or args.overrides or args.resume:
      raise ValueError("--default takes no --config, --resume or overrides")
    return default_run.main([])
  distributed.initialize(distributed.settings(args))  # before anything starts a JAX backend
  cfg = load_experiment(args.config, args.overrides)
  result = loop.train(cfg, resume="always" if args.resume else None)
  if jax.process_index() == 0:
    print(summary(result))
  return 0


def summary(result: loop.TrainResult) -> str:
  parts = [f"{result.out_dir}: step {result.step}"]
  if result.loss is not None:
    parts.append(f"train loss {result.loss:.4f}")
  if result.val_loss is not None:
    parts.append(f"val loss {result.val_loss:.4f}")
  parts.append(f"{result.wall_s:.1f} s")
  return ", ".join(parts)
