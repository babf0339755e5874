"""Tokenizers: raw UTF-8 bytes (the default) or any `tokenizer.json` of the `tokenizers` library.

Both share a small interface: `vocab_size`, `bos_id`, `eos_id`, `encode(text) -> list[int]`,
`decode(ids) -> str`, plus `encode_batch(texts)` for speed.

- "byte": ids 0..255 are the UTF-8 bytes, BOS = 256, EOS = 257, vocab_size 258. Needs no file
  and round-trips any text exactly.
- a path to `tokenizer.json` (e.g. GPT-2 BPE, V = 50257): BOS/EOS are the first special token
  found among the usual names ("<|endoftext|>" serves as both in GPT-2), or given explicitly.

`train_bpe` fits a byte-level BPE on local text files (`train_bpe_on_texts` on documents in
memory), with "<|endoftext|>" as BOS and EOS.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Protocol, Sequence

import numpy as np

BYTE_BOS = 256
BYTE_EOS = 257
BYTE_VOCAB = 258
ENDOFTEXT = "<|endoftext|>"

# Searched in order; the first present in the vocabulary wins.
_BOS_NAMES = ("<|begin_of_text|>", "<bos>", "<s>", "[BOS]", "<|bos|>", ENDOFTEXT)
_EOS_NAMES = ("<|end_of_text|>", "<eos>", "</s>", "[EOS]", "<|eos|>", ENDOFTEXT)


class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int
  eos_id: int

  def encode(self, text: str) -> list[int]: ...

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

  def decode(self, ids: Iterable[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 bytes plus BOS/EOS. Frozen, so equal instances hash alike (data caching keys on it)."""

  vocab_size: int = BYTE_VOCAB
  bos_id: int = BYTE_BOS
  eos_id: int = BYTE_EOS

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    # frombuffer avoids a Python int per byte: the embedded corpus encodes in milliseconds.
    return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    # BOS/EOS have no bytes; a sampled cut mid-character decodes to U+FFFD instead of raising.
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
  """A `tokenizers.Tokenizer` loaded from tokenizer.json; specials are never added implicitly."""

  def __init__(self, path: str, bos_token: str | None = None, eos_token: str | None = None):
    from tokenizers import Tokenizer as _Tokenizer  # pylint: disable=g-import-not-at-top

    self.path = path
    self._tok = _Tokenizer.from_file(path)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.bos_id = self._special_id("bos", bos_token, _BOS_NAMES)
    self.eos_id = self._special_id("eos", eos_token, _EOS_NAMES)

  def _special_id(self, kind: str, token: str | None, candidates: Sequence[str]) -> int:
    names = (token,) if token is not None else candidates
    for name in names:
      token_id = self._tok.token_to_id(name)
      if token_id is not None:
        return token_id
    if token is not None:
      raise ValueError(f"tokenizer {self.path}: {kind} token {token!r} is not in the vocabulary")
    raise ValueError(
        f"tokenizer {self.path}: no {kind} special token among {list(candidates)};"
        f" pass {kind}_token= explicitly")

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

  def decode(self, ids: Iterable[int]) -> str:
    # Skipping specials matches ByteTokenizer, whose BOS/EOS decode to nothing.
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def __repr__(self) -> str:
    return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(spec: str, *, bos_token: str | None = None,
                   eos_token: str | None = None) -> ByteTokenizer | HFTokenizer:
  """"byte", or a path to a tokenizer.json (or to a directory holding one)."""
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"tokenizer: expected 'byte' or a path to tokenizer.json, got {spec!r}")
  if spec == "byte":
    if bos_token is not None or eos_token is not None:
      raise ValueError("tokenizer: bos_token/eos_token do not apply to the byte tokenizer")
    return ByteTokenizer()
  path = os.path.expanduser(spec)
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(path):
    raise ValueError(f"tokenizer: no such file: {path} (expected 'byte' or a tokenizer.json path)")
  try:
    return HFTokenizer(path, bos_token=bos_token, eos_token=eos_token)
  except ValueError:
    raise
  except Exception as e:  # the Rust side raises its own exception type on malformed JSON
    raise ValueError(f"tokenizer: cannot load {path}: {str(e).splitlines()[0]}") from e


def train_bpe(files: Sequence[str], vocab_size: int, out_path: str) -> HFTokenizer:
  """Fits a byte-level BPE (GPT-2 style) on local text files and saves tokenizer.json."""
  if not files:
    raise ValueError("tokenizer train: files: at least one text file is required")
  for f in files:
    if not os.path.isfile(f):
      raise ValueError(f"tokenizer train: files: no such file: {f}")
  return _fit_bpe(lambda tok, trainer: tok.train([str(f) for f in files], trainer), vocab_size,
                  out_path)


def train_bpe_on_texts(texts: Sequence[str], vocab_size: int, out_path: str) -> HFTokenizer:
  """`train_bpe` on documents in memory (e.g. the embedded corpus); deterministic for a given
  list of texts."""
  if not texts:
    raise ValueError("tokenizer train: texts: at least one document is required")
  return _fit_bpe(lambda tok, trainer: tok.train_from_iterator(list(texts), trainer), vocab_size,
                  out_path)


def _fit_bpe(fit, vocab_size: int, out_path: str) -> HFTokenizer:
  from tokenizers import Tokenizer as _Tokenizer  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top

  alphabet = pre_tokenizers.ByteLevel.alphabet()
  min_vocab = len(alphabet) + 1  # every byte plus <|endoftext|>
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < min_vocab:
    raise ValueError(
        f"tokenizer train: vocab_size: must be an integer >= {min_vocab}"
        f" (256 bytes + {ENDOFTEXT}), got {vocab_size!r}")
  tok = _Tokenizer(models.BPE())
  # No prefix space and no offset trimming: decode(encode(text)) == text exactly.
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT],
                                initial_alphabet=alphabet, show_progress=False)
  fit(tok, trainer)
  out_dir = os.path.dirname(os.path.abspath(out_path))
  os.makedirs(out_dir, exist_ok=True)
  tok.save(str(out_path))
  return HFTokenizer(str(out_path))
