"""Tokenizers: exact round trips, special ids, BPE training, and clear errors."""

import argparse
import json
import os

import numpy as np
import pytest

from lime_jax.cli import tokenizer as tokenizer_cmd
from lime_jax.data.tokenizers import ENDOFTEXT, ByteTokenizer, HFTokenizer, load_tokenizer, train_bpe

UNICODE_TEXT = "Héllo, wörld! 你好 🙂 — tabs\tand\nnewlines; ∑ x² ≠ 0.\r\n  two spaces"
CORPUS = ("The quick brown fox jumps over the lazy dog. " * 20
          + "Layer-integrated memory routes keys and values from every earlier layer. " * 20
          + "Ünïcödé text, emoji 🙂 and 中文 too.\n" * 10)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> HFTokenizer:
  d = tmp_path_factory.mktemp("bpe")
  (d / "corpus.txt").write_text(CORPUS, encoding="utf-8")
  return train_bpe([str(d / "corpus.txt")], 300, str(d / "out" / "tokenizer.json"))


def test_byte_tokenizer_ids_and_round_trip():
  tok = load_tokenizer("byte")
  assert isinstance(tok, ByteTokenizer)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (258, 256, 257)
  ids = tok.encode(UNICODE_TEXT)
  assert ids == list(UNICODE_TEXT.encode("utf-8"))
  assert len(ids) > len(UNICODE_TEXT)  # multi-byte characters really are several ids
  assert all(0 <= i < 256 for i in ids)
  assert tok.decode(ids) == UNICODE_TEXT
  # Specials decode to nothing, numpy ids work, and encode_batch agrees with encode.
  assert tok.decode(np.array([tok.bos_id] + ids + [tok.eos_id])) == UNICODE_TEXT
  batch = tok.encode_batch([UNICODE_TEXT, "", "abc"])
  assert [b.tolist() for b in batch] == [ids, [], [97, 98, 99]]
  assert all(b.dtype == np.int32 for b in batch)
  assert tok == ByteTokenizer() and hash(tok) == hash(ByteTokenizer())


def test_byte_decode_of_truncated_character_does_not_raise():
  ids = ByteTokenizer().encode("é")[:1]
  assert ByteTokenizer().decode(ids) == "\ufffd"


def test_train_bpe_then_load_round_trips(bpe):
  path = bpe.path
  tok = load_tokenizer(path)
  assert isinstance(tok, HFTokenizer)
  assert 256 < tok.vocab_size <= 300
  assert tok.bos_id == tok.eos_id == tok._tok.token_to_id(ENDOFTEXT)
  for text in (UNICODE_TEXT, CORPUS[:500], "", " leading space", "unseen words: zygote, qwxj"):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.eos_id not in ids  # specials are never added implicitly
    assert tok.decode(ids) == text
  # Merges were learned: text seen in training takes clearly fewer tokens than bytes.
  sample = "The quick brown fox jumps over the lazy dog."
  assert len(tok.encode(sample)) < 0.75 * len(sample.encode("utf-8"))
  batch = tok.encode_batch([sample, UNICODE_TEXT])
  assert [b.tolist() for b in batch] == [tok.encode(sample), tok.encode(UNICODE_TEXT)]
  # A directory holding tokenizer.json is accepted too.
  assert load_tokenizer(os.path.dirname(path)).vocab_size == tok.vocab_size


def test_explicit_special_tokens(bpe):
  tok = load_tokenizer(bpe.path, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT)
  assert tok.bos_id == tok.eos_id == bpe.eos_id
  with pytest.raises(ValueError, match=r"bos token '<s>' is not in the vocabulary"):
    load_tokenizer(bpe.path, bos_token="<s>")


