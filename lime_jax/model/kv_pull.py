"""LIMe kv routing in pull form for training (`routing_impl: pull`): bytes read, not
read-modify-written (spec section 10).

The push form (push.py) keeps a float32 accumulator slot per reader and read-modify-writes every
remaining reader's slot at every layer, then reads it all twice more in the backward. Here one
scan over all layers carries a buffer of every layer's raw kv in the compute dtype (bf16 in
training), and

- forward, layer l: reads the buffer's slots j < l once, mixes them with its router row
  (float32 accumulation inside the contraction) into the partial routed kv, runs the layer on it
  (the layer adds its own kv's self term) and writes its raw kv into slot l;
- backward, layer l (in reverse): reads the cotangents of the partial routed kv of the later
  readers i > l to get its raw kv's cotangent, and the raw kv of slots j <= l for its router
  row's gradient (its own term's included), then overwrites slot l with its own cotangent.

One buffer serves both passes: in the backward, slots j <= l still hold raw kv (needed by the
readers still to go) and slots i > l the cotangents (their raw kv is no longer needed). Each
layer's backward uses the residuals its forward saved (a `jax.vjp` per layer, stacked by the
scan), as autodiff would, minus its own kv: the layer's self term takes no router gradient
(kv_routing.py), which comes from the buffer instead. Per-layer memory is then the baseline's
(the routed kv that attention reads replaces its kv); the stack adds one buffer: linear in depth.

Reads are bounded by read groups (`read_groups`, one per parameter segment): a layer of segment
[start, stop) reads slots < stop forward and i >= start backward, through a `lax.switch` on its
group, so the masked slots are not read. A router window of k reads by dynamic slices instead:
layer 0's slot plus the k - 1 slots before the layer (forward), the k - 1 readers after it
(backward; layer 0's cotangent from all) and the k slots up to it (router gradient): O(L k)
slot reads, the ring's count. The same switch picks the layer's parameters from its segment's
stacked tree, so the segments are never concatenated into one copy of all layer parameters
(1.2B setup: 3.4 GiB per device). One scan, not one per segment: the TPU compiler kept several
layers' attention temporaries live across per-segment loops (1.2B: +6.6 GiB with 4 loops).
Same parameters, same math as the push (tested equal); init, decoding and analysis use the push.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lime_jax.model.pull import read_slots

# layer_fn(params_l, x_BxTxD, partial_BxTxRx2xHd, layer_idx, positions_BxT) -> (x_next, kv_raw):
# one layer given the routed kv of its sources j < l; it adds its own kv's term itself, with no
# gradient to that term's weight (the pull's backward supplies it).
LayerFn = Callable[[Any, jax.Array, jax.Array, Any, jax.Array], tuple[jax.Array, jax.Array]]
# reader_weights(params_S) -> W [L_reader, R, L_src, R] from the per-segment parameters, entries
# j > i zero (sources up to the reader itself: the diagonal is each layer's own term, which the
# gradient needs).
WeightsFn = Callable[[Any], jax.Array]


class ReadGroup(NamedTuple):
  """Layers [start, stop) of parameter segment `segment`, and the buffer slots they touch:
  `sources` (slices [lo, hi)) hold every source j <= l of its layers, `readers` every later
  reader i > l of their kv (the cotangents the backward pulls)."""

  start: int
  stop: int
  segment: int
  sources: tuple[tuple[int, int], ...]
  readers: tuple[int, int]


def read_groups(segments: Sequence[tuple[int, int]], L: int) -> tuple[ReadGroup, ...]:
  """The scan's dense read plan, one group per parameter segment: slots < stop forward, readers
  i >= start backward."""
  return tuple(ReadGroup(start, stop, b, ((0, stop),), (start, L))
               for b, (start, stop) in enumerate(segments))


def _switch_on_group(groups, layer_idx, branch: Callable[[ReadGroup], Callable], *operands):
  """`branch(group)(*operands)` for the group that holds `layer_idx` (traced): each branch
  reads slots of static bounds (`read_slots`), so the slots a group never needs are not read."""
  group_of_layer = np.concatenate([np.full(g.stop - g.start, i) for i, g in enumerate(groups)])
  if isinstance(layer_idx, int):  # fully unrolled: the branch is known
    return branch(groups[group_of_layer[layer_idx]])(*operands)
  index = jnp.asarray(group_of_layer, jnp.int32)[layer_idx]
  return jax.lax.switch(index, [branch(g) for g in groups], *operands)


def _layer_params(groups, layer_idx, params_S: tuple[Any, ...]) -> Any:
  """Layer `layer_idx`'s parameters, from the stacked tree of the segment that holds it."""
  def branch(group: ReadGroup):  # one group per segment: the group starts its segment
    return lambda params_S: jax.tree.map(
        lambda a: jax.lax.dynamic_index_in_dim(a, layer_idx - group.start, 0, keepdims=False),
        params_S[group.segment])
  return _switch_on_group(groups, layer_idx, branch, params_S)


