"""LIMe key/value routing (the paper's v2, `router: kv-static`) in push form.

The spec's router W_l [R, l+1, R] belongs to reader layer l. Under `nn.scan` each layer only
sees its own parameter slice, so we store the same numbers indexed by *source* layer:

    push_l[i, r, s] = W_i[r, l, s]      shape [L, R, R] for every layer l

Layer l adds its raw kv, mixed by push_l, into one accumulator slot per reader layer i, then
reads its own slot. Additions need no saved copies under reverse-mode autodiff, so training
memory stays linear in depth (spec section 5), unlike a carried buffer that every layer reads.
Entries with reader i < l are masked to exactly zero, so every layer has one shape; the
layer-0 self entry is the fixed identity (layer 0 does no routing), not a parameter.

All routing math runs in float32 whatever the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def learnable_mask(L: int) -> np.ndarray:
  """Boolean [L_src, L_reader]: True where push weight (source j, reader i) is a parameter."""
  mask_LxL = np.tril(np.ones((L, L), dtype=bool)).T  # source j <= reader i
  mask_LxL[0, 0] = False  # layer 0 reads only itself, through the fixed identity
  return mask_LxL


def num_router_params(L: int, R: int) -> int:
  """The spec's extra parameter count, R^2 (L(L+1)/2 - 1)."""
  return R * R * (L * (L + 1) // 2 - 1)


def init_push_weights(rng: jax.Array, layer_idx, L: int, R: int) -> jax.Array:
  """push_l [L, R, R]: readers i > l ~ U(-a_i, a_i), a_i = sqrt(3 / ((i+1) R)); i == l: I_R."""
  reader_L = jnp.arange(L)
  bound_L = jnp.sqrt(3.0 / ((reader_L + 1) * R))
  uniform_LxRxR = jax.random.uniform(rng, (L, R, R), jnp.float32, -1.0, 1.0) * bound_L[:, None, None]
  eye_RxR = jnp.eye(R, dtype=jnp.float32)
  is_self_L = (reader_L == layer_idx)[:, None, None]
  is_later_L = (reader_L > layer_idx)[:, None, None]
  return jnp.where(is_self_L, eye_RxR, jnp.where(is_later_L, uniform_LxRxR, 0.0))


def effective_push_weights(push_LxRxR: jax.Array, layer_idx) -> jax.Array:
  """Masks the stored weights of source layer l: zero for readers i < l, identity at (0, 0)."""
  L, R, _ = push_LxRxR.shape
  reader_L = jnp.arange(L)
  is_layer0_self_L = (reader_L == 0) & (layer_idx == 0)
  learnable_L = (reader_L >= layer_idx) & ~is_layer0_self_L
  fixed_LxRxR = jnp.where(is_layer0_self_L[:, None, None], jnp.eye(R, dtype=jnp.float32), 0.0)
  return push_LxRxR.astype(jnp.float32) * learnable_L[:, None, None] + fixed_LxRxR


def push_and_read(acc_IxRxBxTx2xHd: jax.Array, push_LxRxR: jax.Array, kv_BxTxRx2xHd: jax.Array,
                  layer_idx, first_reader: int = 0) -> tuple[jax.Array, jax.Array]:
  """Adds layer l's kv into every live reader slot; returns (accumulator, routed kv of layer l).

  The accumulator holds slots for readers `first_reader .. L-1` (earlier readers are done).
  With a Python-int layer index (the unrolled path) only readers i >= l are touched, the
  spec's exact routing work. Under `nn.scan` the index is traced and every slot of the
  segment's accumulator is updated (masked weights are zero).
  """
  weights_IxRxR = effective_push_weights(push_LxRxR, layer_idx)[first_reader:]
  # Heads lead the slot so the mix is one plain matmul [I*R, R] x [R, B*T*2*Hd].
  kv32_RxBxTx2xHd = jnp.transpose(kv_BxTxRx2xHd.astype(jnp.float32), (2, 0, 1, 3, 4))
  if isinstance(layer_idx, int):
    live = layer_idx - first_reader
    mixed_IxRxBxTx2xHd = jnp.einsum("irs,sbtcd->irbtcd", weights_IxRxR[live:], kv32_RxBxTx2xHd)
    acc_IxRxBxTx2xHd = acc_IxRxBxTx2xHd.at[live:].add(mixed_IxRxBxTx2xHd)
    routed_RxBxTx2xHd = acc_IxRxBxTx2xHd[live]
  else:
    acc_IxRxBxTx2xHd, routed_RxBxTx2xHd = _push_read(acc_IxRxBxTx2xHd, weights_IxRxR,
                                                     kv32_RxBxTx2xHd, layer_idx - first_reader)
  return acc_IxRxBxTx2xHd, jnp.transpose(routed_RxBxTx2xHd, (1, 2, 0, 3, 4))


def segment_bounds(L: int, num_segments: int) -> list[tuple[int, int]]:
  """Splits layers 0..L-1 into contiguous [start, stop) segments, the larger ones last.

  Each segment is one scan whose accumulator only holds readers >= its start, so the masked
  routing work drops from L^2 slot updates to about L^2 (S+1) / (2S) for S segments.
  """
  S = min(num_segments, L)
  sizes = [L // S] * (S - L % S) + [L // S + 1] * (L % S)
  starts = [sum(sizes[:b]) for b in range(S)]
  return [(start, start + size) for start, size in zip(starts, sizes)]


@jax.custom_vjp
def _push_read(acc_LxRxBxTx2xHd, weights_LxRxR, kv_RxBxTx2xHd, layer_idx):
  """acc + weights (x) kv, and slot `layer_idx` of the result; traced-index form for nn.scan."""
  mixed_LxRxBxTx2xHd = jnp.einsum("irs,sbtcd->irbtcd", weights_LxRxR, kv_RxBxTx2xHd)
  acc_LxRxBxTx2xHd = acc_LxRxBxTx2xHd + mixed_LxRxBxTx2xHd
  return acc_LxRxBxTx2xHd, jax.lax.dynamic_index_in_dim(acc_LxRxBxTx2xHd, layer_idx, 0,
                                                        keepdims=False)


def _push_read_fwd(acc_LxRxBxTx2xHd, weights_LxRxR, kv_RxBxTx2xHd, layer_idx):
  outputs = _push_read(acc_LxRxBxTx2xHd, weights_LxRxR, kv_RxBxTx2xHd, layer_idx)
  return outputs, (weights_LxRxR, kv_RxBxTx2xHd, layer_idx)  # never the accumulator


def _push_read_bwd(residuals, cotangents):
  # Hand-written so the read's cotangent lands in its slot in place: autodiff's version
  # scatters it into a zero buffer and adds that to the whole carry cotangent (2.6x slower).
  weights_LxRxR, kv_RxBxTx2xHd, layer_idx = residuals
  dacc_LxRxBxTx2xHd, drouted_RxBxTx2xHd = cotangents
  slot_RxBxTx2xHd = jax.lax.dynamic_index_in_dim(dacc_LxRxBxTx2xHd, layer_idx, 0, keepdims=False)
  dacc_LxRxBxTx2xHd = jax.lax.dynamic_update_index_in_dim(
      dacc_LxRxBxTx2xHd, slot_RxBxTx2xHd + drouted_RxBxTx2xHd, layer_idx, 0)
  dweights_LxRxR = jnp.einsum("irbtcd,sbtcd->irs", dacc_LxRxBxTx2xHd, kv_RxBxTx2xHd)
  dkv_RxBxTx2xHd = jnp.einsum("irs,irbtcd->sbtcd", weights_LxRxR, dacc_LxRxBxTx2xHd)
  return dacc_LxRxBxTx2xHd, dweights_LxRxR, dkv_RxBxTx2xHd, None


_push_read.defvjp(_push_read_fwd, _push_read_bwd)


def router_view(push_LsrcxLxRxR: jax.Array) -> jax.Array:
  """The spec's routers of all layers as one masked array W [L_reader, R, L_src, R].

  W[i, r, j, s] is the weight reader layer i gives to head s of source layer j (zero for j > i).
  Takes the push weights stacked over source layers, [L_src, L_reader, R, R].
  """
  L = push_LsrcxLxRxR.shape[0]
  effective_LsrcxLxRxR = jax.vmap(effective_push_weights)(push_LsrcxLxRxR, jnp.arange(L))
  return jnp.transpose(effective_LsrcxLxRxR, (1, 2, 0, 3))
