"""`lime-jax analyze`: per-layer value entropy, token separability and router heatmaps of one
checkpoint, or of two side by side (`--compare`)."""

from __future__ import annotations

import argparse
import os

from lime_jax.cli.generate import LoadForDecoding, load_for_decoding
from lime_jax.data import text as data
from lime_jax.data.tokenizers import load_tokenizer
from lime_jax.studies import analysis


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--checkpoint", required=True,
                      help="run directory, its checkpoints/ directory, or one step directory")
  parser.add_argument("--compare", default=None, help="a second checkpoint drawn beside the first")
  parser.add_argument("--data", default=None,
                      help="a UTF-8 text file (default: the embedded corpus, pydoc topics)")
  parser.add_argument("--words", default=",".join(analysis.DEFAULT_WORDS),
                      help="comma-separated words whose representations are probed")
  parser.add_argument("--max-sequences", type=int, default=32)
  parser.add_argument("--seq-len", type=int, default=None,
                      help="tokens per sequence (default: the models' maximum length T)")
  parser.add_argument("--folds", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", required=True, help="directory for analysis.json and the PNGs")


def _label(path: str) -> str:
  return os.path.basename(os.path.normpath(path))


def run(args: argparse.Namespace, load_params: LoadForDecoding = load_for_decoding) -> int:
  """load_params(checkpoint) -> (params, model config, tokenizer spec or None)."""
  words = [w.strip() for w in args.words.split(",") if w.strip()]
  if len(words) < 2:
    raise ValueError(f"analyze --words: need at least two words, got {args.words!r}")
  params, cfg, spec = load_params(args.checkpoint)
  compare = None
  if args.compare:
    params2, cfg2, spec2 = load_params(args.compare)
    if (spec2 or "byte") != (spec or "byte"):
      raise ValueError(f"analyze --compare: tokenizers differ ({spec!r} vs {spec2!r})")
    compare = (params2, cfg2, _label(args.compare))
  tokenizer = load_tokenizer(spec or "byte")
  if args.data:
    texts = data.load_documents(data.DataConfig(source="text", path=args.data))
  else:
    texts = data.load_documents(data.DataConfig())
  report = analysis.analyze(params, cfg, tokenizer, texts, words, args.out, compare,
                            label=_label(args.checkpoint), seq_len=args.seq_len,
                            max_sequences=args.max_sequences, folds=args.folds, seed=args.seed)
  print(f"analysis: {report['n_sequences']} sequences x {report['seq_len']} tokens,"
        f" word counts {report['word_counts']}")
  for m in report["models"]:
    for r in m["layers"]:
      print(f"  {m['label']} layer {r['layer']}: entropy {r['value_entropy_mean']},"
            f" value sep {r['value_separability_mean']}, hidden sep {r['hidden_separability_mean']}")
  print(f"wrote {os.path.join(args.out, 'analysis.json')} and {len(report['figures'])} figures")
  return 0
