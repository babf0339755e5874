"""Manifold-Constrained Hyper-Connections (mHC; Xie et al., DeepSeek, arXiv 2512.24880;
`connections: mhc`), a cross-layer baseline LIMe is compared against (router `none`).

Hyper-Connections (hyper.py) with the residual mixing matrix kept doubly stochastic. The stream
is n copies x [n, B, T, D] (n = `hc_expansion`, at least 2), all equal to the embeddings at the
start; the stack's output is their sum (as hyper.py). Per sub-layer k (k = 2l attention,
2l+1 MLP), per token, the paper's equations:

    x~      = x_flat / rms(x_flat)                  x_flat = vec(x) [n D]; see "norm" below
    H~_pre  = a_pre  (x~ phi_pre)  + b_pre          [n]
    H~_post = a_post (x~ phi_post) + b_post         [n]
    H~_res  = a_res  mat(x~ phi_res) + b_res        [n, n]
    H_pre = sigmoid(H~_pre), H_post = 2 sigmoid(H~_post), H_res = SinkhornKnopp(exp(H~_res))
    x'_c  = sum_m H_res[c, m] x_m + H_post[c] F(sum_m H_pre[m] x_m)

H_res acts as the paper writes it, H_res x (MaxText applies its transpose; with learned phi and
b the two are the same family, up to which of row or column sums is exact).

Sinkhorn-Knopp (the paper's M(t) = T_c(T_r(M(t-1))), M(0) = exp(H~_res), t_max =
`sinkhorn_iterations`, default 20) runs in log space in float32: each step subtracts the
row-wise, then the column-wise logsumexp. exp is taken only of the final logs (<= 0), so it
never overflows, and at init and moderate logits no entry underflows to an exact zero (the
collapse onto a permutation, with zero gradients, that users of linear-space Sinkhorn report).
Columns sum to 1 to float rounding after every step; rows converge, slowest near a permutation
(tests/test_mhc.py states the measured tolerances).

Norm: the paper's RMSNorm over the flattened n D stream, without a learned scale (it would only
rescale the rows of phi). Following the paper's own reordering, the stream is projected first and
the per-token 1/rms applied to the [n^2 + 2n] result, so no normalized copy of the stream is
made.

Init: gating scalars a = 0.01 (small gating factors, as the paper starts them); phi ~ N(0, 1/(n D))
(fan-in), so a x~ phi starts at about 0.01 and every parameter has a gradient; b_pre = -log(n - 1),
so sigmoid = 1/n and the layer reads the mean of the copies; b_post = 0, so H_post = 1; b_res =
log(d I + (1 - d)/(n - 1) (J - I)) with d = RES_INIT_DIAGONAL = 0.9, a doubly stochastic matrix
near the identity (a fixed point of Sinkhorn-Knopp), not the exact identity, whose off-diagonal
logits would be -inf. With phi = 0 every copy holds the baseline's hidden state, so the model
equals the baseline up to the final RMSNorm's eps and float rounding (the n-fold sum at the end is
removed by the final norm, as for hyper.py).

Optimizer: every parameter is named hc_* and so is in the `no_decay` group (main lr): decay
would pull the gates and biases away from their near-identity init; the paper does not single
out phi, which we keep with them as hyper.py does its dynamic projections.

Memory: the stream is n x D per layer boundary, linear in depth by construction; Sinkhorn's
saved intermediates are [B, T, n, n] per step. Mixing math is float32 (in bf16 runs the maps
read a float32 copy of the stream, as hyper.py's do); outputs return in the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import flax.linen as nn

from lime_jax.config import ModelConfig
from lime_jax.model.layers import dtype_of, logical, maybe_remat
from lime_jax.model.mixers.base import straight_line
from lime_jax.model.mixers.hyper import HyperConnections

GATE_INIT = 0.01
RES_INIT_DIAGONAL = 0.9


def sinkhorn(log_M_xNxN: jax.Array, iterations: int) -> jax.Array:
  """SinkhornKnopp(exp(log_M)) over the last two axes: `iterations` steps of row then column
  normalization, in log space and float32."""
  def step(_, log_M_xNxN):
    log_M_xNxN = log_M_xNxN - jax.nn.logsumexp(log_M_xNxN, axis=-1, keepdims=True)
    return log_M_xNxN - jax.nn.logsumexp(log_M_xNxN, axis=-2, keepdims=True)

  # A loop, not unrolled: one small body compiles fast whatever the number of steps.
  return jnp.exp(jax.lax.fori_loop(0, iterations, step, log_M_xNxN.astype(jnp.float32)))


def res_bias_init(n: int) -> jax.Array:
  """b_res [n, n]: the log of d I + (1 - d)/(n - 1) (J - I), d = RES_INIT_DIAGONAL."""
  off = (1.0 - RES_INIT_DIAGONAL) / (n - 1)
  return jnp.log(jnp.where(jnp.eye(n, dtype=bool), RES_INIT_DIAGONAL, off)).astype(jnp.float32)


class ManifoldHyperConnection(nn.Module):
  """One sub-layer's maps: stream x [n, B, T, D] -> (input [B, T, D], (H_post, H_res x)); the
  residual update is HyperConnections.leave. Parameters: hc_phi [n, D, n^2 + 2n] (columns:
  pre n, post n, res n^2 row-major), hc_gate [3] (a_pre, a_post, a_res), hc_bias_pre [n],
  hc_bias_post [n], hc_bias_res [n, n]."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_NxBxTxD: jax.Array, sublayer_idx):
    del sublayer_idx  # every sub-layer starts alike
    cfg = self.cfg
    n, D = cfg.hc_expansion, cfg.D
    K = n * n + 2 * n
    phi_NxDxK = self.param("hc_phi", logical(nn.initializers.normal(1.0 / math.sqrt(n * D)),
                                             None, "embed", None), (n, D, K), jnp.float32)
    gate_3 = self.param("hc_gate", logical(nn.initializers.constant(GATE_INIT), None), (3,),
                        jnp.float32)
    bias_pre_N = self.param("hc_bias_pre", logical(nn.initializers.constant(-math.log(n - 1)),
                                                   None), (n,), jnp.float32)
    bias_post_N = self.param("hc_bias_post", logical(nn.initializers.zeros, None), (n,),
                             jnp.float32)
    bias_res_NxN = self.param("hc_bias_res", logical(lambda rng: res_bias_init(n), None, None))

    x32_NxBxTxD = x_NxBxTxD.astype(jnp.float32)
    # The paper's reordering: project, then divide by the per-token rms over all n D entries.
    mean_square_BxT = jnp.mean(jnp.square(x32_NxBxTxD), axis=(0, 3))
    inv_rms_BxT = jax.lax.rsqrt(mean_square_BxT + cfg.norm_eps)
    proj_BxTxK = jnp.einsum("nbtd,ndk->btk", x32_NxBxTxD, phi_NxDxK) * inv_rms_BxT[..., None]
    B, T = inv_rms_BxT.shape
    gate_K = jnp.concatenate([jnp.full((n,), gate_3[0]), jnp.full((n,), gate_3[1]),
                              jnp.full((n * n,), gate_3[2])])
    bias_K = jnp.concatenate([bias_pre_N, bias_post_N, bias_res_NxN.reshape(n * n)])
    logits_BxTxK = proj_BxTxK * gate_K[None, None] + bias_K[None, None]
    pre_BxTxN = jax.nn.sigmoid(logits_BxTxK[..., :n])
    post_BxTxN = 2.0 * jax.nn.sigmoid(logits_BxTxK[..., n:2 * n])
    res_logits_BxTxNxN = logits_BxTxK[..., 2 * n:].reshape(B, T, n, n)
    res_BxTxNxN = sinkhorn(res_logits_BxTxNxN, cfg.sinkhorn_iterations)
    self.sow("intermediates", "res_matrix", res_BxTxNxN)  # the init tests read it
    input_BxTxD = jnp.einsum("btn,nbtd->btd", pre_BxTxN, x32_NxBxTxD)
    residual_NxBxTxD = jnp.einsum("btcm,mbtd->cbtd", res_BxTxNxN, x32_NxBxTxD)
    return input_BxTxD.astype(dtype_of(cfg.compute_dtype)), (post_BxTxN, residual_NxBxTxD)


