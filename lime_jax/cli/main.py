"""`lime-jax` command line: one subcommand per job. `python -m lime_jax` is the same.

Bad input (config, data, checkpoint) prints one line `lime-jax <cmd>: <message>` to stderr and
exits with code 2, before anything is written; so does a run stopped by a non-finite loss.
"""

from __future__ import annotations

import argparse
import sys


def _bench(args: argparse.Namespace) -> int:
  from lime_jax.studies import bench
  return bench.run(args)


def _train(args: argparse.Namespace) -> int:
  if args.default:
    if args.config or args.overrides or args.resume:
      raise ValueError("--default takes no --config, --resume or overrides")
    from lime_jax.cli import default_run
    return default_run.main([])
  from lime_jax.parallel import distributed
  distributed.initialize(distributed.settings(args))  # before anything starts JAX
  import jax
  from lime_jax.train import experiment
  from lime_jax.train import loop as train
  cfg = experiment.load_experiment(args.config, args.overrides)
  result = train.train(cfg, resume="always" if args.resume else None)
  if jax.process_index() == 0:
    print(_summary(result))
  return 0


def _summary(result) -> str:
  parts = [f"{result.out_dir}: step {result.step}"]
  if result.loss is not None:
    parts.append(f"train loss {result.loss:.4f}")
  if result.val_loss is not None:
    parts.append(f"val loss {result.val_loss:.4f}")
  parts.append(f"{result.wall_s:.1f} s")
  return ", ".join(parts)


def _eval(args: argparse.Namespace) -> int:
  from lime_jax.train import evaluate
  return evaluate.run(args)


def _sweep(args: argparse.Namespace) -> int:
  from lime_jax.studies import sweep
  return sweep.run(args)


def _plan(args: argparse.Namespace) -> int:
  from lime_jax.parallel import plan
  return plan.run(args)


def _plot(args: argparse.Namespace) -> int:
  from lime_jax.studies import plots as plot
  return plot.run(args)


def _export(args: argparse.Namespace) -> int:
  from lime_jax.interop import hf as export
  return export.run_export(args)


def _import(args: argparse.Namespace) -> int:
  from lime_jax.interop import hf as export
  return export.run_import(args)


def _generate(args: argparse.Namespace) -> int:
  from lime_jax.inference import decode
  return decode.run_generate(args, _load_for_generate)


def _load_for_generate(path: str):
  """(params, model config, tokenizer spec) of a training checkpoint."""
  from lime_jax.train import checkpoint as ckpt
  from lime_jax.interop import hf as export
  params, model_cfg = export.load_checkpoint_params(path)
  directory, step = ckpt.resolve_dir(path)
  _, saved = ckpt.read_config(directory, step)
  return params, model_cfg, saved["data"]["tokenizer"]


def _analyze(args: argparse.Namespace) -> int:
  from lime_jax.studies import analysis
  return analysis.run(args, _load_for_generate)


def _tokenizer_train(args: argparse.Namespace) -> int:
  from lime_jax.data import tokenizers as tokenizer
  return tokenizer.run_train(args)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="lime-jax", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)

  from lime_jax.studies import bench
  bench_parser = sub.add_parser("bench", help="memory/FLOPs/time of a train step vs depth")
  bench.add_arguments(bench_parser)
  bench_parser.set_defaults(func=_bench)

  train_parser = sub.add_parser(
      "train", help="train a model from a YAML config with section.key=value overrides")
  train_parser.add_argument("--config", default=None, help="YAML file (default: all defaults)")
  train_parser.add_argument("--resume", action="store_true",
                            help="require a checkpoint in run.out_dir and continue from it")
  train_parser.add_argument("--default", action="store_true",
                            help="the embedded default job: LIMe vs baseline on CPU, then a plot")
  train_parser.add_argument("overrides", nargs="*", help="e.g. model.D=128 run.steps=100")
  from lime_jax.parallel import distributed
  distributed.add_arguments(train_parser)
  train_parser.set_defaults(func=_train)

  from lime_jax.train import evaluate
  eval_parser = sub.add_parser(
      "eval", help="validation loss/perplexity of a checkpoint, or --task accuracy vs chance")
  evaluate.add_arguments(eval_parser)
  eval_parser.set_defaults(func=_eval)

  from lime_jax.studies import plots as plot
  plot_parser = sub.add_parser("plot", help="validation loss vs training FLOPs of runs (PNG)")
  plot.add_arguments(plot_parser)
  plot_parser.set_defaults(func=_plot)

  from lime_jax.studies import sweep
  sweep_parser = sub.add_parser(
      "sweep", help="router x depth x width x seed grid: run, resume, report (or print commands)")
  sweep.add_arguments(sweep_parser)
  sweep_parser.set_defaults(func=_sweep)

  from lime_jax.parallel import plan
  plan_parser = sub.add_parser(
      "plan", help="compile the sharded step for N devices: memory per device, FLOPs, fit")
  plan.add_arguments(plan_parser)
  plan_parser.set_defaults(func=_plan)

  from lime_jax.interop import hf as export
  export_parser = sub.add_parser(
      "export", help="checkpoint -> safetensors + config.json (HF Llama / LIMe reference names)")
  export.add_export_arguments(export_parser)
  export_parser.set_defaults(func=_export)
  import_parser = sub.add_parser("import", help="read and check an exported directory")
  export.add_import_arguments(import_parser)
  import_parser.set_defaults(func=_import)

  from lime_jax.inference import decode
  generate_parser = sub.add_parser("generate", help="sample from a checkpoint with a KV cache")
  decode.add_generate_arguments(generate_parser)
  generate_parser.set_defaults(func=_generate)

  from lime_jax.studies import analysis
  analyze_parser = sub.add_parser(
      "analyze", help="per-layer value entropy, token separability and router heatmaps")
  analysis.add_arguments(analyze_parser)
  analyze_parser.set_defaults(func=_analyze)

  from lime_jax.data import tokenizers as tokenizer
  tok_parser = sub.add_parser("tokenizer", help="tokenizer tools")
  tok_sub = tok_parser.add_subparsers(dest="tokenizer_command", required=True)
  tok_train = tok_sub.add_parser("train", help="fit a byte-level BPE tokenizer.json")
  tokenizer.add_train_arguments(tok_train)
  tok_train.set_defaults(func=_tokenizer_train)
  return parser


def quiet_libraries() -> None:
  """Keeps the terminal for the run itself: orbax logs routine warnings through absl, and its
  failed reads leave noise (see `_quiet_orphaned_reads`)."""
  _quiet_orphaned_reads()
  try:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)
  except ImportError:
    pass


def _quiet_orphaned_reads() -> None:
  """After a failed orbax read, tensorstore callbacks still fire into orbax's closed event loop;
  Python would print each as an ignored exception after our one-line message."""
  previous = sys.unraisablehook

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      return
    previous(unraisable)

  sys.unraisablehook = hook


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  quiet_libraries()
  from lime_jax.train.loop import NonFiniteLossError
  try:
    return args.func(args)
  except (ValueError, NonFiniteLossError) as err:
    print(f"lime-jax {args.command}: {' '.join(str(err).split())}", file=sys.stderr)
    raise SystemExit(2) from None


if __name__ == "__main__":
  sys.exit(main())
