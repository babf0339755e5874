"""Synthetic tasks: answers checked by independent solvers, weights, splits, batches, accuracy."""

import collections
import itertools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lime_jax.data import tasks
from lime_jax.data.tasks import (TASK_NAMES, TASKS, TaskConfig, chance, encode_examples,
                                 evaluate_task, exact_match, generate_example, make_split,
                                 make_task_iterator, make_test_batches)
from lime_jax.data.tokenizers import ByteTokenizer

BYTE = ByteTokenizer()
N = 60  # examples per independent check


def _examples(name: str, difficulty: int, seed: int = 0, n: int = N) -> list[tuple[str, str]]:
  rng = np.random.default_rng(seed)
  return [generate_example(name, rng, difficulty) for _ in range(n)]


def _cfg(**kw) -> TaskConfig:
  return TaskConfig(**{"name": "mqar", "difficulty": 4, "seq_len": 32, "num_train": 40,
                       "num_test": 10, "batch_size": 4, **kw})


# --- independent checks of every task ----------------------------------------------------------


def _nesting_depth(text: str) -> int:
  depth = deepest = 0
  for ch in text:
    depth += {"(": 1, ")": -1}.get(ch, 0)
    deepest = max(deepest, depth)
  return deepest


@pytest.mark.parametrize("depth", [1, 2, 4, 7])
def test_arithmetic_matches_python_eval_and_depth(depth):
  for prompt, answer in _examples("arithmetic", depth):
    match = re.fullmatch(r"([0-9()+\-*]+)%(\d+)=", prompt)
    assert match, prompt
    expression, p = match.group(1), int(match.group(2))
    assert p == tasks.ARITHMETIC_MODULUS
    assert int(answer) == eval(expression) % p  # pylint: disable=eval-used
    assert _nesting_depth(expression) == depth
    assert set(re.findall(r"\d+", expression)) <= {str(v) for v in range(p)}


@pytest.mark.parametrize("num_pairs", [1, 2, 9, 30])
def test_mqar_answer_is_the_dict_lookup(num_pairs):
  for prompt, answer in _examples("mqar", num_pairs):
    pairs, queries = re.fullmatch(r"(.*)\|(.*)=", prompt).groups()
    table = dict(item.split(":") for item in pairs.split(" "))
    assert len(table) == num_pairs  # keys are distinct
    keys = queries.split(" ")
    assert len(keys) == len(set(keys)) == min(num_pairs, tasks.MQAR_MAX_QUERIES)
    assert answer == "".join(table[k] for k in keys)


@pytest.mark.parametrize("length", [1, 5, 20])
def test_induction_answer_is_the_repeated_part(length):
  for prompt, answer in _examples("induction", length):
    first, rest = prompt.split("|")
    assert rest == "" and len(first) == length and answer == first and first.isalpha()


_LETTER = r"\b([A-Z])"


def _solve_deduction(prompt: str) -> tuple[list[str], list[tuple]]:
  """Every left-to-right order that satisfies the statements, by brute force; and statements."""
  statements = re.findall(_LETTER + r" is (left|right) of ([A-Z])\.", prompt)
  extremes = re.findall(_LETTER + r" is (leftmost|rightmost)\.", prompt)
  objects = sorted(set(re.findall(r"\) ([A-Z])\b", prompt)))

  def holds(order, facts, ends):
    at = {o: i for i, o in enumerate(order)}
    return (all((at[a] < at[b]) == (rel == "left") for a, rel, b in facts)
            and all(at[a] == (0 if rel == "leftmost" else len(order) - 1) for a, rel in ends))

  solutions = [order for order in itertools.permutations(objects)
               if holds(order, statements, extremes)]
  # Minimality: dropping any statement must admit a second order.
  for k in range(len(statements)):
    rest = statements[:k] + statements[k + 1:]
    assert sum(holds(o, rest, extremes) for o in itertools.permutations(objects)) > 1, prompt
  for k in range(len(extremes)):
    rest = extremes[:k] + extremes[k + 1:]
    assert sum(holds(o, statements, rest) for o in itertools.permutations(objects)) > 1, prompt
  return solutions, objects


