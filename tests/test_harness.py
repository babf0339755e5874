"""lm-evaluation-harness on a tiny trained checkpoint, offline: a local multiple-choice task
(harness YAML over JSON files the test writes) whose per-choice log-likelihoods equal our own
forward's per-token sums and whose accuracy is the mean of our own per-document argmaxes; the
exported directory scores the same; rolling and generation requests go through the scorer;
`lime-jax lm-eval` prints the table and writes the JSON."""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, child_env
from lime_jax.cli.main import main
from lime_jax.evaluation import harness, scoring
from lime_jax.interop import hf
from lime_jax.model.transformer import Transformer
from lime_jax.train import loop
from lime_jax.train.experiment import load_experiment

pytestmark = pytest.mark.integration

TINY = ["model.D=32", "model.L=2", "model.H=2", "model.F=64", "model.T=64", "data.seq_len=64",
        "data.batch_size=4", "run.steps=3", "run.eval_every=3", "run.progress=false",
        "run.tensorboard=false"]
# Pairs of documents with the same choices and opposite answers: whatever the model prefers,
# one of each pair is right, so the accuracy can be neither 0 nor 1.
QUESTIONS = [("The for", [" statement", " qzxjv"]), ("import", [" sys", " ~~~"]),
             ("def f(x):", [" return x", " }{"])]
TASK = "lime_local_choice"
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {dir}/train.jsonl
    validation: {dir}/validation.jsonl
output_type: multiple_choice
training_split: train
validation_split: validation
doc_to_text: "{{{{question}}}}"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
  """The harness and Hugging Face datasets never reach the network; caches stay in tmp. The
  libraries read the environment when first imported (maybe earlier in this process, e.g. by
  transformers), so their offline switches are set on the modules too."""
  pytest.importorskip("lm_eval")
  home = tmp_path_factory.mktemp("hf_home")
  patch = pytest.MonkeyPatch()
  for key, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(home),
                     "HF_DATASETS_CACHE": str(home / "datasets")}.items():
    patch.setenv(key, value)
  datasets_config = pytest.importorskip("datasets.config")
  hub_constants = pytest.importorskip("huggingface_hub.constants")
  patch.setattr(datasets_config, "HF_HUB_OFFLINE", True)
  patch.setattr(datasets_config, "HF_DATASETS_OFFLINE", True)
  patch.setattr(datasets_config, "HF_DATASETS_CACHE", home / "datasets")
  patch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
  yield
  patch.undo()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, offline):
  out = tmp_path_factory.mktemp("run")
  loop.train(load_experiment(None, [*TINY, f"run.out_dir={out}"]))
  return str(out)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tasks")
  docs = [{"question": q, "choices": c, "label": label} for q, c in QUESTIONS for label in (0, 1)]
  (d / "validation.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))
  shots = [{"question": f"x = {i}", "choices": [" ok", " ?"], "label": 0} for i in range(3)]
  (d / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in shots))
  (d / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, dir=d))
  return str(d)


@functools.partial(jax.jit, static_argnames="cfg")
def _logits(params, inputs_1xT, *, cfg):
  return Transformer(cfg).apply({"params": params}, inputs_1xT)


def _own_loglikelihood(params, cfg, context: str, continuation: str) -> float:
  """BOS + context + continuation through the model; the continuation's log-probs summed."""
  context_ids = [256, *context.encode()]
  sequence = context_ids + list(continuation.encode())
  assert len(sequence) <= cfg.T + 1  # nothing truncated: the harness saw the same sequence
  n = len(sequence) - 1
  buffer_1xT = np.zeros((1, cfg.T), np.int32)  # causal: the padding after the row is not seen
  buffer_1xT[0, :n] = sequence[:-1]
  logits = np.asarray(_logits(params, buffer_1xT, cfg=cfg), np.float64)[0, :n]
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  positions = np.arange(len(context_ids) - 1, len(sequence) - 1)
  return float(logp[positions, sequence[len(context_ids):]].sum())


def _evaluate(path, task_dir):
  return harness.evaluate(path, [TASK], num_fewshot=1, batch_size=4, include_path=task_dir,
                          include_defaults=False, log_samples=True)


