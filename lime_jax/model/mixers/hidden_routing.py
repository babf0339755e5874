"""LIMe hidden-state routing (the paper's v1, `router: hidden-static | hidden-dynamic`).

States S_0 = the embeddings, S_j = the residual stream entering layer j. Layer l >= 1 reads
S_0..S_l, each through one extra RMSNorm (one per reader layer), mixes them per query head h with
softmax weights over its sources, and projects head h's mix with its own K and V matrices:

    mixed_l[h] = g_l * sum_j w_l[h, j] * unit(S_j),   K_l[h], V_l[h] = mixed_l[h] @ Wk_l[h], Wv_l[h]

where unit(x) = x / rms(x) and g_l is reader l's norm scale. The scale is per feature and the mix
is linear, so every reader can share one buffer of unit-normed states and apply its scale after
mixing: that is exactly "RMSNorm(S_j) with reader l's norm" for every j. Static routers hold
logits [H, L] per layer (init N(0, 1) * 0.1); dynamic ones a bias-free map [D, H, L] of the
layer's normed input to per-token logits. Layer 0 is a plain (MHA) baseline layer.

Memory. Push form (push.py) would need an accumulator slot per (reader, head): H times the
states, [L, H, B, T, D]. Pushing projected K/V instead is out, since each reader has its own
projections (a source would run every later reader's projection: L^2 / 2 of them). And dynamic
weights depend on the reader's input, so cannot be pushed at all. Both routers therefore carry
the buffer of unit states [L, B, T, D] and train with the pull form (pull.py, `pulls = True`):
memory linear in depth for one extra forward per layer in the backward.

All routing math runs in float32 whatever the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from lime_jax.model import push
from lime_jax.model.layers import dtype_of, logical, normal_init, rms_normalize
from lime_jax.model.mixers import kv_routing as routing
from lime_jax.model.mixers.base import Mixer, layer_rerun_flops_per_token


def num_router_params(L: int, D: int, H: int, router: str, window: int | None = None,
                      dilation: int | None = None) -> int:
  """Learnable router parameters: H per live (reader >= 1, source) pair for static logits,
  D * H for dynamic ones, plus one norm scale [D] per reader layer >= 1.

  Dense: live pairs = L(L+1)/2 - 1, so static H (L(L+1)/2 - 1) + (L-1) D.
  """
  pairs = num_live_pairs(L, window, dilation)
  per_pair = H if router == "hidden-static" else D * H
  return per_pair * pairs + (L - 1) * D


def num_live_pairs(L: int, window: int | None = None, dilation: int | None = None) -> int:
  """(reader i >= 1, source j <= i) pairs that sparse routing keeps; L(L+1)/2 - 1 when dense."""
  return int(routing.live_mask(L, window, dilation)[:, 1:].sum())


def source_mask(layer_idx, num_slots: int, window: int | None = None,
                dilation: int | None = None) -> jax.Array:
  """Bool [N]: the sources j < N that reader l reads (j <= l, and live under sparse routing)."""
  return routing.live(layer_idx, jnp.arange(num_slots), window, dilation)


def init_static_logits(rng: jax.Array, layer_idx, L: int, H: int, window: int | None = None,
                       dilation: int | None = None) -> jax.Array:
  """Logits [H, L]: N(0, 1) * 0.1 on reader l's live sources, zero (masked) elsewhere."""
  live_L = source_mask(layer_idx, L, window, dilation)
  return jnp.where(live_L[None, :], 0.1 * jax.random.normal(rng, (H, L), jnp.float32), 0.0)


def init_dynamic_router(rng: jax.Array, layer_idx, L: int, D: int, H: int,
                        window: int | None = None, dilation: int | None = None) -> jax.Array:
  """Map [D, H, L] ~ N(0, (0.1 / sqrt(D))^2) on live sources: the normed input has rms 1, so the
  initial logits have the static router's scale 0.1."""
  live_L = source_mask(layer_idx, L, window, dilation)
  w_DxHxL = jax.random.normal(rng, (D, H, L), jnp.float32) * (0.1 / D ** 0.5)
  return jnp.where(live_L[None, None, :], w_DxHxL, 0.0)


def masked_softmax(logits_xN: jax.Array, keep_N: jax.Array) -> jax.Array:
  """Softmax over the kept sources (last axis), exactly zero with zero gradient elsewhere."""
  logits_xN = jnp.where(keep_N, logits_xN.astype(jnp.float32), -jnp.inf)
  return jnp.where(keep_N, jax.nn.softmax(logits_xN, axis=-1), 0.0)


def mix(weights: jax.Array, buf_NxBxTxD: jax.Array, scale_D: jax.Array) -> jax.Array:
  """Per-head mixes [B, T, H, D] of the unit states; static weights [H, N] or dynamic [B, T, H, N]."""
  if weights.ndim == 2:
    mixed_BxTxHxD = jnp.einsum("hj,jbtd->bthd", weights, buf_NxBxTxD)
  else:
    mixed_BxTxHxD = jnp.einsum("bthj,jbtd->bthd", weights, buf_NxBxTxD)
  return mixed_BxTxHxD * scale_D.astype(jnp.float32)[None, None, None, :]


class _Scale(nn.Module):
  """A norm's scale [D] alone (the normalization is done once per state, in the buffer)."""

  D: int
  param_dtype: str

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param("scale", logical(nn.initializers.ones, "norm"), (self.D,),
                      dtype_of(self.param_dtype))


