"""`lime-jax tokenizer train`: fit a byte-level BPE tokenizer.json on local text files."""

from __future__ import annotations

import argparse

from lime_jax.data.tokenizers import ENDOFTEXT, train_bpe


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
  """Arguments of `lime-jax tokenizer train`."""
  parser.add_argument("--files", nargs="+", required=True, help="local text files to fit on")
  parser.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, >= 257")
  parser.add_argument("--out", required=True, help="where to write tokenizer.json")


def run_train(args: argparse.Namespace) -> int:
  tok = train_bpe(args.files, args.vocab_size, args.out)
  print(f"wrote {args.out}: byte-level BPE, vocab_size={tok.vocab_size},"
        f" bos_id=eos_id={tok.bos_id} ({ENDOFTEXT})")
  return 0