@pytest.mark.parametrize("n", [3, 4, 5])
def test_deduction_is_unique_minimal_and_answered_right(n):
  words = {"leftmost": 0, "rightmost": n - 1, "2nd from the left": 1, "3rd from the left": 2,
           "4th from the left": 3}
  for prompt, answer in _examples("deduction", n, n=20):
    solutions, objects = _solve_deduction(prompt)
    assert len(objects) == n and len(solutions) == 1, prompt
    where = re.search(r"Which is (.*)\? \(a\)", prompt).group(1)
    choices = dict(re.findall(r"\(([a-z])\) ([A-Z])", prompt))
    assert sorted(choices) == list("abcdefg"[:n])
    assert choices[answer] == solutions[0][words[where]]
    # The asked position is never stated outright.
    assert not re.search(rf"{choices[answer]} is {where}\.", prompt)


def _reachable(edges: dict[str, list[str]], start: str) -> dict[str, int]:
  """BFS hop counts from start."""
  hops, queue = {start: 0}, collections.deque([start])
  while queue:
    node = queue.popleft()
    for child in edges[node]:
      if child not in hops:
        hops[child] = hops[node] + 1
        queue.append(child)
  return hops


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_prosqa_exactly_one_choice_is_reachable(depth):
  for prompt, answer in _examples("prosqa", depth):
    edges = collections.defaultdict(list)
    for a, b in re.findall(r"Every (\w+) is a (\w+)\.", prompt):
      edges[a].append(b)
    (person, start), = re.findall(r"(?:^|\. )([A-Z]\w+) is a (\w+)\.", prompt)
    asked, first, second = re.search(r"Is (\w+) a (\w+) or a (\w+)\?", prompt).groups()
    assert asked == person and answer in (first, second) and first != second
    hops = _reachable(edges, start)
    assert [c in hops for c in (first, second)].count(True) == 1
    assert answer in hops and hops[answer] == depth
    concepts = set(edges) | {b for children in edges.values() for b in children}
    assert len(concepts) == 3 * depth + 2


def test_difficulty_changes_the_structure():
  lengths = {d: np.mean([len(p) for p, _ in _examples("arithmetic", d)]) for d in (1, 3, 6)}
  assert lengths[1] < lengths[3] < lengths[6]
  for d in (1, 3, 6):
    assert {_nesting_depth(p) for p, _ in _examples("arithmetic", d)} == {d}
    assert {len(a) for _, a in _examples("induction", d)} == {d}
    assert {p.count(":") for p, _ in _examples("mqar", d)} == {d}
  for n in (3, 4, 5):
    assert {len(set(re.findall(r"\) ([A-Z])\b", p))) for p, _ in _examples("deduction", n)} == {n}


def test_chance_levels():
  assert chance("arithmetic", 5) == pytest.approx(1 / 7)
  assert chance("mqar", 1) == pytest.approx(0.1) and chance("mqar", 8) == pytest.approx(0.01)
  assert chance("induction", 2) == pytest.approx(1 / 26**2)
  assert chance("deduction", 5) == pytest.approx(0.2)
  assert chance("prosqa", 3) == 0.5
  assert set(TASKS) == set(TASK_NAMES) == {"arithmetic", "mqar", "induction", "deduction",
                                           "prosqa"}


def test_generation_is_deterministic_by_seed():
  for name in TASK_NAMES:
    d = TASKS[name].default_difficulty
    assert _examples(name, d, seed=3, n=5) == _examples(name, d, seed=3, n=5)
    assert _examples(name, d, seed=3, n=5) != _examples(name, d, seed=4, n=5)
  cfg = _cfg(name="deduction", difficulty=3, seq_len=128)
  tasks._splits.cache_clear()
  first = make_split(cfg, "train"), make_split(cfg, "test")
  tasks._splits.cache_clear()
  assert (make_split(cfg, "train"), make_split(cfg, "test")) == first
  assert make_split(cfg.replace(seed=1), "train") != first[0]


# --- tokens and weights -------------------------------------------------------------------------


@pytest.mark.parametrize("name", TASK_NAMES)
def test_weights_mark_exactly_the_answer_tokens(name):
  cfg = TaskConfig(name=name, seq_len=256, num_train=8, num_test=8, batch_size=4)
  examples = make_split(cfg, "test")
  batch = encode_examples(examples, cfg.seq_len)
  assert batch["inputs"].shape == batch["targets"].shape == batch["weights"].shape == (8, 256)
  assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  for (prompt, answer), inputs, targets, weights in zip(examples, batch["inputs"],
                                                        batch["targets"], batch["weights"]):
    assert inputs[0] == BYTE.bos_id
    assert BYTE.decode(inputs) == prompt + answer
    assert set(np.unique(weights)) <= {0.0, 1.0}
    scored = np.flatnonzero(weights)
    # One contiguous run, right after the prompt, decoding to the answer; EOS is unscored.
    np.testing.assert_array_equal(scored, len(prompt) + np.arange(len(answer)))
    assert BYTE.decode(targets[scored]) == answer
    assert targets[scored[-1] + 1] == BYTE.eos_id


