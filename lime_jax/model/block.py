"""The decoder: a Llama baseline (`router: none`) and LIMe kv routing (`router: kv-static`).

Layers run under `nn.scan` (one compiled body whatever the depth) or unrolled
(`scan_layers=False`, a cross-check). LIMe threads a float32 accumulator `acc_IxRxBxTx2xHd`,
one slot per reader layer I still to run, through the layers; `routing.py` says why.
Decoding threads a `KVCache` the same way, in the carry, so its layout [L, B, S, R, Hd] is one
whatever the scan layout and each layer updates its slots in place (see decode.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from lime_jax.model import connections
from lime_jax.model import kv_routing as routing
from lime_jax.config import HIDDEN_ROUTERS, ModelConfig
from lime_jax.model.layers import (Attention, KVCache, Mlp, RMSNorm, constrain, dtype_of, logical,
                             normal_init)

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
  """One pre-norm decoder layer; with LIMe it also pushes its kv into the accumulator.

  With a cache, the new tokens' routed kv is appended to it and attention reads the cache; the
  accumulator then spans only the new tokens, all that routing needs.
  """

  cfg: ModelConfig
  first_reader: int = 0  # the accumulator holds reader slots first_reader .. L-1

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, acc_IxRxBxTx2xHd: jax.Array | None, layer_idx,
               positions_BxT: jax.Array, cache: KVCache | None = None):
    cfg = self.cfg
    pdt, cdt = dtype_of(cfg.param_dtype), dtype_of(cfg.compute_dtype)
    # The residual stream: n copies [n, B, T, D] with hyper-connections (connections.py).
    stream = x_BxTxD
    x_BxTxD, mix = connections.enter(cfg, stream, 2 * layer_idx, "hc_attn")
    h_BxTxD = RMSNorm(cfg, name="attn_norm")(x_BxTxD)
    kv_init = _symmetric_uniform(1.0 / cfg.D ** 0.5) if cfg.is_lime else normal_init
    kv_proj_DxRx2xHd = self.param("kv_proj", logical(kv_init, "embed", "kv_heads", None, "head_dim"),
                                  (cfg.D, cfg.R, 2, cfg.Hd), pdt)
    kv_BxTxRx2xHd = jnp.einsum("btd,drck->btrck", h_BxTxD, kv_proj_DxRx2xHd.astype(cdt))
    if cfg.is_lime:
      push_LxRxR = self.param("router", logical(
          lambda rng: routing.init_push_weights(rng, layer_idx, cfg.L, cfg.R, cfg.router_window,
                                                cfg.router_dilation), "readers", None, None))
      if cfg.top_p is not None:  # frozen 0/1 mask (optimizer group "frozen"), see top_p.py
        mask_LxRxR = self.param("top_p_mask", logical(nn.initializers.ones, "readers", None, None),
                                (cfg.L, cfg.R, cfg.R), jnp.float32)
        push_LxRxR = push_LxRxR * jax.lax.stop_gradient(mask_LxRxR)
      # The push mixes over source heads: gather this layer's kv over `tensor` once (sharding.py).
      kv_BxTxRx2xHd = constrain(kv_BxTxRx2xHd, "batch", "length", None, None, "head_dim")
      acc_IxRxBxTx2xHd, kv32_BxTxRx2xHd = routing.push_and_read(
          acc_IxRxBxTx2xHd, push_LxRxR, kv_BxTxRx2xHd, layer_idx, self.first_reader,
          cfg.router_window, cfg.router_dilation)
      acc_IxRxBxTx2xHd = constrain(acc_IxRxBxTx2xHd, "readers", "kv_heads", "batch", "length",
                                   None, "head_dim")
      kv_BxTxRx2xHd = kv32_BxTxRx2xHd.astype(cdt)
    # Analysis hooks (analysis.py); no-ops unless the caller makes "intermediates" mutable.
    self.sow("intermediates", "values", kv_BxTxRx2xHd[:, :, :, 1])
    if cache is None:
      attention = _maybe_remat(Attention, cfg)(cfg, name="attn")
      attn_BxTxD, _ = attention(h_BxTxD, kv_BxTxRx2xHd, positions_BxT, positions_BxT)
    else:  # decoding takes no gradients, so no remat
      attn_BxTxD, cache = Attention(cfg, name="attn")(
          h_BxTxD, kv_BxTxRx2xHd, positions_BxT, positions_BxT, cache, layer_idx)
    stream = connections.leave(stream, attn_BxTxD, mix)
    x_BxTxD, mix = connections.enter(cfg, stream, 2 * layer_idx + 1, "hc_mlp")
    mlp = _maybe_remat(Mlp, cfg)(cfg, name="mlp")
    x_BxTxD = connections.leave(stream, mlp(RMSNorm(cfg, name="mlp_norm")(x_BxTxD)), mix)
    if cfg.connections == "denseformer":  # the accumulator is DenseFormer's [I, B, T, D] here
      x_BxTxD, acc_IxRxBxTx2xHd = connections.DepthWeightedAverage(
          cfg, self.first_reader, name="denseformer")(x_BxTxD, acc_IxRxBxTx2xHd, layer_idx)
    x_BxTxD = constrain(x_BxTxD, *connections.stream_axes(cfg))
    self.sow("intermediates", "hidden", connections.collapse(cfg, x_BxTxD))
    return x_BxTxD, acc_IxRxBxTx2xHd, cache


def _symmetric_uniform(bound: float):
  def init(rng, shape, dtype=jnp.float32):
    return jax.random.uniform(rng, shape, jnp.float32, -bound, bound).astype(dtype)
  return init


class _ScanBody(nn.Module):
  """Adapts Block to nn.scan's (carry, xs) -> (carry, ys) signature."""

  cfg: ModelConfig
  first_reader: int = 0

  @nn.compact
  def __call__(self, carry, layer_idx, positions_BxT):
    x_BxTxD, acc_IxRxBxTx2xHd, cache = carry
    block = Block(self.cfg, self.first_reader, name="block")
    return block(x_BxTxD, acc_IxRxBxTx2xHd, layer_idx, positions_BxT, cache), None