def _mix_sources(group: ReadGroup):
  """Forward read: sum_{j, s} W[r, j, s] kv_j[s] over the group's source slots, in float32
  (the strict row is zero from j = l on)."""
  def mix(W_RxLxR, buf_LxBxTxRx2xHd):
    return sum(jnp.einsum("rjs,jbtscd->btrcd", read_slots(W_RxLxR, lo, hi - lo, 1),
                          read_slots(buf_LxBxTxRx2xHd, lo, hi - lo),
                          preferred_element_type=jnp.float32) for lo, hi in group.sources)
  return mix


def _cotangent_from_readers(group: ReadGroup):
  """Backward: the raw kv's cotangent sum_{i, r} W[i, r, l, s] dpartial_i[r] over the group's
  readers (the strict column is zero for i <= l, whose slots still hold raw kv)."""
  lo, hi = group.readers
  def pull(W_LxRxR, buf_LxBxTxRx2xHd):
    return jnp.einsum("irs,ibtrcd->btscd", read_slots(W_LxRxR, lo, hi - lo),
                      read_slots(buf_LxBxTxRx2xHd, lo, hi - lo), preferred_element_type=jnp.float32)
  return pull


def _router_row_gradient(group: ReadGroup):
  """Backward: reader l's row dW[r, j, s] = <dpartial_l[r], kv_j[s]> over the group's sources,
  zero elsewhere; entries j > l (slots that hold cotangents by now) are masked by the caller."""
  def grad(dpartial_BxTxRx2xHd, buf_LxBxTxRx2xHd):
    L, R = buf_LxBxTxRx2xHd.shape[0], dpartial_BxTxRx2xHd.shape[2]
    dW_RxLxR = jnp.zeros((R, L, R), jnp.float32)
    for lo, hi in group.sources:
      dW_RxLxR = dW_RxLxR.at[:, lo:hi].set(jnp.einsum(
          "btrcd,jbtscd->rjs", dpartial_BxTxRx2xHd, read_slots(buf_LxBxTxRx2xHd, lo, hi - lo),
          preferred_element_type=jnp.float32))
    return dW_RxLxR
  return grad


def _window_start(first, size: int, L: int):
  """The start of a `size`-slot window that begins at `first` (traced or static), kept within
  slots 1..L-1 (slot 0 is read on its own)."""
  if isinstance(first, int):
    return min(max(first, 1), L - size)
  return jnp.clip(first, 1, L - size)


def _mix_window(window: int, l, W_RxLxR, buf_LxBxTxRx2xHd):
  """Forward read of a window of k: layer 0's slot and the k - 1 slots before l (a clipped
  window reaches past l near the start, where the strict row is zero)."""
  L = buf_LxBxTxRx2xHd.shape[0]
  mix = lambda W, kv: jnp.einsum("rjs,jbtscd->btrcd", W, kv,  # noqa: E731
                                 preferred_element_type=jnp.float32)
  partial_BxTxRx2xHd = mix(read_slots(W_RxLxR, 0, 1, 1), read_slots(buf_LxBxTxRx2xHd, 0, 1))
  size = min(window - 1, L - 1)
  if size == 0:
    return partial_BxTxRx2xHd
  start = _window_start(l - size, size, L)
  return partial_BxTxRx2xHd + mix(read_slots(W_RxLxR, start, size, 1),
                                  read_slots(buf_LxBxTxRx2xHd, start, size))


def _cotangent_from_window(window: int, l, W_LxRxR, buf_LxBxTxRx2xHd):
  """Backward: the raw kv's cotangent from the readers i = l+1 .. l+k-1 of its window; layer
  0's from every reader (all of them read it)."""
  L = buf_LxBxTxRx2xHd.shape[0]
  pull = lambda W, dp: jnp.einsum("irs,ibtrcd->btscd", W, dp,  # noqa: E731
                                  preferred_element_type=jnp.float32)
  size = min(window - 1, L - 1)
  def from_window(W_LxRxR, buf_LxBxTxRx2xHd):
    if size == 0:
      return jnp.zeros(buf_LxBxTxRx2xHd.shape[1:], jnp.float32)
    start = _window_start(l + 1, size, L)
    return pull(read_slots(W_LxRxR, start, size), read_slots(buf_LxBxTxRx2xHd, start, size))
  from_all = lambda W_LxRxR, buf_LxBxTxRx2xHd: pull(W_LxRxR, buf_LxBxTxRx2xHd)  # noqa: E731
  if isinstance(l, int):
    return (from_all if l == 0 else from_window)(W_LxRxR, buf_LxBxTxRx2xHd)
  return jax.lax.cond(l == 0, from_all, from_window, W_LxRxR, buf_LxBxTxRx2xHd)