def test_too_short_seq_len_raises_instead_of_truncating():
  examples = [("12345|", "12345")]
  encode_examples(examples, 12)  # BOS + 6 + 5 + EOS = 13 tokens = seq_len + 1
  with pytest.raises(ValueError, match=r"task.seq_len: 11 is too short.*needs seq_len >= 12"):
    encode_examples(examples, 11)
  with pytest.raises(ValueError, match=r"task.seq_len: 64 is too short"):
    make_test_batches(TaskConfig(name="prosqa", difficulty=2, seq_len=64, num_train=4,
                                 num_test=4))


# --- splits and batches ---------------------------------------------------------------------------


def test_train_and_test_never_share_a_prompt():
  # Depth 1 has only 7 * 7 * 3 = 147 prompts: without the rejection, collisions are certain.
  cfg = TaskConfig(name="arithmetic", difficulty=1, seq_len=16, num_train=300, num_test=30)
  train, test = make_split(cfg, "train"), make_split(cfg, "test")
  assert len(train) == 300 and len(test) == 30
  assert not {p for p, _ in train} & {p for p, _ in test}
  with pytest.raises(ValueError, match="task.num_test: 2000 test examples"):
    make_split(cfg.replace(num_test=2000, num_train=10), "train")


def test_train_batches_shapes_and_resume():
  cfg = _cfg()
  it = make_task_iterator(cfg)
  batch = next(it)
  assert set(batch) == {"inputs", "targets", "weights"}
  assert batch["inputs"].shape == (4, 32) and batch["weights"].dtype == np.float32
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(15)]  # crosses the epoch boundary (40 rows, 4 per batch)
  resumed = make_task_iterator(cfg)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_train_epoch_covers_the_split_and_processes_share_it():
  cfg = _cfg()
  encoded = encode_examples(make_split(cfg, "train"), cfg.seq_len)["inputs"]
  it = make_task_iterator(cfg)
  epoch = np.concatenate([next(it)["inputs"] for _ in range(10)])
  assert sorted(map(bytes, epoch)) == sorted(map(bytes, encoded))
  shards = [make_task_iterator(cfg, process_index=p, process_count=2) for p in range(2)]
  whole = make_task_iterator(cfg)
  for _ in range(3):
    rows = [next(s)["inputs"] for s in shards]
    assert rows[0].shape == (2, 32)
    np.testing.assert_array_equal(np.stack(rows, axis=1).reshape(4, 32), next(whole)["inputs"])
  with pytest.raises(ValueError, match="task.batch_size: global batch 4 is not divisible"):
    make_task_iterator(cfg, process_index=0, process_count=3)
  with pytest.raises(ValueError, match=r"process_index must be in \[0, 2\)"):
    make_task_iterator(cfg, process_index=2, process_count=2)


def test_test_batches_are_deterministic_and_padded_with_unscored_rows():
  cfg = _cfg(num_test=10, batch_size=4)
  batches = make_test_batches(cfg)
  assert [b["inputs"].shape for b in batches] == [(4, 32)] * 3
  assert not batches[-1]["weights"][2:].any() and batches[-1]["weights"][:2].any()
  for a, b in zip(batches, make_test_batches(cfg)):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])


# --- accuracy -------------------------------------------------------------------------------------


def _perfect_logits(batch) -> np.ndarray:
  return np.eye(BYTE.vocab_size, dtype=np.float32)[batch["targets"]]


def test_exact_match_on_crafted_logits():
  batch = make_test_batches(_cfg(num_test=10, batch_size=4))[-1]  # 2 real rows, 2 padding
  logits = _perfect_logits(batch)
  assert tuple(map(int, exact_match(logits, batch))) == (2, 2)
  wrong = logits.copy()
  t = int(np.flatnonzero(batch["weights"][0])[-1])  # the last answer token of example 0
  wrong[0, t] = np.roll(wrong[0, t], 1)
  assert tuple(map(int, exact_match(wrong, batch))) == (1, 2)
  unscored = logits.copy()
  unscored[1, 0] = np.roll(unscored[1, 0], 1)  # a prompt position: does not count
  unscored[0] = 0.0
  unscored[0, :, 0] = 1.0  # predicts byte 0 everywhere
  assert tuple(map(int, jax.jit(exact_match)(unscored, batch))) == (1, 2)


