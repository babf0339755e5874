"""Scoring text with a trained model: log-likelihoods of continuations, rolling log-likelihoods
of whole texts, and generation until stop strings. What an evaluation harness asks of a model
(lime_jax/evaluation/harness.py adapts it to EleutherAI's lm-evaluation-harness).

Sequences are scored as they were trained: BOS, then the text's tokens (training wraps every
document as BOS doc EOS). A context longer than the model's T keeps its last tokens, and a
whole text longer than T is scored in disjoint windows of T predicted tokens, each window's
first input being the token before it.

Scoring is batched and jitted: rows are right-padded to a power-of-two length (at most T), in
batches of `batch_size` rows sorted by length, so a few compiled shapes serve every request.
Log-probabilities are float32: a target's logit minus the logsumexp of its row. Generation is
the cached decoder (lime_jax/inference/decode.py), within T: the prompt keeps its last tokens so
that it and the new tokens fit.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lime_jax.config import ModelConfig, require_positive_int
from lime_jax.data.tokenizers import Tokenizer, load_tokenizer
from lime_jax.inference import decode
from lime_jax.interop import hf
from lime_jax.model.transformer import Transformer
from lime_jax.train import params as params_lib


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  params: Any
  cfg: ModelConfig
  tokenizer: str | None  # the spec saved with a training checkpoint; None for an exported dir
  source: str  # what was read: a checkpoint step directory or an exported directory


def is_exported_dir(path: str) -> bool:
  return all(os.path.isfile(os.path.join(path, name))
             for name in (hf.CONFIG_FILE, hf.WEIGHTS_FILE))


def load_model(path: str) -> LoadedModel:
  """A training checkpoint (run dir, its checkpoints/ dir or a step dir; the latest step) or
  a `lime-jax export` directory (model.safetensors + config.json)."""
  if is_exported_dir(path):
    params, cfg = hf.import_params(path)
    return LoadedModel(params=params, cfg=cfg, tokenizer=None, source=path)
  loaded = params_lib.load_params(path)
  return LoadedModel(params=loaded.params, cfg=loaded.config.model,
                     tokenizer=loaded.config.data.tokenizer,
                     source=f"{loaded.directory}/{loaded.step}")


@functools.partial(jax.jit, static_argnames=("cfg",))
def _score_rows(params, inputs_BxS, targets_BxS, weights_BxS, *, cfg):
  """Per row: the weighted sum of target log-probs, and whether every weighted target is the
  argmax."""
  logits_BxSxV = Transformer(cfg).apply({"params": params}, inputs_BxS).astype(jnp.float32)
  # log p(target) = its logit - logsumexp: no [B, S, V] log-softmax is kept.
  target_logit_BxS = jnp.take_along_axis(logits_BxSxV, targets_BxS[..., None], axis=-1)[..., 0]
  target_logp_BxS = target_logit_BxS - jax.nn.logsumexp(logits_BxSxV, axis=-1)
  greedy_BxS = jnp.argmax(logits_BxSxV, axis=-1) == targets_BxS
  return ((target_logp_BxS * weights_BxS).sum(axis=-1),
          jnp.all(greedy_BxS | (weights_BxS == 0), axis=-1))


class Scorer:
  """A model, its tokenizer and a batch size: token- and text-level scoring and generation."""

  def __init__(self, params: Any, cfg: ModelConfig, tokenizer: Tokenizer, batch_size: int = 8):
    require_positive_int("batch_size", batch_size)
    if tokenizer.vocab_size > cfg.V:
      raise ValueError(f"tokenizer: vocab_size {tokenizer.vocab_size} exceeds the model's"
                       f" V={cfg.V}")
    self.params, self.cfg, self.tokenizer, self.batch_size = params, cfg, tokenizer, batch_size

  @classmethod
  def load(cls, path: str, tokenizer: str | None = None, batch_size: int = 8) -> "Scorer":
    """From a checkpoint or exported dir; the tokenizer defaults to the checkpoint's, else byte."""
    model = load_model(path)
    return cls(model.params, model.cfg, load_tokenizer(tokenizer or model.tokenizer or "byte"),
               batch_size)

  # --- tokens ------------------------------------------------------------------------------------

  def loglikelihood_tokens(
      self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), greedy) per (context, continuation) pair.

    A context needs at least one token (BOS, for a text scored from its start); only its last
    T + 1 - len(continuation) tokens are read. A continuation of more than T tokens is an error.
    """
    T = self.cfg.T
    rows = []
    for i, (context, continuation) in enumerate(pairs):
      if not context or not continuation:
        raise ValueError(f"pairs: pair {i} needs a non-empty context and continuation")
      if len(continuation) > T:
        raise ValueError(f"pairs: pair {i} has a {len(continuation)}-token continuation, more"
                         f" than the model's T={T}")
      sequence = (list(context) + list(continuation))[-(T + 1):]
      rows.append((sequence, len(continuation)))
    results: list[tuple[float, bool] | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths together
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      for i, value in zip(chunk, self._score_batch([rows[i] for i in chunk])):
        results[i] = value
    return results

  def _score_batch(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
    longest = max(len(sequence) for sequence, _ in rows) - 1  # inputs of the longest row
    length = min(1 << (longest - 1).bit_length(), self.cfg.T)  # a power of two >= longest
    shape = (self.batch_size, length)  # padded rows too: one compiled shape per length
    inputs_BxS, targets_BxS = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    weights_BxS = np.zeros(shape, np.float32)
    for b, (sequence, n_scored) in enumerate(rows):
      n = len(sequence) - 1
      inputs_BxS[b, :n], targets_BxS[b, :n] = sequence[:-1], sequence[1:]
      weights_BxS[b, n - n_scored:n] = 1.0
    logp_B, greedy_B = jax.device_get(_score_rows(self.params, inputs_BxS, targets_BxS,
                                                  weights_BxS, cfg=self.cfg))
    return [(float(logp_B[b]), bool(greedy_B[b])) for b in range(len(rows))]

  def rolling_loglikelihood_tokens(self, tokens: Sequence[int]) -> float:
    """log p(tokens | BOS): every token scored, in disjoint windows of at most T."""
    sequence = [self.tokenizer.bos_id] + list(tokens)
    T = self.cfg.T
    windows = [([sequence[start]], sequence[start + 1:start + 1 + T])
               for start in range(0, len(tokens), T)]
    return sum(logp for logp, _ in self.loglikelihood_tokens(windows))

  # --- text --------------------------------------------------------------------------------------

  def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(BOS + context tokens, continuation tokens). The context's trailing white space moves to
    the continuation, and the pair is tokenized whole, then split, as the harness does for
    causal models: a BPE merges a word with the space before it."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    context_ids = self.tokenizer.encode(stripped)
    whole_ids = self.tokenizer.encode(stripped + continuation)
    if whole_ids[:len(context_ids)] != context_ids:  # a merge across the boundary
      return [self.tokenizer.bos_id] + context_ids, self.tokenizer.encode(continuation)
    return [self.tokenizer.bos_id] + context_ids, whole_ids[len(context_ids):]

  def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
    return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in pairs])

  def rolling_loglikelihood(self, texts: Sequence[str]) -> list[float]:
    return [self.rolling_loglikelihood_tokens(self.tokenizer.encode(t)) if t else 0.0
            for t in texts]

  def generate(self, contexts: Sequence[str], until: Sequence[str], max_new_tokens: int,
               temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Continuations of each context (BOS + its tokens), cut before the first stop string and
    at EOS; batched through the cached decoder, within the model's T."""
    require_positive_int("max_new_tokens", max_new_tokens)
    T = self.cfg.T
    max_new_tokens = min(max_new_tokens, T - 1)
    keep = T + 1 - max_new_tokens  # prompt tokens that fit beside the new ones
    prompts = [([self.tokenizer.bos_id] + self.tokenizer.encode(c))[-keep:] for c in contexts]
    texts = []
    for start in range(0, len(prompts), self.batch_size):
      result = decode.generate(self.params, self.cfg, prompts[start:start + self.batch_size],
                               max_new_tokens, jax.random.key(seed), temperature=temperature,
                               eos_id=self.tokenizer.eos_id)
      texts += [_cut(self.tokenizer.decode(new), until) for new in result.tokens]
    return texts


def _cut(text: str, until: Sequence[str]) -> str:
  """`text` before the earliest stop string (empty stop strings ignored)."""
  ends = [text.find(stop) for stop in until if stop and stop in text]
  return text[:min(ends)] if ends else text
