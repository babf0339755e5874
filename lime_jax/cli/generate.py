"""`lime-jax generate`: sample from a checkpoint with a KV cache."""

from __future__ import annotations

import argparse
from typing import Any, Callable

import jax

from lime_jax.config import ModelConfig
from lime_jax.data.tokenizers import load_tokenizer
from lime_jax.inference import decode
from lime_jax.train import params as params_lib

LoadForDecoding = Callable[[str], tuple[Any, ModelConfig, str | None]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--checkpoint", required=True,
                      help="run directory, its checkpoints/ directory, or one step directory")
  parser.add_argument("--prompt", action="append", default=None,
                      help="prompt text; repeat for a batch (default: one empty prompt)")
  parser.add_argument("--max-new-tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
  parser.add_argument("--top-k", type=int, default=0, help="0 = off")
  parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass; 1 = off")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--allow-past-length", action="store_true",
                      help="decode past the model's trained length T (refused by default:"
                           " positions past T were never trained); the cache grows to fit")
  parser.add_argument("--tokenizer", default=None,
                      help="'byte' or a tokenizer.json path (default: the checkpoint's, else byte)")


def load_for_decoding(path: str) -> tuple[Any, ModelConfig, str | None]:
  """(params, model config, tokenizer spec) of a checkpoint's latest step; `analyze` reads
  checkpoints this way too."""
  loaded = params_lib.load_params(path)
  return loaded.params, loaded.config.model, loaded.config.data.tokenizer


def run(args: argparse.Namespace, load_params: LoadForDecoding = load_for_decoding) -> int:
  """Prints each prompt with its continuation, then tokens/s.

  load_params(checkpoint) -> (params, model config, the checkpoint's tokenizer spec or None).
  Prompts start with the tokenizer's BOS, as training sequences do; generation stops at EOS.
  A prompt (BOS included) plus --max-new-tokens past the model's T is refused unless
  --allow-past-length; the cache holds exactly the positions fed, so at most T by default.
  """
  params, model_cfg, tokenizer_spec = load_params(args.checkpoint)
  tokenizer = load_tokenizer(args.tokenizer or tokenizer_spec or "byte")
  if tokenizer.vocab_size > model_cfg.V:
    raise ValueError(f"--tokenizer: vocab_size {tokenizer.vocab_size} exceeds the model's"
                     f" V={model_cfg.V}")
  texts = args.prompt if args.prompt else [""]
  result = decode.generate(params, model_cfg,
                           [[tokenizer.bos_id] + tokenizer.encode(t) for t in texts],
                           args.max_new_tokens, jax.random.key(args.seed),
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           eos_id=tokenizer.eos_id, allow_past_length=args.allow_past_length)
  for i, (text, new) in enumerate(zip(texts, result.tokens)):
    print(f"=== prompt {i} ===")
    print(text + tokenizer.decode(new))
  print(f"{result.sampled} tokens in {result.wall_s:.3f} s: {result.tokens_per_s:.1f} tokens/s"
        f" (batch {len(texts)}; compile {result.compile_s:.1f} s)")
  return 0
