"""LIMe key/value routing (the paper's v2, `router: kv-static`) in push form.

The spec's router W_l [R, l+1, R] belongs to reader layer l. Under `nn.scan` each layer only
sees its own parameter slice, so we store the same numbers indexed by *source* layer:

    push_l[i, r, s] = W_i[r, l, s]      shape [L, R, R] for every layer l

Layer l adds its raw kv, mixed by push_l, into one accumulator slot per reader layer i (the
push primitive of push.py), then reads its own slot: training memory stays linear in depth.
Entries with reader i < l are masked to exactly zero, so every layer has one shape; the
layer-0 self entry is the fixed identity (layer 0 does no routing), not a parameter.

All routing math runs in float32 whatever the compute dtype.

Under `nn.scan` the push's backward recomputes each layer's raw kv from the layer's normed input
(`push_raw_kv: recompute`, the default; `push.Recomputed`) rather than saving it: one float32
kv per layer less memory, for one more kv projection per layer. `push_raw_kv: save` saves it.

Sparse routing (`router_window`, `router_dilation`; see `live`, shared with the hidden routers):
dead (reader, source) pairs are masked like future sources, exactly zero with zero gradient, and
not counted as parameters. The unrolled path touches only live reader slots. Under `nn.scan` a
window alone (no dilation) runs a ring of k = router_window slots instead of one slot per
reader: source l pushes into the slots of readers l..l+k-1 (slot i mod k), reader l reads and
clears slot l mod k, and layer 0's kv and weights ride in the carry for the readers beyond its
window (segments after layer 0's pass them through unchanged, so autodiff saves them once per
segment, not per layer). Routing then costs O(L k) slot updates, not O(L^2), and the carry is
k + 1 slots. With a dilation the scanned path keeps the full accumulator, where the masked mix
is still computed.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from lime_jax.model import kv_pull, push
from lime_jax.model.layers import constrain, logical, normal_init
from lime_jax.model.mixers.base import Mixer, kv_proj_param, kv_projection

ACC_AXES = ("readers", "kv_heads", "batch", "length", None, "head_dim")


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
                      dilation: int | None = None, scale: float = 1.0) -> jax.Array:
  """push_l [L, R, R]: live readers i > l ~ U(-a_i, a_i), a_i = scale sqrt(3 / (n_i R));
  i == l: I_R.

  n_i is the number of sources reader i reads (i + 1 when dense), so a sparse reader's routed
  kv starts with the same variance as a dense one's. Dead entries are zero. `scale` is the
  config's router_init_scale (1: the reference; 0: every layer starts reading only itself).
  """
  reader_L = jnp.arange(L)
  n_live_L = jnp.asarray(live_mask(L, window, dilation).sum(axis=0))
  bound_L = scale * jnp.sqrt(3.0 / (n_live_L * R))
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


def raw_kv_payload(h_BxTxD: jax.Array, kv_proj_DxRx2xHd: jax.Array) -> jax.Array:
  """Layer l's raw kv as the push's payload [R, B, T, 2, Hd]: the projection of its normed
  input, gathered over `tensor` once (the push mixes over source heads; sharding.py), in
  float32, heads first. A plain function of its inputs, so the scanned push's backward can
  recompute it (`push.Recomputed`, `push_raw_kv: recompute`)."""
  return as_payload(_gathered(kv_projection(h_BxTxD, kv_proj_DxRx2xHd)))


def as_payload(kv_BxTxRx2xHd: jax.Array) -> jax.Array:
  """kv [B, T, R, 2, Hd] as the push's payload [R, B, T, 2, Hd], float32."""
  return jnp.transpose(kv_BxTxRx2xHd.astype(jnp.float32), (2, 0, 1, 3, 4))


def _gathered(kv_BxTxRx2xHd: jax.Array) -> jax.Array:
  return constrain(kv_BxTxRx2xHd, "batch", "length", None, None, "head_dim")


