"""The one grain pipeline and the one task-or-text switch: shapes, sharding, resume, errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from lime_jax.data import pipeline, sources
from lime_jax.data.tasks import TaskConfig, make_task_iterator, make_test_batches
from lime_jax.data.text import DataConfig, make_train_iterator, make_val_batches
from lime_jax.data.tokenizers import ByteTokenizer

BYTE = ByteTokenizer()
TEXT = DataConfig(seq_len=32, batch_size=4, val_batches=3)
TASK = TaskConfig(name="mqar", difficulty=4, seq_len=32, num_train=40, num_test=10, batch_size=4)


@dataclasses.dataclass(frozen=True)
class Counting:
  """A toy Source: row i is [i, i + 1, ...]; evaluation rows are the first `num_eval`."""

  num_rows: int = 10
  batch_size: int = 4
  seed: int = 0
  num_eval: int = 8
  eval_batch_size: int = 4

  @property
  def format(self) -> pipeline.BatchFormat:
    return pipeline.BatchFormat("toy", self.batch_size, 3, (("inputs", "int32"),))

  def train_rows(self) -> np.ndarray:
    return np.arange(self.num_rows, dtype=np.int32)[:, None] + np.arange(3, dtype=np.int32)

  def eval_rows(self) -> tuple[np.ndarray, int]:
    return self.train_rows()[:self.num_eval], self.eval_batch_size

  def to_batch(self, rows_BxT: np.ndarray) -> dict[str, np.ndarray]:
    return {"inputs": rows_BxT}


def _take(it, n: int) -> list[dict]:
  return [next(it) for _ in range(n)]


def _assert_batches_equal(got: list[dict], want: list[dict]) -> None:
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert sorted(g) == sorted(w)
    for key in w:
      assert g[key].dtype == w[key].dtype
      np.testing.assert_array_equal(g[key], w[key])


def test_epochs_cover_the_rows_and_processes_split_every_global_batch():
  source = Counting()
  whole = _take(pipeline.train_iterator(source), 5)  # 20 rows: two epochs of 10
  first = sorted(int(r) for b in whole for r in b["inputs"][:, 0])
  assert first == sorted(list(range(10)) * 2)
  shards = [_take(pipeline.train_iterator(source, process_index=p, process_count=2), 5)
            for p in range(2)]
  for g, (a, b) in enumerate(zip(*shards)):
    assert a["inputs"].shape == (2, 3)
    np.testing.assert_array_equal(np.stack([a["inputs"], b["inputs"]], 1).reshape(4, 3),
                                  whole[g]["inputs"])


def test_state_is_json_and_resumes_exactly():
  it = pipeline.train_iterator(Counting())
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 7)
  resumed = pipeline.train_iterator(Counting())
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 7), expected)


def test_shard_errors_name_the_section():
  with pytest.raises(ValueError, match="toy.batch_size: global batch 4 is not divisible by"
                     " process_count 3"):
    pipeline.train_iterator(Counting(), process_count=3)
  with pytest.raises(ValueError, match=r"toy: process_index must be in \[0, 2\), got 2"):
    pipeline.train_iterator(Counting(), process_index=2, process_count=2)
  with pytest.raises(ValueError, match="toy.process_count: must be a positive integer"):
    pipeline.train_iterator(Counting(), process_count=0)


def test_eval_batches_are_the_rows_in_order():
  batches = pipeline.eval_batches(Counting())
  assert [b["inputs"].shape for b in batches] == [(4, 3), (4, 3)]
  np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in batches])[:, 0],
                                np.arange(8))
  with pytest.raises(ValueError, match="toy: 7 evaluation rows do not fill batches of 4"):
    pipeline.eval_batches(Counting(num_eval=7))


@pytest.mark.parametrize("task", [None, TASK], ids=["text", "task"])
def test_the_switch_picks_the_task_else_the_text(task):
  source = sources.make_source(TEXT, task, BYTE)
  assert source.format == sources.batch_format(TEXT, task)
  assert source.format.section == ("task" if task else "data")
  assert source.format.batch_size_field == ("task.batch_size" if task else "data.batch_size")
  shard = {"process_index": 1, "process_count": 2}
  if task is None:
    want_train = _take(make_train_iterator(TEXT, BYTE, **shard), 3)
    want_eval = make_val_batches(TEXT, BYTE)
  else:
    want_train = _take(make_task_iterator(TASK, **shard), 3)
    want_eval = make_test_batches(TASK)
  _assert_batches_equal(_take(sources.train_iterator(TEXT, task, BYTE, **shard), 3), want_train)
  _assert_batches_equal(sources.eval_batches(TEXT, task, BYTE), want_eval)


@pytest.mark.parametrize("task", [None, TASK], ids=["text", "task"])
def test_abstract_batch_matches_real_batches(task):
  fmt = sources.batch_format(TEXT, task)
  abstract = fmt.abstract_batch()
  (batch,) = _take(sources.train_iterator(TEXT, task, BYTE), 1)
  assert sorted(abstract) == sorted(batch)
  for key, value in batch.items():
    assert (abstract[key].shape, abstract[key].dtype) == (value.shape, value.dtype)
  assert abstract["inputs"].shape == (fmt.batch_size, fmt.seq_len) == (4, 32)
  assert ("weights" in abstract) == (task is not None)
