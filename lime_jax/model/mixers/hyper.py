"""Cross-layer baselines that LIMe is compared against (config `connections`, router `none`).

Hyper-Connections (Zhu et al., arXiv 2409.19606; `hyper-static`, `hyper-dynamic`). The residual
stream becomes n copies H [n, B, T, D] (n = `hc_expansion`), all equal to the embeddings at the
start; the stack's output is their sum. Every sub-layer k (attention and MLP count separately,
k = 2l and 2l+1) reads a mix of the copies and writes its output back into each copy:

    x = sum_m A_m[m] H_m                                  (width connection: the input)
    H'_c = sum_m A_r[m, c] H_m + B[c] T_k(x)              (depth connection)

Static: A = [A_m | A_r] [n, n+1] initialized [e_(k mod n) | I], B [n] initialized 1.
Dynamic: A and B also get s * tanh(norm(H) W) per token and copy, with W zero-initialized,
scale s = 0.01 learnable, and a non-affine RMSNorm per copy. At init both equal the pre-norm
residual stream: every copy holds the baseline's hidden state, and the sum of the n copies at
the end differs from the baseline's state only by the factor n, which the final RMSNorm removes
(up to its eps). So the logits equal the baseline's to float rounding.

DenseFormer (Pagliardini et al., arXiv 2402.02622; `denseformer`). With X_0 the embeddings and
X_{l+1} the output of block l, the input of block l+1 (and the final output after the last
block) is the depth-weighted average Y_l = sum_j alpha[l, j] X_j over sources j <= l+1 with
(l+1-j) % dilation == 0, present only after blocks with (l+1) % period == 0 (elsewhere
Y_l = X_{l+1}). alpha starts at 1 on X_{l+1} and 0 elsewhere: the plain model, exactly.

Memory. Carrying all X_j and reading them at every layer is the spec's L^2 trap (section 5).
DenseFormer uses the push form of routing.py instead: source j adds alpha[i, j] X_j into one
float32 slot per later reader i, then block l reads slot l; a hand-written VJP keeps the
accumulator out of the saved residuals, so training memory stays linear in depth. The push
weights are stored by source (block l owns alpha[:, l+1], the stack owns alpha[:, 0]).
Hyper-connections carry n x D per layer boundary, which is linear by construction.

Mixing math is float32; outputs return in the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from lime_jax.config import ModelConfig
from lime_jax.model.layers import dtype_of, logical
from lime_jax.model.kv_routing import static_slots

HYPER = ("hyper-static", "hyper-dynamic")
HC_DYNAMIC_SCALE = 0.01


def is_hyper(cfg: ModelConfig) -> bool:
  return cfg.connections in HYPER


def has_accumulator(cfg: ModelConfig) -> bool:
  """Whether the stack carries a push accumulator (LIMe routing or DenseFormer)."""
  return cfg.is_lime or cfg.connections == "denseformer"


# ---------------------------------------------------------------------------------------------
# Hyper-connections.

def hc_static_init(sublayer_idx, n: int) -> jax.Array:
  """[A_m | A_r] [n, n+1] = [e_(k mod n) | I_n] for sub-layer k (a Python int or traced)."""
  a_m_N = (jnp.arange(n) == sublayer_idx % n).astype(jnp.float32)
  return jnp.concatenate([a_m_N[:, None], jnp.eye(n, dtype=jnp.float32)], axis=1)


def num_hc_params(cfg: ModelConfig) -> int:
  """Static: A [n, n+1] and B [n] per sub-layer; dynamic adds W_A [D, n+1], W_B [D] and two
  scales. Two sub-layers (attention, MLP) per layer."""
  if not is_hyper(cfg):
    return 0
  n = cfg.hc_expansion
  per_sublayer = n * (n + 1) + n
  if cfg.connections == "hyper-dynamic":
    per_sublayer += cfg.D * (n + 1) + cfg.D + 2
  return 2 * cfg.L * per_sublayer


def _rms_norm_no_scale(x32: jax.Array, eps: float) -> jax.Array:
  return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


class HyperConnection(nn.Module):
  """Width connection of one sub-layer: H [n, B, T, D] -> (input x [B, T, D], mix); `leave`
  applies the depth connection with `mix`. Parameters: hc_alpha [n, n+1], hc_beta [n], and
  for the dynamic variant hc_alpha_proj [D, n+1], hc_beta_proj [D], hc_alpha_scale,
  hc_beta_scale."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, H_NxBxTxD: jax.Array, sublayer_idx):
    cfg = self.cfg
    n, (_, B, T, D) = cfg.hc_expansion, H_NxBxTxD.shape
    alpha_NxK = self.param("hc_alpha", logical(lambda rng: hc_static_init(sublayer_idx, n),
                                               None, None))
    beta_N = self.param("hc_beta", logical(nn.initializers.ones, None), (n,), jnp.float32)
    H32_NxBxTxD = H_NxBxTxD.astype(jnp.float32)
    alpha_BxTxNxK = jnp.broadcast_to(alpha_NxK, (B, T, n, n + 1))
    beta_BxTxN = jnp.broadcast_to(beta_N, (B, T, n))
    if cfg.connections == "hyper-dynamic":
      alpha_proj_DxK = self.param("hc_alpha_proj", logical(nn.initializers.zeros, "embed", None),
                                  (D, n + 1), jnp.float32)
      beta_proj_D = self.param("hc_beta_proj", logical(nn.initializers.zeros, "embed"), (D,),
                               jnp.float32)
      scale_init = nn.initializers.constant(HC_DYNAMIC_SCALE)
      alpha_scale = self.param("hc_alpha_scale", logical(scale_init), (), jnp.float32)
      beta_scale = self.param("hc_beta_scale", logical(scale_init), (), jnp.float32)
      normed_NxBxTxD = _rms_norm_no_scale(H32_NxBxTxD, cfg.norm_eps)
      alpha_BxTxNxK = alpha_BxTxNxK + alpha_scale * jnp.tanh(
          jnp.einsum("nbtd,dk->btnk", normed_NxBxTxD, alpha_proj_DxK))
      beta_BxTxN = beta_BxTxN + beta_scale * jnp.tanh(
          jnp.einsum("nbtd,d->btn", normed_NxBxTxD, beta_proj_D))
    x_BxTxD = jnp.einsum("btn,nbtd->btd", alpha_BxTxNxK[..., 0], H32_NxBxTxD)
    residual_NxBxTxD = jnp.einsum("btmn,mbtd->nbtd", alpha_BxTxNxK[..., 1:], H32_NxBxTxD)
    return x_BxTxD.astype(dtype_of(cfg.compute_dtype)), (beta_BxTxN, residual_NxBxTxD)


