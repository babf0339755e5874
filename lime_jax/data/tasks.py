"""Synthetic reasoning tasks: seeded generators, answer-only loss weights, exact-match accuracy.

Every example is a (prompt, answer) pair of ASCII text, tokenized with the byte tokenizer as
BOS prompt answer EOS and padded (with EOS) to seq_len + 1 tokens; then inputs = row[:-1],
targets = row[1:], and weights = 1 exactly where the target is an answer token (0 on the
prompt, the EOS and the padding), so the loss and the accuracy look at the answer only.

Tasks (`difficulty` is the knob; `chance` is the exact-match accuracy of uniform guessing):

- "arithmetic": "((3+4)*(2-5))%7=" -> "0". A fully parenthesized expression over the digits
  0..p-1 with + - *, p = 7. difficulty = the parenthesis nesting depth d (= operator-tree
  depth). A spine of d nested operators; each spine operator's other operand is a digit or a
  one-operator term, so the length grows linearly (at most 8d chars + "%7="), not as 2^d.
  chance = 1/p: the answer is one residue of p.
- "mqar": "ka:3 qz:1 mf:7|qz ka=" -> "17". Multi-query associative recall: n pairs of distinct
  two-letter keys and digit values, then q = min(n, 2) distinct queried keys; the answer is
  their values in order. difficulty = n. chance = 10^-q: every queried value is one digit of 10.
- "induction": "qwkzt|" -> "qwkzt". A random string of n lowercase letters, a separator, and
  the answer repeats it: after its first token every answer token is an induction step (find
  the earlier occurrence of the context, copy what followed). difficulty = n.
  chance = 26^-n: every answer token is one letter of 26.
- "deduction": "A is left of B. C is right of B. Which is leftmost? (a) C (b) A (c) B Answer: "
  -> "b". n objects (single capital letters) in a hidden left-to-right order; statements are
  "X is left of Y." / "X is right of Y." (anywhere left/right, not necessarily adjacent) and
  "X is leftmost." / "X is rightmost." (never for the asked position). Statements are added
  while they rule out orders, until one order remains, then pruned to a minimal set (each is
  needed), checked by brute force over all n! orders. The question asks the object at one
  position; the n objects are the choices. difficulty = n in [3, 7]. chance = 1/n.
- "prosqa": "Every bofa is a kelu. ... Tom is a bofa. Is Tom a ripo or a kelu? Answer: " ->
  "kelu". ProsQA-style reachability over a DAG of made-up concepts: a chain of d "Every X is
  a Y." hops from Tom's concept to the answer, a distractor chain of d hops elsewhere, d leaf
  concepts hung off both chains and max(1, d // 2) edges from the distractor chain into Tom's
  chain (edges never leave Tom's chain, so the distractor stays unreachable). 3d + 2 concepts,
  statements shuffled. difficulty = d (the answer is exactly d hops away). chance = 1/2.

Splits: the test split is drawn first, i.i.d. from its own seeded stream; the train split is
drawn from another stream, rejecting every prompt the test split holds, so the two never share
an example (the answer is a function of the prompt). `TaskSource` hands the encoded rows to the
one grain pipeline (pipeline.py: shuffled by seed, endless, resumable from a small JSON state);
test batches are fixed, the last one padded with zero-weight rows so that every batch has one
shape.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
import operator
import string
import zlib
from typing import Any, Callable, Mapping

import grain
import jax
import jax.numpy as jnp
import numpy as np

from lime_jax.config import ConfigSection, require_positive_int, require_seed
from lime_jax.data import pipeline
from lime_jax.data.tokenizers import ByteTokenizer

TOKENIZER = ByteTokenizer()
PAD_ID = TOKENIZER.eos_id  # padding is never scored, so any id would do
ARITHMETIC_MODULUS = 7
MQAR_NUM_VALUES = 10
MQAR_MAX_QUERIES = 2
_TEST_STREAM = 0x7E57  # keeps the splits' randomness apart from each other and from grain's
_TRAIN_STREAM = 0x7A17
_DRAWS_PER_TRAIN_EXAMPLE = 20  # rejection budget before declaring the test split too greedy

Example = tuple[str, str]  # (prompt, answer)


# ---------------------------------------------------------------------------------------------
# Generators: (rng, difficulty) -> (prompt, answer).


def _arithmetic(rng: np.random.Generator, depth: int, p: int = ARITHMETIC_MODULUS) -> Example:
  expression, value = _expression(rng, depth, p)
  return f"{expression}%{p}=", str(value)


def _expression(rng: np.random.Generator, depth: int, p: int) -> tuple[str, int]:
  """A parenthesized term of exactly `depth` nesting levels and its value mod p."""
  if depth == 0:
    value = int(rng.integers(p))
    return str(value), value
  deep = _expression(rng, depth - 1, p)
  # The off-spine operand is shallow (depth 0 or 1), keeping the length linear in depth.
  shallow = _expression(rng, int(rng.integers(min(depth, 2))), p)
  (a, va), (b, vb) = (deep, shallow) if rng.random() < 0.5 else (shallow, deep)
  op = "+-*"[int(rng.integers(3))]
  value = {"+": va + vb, "-": va - vb, "*": va * vb}[op] % p
  return f"({a}{op}{b})", value


_KEYS = [a + b for a in string.ascii_lowercase for b in string.ascii_lowercase]


def _mqar(rng: np.random.Generator, num_pairs: int) -> Example:
  keys = [_KEYS[i] for i in rng.choice(len(_KEYS), num_pairs, replace=False)]
  values = rng.integers(MQAR_NUM_VALUES, size=num_pairs)
  queried = rng.choice(num_pairs, min(num_pairs, MQAR_MAX_QUERIES), replace=False)
  pairs = " ".join(f"{k}:{v}" for k, v in zip(keys, values))
  queries = " ".join(keys[i] for i in queried)
  return f"{pairs}|{queries}=", "".join(str(values[i]) for i in queried)


def _induction(rng: np.random.Generator, length: int) -> Example:
  letters = "".join(string.ascii_lowercase[i] for i in rng.integers(26, size=length))
  return f"{letters}|", letters


@functools.lru_cache(maxsize=None)
def _order_sets(n: int) -> tuple[list[list[int]], list[list[int]]]:
  """Sets of the n! left-to-right orders of n objects, as bitmasks (bit p: order p).

  before[a][b]: the orders with a left of b; at[a][k]: the orders with a at position k.
  Python ints make intersecting and counting candidate orders a few machine operations.
  """
  positions_PxN = np.array(list(itertools.permutations(range(n))))  # [p, i]: where i stands

  def bits(mask_P: np.ndarray) -> int:
    return int.from_bytes(np.packbits(mask_P, bitorder="little").tobytes(), "little")

  before = [[bits(positions_PxN[:, a] < positions_PxN[:, b]) for b in range(n)]
            for a in range(n)]
  at = [[bits(positions_PxN[:, a] == k) for k in range(n)] for a in range(n)]
  return before, at


def _ordinal(k: int) -> str:
  return {1: "1st", 2: "2nd", 3: "3rd"}.get(k, f"{k}th")


def _deduction(rng: np.random.Generator, n: int) -> Example:
  names = [string.ascii_uppercase[i] for i in rng.choice(26, n, replace=False)]
  order = [int(o) for o in rng.permutation(n)]  # order[k]: the object at position k
  position = {o: k for k, o in enumerate(order)}
  asked = int(rng.integers(n))
  before, at = _order_sets(n)
  pool = []  # (statement, the orders where it holds)
  for i, j in itertools.combinations(range(n), 2):
    a, b = (i, j) if position[i] < position[j] else (j, i)  # a is left of b
    text = (f"{names[a]} is left of {names[b]}." if rng.random() < 0.5
            else f"{names[b]} is right of {names[a]}.")
    pool.append((text, before[a][b]))
  # An absolute statement about the asked position would give the answer away.
  if asked != 0:
    pool.append((f"{names[order[0]]} is leftmost.", at[order[0]][0]))
  if asked != n - 1:
    pool.append((f"{names[order[-1]]} is rightmost.", at[order[-1]][n - 1]))
  everything = (1 << math.factorial(n)) - 1
  chosen, alive = [], everything
  for k in rng.permutation(len(pool)):
    if alive & pool[k][1] != alive:  # only statements that rule something out
      chosen.append(int(k))
      alive &= pool[k][1]
    if alive.bit_count() == 1:
      break
  # Prune to a minimal set: drop any statement the others make redundant.
  for k in [int(k) for k in rng.permutation(chosen)]:
    rest = [c for c in chosen if c != k]
    if functools.reduce(operator.and_, (pool[c][1] for c in rest), everything).bit_count() == 1:
      chosen = rest
  statements = " ".join(pool[k][0] for k in rng.permutation(chosen))
  where = ("leftmost" if asked == 0 else "rightmost" if asked == n - 1
           else f"{_ordinal(asked + 1)} from the left")
  shown = [int(o) for o in rng.permutation(n)]
  choices = " ".join(f"({string.ascii_lowercase[c]}) {names[o]}" for c, o in enumerate(shown))
  answer = string.ascii_lowercase[shown.index(order[asked])]
  return f"{statements} Which is {where}? {choices} Answer: ", answer


_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_SYLLABLES = [c + v for c in _CONSONANTS for v in _VOWELS]
_PEOPLE = ("Tom", "Ann", "Bob", "Eva", "Max", "Sam", "Zoe", "Ian")


def _prosqa(rng: np.random.Generator, depth: int) -> Example:
  num_syllables = len(_SYLLABLES)
  ids = rng.choice(num_syllables**2, 3 * depth + 2, replace=False)
  # Two consonant-vowel syllables: pronounceable, and "a" is always the right article.
  names = [_SYLLABLES[i // num_syllables] + _SYLLABLES[i % num_syllables] for i in ids]
  main, decoy, leaves = names[:depth + 1], names[depth + 1:2 * depth + 2], names[2 * depth + 2:]
  edges = [(main[i], main[i + 1]) for i in range(depth)]
  edges += [(decoy[i], decoy[i + 1]) for i in range(depth)]
  inner = main + decoy
  edges += [(inner[int(rng.integers(len(inner)))], leaf) for leaf in leaves]
  cross = set()
  while len(cross) < max(1, depth // 2):  # into Tom's chain only: the decoy stays unreachable
    cross.add((decoy[int(rng.integers(depth + 1))], main[int(rng.integers(1, depth + 1))]))
  edges += sorted(cross)
  person = _PEOPLE[int(rng.integers(len(_PEOPLE)))]
  statements = [f"Every {a} is a {b}." for a, b in edges] + [f"{person} is a {main[0]}."]
  statements = [statements[k] for k in rng.permutation(len(statements))]
  first, second = (main[-1], decoy[-1]) if rng.random() < 0.5 else (decoy[-1], main[-1])
  return f"{' '.join(statements)} Is {person} a {first} or a {second}? Answer: ", main[-1]


# ---------------------------------------------------------------------------------------------
# Registry.


@dataclasses.dataclass(frozen=True)
class Task:
  """A generator with its difficulty range and chance accuracy; call it like the generator."""

  name: str
  generate: Callable[[np.random.Generator, int], Example]
  chance: Callable[[int], float]  # difficulty -> exact-match accuracy of uniform guessing
  knob: str  # what difficulty measures
  min_difficulty: int
  max_difficulty: int | None  # None: bounded only by seq_len
  default_difficulty: int

  def __call__(self, rng: np.random.Generator, difficulty: int) -> Example:
    return self.generate(rng, difficulty)


TASKS: dict[str, Task] = {
    "arithmetic": Task("arithmetic", _arithmetic, lambda d: 1 / ARITHMETIC_MODULUS,
                       "parenthesis nesting depth", 1, None, 3),
    "mqar": Task("mqar", _mqar,
                 lambda d: float(MQAR_NUM_VALUES) ** -min(d, MQAR_MAX_QUERIES),
                 "number of key-value pairs", 1, len(_KEYS), 8),
    "induction": Task("induction", _induction, lambda d: 26.0**-d,
                      "length of the repeated string", 1, None, 16),
    "deduction": Task("deduction", _deduction, lambda d: 1 / d, "number of objects", 3, 7, 3),
    "prosqa": Task("prosqa", _prosqa, lambda d: 1 / 2, "hops from Tom to the answer", 1, None, 2),
}
TASK_NAMES = tuple(TASKS)


def _task(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"task.name: unknown task {name!r}; choose from {TASK_NAMES}")
  return TASKS[name]


def _check_difficulty(task: Task, difficulty: Any) -> None:
  hi = task.max_difficulty
  if (isinstance(difficulty, bool) or not isinstance(difficulty, int)
      or difficulty < task.min_difficulty or (hi is not None and difficulty > hi)):
    bound = f"[{task.min_difficulty}, {hi}]" if hi is not None else f">= {task.min_difficulty}"
    raise ValueError(
        f"task.difficulty: {task.name} ({task.knob}) needs an integer {bound}, got {difficulty!r}")


def generate_example(name: str, rng: np.random.Generator, difficulty: int) -> Example:
  """One (prompt, answer) of task `name`, drawn from `rng`."""
  task = _task(name)
  _check_difficulty(task, difficulty)
  return task(rng, difficulty)


def chance(name: str, difficulty: int) -> float:
  """Exact-match accuracy of guessing uniformly (see the module docstring for each task)."""
  task = _task(name)
  _check_difficulty(task, difficulty)
  return float(task.chance(difficulty))


# ---------------------------------------------------------------------------------------------
# Config.


@dataclasses.dataclass(frozen=True)
class TaskConfig(ConfigSection):
  section = "task"

  name: str = "arithmetic"
  difficulty: int | None = None  # None: the task's default_difficulty
  seq_len: int = 256  # T: BOS + prompt + answer + EOS must fit in T + 1 tokens
  num_train: int = 20_000
  num_test: int = 1_000
  seed: int = 0  # splits and shuffle
  batch_size: int = 32  # GLOBAL batch, split evenly over processes

  def __post_init__(self):
    if not isinstance(self.name, str):
      raise ValueError(f"task.name: expected a string, got {self.name!r}")
    task = _task(self.name)
    if self.difficulty is None:
      object.__setattr__(self, "difficulty", task.default_difficulty)
    _check_difficulty(task, self.difficulty)
    for name in ("seq_len", "num_train", "num_test", "batch_size"):
      _require_positive_int(name, getattr(self, name))
    require_seed("task.seed", self.seed)


def _require_positive_int(name: str, value: Any) -> None:
  require_positive_int(f"task.{name}", value)


# ---------------------------------------------------------------------------------------------
# Splits and tokens.


def make_split(cfg: TaskConfig, split: str) -> tuple[Example, ...]:
  """The (prompt, answer) pairs of split "train" or "test"; no prompt is in both."""
  if split not in ("train", "test"):
    raise ValueError(f"task: split must be 'train' or 'test', got {split!r}")
  train, test = _splits(cfg.name, cfg.difficulty, cfg.seed, cfg.num_train, cfg.num_test)
  return train if split == "train" else test


@functools.lru_cache(maxsize=8)
def _splits(name: str, difficulty: int, seed: int, num_train: int,
            num_test: int) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
  task = TASKS[name]
  name_id = zlib.crc32(name.encode())  # stable across runs, unlike hash()
  test_rng = np.random.default_rng([seed, _TEST_STREAM, name_id])
  test = tuple(task(test_rng, difficulty) for _ in range(num_test))
  held_out = {prompt for prompt, _ in test}
  train_rng = np.random.default_rng([seed, _TRAIN_STREAM, name_id])
  train = []
  for _ in range(_DRAWS_PER_TRAIN_EXAMPLE * num_train + 1000):
    example = task(train_rng, difficulty)
    if example[0] not in held_out:
      train.append(example)
      if len(train) == num_train:
        return tuple(train), test
  raise ValueError(
      f"task.num_test: {num_test} test examples ({len(held_out)} distinct) leave too few unseen"
      f" {name} examples at difficulty {difficulty} to draw {num_train} training examples;"
      " lower num_test or raise difficulty")


def encode_examples(examples: tuple[Example, ...] | list[Example],
                    seq_len: int) -> dict[str, np.ndarray]:
  """{"inputs", "targets": int32 [N, T], "weights": float32 [N, T]}, weights 1 on answers."""
  rows_Nx3xT = _encode(examples, seq_len)
  return _to_batch(rows_Nx3xT)


def _encode(examples, seq_len: int) -> np.ndarray:
  """int32 [N, 3, T]: inputs, targets, weights stacked (one array for grain to index)."""
  prompts = TOKENIZER.encode_batch([p for p, _ in examples])
  answers = TOKENIZER.encode_batch([a for _, a in examples])
  lengths_N = np.array([p.size + a.size + 2 for p, a in zip(prompts, answers)], np.int64)
  if len(examples) and lengths_N.max() > seq_len + 1:
    k = int(lengths_N.argmax())
    raise ValueError(
        f"task.seq_len: {seq_len} is too short: example {k} needs seq_len >= {lengths_N[k] - 1}"
        f" (BOS + {prompts[k].size} prompt + {answers[k].size} answer + EOS tokens); answers are"
        " never truncated")
  rows_NxT1 = np.full((len(examples), seq_len + 1), PAD_ID, np.int32)
  weights_NxT = np.zeros((len(examples), seq_len), np.int32)
  for i, (prompt, answer) in enumerate(zip(prompts, answers)):
    n_p, n_a = prompt.size, answer.size
    rows_NxT1[i, 0] = TOKENIZER.bos_id
    rows_NxT1[i, 1:1 + n_p] = prompt
    rows_NxT1[i, 1 + n_p:1 + n_p + n_a] = answer
    rows_NxT1[i, 1 + n_p + n_a] = TOKENIZER.eos_id
    # targets[t] = row[t + 1]: answer token k (row index 1 + n_p + k) is target n_p + k.
    weights_NxT[i, n_p:n_p + n_a] = 1
  return np.stack([rows_NxT1[:, :-1], rows_NxT1[:, 1:], weights_NxT], axis=1)


def _to_batch(rows_Bx3xT: np.ndarray) -> dict[str, np.ndarray]:
  return {"inputs": rows_Bx3xT[:, 0], "targets": rows_Bx3xT[:, 1],
          "weights": rows_Bx3xT[:, 2].astype(np.float32)}


@functools.lru_cache(maxsize=8)
def _encoded(cfg: TaskConfig, split: str) -> np.ndarray:
  rows_Nx3xT = _encode(make_split(cfg, split), cfg.seq_len)
  rows_Nx3xT.setflags(write=False)  # shared by every caller of the cache
  return rows_Nx3xT


def _encoded_split(cfg: TaskConfig, split: str) -> np.ndarray:
  # Batch size does not change the tokens: one cache entry serves every batch size.
  return _encoded(cfg.replace(batch_size=1), split)


# ---------------------------------------------------------------------------------------------
# Batches.


def batch_format(cfg: TaskConfig) -> pipeline.BatchFormat:
  """{"inputs", "targets": int32, "weights": float32}, each [batch_size, seq_len]."""
  return pipeline.BatchFormat("task", cfg.batch_size, cfg.seq_len,
                              (("inputs", "int32"), ("targets", "int32"), ("weights", "float32")))


@dataclasses.dataclass(frozen=True)
class TaskSource:
  """The task as a pipeline.Source: rows are [3, T] stacks of inputs, targets and weights."""

  cfg: TaskConfig

  @property
  def format(self) -> pipeline.BatchFormat:
    return batch_format(self.cfg)

  @property
  def seed(self) -> int:
    return self.cfg.seed

  def train_rows(self) -> np.ndarray:
    return _encoded_split(self.cfg, "train")

  def eval_rows(self) -> tuple[np.ndarray, int]:
    """Every test row, the last batch filled up with zero-weight rows (one shape, one compile)."""
    rows_Mx3xT = _encoded_split(self.cfg, "test")
    B = self.cfg.batch_size
    pad = -len(rows_Mx3xT) % B
    if pad:
      filler_Px3xT = np.repeat(rows_Mx3xT[:1], pad, axis=0)
      filler_Px3xT[:, 2] = 0
      rows_Mx3xT = np.concatenate([rows_Mx3xT, filler_Px3xT])
    return rows_Mx3xT, B

  def to_batch(self, rows_Bx3xT: np.ndarray) -> dict[str, np.ndarray]:
    return _to_batch(rows_Bx3xT)


def make_task_iterator(cfg: TaskConfig, *, process_index: int = 0,
                       process_count: int = 1) -> grain.DatasetIterator:
  """Endless training batches {"inputs", "targets", "weights"}: [batch_size // process_count, T].

  Shuffled by `cfg.seed`, differently (and deterministically) every epoch; `get_state()` is a
  small JSON-serializable dict and `set_state` resumes exactly. Process p reads rows p, p + P,
  ... of every global batch.
  """
  return pipeline.train_iterator(TaskSource(cfg), process_index=process_index,
                                 process_count=process_count)


def make_test_batches(cfg: TaskConfig) -> list[dict[str, np.ndarray]]:
  """Every test example, in order, in [batch_size, T] batches.

  The last batch is filled up with zero-weight rows (one shape, one compile); exact_match does
  not count rows without answer tokens.
  """
  return pipeline.eval_batches(TaskSource(cfg))


# ---------------------------------------------------------------------------------------------
# Accuracy.


def exact_match(logits_BxTxV: jax.Array, batch: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
  """(num_correct, num_examples), int32 scalars; jit-able.

  Teacher-forced greedy exact match: an example is correct iff the argmax prediction equals the
  target at every position of weight > 0. Rows with no such position are not examples.
  """
  predictions_BxT = jnp.argmax(logits_BxTxV, axis=-1)
  scored_BxT = jnp.asarray(batch["weights"]) > 0
  wrong_B = jnp.any(scored_BxT & (predictions_BxT != jnp.asarray(batch["targets"])), axis=-1)
  counted_B = jnp.any(scored_BxT, axis=-1)
  num_correct = jnp.sum(counted_B & ~wrong_B, dtype=jnp.int32)
  return num_correct, jnp.sum(counted_B, dtype=jnp.int32)


@functools.lru_cache(maxsize=8)
def _jit_counts(apply_fn: Callable[[Any, jax.Array], jax.Array]):
  # Cached per apply_fn: repeated evaluations (an in-loop eval hook) compile once.
  return jax.jit(lambda params, batch: exact_match(apply_fn(params, batch["inputs"]), batch))


def evaluate_task(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
                  cfg: TaskConfig) -> dict[str, float | int]:
  """Exact-match accuracy on the whole test split, beside two baselines.

  apply_fn(params, inputs_BxT) -> logits_BxTxV. "chance" is uniform guessing; "majority" is
  always answering the test split's most common answer (above chance when answers are skewed,
  e.g. 0 under multiplication mod p).
  """
  counts = _jit_counts(apply_fn)
  num_correct = num_examples = 0
  for batch in make_test_batches(cfg):
    c, n = counts(params, batch)
    num_correct, num_examples = num_correct + c, num_examples + n  # on device: no stall
  num_correct, num_examples = int(num_correct), int(num_examples)
  answers = collections.Counter(answer for _, answer in make_split(cfg, "test"))
  majority = answers.most_common(1)[0][1] / num_examples
  return {"accuracy": num_correct / num_examples, "chance": chance(cfg.name, cfg.difficulty),
          "majority": majority, "num_examples": num_examples}
