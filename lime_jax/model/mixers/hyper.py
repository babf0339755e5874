"""Hyper-Connections (Zhu et al., arXiv 2409.19606; `connections: hyper-static | hyper-dynamic`),
a cross-layer baseline LIMe is compared against (router `none`).

The residual stream becomes n copies H [n, B, T, D] (n = `hc_expansion`), all equal to the
embeddings at the start; the stack's output is their sum. Every sub-layer k (attention and MLP
count separately, k = 2l and 2l+1) reads a mix of the copies and writes its output back into
each copy:

    x = sum_m A_m[m] H_m                                  (width connection: the input)
    H'_c = sum_m A_r[m, c] H_m + B[c] T_k(x)              (depth connection)

Static: A = [A_m | A_r] [n, n+1] initialized [e_(k mod n) | I], B [n] initialized 1.
Dynamic: A and B also get s * tanh(norm(H) W) per token and copy, with W zero-initialized,
scale s = 0.01 learnable, and a non-affine RMSNorm per copy. At init both equal the pre-norm
residual stream: every copy holds the baseline's hidden state, and the sum of the n copies at
the end differs from the baseline's state only by the factor n, which the final RMSNorm removes
(up to its eps). So the logits equal the baseline's to float rounding.

Memory: the stream is n x D per layer boundary, linear in depth by construction. Mixing math is
float32; outputs return in the compute dtype. Under a remat policy the width connection is
rematerialized like the layers' sub-blocks: it saves its input, not its float32 copies of the
n streams (in bf16 one such copy a sub-layer, static, or three, dynamic; each twice the
stream's bytes). The depth connection saves the sub-layer's output in the compute dtype, not
its float32 copy (`written_output`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from lime_jax.config import ModelConfig
from lime_jax.model.layers import dtype_of, logical, maybe_remat, rms_normalize
from lime_jax.model.mixers.base import Mixer, straight_line

DYNAMIC_SCALE = 0.01


def static_init(sublayer_idx, n: int) -> jax.Array:
  """[A_m | A_r] [n, n+1] = [e_(k mod n) | I_n] for sub-layer k (a Python int or traced)."""
  a_m_N = (jnp.arange(n) == sublayer_idx % n).astype(jnp.float32)
  return jnp.concatenate([a_m_N[:, None], jnp.eye(n, dtype=jnp.float32)], axis=1)


@jax.custom_vjp
def written_output(beta_BxTxN: jax.Array, out_BxTxD: jax.Array) -> jax.Array:
  """The sub-layer's output as the copies receive it, beta[c] out [n, B, T, D], in float32.
  Its backward keeps `out` in its own dtype: autodiff of the product saved out's float32 copy
  instead, one float32 [B, T, D] a sub-layer in bf16 runs, whatever the remat policy."""
  return jnp.einsum("btn,btd->nbtd", beta_BxTxN, out_BxTxD.astype(jnp.float32))


def _written_output_fwd(beta_BxTxN, out_BxTxD):
  return written_output(beta_BxTxN, out_BxTxD), (beta_BxTxN, out_BxTxD)


def _written_output_bwd(residuals, dH_NxBxTxD):
  beta_BxTxN, out_BxTxD = residuals
  dbeta_BxTxN = jnp.einsum("nbtd,btd->btn", dH_NxBxTxD, out_BxTxD.astype(jnp.float32))
  dout_BxTxD = jnp.einsum("nbtd,btn->btd", dH_NxBxTxD, beta_BxTxN)
  return dbeta_BxTxN.astype(beta_BxTxN.dtype), dout_BxTxD.astype(out_BxTxD.dtype)


written_output.defvjp(_written_output_fwd, _written_output_bwd)


class HyperConnection(nn.Module):
  """Width connection of one sub-layer: H [n, B, T, D] -> (input x [B, T, D], mix); the depth
  connection applies `mix` in `HyperConnections.leave`. Parameters: hc_alpha [n, n+1],
  hc_beta [n], and for the dynamic variant hc_alpha_proj [D, n+1], hc_beta_proj [D],
  hc_alpha_scale, hc_beta_scale."""

  cfg: ModelConfig
  dynamic: bool

  @nn.compact
  def __call__(self, H_NxBxTxD: jax.Array, sublayer_idx):
    cfg = self.cfg
    n, (_, B, T, D) = cfg.hc_expansion, H_NxBxTxD.shape
    alpha_NxK = self.param("hc_alpha", logical(lambda rng: static_init(sublayer_idx, n), None, None))
    beta_N = self.param("hc_beta", logical(nn.initializers.ones, None), (n,), jnp.float32)
    H32_NxBxTxD = H_NxBxTxD.astype(jnp.float32)
    alpha_BxTxNxK = jnp.broadcast_to(alpha_NxK, (B, T, n, n + 1))
    beta_BxTxN = jnp.broadcast_to(beta_N, (B, T, n))
    if self.dynamic:
      alpha_proj_DxK = self.param("hc_alpha_proj", logical(nn.initializers.zeros, "embed", None),
                                  (D, n + 1), jnp.float32)
      beta_proj_D = self.param("hc_beta_proj", logical(nn.initializers.zeros, "embed"), (D,),
                               jnp.float32)
      scale_init = nn.initializers.constant(DYNAMIC_SCALE)
      alpha_scale = self.param("hc_alpha_scale", logical(scale_init), (), jnp.float32)
      beta_scale = self.param("hc_beta_scale", logical(scale_init), (), jnp.float32)
      normed_NxBxTxD = rms_normalize(H32_NxBxTxD, cfg.norm_eps)
      alpha_BxTxNxK = alpha_BxTxNxK + alpha_scale * jnp.tanh(
          jnp.einsum("nbtd,dk->btnk", normed_NxBxTxD, alpha_proj_DxK))
      beta_BxTxN = beta_BxTxN + beta_scale * jnp.tanh(
          jnp.einsum("nbtd,d->btn", normed_NxBxTxD, beta_proj_D))
    x_BxTxD = jnp.einsum("btn,nbtd->btd", alpha_BxTxNxK[..., 0], H32_NxBxTxD)
    residual_NxBxTxD = jnp.einsum("btmn,mbtd->nbtd", alpha_BxTxNxK[..., 1:], H32_NxBxTxD)
    return x_BxTxD.astype(dtype_of(cfg.compute_dtype)), (beta_BxTxN, residual_NxBxTxD)


class HyperConnections(Mixer):
  """The stream is the n copies H [n, B, T, D]; no carry."""

  exportable = False

  @property
  def dynamic(self) -> bool:
    return self.cfg.connections == "hyper-dynamic"

  def start(self, stack: nn.Module, x_BxTxD: jax.Array) -> tuple[jax.Array, None]:
    del stack
    return jnp.broadcast_to(x_BxTxD, (self.cfg.hc_expansion,) + x_BxTxD.shape), None

  def hidden(self, H_NxBxTxD: jax.Array) -> jax.Array:
    """The sum of the copies, as the paper does."""
    return H_NxBxTxD.astype(jnp.float32).sum(axis=0).astype(H_NxBxTxD.dtype)

  def stream_axes(self) -> tuple[str | None, ...]:
    return (None,) + super().stream_axes()

  def enter(self, block: nn.Module, H_NxBxTxD: jax.Array, carry: None, sublayer_idx, name: str):
    del carry  # the connection becomes the calling block's child `hc_<name>`
    connection = maybe_remat(HyperConnection, self.cfg, straight_line(block, sublayer_idx))
    return connection(self.cfg, self.dynamic, name=f"hc_{name}")(H_NxBxTxD, sublayer_idx)

  def leave(self, H_NxBxTxD: jax.Array, carry: None, out_BxTxD: jax.Array, mix):
    beta_BxTxN, residual_NxBxTxD = mix
    H32_NxBxTxD = residual_NxBxTxD + written_output(beta_BxTxN, out_BxTxD)
    return H32_NxBxTxD.astype(H_NxBxTxD.dtype), carry

  def extra_params(self) -> int:
    """Static: A [n, n+1] and B [n] per sub-layer; dynamic adds W_A [D, n+1], W_B [D] and two
    scales. Two sub-layers (attention, MLP) per layer."""
    cfg, n = self.cfg, self.cfg.hc_expansion
    per_sublayer = n * (n + 1) + n
    if self.dynamic:
      per_sublayer += cfg.D * (n + 1) + cfg.D + 2
    return 2 * cfg.L * per_sublayer

  def extra_macs_per_token(self) -> int:
    """Per sub-layer (2 per layer): the input mix n D, the copies' mix n^2 D and the output's
    n D, i.e. D n (n+2); dynamic adds the projections of the n normed copies to n+2 weights,
    D n (n+2). Norms, tanh and the final sum of the copies are not counted (as norms are not
    for the baseline)."""
    cfg, n = self.cfg, self.cfg.hc_expansion
    per_sublayer = cfg.D * n * (n + 2) * (2 if self.dynamic else 1)
    return 2 * cfg.L * per_sublayer