def enter(cfg: ModelConfig, stream, sublayer_idx, name: str):
  """A sub-layer's input from the residual stream: (x [B, T, D], mix or None).

  Call inside a compact module: the hyper-connection (if any) becomes its child `name`.
  """
  if not is_hyper(cfg):
    return stream, None
  return HyperConnection(cfg, name=name)(stream, sublayer_idx)


def leave(stream, out_BxTxD: jax.Array, mix):
  """The residual stream after a sub-layer with output `out`: the plain residual add, or the
  hyper-connection's depth connection."""
  if mix is None:
    return stream + out_BxTxD
  beta_BxTxN, residual_NxBxTxD = mix
  H32_NxBxTxD = residual_NxBxTxD + jnp.einsum("btn,btd->nbtd", beta_BxTxN,
                                              out_BxTxD.astype(jnp.float32))
  return H32_NxBxTxD.astype(stream.dtype)


def expand(cfg: ModelConfig, x_BxTxD: jax.Array):
  """The stack's input stream: n copies of the embeddings with hyper-connections."""
  if not is_hyper(cfg):
    return x_BxTxD
  return jnp.broadcast_to(x_BxTxD, (cfg.hc_expansion,) + x_BxTxD.shape)


def collapse(cfg: ModelConfig, stream) -> jax.Array:
  """The stack's output: the sum of the copies with hyper-connections (as the paper does)."""
  if not is_hyper(cfg):
    return stream
  return stream.astype(jnp.float32).sum(axis=0).astype(stream.dtype)


# ---------------------------------------------------------------------------------------------
# DenseFormer.

def dwa_live_mask(L: int, dilation: int = 1, period: int = 1) -> np.ndarray:
  """Boolean [L+1 sources, L readers]: True where alpha[i, j] is a parameter.

  Reader i is the average after block i (source j = i+1 is that block's output, j = 0 the
  embeddings); readers with (i+1) % period != 0 have no average and no parameters.
  """
  source_Sx1, reader_1xL = np.arange(L + 1)[:, None], np.arange(L)[None, :]
  return ((source_Sx1 <= reader_1xL + 1) & ((reader_1xL + 1 - source_Sx1) % dilation == 0)
          & ((reader_1xL + 1) % period == 0))


def num_denseformer_params(cfg: ModelConfig) -> int:
  """L(L+3)/2 for the 1x1 DenseFormer (the paper's count); fewer with dilation or period."""
  if cfg.connections != "denseformer":
    return 0
  return int(dwa_live_mask(cfg.L, cfg.denseformer_dilation, cfg.denseformer_period).sum())


def _dwa_effective(cfg: ModelConfig, stored_L: jax.Array, source) -> jax.Array:
  """Push weights of source j over readers [L]: the stored ones where live, else the fixed
  identity (1 for reader j-1 when it has no average, 0 elsewhere)."""
  reader_L = jnp.arange(cfg.L)
  period, dilation = cfg.denseformer_period, cfg.denseformer_dilation
  has_dwa_L = (reader_L + 1) % period == 0
  live_L = (source <= reader_L + 1) & ((reader_L + 1 - source) % dilation == 0) & has_dwa_L
  fixed_L = (~has_dwa_L & (reader_L + 1 == source)).astype(jnp.float32)
  return jnp.where(live_L, stored_L.astype(jnp.float32), fixed_L)