def test_evaluate_task_oracle_and_constant_predictors():
  cfg = _cfg(name="induction", difficulty=3, seq_len=16, num_test=10, batch_size=4)
  rows = encode_examples(make_split(cfg, "test"), cfg.seq_len)
  params = {"inputs": jnp.asarray(rows["inputs"]), "targets": jnp.asarray(rows["targets"])}

  def oracle(params, inputs_BxT):
    # Looks each row up among the test rows (padding rows copy row 0) and emits its targets.
    same_BxM = jnp.all(inputs_BxT[:, None, :] == params["inputs"][None], axis=-1)
    targets_BxT = params["targets"][jnp.argmax(same_BxM, axis=-1)]
    return jax.nn.one_hot(targets_BxT, BYTE.vocab_size)

  result = evaluate_task(oracle, params, cfg)
  assert result["accuracy"] == 1.0 and result["num_examples"] == 10
  assert result["chance"] == pytest.approx(26.0**-3) and 0 < result["majority"] <= 1

  def constant(params, inputs_BxT):
    del params
    return jnp.zeros(inputs_BxT.shape + (BYTE.vocab_size,))

  assert evaluate_task(constant, None, cfg)["accuracy"] == 0.0


# --- config ---------------------------------------------------------------------------------------


def test_config_defaults_and_from_dict():
  cfg = TaskConfig()
  assert (cfg.name, cfg.difficulty, cfg.seq_len, cfg.seed) == ("arithmetic", 3, 256, 0)
  assert TaskConfig(name="deduction").difficulty == 3
  cfg = TaskConfig.from_dict({"name": "prosqa", "difficulty": 2, "num_test": 5})
  assert cfg.name == "prosqa" and cfg.num_test == 5
  assert TaskConfig.from_dict(cfg.to_dict()) == cfg
  # Every task's default difficulty fits the default seq_len.
  for name in TASK_NAMES:
    make_test_batches(TaskConfig(name=name, num_train=4, num_test=16))


@pytest.mark.parametrize("values, message", [
    ({"name": "sudoku"}, r"task.name: unknown task 'sudoku'; choose from \('arithmetic'"),
    ({"difficulty": 0}, r"task.difficulty: arithmetic \(parenthesis nesting depth\) needs an"
                        r" integer >= 1, got 0"),
    ({"name": "deduction", "difficulty": 8}, r"task.difficulty: .* integer \[3, 7\], got 8"),
    ({"difficulty": 2.0}, "task.difficulty: "),
    ({"seq_len": 0}, "task.seq_len: must be a positive integer, got 0"),
    ({"num_train": -1}, "task.num_train: must be a positive integer"),
    ({"num_test": 0}, "task.num_test: must be a positive integer"),
    ({"batch_size": True}, "task.batch_size: must be a positive integer"),
    ({"seed": -1}, r"task.seed: must be an integer in \[0, 2\*\*32\)"),
])
def test_config_rejects_bad_values(values, message):
  with pytest.raises(ValueError, match=message):
    TaskConfig(**values)


def test_from_dict_rejects_unknown_keys_and_types():
  with pytest.raises(ValueError, match=r"task: unknown key\(s\) \['depth'\]"):
    TaskConfig.from_dict({"depth": 3})
  with pytest.raises(ValueError, match="task.seq_len: expected int, got str"):
    TaskConfig.from_dict({"seq_len": "64"})
  with pytest.raises(ValueError, match="task.name: unknown task"):
    generate_example("nope", np.random.default_rng(0), 1)


# --- training on a task (experiment `task` section) and `lime-jax eval --task` ------------------

TASK_RUN = ["model.D=32", "model.L=2", "model.H=2", "model.F=64", "model.T=32", "task.name=mqar",
            "task.difficulty=2", "task.seq_len=32", "task.num_train=64", "task.num_test=12",
            "task.batch_size=4", "optim.warmup_steps=2", "optim.total_steps=4", "run.log_every=1",
            "run.eval_every=2", "run.checkpoint_every=2", "run.progress=false",
            "run.tensorboard=false"]


