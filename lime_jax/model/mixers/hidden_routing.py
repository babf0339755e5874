"""LIMe hidden-state routing (the paper's v1, `router: hidden-static | hidden-dynamic`): the math
and a pull-form layer stack with a hand-written VJP.

States S_0 = the embeddings, S_j = the residual stream entering layer j. Layer l >= 1 reads
S_0..S_l, each through one extra RMSNorm (one per reader layer), mixes them per query head h with
softmax weights over its sources, and projects head h's mix with its own K and V matrices:

    mixed_l[h] = g_l * sum_j w_l[h, j] * unit(S_j),   K_l[h], V_l[h] = mixed_l[h] @ Wk_l[h], Wv_l[h]

where unit(x) = x / rms(x) and g_l is reader l's norm scale. The scale is per feature and the mix
is linear, so every reader can share one buffer of unit-normed states and apply its scale after
mixing: that is exactly "RMSNorm(S_j) with reader l's norm" for every j. Static routers hold
logits [H, L] per layer (init N(0, 1) * 0.1); dynamic ones a bias-free map [D, H, L] of the
layer's normed input to per-token logits. Layer 0 is a plain (MHA) baseline layer.

Memory. Push form (core routing.py) would need an accumulator slot per (reader, head): H times
the states, [L, H, B, T, D]. Pushing projected K/V instead is out, since each reader has its own
projections (a source would run every later reader's projection: L^2 / 2 of them). And dynamic
weights depend on the reader's input, so cannot be pushed at all. Both routers therefore use the
spec's pull form (section 5, design 2) in `pull_stack`: the forward scan carries the buffer of
unit states [L, B, T, D] and saves only each layer's input and the final buffer; the backward
scan recomputes layer l from its input and the final buffer, carrying one buffer-sized
cotangent. Slots j > l of the final buffer hold later states, but reader l gives them weight
exactly zero, so the recomputed layer equals the forward one. Memory is linear in depth; the
price is one extra forward per layer in the backward (like full remat).
The scans are split into segments (`scan_segments`) whose buffer holds only slots < the segment's
end, which cuts the masked mixing work as the core's segments do.

All routing math runs in float32 whatever the compute dtype.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lime_jax.model import kv_routing as routing


def num_router_params(L: int, D: int, H: int, router: str, window: int | None = None,
                      dilation: int | None = None) -> int:
  """Learnable router parameters: H per live (reader >= 1, source) pair for static logits,
  D * H for dynamic ones, plus one norm scale [D] per reader layer >= 1.

  Dense: live pairs = L(L+1)/2 - 1, so static H (L(L+1)/2 - 1) + (L-1) D.
  """
  pairs = num_live_pairs(L, window, dilation)
  per_pair = H if router == "hidden-static" else D * H
  return per_pair * pairs + (L - 1) * D


def num_live_pairs(L: int, window: int | None = None, dilation: int | None = None) -> int:
  """(reader i >= 1, source j <= i) pairs that sparse routing keeps; L(L+1)/2 - 1 when dense."""
  return int(routing.live_mask(L, window, dilation)[:, 1:].sum())


def source_mask(layer_idx, num_slots: int, window: int | None = None,
                dilation: int | None = None) -> jax.Array:
  """Bool [N]: the sources j < N that reader l reads (j <= l, and live under sparse routing)."""
  return routing.live(layer_idx, jnp.arange(num_slots), window, dilation)


def init_static_logits(rng: jax.Array, layer_idx, L: int, H: int, window: int | None = None,
                       dilation: int | None = None) -> jax.Array:
  """Logits [H, L]: N(0, 1) * 0.1 on reader l's live sources, zero (masked) elsewhere."""
  live_L = source_mask(layer_idx, L, window, dilation)
  return jnp.where(live_L[None, :], 0.1 * jax.random.normal(rng, (H, L), jnp.float32), 0.0)


def init_dynamic_router(rng: jax.Array, layer_idx, L: int, D: int, H: int,
                        window: int | None = None, dilation: int | None = None) -> jax.Array:
  """Map [D, H, L] ~ N(0, (0.1 / sqrt(D))^2) on live sources: the normed input has rms 1, so the
  initial logits have the static router's scale 0.1."""
  live_L = source_mask(layer_idx, L, window, dilation)
  w_DxHxL = jax.random.normal(rng, (D, H, L), jnp.float32) * (0.1 / D ** 0.5)
  return jnp.where(live_L[None, None, :], w_DxHxL, 0.0)


