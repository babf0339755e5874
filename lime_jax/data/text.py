"""Text corpora -> packed token sequences -> shuffled, sharded, checkpointable batches.

Pipeline: documents (list[str]) -> split by document (seeded permutation, `val_fraction`) ->
each document tokenized and wrapped as BOS doc EOS -> concatenated per split -> cut into
sequences of T+1 tokens (the remainder is dropped) -> inputs = seq[:-1], targets = seq[1:].

Sources ("data.source"):
- "embedded": the standard library's `pydoc_data.topics` (79 topics, ~465k characters of English),
  one document per topic, sorted by key. No download; the default.
- "text": a .txt file, or every *.txt under a directory (sorted). `text_documents` says where a
  document ends: "file" (the default: a whole file is one document), "line" (one per line, as in
  news or wiki dumps) or "blank_line" (blocks separated by blank lines). Empty documents are
  skipped; line ends are read as "\n".
- "jsonl": a file or directory of *.jsonl; one document per line, in field `text_field`.
- "parquet": a file or directory of *.parquet; one document per row of column `text_field`.
- "fineweb": FineWeb-Edu. A local directory of downloaded *.parquet shards, or a Hugging Face
  dataset id (e.g. "HuggingFaceFW/fineweb-edu") streamed with `datasets` (then `max_documents`
  is required).

`TextSource` hands the packed sequences to the one grain pipeline (pipeline.py): shuffled,
sharded over processes, resumable from a small JSON state. Validation batches are the first
`val_batches` full global batches of the held-out sequences.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import re
from typing import Any

import grain
import numpy as np

from lime_jax.config import ConfigSection, require_positive_int, require_seed
from lime_jax.data import pipeline
from lime_jax.data.tokenizers import Tokenizer

SOURCES = ("embedded", "text", "jsonl", "parquet", "fineweb")
TEXT_DOCUMENTS = ("file", "line", "blank_line")  # where a "text" source's documents end
_BLANK_LINE = re.compile(r"\n(?:[^\S\n]*\n)+")  # one or more lines of nothing but white space
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SPLIT_STREAM = 0x5EED  # keeps the split's randomness apart from grain's shuffle seeds


@dataclasses.dataclass(frozen=True)
class DataConfig(ConfigSection):
  section = "data"

  source: str = "embedded"
  path: str | None = None  # file, directory or (fineweb) HF dataset id; unused by "embedded"
  text_field: str = "text"  # JSONL key / Parquet column
  text_documents: str = "file"  # "text" source: one document per file, line or blank_line block
  tokenizer: str = "byte"  # "byte" or a path to tokenizer.json
  seq_len: int = 256  # T: tokens per training example (sequences hold T + 1)
  batch_size: int = 8  # GLOBAL batch, split evenly over processes
  val_fraction: float = 0.05  # fraction of documents held out
  seed: int = 0  # split and shuffle
  val_batches: int = 8  # at most this many validation batches
  fineweb_name: str | None = None  # HF config name, e.g. "sample-10BT"
  max_documents: int | None = None  # keep the first N documents (bounds HF streaming)

  def __post_init__(self):
    if self.source not in SOURCES:
      raise ValueError(f"data.source: unknown source {self.source!r}; choose from {SOURCES}")
    if self.source == "embedded":
      if self.path is not None:
        raise ValueError(f"data.path: not used by source 'embedded', got {self.path!r}")
    elif not isinstance(self.path, str) or not self.path:
      raise ValueError(f"data.path: required for source {self.source!r}, got {self.path!r}")
    if self.text_documents not in TEXT_DOCUMENTS:
      raise ValueError(f"data.text_documents: must be one of {TEXT_DOCUMENTS}, got"
                       f" {self.text_documents!r}")
    if self.text_documents != "file" and self.source != "text":
      raise ValueError(f"data.text_documents: only used by source 'text', got {self.source!r}")
    for name in ("text_field", "tokenizer"):
      if not isinstance(getattr(self, name), str) or not getattr(self, name):
        raise ValueError(f"data.{name}: must be a non-empty string, got {getattr(self, name)!r}")
    for name in ("seq_len", "batch_size", "val_batches"):
      _require_positive_int(name, getattr(self, name))
    if self.max_documents is not None:
      _require_positive_int("max_documents", self.max_documents)
    if (isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float))
        or not 0 <= self.val_fraction < 1):
      raise ValueError(f"data.val_fraction: must be in [0, 1), got {self.val_fraction!r}")
    require_seed("data.seed", self.seed)
    if self.fineweb_name is not None and self.source != "fineweb":
      raise ValueError(f"data.fineweb_name: only used by source 'fineweb', got {self.source!r}")


def _require_positive_int(name: str, value: Any) -> None:
  require_positive_int(f"data.{name}", value)


# ---------------------------------------------------------------------------------------------
# Documents.


def load_documents(cfg: DataConfig) -> list[str]:
  """All documents of the corpus (train + validation), in a deterministic order."""
  loader = {"embedded": _embedded, "text": _text, "jsonl": _jsonl, "parquet": _parquet,
            "fineweb": _fineweb}[cfg.source]
  docs = loader(cfg)
  if cfg.max_documents is not None:
    docs = docs[:cfg.max_documents]
  if not docs:
    raise ValueError(f"data: corpus at {_where(cfg)} has no documents")
  return docs


def _where(cfg: DataConfig) -> str:
  return "pydoc_data.topics" if cfg.source == "embedded" else str(cfg.path)


def _embedded(cfg: DataConfig) -> list[str]:
  del cfg
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  return [topics[key] for key in sorted(topics)]


def _files(cfg: DataConfig, suffix: str) -> list[str]:
  path = os.path.expanduser(cfg.path)
  if os.path.isfile(path):
    return [path]
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "**", f"*{suffix}"), recursive=True))
    if not files:
      raise ValueError(f"data.path: no *{suffix} files in directory {path}")
    return files
  raise ValueError(f"data.path: no such file or directory: {path}")


def _utf8(raw: bytes, path: str, offset: int = 0) -> str:
  """`raw` (found at byte `offset` of `path`) as text; a ValueError naming file and byte if it
  is not UTF-8."""
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as err:
    raise ValueError(
        f"data.path: {path}: not UTF-8 at byte offset {offset + err.start} ({err.reason});"
        " convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def split_text(text: str, text_documents: str) -> list[str]:
  """One file's documents: all of it, its non-empty lines, or its blank-line-separated blocks."""
  text = text.replace("\r\n", "\n").replace("\r", "\n")  # as text-mode reading did
  if text_documents == "file":
    return [text]
  parts = text.split("\n") if text_documents == "line" else _BLANK_LINE.split(text)
  return [part.strip("\n") for part in parts if part.strip()]