@pytest.fixture(scope="module")
def task_runs(tmp_path_factory):
  from lime_jax.train.experiment import load_experiment  # pylint: disable=g-import-not-at-top
  from lime_jax.train.loop import train  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("task_runs")
  straight = load_experiment(None, [*TASK_RUN, "run.steps=4", f"run.out_dir={root / 'a'}"])
  train(straight)
  for steps in (2, 4):  # an interrupted run, resumed by a fresh Trainer
    train(load_experiment(None, [*TASK_RUN, f"run.steps={steps}", f"run.out_dir={root / 'b'}"]))
  return straight, root / "a", root / "b"


def test_task_training_logs_accuracy_and_resumes_exactly(task_runs):
  from lime_jax.train import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  from lime_jax.train import loop as train_lib  # pylint: disable=g-import-not-at-top
  from lime_jax.train.evaluate import apply_fn  # pylint: disable=g-import-not-at-top
  from lime_jax.train.metrics import read_metrics  # pylint: disable=g-import-not-at-top
  cfg, a, b = task_runs
  assert "task" in cfg.to_dict() and cfg.tokens_per_step == 4 * 32
  records_a, records_b = read_metrics(str(a)), read_metrics(str(b))
  assert records_a == [dict(r, tokens_per_s=q["tokens_per_s"], elapsed_s=q["elapsed_s"])
                       for r, q in zip(records_b, records_a)]  # timing aside, identical
  evals = [r for r in records_a if "val_loss" in r]
  assert [r["step"] for r in evals] == [2, 4]
  assert all(r["chance"] == chance("mqar", 2) == 0.01 for r in evals)
  init_fn = train_lib.jitted_fns(cfg.model, cfg.optim, cfg.run.seed)[0]
  state = ckpt.restore(ckpt.checkpoint_dir(str(a)), train_lib.abstract_state(init_fn)).state
  params = state["params"]
  result = evaluate_task(apply_fn(cfg.model), params, cfg.task)
  assert evals[-1]["val_accuracy"] == result["accuracy"]
  # val_loss is the answer-only loss over the whole test split (padding rows unscored).
  from lime_jax.train.loss import token_cross_entropy  # pylint: disable=g-import-not-at-top
  encoded = encode_examples(make_split(cfg.task, "test"), 32)
  nll_NxT = token_cross_entropy(apply_fn(cfg.model)(params, encoded["inputs"]),
                                jnp.asarray(encoded["targets"]))
  expected = float(jnp.sum(nll_NxT * encoded["weights"]) / encoded["weights"].sum())
  assert evals[-1]["val_loss"] == pytest.approx(expected, rel=1e-5)
  state_b = ckpt.restore(ckpt.checkpoint_dir(str(b)), train_lib.abstract_state(init_fn))
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(state_b.state)):
    assert np.array_equal(np.asarray(x), np.asarray(y))


def test_eval_task_reports_accuracy_beside_chance(task_runs, capsys):
  from lime_jax.cli.main import main  # pylint: disable=g-import-not-at-top
  from lime_jax.train.metrics import read_metrics  # pylint: disable=g-import-not-at-top
  _, a, _ = task_runs
  logged = read_metrics(str(a))[-1]
  assert main(["eval", "--checkpoint", str(a), "--task", "mqar"]) == 0
  line, result = capsys.readouterr().out.strip().splitlines()
  result = json.loads(result)
  assert result["accuracy"] == logged["val_accuracy"] and result["chance"] == 0.01
  assert result["num_examples"] == 12 and result["val_loss"] == pytest.approx(logged["val_loss"])
  assert line.startswith("mqar (difficulty 2): accuracy") and "chance 0.01" in line
  with pytest.raises(SystemExit):
    main(["eval", "--checkpoint", str(a), "--task", "mqar", "model.D=64"])
  assert "only data.* and task.* overrides" in capsys.readouterr().err


def test_experiment_task_section_is_optional_and_checked():
  from lime_jax.train.experiment import load_experiment  # pylint: disable=g-import-not-at-top
  text = load_experiment(None, ["model.T=32", "data.seq_len=32"])
  assert text.task is None and "task" not in text.to_dict()  # the text path is unchanged
  with pytest.raises(ValueError, match=r"model.T: 32 must be >= task.seq_len 64"):
    load_experiment(None, ["model.T=32", "task.name=mqar", "task.seq_len=64"])
  with pytest.raises(ValueError, match=r"data.tokenizer: tasks are byte-tokenized"):
    load_experiment(None, ["model.V=300", "task.name=mqar", "data.tokenizer=tok.json"])
  with pytest.raises(ValueError, match=r"task.name: unknown task 'nope'"):
    load_experiment(None, ["task.name=nope"])