def unit_rms(x_BxTxD: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) in float32: RMSNorm without its scale."""
  x32_BxTxD = x_BxTxD.astype(jnp.float32)
  return x32_BxTxD * jax.lax.rsqrt(jnp.mean(jnp.square(x32_BxTxD), axis=-1, keepdims=True) + eps)


def masked_softmax(logits_xN: jax.Array, keep_N: jax.Array) -> jax.Array:
  """Softmax over the kept sources (last axis), exactly zero with zero gradient elsewhere."""
  logits_xN = jnp.where(keep_N, logits_xN.astype(jnp.float32), -jnp.inf)
  return jnp.where(keep_N, jax.nn.softmax(logits_xN, axis=-1), 0.0)


def mix(weights: jax.Array, buf_NxBxTxD: jax.Array, scale_D: jax.Array) -> jax.Array:
  """Per-head mixes [B, T, H, D] of the unit states; static weights [H, N] or dynamic [B, T, H, N]."""
  if weights.ndim == 2:
    mixed_BxTxHxD = jnp.einsum("hj,jbtd->bthd", weights, buf_NxBxTxD)
  else:
    mixed_BxTxHxD = jnp.einsum("bthj,jbtd->bthd", weights, buf_NxBxTxD)
  return mixed_BxTxHxD * scale_D.astype(jnp.float32)[None, None, None, :]


# --- the pull-form layer stack -------------------------------------------------------------------

# layer_fn(params_l, x_BxTxD, buf_NxBxTxD, layer_idx, positions_BxT) -> (x_next, buf): one layer
# that writes unit(x) into slot layer_idx of the buffer and reads slots 0..layer_idx.
LayerFn = Callable[[Any, jax.Array, jax.Array, Any, jax.Array], tuple[jax.Array, jax.Array]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def pull_stack(layer_fn: LayerFn, bounds: tuple[tuple[int, int], ...], unroll: int,
               params_L: Any, x_BxTxD: jax.Array, positions_BxT: jax.Array) -> jax.Array:
  """Runs the layers of `params_L` (leading layer axis) over segments `bounds`; returns the last
  layer's output. Training memory: each layer's input and one buffer (see the module doc)."""
  x_BxTxD, _, _ = _pull_forward(layer_fn, bounds, unroll, params_L, x_BxTxD, positions_BxT)
  return x_BxTxD


def _segment(tree: Any, start: int, stop: int) -> Any:
  return jax.tree.map(lambda a: a[start:stop], tree)


def _pull_forward(layer_fn, bounds, unroll, params_L, x_BxTxD, positions_BxT):
  L = bounds[-1][1]
  buf_LxBxTxD = jnp.zeros((L,) + x_BxTxD.shape, jnp.float32)
  inputs = []
  for start, stop in bounds:
    def body(carry, layer):
      x_BxTxD, buf_NxBxTxD = carry
      params_l, l = layer
      x_next, buf_NxBxTxD = layer_fn(params_l, x_BxTxD, buf_NxBxTxD, l, positions_BxT)
      return (x_next, buf_NxBxTxD), x_BxTxD  # the layer's input: all the backward needs
    # Slots >= stop are still empty and read by no layer of this segment.
    (x_BxTxD, buf_NxBxTxD), inputs_SxBxTxD = jax.lax.scan(
        body, (x_BxTxD, buf_LxBxTxD[:stop]),
        (_segment(params_L, start, stop), jnp.arange(start, stop)),
        unroll=min(unroll, stop - start))
    buf_LxBxTxD = jnp.concatenate([buf_NxBxTxD, buf_LxBxTxD[stop:]])
    inputs.append(inputs_SxBxTxD)
  return x_BxTxD, buf_LxBxTxD, jnp.concatenate(inputs)


def _pull_stack_fwd(layer_fn, bounds, unroll, params_L, x_BxTxD, positions_BxT):
  x_out, buf_LxBxTxD, inputs_LxBxTxD = _pull_forward(layer_fn, bounds, unroll, params_L,
                                                     x_BxTxD, positions_BxT)
  return x_out, (params_L, inputs_LxBxTxD, buf_LxBxTxD, positions_BxT)


def _pull_stack_bwd(layer_fn, bounds, unroll, residuals, dx_BxTxD):
  params_L, inputs_LxBxTxD, buf_LxBxTxD, positions_BxT = residuals
  dbuf_NxBxTxD = jnp.zeros_like(buf_LxBxTxD)
  dparams = []
  for start, stop in reversed(bounds):
    final_NxBxTxD = buf_LxBxTxD[:stop]

    def body(carry, layer):
      dx_BxTxD, dbuf_NxBxTxD = carry
      params_l, x_BxTxD, l = layer
      # Recompute layer l against the final buffer: its slots > l have weight exactly zero.
      _, vjp = jax.vjp(lambda p, x, b: layer_fn(p, x, b, l, positions_BxT),
                       params_l, x_BxTxD, final_NxBxTxD)
      dparams_l, dx_BxTxD, dbuf_NxBxTxD = vjp((dx_BxTxD, dbuf_NxBxTxD))
      return (dx_BxTxD, dbuf_NxBxTxD), dparams_l

    # Slots >= stop were written and zeroed by later segments; only [:stop] is still live.
    (dx_BxTxD, dbuf_NxBxTxD), dparams_S = jax.lax.scan(
        body, (dx_BxTxD, dbuf_NxBxTxD[:stop]),
        (_segment(params_L, start, stop), inputs_LxBxTxD[start:stop], jnp.arange(start, stop)),
        reverse=True, unroll=min(unroll, stop - start))
    dparams.insert(0, dparams_S)
  dparams_L = jax.tree.map(lambda *parts: jnp.concatenate(parts), *dparams)
  return dparams_L, dx_BxTxD, None


pull_stack.defvjp(_pull_stack_fwd, _pull_stack_bwd)


def weight_view(logits_LxHxL: np.ndarray, L: int, window: int | None = None,
                dilation: int | None = None, keep_LxHxL: np.ndarray | None = None) -> np.ndarray:
  """Static routers as mixing weights [L_reader, H, L_src] (softmax over live, kept sources);
  reader 0 reads only itself."""
  live_LxL = routing.live_mask(L, window, dilation).T  # [reader, source]
  keep = np.broadcast_to(live_LxL[:, None, :], logits_LxHxL.shape)
  if keep_LxHxL is not None:
    keep = keep & keep_LxHxL
  return np.asarray(masked_softmax(jnp.asarray(logits_LxHxL), jnp.asarray(keep)))
