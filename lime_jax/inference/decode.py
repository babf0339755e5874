"""KV-cache decoding for both routers: prefill, one-token steps, batched sampling
(`lime-jax generate` is lime_jax/cli/generate.py).

What the cache holds. Per layer, the keys and values attention reads: for LIMe the routed,
rotated k' and v' (spec section 2), so decode memory equals the baseline's at equal shapes.
Routing a new token needs only the raw kv of that token in every layer, which the push
accumulator (routing.py) carries across the layers for the new tokens alone; no earlier
token's raw kv is kept.

Layout. `KVCache(k_LxBxSxRxHd, v_LxBxSxRxHd, length_B)` (layers.py) is an explicit pytree in
the layer stack's scan carry, not a Linen 'cache' collection. A collection follows the parameter
layout (one [L_seg, ...] variable per scan segment, one per layer unrolled); the carried pytree
is one [L, B, S, R, Hd] array whatever the layout, so a cache filled by the scanned model is
valid for the unrolled one. It needs no `mutable=`, and it is updated in place: each layer
scatters only its new slots, and the jitted entry points donate it.

Prompts of different lengths: per-row positions. Prompts are stored right-padded and row b's
token at position s sits in cache slot s. Slots past a row's length (its padding, then slots
not yet written) lie in the future of every query of that row, so the causal mask hides them
until a real token overwrites them: each row computes what it would alone.

Sampling, in float32: temperature (0 = greedy), then top-k, then top-p (nucleus) on the
renormalized top-k distribution. All three are traced values, so one compiled program serves
every setting.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lime_jax.config import ModelConfig, require_positive_int
from lime_jax.model.layers import KVCache, dtype_of
from lime_jax.model.transformer import Transformer

PROMPT_BUCKET = 8  # prompts are padded to a multiple of this: fewer distinct compiled shapes


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> KVCache:
  """An empty cache of `max_len` slots per row, in the compute dtype; the same for any router."""
  require_positive_int("batch", batch)
  require_positive_int("max_len", max_len)
  shape = (cfg.L, batch, max_len, cfg.R, cfg.Hd)
  dtype = dtype_of(cfg.compute_dtype)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))


def cache_bytes(cache: KVCache) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


@functools.partial(jax.jit, static_argnames=("cfg", "all_logits"), donate_argnames=("cache",))
def _prefill(params, tokens_BxT, cache, lengths_B, *, cfg, all_logits):
  start_B = cache.length_B
  logit_index_B = None if all_logits else lengths_B - 1
  logits, cache = Transformer(cfg).apply({"params": params}, tokens_BxT, cache, logit_index_B,
                                         method=Transformer.extend)
  return logits, cache._replace(length_B=start_B + lengths_B)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _decode_step(params, token_Bx1, cache, *, cfg):
  logits_Bx1xV, cache = Transformer(cfg).apply({"params": params}, token_Bx1, cache,
                                               method=Transformer.extend)
  return logits_Bx1xV[:, 0], cache


def prefill(params: Any, cfg: ModelConfig, tokens_BxT: jax.Array, cache: KVCache,
            lengths_B: jax.Array | None = None, *,
            all_logits: bool = False) -> tuple[jax.Array, KVCache]:
  """Appends a batch of right-padded prompts after each row's cached tokens: (logits, cache).

  lengths_B: real tokens per row (default: all T). A row's padding lands in slots past its
  length, where its next tokens overwrite it. Logits (float32): [B, V] at each row's last real
  token, or [B, T, V] with `all_logits`. The cache is donated: use the returned one.
  """
  B, T = _check_tokens("tokens_BxT", tokens_BxT, cache)
  if T > cache.k_LxBxSxRxHd.shape[2]:
    raise ValueError(f"tokens_BxT: {T} tokens do not fit a cache of max_len="
                     f"{cache.k_LxBxSxRxHd.shape[2]}")
  if lengths_B is None:
    lengths_B = jnp.full((B,), T, jnp.int32)
  elif jnp.shape(lengths_B) != (B,):
    raise ValueError(f"lengths_B: expected shape ({B},), got {jnp.shape(lengths_B)}")
  elif not np.all((np.asarray(lengths_B) >= 1) & (np.asarray(lengths_B) <= T)):
    raise ValueError(f"lengths_B: every length must be in [1, {T}], got {np.asarray(lengths_B)}")
  return _prefill(params, jnp.asarray(tokens_BxT, jnp.int32), cache,
                  jnp.asarray(lengths_B, jnp.int32), cfg=cfg, all_logits=all_logits)


def decode_step(params: Any, cfg: ModelConfig, token_Bx1: jax.Array,
                cache: KVCache) -> tuple[jax.Array, KVCache]:
  """Feeds one token per row at its next position: (float32 logits [B, V], donated cache).

  Writes past max_len are dropped, so callers keep length_B < max_len (`generate` checks this).
  """
  _, T = _check_tokens("token_Bx1", token_Bx1, cache)
  if T != 1:
    raise ValueError(f"token_Bx1: expected one token per row, got shape {jnp.shape(token_Bx1)}")
  return _decode_step(params, jnp.asarray(token_Bx1, jnp.int32), cache, cfg=cfg)


def _check_tokens(name: str, tokens, cache: KVCache) -> tuple[int, int]:
  shape = jnp.shape(tokens)
  if len(shape) != 2:
    raise ValueError(f"{name}: expected [batch, tokens], got shape {shape}")
  if shape[0] != cache.length_B.shape[0]:
    raise ValueError(f"{name}: batch {shape[0]} differs from the cache's {cache.length_B.shape[0]}")
  return shape


# ---------------------------------------------------------------------------------------------
# Sampling.


def filter_logits(logits_BxV: jax.Array, temperature, top_k, top_p) -> jax.Array:
  """Float32 logits / temperature, with entries outside top-k, then outside top-p, at -inf.

  top_k 0 and top_p 1 keep everything. Top-p keeps the smallest prefix (by probability, after
  top-k and renormalization) whose mass is >= top_p; the most likely token is always kept.
  Ties with the last kept value are kept. temperature 0 scales by 1 (greedy uses the argmax).
  """
  V = logits_BxV.shape[-1]
  scaled_BxV = logits_BxV.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)
  sorted_BxV = -jnp.sort(-scaled_BxV, axis=-1)  # descending
  k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
  in_top_k_V = jnp.arange(V) < k
  probs_BxV = jax.nn.softmax(jnp.where(in_top_k_V[None, :], sorted_BxV, -jnp.inf), axis=-1)
  # Exclusive prefix sum: entry i is kept while the mass before it is still short of top_p
  # (entry 0 always: its mass before is exactly 0 < top_p).
  mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
  keep_BxV = in_top_k_V[None, :] & ((mass_before_BxV < top_p) | (top_p >= 1.0))
  n_keep_Bx1 = keep_BxV.sum(axis=-1, keepdims=True)
  threshold_Bx1 = jnp.take_along_axis(sorted_BxV, n_keep_Bx1 - 1, axis=-1)
  return jnp.where(scaled_BxV >= threshold_Bx1, scaled_BxV, -jnp.inf)


def sample_tokens(rng: jax.Array, logits_BxV: jax.Array, temperature, top_k, top_p) -> jax.Array:
  """Next tokens [B] (int32): the argmax when temperature == 0, else a filtered sample."""
  sampled_B = jax.random.categorical(rng, filter_logits(logits_BxV, temperature, top_k, top_p),
                                     axis=-1)
  greedy_B = jnp.argmax(logits_BxV, axis=-1)
  return jnp.where(temperature > 0, sampled_B, greedy_B).astype(jnp.int32)


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
  """One-line ValueErrors naming the bad argument."""
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
      or not math.isfinite(temperature) or temperature < 0:
    raise ValueError(f"temperature: must be a finite number >= 0 (0 = greedy), got {temperature!r}")
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
    raise ValueError(f"top_k: must be an integer >= 0 (0 = off), got {top_k!r}")
  if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
    raise ValueError(f"top_p: must be in (0, 1] (1 = off), got {top_p!r}")


# ---------------------------------------------------------------------------------------------
# Generation.


@dataclasses.dataclass(frozen=True)
class Generation:
  tokens: list[list[int]]  # new tokens per prompt, cut before the first eos_id
  sampled: int  # tokens sampled over all rows, eos included, padding after eos not
  wall_s: float  # the compiled prefill + decode loop, compile excluded
  compile_s: float  # 0 when this shape was compiled by an earlier call

  @property
  def tokens_per_s(self) -> float:
    return self.sampled / self.wall_s if self.wall_s > 0 else float("nan")


def _generate_loop(params, tokens_BxT, lengths_B, rng, temperature, top_k, top_p, eos_id, *,
                   cfg: ModelConfig, max_new_tokens: int, max_len: int):
  """Prefill, then sample and feed back one token per row until all hit eos or the budget.

  Returns [B, max_new_tokens] int32, -1 after a row's eos.
  """
  B = tokens_BxT.shape[0]
  model = Transformer(cfg)

  def extend(tokens, cache, logit_index_B=None):
    return model.apply({"params": params}, tokens, cache, logit_index_B,
                       method=Transformer.extend)

  logits_BxV, cache = extend(tokens_BxT, init_cache(cfg, B, max_len), lengths_B - 1)
  cache = cache._replace(length_B=lengths_B)
  sample = functools.partial(sample_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
  token_B = sample(jax.random.fold_in(rng, 0), logits_BxV)
  out_BxN = jnp.full((B, max_new_tokens), -1, jnp.int32).at[:, 0].set(token_B)

  def cond(state):
    step, _, done_B, _, _ = state
    return (step < max_new_tokens) & ~jnp.all(done_B)

  def body(state):
    step, token_B, done_B, out_BxN, cache = state
    logits_Bx1xV, cache = extend(token_B[:, None], cache)
    token_B = sample(jax.random.fold_in(rng, step), logits_Bx1xV[:, 0])
    out_BxN = jax.lax.dynamic_update_index_in_dim(out_BxN, jnp.where(done_B, -1, token_B),
                                                  step, axis=1)
    return step + 1, token_B, done_B | (token_B == eos_id), out_BxN, cache

  state = (jnp.int32(1), token_B, token_B == eos_id, out_BxN, cache)
  return jax.lax.while_loop(cond, body, state)[3]


_COMPILED: dict[Any, Any] = {}  # one executable per (config, shapes, budget)


def _compiled_loop(args: tuple, **static) -> tuple[Any, float]:
  leaves, treedef = jax.tree.flatten(args)
  key = (tuple(sorted(static.items())), treedef,
         tuple(jax.typeof(x) for x in leaves))
  if key in _COMPILED:
    return _COMPILED[key], 0.0
  start = time.perf_counter()
  compiled = jax.jit(functools.partial(_generate_loop, **static)).lower(*args).compile()
  _COMPILED[key] = compiled
  return compiled, time.perf_counter() - start


def generate(params: Any, cfg: ModelConfig, prompt_tokens: Sequence[Sequence[int]],
             max_new_tokens: int, rng: jax.Array, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: int | None = None,
             max_len: int | None = None, allow_past_length: bool = False) -> Generation:
  """Samples up to `max_new_tokens` after each prompt, all rows in one jitted loop.

  Prompts may differ in length (per-row positions, see the module docstring). The cache holds
  max_len slots per row, by default exactly the longest prompt plus max_new_tokens - 1 (the last
  token is never fed back): the positions the model reads. Those must lie within the trained
  length cfg.T, so the default cache is at most T slots; `allow_past_length` lifts the check
  (RoPE has no table to overrun, but positions past T were never trained). Rows stop at
  eos_id, the loop when all rows have.
  """
  require_positive_int("max_new_tokens", max_new_tokens)
  check_sampling(temperature, top_k, top_p)
  prompts = _check_prompts(prompt_tokens, cfg.V)
  if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int)
                             or not 0 <= eos_id < cfg.V):
    raise ValueError(f"eos_id: must be None or a token id in [0, {cfg.V}), got {eos_id!r}")
  longest = max(len(p) for p in prompts)
  if not allow_past_length:
    check_within_length(cfg, longest, max_new_tokens)
  if max_len is None:
    max_len = longest + max_new_tokens - 1
  require_positive_int("max_len", max_len)
  if longest > max_len:
    i = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    raise ValueError(f"prompt_tokens: prompt {i} has {longest} tokens, more than max_len={max_len}")
  if longest + max_new_tokens - 1 > max_len:
    raise ValueError(f"max_new_tokens: {max_new_tokens} new tokens after a {longest}-token prompt"
                     f" need max_len >= {longest + max_new_tokens - 1}, got {max_len}")

  T = min(-(-longest // PROMPT_BUCKET) * PROMPT_BUCKET, max_len)
  tokens_BxT = np.zeros((len(prompts), T), np.int32)
  for b, prompt in enumerate(prompts):
    tokens_BxT[b, :len(prompt)] = prompt
  args = (params, jnp.asarray(tokens_BxT), jnp.asarray([len(p) for p in prompts], jnp.int32), rng,
          jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
          jnp.int32(-1 if eos_id is None else eos_id))
  compiled, compile_s = _compiled_loop(args, cfg=cfg, max_new_tokens=max_new_tokens,
                                       max_len=max_len)
  start = time.perf_counter()
  out_BxN = np.asarray(jax.device_get(compiled(*args)))
  wall_s = time.perf_counter() - start

  tokens, sampled = [], 0
  for row in out_BxN.tolist():
    row = [t for t in row if t >= 0]
    sampled += len(row)
    tokens.append(row[:row.index(eos_id)] if eos_id in row else row)
  return Generation(tokens=tokens, sampled=sampled, wall_s=wall_s, compile_s=compile_s)


def check_within_length(cfg: ModelConfig, prompt_len: int, max_new_tokens: int) -> None:
  """A one-line ValueError when a prompt and its new tokens would feed positions past cfg.T."""
  positions = prompt_len + max_new_tokens - 1  # the last new token is never fed back
  if positions > cfg.T:
    raise ValueError(
        f"max_new_tokens: a {prompt_len}-token prompt and {max_new_tokens} new tokens feed"
        f" {positions} positions, past the model's trained length T={cfg.T}; shorten the prompt,"
        " ask for fewer new tokens, or allow it (generate's --allow-past-length; positions past T"
        " were never trained)")


def _check_prompts(prompt_tokens, V: int) -> list[list[int]]:
  if isinstance(prompt_tokens, (str, bytes)) or not isinstance(prompt_tokens, Sequence) \
      or not prompt_tokens:
    raise ValueError("prompt_tokens: expected a non-empty list of token-id lists")
  prompts = []
  for i, prompt in enumerate(prompt_tokens):
    ids = np.asarray(prompt)
    if ids.ndim != 1 or not ids.size:
      raise ValueError(f"prompt_tokens: prompt {i} must be a non-empty list of token ids")
    if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= V:
      raise ValueError(f"prompt_tokens: prompt {i} has ids outside [0, {V})")
    prompts.append(ids.astype(np.int32).tolist())
  return prompts
