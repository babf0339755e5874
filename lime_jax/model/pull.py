"""The pull form: a whole-stack VJP for methods whose layers read a buffer that every earlier
layer wrote (spec section 5, design 2), used by the layer stack for mixers with `pulls = True`.

Contract: the buffer has one slot per layer [L, ...]; layer l writes slot l and reads slots <= l
only, giving later slots weight exactly zero. Autodiff through a scan that carries such a buffer
saves it once per layer (memory L^2). Here the forward scan saves only each layer's input and the
final buffer; the backward scan recomputes layer l from its input against the final buffer
(slots > l hold later states, which layer l ignores, so the recomputed layer equals the forward
one) and carries one buffer-sized cotangent. Memory is linear in depth; the price is one extra
forward per layer in the backward (like full remat). Scans are split into segments whose buffer
holds only slots < the segment's end, which cuts the masked work as push.py's segments do.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

# layer_fn(params_l, x_BxTxD, buf_NxP, layer_idx, positions_BxT) -> (x_next, buf): one layer
# that writes slot layer_idx of the buffer and reads slots 0..layer_idx.
LayerFn = Callable[[Any, jax.Array, jax.Array, Any, jax.Array], tuple[jax.Array, jax.Array]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def pull_stack(layer_fn: LayerFn, bounds: tuple[tuple[int, int], ...], unroll: int,
               params_L: Any, x_BxTxD: jax.Array, buf_LxP: jax.Array,
               positions_BxT: jax.Array) -> jax.Array:
  """Runs the layers of `params_L` (leading layer axis) over segments `bounds`, starting from the
  empty buffer `buf_LxP`; returns the last layer's output (the buffer gets no gradient)."""
  x_BxTxD, _, _ = _pull_forward(layer_fn, bounds, unroll, params_L, x_BxTxD, buf_LxP,
                                positions_BxT)
  return x_BxTxD


def _segment(tree: Any, start: int, stop: int) -> Any:
  return jax.tree.map(lambda a: a[start:stop], tree)


def _pull_forward(layer_fn, bounds, unroll, params_L, x_BxTxD, buf_LxP, positions_BxT):
  inputs = []
  for start, stop in bounds:
    def body(carry, layer):
      x_BxTxD, buf_NxP = carry
      params_l, l = layer
      x_next, buf_NxP = layer_fn(params_l, x_BxTxD, buf_NxP, l, positions_BxT)
      return (x_next, buf_NxP), x_BxTxD  # the layer's input: all the backward needs
    # Slots >= stop are still empty and read by no layer of this segment.
    (x_BxTxD, buf_NxP), inputs_SxBxTxD = jax.lax.scan(
        body, (x_BxTxD, buf_LxP[:stop]),
        (_segment(params_L, start, stop), jnp.arange(start, stop)),
        unroll=min(unroll, stop - start))
    buf_LxP = jnp.concatenate([buf_NxP, buf_LxP[stop:]])
    inputs.append(inputs_SxBxTxD)
  return x_BxTxD, buf_LxP, jnp.concatenate(inputs)


def _pull_stack_fwd(layer_fn, bounds, unroll, params_L, x_BxTxD, buf_LxP, positions_BxT):
  x_out, buf_LxP, inputs_LxBxTxD = _pull_forward(layer_fn, bounds, unroll, params_L, x_BxTxD,
                                                 buf_LxP, positions_BxT)
  return x_out, (params_L, inputs_LxBxTxD, buf_LxP, positions_BxT)


def _pull_stack_bwd(layer_fn, bounds, unroll, residuals, dx_BxTxD):
  params_L, inputs_LxBxTxD, buf_LxP, positions_BxT = residuals
  dbuf_NxP = jnp.zeros_like(buf_LxP)
  dparams = []
  for start, stop in reversed(bounds):
    final_NxP = buf_LxP[:stop]

    def body(carry, layer):
      dx_BxTxD, dbuf_NxP = carry
      params_l, x_BxTxD, l = layer
      # Recompute layer l against the final buffer: its slots > l have weight exactly zero.
      _, vjp = jax.vjp(lambda p, x, b: layer_fn(p, x, b, l, positions_BxT),
                       params_l, x_BxTxD, final_NxP)
      dparams_l, dx_BxTxD, dbuf_NxP = vjp((dx_BxTxD, dbuf_NxP))
      return (dx_BxTxD, dbuf_NxP), dparams_l

    # Slots >= stop were written and zeroed by later segments; only [:stop] is still live.
    (dx_BxTxD, dbuf_NxP), dparams_S = jax.lax.scan(
        body, (dx_BxTxD, dbuf_NxP[:stop]),
        (_segment(params_L, start, stop), inputs_LxBxTxD[start:stop], jnp.arange(start, stop)),
        reverse=True, unroll=min(unroll, stop - start))
    dparams.insert(0, dparams_S)
  dparams_L = jax.tree.map(lambda *parts: jnp.concatenate(parts), *dparams)
  return dparams_L, dx_BxTxD, None, None


pull_stack.defvjp(_pull_stack_fwd, _pull_stack_bwd)
