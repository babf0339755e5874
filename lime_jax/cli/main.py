"""`lime-jax` command line: one subcommand per job. `python -m lime_jax` is the same.

Each command is one module of lime_jax/cli with `add_arguments` and `run`; this one builds the
parser, dispatches, and holds the one error handler: bad input (config, data, checkpoint)
prints one line `lime-jax <cmd>: <message>` to stderr and exits with code 2, before anything is
written; so does a run stopped by a non-finite loss.
"""

from __future__ import annotations

import argparse
import sys

from lime_jax.cli import analyze, bench, export, generate, import_, plan, plot, sweep, tokenizer
from lime_jax.cli import eval as eval_
from lime_jax.cli import lm_eval, train
from lime_jax.cli.quiet import quiet_libraries
from lime_jax.errors import one_line
from lime_jax.parallel.backends import avoid_absent_tpu
from lime_jax.train.loop import NonFiniteLossError

# name, module, help; each module's add_arguments(parser) and run(args).
COMMANDS = (
    ("bench", bench, "memory/FLOPs/time of a train step vs depth"),
    ("train", train, "train a model from a YAML config with section.key=value overrides"),
    ("eval", eval_, "validation loss/perplexity of a checkpoint, or --task accuracy vs chance"),
    ("lm-eval", lm_eval, "lm-evaluation-harness tasks (arc_easy, wic, ...) on a checkpoint"),
    ("plot", plot, "validation loss vs training FLOPs of runs (PNG)"),
    ("sweep", sweep, "router x depth x width x seed grid: run, resume, report (or print commands)"),
    ("plan", plan, "compile the sharded step for N devices: memory per device, FLOPs, fit"),
    ("export", export,
     "checkpoint -> safetensors + config.json (HF Llama / LIMe reference names)"),
    ("import", import_, "read and check an exported directory; --out: as a training checkpoint"),
    ("generate", generate, "sample from a checkpoint with a KV cache"),
    ("analyze", analyze, "per-layer value entropy, token separability and router heatmaps"),
)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="lime-jax", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  for name, module, text in COMMANDS:
    command = sub.add_parser(name, help=text)
    module.add_arguments(command)
    command.set_defaults(func=module.run)
  tok_parser = sub.add_parser("tokenizer", help="tokenizer tools")
  tok_sub = tok_parser.add_subparsers(dest="tokenizer_command", required=True)
  tok_train = tok_sub.add_parser("train", help="fit a byte-level BPE tokenizer.json")
  tokenizer.add_train_arguments(tok_train)
  tok_train.set_defaults(func=tokenizer.run_train)
  return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
  """The command line, `section.key=value` overrides accepted on either side of an option
  (`plan --config X model.L=4 --cost scaled mesh.fsdp=-1`): argparse takes only the first run
  of positionals, and would call the later overrides unrecognized."""
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  overrides = [a for a in extra if "=" in a and not a.startswith("-")]
  if overrides != extra or (overrides and not hasattr(args, "overrides")):
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  if overrides:
    args.overrides = [*(args.overrides or []), *overrides]
  return args


def main(argv: list[str] | None = None) -> int:
  avoid_absent_tpu()  # before any command queries a device
  args = parse(argv)
  quiet_libraries()
  try:
    return args.func(args)
  except (ValueError, NonFiniteLossError) as err:
    print(f"lime-jax {args.command}: {one_line(err)}", file=sys.stderr)
    raise SystemExit(2) from None


if __name__ == "__main__":
  sys.exit(main())
