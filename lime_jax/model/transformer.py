"""The decoder-only model: token ids [B, T] -> float32 logits [B, T, V].

Embedding, the layer stack (stack.py: the baseline and every cross-layer method, chosen by the
config through mixers/), final RMSNorm and the (tied) unembedding; `extend` is the cached
(decoding) path. `init_params` and `boxed_params` build the parameters; `router_weights` gives
LIMe's kv routers in the spec's notation.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from lime_jax.config import ModelConfig
from lime_jax.model.layers import KVCache, RMSNorm, dtype_of, logical, normal_init
from lime_jax.model.mixers import kv_routing
from lime_jax.model.stack import LayerStack, stacked_layer_params


class Transformer(nn.Module):
  """Token ids [B, T] -> float32 logits [B, T, V]; `extend` is the cached (decoding) path."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    pdt = dtype_of(cfg.param_dtype)
    self.embed = self.param("embed", logical(normal_init, "vocab", "embed"), (cfg.V, cfg.D), pdt)
    if not cfg.tie_embeddings:
      self.unembed = self.param("unembed", logical(normal_init, "embed", "vocab"), (cfg.D, cfg.V), pdt)
    self.layers = LayerStack(cfg)
    self.final_norm = RMSNorm(cfg)

  def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None) -> jax.Array:
    x_BxTxD = jnp.take(self.embed, tokens_BxT, axis=0).astype(dtype_of(self.cfg.compute_dtype))
    return self.from_embeddings(x_BxTxD, positions_BxT)

  def from_embeddings(self, x_BxTxD: jax.Array, positions_BxT: jax.Array | None = None) -> jax.Array:
    """Runs the layers and the head on given input embeddings (used by causality tests).

    Positions default to 0..T-1; others are refused with `attention_query_blocks` > 1, whose
    attention assumes them (layers.causal_attention), and attend in one block with None.
    """
    B, T, _ = x_BxTxD.shape
    blocks = self.cfg.attention_query_blocks
    positions_in_order = positions_BxT is None
    if positions_in_order:
      positions_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
    elif blocks is not None and blocks > 1:
      raise ValueError(f"Transformer: positions were given, but attention_query_blocks="
                       f"{blocks} assumes positions 0..T-1; set attention_query_blocks: 1"
                       f" (or null) to attend by positions alone")
    x_BxTxD, _ = self.layers(x_BxTxD, positions_BxT, positions_in_order=positions_in_order)
    return self._head(x_BxTxD)

  def extend(self, tokens_BxT: jax.Array, cache: KVCache,
             logit_index_B: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Appends tokens after each row's cached ones: (logits, cache advanced by T).

    Row b's tokens take positions length_B[b] + 0..T-1. Logits are [B, T, V], or [B, V] at
    chunk index logit_index_B[b] (a prompt's last token), which skips the other T-1 unembeds.
    """
    T = tokens_BxT.shape[1]
    x_BxTxD = jnp.take(self.embed, tokens_BxT, axis=0).astype(dtype_of(self.cfg.compute_dtype))
    positions_BxT = cache.length_B[:, None] + jnp.arange(T, dtype=cache.length_B.dtype)[None, :]
    x_BxTxD, cache = self.layers(x_BxTxD, positions_BxT, cache)
    cache = cache._replace(length_B=cache.length_B + T)
    if logit_index_B is None:
      return self._head(x_BxTxD), cache
    x_Bx1xD = jnp.take_along_axis(x_BxTxD, logit_index_B[:, None, None], axis=1)
    return self._head(x_Bx1xD)[:, 0], cache

  def _head(self, x_BxTxD: jax.Array) -> jax.Array:
    """Final norm and (tied) unembedding, float32 logits."""
    cfg = self.cfg
    h_BxTxD = self.final_norm(x_BxTxD)
    unembed_DxV = self.embed.T if cfg.tie_embeddings else self.unembed
    return jnp.einsum("btd,dv->btv", h_BxTxD, unembed_DxV.astype(dtype_of(cfg.compute_dtype)),
                      preferred_element_type=jnp.float32)


def router_weights(params: dict[str, Any], cfg: ModelConfig) -> jax.Array:
  """All kv routers as one masked W [L_reader, R, L_src, R] (spec section 2 notation)."""
  if cfg.router != "kv-static":
    raise ValueError(f"router_weights: model has router={cfg.router!r}, which has no kv router")
  return kv_routing.router_weights_of(stacked_layer_params(params, cfg), cfg)


def boxed_params(cfg: ModelConfig, rng: jax.Array) -> dict[str, Any]:
  """Parameters still boxed with their logical axis names (nn.LogicallyPartitioned leaves);
  `jax.eval_shape` of this gives the sharding rules their input without allocating."""
  tokens_BxT = jnp.zeros((1, min(cfg.T, 8)), jnp.int32)
  return Transformer(cfg).init(rng, tokens_BxT)["params"]


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict[str, Any]:
  """Plain parameter arrays, initialized as one compiled program (eager init compiles op by op)."""
  return jax.jit(lambda rng: nn.unbox(boxed_params(cfg, rng)))(rng)