class ManifoldHyperConnections(HyperConnections):
  """The stream, its start and finish, and the residual update are hyper-connections' (n copies,
  summed at the end; no carry); the maps of each sub-layer are mHC's."""

  def enter(self, block: nn.Module, x_NxBxTxD: jax.Array, carry: None, sublayer_idx, name: str):
    del carry  # the maps become the calling block's child `hc_<name>`
    maps = maybe_remat(ManifoldHyperConnection, self.cfg, straight_line(block, sublayer_idx))
    return maps(self.cfg, name=f"hc_{name}")(x_NxBxTxD, sublayer_idx)

  def extra_params(self) -> int:
    """Per sub-layer: phi n D (n^2 + 2n), 3 gates, biases n^2 + 2n; two sub-layers per layer."""
    n = self.cfg.hc_expansion
    per_sublayer = (n * self.cfg.D + 1) * (n * n + 2 * n) + 3
    return 2 * self.cfg.L * per_sublayer

  def extra_macs_per_token(self) -> int:
    """Per sub-layer: the projection n D (n^2 + 2n), the input mix n D, the copies' mix n^2 D
    and the output's n D, i.e. D n (n + 1)(n + 2). Sinkhorn-Knopp (element-wise on n x n), the
    sigmoids, the rms and the final sum of the copies are not counted (as norms are not for the
    baseline)."""
    n = self.cfg.hc_expansion
    return 2 * self.cfg.L * self.cfg.D * n * (n + 1) * (n + 2)