def push_and_read(acc_IxRxBxTx2xHd: jax.Array, push_LxRxR: jax.Array,
                  payload_RxBxTx2xHd: jax.Array | push.Recomputed, layer_idx,
                  first_reader: int = 0, window: int | None = None,
                  dilation: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Adds layer l's kv into every live reader slot; returns (accumulator, routed kv of layer l).

  The payload is layer l's raw kv (`as_payload`), or a `push.Recomputed` one. The accumulator
  holds slots for readers `first_reader .. L-1` (earlier readers are done). With a Python-int
  layer index (the unrolled path) only the live readers i >= l are touched, the spec's exact
  routing work; under `nn.scan` every slot of the segment's accumulator.
  """
  weights_IxRxR = effective_push_weights(push_LxRxR, layer_idx, window, dilation)[first_reader:]
  live_slots = None
  if isinstance(layer_idx, int):
    L = push_LxRxR.shape[0]
    live_slots = np.flatnonzero(live(np.arange(L), layer_idx, window, dilation)) - first_reader
  acc_IxRxBxTx2xHd, routed_RxBxTx2xHd = push.push_and_read(
      acc_IxRxBxTx2xHd, weights_IxRxR, payload_RxBxTx2xHd, layer_idx - first_reader, live_slots)
  return acc_IxRxBxTx2xHd, jnp.transpose(routed_RxBxTx2xHd, (1, 2, 0, 3, 4))


def router_view(push_LsrcxLxRxR: jax.Array, window: int | None = None,
                dilation: int | None = None) -> jax.Array:
  """The spec's routers of all layers as one masked array W [L_reader, R, L_src, R].

  W[i, r, j, s] is the weight reader layer i gives to head s of source layer j (zero for j > i).
  Takes the push weights stacked over source layers, [L_src, L_reader, R, R].
  """
  L = push_LsrcxLxRxR.shape[0]
  effective_LsrcxLxRxR = jax.vmap(lambda push_w, l: effective_push_weights(push_w, l, window, dilation))(
      push_LsrcxLxRxR, jnp.arange(L))
  return jnp.transpose(effective_LsrcxLxRxR, (1, 2, 0, 3))


def _symmetric_uniform(bound: float):
  def init(rng, shape, dtype=jnp.float32):
    return jax.random.uniform(rng, shape, jnp.float32, -bound, bound).astype(dtype)
  return init


class Ring(NamedTuple):
  """The windowed carry under nn.scan (see the module doc)."""

  acc_KxRxBxTx2xHd: jax.Array  # slot i mod k accumulates reader i's window
  first_LxRxR: jax.Array  # layer 0's effective push weights, for readers i >= k
  first_RxBxTx2xHd: jax.Array  # layer 0's raw kv (float32)


class Pulled(NamedTuple):
  """The carry of one layer under the pull form (kv_pull.py): its routed kv, or None for the
  layer's first half (up to its raw kv)."""

  routed_BxTxRx2xHd: jax.Array | None  # compute dtype


def _pulled_kv(layer_fn, params_l, x_BxTxD, layer_idx, positions_BxT):
  """The pull form's first half: (raw kv, the attention's normed input)."""
  return layer_fn(params_l, x_BxTxD, Pulled(None), layer_idx, positions_BxT, kv_only=True)


def _pulled_layer(layer_fn, params_l, x_BxTxD, attn_input_BxTxD, routed_BxTxRx2xHd, layer_idx,
                  positions_BxT):
  """The pull form's second half, given the first's normed input and the routed kv."""
  x_next, _ = layer_fn(params_l, x_BxTxD, Pulled(routed_BxTxRx2xHd), layer_idx, positions_BxT,
                       attn_input_BxTxD=attn_input_BxTxD)
  return x_next


class KvRouting(Mixer):
  """`router: kv-static`. Carry: the float32 accumulator acc [I, R, B, T, 2, Hd], one slot per
  reader layer I still to run (a segment's readers and later ones); a `Ring` for a window; under
  training with `routing_impl: pull`, the `Pulled` routed kv of one layer (kv_pull.py)."""

  exportable = True

  @property
  def pulls(self) -> bool:
    return self.cfg.routing_impl == "pull"

  def pull(self, layer_fn, params_S, x_BxTxD: jax.Array, carry, positions_BxT: jax.Array):
    del carry  # the pull form keeps its own buffers
    cfg = self.cfg
    B, T, _ = x_BxTxD.shape
    kv_shape = (cfg.L, B, T, cfg.R, 2, cfg.Hd, cfg.compute_dtype)
    x_BxTxD = kv_pull.pull_stack(functools.partial(_pulled_kv, layer_fn),
                                 functools.partial(_pulled_layer, layer_fn),
                                 functools.partial(_router_weights, cfg),
                                 kv_pull.read_groups(self.segments(), cfg.L), self.pull_window,
                                 kv_shape, cfg.scan_unroll, params_S,
                                 x_BxTxD, positions_BxT)
    return x_BxTxD, None

  @property
  def pull_window(self) -> int | None:
    """The pull form reads a window's slots only for a window alone (a dilation reads dense)."""
    cfg = self.cfg
    return cfg.router_window if cfg.router_dilation is None and cfg.router_window else None

  @property
  def ring(self) -> bool:
    """Whether the scanned stack runs the windowed ring (module doc)."""
    cfg = self.cfg
    return (cfg.scan_layers and cfg.router_window is not None and cfg.router_dilation is None
            and cfg.router_window < cfg.L)

  def segments(self) -> list[tuple[int, int]]:
    return push.segment_bounds(self.cfg.L, self.cfg.scan_segments)

  def start(self, stack: nn.Module, x_BxTxD: jax.Array):
    cfg = self.cfg
    B, T, _ = x_BxTxD.shape
    if self.ring:
      slot_RxBxTx2xHd = jnp.zeros((cfg.R, B, T, 2, cfg.Hd), jnp.float32)
      acc_KxRxBxTx2xHd = jnp.zeros((cfg.router_window,) + slot_RxBxTx2xHd.shape, jnp.float32)
      return x_BxTxD, Ring(constrain(acc_KxRxBxTx2xHd, *ACC_AXES),
                           jnp.zeros((cfg.L, cfg.R, cfg.R), jnp.float32), slot_RxBxTx2xHd)
    acc_LxRxBxTx2xHd = jnp.zeros((cfg.L, cfg.R, B, T, 2, cfg.Hd), jnp.float32)
    return x_BxTxD, constrain(acc_LxRxBxTx2xHd, *ACC_AXES)

  def after_segment(self, carry, start: int, stop: int):
    if self.ring:
      return carry  # the ring spans all segments
    return carry[stop - start:]  # readers start..stop-1 have read their slots

  def kv(self, block: nn.Module, x_BxTxD: jax.Array, h_BxTxD: jax.Array,
         carry, layer_idx) -> tuple[jax.Array, Any]:
    """carry: the accumulator, a `Ring`, or (pull form) a `Pulled`; see the class doc."""
    cfg = self.cfg
    if isinstance(carry, Pulled) and carry.routed_BxTxRx2xHd is not None:
      return carry.routed_BxTxRx2xHd, carry  # the pull form's routed kv (kv_pull.py)
    # kv_init "reference": the reference code's kaiming-uniform default for the raw kv
    # projection (spec section 2), U(+-1/sqrt(D)); "baseline": the baseline's k/v init.
    kv_init = normal_init if cfg.kv_init == "baseline" else _symmetric_uniform(1.0 / cfg.D ** 0.5)
    kv_proj_DxRx2xHd = kv_proj_param(block, cfg, kv_init)
    if isinstance(carry, Pulled):  # the pull form's first half: its raw kv (kv_pull.py)
      return _gathered(kv_projection(h_BxTxD, kv_proj_DxRx2xHd)), carry
    # Recomputed: the backward projects the normed input again (saved anyway) rather than
    # save the float32 raw kv, one accumulator slot of memory per layer.
    payload_RxBxTx2xHd = push.Recomputed(raw_kv_payload, (h_BxTxD, kv_proj_DxRx2xHd))
    if cfg.push_raw_kv == "save":
      payload_RxBxTx2xHd = payload_RxBxTx2xHd.value()
    push_LxRxR = block.param("router", logical(
        lambda rng: init_push_weights(rng, layer_idx, cfg.L, cfg.R, cfg.router_window,
                                      cfg.router_dilation, cfg.router_init_scale),
        "readers", None, None))
    if cfg.top_p is not None:  # frozen 0/1 mask (optimizer group "frozen"), see top_p.py
      mask_LxRxR = block.param("top_p_mask", logical(nn.initializers.ones, "readers", None, None),
                               (cfg.L, cfg.R, cfg.R), jnp.float32)
      push_LxRxR = push_LxRxR * jax.lax.stop_gradient(mask_LxRxR)
    if self.ring:
      kv32_BxTxRx2xHd, ring = self._ring_push_and_read(carry, push_LxRxR, payload_RxBxTx2xHd,
                                                       layer_idx, block.first_reader)
      return kv32_BxTxRx2xHd.astype(h_BxTxD.dtype), ring
    acc_IxRxBxTx2xHd, kv32_BxTxRx2xHd = push_and_read(
        carry, push_LxRxR, payload_RxBxTx2xHd, layer_idx, block.first_reader,
        cfg.router_window, cfg.router_dilation)
    acc_IxRxBxTx2xHd = constrain(acc_IxRxBxTx2xHd, *ACC_AXES)
    return kv32_BxTxRx2xHd.astype(h_BxTxD.dtype), acc_IxRxBxTx2xHd

  def _ring_push_and_read(self, ring: Ring, push_LxRxR: jax.Array,
                          payload_RxBxTx2xHd: jax.Array | push.Recomputed,
                          layer_idx, segment_start: int) -> tuple[jax.Array, Ring]:
    """Layer l (traced, in the scan segment from `segment_start`) pushes into the k ring slots
    of readers l..l+k-1 and reads its own."""
    cfg = self.cfg
    L, k = cfg.L, cfg.router_window
    weights_LxRxR = effective_push_weights(push_LxRxR, layer_idx, k)
    reader_K = layer_idx + (jnp.arange(k) - layer_idx) % k  # the reader of each ring slot
    weights_KxRxR = jnp.where((reader_K < L)[:, None, None],
                              weights_LxRxR[jnp.minimum(reader_K, L - 1)], 0.0)
    slot = layer_idx % k
    acc_KxRxBxTx2xHd, routed_RxBxTx2xHd = push.push_and_read(
        ring.acc_KxRxBxTx2xHd, weights_KxRxR, payload_RxBxTx2xHd, slot)
    acc_KxRxBxTx2xHd = jax.lax.dynamic_update_index_in_dim(  # free for reader l + k
        acc_KxRxBxTx2xHd, jnp.zeros_like(routed_RxBxTx2xHd), slot, 0)
    first_LxRxR, first_RxBxTx2xHd = ring.first_LxRxR, ring.first_RxBxTx2xHd
    # Segments after layer 0's pass its kv through unchanged, so autodiff saves it once per
    # segment, not once per layer (the read below needs it for the weights' gradient).
    if segment_start == 0:
      is_first = layer_idx == 0
      first_LxRxR = jnp.where(is_first, weights_LxRxR, first_LxRxR)
      # Layer 0 reads its own raw kv exactly (the fixed identity into a fresh slot): kept from
      # the read, the raw kv has one consumer, the push, which may recompute it.
      first_RxBxTx2xHd = jnp.where(is_first, routed_RxBxTx2xHd, first_RxBxTx2xHd)
    # Layer 0 lies outside the window of readers l >= k: they read it from the carry.
    first_RxR = jax.lax.dynamic_index_in_dim(first_LxRxR, layer_idx, 0, keepdims=False)
    from_first_RxBxTx2xHd = jnp.einsum("rs,sbtcd->rbtcd", first_RxR, first_RxBxTx2xHd)
    routed_RxBxTx2xHd = routed_RxBxTx2xHd + jnp.where(layer_idx >= k, from_first_RxBxTx2xHd, 0.0)
    ring = Ring(constrain(acc_KxRxBxTx2xHd, *ACC_AXES), first_LxRxR, first_RxBxTx2xHd)
    return jnp.transpose(routed_RxBxTx2xHd, (1, 2, 0, 3, 4)), ring

  def recompute_flops_per_token(self, forward_flops_per_token: int) -> int:
    """The scanned push's backward projects every layer's raw kv again (`push_raw_kv:
    recompute`); 0 for the pull form, unrolled layers and `push_raw_kv: save`."""
    del forward_flops_per_token
    cfg = self.cfg
    if self.pulls or not cfg.scan_layers or cfg.push_raw_kv != "recompute":
      return 0
    return cfg.L * 2 * cfg.D * cfg.R * 2 * cfg.Hd

  def extra_params(self) -> int:
    cfg = self.cfg
    return num_router_params(cfg.L, cfg.R, cfg.router_window, cfg.router_dilation)

  def extra_macs_per_token(self) -> int:
    """The spec's 2 Hd R^2 (L(L+1)/2 - 1) (live pairs only when sparse)."""
    return 2 * self.cfg.Hd * self.extra_params()

  def executed_push_macs_per_token(self) -> int:
    """Under nn.scan layer l updates every slot of its segment's accumulator (readers
    start..L-1), masked ones included: sparse routing saves parameters there, not FLOPs.
    Unrolled, a layer touches only its live slots. The windowed ring: k slots per layer, plus
    the mix of layer 0's kv that every layer computes (used from layer k on). The pull form
    (training with routing_impl: pull): the forward's reads of the buffer, its read group's
    sources (kv_pull.read_groups: slots below its segment's end, its own included), or for a
    window of k, layer 0 and the k slots up to the layer (the backward reads as many again,
    plus the readers' cotangents)."""
    cfg = self.cfg
    per_slot = 2 * cfg.Hd * cfg.R * cfg.R
    if self.pulls and cfg.scan_layers:  # training's forward: each layer reads its group's slots
      if self.pull_window is not None:  # layer 0 and the window's k slots up to the layer
        return per_slot * cfg.L * (1 + min(self.pull_window, cfg.L - 1))
      return per_slot * sum((g.stop - g.start) * sum(hi - lo for lo, hi in g.sources)
                            for g in kv_pull.read_groups(self.segments(), cfg.L))
    if self.ring:
      return per_slot * cfg.L * (cfg.router_window + 1)
    if not cfg.scan_layers:
      return per_slot * int(live_mask(cfg.L, cfg.router_window, cfg.router_dilation).sum())
    return per_slot * sum((stop - start) * (cfg.L - start) for start, stop in self.segments())


def _router_weights(cfg, params_S: tuple[dict[str, Any], ...]) -> jax.Array:
  """All routers from the per-segment layer parameters (only the small router leaves are
  concatenated)."""
  routers = {name: jnp.concatenate([params[name] for params in params_S])
             for name in ("router", "top_p_mask") if name in params_S[0]}
  return router_weights_of(routers, cfg)


def router_weights_of(stacked: dict[str, Any], cfg) -> jax.Array:
  """All routers as one masked W [L_reader, R, L_src, R] (spec notation) from the per-layer
  parameters stacked over layers (stack.stacked_layer_params)."""
  push_LsrcxLxRxR = stacked["router"]
  if "top_p_mask" in stacked:  # top-p pruned entries are zero, as the model uses them (frozen)
    push_LsrcxLxRxR = push_LsrcxLxRxR * jax.lax.stop_gradient(stacked["top_p_mask"])
  return router_view(push_LsrcxLxRxR, cfg.router_window, cfg.router_dilation)
