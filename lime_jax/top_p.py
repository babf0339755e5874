"""Top-p pruning of the static hidden router (spec section 3; `top_p`, `top_p_refresh`).

Per reader layer and head: softmax the logits over the live sources, sort, keep the smallest
prefix whose cumulative mass exceeds p (the largest weight always stays), and renormalize over
the kept sources (the model's masked softmax does that). p = 1 keeps everything.

The mask lives in the parameters as a frozen leaf `top_p_mask` [H, L] per layer (float 0/1):
the model reads it under stop_gradient, the optimizer gives it a zero update (group "frozen"),
so checkpoints, evaluation and decoding carry it with no extra state. `refresh` recomputes it
from the current logits at steps divisible by `top_p_refresh` (step 0 included) inside the
jitted train step, and leaves it unchanged on the others.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lime_jax import hidden_routing as hr
from lime_jax import model as M
from lime_jax import routing
from lime_jax.config import ModelConfig


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


def refresh(params: dict[str, Any], cfg: ModelConfig, step: jax.Array) -> dict[str, Any]:
  """`params` with every layer's top_p_mask recomputed when step % top_p_refresh == 0."""
  if cfg.top_p is None:
    return params
  stacked = M.stacked_layer_params(params, cfg)
  new_LxHxL = masks(jax.lax.stop_gradient(stacked["router"]), cfg)
  mask_LxHxL = jnp.where(step % cfg.top_p_refresh == 0, new_LxHxL, stacked["top_p_mask"])
  return M.with_stacked_layer_params(params, dict(stacked, top_p_mask=mask_LxHxL), cfg)
