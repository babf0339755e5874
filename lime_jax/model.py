"""The decoder: a Llama baseline (`router: none`) and LIMe kv routing (`router: kv-static`).

Layers run under `nn.scan` (one compiled body whatever the depth) or unrolled
(`scan_layers=False`, a cross-check). LIMe threads a float32 accumulator
`acc_LxRxBxTx2xHd` through the layers; see `routing.py` for why it is push-form.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from lime_jax import routing
from lime_jax.config import ModelConfig
from lime_jax.layers import Attention, Mlp, RMSNorm, dtype_of, normal_init

STACK_NAME = "layers"  # scanned parameters: params[STACK_NAME][...] with a leading L axis

REMAT_POLICIES = {
    "full": None,  # save nothing inside the sub-block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_proj": jax.checkpoint_policies.save_only_these_names("q_proj", "mlp_hidden"),
}


def _maybe_remat(module_cls, cfg: ModelConfig):
  # Only sub-blocks that do not own the routing accumulator are rematerialized: a checkpoint
  # whose input is the accumulator would save one copy of it per layer (spec section 5).
  if cfg.remat_policy == "none":
    return module_cls
  return nn.remat(module_cls, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)


class Block(nn.Module):
  """One pre-norm decoder layer; with LIMe it also pushes its kv into the accumulator."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, acc_LxRxBxTx2xHd: jax.Array | None, layer_idx,
               positions_BxT: jax.Array):
    cfg = self.cfg
    pdt, cdt = dtype_of(cfg.param_dtype), dtype_of(cfg.compute_dtype)
    h_BxTxD = RMSNorm(cfg, name="attn_norm")(x_BxTxD)
    kv_init = _symmetric_uniform(1.0 / cfg.D ** 0.5) if cfg.is_lime else normal_init
    kv_proj_DxRx2xHd = self.param("kv_proj", kv_init, (cfg.D, cfg.R, 2, cfg.Hd), pdt)
    kv_BxTxRx2xHd = jnp.einsum("btd,drck->btrck", h_BxTxD, kv_proj_DxRx2xHd.astype(cdt))
    if cfg.is_lime:
      push_LxRxR = self.param(
          "router", lambda rng: routing.init_push_weights(rng, layer_idx, cfg.L, cfg.R))
      acc_LxRxBxTx2xHd, kv32_BxTxRx2xHd = routing.push_and_read(
          acc_LxRxBxTx2xHd, push_LxRxR, kv_BxTxRx2xHd, layer_idx)
      kv_BxTxRx2xHd = kv32_BxTxRx2xHd.astype(cdt)
    attention = _maybe_remat(Attention, cfg)(cfg, name="attn")
    x_BxTxD = x_BxTxD + attention(h_BxTxD, kv_BxTxRx2xHd, positions_BxT, positions_BxT)
    mlp = _maybe_remat(Mlp, cfg)(cfg, name="mlp")
    x_BxTxD = x_BxTxD + mlp(RMSNorm(cfg, name="mlp_norm")(x_BxTxD))
    return x_BxTxD, acc_LxRxBxTx2xHd


def _symmetric_uniform(bound: float):
  def init(rng, shape, dtype=jnp.float32):
    return jax.random.uniform(rng, shape, jnp.float32, -bound, bound).astype(dtype)
  return init


class _ScanBody(nn.Module):
  """Adapts Block to nn.scan's (carry, xs) -> (carry, ys) signature."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, carry, layer_idx, positions_BxT):
    x_BxTxD, acc_LxRxBxTx2xHd = carry
    carry = Block(self.cfg, name="block")(x_BxTxD, acc_LxRxBxTx2xHd, layer_idx, positions_BxT)
    return carry, None


class Transformer(nn.Module):
  """Token ids [B, T] -> float32 logits [B, T, V]."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    pdt = dtype_of(cfg.param_dtype)
    self.embed = self.param("embed", normal_init, (cfg.V, cfg.D), pdt)
    if not cfg.tie_embeddings:
      self.unembed = self.param("unembed", normal_init, (cfg.D, cfg.V), pdt)
    if cfg.scan_layers:
      self.stack = nn.scan(
          _ScanBody, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(0, nn.broadcast), length=cfg.L,
          unroll=min(cfg.scan_unroll, cfg.L))(cfg, name=STACK_NAME)
    else:
      self.blocks = [Block(cfg, name=f"layer_{l}") for l in range(cfg.L)]
    self.final_norm = RMSNorm(cfg)

  def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None) -> jax.Array:
    x_BxTxD = jnp.take(self.embed, tokens_BxT, axis=0).astype(dtype_of(self.cfg.compute_dtype))
    return self.from_embeddings(x_BxTxD, positions_BxT)

  def from_embeddings(self, x_BxTxD: jax.Array, positions_BxT: jax.Array | None = None) -> jax.Array:
    """Runs the layers and the head on given input embeddings (used by causality tests)."""
    cfg = self.cfg
    B, T, _ = x_BxTxD.shape
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
    acc_LxRxBxTx2xHd = None
    if cfg.is_lime:
      acc_LxRxBxTx2xHd = jnp.zeros((cfg.L, cfg.R, B, T, 2, cfg.Hd), jnp.float32)
    if cfg.scan_layers:
      (x_BxTxD, _), _ = self.stack((x_BxTxD, acc_LxRxBxTx2xHd), jnp.arange(cfg.L), positions_BxT)
    else:
      for l, block in enumerate(self.blocks):
        x_BxTxD, acc_LxRxBxTx2xHd = block(x_BxTxD, acc_LxRxBxTx2xHd, l, positions_BxT)
    h_BxTxD = self.final_norm(x_BxTxD)
    cdt = dtype_of(cfg.compute_dtype)
    unembed_DxV = self.embed.T if cfg.tie_embeddings else self.unembed
    return jnp.einsum("btd,dv->btv", h_BxTxD, unembed_DxV.astype(cdt),
                      preferred_element_type=jnp.float32)


def layer_params(params: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
  """The per-layer parameters stacked over layers (leading L axis), from either layout."""
  if cfg.scan_layers:
    return params[STACK_NAME]["block"]
  per_layer = [params[f"layer_{l}"] for l in range(cfg.L)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)


def to_scanned(params: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
  """Converts unrolled parameters (`layer_{l}`) to the scanned layout."""
  out = {k: v for k, v in params.items() if not k.startswith("layer_")}
  out[STACK_NAME] = {"block": layer_params(params, cfg.replace(scan_layers=False))}
  return out


def to_unrolled(params: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
  """Converts scanned parameters to the unrolled layout (`layer_{l}`)."""
  out = {k: v for k, v in params.items() if k != STACK_NAME}
  stacked = params[STACK_NAME]["block"]
  for l in range(cfg.L):
    out[f"layer_{l}"] = jax.tree.map(lambda x: x[l], stacked)
  return out


def router_weights(params: dict[str, Any], cfg: ModelConfig) -> jax.Array:
  """All routers as one masked W [L_reader, R, L_src, R] (spec section 2 notation)."""
  if not cfg.is_lime:
    raise ValueError(f"router_weights: model has router={cfg.router!r}, which has no kv router")
  return routing.router_view(layer_params(params, cfg)["router"])


def init_params(cfg: ModelConfig, rng: jax.Array, batch: int = 1) -> dict[str, Any]:
  tokens_BxT = jnp.zeros((batch, min(cfg.T, 8)), jnp.int32)
  return Transformer(cfg).init(rng, tokens_BxT)["params"]