def test_tokenizer_without_specials_needs_explicit_tokens(bpe, tmp_path):
  spec = json.loads(open(bpe.path, encoding="utf-8").read())
  spec["added_tokens"] = []
  del spec["model"]["vocab"][ENDOFTEXT]
  path = tmp_path / "nospecial.json"
  path.write_text(json.dumps(spec), encoding="utf-8")
  with pytest.raises(ValueError, match=r"no bos special token .* pass bos_token="):
    load_tokenizer(str(path))
  tok = load_tokenizer(str(path), bos_token="a", eos_token="b")
  assert (tok.bos_id, tok.eos_id) == (tok._tok.token_to_id("a"), tok._tok.token_to_id("b"))


def test_load_tokenizer_errors_name_the_path(tmp_path):
  missing = tmp_path / "nope" / "tokenizer.json"
  with pytest.raises(ValueError, match=f"no such file: {missing}"):
    load_tokenizer(str(missing))
  with pytest.raises(ValueError, match=f"no such file: {tmp_path / 'tokenizer.json'}"):
    load_tokenizer(str(tmp_path))  # a directory without tokenizer.json
  bad = tmp_path / "bad.json"
  bad.write_text("{not json", encoding="utf-8")
  with pytest.raises(ValueError, match=f"cannot load {bad}"):
    load_tokenizer(str(bad))
  with pytest.raises(ValueError, match="tokenizer: expected 'byte'"):
    load_tokenizer("")
  with pytest.raises(ValueError, match="do not apply to the byte tokenizer"):
    load_tokenizer("byte", bos_token="<s>")


def test_train_bpe_errors(tmp_path):
  corpus = tmp_path / "c.txt"
  corpus.write_text(CORPUS, encoding="utf-8")
  with pytest.raises(ValueError, match=f"files: no such file: {tmp_path / 'missing.txt'}"):
    train_bpe([str(tmp_path / "missing.txt")], 300, str(tmp_path / "t.json"))
  with pytest.raises(ValueError, match="files: at least one"):
    train_bpe([], 300, str(tmp_path / "t.json"))
  with pytest.raises(ValueError, match=r"vocab_size: must be an integer >= 257"):
    train_bpe([str(corpus)], 100, str(tmp_path / "t.json"))
  assert not (tmp_path / "t.json").exists()


def test_cli_train_command(tmp_path, capsys):
  corpus = tmp_path / "c.txt"
  corpus.write_text(CORPUS, encoding="utf-8")
  parser = argparse.ArgumentParser()
  tokenizer_cmd.add_train_arguments(parser)
  out = tmp_path / "tok.json"
  args = parser.parse_args(["--files", str(corpus), "--vocab-size", "280", "--out", str(out)])
  assert tokenizer_cmd.run_train(args) == 0
  assert out.is_file()
  assert f"wrote {out}" in capsys.readouterr().out
  assert load_tokenizer(str(out)).vocab_size <= 280
  with pytest.raises(SystemExit):
    parser.parse_args(["--files", str(corpus)])  # --vocab-size and --out are required


def test_committed_embedded_bpe_is_what_training_on_the_embedded_corpus_gives(tmp_path, capsys):
  """configs/tokenizers/embedded_bpe_2048.json (the depth study's) is reproducible byte for byte
  by `lime-jax tokenizer train --embedded`, so the study depends on no downloaded file."""
  committed = os.path.join(os.path.dirname(__file__), "..", "configs", "tokenizers",
                           "embedded_bpe_2048.json")
  parser = argparse.ArgumentParser()
  tokenizer_cmd.add_train_arguments(parser)
  out = tmp_path / "tok.json"
  args = parser.parse_args(["--embedded", "--vocab-size", "2048", "--out", str(out)])
  assert tokenizer_cmd.run_train(args) == 0
  assert "vocab_size=2048" in capsys.readouterr().out
  assert out.read_bytes() == open(committed, "rb").read()
  tok = load_tokenizer(committed)
  text = "The return statement leaves the current function call."
  assert tok.decode(tok.encode(text)) == text
  assert len(tok.encode(text)) < len(text.encode("utf-8")) / 3  # merges learned on English prose
  with pytest.raises(SystemExit):
    parser.parse_args(["--embedded", "--files", "x.txt", "--vocab-size", "300", "--out", "o"])