def _router_row_gradient_window(window: int, l, dpartial_BxTxRx2xHd, buf_LxBxTxRx2xHd):
  """Backward: reader l's row over layer 0 and its window's k slots up to l (entries past l,
  which a clipped window reaches, are masked by the caller)."""
  L, R = buf_LxBxTxRx2xHd.shape[0], dpartial_BxTxRx2xHd.shape[2]
  grad = lambda kv: jnp.einsum("btrcd,jbtscd->rjs", dpartial_BxTxRx2xHd, kv,  # noqa: E731
                               preferred_element_type=jnp.float32)
  from_first_RxR = grad(read_slots(buf_LxBxTxRx2xHd, 0, 1))
  dW_RxLxR = jnp.zeros((R, L, R), jnp.float32).at[:, :1].set(from_first_RxR)
  size = min(window, L - 1)
  if size == 0:
    return dW_RxLxR
  start = _window_start(l - size + 1, size, L)
  return jax.lax.dynamic_update_slice_in_dim(
      dW_RxLxR, grad(read_slots(buf_LxBxTxRx2xHd, start, size)), start, 1)


def _strict(W_LxRxLxR: jax.Array) -> jax.Array:
  """Entries j >= i zeroed: what the forward mixes (each layer adds its own term itself)."""
  L = W_LxRxLxR.shape[0]
  earlier_LxL = jnp.arange(L)[None, :] < jnp.arange(L)[:, None]  # [reader, source]
  return W_LxRxLxR * earlier_LxL[:, None, :, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4, 5))
def pull_stack(layer_fn: LayerFn, weights_fn: WeightsFn, groups: tuple[ReadGroup, ...],
               window: int | None, kv_shape: tuple[int, ...], unroll: int,
               params_S: tuple[Any, ...], x_BxTxD: jax.Array,
               positions_BxT: jax.Array) -> jax.Array:
  """The layers, segment b's parameters `params_S[b]` (leading layer axis), reads bounded by
  `groups` (read_groups), or by a router `window` of k (layer 0 and the k slots up to each
  layer; None: dense); the last output. kv_shape: (L, B, T, R, 2, Hd) and the
  compute dtype's name last; unroll: layers per scan iteration."""
  x_BxTxD, _, _, _ = _forward(layer_fn, weights_fn, groups, window, kv_shape, unroll, params_S,
                              x_BxTxD, positions_BxT, save=False)
  return x_BxTxD


def _forward(layer_fn, weights_fn, groups, window, kv_shape, unroll, params_S, x_BxTxD,
             positions_BxT, save):
  *shape, dtype = kv_shape
  L = shape[0]
  W_LxRxLxR = weights_fn(params_S)

  def body(carry, W_RxLxR, l):
    x_BxTxD, buf_LxBxTxRx2xHd = carry
    params_l = _layer_params(groups, l, params_S)
    if window is None:
      partial_BxTxRx2xHd = _switch_on_group(groups, l, _mix_sources, W_RxLxR, buf_LxBxTxRx2xHd)
    else:
      partial_BxTxRx2xHd = _mix_window(window, l, W_RxLxR, buf_LxBxTxRx2xHd)
    run = lambda p, x, part: layer_fn(p, x, part, l, positions_BxT)  # noqa: E731
    if save:
      (x_next, kv_BxTxRx2xHd), vjp = jax.vjp(run, params_l, x_BxTxD, partial_BxTxRx2xHd)
    else:
      (x_next, kv_BxTxRx2xHd), vjp = run(params_l, x_BxTxD, partial_BxTxRx2xHd), None
    # The write of slot l below must follow this layer's reads: its raw kv does not depend on
    # them, and a compiler that schedules the write first keeps the old buffer by copying all of
    # it (the TPU compiler did, in every layer of the unrolled program). The barrier is on the
    # values, not the buffer: on the buffer it kept the reads from fusing into their products.
    kv_BxTxRx2xHd, _ = jax.lax.optimization_barrier((kv_BxTxRx2xHd, partial_BxTxRx2xHd))
    buf_LxBxTxRx2xHd = jax.lax.dynamic_update_index_in_dim(
        buf_LxBxTxRx2xHd, kv_BxTxRx2xHd.astype(dtype), l, 0)
    return (x_next, buf_LxBxTxRx2xHd), vjp

  carry = (x_BxTxD, jnp.zeros(shape, dtype))
  W_LxRxLxR_strict = _strict(W_LxRxLxR)
  if unroll >= L:  # static layer indices (see pull_stack)
    vjps = []
    for l in range(L):
      carry, vjp = body(carry, W_LxRxLxR_strict[l], l)
      vjps.append(vjp)
  else:
    carry, vjps = jax.lax.scan(lambda carry, layer: body(carry, *layer), carry,
                               (W_LxRxLxR_strict, jnp.arange(L)), unroll=unroll)
  x_BxTxD, buf_LxBxTxRx2xHd = carry
  return x_BxTxD, buf_LxBxTxRx2xHd, W_LxRxLxR, vjps


