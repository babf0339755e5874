"""The layer stack for hidden-state routers (`router: hidden-static | hidden-dynamic`).

Parameters are laid out as the core's: `segment_0/block/...` with a leading layer axis when
scanned (one segment: the routers are per reader layer, so no push layout), `layer_{l}/...`
unrolled, so `model.stacked_layer_params` and friends work unchanged. Per layer:
attn_norm, source_norm (the extra norm on the read states), router (static logits [H, L] or
dynamic map [D, H, L]), kv_proj [D, H, 2, Hd] (per query head: R = H), attn, mlp_norm, mlp, and
with top-p pruning a frozen top_p_mask [H, L] (top_p.py).

Training runs the pull-form stack of hidden_routing.py (memory linear in depth). Init, decoding
(the buffer then spans only the new tokens, all that mixing per position needs), analysis
(sown intermediates) and `naive=True` run the plain nn.scan that carries the buffer, whose
autodiff saves it once per layer: the reference the pull form is tested against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import flax.linen as nn

from lime_jax.model import hidden_routing as hr
from lime_jax.model import transformer as model_lib
from lime_jax.config import ModelConfig
from lime_jax.model.layers import Attention, KVCache, Mlp, RMSNorm, dtype_of, logical, normal_init


class _Scale(nn.Module):
  """A norm's scale [D] alone (the normalization is done once per state, see hidden_routing)."""

  D: int
  param_dtype: str

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param("scale", logical(nn.initializers.ones, "norm"), (self.D,),
                      dtype_of(self.param_dtype))


