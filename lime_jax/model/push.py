"""The push accumulator: the one primitive (with its hand-written VJP) that keeps cross-layer
mixing linear in memory under `nn.scan` (spec section 5, design 1).

A method whose reader layer i reads a weighted sum over sources j <= i (LIMe's kv routing,
DenseFormer's depth-weighted average) carries one float32 slot per reader still to run:

    acc[i, r] += sum_s weights[i, r, s] * payload[s]      for every live reader i >= l,

after which layer l reads its own slot. Additions need no saved copies under reverse-mode
autodiff, unlike a carried buffer that every layer reads (that buffer is saved once per layer:
memory L^2). Heads r, s lead the slot so the mix is one plain matmul [I*R, S] x [S, rest]
(on the CPU, S fused multiply-adds: see `_mixed`; its backward works on the accumulator as
rows [I*R, rest]: see `_cotangents_on_rows`); a method without heads uses R = S = 1.

The payload may be given as `Recomputed(fn, inputs)`: under `nn.scan` the backward then
recomputes fn(*inputs) instead of saving the payload, one [S, *P] float32 array per layer
(LIMe's raw kv, from the layer's normed input, which autodiff saves anyway).

Scans are split into segments (`segment_bounds`): each segment's accumulator only holds readers
>= its start, which cuts the work of a traced layer index (it updates every slot of its
segment, masked ones included) from L^2 to about L^2 (S+1) / (2S) slot updates.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Recomputed(NamedTuple):
  """A payload given as fn(*inputs), which the scanned push's backward recomputes rather than
  saves. `fn` is a plain function of arrays (no closed-over tracers)."""

  fn: Callable[..., jax.Array]
  inputs: tuple[jax.Array, ...]

  def value(self) -> jax.Array:
    return self.fn(*self.inputs)


def push_and_read(acc_IxRxP: jax.Array, weights_IxRxS: jax.Array,
                  payload_SxP: jax.Array | Recomputed, slot,
                  live_slots: np.ndarray | None = None) -> tuple[jax.Array, jax.Array]:
  """Adds `weights (x) payload` into the accumulator; returns (accumulator, its slot `slot`).

  acc [I, R, *P] float32, weights [I, R, S], payload [S, *P] float32 (P any trailing axes), or
  a `Recomputed` one. With a Python-int slot (unrolled layers) only `live_slots` (which must
  hold `slot`) are touched, each method's exact work, and a `Recomputed` payload is saved by
  autodiff as any array; with a traced slot (nn.scan) every slot is updated, the masked weights
  being exactly zero.
  """
  if isinstance(slot, int):
    if isinstance(payload_SxP, Recomputed):
      payload_SxP = payload_SxP.value()
    slots = static_slots(np.asarray(live_slots))
    acc_IxRxP = acc_IxRxP.at[slots].add(_mixed(weights_IxRxS[slots], payload_SxP))
    return acc_IxRxP, acc_IxRxP[slot]
  if isinstance(payload_SxP, Recomputed):
    return _push_read(payload_SxP.fn, acc_IxRxP, weights_IxRxS, payload_SxP.inputs, slot)
  return _push_read(_itself, acc_IxRxP, weights_IxRxS, (payload_SxP,), slot)


def _itself(payload_SxP: jax.Array) -> jax.Array:
  return payload_SxP


def _payload_axes(payload_SxP: jax.Array) -> str:
  """Einsum letters for the payload's trailing axes: those of kv [B, T, 2, Hd] (`...` would
  reorder the dot's contracting dimensions, which einsum sorts by letter, and with them the
  layouts XLA picks; these keep kv routing's compiled program as measured)."""
  return "btcdefgh"[:payload_SxP.ndim - 1]


@jax.custom_vjp
def _mixed(weights_IxRxS: jax.Array, payload_SxP: jax.Array) -> jax.Array:
  """weights (x) payload, [I, R, *P]: one dot, except on the CPU, where it is S broadcast
  multiply-adds that XLA fuses into one loop over the output. Alone, XLA:CPU's dot with a
  contraction of S (the kv heads; 1 for DenseFormer) ran 7x slower (94 against 14 ms at
  I*R = 224, S = 4, the bench's shape); in the whole training step this is 5% at 16 layers and
  within noise at 64. Other platforms keep the dot their compilers were measured with: there
  the loop could read the payload once per output row.

  Its backward is the dot's on every platform (`_mixed_cotangents`; the scan's push has a VJP
  of its own, so this one serves the unrolled path). Autodiff of the CPU's loop made S products
  [I, R, *P] per layer for the weights' gradient, and XLA:CPU kept them live across layers: an
  unrolled 32-layer kv-static stack took 293 MiB of gradient temp memory against 39 scanned
  (4 heads, D 64, T 64, B 2), 3.6x per doubling of depth; 31 MiB with this backward."""
  return jax.lax.platform_dependent(weights_IxRxS, payload_SxP, cpu=_mixed_by_loop,
                                    default=_mixed_by_dot)


def _mixed_fwd(weights_IxRxS, payload_SxP):
  return _mixed(weights_IxRxS, payload_SxP), (weights_IxRxS, payload_SxP)


def _mixed_bwd(residuals, dmixed_IxRxP):
  return _mixed_cotangents(dmixed_IxRxP, *residuals)


_mixed.defvjp(_mixed_fwd, _mixed_bwd)


