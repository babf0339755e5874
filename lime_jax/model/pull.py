"""The pull form: a whole-stack VJP for methods whose layers read a buffer that every earlier
layer wrote (spec section 5, design 2), used by the layer stack for mixers with `pulls = True`.

Contract: the buffer has one slot per layer [L, ...]; layer l writes slot l and reads slots <= l
only, giving later slots weight exactly zero. Autodiff through a scan that carries such a buffer
saves it once per layer (memory L^2). Here the forward scan saves only each layer's input and the
final buffer; the backward scan recomputes layer l from its input against the final buffer
(slots > l hold later states, which layer l ignores, so the recomputed layer equals the forward
one) and carries one buffer-sized cotangent. Memory is linear in depth; the price is one extra
forward per layer in the backward (like full remat).

Segments bound the reads: a layer of segment [start, stop) sees only the buffer's first `slots`
slots, the ones the segment's layers touch (a method may write several slots per layer:
Attention Residuals writes one per sub-layer), which cuts the masked work as push.py's segments
do. All layers run in one scan, forward and backward, and a `lax.switch` on the layer's segment
reads a buffer prefix of static size (`read_slots`): the TPU compiler kept several layers'
attention temporaries live across one loop per segment (kv_pull.py measured +6.6 GiB at 1.2B
with 4 loops), and slicing the stacked parameters per segment copied them. A fully unrolled
stack of several segments (`unroll >= L`, the cost program of `lime-jax plan`) runs as a
Python loop with each layer's segment known at trace time, as XLA counted every branch of an
unrolled scan's switch; one segment has no switch and stays a scan. Unrolled, the backward's
re-run of each layer passes an optimization barrier, or XLA would merge it with the forward.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

# layer_fn(params_l, x_BxTxD, buf_NxP, layer_idx, positions_BxT) -> (x_next, buf): one layer
# that reads only slots written before it (or by itself) and writes its own slots.
LayerFn = Callable[[Any, jax.Array, jax.Array, Any, jax.Array], tuple[jax.Array, jax.Array]]
Bounds = tuple[tuple[int, int, int], ...]  # per segment: (start, stop, slots)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def pull_stack(layer_fn: LayerFn, bounds: Bounds, unroll: int, params_L: Any,
               x_BxTxD: jax.Array, buf_LxP: jax.Array,
               positions_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Runs the layers of `params_L` (leading layer axis) over segments `bounds` ((start, stop,
  slots): layers start..stop-1 touch the buffer's first `slots` slots), starting from the
  buffer `buf_LxP` (empty, or holding sources such as the embeddings); returns the last layer's
  output and the final buffer."""
  x_BxTxD, buf_LxP, _ = _pull_forward(layer_fn, bounds, unroll, params_L, x_BxTxD, buf_LxP,
                                      positions_BxT)
  return x_BxTxD, buf_LxP


def read_slots(a: jax.Array, start, size: int, axis: int = 0) -> jax.Array:
  """Slots [start, start + size) of a layer buffer `a` on `axis`, by a dynamic slice whose
  start the compiler cannot see. From a static slice of the buffer the TPU compiler makes a
  convolution over the whole buffer with negative padding, and charges it the whole buffer:
  7 of 64 slots cost 280 MiB against 52 MiB this way (one read in the deep setup, 4 MiB per
  slot), so an unrolled program's reads grew as L^2. All of `a` is `a` itself."""
  if isinstance(start, int):
    if start == 0 and size == a.shape[axis]:
      return a
    start = jax.lax.optimization_barrier(jnp.int32(start))
  return jax.lax.dynamic_slice_in_dim(a, start, size, axis)


def _on_segment(bounds: Bounds, layer_idx, branch: Callable[[int], Callable], *operands):
  """`branch(slots)(*operands)` for the segment of `layer_idx`: static when the index is a
  Python int, else a `lax.switch` whose branches read prefixes of static sizes."""
  segment_of_layer = np.concatenate([np.full(stop - start, b)
                                     for b, (start, stop, _) in enumerate(bounds)])
  if isinstance(layer_idx, int):
    return branch(bounds[segment_of_layer[layer_idx]][2])(*operands)
  index = jnp.asarray(segment_of_layer, jnp.int32)[layer_idx]
  return jax.lax.switch(index, [branch(slots) for _, _, slots in bounds], *operands)


