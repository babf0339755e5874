"""`lime-jax lm-eval`: lm-evaluation-harness tasks on a checkpoint or an exported directory.

  lime-jax lm-eval --checkpoint runs/x --tasks arc_easy,wic --num-fewshot 3
  lime-jax lm-eval --checkpoint exported/ --config configs/lm_eval/paper.yaml --limit 100

Any harness task name works (`--include-path DIR` adds task YAMLs of your own, e.g. over local
JSON files). `--config` reads a task set (`tasks`, `num_fewshot`); flags override it. Prints the
harness's table; `--json` writes the results. Needs the `lm_eval` extra
(lime_jax/evaluation/harness.py).
"""

from __future__ import annotations

import argparse
import json

from lime_jax.evaluation import harness


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--checkpoint", required=True,
                      help="run directory, its checkpoints/ directory, one step directory, or a"
                           " `lime-jax export` directory")
  parser.add_argument("--tasks", default=None, help="comma-separated harness task names")
  parser.add_argument("--config", default=None,
                      help="task-set YAML (tasks, num_fewshot), e.g. configs/lm_eval/paper.yaml")
  parser.add_argument("--num-fewshot", type=int, default=None,
                      help="examples in each prompt (default: the task set's, else each task's)")
  parser.add_argument("--batch-size", type=int, default=8, help="rows per jitted forward")
  parser.add_argument("--limit", type=float, default=None,
                      help="documents per task (a fraction if < 1); for quick checks only")
  parser.add_argument("--tokenizer", default=None,
                      help="'byte' or a tokenizer.json (default: the checkpoint's, else byte)")
  parser.add_argument("--include-path", default=None, help="a directory of extra task YAMLs")
  parser.add_argument("--only-include-path", action="store_true",
                      help="look tasks up in --include-path only (skips indexing the harness's"
                           " ~15k built-in tasks, ~20 s)")
  parser.add_argument("--seed", type=int, default=0, help="few-shot sampling and generation")
  parser.add_argument("--json", default=None, help="write the results to this JSON file")


def task_list(args: argparse.Namespace) -> tuple[list[str], int | None]:
  """(tasks, num_fewshot) from the flags over the --config task set."""
  task_set = harness.read_task_set(args.config) if args.config else {}
  tasks = ([t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks
           else task_set.get("tasks", []))
  if not tasks:
    raise ValueError("--tasks: give harness task names (e.g. arc_easy,wic) or --config")
  shots = args.num_fewshot if args.num_fewshot is not None else task_set.get("num_fewshot")
  if shots is not None and shots < 0:
    raise ValueError(f"--num-fewshot: must be >= 0, got {shots}")
  return tasks, shots


def run(args: argparse.Namespace) -> int:
  tasks, shots = task_list(args)
  if args.only_include_path and not args.include_path:
    raise ValueError("--only-include-path: give --include-path too")
  if args.limit is not None and not args.limit > 0:
    raise ValueError(f"--limit: must be > 0, got {args.limit}")
  limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
  results = harness.evaluate(args.checkpoint, tasks, num_fewshot=shots,
                             batch_size=args.batch_size, tokenizer=args.tokenizer, limit=limit,
                             include_path=args.include_path,
                             include_defaults=not args.only_include_path, seed=args.seed)
  print(harness.results_table(results))
  if args.json:
    kept = {k: results[k] for k in ("results", "n-shot", "versions", "configs", "config")
            if k in results}
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"checkpoint": args.checkpoint, "tasks": tasks, "num_fewshot": shots, **kept}, f,
                indent=1, default=str)
  return 0
