"""LIMe kv routing in pull form for training (`routing_impl: pull`): bytes read, not
read-modify-written (spec section 10).

The push form (push.py) keeps a float32 accumulator slot per reader and read-modify-writes every
remaining reader's slot at every layer, then reads it all twice more in the backward. Here the
stack carries a buffer of the raw kv of every layer in the compute dtype (bf16 in training), and

- forward, layer l: reads the buffer's slots j < l once, mixes them with its router row
  (float32 accumulation inside the contraction) into the partial routed kv, runs the layer on it
  (the layer adds its own kv's self term) and writes its raw kv into slot l;
- backward, layer l (in reverse): reads the cotangents of the partial routed kv of the later
  readers i > l, kept in a second buffer, to get its raw kv's cotangent; writes its own partial
  cotangent into slot l; and reads the forward's final buffer for its router row's gradient.

Nothing is read-modify-written across slots, and nothing is recomputed: each layer's backward
uses the residuals its forward saved (a `jax.vjp` per layer, stacked by the scan), as autodiff
would. Memory: those residuals, one raw-kv buffer and one cotangent buffer, linear in depth.
Scans are split into segments like the push's; a segment's layers read only slots < its end.
Same parameters, same math as the push (tested equal); init, decoding and analysis use the push.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

# layer_fn(params_l, x_BxTxD, partial_BxTxRx2xHd, layer_idx, positions_BxT) -> (x_next, kv_raw):
# one layer given the routed kv of its sources j < l; it adds its own kv's term itself.
LayerFn = Callable[[Any, jax.Array, jax.Array, Any, jax.Array], tuple[jax.Array, jax.Array]]
# reader_weights(params_L) -> W [L_reader, R, L_src, R], entries j >= i zero (strictly earlier).
WeightsFn = Callable[[Any], jax.Array]


def _segment(tree: Any, start: int, stop: int) -> Any:
  return jax.tree.map(lambda a: a[start:stop], tree)


def _mix(W_RxNxR: jax.Array, buf_NxBxTxRx2xHd: jax.Array) -> jax.Array:
  """sum_{j, s} W[r, j, s] kv_j[s] in float32, from a compute-dtype buffer."""
  return jnp.einsum("rjs,jbtscd->btrcd", W_RxNxR, buf_NxBxTxRx2xHd,
                    preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def pull_stack(layer_fn: LayerFn, weights_fn: WeightsFn, bounds: tuple[tuple[int, int], ...],
               kv_shape: tuple[int, ...], unroll: int, params_L: Any, x_BxTxD: jax.Array,
               positions_BxT: jax.Array) -> jax.Array:
  """The layers of `params_L` (leading layer axis) over segments `bounds`; the last output.
  kv_shape: (L, B, T, R, 2, Hd) and the compute dtype's name last; unroll: layers per scan
  iteration."""
  x_BxTxD, _, _, _ = _forward(layer_fn, weights_fn, bounds, kv_shape, unroll, params_L,
                              x_BxTxD, positions_BxT, save=False)
  return x_BxTxD


def _forward(layer_fn, weights_fn, bounds, kv_shape, unroll, params_L, x_BxTxD, positions_BxT,
             save):
  *shape, dtype = kv_shape
  W_LxRxLxR = weights_fn(params_L)
  buf_LxBxTxRx2xHd = jnp.zeros(shape, dtype)
  vjps = []
  for start, stop in bounds:
    def body(carry, layer):
      x_BxTxD, buf_NxBxTxRx2xHd = carry
      params_l, W_RxNxR, l = layer
      partial_BxTxRx2xHd = _mix(W_RxNxR, buf_NxBxTxRx2xHd)
      run = lambda p, x, part: layer_fn(p, x, part, l, positions_BxT)  # noqa: E731
      if save:
        (x_next, kv_BxTxRx2xHd), vjp = jax.vjp(run, params_l, x_BxTxD, partial_BxTxRx2xHd)
      else:
        (x_next, kv_BxTxRx2xHd), vjp = run(params_l, x_BxTxD, partial_BxTxRx2xHd), None
      buf_NxBxTxRx2xHd = jax.lax.dynamic_update_index_in_dim(
          buf_NxBxTxRx2xHd, kv_BxTxRx2xHd.astype(dtype), l, 0)
      return (x_next, buf_NxBxTxRx2xHd), vjp
    # Layers of this segment read slots < stop only: the rest are still empty.
    (x_BxTxD, buf_NxBxTxRx2xHd), vjps_S = jax.lax.scan(
        body, (x_BxTxD, buf_LxBxTxRx2xHd[:stop]),
        (_segment(params_L, start, stop), W_LxRxLxR[start:stop, :, :stop], jnp.arange(start, stop)),
        unroll=min(unroll, stop - start))
    buf_LxBxTxRx2xHd = jnp.concatenate([buf_NxBxTxRx2xHd, buf_LxBxTxRx2xHd[stop:]])
    vjps.append(vjps_S)
  return x_BxTxD, buf_LxBxTxRx2xHd, W_LxRxLxR, vjps


def _pull_stack_fwd(layer_fn, weights_fn, bounds, kv_shape, unroll, params_L, x_BxTxD,
                    positions_BxT):
  x_out, buf_LxBxTxRx2xHd, W_LxRxLxR, vjps = _forward(
      layer_fn, weights_fn, bounds, kv_shape, unroll, params_L, x_BxTxD, positions_BxT, save=True)
  return x_out, (params_L, buf_LxBxTxRx2xHd, W_LxRxLxR, tuple(vjps))


def _pull_stack_bwd(layer_fn, weights_fn, bounds, kv_shape, unroll, residuals, dx_BxTxD):
  del layer_fn
  params_L, buf_LxBxTxRx2xHd, W_LxRxLxR, vjps = residuals
  L = buf_LxBxTxRx2xHd.shape[0]
  # Cotangents of every reader's partial routed kv (slot i holds reader i's, once it ran).
  dpartial_LxBxTxRx2xHd = jnp.zeros_like(buf_LxBxTxRx2xHd)
  dparams, dW_rows = [], []
  for (start, stop), vjps_S in reversed(list(zip(bounds, vjps))):
    def body(carry, layer):
      dx_BxTxD, dpartial_IxBxTxRx2xHd = carry
      vjp, W_IxRxR, l = layer
      # Raw kv l fed every later reader i > l (their W[i, :, l, :]; zero for i <= l).
      dkv_BxTxRx2xHd = jnp.einsum("irs,ibtrcd->btscd", W_IxRxR, dpartial_IxBxTxRx2xHd,
                                  preferred_element_type=jnp.float32)
      dparams_l, dx_BxTxD, dpartial_BxTxRx2xHd = vjp(
          (dx_BxTxD, dkv_BxTxRx2xHd.astype(dpartial_IxBxTxRx2xHd.dtype)))
      dpartial_IxBxTxRx2xHd = jax.lax.dynamic_update_index_in_dim(
          dpartial_IxBxTxRx2xHd, dpartial_BxTxRx2xHd.astype(dpartial_IxBxTxRx2xHd.dtype),
          l - start, 0)
      # Reader l's router row: its partial's cotangent against the sources it read.
      dW_RxNxR = jnp.einsum("btrcd,jbtscd->rjs", dpartial_BxTxRx2xHd.astype(jnp.float32),
                            buf_LxBxTxRx2xHd[:stop], preferred_element_type=jnp.float32)
      return (dx_BxTxD, dpartial_IxBxTxRx2xHd), (dparams_l, dW_RxNxR)
    # Readers >= start may have read this segment's layers; earlier ones have not run yet.
    columns_LxIxRxR = jnp.moveaxis(W_LxRxLxR[start:, :, start:stop], 2, 0)  # [source, reader]
    (dx_BxTxD, dpartial_IxBxTxRx2xHd), (dparams_S, dW_SxRxNxR) = jax.lax.scan(
        body, (dx_BxTxD, dpartial_LxBxTxRx2xHd[start:]),
        (vjps_S, columns_LxIxRxR, jnp.arange(start, stop)), reverse=True,
        unroll=min(unroll, stop - start))
    dpartial_LxBxTxRx2xHd = jnp.concatenate([dpartial_LxBxTxRx2xHd[:start],
                                             dpartial_IxBxTxRx2xHd])
    dparams.insert(0, dparams_S)
    dW_rows.insert(0, jnp.pad(dW_SxRxNxR, ((0, 0), (0, 0), (0, L - stop), (0, 0))))
  dparams_L = jax.tree.map(lambda *parts: jnp.concatenate(parts), *dparams)
  _, weights_vjp = jax.vjp(weights_fn, params_L)
  (dparams_from_W,) = weights_vjp(jnp.concatenate(dW_rows))
  return jax.tree.map(jnp.add, dparams_L, dparams_from_W), dx_BxTxD, None


pull_stack.defvjp(_pull_stack_fwd, _pull_stack_bwd)