def _mixed_cotangents(dmixed_IxRxP, weights_IxRxS, payload_SxP):
  """(weights, payload) cotangents of weights (x) payload: two dots over the mix's cotangent."""
  p = _payload_axes(payload_SxP)
  dweights_IxRxS = jnp.einsum(f"ir{p},s{p}->irs", dmixed_IxRxP, payload_SxP)
  dpayload_SxP = jnp.einsum(f"irs,ir{p}->s{p}", weights_IxRxS, dmixed_IxRxP)
  return dweights_IxRxS.astype(weights_IxRxS.dtype), dpayload_SxP.astype(payload_SxP.dtype)


def _mixed_by_dot(weights_IxRxS: jax.Array, payload_SxP: jax.Array) -> jax.Array:
  p = _payload_axes(payload_SxP)
  return jnp.einsum(f"irs,s{p}->ir{p}", weights_IxRxS, payload_SxP)


def _mixed_by_loop(weights_IxRxS: jax.Array, payload_SxP: jax.Array) -> jax.Array:
  trailing = (None,) * (payload_SxP.ndim - 1)
  terms = (weights_IxRxS[:, :, s][(..., *trailing)] * payload_SxP[None, None, s]
           for s in range(payload_SxP.shape[0]))
  return functools.reduce(jnp.add, terms)


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
  """Splits layers 0..L-1 into contiguous [start, stop) segments, the larger ones last."""
  S = min(num_segments, L)
  sizes = [L // S] * (S - L % S) + [L // S + 1] * (L % S)
  starts = [sum(sizes[:b]) for b in range(S)]
  return [(start, start + size) for start, size in zip(starts, sizes)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _push_read(payload_fn, acc_IxRxP, weights_IxRxS, payload_inputs, slot):
  """acc + weights (x) payload_fn(*payload_inputs), and slot `slot` of the result; the
  traced-index form for nn.scan."""
  acc_IxRxP = acc_IxRxP + _mixed(weights_IxRxS, payload_fn(*payload_inputs))
  return acc_IxRxP, jax.lax.dynamic_index_in_dim(acc_IxRxP, slot, 0, keepdims=False)


def _push_read_fwd(payload_fn, acc_IxRxP, weights_IxRxS, payload_inputs, slot):
  outputs = _push_read(payload_fn, acc_IxRxP, weights_IxRxS, payload_inputs, slot)
  return outputs, (weights_IxRxS, payload_inputs, slot)  # never the accumulator


def _push_read_bwd(payload_fn, residuals, cotangents):
  # Hand-written so the read's cotangent lands in its slot in place: autodiff's version
  # scatters it into a zero buffer and adds that to the whole carry cotangent (2.6x slower).
  weights_IxRxS, payload_inputs, slot = residuals
  dacc_IxRxP, dread_RxP = cotangents
  payload_SxP, payload_vjp = jax.vjp(payload_fn, *payload_inputs)
  dacc_IxRxP, dweights_IxRxS, dpayload_SxP = jax.lax.platform_dependent(
      dacc_IxRxP, dread_RxP, weights_IxRxS, payload_SxP, slot,
      cpu=_cotangents_on_rows, default=_cotangents)
  return dacc_IxRxP, dweights_IxRxS, payload_vjp(dpayload_SxP), None


def _cotangents(dacc_IxRxP, dread_RxP, weights_IxRxS, payload_SxP, slot):
  """(accumulator, weights, payload) cotangents: the read's lands in its slot, then two dots
  over the updated accumulator cotangent."""
  slot_RxP = jax.lax.dynamic_index_in_dim(dacc_IxRxP, slot, 0, keepdims=False)
  dacc_IxRxP = jax.lax.dynamic_update_index_in_dim(dacc_IxRxP, slot_RxP + dread_RxP, slot, 0)
  return dacc_IxRxP, *_mixed_cotangents(dacc_IxRxP, weights_IxRxS, payload_SxP)


def _cotangents_on_rows(dacc_IxRxP, dread_RxP, weights_IxRxS, payload_SxP, slot):
  """`_cotangents` for XLA:CPU, on the accumulator flattened to rows [I*R, P]: the update and
  both products are 2-D. On the nested shape XLA:CPU fused the update once for the scan's carry
  and again, flattened, for the products, and copied the whole accumulator 5 times per layer to
  serve both; its dots with several contracting dimensions also ran 3x slower alone (75
  against 31 ms at I*R = 224, the bench's shape). Other platforms keep `_cotangents`, the form
  their compilers were measured with (there flattening could force a relayout copy)."""
  I, R, S = weights_IxRxS.shape
  dacc_IRxP = dacc_IxRxP.reshape(I * R, -1)
  slot_RxP = jax.lax.dynamic_slice_in_dim(dacc_IRxP, slot * R, R)
  dacc_IRxP = jax.lax.dynamic_update_slice_in_dim(
      dacc_IRxP, slot_RxP + dread_RxP.reshape(R, -1), slot * R, 0)
  flat_payload_SxP = payload_SxP.reshape(S, -1)
  dweights_IRxS = dacc_IRxP @ flat_payload_SxP.T
  dpayload_SxP = weights_IxRxS.reshape(I * R, S).T @ dacc_IRxP
  return (dacc_IRxP.reshape(dacc_IxRxP.shape), dweights_IRxS.reshape(I, R, S),
          dpayload_SxP.reshape(payload_SxP.shape))


_push_read.defvjp(_push_read_fwd, _push_read_bwd)