def _text(cfg: DataConfig) -> list[str]:
  docs = []
  for f in _files(cfg, ".txt"):
    with open(f, "rb") as fh:
      docs.extend(split_text(_utf8(fh.read(), f), cfg.text_documents))
    if cfg.max_documents is not None and len(docs) >= cfg.max_documents:
      break
  return docs


def _utf8_lines(path: str):
  """(line number, line) of a file read as bytes, so that a decoding error names its offset."""
  offset = 0
  with open(path, "rb") as fh:
    for line_no, raw in enumerate(fh, start=1):
      yield line_no, _utf8(raw, path, offset)
      offset += len(raw)


def _jsonl(cfg: DataConfig) -> list[str]:
  docs = []
  for f in _files(cfg, ".jsonl"):
    for line_no, line in _utf8_lines(f):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"data.path: {f}:{line_no}: invalid JSON ({e.msg})") from None
      text = record.get(cfg.text_field) if isinstance(record, dict) else None
      if not isinstance(text, str):
        raise ValueError(
            f"data.text_field: {f}:{line_no}: no string field {cfg.text_field!r}")
      docs.append(text)
      if cfg.max_documents is not None and len(docs) >= cfg.max_documents:
        return docs
  return docs


def _parquet(cfg: DataConfig) -> list[str]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  docs = []
  for f in _files(cfg, ".parquet"):
    pf = pq.ParquetFile(f)
    if cfg.text_field not in pf.schema_arrow.names:
      raise ValueError(
          f"data.text_field: column {cfg.text_field!r} not in {f}; columns: {pf.schema_arrow.names}")
    # Row batches, so that max_documents stops early on large FineWeb shards.
    for batch in pf.iter_batches(columns=[cfg.text_field]):
      docs.extend(t for t in batch.column(0).to_pylist() if t is not None)
      if cfg.max_documents is not None and len(docs) >= cfg.max_documents:
        return docs[:cfg.max_documents]
  return docs