class HiddenRouting(Mixer):
  """`router: hidden-static | hidden-dynamic`. Carry: the buffer of unit-normed states
  [L, B, T, D] (float32); layer l writes unit(S_l) into slot l and reads slots 0..l.

  Per-layer parameters: source_norm (the extra norm's scale), router (static logits [H, L] or
  dynamic map [D, H, L]), kv_proj [D, H, 2, Hd] (per query head: R = H) and, with top-p pruning,
  a frozen top_p_mask [H, L] (top_p.py).
  """

  pulls = True
  exportable = False

  @property
  def static(self) -> bool:
    return self.cfg.router == "hidden-static"

  def start(self, stack: nn.Module, x_BxTxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    del stack
    return x_BxTxD, jnp.zeros((self.cfg.L,) + x_BxTxD.shape, jnp.float32)

  def pull_segments(self) -> list[tuple[int, int]]:
    """The pull form's segments (the nn.scan path has one: the routers are per reader layer)."""
    return push.segment_bounds(self.cfg.L, self.cfg.scan_segments)

  def kv(self, block: nn.Module, x_BxTxD: jax.Array, h_BxTxD: jax.Array, buf_NxBxTxD: jax.Array,
         layer_idx) -> tuple[jax.Array, jax.Array]:
    cfg = self.cfg
    buf_NxBxTxD = jax.lax.dynamic_update_index_in_dim(
        buf_NxBxTxD, rms_normalize(x_BxTxD, cfg.norm_eps), layer_idx, 0)
    read_NxBxTxD = buf_NxBxTxD
    if isinstance(layer_idx, int):  # unrolled: read only the written slots, the spec's work
      read_NxBxTxD = buf_NxBxTxD[:layer_idx + 1]
    N = read_NxBxTxD.shape[0]
    window, dilation = cfg.router_window, cfg.router_dilation
    keep_N = source_mask(layer_idx, N, window, dilation)
    scale_D = _Scale(cfg.D, cfg.param_dtype, name="source_norm")()
    if self.static:
      logits_HxL = block.param("router", logical(
          lambda rng: init_static_logits(rng, layer_idx, cfg.L, cfg.H, window, dilation),
          None, "sources"))
      keep_HxN = keep_N[None, :]
      if cfg.top_p is not None:  # frozen (optimizer group "frozen"), refreshed by top_p.py
        mask_HxL = block.param("top_p_mask", logical(nn.initializers.ones, None, "sources"),
                               (cfg.H, cfg.L), jnp.float32)
        keep_HxN = keep_HxN & (jax.lax.stop_gradient(mask_HxL[:, :N]) > 0.5)
      weights = masked_softmax(logits_HxL[:, :N], keep_HxN)
    else:
      router_DxHxL = block.param("router", logical(
          lambda rng: init_dynamic_router(rng, layer_idx, cfg.L, cfg.D, cfg.H, window, dilation),
          "embed", None, "sources"))
      logits_BxTxHxN = jnp.einsum("btd,dhj->bthj", h_BxTxD.astype(jnp.float32),
                                  router_DxHxL[:, :, :N].astype(jnp.float32))
      weights = masked_softmax(logits_BxTxHxN, keep_N[None, None, None, :])
    # Layer 0 is a plain baseline layer: every head reads the attention norm's output.
    own_BxTxHxD = jnp.broadcast_to(h_BxTxD.astype(jnp.float32)[:, :, None, :],
                                   h_BxTxD.shape[:2] + (cfg.H, cfg.D))
    if isinstance(layer_idx, int) and layer_idx == 0:
      mixed_BxTxHxD = own_BxTxHxD
    else:
      mixed_BxTxHxD = jnp.where(layer_idx == 0, own_BxTxHxD, mix(weights, read_NxBxTxD, scale_D))
    cdt = dtype_of(cfg.compute_dtype)
    kv_proj_DxHx2xHd = block.param("kv_proj", logical(normal_init, "embed", "kv_heads", None,
                                                      "head_dim"), (cfg.D, cfg.H, 2, cfg.Hd),
                                   dtype_of(cfg.param_dtype))
    kv_BxTxHx2xHd = jnp.einsum("bthd,dhck->bthck", mixed_BxTxHxD.astype(cdt),
                               kv_proj_DxHx2xHd.astype(cdt))
    return kv_BxTxHx2xHd, buf_NxBxTxD

  def extra_params(self) -> int:
    cfg = self.cfg
    return num_router_params(cfg.L, cfg.D, cfg.H, cfg.router, cfg.router_window,
                             cfg.router_dilation)

  def extra_macs_per_token(self) -> int:
    """Per live (reader >= 1, source) pair: the per-head mix H D, and for dynamic routers the
    logits D H too. Their per-head K/V projections (2 H D Hd per layer) are the baseline's kv
    projection with R = H, counted with the layer's parameters."""
    cfg = self.cfg
    pairs = num_live_pairs(cfg.L, cfg.router_window, cfg.router_dilation)
    return (1 if self.static else 2) * cfg.H * cfg.D * pairs

  def recompute_flops_per_token(self, forward_flops_per_token: int) -> int:
    """The pull-form backward re-runs every layer once (less the MLP's down projection and the
    unembedding, which the re-run does not need)."""
    return layer_rerun_flops_per_token(self.cfg, forward_flops_per_token)
