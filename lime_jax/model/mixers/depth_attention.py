"""Depth-Attention (Zeng et al., arXiv 2606.05014, `router: depth-attention`): before a layer
attends over the sequence, its query attends over the keys of the layers up to it at the same
token position and mixes their values into the value that self-attention reads; the cache holds
the mixed values. No parameters: LIMe's closest competitor, a dynamic parameter-free kv mix
where LIMe learns a static route per head.

Layer l, token t, kv head r (G = H / R query heads q_{r,g} per kv head):

    s_j = <mean_g q_{r,g}(t), k_j,r(t)> / sqrt(Hd)    for j = 0..l
    w = softmax_j(s),   v'_l,r(t) = sum_j w_j v_j,r(t)

and attention reads (k_l, v'_l) instead of (k_l, v_l). Only the abstract and front matter of
the paper were reachable from here (not its method section), so where the abstract is silent the
choices are ours, stated as such:
- Sources: layers j <= l, the layer itself included (abstract: the query "mixes their values
  into the value", the layer's own value among them). Hence with one layer w = 1 and the model is
  the baseline exactly (tested).
- Mixed-over values are each layer's raw values v_j (the abstract says the cache stores
  "depth-mixed values in place of the original values": the originals live only in this forward,
  for the tokens being processed, which is why no state persists beyond the cache).
- Keys are not mixed: attention reads the layer's own keys (abstract: it mixes values).
- Scale 1 / sqrt(Hd), the standard attention scale (abstract: it "reuses the standard attention
  queries, keys").
- Pre-RoPE query and keys: RoPE rotates the query and the keys at one position by the same
  angle, so their dot product is the same before and after it; the carried keys are pre-RoPE.
- GQA (R < H): the value-cache slots are per kv head, so one mix per kv head; its depth query is
  the mean of its group's G query heads (equivalently, the mean of their depth logits).

Memory. Every layer reads the raw kv of all earlier layers at the same positions: the carry is
a buffer [L, B, T, R, 2, Hd] in the compute dtype (layer l writes slot l, reads slots <= l).
Autodiff through nn.scan would save it once per layer (L^2), so training runs the generic pull
form (pull.py, `pulls = True`): memory linear in depth for one extra forward per layer in the
backward. Decoding rebuilds the buffer for the new tokens in each call.

Mixing math: float32 logits, softmax and weights, float32 accumulation; the buffer stays in the
compute dtype. Optimizer groups: the method adds no parameters, so nothing changes there.
Cost: per layer l and token, the depth scores and the value mix, (l + 1) R Hd multiply-adds each.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from lime_jax.model import push
from lime_jax.model.layers import dtype_of, normal_init
from lime_jax.model.mixers.base import Mixer, layer_rerun_flops_per_token, project_kv
from lime_jax.model.mixers.hidden_routing import masked_softmax


def depth_mix(q_BxTxHxHd: jax.Array, kv_BxTxRx2xHd: jax.Array, buf_NxBxTxRx2xHd: jax.Array,
              layer_idx) -> jax.Array:
  """The kv that layer `layer_idx` attends over: its own keys, and its values mixed over the raw
  kv of layers 0..layer_idx in the buffer by its query q (before RoPE)."""
  if isinstance(layer_idx, int):  # unrolled: read only the written slots, the method's work
    buf_NxBxTxRx2xHd = buf_NxBxTxRx2xHd[:layer_idx + 1]
  N = buf_NxBxTxRx2xHd.shape[0]
  B, T, H, Hd = q_BxTxHxHd.shape
  R = kv_BxTxRx2xHd.shape[2]
  q_BxTxRxHd = jnp.mean(q_BxTxHxHd.reshape(B, T, R, H // R, Hd).astype(jnp.float32), axis=3)
  logits_BxTxRxN = jnp.einsum("btrd,jbtrd->btrj", q_BxTxRxHd, buf_NxBxTxRx2xHd[:, :, :, :, 0],
                              preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(Hd))
  if isinstance(layer_idx, int):
    weights_BxTxRxN = jax.nn.softmax(logits_BxTxRxN, axis=-1)
  else:  # traced: slots > layer_idx hold later layers (pull backward) or zeros; weight 0
    weights_BxTxRxN = masked_softmax(logits_BxTxRxN, jnp.arange(N) <= layer_idx)
  v_BxTxRxHd = jnp.einsum("btrj,jbtrd->btrd", weights_BxTxRxN, buf_NxBxTxRx2xHd[:, :, :, :, 1],
                          preferred_element_type=jnp.float32)
  return jnp.stack([kv_BxTxRx2xHd[:, :, :, 0], v_BxTxRxHd.astype(kv_BxTxRx2xHd.dtype)], axis=3)


def num_extra_macs(L: int, R: int, Hd: int) -> int:
  """Depth scores and value mix, (l + 1) R Hd each at layer l: R Hd L (L + 1) per token."""
  return R * Hd * L * (L + 1)


class DepthAttention(Mixer):
  """`router: depth-attention`. Carry: the raw kv of every layer [L, B, T, R, 2, Hd]."""

  pulls = True
  exportable = False
  query_mix = staticmethod(depth_mix)

  def start(self, stack: nn.Module, x_BxTxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    del stack
    cfg = self.cfg
    shape = (cfg.L,) + x_BxTxD.shape[:2] + (cfg.R, 2, cfg.Hd)
    return x_BxTxD, jnp.zeros(shape, dtype_of(cfg.compute_dtype))

  def pull_segments(self) -> list[tuple[int, int]]:
    """Segments cut the masked reads of a traced layer index (nn.scan runs one segment)."""
    return push.segment_bounds(self.cfg.L, self.cfg.scan_segments)

  def kv(self, block: nn.Module, x_BxTxD: jax.Array, h_BxTxD: jax.Array,
         buf_NxBxTxRx2xHd: jax.Array, layer_idx) -> tuple[jax.Array, jax.Array]:
    """The layer's raw kv (attention mixes its values by the query, `depth_mix`), written into
    slot `layer_idx` of the buffer."""
    del x_BxTxD
    kv_BxTxRx2xHd = project_kv(block, self.cfg, h_BxTxD, normal_init)
    buf_NxBxTxRx2xHd = jax.lax.dynamic_update_index_in_dim(
        buf_NxBxTxRx2xHd, kv_BxTxRx2xHd.astype(buf_NxBxTxRx2xHd.dtype), layer_idx, 0)
    return kv_BxTxRx2xHd, buf_NxBxTxRx2xHd

  def extra_macs_per_token(self) -> int:
    cfg = self.cfg
    return num_extra_macs(cfg.L, cfg.R, cfg.Hd)

  def recompute_flops_per_token(self, forward_flops_per_token: int) -> int:
    """The pull-form backward re-runs every layer once, less what the layer's VJP does not read:
    the MLP's down projection and the unembedding (as for the hidden routers)."""
    return layer_rerun_flops_per_token(self.cfg, forward_flops_per_token)
