"""The one grain pipeline: in-memory rows -> shuffled, sharded, resumable batches; fixed eval batches.

A text corpus and a synthetic task differ only in their `Source`: which rows they hold, which of
them are evaluated, and how a stack of rows becomes a batch dict. Shuffling, per-process sharding,
batching and the checkpointable iterator state are written here once, so both resume alike.

Training: rows -> seed -> shuffle -> repeat (reshuffled every epoch) -> rows p, p + P, ... of the
global stream (process p of P) -> local batches of batch_size // P -> to_batch. The iterator's
`get_state()` is a small JSON dict ({"next_index": n}); `set_state` continues at the next batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import grain
import jax
import numpy as np

from lime_jax.config import require_positive_int

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class BatchFormat:
  """What a source's batches look like, known from its config alone (plan compiles from it)."""

  section: str  # the config section that owns the batches: "data" or "task"
  batch_size: int  # B: the GLOBAL batch
  seq_len: int  # T
  dtypes: tuple[tuple[str, str], ...]  # (field, dtype name); every field is [B, T]

  @property
  def batch_size_field(self) -> str:
    """The config key to name in batch-size errors."""
    return f"{self.section}.batch_size"

  def abstract_batch(self, sharding: Any = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global batch, for lowering a step without building data."""
    shape_BxT = (self.batch_size, self.seq_len)
    return {name: jax.ShapeDtypeStruct(shape_BxT, np.dtype(dtype), sharding=sharding)
            for name, dtype in self.dtypes}


class Source(Protocol):
  """Rows in memory and how they become batches; rows are built only when asked for."""

  @property
  def format(self) -> BatchFormat:
    """Section, global batch size, T and fields of the batches."""

  @property
  def seed(self) -> int:
    """The shuffle seed."""

  def train_rows(self) -> np.ndarray:
    """[N, ...]: one training example per row."""

  def eval_rows(self) -> tuple[np.ndarray, int]:
    """(rows [M, ...], batch size b): the fixed evaluation rows, M a multiple of b."""

  def to_batch(self, rows: np.ndarray) -> Batch:
    """A stack of rows [b, ...] -> {field: [b, T]}."""


def _check_shard(section: str, batch_size: int, process_index: Any, process_count: Any) -> None:
  """Process `process_index` of `process_count` can take an equal share of the global batch."""
  require_positive_int(f"{section}.process_count", process_count)
  if isinstance(process_index, bool) or not isinstance(process_index, int) or not (
      0 <= process_index < process_count):
    raise ValueError(
        f"{section}: process_index must be in [0, {process_count}), got {process_index!r}")
  if batch_size % process_count:
    raise ValueError(
        f"{section}.batch_size: global batch {batch_size} is not divisible by process_count"
        f" {process_count}")


def train_iterator(source: Source, *, process_index: int = 0,
                   process_count: int = 1) -> grain.DatasetIterator:
  """Endless local batches [batch_size // process_count, T] of `source`, shuffled by its seed.

  Process p reads rows p, p + P, p + 2P, ... of every global batch: its own disjoint share, the
  union being the single-process global batch.
  """
  fmt = source.format
  _check_shard(fmt.section, fmt.batch_size, process_index, process_count)
  ds = (grain.MapDataset.source(source.train_rows())
        .seed(source.seed)
        .shuffle()
        .repeat(None)  # reseeds the shuffle every epoch
        # Global row g*B + i belongs to process i % P: a strided slice, then a local batch.
        .slice(slice(process_index, None, process_count))
        # drop_remainder: an endless stream has none, and ceil(len / b) overflows at b = 1.
        .batch(fmt.batch_size // process_count, drop_remainder=True)
        .map(source.to_batch))
  # In-memory rows: threads would only contend for the GIL.
  options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  return iter(ds.to_iter_dataset(options))


def eval_batches(source: Source) -> list[Batch]:
  """The source's fixed evaluation rows, in order, cut into batches of one shape."""
  rows, b = source.eval_rows()
  if len(rows) % b:
    raise ValueError(f"{source.format.section}: {len(rows)} evaluation rows do not fill batches"
                     f" of {b}")
  return [source.to_batch(rows[i * b:(i + 1) * b]) for i in range(len(rows) // b)]