class HiddenBlock(nn.Module):
  """One pre-norm layer whose K/V come from per-head mixes of the unit states in `buf`.

  Writes unit(x) into slot `layer_idx` of the buffer [N, B, T, D] and reads slots 0..layer_idx.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, buf_NxBxTxD: jax.Array, layer_idx,
               positions_BxT: jax.Array, cache: KVCache | None = None):
    cfg = self.cfg
    pdt, cdt = dtype_of(cfg.param_dtype), dtype_of(cfg.compute_dtype)
    h_BxTxD = RMSNorm(cfg, name="attn_norm")(x_BxTxD)
    buf_NxBxTxD = jax.lax.dynamic_update_index_in_dim(
        buf_NxBxTxD, hr.unit_rms(x_BxTxD, cfg.norm_eps), layer_idx, 0)
    read_NxBxTxD = buf_NxBxTxD
    if isinstance(layer_idx, int):  # unrolled: read only the written slots, the spec's work
      read_NxBxTxD = buf_NxBxTxD[:layer_idx + 1]
    N = read_NxBxTxD.shape[0]
    window, dilation = cfg.router_window, cfg.router_dilation
    keep_N = hr.source_mask(layer_idx, N, window, dilation)
    scale_D = _Scale(cfg.D, cfg.param_dtype, name="source_norm")()
    if cfg.router == "hidden-static":
      logits_HxL = self.param("router", logical(
          lambda rng: hr.init_static_logits(rng, layer_idx, cfg.L, cfg.H, window, dilation),
          None, "sources"))
      keep_HxN = keep_N[None, :]
      if cfg.top_p is not None:  # frozen (optimizer group "frozen"), refreshed by top_p.py
        mask_HxL = self.param("top_p_mask", logical(nn.initializers.ones, None, "sources"),
                              (cfg.H, cfg.L), jnp.float32)
        keep_HxN = keep_HxN & (jax.lax.stop_gradient(mask_HxL[:, :N]) > 0.5)
      weights = hr.masked_softmax(logits_HxL[:, :N], keep_HxN)
    else:
      router_DxHxL = self.param("router", logical(
          lambda rng: hr.init_dynamic_router(rng, layer_idx, cfg.L, cfg.D, cfg.H, window, dilation),
          "embed", None, "sources"))
      logits_BxTxHxN = jnp.einsum("btd,dhj->bthj", h_BxTxD.astype(jnp.float32),
                                  router_DxHxL[:, :, :N].astype(jnp.float32))
      weights = hr.masked_softmax(logits_BxTxHxN, keep_N[None, None, None, :])
    # Layer 0 is a plain baseline layer: every head reads the attention norm's output.
    own_BxTxHxD = jnp.broadcast_to(h_BxTxD.astype(jnp.float32)[:, :, None, :],
                                   h_BxTxD.shape[:2] + (cfg.H, cfg.D))
    if isinstance(layer_idx, int) and layer_idx == 0:
      mixed_BxTxHxD = own_BxTxHxD
    else:
      mixed_BxTxHxD = jnp.where(layer_idx == 0, own_BxTxHxD, hr.mix(weights, read_NxBxTxD, scale_D))
    kv_proj_DxHx2xHd = self.param("kv_proj", logical(normal_init, "embed", "kv_heads", None,
                                                     "head_dim"), (cfg.D, cfg.H, 2, cfg.Hd), pdt)
    kv_BxTxHx2xHd = jnp.einsum("bthd,dhck->bthck", mixed_BxTxHxD.astype(cdt),
                               kv_proj_DxHx2xHd.astype(cdt))
    self.sow("intermediates", "values", kv_BxTxHx2xHd[:, :, :, 1])
    if cache is None:
      attention = model_lib._maybe_remat(Attention, cfg)(cfg, name="attn")  # pylint: disable=protected-access
      attn_BxTxD, _ = attention(h_BxTxD, kv_BxTxHx2xHd, positions_BxT, positions_BxT)
    else:
      attn_BxTxD, cache = Attention(cfg, name="attn")(
          h_BxTxD, kv_BxTxHx2xHd, positions_BxT, positions_BxT, cache, layer_idx)
    x_BxTxD = x_BxTxD + attn_BxTxD
    mlp = model_lib._maybe_remat(Mlp, cfg)(cfg, name="mlp")  # pylint: disable=protected-access
    x_BxTxD = x_BxTxD + mlp(RMSNorm(cfg, name="mlp_norm")(x_BxTxD))
    self.sow("intermediates", "hidden", x_BxTxD)
    return x_BxTxD, buf_NxBxTxD, cache


class _HiddenScanBody(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, carry, layer_idx, positions_BxT):
    x_BxTxD, buf_LxBxTxD, cache = carry
    return HiddenBlock(self.cfg, name="block")(x_BxTxD, buf_LxBxTxD, layer_idx, positions_BxT,
                                               cache), None


def _apply_block(cfg: ModelConfig, params_l, x_BxTxD, buf_NxBxTxD, layer_idx, positions_BxT):
  x_BxTxD, buf_NxBxTxD, _ = HiddenBlock(cfg).apply({"params": params_l}, x_BxTxD, buf_NxBxTxD,
                                                   layer_idx, positions_BxT)
  return x_BxTxD, buf_NxBxTxD


class HiddenLayerStack(nn.Module):
  """All L layers; returns (x, cache) like model.LayerStack."""

  cfg: ModelConfig
  naive: bool = False  # autodiff through the carried buffer (tests' reference; memory ~ L^2)

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array,
               cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    cfg = self.cfg
    buf_LxBxTxD = jnp.zeros((cfg.L,) + x_BxTxD.shape, jnp.float32)
    if not cfg.scan_layers:
      for l in range(cfg.L):
        x_BxTxD, buf_LxBxTxD, cache = HiddenBlock(cfg, name=f"layer_{l}")(
            x_BxTxD, buf_LxBxTxD, l, positions_BxT, cache)
      return x_BxTxD, cache
    pull = not (self.naive or cache is not None or self.is_initializing()
                or self.is_mutable_collection("intermediates"))
    if pull:
      params_L = nn.unbox(self.variables["params"]["segment_0"]["block"])
      bounds = tuple(model_lib.routing.segment_bounds(cfg.L, cfg.scan_segments))
      x_BxTxD = hr.pull_stack(functools.partial(_apply_block, cfg), bounds, cfg.scan_unroll,
                              params_L, x_BxTxD, positions_BxT)
      return x_BxTxD, None
    segment = nn.scan(
        _HiddenScanBody, variable_axes={"params": 0}, split_rngs={"params": True},
        metadata_params={nn.PARTITION_NAME: "layers"},
        in_axes=(0, nn.broadcast), length=cfg.L,
        unroll=min(cfg.scan_unroll, cfg.L))(cfg, name="segment_0")
    (x_BxTxD, _, cache), _ = segment((x_BxTxD, buf_LxBxTxD, cache), jnp.arange(cfg.L),
                                     positions_BxT)
    return x_BxTxD, cache