def test_harness_loglikelihoods_and_accuracy_are_our_forwards(run_dir, task_dir):
  model = scoring.load_model(run_dir)
  results = _evaluate(run_dir, task_dir)
  samples = results["samples"][TASK]
  assert len(samples) == 2 * len(QUESTIONS)
  correct = []
  for sample in samples:
    contexts = [arguments[0] for arguments in _arguments(sample)]
    assert all(c == contexts[0] and c.startswith("x = ") and c.count("\n\n") == 1
               for c in contexts)  # one shot, then the question
    own = [_own_loglikelihood(model.params, model.cfg, context, continuation)
           for context, continuation in _arguments(sample)]
    theirs = [resp[0][0] for resp in sample["resps"]]
    np.testing.assert_allclose(theirs, own, rtol=1e-5)
    correct.append(float(np.argmax(own) == sample["target"]))
    assert sample["acc"] == correct[-1]
  assert 0 < sum(correct) < len(correct)  # both outcomes occur: computed, not a constant
  assert results["results"][TASK]["acc,none"] == pytest.approx(np.mean(correct))
  # The exported directory of the same parameters scores the same.
  exported = os.path.join(run_dir, "exported")
  hf.export_params(model.params, model.cfg, exported)
  again = _evaluate(exported, task_dir)["samples"][TASK]
  np.testing.assert_allclose([r[0][0] for s in again for r in s["resps"]],
                             [r[0][0] for s in samples for r in s["resps"]], rtol=1e-6)


def _arguments(sample):
  """(context, continuation) per choice, across the harness's ways of logging them."""
  arguments = sample["arguments"]
  if isinstance(arguments, dict):  # {"gen_args_0": {"arg_0": context, "arg_1": choice}, ...}
    return [(a["arg_0"], a["arg_1"]) for a in arguments.values()]
  return [tuple(a) for a in arguments]


def test_rolling_and_generation_requests_go_through_the_scorer(run_dir, offline):
  instance = harness.import_lm_eval("lm_eval.api.instance").Instance
  lm = harness.lm_class()(run_dir, batch_size=2)
  scorer = lm.scorer
  text = "a text longer than the model's sixty-four bytes, scored in disjoint rolling windows"
  rolling = lm.loglikelihood_rolling([instance("loglikelihood_rolling", {}, (text,), 0)])
  assert rolling == [pytest.approx(scorer.rolling_loglikelihood_tokens(list(text.encode())))]
  requests = [instance("generate_until", {}, ("The for", {"until": ["\n"], "max_gen_toks": 5}), 0),
              instance("generate_until", {}, ("import", {"until": ["\n"], "max_gen_toks": 5}), 1),
              instance("generate_until", {}, ("x", {"until": [], "max_gen_toks": 3}), 2)]
  assert lm.generate_until(requests) == [*scorer.generate(["The for", "import"], ["\n"], 5),
                                         *scorer.generate(["x"], [], 3)]
  assert harness.import_lm_eval("lm_eval.api.registry").get_model("lime_jax") is type(lm)


def test_cli_prints_the_table_and_writes_results(run_dir, task_dir, tmp_path, capsys):
  out = tmp_path / "results.json"
  assert main(["lm-eval", "--checkpoint", run_dir, "--tasks", TASK, "--num-fewshot", "0",
               "--include-path", task_dir, "--only-include-path", "--json", str(out)]) == 0
  printed = capsys.readouterr().out
  assert TASK in printed and "acc" in printed and "|" in printed
  saved = json.loads(out.read_text())
  assert saved["tasks"] == [TASK] and saved["num_fewshot"] == 0
  assert 0 <= saved["results"][TASK]["acc,none"] <= 1


def test_task_data_out_of_reach_is_a_one_line_error(run_dir, task_dir, tmp_path, capsys):
  """A task whose data is on the Hub, offline: one line naming the task and the way out."""
  hub_task = (tmp_path / "hub_task.yaml")
  hub_task.write_text(TASK_YAML.format(task="hub_task", dir=task_dir).replace(
      "dataset_path: json", "dataset_path: nobody/no_such_dataset"))
  with pytest.raises(SystemExit) as exc:
    main(["lm-eval", "--checkpoint", run_dir, "--tasks", "hub_task", "--include-path",
          str(tmp_path), "--only-include-path"])
  assert exc.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("lime-jax lm-eval: --tasks: cannot fetch the data of hub_task: ")
  assert "\n" not in err and "--include-path" in err


def test_task_sets_and_bad_flags(tmp_path, capsys):
  paper = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                       "lm_eval", "paper.yaml")
  assert harness.read_task_set(paper) == {
      "tasks": ["multirc", "wic", "qnli", "arc_easy", "arc_challenge"], "num_fewshot": 3}
  bad = tmp_path / "bad.yaml"
  bad.write_text("tasks: []\n")
  with pytest.raises(ValueError, match="tasks: expected a non-empty list"):
    harness.read_task_set(str(bad))
  for argv, message in [([], "--tasks: give harness task names"),
                        (["--tasks", "x", "--only-include-path"], "give --include-path too"),
                        (["--tasks", "x", "--limit", "0"], "--limit: must be > 0")]:
    with pytest.raises(SystemExit) as exc:
      main(["lm-eval", "--checkpoint", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_the_command_line_imports_lm_eval_only_when_it_evaluates():
  """Importing the harness costs every command half a second: lm_class imports it, late."""
  code = "import sys, lime_jax.cli.main; assert 'lm_eval' not in sys.modules, 'imported'"
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
