"""Top-p pruning of the static routers (spec section 3; `top_p`, `top_p_refresh`).

hidden-static: per reader layer and head, softmax the logits over the live sources, sort, keep
the smallest prefix whose cumulative mass exceeds p (the largest weight always stays), and
renormalize over the kept sources (the model's masked softmax does that). p = 1 keeps everything.

kv-static has plain signed weights, no softmax: per reader layer i and head r, the mass of entry
(source layer j, source head s) is |W_i[r, j, s]| over the sum of the row's magnitudes, the same
rule keeps the largest entries, and the pruned ones are zero (no renormalization: the weights
are not a distribution). The fixed layer-0 identity is not a parameter and is never pruned.

The mask lives in the parameters as a frozen leaf `top_p_mask` per layer (float 0/1; hidden
[H, L], kv [L_reader, R, R] in the push layout):
the model reads it under stop_gradient, the optimizer gives it a zero update (group "frozen"),
so checkpoints, evaluation and decoding carry it with no extra state. `refresh` recomputes it
from the current logits at steps divisible by `top_p_refresh` (step 0 included) inside the
jitted train step, and leaves it unchanged on the others.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lime_jax.config import ModelConfig
from lime_jax.model import stack
from lime_jax.model.mixers import hidden_routing as hr
from lime_jax.model.mixers import kv_routing as routing


def keep_mask(weights_xN: jax.Array, p: float) -> jax.Array:
  """Bool, same shape: per row (last axis), the smallest set of largest weights whose sum
  exceeds p; weights must be non-negative and sum to 1 per row. Entry k of the descending order
  is kept iff the weights before it sum to <= p, so the first always is."""
  if p >= 1.0:  # rounding could push a cumulative sum past 1
    return jnp.ones(weights_xN.shape, bool)
  order_xN = jnp.argsort(-weights_xN, axis=-1, stable=True)
  sorted_xN = jnp.take_along_axis(weights_xN, order_xN, axis=-1)
  before_xN = jnp.cumsum(sorted_xN, axis=-1) - sorted_xN
  keep_sorted_xN = before_xN <= p
  rank_xN = jnp.argsort(order_xN, axis=-1, stable=True)  # inverse permutation
  return jnp.take_along_axis(keep_sorted_xN, rank_xN, axis=-1)


def masks(logits_LxHxL: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Float 0/1 masks [L_reader, H, L_src] from the stacked static logits."""
  live_LxL = jnp.asarray(routing.live_mask(cfg.L, cfg.router_window, cfg.router_dilation).T)
  live_LxHxL = jnp.broadcast_to(live_LxL[:, None, :], logits_LxHxL.shape)
  weights_LxHxL = hr.masked_softmax(logits_LxHxL, live_LxHxL)
  return (keep_mask(weights_LxHxL, cfg.top_p) & live_LxHxL).astype(jnp.float32)


def kv_masks(push_LsrcxLxRxR: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Float 0/1 masks in the push layout [L_src, L_reader, R, R] from the stacked kv routers."""
  W_LxRxLsrcxR = routing.router_view(push_LsrcxLxRxR, cfg.router_window, cfg.router_dilation)
  L, R = W_LxRxLsrcxR.shape[:2]
  abs_LxRxN = jnp.abs(W_LxRxLsrcxR).reshape(L, R, L * R)
  total_LxRx1 = jnp.sum(abs_LxRxN, axis=-1, keepdims=True)
  mass_LxRxN = abs_LxRxN / jnp.where(total_LxRx1 > 0, total_LxRx1, 1.0)
  keep_LxRxLsrcxR = keep_mask(mass_LxRxN, cfg.top_p).reshape(L, R, L, R)
  return jnp.transpose(keep_LxRxLsrcxR, (2, 0, 1, 3)).astype(jnp.float32)


def refresh(params: dict[str, Any], cfg: ModelConfig, step: jax.Array) -> dict[str, Any]:
  """`params` with every layer's top_p_mask recomputed when step % top_p_refresh == 0."""
  if cfg.top_p is None:
    return params
  stacked = stack.stacked_layer_params(params, cfg)
  router = jax.lax.stop_gradient(stacked["router"])
  new_mask = kv_masks(router, cfg) if cfg.router == "kv-static" else masks(router, cfg)
  mask = jnp.where(step % cfg.top_p_refresh == 0, new_mask, stacked["top_p_mask"])
  return stack.with_stacked_layer_params(params, dict(stacked, top_p_mask=mask), cfg)