def _fineweb(cfg: DataConfig) -> list[str]:
  if os.path.exists(os.path.expanduser(cfg.path)):
    return _parquet(cfg)
  if not _HF_ID.match(cfg.path):
    raise ValueError(
        f"data.path: no such file or directory: {cfg.path} (nor is it a Hugging Face dataset id)")
  if cfg.max_documents is None:
    raise ValueError(
        f"data.max_documents: required to stream {cfg.path}, which is not a local directory,"
        " from the Hugging Face hub (the documents are held in memory)")
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(
        f"data.path: {cfg.path} is not a local directory; streaming it as a Hugging Face dataset"
        " needs the `datasets` library (pip install datasets)") from None
  stream = datasets.load_dataset(cfg.path, name=cfg.fineweb_name, split="train", streaming=True)
  docs = []
  for record in stream:
    docs.append(record[cfg.text_field])
    if len(docs) >= cfg.max_documents:
      break
  return docs


def split_documents(n_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Sorted document indices of (train, val): a seeded permutation, the first share held out."""
  if val_fraction > 0 and n_docs < 2:
    raise ValueError(
        f"data.val_fraction: {n_docs} document cannot be split into train and validation;"
        " use more documents (a directory of files; a text file read with"
        " data.text_documents=line or blank_line: one document per line or per blank-line"
        " separated block; data.text_documents=file, the default, reads a file as one) or"
        " val_fraction=0")
  # A positive fraction holds out at least one document and keeps at least one for training.
  n_val = 0 if val_fraction == 0 else min(max(round(val_fraction * n_docs), 1), n_docs - 1)
  perm = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n_docs)
  return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# ---------------------------------------------------------------------------------------------
# Tokens.


def pack_documents(token_docs: list[np.ndarray], bos_id: int, eos_id: int,
                   seq_len: int) -> np.ndarray:
  """BOS doc EOS, concatenated, cut into rows of seq_len + 1; the final remainder is dropped."""
  if not token_docs:
    return np.zeros((0, seq_len + 1), np.int32)
  bos, eos = np.array([bos_id], np.int32), np.array([eos_id], np.int32)
  stream_S = np.concatenate([part for doc in token_docs for part in (bos, doc, eos)])
  n = stream_S.size // (seq_len + 1)
  return stream_S[:n * (seq_len + 1)].reshape(n, seq_len + 1).astype(np.int32)


def build_token_sequences(cfg: DataConfig, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """(train_seqs_NxT1, val_seqs_MxT1), int32, T1 = seq_len + 1; split by document, then packed.

  Cached per (corpus settings, tokenizer): the iterator, validation batches and entropy bar of one
  run tokenize once. The arrays are read-only for that reason.
  """
  try:
    hash(tokenizer)
  except TypeError:
    return _build_token_sequences(cfg, tokenizer)
  # Batch settings do not change the tokens: one cache entry serves every batch size.
  return _cached_sequences(cfg.replace(batch_size=1, val_batches=1, tokenizer="-"), tokenizer)


@functools.lru_cache(maxsize=4)
def _cached_sequences(cfg: DataConfig, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  return _build_token_sequences(cfg, tokenizer)


def _build_token_sequences(cfg: DataConfig, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  docs = load_documents(cfg)
  train_idx, val_idx = split_documents(len(docs), cfg.val_fraction, cfg.seed)
  token_docs = [np.asarray(ids, np.int32) for ids in tokenizer.encode_batch(docs)]
  pack = functools.partial(pack_documents, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                           seq_len=cfg.seq_len)
  train_seqs_NxT1 = pack([token_docs[i] for i in train_idx])
  val_seqs_MxT1 = pack([token_docs[i] for i in val_idx])
  if len(train_seqs_NxT1) == 0:
    n_tokens = sum(token_docs[i].size + 2 for i in train_idx)
    raise ValueError(
        f"data: corpus at {_where(cfg)} has {n_tokens} training tokens, fewer than one sequence"
        f" of {cfg.seq_len + 1}")
  for a in (train_seqs_NxT1, val_seqs_MxT1):
    a.setflags(write=False)
  return train_seqs_NxT1, val_seqs_MxT1


def _to_example(seqs_BxT1: np.ndarray) -> dict[str, np.ndarray]:
  return {"inputs": seqs_BxT1[:, :-1], "targets": seqs_BxT1[:, 1:]}


# ---------------------------------------------------------------------------------------------
# Batches.


def batch_format(cfg: DataConfig) -> pipeline.BatchFormat:
  """{"inputs", "targets"}: int32 [batch_size, seq_len]."""
  return pipeline.BatchFormat("data", cfg.batch_size, cfg.seq_len,
                              (("inputs", "int32"), ("targets", "int32")))


@dataclasses.dataclass(frozen=True)
class TextSource:
  """The corpus as a pipeline.Source: rows are packed sequences of seq_len + 1 tokens."""

  cfg: DataConfig
  tokenizer: Tokenizer

  @property
  def format(self) -> pipeline.BatchFormat:
    return batch_format(self.cfg)

  @property
  def seed(self) -> int:
    return self.cfg.seed

  def train_rows(self) -> np.ndarray:
    train_seqs_NxT1, _ = build_token_sequences(self.cfg, self.tokenizer)
    return train_seqs_NxT1

  def eval_rows(self) -> tuple[np.ndarray, int]:
    """The first `val_batches` full batches; a validation set under one batch is one batch."""
    _, val_seqs_MxT1 = build_token_sequences(self.cfg, self.tokenizer)
    m = len(val_seqs_MxT1)
    if m == 0:
      raise ValueError(
          f"data.val_fraction: {self.cfg.val_fraction} holds out no full sequence of"
          f" {self.cfg.seq_len + 1} tokens from {_where(self.cfg)}; use a larger val_fraction"
          " (or a shorter seq_len)")
    B = min(self.cfg.batch_size, m)
    n_batches = min(self.cfg.val_batches, m // B)
    # A copy: the cached sequences are read-only, the batches handed out are not.
    return np.array(val_seqs_MxT1[:n_batches * B]), B

  def to_batch(self, seqs_BxT1: np.ndarray) -> dict[str, np.ndarray]:
    return _to_example(seqs_BxT1)


def make_train_iterator(cfg: DataConfig, tokenizer: Tokenizer, *, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
  """Endless {"inputs", "targets"}: int32 [batch_size // process_count, seq_len] batches.

  Sequences are shuffled by `cfg.seed`, differently (and deterministically) every epoch. The
  iterator's `get_state()` is a small JSON-serializable dict; `set_state` resumes exactly.
  """
  return pipeline.train_iterator(TextSource(cfg, tokenizer), process_index=process_index,
                                 process_count=process_count)


def make_val_batches(cfg: DataConfig, tokenizer: Tokenizer) -> list[dict[str, np.ndarray]]:
  """The first `val_batches` full global batches of validation sequences, in order.

  A validation set smaller than one batch gives a single smaller batch.
  """
  return pipeline.eval_batches(TextSource(cfg, tokenizer))


def unigram_entropy(cfg: DataConfig, tokenizer: Tokenizer) -> float:
  """Nats per token of the unigram distribution of the training tokens (a bar to beat)."""
  train_seqs_NxT1, _ = build_token_sequences(cfg, tokenizer)
  counts_V = np.bincount(train_seqs_NxT1.ravel(), minlength=tokenizer.vocab_size)
  p_V = counts_V[counts_V > 0] / counts_V.sum()
  return float(-(p_V * np.log(p_V)).sum())