def scan_segments(cfg: ModelConfig) -> list[tuple[int, int]]:
  """[start, stop) layer ranges, one nn.scan each (the baseline and the hidden routers, whose
  parameters are per reader layer, need only one)."""
  pushes = cfg.router == "kv-static" or cfg.connections == "denseformer"
  return routing.segment_bounds(cfg.L, cfg.scan_segments if pushes else 1)


class LayerStack(nn.Module):
  """All L layers. Parameters: `segment_{b}/block/...` with a leading layer axis when scanned,
  `layer_{l}/...` when unrolled; `stacked_layer_params` gives one [L, ...] view of either.
  Returns (x, cache); the cache (all layers, in the carry) is None when not decoding."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array,
               cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    cfg = self.cfg
    B, T, _ = x_BxTxD.shape
    acc_IxRxBxTx2xHd = None
    if cfg.is_lime:
      acc_IxRxBxTx2xHd = constrain(jnp.zeros((cfg.L, cfg.R, B, T, 2, cfg.Hd), jnp.float32),
                                   "readers", "kv_heads", "batch", "length", None, "head_dim")
    if cfg.connections == "denseformer":
      acc_IxRxBxTx2xHd = connections.DenseFormerInput(cfg, name="denseformer_input")(x_BxTxD)
    x_BxTxD = connections.expand(cfg, x_BxTxD)
    if not cfg.scan_layers:
      for l in range(cfg.L):
        x_BxTxD, acc_IxRxBxTx2xHd, cache = Block(cfg, name=f"layer_{l}")(
            x_BxTxD, acc_IxRxBxTx2xHd, l, positions_BxT, cache)
      return connections.collapse(cfg, x_BxTxD), cache
    for b, (start, stop) in enumerate(scan_segments(cfg)):
      segment = nn.scan(
          _ScanBody, variable_axes={"params": 0}, split_rngs={"params": True},
          metadata_params={nn.PARTITION_NAME: "layers"},
          in_axes=(0, nn.broadcast), length=stop - start,
          unroll=min(cfg.scan_unroll, stop - start))(cfg, start, name=f"segment_{b}")
      (x_BxTxD, acc_IxRxBxTx2xHd, cache), _ = segment(
          (x_BxTxD, acc_IxRxBxTx2xHd, cache), jnp.arange(start, stop), positions_BxT)
      if acc_IxRxBxTx2xHd is not None:  # readers start..stop-1 have read their slots
        acc_IxRxBxTx2xHd = acc_IxRxBxTx2xHd[stop - start:]
    return connections.collapse(cfg, x_BxTxD), cache


def _layer_stack(cfg: ModelConfig) -> nn.Module:
  if cfg.router in HIDDEN_ROUTERS:  # the paper's v1, in its own module
    from lime_jax.model.hidden_stack import HiddenLayerStack  # pylint: disable=g-import-not-at-top
    return HiddenLayerStack(cfg)
  return LayerStack(cfg)


class Transformer(nn.Module):
  """Token ids [B, T] -> float32 logits [B, T, V]; `extend` is the cached (decoding) path."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    pdt = dtype_of(cfg.param_dtype)
    self.embed = self.param("embed", logical(normal_init, "vocab", "embed"), (cfg.V, cfg.D), pdt)
    if not cfg.tie_embeddings:
      self.unembed = self.param("unembed", logical(normal_init, "embed", "vocab"), (cfg.D, cfg.V), pdt)
    self.layers = _layer_stack(cfg)
    self.final_norm = RMSNorm(cfg)

  def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None) -> jax.Array:
    x_BxTxD = jnp.take(self.embed, tokens_BxT, axis=0).astype(dtype_of(self.cfg.compute_dtype))
    return self.from_embeddings(x_BxTxD, positions_BxT)

  def from_embeddings(self, x_BxTxD: jax.Array, positions_BxT: jax.Array | None = None) -> jax.Array:
    """Runs the layers and the head on given input embeddings (used by causality tests)."""
    B, T, _ = x_BxTxD.shape
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
    x_BxTxD, _ = self.layers(x_BxTxD, positions_BxT)
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


