"""Attention Residuals (Kimi Team, arXiv 2603.15031; `connections: attn-res | block-attn-res`),
a cross-layer baseline LIMe is compared against (router `none`).

The residual sum is replaced by softmax attention over depth. Sub-layers k = 0..2L-1 (attention
2l, MLP 2l+1) are grouped into N blocks of S = 2L / N sub-layers (`attn_res_blocks`; the full
form `attn-res` has S = 1, a block per sub-layer). The sources of sub-layer k are

    b_0 = the embeddings, b_1..b_c = the completed blocks' sums (c = k // S),
    and p = the sum of the outputs of the current block's sub-layers so far (if any),

and its input is h_k = sum_n a_n v_n with a = softmax_n(w_k . RMSNorm_k(v_n)): one learned
pseudo-query w_k [D] (zero-initialized) and one key norm (scale initialized to 1) per sub-layer.
The sub-layer's own pre-norm then reads h_k as usual, and its output is added to p. The paper's
figures define the sub-layer inputs; for the stack's output (the final norm's input) we read the
same aggregation with its own pseudo-query and key norm over all N + 1 sources, so the model is
"one more reader" at the top.

At init the pseudo-queries are zero, so every sub-layer's input is the uniform average of its
sources: (1 / #sources) times the plain residual stream, which the following RMSNorm maps to the
baseline's normed input up to its eps. (The average's rms is 1/#sources of the stream's, so the
eps weighs more than in the baseline: with 0.02-scale embeddings and eps 1e-6 the logits at init
differ by a few percent; with a negligible eps they are the baseline's to float rounding.)

Memory. The buffer of sources [N+1, B, T, D] is read by every sub-layer, so plain autodiff
through nn.scan would save it once per layer (O(L N); O(L^2) for the full form). Training uses
the pull form (pull.py): each layer's input (the partial sum p) is saved and layers are re-run
in the backward against the final buffer, which is exact because a sub-layer reads only blocks
completed before it. Memory is linear in depth at the price of one extra forward per layer.
Mixing math is float32 (the buffer keeps the stream's dtype). Optimizer: the pseudo-queries and
key norms are mixing weights, trained at the main lr without weight decay (decay would pull the
queries towards the uniform average).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from lime_jax.config import ModelConfig
from lime_jax.model import push
from lime_jax.model.layers import dtype_of, logical
from lime_jax.model.mixers.base import Mixer, layer_rerun_flops_per_token


def blocks_of(cfg: ModelConfig) -> int:
  """N: the number of blocks the 2L sub-layers form (2L for the full form)."""
  return 2 * cfg.L if cfg.connections == "attn-res" else cfg.attn_res_blocks


def attend_over_depth(query_D: jax.Array, key_scale_D: jax.Array, buf_NxBxTxD: jax.Array,
                      live_N: jax.Array, partial_BxTxD: jax.Array | None = None,
                      partial_live=True, eps: float = 1e-6) -> jax.Array:
  """sum_n a_n v_n over the live buffer slots and, where `partial_live` (a bool, traced under
  nn.scan), the partial sum, with a = softmax_n(query . (key_scale * v_n / rms(v_n)));
  float32 [B, T, D]."""
  qk_D = query_D.astype(jnp.float32) * key_scale_D.astype(jnp.float32)

  def logits(v_xBxTxD):
    v32 = v_xBxTxD.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(v32), axis=-1) + eps)
    return jnp.einsum("...d,d->...", v32, qk_D) * inv_rms

  live_Nx1x1 = live_N[:, None, None]
  logits_NxBxT = jnp.where(live_Nx1x1, logits(buf_NxBxTxD), -jnp.inf)
  peak_BxT = logits_NxBxT.max(axis=0)
  if partial_BxTxD is not None:
    logit_p_BxT = jnp.where(partial_live, logits(partial_BxTxD), -jnp.inf)
    peak_BxT = jnp.maximum(peak_BxT, logit_p_BxT)
  peak_BxT = jax.lax.stop_gradient(peak_BxT)  # any shift gives the same softmax
  weights_NxBxT = jnp.where(live_Nx1x1, jnp.exp(logits_NxBxT - peak_BxT[None]), 0.0)
  total_BxT = weights_NxBxT.sum(axis=0)
  if partial_BxTxD is not None:
    weight_p_BxT = jnp.where(partial_live, jnp.exp(logit_p_BxT - peak_BxT), 0.0)
    total_BxT = total_BxT + weight_p_BxT
  # Normalize the weights, not the mix: N per position instead of D.
  inv_total_BxT = 1.0 / total_BxT
  mixed_BxTxD = jnp.einsum("nbt,nbtd->btd", weights_NxBxT * inv_total_BxT[None],
                           buf_NxBxTxD.astype(jnp.float32))
  if partial_BxTxD is not None:
    mixed_BxTxD = mixed_BxTxD + (weight_p_BxT * inv_total_BxT)[..., None] * partial_BxTxD.astype(
        jnp.float32)
  return mixed_BxTxD


class AttentionResiduals(Mixer):
  """Stream: the current block's partial sum p [B, T, D]. Carry: the sources buffer
  [N+1, B, T, D] (slot 0 the embeddings, slot n the sum of block n-1), in the stream's dtype.

  Per-layer parameters: attn_res_{attn,mlp}_query [D] and attn_res_{attn,mlp}_key_norm [D];
  stack-level attn_res_final_query and attn_res_final_key_norm for the output.
  """

  pulls = True
  exportable = False

  @property
  def num_blocks(self) -> int:
    return blocks_of(self.cfg)

  @property
  def block_size(self) -> int:
    """S: sub-layers per block."""
    return 2 * self.cfg.L // self.num_blocks

  def start(self, stack: nn.Module, x_BxTxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    del stack
    buf_NxBxTxD = jnp.zeros((self.num_blocks + 1,) + x_BxTxD.shape, x_BxTxD.dtype)
    return jnp.zeros_like(x_BxTxD), buf_NxBxTxD.at[0].set(x_BxTxD)

  def pull_segments(self) -> list[tuple[int, int]]:
    """The pull form's segments: each reads only the blocks completed before its end."""
    return push.segment_bounds(self.cfg.L, self.cfg.scan_segments)

  def pull_slots(self, stop: int) -> int:
    return 1 + 2 * stop // self.block_size

  def _params(self, module: nn.Module, prefix: str) -> tuple[jax.Array, jax.Array]:
    dtype = dtype_of(self.cfg.param_dtype)
    query_D = module.param(f"{prefix}_query", logical(nn.initializers.zeros, "norm"),
                           (self.cfg.D,), dtype)
    key_scale_D = module.param(f"{prefix}_key_norm", logical(nn.initializers.ones, "norm"),
                               (self.cfg.D,), dtype)
    return query_D, key_scale_D

  def enter(self, block: nn.Module, partial_BxTxD: jax.Array, buf_NxBxTxD: jax.Array,
            sublayer_idx, name: str) -> tuple[jax.Array, None]:
    S = self.block_size
    completed = sublayer_idx // S
    if isinstance(sublayer_idx, int):  # unrolled or decoding: read only the live slots
      buf_NxBxTxD = buf_NxBxTxD[:completed + 1]
    live_N = jnp.arange(buf_NxBxTxD.shape[0]) <= completed
    # The partial sum is a source unless the block just started (then it is empty); with a
    # block per sub-layer it never is one.
    partial = None if S == 1 else partial_BxTxD
    query_D, key_scale_D = self._params(block, f"attn_res_{name}")
    h_BxTxD = attend_over_depth(query_D, key_scale_D, buf_NxBxTxD, live_N, partial,
                                sublayer_idx % S != 0, self.cfg.norm_eps)
    return h_BxTxD.astype(dtype_of(self.cfg.compute_dtype)), sublayer_idx

  def leave(self, partial_BxTxD: jax.Array, buf_NxBxTxD: jax.Array, out_BxTxD: jax.Array,
            sublayer_idx) -> tuple[jax.Array, jax.Array]:
    S = self.block_size
    partial_BxTxD = (partial_BxTxD.astype(jnp.float32) + out_BxTxD.astype(jnp.float32)
                     ).astype(partial_BxTxD.dtype)
    done = (sublayer_idx + 1) % S == 0
    slot = (sublayer_idx + 1) // S  # the block's slot when done, else a completed one
    if isinstance(sublayer_idx, int):
      if done:
        buf_NxBxTxD = buf_NxBxTxD.at[slot].set(partial_BxTxD)
        partial_BxTxD = jnp.zeros_like(partial_BxTxD)
      return partial_BxTxD, buf_NxBxTxD
    kept_BxTxD = jax.lax.dynamic_index_in_dim(buf_NxBxTxD, slot, 0, keepdims=False)
    buf_NxBxTxD = jax.lax.dynamic_update_index_in_dim(
        buf_NxBxTxD, jnp.where(done, partial_BxTxD, kept_BxTxD), slot, 0)
    return jnp.where(done, jnp.zeros_like(partial_BxTxD), partial_BxTxD), buf_NxBxTxD

  def finish(self, stack: nn.Module, partial_BxTxD: jax.Array,
             buf_NxBxTxD: jax.Array) -> jax.Array:
    """The output: one more aggregation over the embeddings and all N blocks."""
    del partial_BxTxD  # zero: the last sub-layer completed the last block
    query_D, key_scale_D = self._params(stack, "attn_res_final")
    live_N = jnp.ones((buf_NxBxTxD.shape[0],), bool)
    out_BxTxD = attend_over_depth(query_D, key_scale_D, buf_NxBxTxD, live_N,
                                  eps=self.cfg.norm_eps)
    return out_BxTxD.astype(buf_NxBxTxD.dtype)

  # --- accounting ----------------------------------------------------------------------------

  def sources_per_reader(self) -> list[int]:
    """The number of sources each of the 2L sub-layers and the output attends over."""
    S = self.block_size
    return [1 + k // S + (1 if k % S else 0) for k in range(2 * self.cfg.L)] + [
        1 + self.num_blocks]

  def extra_params(self) -> int:
    """A pseudo-query and a key-norm scale [D] per sub-layer and for the output: (4L + 2) D."""
    return (4 * self.cfg.L + 2) * self.cfg.D

  def extra_macs_per_token(self) -> int:
    """Per reader with n sources: the logits n D (the query against the keys), the keys' sums
    of squares n D (every reader normalizes every source it reads: the method's own work, so
    counted, unlike the baseline's norms) and the weighted sum n D."""
    return 3 * self.cfg.D * sum(self.sources_per_reader())

  def recompute_flops_per_token(self, forward_flops_per_token: int) -> int:
    """The pull-form backward re-runs every layer once, as for the hidden routers (the MLP's
    down projection is dead there and the unembedding is not re-run)."""
    return layer_rerun_flops_per_token(self.cfg, forward_flops_per_token)
