"""EleutherAI's lm-evaluation-harness on our JAX models: a harness model named `lime_jax`.

`HarnessModel` answers the harness's three request types with a `scoring.Scorer`:
`loglikelihood` (context, continuation) -> (log p, greedy), `loglikelihood_rolling` (text,) ->
log p, and `generate_until` (context, {until, max_gen_toks, do_sample, temperature}) -> text.
`lm_class()` makes it an `lm_eval.api.model.LM` and registers it as "lime_jax"; `evaluate` runs
`lm_eval.simple_evaluate` on it (`lime-jax lm-eval` is lime_jax/cli/lm_eval.py).

lm-eval is the optional `lm_eval` extra (`pip install 'lime_jax[lm_eval]'`; it needs no torch),
imported only when a harness model is made: importing it costs every other command half a
second. Task data comes through the harness (Hugging Face datasets); a task YAML of local JSON
files (`--include-path`) runs offline.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Sequence

import yaml

from lime_jax.errors import one_line
from lime_jax.evaluation.scoring import Scorer

MODEL_NAME = "lime_jax"
TASK_SET_KEYS = ("tasks", "num_fewshot")


def import_lm_eval(module: str = "lm_eval") -> Any:
  """An lm_eval module, or a one-line ValueError saying how to install it."""
  try:
    return importlib.import_module(module)
  except ImportError:
    raise ValueError("lm-eval: EleutherAI's lm-evaluation-harness is not installed:"
                     " pip install 'lime_jax[lm_eval]'") from None


class HarnessModel:
  """The harness's model interface over a Scorer; `lm_class()` adds lm_eval's LM base."""

  def __init__(self, checkpoint: str, tokenizer: str | None = None, batch_size: int | str = 8):
    super().__init__()  # lm_eval's LM sets its rank and cache hook
    self.scorer = Scorer.load(checkpoint, tokenizer, int(batch_size))

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    del disable_tqdm
    return self.scorer.loglikelihood([tuple(r.args) for r in requests])

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    del disable_tqdm
    return self.scorer.rolling_loglikelihood([r.args[0] for r in requests])

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Requests grouped by their generation settings, each group batched; greedy unless
    do_sample with a positive temperature."""
    del disable_tqdm
    groups: dict[tuple, list[int]] = {}
    for i, request in enumerate(requests):
      groups.setdefault(_generation_settings(request.args[1]), []).append(i)
    out: list[str] = [""] * len(requests)
    for (until, max_new_tokens, temperature), indices in groups.items():
      texts = self.scorer.generate([requests[i].args[0] for i in indices], until,
                                   max_new_tokens, temperature)
      for i, text in zip(indices, texts):
        out[i] = text
    return out


def _generation_settings(gen_kwargs: dict[str, Any]) -> tuple[tuple[str, ...], int, float]:
  until = gen_kwargs.get("until") or ()
  until = (until,) if isinstance(until, str) else tuple(until)
  temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
  if not gen_kwargs.get("do_sample", False):
    temperature = 0.0
  return until, int(gen_kwargs.get("max_gen_toks", 256)), temperature


@functools.cache
def lm_class() -> type:
  """HarnessModel with lm_eval's LM base, registered with the harness as "lime_jax"."""
  base = import_lm_eval("lm_eval.api.model").LM
  registry = import_lm_eval("lm_eval.api.registry")
  cls = type("LimeJaxLM", (HarnessModel, base), {"__doc__": HarnessModel.__doc__,
                                                 "__module__": __name__})
  return registry.register_model(MODEL_NAME)(cls)


def read_task_set(path: str) -> dict[str, Any]:
  """A task-set YAML: `tasks` (a list of harness task names) and optionally `num_fewshot`."""
  try:
    with open(path, encoding="utf-8") as f:
      values = yaml.safe_load(f)
  except OSError as err:
    raise ValueError(f"task set {path}: cannot read: {err.strerror}") from None
  except yaml.YAMLError as err:
    raise ValueError(f"task set {path}: invalid YAML: {' '.join(str(err).split())}") from None
  if not isinstance(values, dict) or set(values) - set(TASK_SET_KEYS):
    raise ValueError(f"task set {path}: expected a mapping with keys {TASK_SET_KEYS}")
  tasks = values.get("tasks")
  if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
    raise ValueError(f"task set {path}: tasks: expected a non-empty list of task names")
  shots = values.get("num_fewshot")
  if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 0):
    raise ValueError(f"task set {path}: num_fewshot: expected an integer >= 0, got {shots!r}")
  return values


def evaluate(checkpoint: str, tasks: Sequence[str], *, num_fewshot: int | None = None,
             batch_size: int = 8, tokenizer: str | None = None, limit: int | float | None = None,
             include_path: str | None = None, include_defaults: bool = True,
             log_samples: bool = False, seed: int = 0) -> dict[str, Any]:
  """lm_eval.simple_evaluate of the model at `checkpoint` on harness `tasks`: its results dict
  ("results", "n-shot", "versions", ...; "samples" with `log_samples`)."""
  evaluator = import_lm_eval("lm_eval.evaluator")
  manager = import_lm_eval("lm_eval.tasks").TaskManager(include_path=include_path,
                                                        include_defaults=include_defaults)
  unknown = [t for t in tasks if t not in manager.all_tasks]
  if unknown:
    raise ValueError(f"--tasks: unknown harness task(s) {unknown}"
                     + (f" (also searched {include_path})" if include_path else ""))
  model = lm_class()(checkpoint, tokenizer=tokenizer, batch_size=batch_size)
  try:
    return evaluator.simple_evaluate(
        model=model, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
        task_manager=manager, log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
        fewshot_random_seed=seed)
  except ConnectionError as err:  # the task data lives on the Hugging Face Hub
    raise ValueError(
        f"--tasks: cannot fetch the data of {','.join(tasks)}: {one_line(err, limit=200)}; the"
        " harness downloads it from the Hugging Face Hub (and caches it): run once with network"
        " access, or use tasks over local files (--include-path)") from None


def results_table(results: dict[str, Any]) -> str:
  """The harness's own markdown table of the results."""
  return import_lm_eval("lm_eval.utils").make_table(results)
