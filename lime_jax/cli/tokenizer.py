"""`lime-jax tokenizer train`: fit a byte-level BPE tokenizer.json on local text files or on the
embedded corpus."""

from __future__ import annotations

import argparse

from lime_jax.data import text
from lime_jax.data.tokenizers import ENDOFTEXT, train_bpe, train_bpe_on_texts


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
  """Arguments of `lime-jax tokenizer train`."""
  corpus = parser.add_mutually_exclusive_group(required=True)
  corpus.add_argument("--files", nargs="+", help="local text files to fit on")
  corpus.add_argument("--embedded", action="store_true",
                      help="fit on the embedded corpus (data.source: embedded, all documents)")
  parser.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, >= 257")
  parser.add_argument("--out", required=True, help="where to write tokenizer.json")


def run_train(args: argparse.Namespace) -> int:
  if args.embedded:
    tok = train_bpe_on_texts(text.load_documents(text.DataConfig()), args.vocab_size, args.out)
  else:
    tok = train_bpe(args.files, args.vocab_size, args.out)
  print(f"wrote {args.out}: byte-level BPE, vocab_size={tok.vocab_size},"
        f" bos_id=eos_id={tok.bos_id} ({ENDOFTEXT})")
  return 0