def stacked_layer_params(params: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
  """The per-layer parameters stacked over layers (leading L axis), from any layout.

  Keys: attn_norm/scale [L, D], kv_proj [L, D, R, 2, Hd], attn/q_proj [L, D, H, Hd],
  attn/o_proj [L, H, Hd, D], mlp_norm/scale, mlp/gate_up [L, D, 2, F], mlp/down [L, F, D],
  and for LIMe router [L_src, L_reader, R, R] (push layout, see routing.py).
  """
  layers = params["layers"]
  if cfg.scan_layers:
    parts = [layers[f"segment_{b}"]["block"] for b in range(len(scan_segments(cfg)))]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
  return jax.tree.map(lambda *xs: jnp.stack(xs), *[layers[f"layer_{l}"] for l in range(cfg.L)])


def with_stacked_layer_params(params: dict[str, Any], stacked: dict[str, Any],
                              cfg: ModelConfig) -> dict[str, Any]:
  """Returns `params` with its layers replaced by `stacked`, laid out as `cfg` expects."""
  if cfg.scan_layers:
    layers = {f"segment_{b}": {"block": jax.tree.map(lambda x: x[start:stop], stacked)}
              for b, (start, stop) in enumerate(scan_segments(cfg))}
  else:
    layers = {f"layer_{l}": jax.tree.map(lambda x: x[l], stacked) for l in range(cfg.L)}
  # Stack-level parameters (DenseFormer's embedding weights) are kept as they are.
  extra = {k: v for k, v in params.get("layers", {}).items()
           if not k.startswith(("segment_", "layer_"))}
  return {**params, "layers": {**extra, **layers}}


def convert_layout(params: dict[str, Any], from_cfg: ModelConfig,
                   to_cfg: ModelConfig) -> dict[str, Any]:
  """Re-lays parameters between scanned / unrolled / differently segmented configs."""
  return with_stacked_layer_params(params, stacked_layer_params(params, from_cfg), to_cfg)


def router_weights(params: dict[str, Any], cfg: ModelConfig) -> jax.Array:
  """All routers as one masked W [L_reader, R, L_src, R] (spec section 2 notation)."""
  if cfg.router != "kv-static":
    raise ValueError(f"router_weights: model has router={cfg.router!r}, which has no kv router")
  stacked = stacked_layer_params(params, cfg)
  push_LsrcxLxRxR = stacked["router"]
  if "top_p_mask" in stacked:  # top-p pruned entries are zero, as the model uses them
    push_LsrcxLxRxR = push_LsrcxLxRxR * stacked["top_p_mask"]
  return routing.router_view(push_LsrcxLxRxR, cfg.router_window, cfg.router_dilation)


def boxed_params(cfg: ModelConfig, rng: jax.Array) -> dict[str, Any]:
  """Parameters still boxed with their logical axis names (nn.LogicallyPartitioned leaves);
  `jax.eval_shape` of this gives the sharding rules their input without allocating."""
  tokens_BxT = jnp.zeros((1, min(cfg.T, 8)), jnp.int32)
  return Transformer(cfg).init(rng, tokens_BxT)["params"]


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict[str, Any]:
  """Plain parameter arrays, initialized as one compiled program (eager init compiles op by op)."""
  return jax.jit(lambda rng: nn.unbox(boxed_params(cfg, rng)))(rng)