def _pull_stack_fwd(layer_fn, weights_fn, groups, window, kv_shape, unroll, params_S, x_BxTxD,
                    positions_BxT):
  x_out, buf_LxBxTxRx2xHd, W_LxRxLxR, vjps = _forward(
      layer_fn, weights_fn, groups, window, kv_shape, unroll, params_S, x_BxTxD, positions_BxT,
      save=True)
  return x_out, (params_S, buf_LxBxTxRx2xHd, W_LxRxLxR, vjps)


def _pull_stack_bwd(layer_fn, weights_fn, groups, window, kv_shape, unroll, residuals, dx_BxTxD):
  del layer_fn, kv_shape
  params_S, buf_LxBxTxRx2xHd, W_LxRxLxR, vjps = residuals
  L = buf_LxBxTxRx2xHd.shape[0]
  dtype = buf_LxBxTxRx2xHd.dtype
  source_L = jnp.arange(L)

  def body(carry, vjp, column_LxRxR, l):
    # buf: slots j <= l raw kv, slots i > l the cotangents of readers i's partial routed kv.
    dx_BxTxD, buf_LxBxTxRx2xHd = carry
    if window is None:
      dkv_BxTxRx2xHd = _switch_on_group(groups, l, _cotangent_from_readers, column_LxRxR,
                                        buf_LxBxTxRx2xHd)
    else:
      dkv_BxTxRx2xHd = _cotangent_from_window(window, l, column_LxRxR, buf_LxBxTxRx2xHd)
    dparams_l, dx_BxTxD, dpartial_BxTxRx2xHd = vjp((dx_BxTxD, dkv_BxTxRx2xHd.astype(dtype)))
    dpartial32_BxTxRx2xHd = dpartial_BxTxRx2xHd.astype(jnp.float32)
    if window is None:
      dW_RxLxR = _switch_on_group(groups, l, _router_row_gradient, dpartial32_BxTxRx2xHd,
                                  buf_LxBxTxRx2xHd)
    else:
      dW_RxLxR = _router_row_gradient_window(window, l, dpartial32_BxTxRx2xHd, buf_LxBxTxRx2xHd)
    dW_RxLxR = jnp.where((source_L <= l)[None, :, None], dW_RxLxR, 0.0)
    # Overwrite slot l after this layer's reads, as in the forward: the readers' cotangents
    # (dkv) do not feed dpartial, and the router gradient reads slot l's raw kv.
    dpartial_BxTxRx2xHd, _, _ = jax.lax.optimization_barrier(
        (dpartial_BxTxRx2xHd, dkv_BxTxRx2xHd, dW_RxLxR))
    buf_LxBxTxRx2xHd = jax.lax.dynamic_update_index_in_dim(
        buf_LxBxTxRx2xHd, dpartial_BxTxRx2xHd.astype(dtype), l, 0)
    return (dx_BxTxD, buf_LxBxTxRx2xHd), (dparams_l, dW_RxLxR)

  columns_LxLxRxR = jnp.moveaxis(_strict(W_LxRxLxR), 2, 0)  # [source, reader, R, R]
  carry = (dx_BxTxD, buf_LxBxTxRx2xHd)
  if isinstance(vjps, list):  # the forward ran unrolled
    outs = [None] * L
    for l in reversed(range(L)):  # the layers' remat keeps CSE off here (layers.maybe_remat)
      carry, outs[l] = body(carry, vjps[l], columns_LxLxRxR[l], l)
    dparams_L, dW_LxRxLxR = jax.tree.map(lambda *layers: jnp.stack(layers), *outs)
  else:
    carry, (dparams_L, dW_LxRxLxR) = jax.lax.scan(
        lambda carry, layer: body(carry, *layer), carry, (vjps, columns_LxLxRxR, source_L),
        reverse=True, unroll=unroll)
  dx_BxTxD, _ = carry
  dparams_S = tuple(jax.tree.map(lambda a: a[g.start:g.stop], dparams_L) for g in groups)
  _, weights_vjp = jax.vjp(weights_fn, params_S)
  (dparams_from_W,) = weights_vjp(dW_LxRxLxR)
  return jax.tree.map(jnp.add, dparams_S, dparams_from_W), dx_BxTxD, None


pull_stack.defvjp(_pull_stack_fwd, _pull_stack_bwd)