def _dwa_init(cfg: ModelConfig, source):
  """alpha[i, j] = 1 for j == i+1 (the block's own output), 0 elsewhere: the plain model."""
  return lambda rng: (jnp.arange(cfg.L) + 1 == source).astype(jnp.float32)


class DenseFormerInput(nn.Module):
  """Starts the accumulator [L, B, T, D] with the embeddings' weighted contributions."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    cfg = self.cfg
    stored_L = self.param("dwa", logical(_dwa_init(cfg, 0), "readers"))
    weights_L = _dwa_effective(cfg, stored_L, 0)
    return weights_L[:, None, None, None] * x_BxTxD.astype(jnp.float32)[None]


class DepthWeightedAverage(nn.Module):
  """After block l: pushes X_{l+1} into every later reader's slot and returns (Y_l, acc).

  The accumulator holds readers first_reader .. L-1 (earlier ones have read theirs). With a
  Python-int layer index (unrolled) only live slots are touched; under nn.scan every slot.
  """

  cfg: ModelConfig
  first_reader: int = 0

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, acc_IxBxTxD: jax.Array, layer_idx):
    cfg = self.cfg
    stored_L = self.param("dwa", logical(_dwa_init(cfg, layer_idx + 1), "readers"))
    weights_I = _dwa_effective(cfg, stored_L, layer_idx + 1)[self.first_reader:]
    x32_BxTxD = x_BxTxD.astype(jnp.float32)
    if isinstance(layer_idx, int):
      slot = layer_idx - self.first_reader
      live_I = np.asarray(dwa_live_mask(cfg.L, cfg.denseformer_dilation, cfg.denseformer_period)
                          [layer_idx + 1, self.first_reader:])
      live_I[slot] = True
      readers_I = np.flatnonzero(live_I)
      slots = static_slots(readers_I)
      acc_IxBxTxD = acc_IxBxTxD.at[slots].add(weights_I[slots][:, None, None, None] * x32_BxTxD[None])
      y_BxTxD = acc_IxBxTxD[slot]
    else:
      acc_IxBxTxD, y_BxTxD = _push_read(acc_IxBxTxD, weights_I, x32_BxTxD,
                                        layer_idx - self.first_reader)
    return y_BxTxD.astype(x_BxTxD.dtype), acc_IxBxTxD


@jax.custom_vjp
def _push_read(acc_IxBxTxD, weights_I, x_BxTxD, slot):
  """acc + weights (x) x, and slot `slot` of the result (traced-index form for nn.scan)."""
  acc_IxBxTxD = acc_IxBxTxD + weights_I[:, None, None, None] * x_BxTxD[None]
  return acc_IxBxTxD, jax.lax.dynamic_index_in_dim(acc_IxBxTxD, slot, 0, keepdims=False)


def _push_read_fwd(acc_IxBxTxD, weights_I, x_BxTxD, slot):
  return _push_read(acc_IxBxTxD, weights_I, x_BxTxD, slot), (weights_I, x_BxTxD, slot)


def _push_read_bwd(residuals, cotangents):
  # As routing._push_read_bwd: the read's cotangent lands in its slot in place, and the
  # accumulator itself is never saved.
  weights_I, x_BxTxD, slot = residuals
  dacc_IxBxTxD, dy_BxTxD = cotangents
  slot_BxTxD = jax.lax.dynamic_index_in_dim(dacc_IxBxTxD, slot, 0, keepdims=False)
  dacc_IxBxTxD = jax.lax.dynamic_update_index_in_dim(dacc_IxBxTxD, slot_BxTxD + dy_BxTxD, slot, 0)
  dweights_I = jnp.einsum("ibtd,btd->i", dacc_IxBxTxD, x_BxTxD)
  dx_BxTxD = jnp.einsum("i,ibtd->btd", weights_I, dacc_IxBxTxD)
  return dacc_IxBxTxD, dweights_I, dx_BxTxD, None


_push_read.defvjp(_push_read_fwd, _push_read_bwd)


def dwa_weights(stacked_dwa_LxL: jax.Array, embed_dwa_L: jax.Array, cfg: ModelConfig) -> jax.Array:
  """All DenseFormer weights as one masked alpha [L_reader, L+1 sources] (paper layout).

  Takes the block-stored push weights stacked over blocks [L, L_reader] and the stack's [L].
  """
  stored_SxL = jnp.concatenate([embed_dwa_L[None], stacked_dwa_LxL], axis=0)
  effective_SxL = jax.vmap(lambda w, j: _dwa_effective(cfg, w, j))(stored_SxL,
                                                                  jnp.arange(cfg.L + 1))
  return effective_SxL.T


def stream_axes(cfg: ModelConfig) -> tuple[str | None, ...]:
  """Logical axis names of the residual stream between layers (for sharding constraints)."""
  return ((None,) if is_hyper(cfg) else ()) + ("batch", "length", "act_embed")
