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

Sparse routing (`router_window`, `router_dilation`; see `live`): dead (reader, source) pairs are
masked like future sources, exactly zero with zero gradient, and not counted as parameters.
Under `nn.scan` the masked mix is still computed (the traced layer index cannot slice), so the
scanned path saves parameters, not FLOPs; the unrolled path touches only live reader slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def live(reader, source, window: int | None = None, dilation: int | None = None):
  """Whether reader layer i reads source layer j (NumPy or jnp arrays, broadcasting).

  Dense: every j <= i. With `window` k: j == 0, or the last k layers i-k+1 .. i (itself
  included, so k = 1 is itself plus the embedding-side layer 0). With `dilation` d: j == 0 or
  (i - j) % d == 0 (itself included). Both: the union. Layer 0 is always read, as the paper's
  ablations kept it.
  """
  ok = source <= reader
  if window is None and dilation is None:
    return ok
  sparse = source == 0
  if window is not None:
    sparse = sparse | (reader - source < window)
  if dilation is not None:
    sparse = sparse | ((reader - source) % dilation == 0)
  return ok & sparse


def live_mask(L: int, window: int | None = None, dilation: int | None = None) -> np.ndarray:
  """Boolean [L_src, L_reader]: True where reader i reads source j (its own heads included)."""
  source_Lx1, reader_1xL = np.arange(L)[:, None], np.arange(L)[None, :]
  return np.asarray(live(reader_1xL, source_Lx1, window, dilation))


def learnable_mask(L: int, window: int | None = None, dilation: int | None = None) -> np.ndarray:
  """Boolean [L_src, L_reader]: True where push weight (source j, reader i) is a parameter."""
  mask_LxL = live_mask(L, window, dilation)
  mask_LxL[0, 0] = False  # layer 0 reads only itself, through the fixed identity
  return mask_LxL


def num_router_params(L: int, R: int, window: int | None = None,
                      dilation: int | None = None) -> int:
  """Learnable router entries: the spec's R^2 (L(L+1)/2 - 1) when dense, live pairs otherwise."""
  if window is None and dilation is None:
    return R * R * (L * (L + 1) // 2 - 1)
  return R * R * int(learnable_mask(L, window, dilation).sum())


def init_push_weights(rng: jax.Array, layer_idx, L: int, R: int, window: int | None = None,
                      dilation: int | None = None) -> jax.Array:
  """push_l [L, R, R]: live readers i > l ~ U(-a_i, a_i), a_i = sqrt(3 / (n_i R)); i == l: I_R.

  n_i is the number of sources reader i reads (i + 1 when dense), so a sparse reader's routed
  kv starts with the same variance as a dense one's. Dead entries are zero.
  """
  reader_L = jnp.arange(L)
  n_live_L = jnp.asarray(live_mask(L, window, dilation).sum(axis=0))
  bound_L = jnp.sqrt(3.0 / (n_live_L * R))
  uniform_LxRxR = jax.random.uniform(rng, (L, R, R), jnp.float32, -1.0, 1.0) * bound_L[:, None, None]
  eye_RxR = jnp.eye(R, dtype=jnp.float32)
  is_self_L = (reader_L == layer_idx)[:, None, None]
  is_later_L = ((reader_L > layer_idx) & live(reader_L, layer_idx, window, dilation))[:, None, None]
  return jnp.where(is_self_L, eye_RxR, jnp.where(is_later_L, uniform_LxRxR, 0.0))


def effective_push_weights(push_LxRxR: jax.Array, layer_idx, window: int | None = None,
                           dilation: int | None = None) -> jax.Array:
  """Masks the stored weights of source layer l: zero for readers i < l and dead pairs,
  identity at (0, 0)."""
  L, R, _ = push_LxRxR.shape
  reader_L = jnp.arange(L)
  is_layer0_self_L = (reader_L == 0) & (layer_idx == 0)
  learnable_L = live(reader_L, layer_idx, window, dilation) & ~is_layer0_self_L
  fixed_LxRxR = jnp.where(is_layer0_self_L[:, None, None], jnp.eye(R, dtype=jnp.float32), 0.0)
  return push_LxRxR.astype(jnp.float32) * learnable_L[:, None, None] + fixed_LxRxR


def push_and_read(acc_IxRxBxTx2xHd: jax.Array, push_LxRxR: jax.Array, kv_BxTxRx2xHd: jax.Array,
                  layer_idx, first_reader: int = 0, window: int | None = None,
                  dilation: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Adds layer l's kv into every live reader slot; returns (accumulator, routed kv of layer l).

  The accumulator holds slots for readers `first_reader .. L-1` (earlier readers are done).
  With a Python-int layer index (the unrolled path) only the live readers i >= l are touched,
  the spec's exact routing work (sparse routing: only the live ones). Under `nn.scan` the index
  is traced and every slot of the segment's accumulator is updated (masked weights are zero).
  """
  weights_IxRxR = effective_push_weights(push_LxRxR, layer_idx, window, dilation)[first_reader:]
  # Heads lead the slot so the mix is one plain matmul [I*R, R] x [R, B*T*2*Hd].
  kv32_RxBxTx2xHd = jnp.transpose(kv_BxTxRx2xHd.astype(jnp.float32), (2, 0, 1, 3, 4))
  if isinstance(layer_idx, int):
    L = push_LxRxR.shape[0]
    readers = np.flatnonzero(live(np.arange(L), layer_idx, window, dilation))
    slots = static_slots(readers - first_reader)
    mixed_IxRxBxTx2xHd = jnp.einsum("irs,sbtcd->irbtcd", weights_IxRxR[slots], kv32_RxBxTx2xHd)
    acc_IxRxBxTx2xHd = acc_IxRxBxTx2xHd.at[slots].add(mixed_IxRxBxTx2xHd)
    routed_RxBxTx2xHd = acc_IxRxBxTx2xHd[layer_idx - first_reader]
  else:
    acc_IxRxBxTx2xHd, routed_RxBxTx2xHd = _push_read(acc_IxRxBxTx2xHd, weights_IxRxR,
                                                     kv32_RxBxTx2xHd, layer_idx - first_reader)
  return acc_IxRxBxTx2xHd, jnp.transpose(routed_RxBxTx2xHd, (1, 2, 0, 3, 4))


def static_slots(slots_I: np.ndarray):
  """Known slot indices as a slice when they are evenly spaced (plain strided updates), else
  the index array (a scatter)."""
  if len(slots_I) == 1:
    return slice(int(slots_I[0]), int(slots_I[0]) + 1)
  steps = np.diff(slots_I)
  if np.all(steps == steps[0]):
    return slice(int(slots_I[0]), int(slots_I[-1]) + 1, int(steps[0]))
  return slots_I


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


def router_view(push_LsrcxLxRxR: jax.Array, window: int | None = None,
                dilation: int | None = None) -> jax.Array:
  """The spec's routers of all layers as one masked array W [L_reader, R, L_src, R].

  W[i, r, j, s] is the weight reader layer i gives to head s of source layer j (zero for j > i).
  Takes the push weights stacked over source layers, [L_src, L_reader, R, R].
  """
  L = push_LsrcxLxRxR.shape[0]
  effective_LsrcxLxRxR = jax.vmap(lambda push, l: effective_push_weights(push, l, window, dilation))(
      push_LsrcxLxRxR, jnp.arange(L))
  return jnp.transpose(effective_LsrcxLxRxR, (1, 2, 0, 3))