def _layers(bounds: Bounds, unroll: int, body, carry, xs, reverse: bool = False):
  """jax.lax.scan over the layers; a Python loop with int layer indices when fully unrolled
  over several segments, where a scan would keep the switch."""
  L = _layer_count(bounds)
  if unroll < L or len(bounds) == 1:
    return jax.lax.scan(body, carry, (*xs, jnp.arange(L)), reverse=reverse, unroll=unroll)
  ys = [None] * L
  for l in (reversed(range(L)) if reverse else range(L)):
    carry, ys[l] = body(carry, (*jax.tree.map(lambda a: a[l], xs), l))
  return carry, jax.tree.map(lambda *parts: jnp.stack(parts), *ys)


def _layer_count(bounds: Bounds) -> int:
  return bounds[-1][1]


def _pull_forward(layer_fn, bounds, unroll, params_L, x_BxTxD, buf_LxP, positions_BxT):
  def body(carry, layer):
    x_BxTxD, buf_LxP = carry
    params_l, l = layer

    def branch(slots: int):
      def run(params_l, x_BxTxD, buf_LxP):
        # Slots >= `slots` are still empty and touched by no layer of this segment.
        x_next, prefix_NxP = layer_fn(params_l, x_BxTxD, read_slots(buf_LxP, 0, slots), l,
                                      positions_BxT)
        return x_next, jax.lax.dynamic_update_slice_in_dim(buf_LxP, prefix_NxP, 0, 0)
      return run

    x_next, buf_LxP = _on_segment(bounds, l, branch, params_l, x_BxTxD, buf_LxP)
    return (x_next, buf_LxP), x_BxTxD  # the layer's input: all the backward needs

  (x_BxTxD, buf_LxP), inputs_LxBxTxD = _layers(bounds, unroll, body, (x_BxTxD, buf_LxP),
                                               (params_L,))
  return x_BxTxD, buf_LxP, inputs_LxBxTxD


def _pull_stack_fwd(layer_fn, bounds, unroll, params_L, x_BxTxD, buf_LxP, positions_BxT):
  x_out, buf_LxP, inputs_LxBxTxD = _pull_forward(layer_fn, bounds, unroll, params_L, x_BxTxD,
                                                 buf_LxP, positions_BxT)
  return (x_out, buf_LxP), (params_L, inputs_LxBxTxD, buf_LxP, positions_BxT)


def _pull_stack_bwd(layer_fn, bounds, unroll, residuals, cotangents):
  params_L, inputs_LxBxTxD, final_LxP, positions_BxT = residuals
  dx_BxTxD, dbuf_LxP = cotangents  # dbuf: zeros unless the caller reads the final buffer

  def body(carry, layer):
    dx_BxTxD, dbuf_LxP = carry
    params_l, x_BxTxD, l = layer
    if unroll >= _layer_count(bounds):
      # Straight-line code: XLA would merge this recomputation with the forward's layer l
      # (same parameters and input) and skip it, a program cheaper than the scanned one that
      # training runs, whose backward loop is apart from its forward.
      params_l, x_BxTxD = jax.lax.optimization_barrier((params_l, x_BxTxD))

    def branch(slots: int):
      def run(params_l, x_BxTxD, dx_BxTxD, dbuf_LxP):
        # Recompute layer l against the final buffer: its slots > l have weight exactly zero.
        _, vjp = jax.vjp(lambda p, x, b: layer_fn(p, x, b, l, positions_BxT),
                         params_l, x_BxTxD, read_slots(final_LxP, 0, slots))
        dparams_l, dx_BxTxD, dprefix_NxP = vjp((dx_BxTxD, read_slots(dbuf_LxP, 0, slots)))
        # Slots >= `slots` passed through the layer untouched, and so do their cotangents.
        return dparams_l, dx_BxTxD, jax.lax.dynamic_update_slice_in_dim(dbuf_LxP, dprefix_NxP,
                                                                        0, 0)
      return run

    dparams_l, dx_BxTxD, dbuf_LxP = _on_segment(bounds, l, branch, params_l, x_BxTxD, dx_BxTxD,
                                                dbuf_LxP)
    return (dx_BxTxD, dbuf_LxP), dparams_l

  (dx_BxTxD, dbuf_LxP), dparams_L = _layers(bounds, unroll, body, (dx_BxTxD, dbuf_LxP),
                                             (params_L, inputs_LxBxTxD), reverse=True)
  # What is left is the initial buffer's cotangent (every written slot's was zeroed by its
  # writer's VJP).
  return dparams_L, dx_BxTxD, dbuf_LxP, None


pull_stack.defvjp(_pull_stack_fwd, _pull_stack_bwd)
