"""The pull form: a whole-stack VJP for methods whose layers read a buffer that every earlier
layer wrote (spec section 5, design 2), used by the layer stack for mixers with `pulls = True`.

Contract: the buffer has one slot per layer [L, ...]; layer l writes slot l and reads slots <= l
only, giving later slots weight exactly zero. Autodiff through a scan that carries such a buffer
saves it once per layer (memory L^2). Here the forward scan saves only each layer's input and the
final buffer; the backward scan recomputes layer l from its input against the final buffer
(slots > l hold later states, which layer l ignores, so the recomputed layer equals the forward
one) and carries one buffer-sized cotangent. Memory is linear in depth; the price is one extra
forward per layer in the backward (like full remat). Scans are split into segments whose buffer
holds only the slots the segment's layers touch, which cuts the masked work as push.py's
segments do. A method may write several slots per layer (Attention Residuals: one per
sub-layer), so each segment states how many leading slots it touches.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

# layer_fn(params_l, x_BxTxD, buf_NxP, layer_idx, positions_BxT) -> (x_next, buf): one layer
# that reads only slots written before it (or by itself) and writes its own slots.
LayerFn = Callable[[Any, jax.Array, jax.Array, Any, jax.Array], tuple[jax.Array, jax.Array]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def pull_stack(layer_fn: LayerFn, bounds: tuple[tuple[int, int, int], ...], unroll: int,
               params_L: Any, x_BxTxD: jax.Array, buf_LxP: jax.Array,
               positions_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Runs the layers of `params_L` (leading layer axis) over segments `bounds` ((start, stop,
  slots): layers start..stop-1 touch the buffer's first `slots` slots), starting from the
  buffer `buf_LxP` (empty, or holding sources such as the embeddings); returns the last layer's
  output and the final buffer."""
  x_BxTxD, buf_LxP, _ = _pull_forward(layer_fn, bounds, unroll, params_L, x_BxTxD, buf_LxP,
                                      positions_BxT)
  return x_BxTxD, buf_LxP


def _segment(tree: Any, start: int, stop: int) -> Any:
  return jax.tree.map(lambda a: a[start:stop], tree)


def _pull_forward(layer_fn, bounds, unroll, params_L, x_BxTxD, buf_LxP, positions_BxT):
  inputs = []
  for start, stop, slots in bounds:
    def body(carry, layer):
      x_BxTxD, buf_NxP = carry
      params_l, l = layer
      x_next, buf_NxP = layer_fn(params_l, x_BxTxD, buf_NxP, l, positions_BxT)
      return (x_next, buf_NxP), x_BxTxD  # the layer's input: all the backward needs
    # Slots >= `slots` are still empty and touched by no layer of this segment.
    (x_BxTxD, buf_NxP), inputs_SxBxTxD = jax.lax.scan(
        body, (x_BxTxD, buf_LxP[:slots]),
        (_segment(params_L, start, stop), jnp.arange(start, stop)),
        unroll=min(unroll, stop - start))
    buf_LxP = jnp.concatenate([buf_NxP, buf_LxP[slots:]])
    inputs.append(inputs_SxBxTxD)
  return x_BxTxD, buf_LxP, jnp.concatenate(inputs)


def _pull_stack_fwd(layer_fn, bounds, unroll, params_L, x_BxTxD, buf_LxP, positions_BxT):
  x_out, buf_LxP, inputs_LxBxTxD = _pull_forward(layer_fn, bounds, unroll, params_L, x_BxTxD,
                                                 buf_LxP, positions_BxT)
  return (x_out, buf_LxP), (params_L, inputs_LxBxTxD, buf_LxP, positions_BxT)


def _pull_stack_bwd(layer_fn, bounds, unroll, residuals, cotangents):
  params_L, inputs_LxBxTxD, buf_LxP, positions_BxT = residuals
  dx_BxTxD, dbuf_LxP = cotangents  # dbuf: zeros unless the caller reads the final buffer
  dparams = []
  for start, stop, slots in reversed(bounds):
    final_NxP = buf_LxP[:slots]

    def body(carry, layer):
      dx_BxTxD, dbuf_NxP = carry
      params_l, x_BxTxD, l = layer
      # Recompute layer l against the final buffer: its slots > l have weight exactly zero.
      _, vjp = jax.vjp(lambda p, x, b: layer_fn(p, x, b, l, positions_BxT),
                       params_l, x_BxTxD, final_NxP)
      dparams_l, dx_BxTxD, dbuf_NxP = vjp((dx_BxTxD, dbuf_NxP))
      return (dx_BxTxD, dbuf_NxP), dparams_l

    # Slots >= `slots` were written by later segments, whose VJPs moved their cotangents to
    # what those layers wrote; the initial buffer gets none, so they are dropped here.
    (dx_BxTxD, dbuf_LxP), dparams_S = jax.lax.scan(
        body, (dx_BxTxD, dbuf_LxP[:slots]),
        (_segment(params_L, start, stop), inputs_LxBxTxD[start:stop], jnp.arange(start, stop)),
        reverse=True, unroll=min(unroll, stop - start))
    dparams.insert(0, dparams_S)
  dparams_L = jax.tree.map(lambda *parts: jnp.concatenate(parts), *dparams)
  # What is left is the initial buffer's cotangent (slots no layer wrote over).
  dbuf_LxP = jnp.concatenate(
      [dbuf_LxP, jnp.zeros((buf_LxP.shape[0] - dbuf_LxP.shape[0],) + buf_LxP.shape[1:],
                           dbuf_LxP.dtype)])
  return dparams_L, dx_BxTxD, dbuf_LxP, None


pull_stack.defvjp(_pull_stack_fwd, _pull_stack_bwd)
