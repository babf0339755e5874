"""LIMe kv routing in pull form for training (`routing_impl: pull`): bytes read, not
read-modify-written (spec section 10).

The push form (push.py) keeps a float32 accumulator slot per reader and read-modify-writes every
remaining reader's slot at every layer, then reads it all twice more in the backward. Here one
scan over all layers carries a buffer of every layer's raw kv in the compute dtype (bf16 in
training), and

- forward, layer l: projects its raw kv (the layer's first half, `kv_fn`) and writes it into
  slot l, reads slots j <= l once and mixes them with its router row (float32 accumulation
  inside the contraction, the result in the compute dtype) into its routed kv, and runs the rest
  of the layer on that (`layer_fn`);
- backward, layer l (in reverse): the rest's VJP gives the routed kv's cotangent; slots j <= l
  (raw kv) give its router row's gradient; that cotangent then overwrites slot l, and slots
  i >= l (the cotangents of readers l and later) give the raw kv's cotangent for the first
  half's VJP (`_backward_by_rows`).

With a remat policy, whose checkpoint saves each layer's routed kv as it is, the forward keeps
those in a second buffer instead of the residuals, the backward overwrites each slot of it with
that layer's cotangent and pulls the readers' cotangents from it, and one product of it with
the raw kv buffer after the loop is the whole router gradient: the raw buffer is not read in
the backward loop (`_backward_gram`; 1.2B setup on TPU v5p: 16 reads of 1.07 GB fewer a step
per device).

The buffer is [L, R, B, T, 2, Hd], heads next to slots, so that a product over slots and heads
can take it as it lies in row-major memory (EINSUM_PLATFORMS): as [L, B, T, R, 2, Hd] (the
layers' kv stacked) XLA:CPU copied the whole buffer into [B, T, 2, Hd, L, R] for each of a
layer's three products (64 layers of the CPU bench's shape: 128 MiB, three times a layer). The
TPU's layouts below are the same physical ones as in that order, and its compiled programs the
same to the digit.

Each layer writes a slot that its own product reads (forward: its raw kv; backward: its routed
kv's cotangent, into the buffer the readers' cotangents are pulled from). On the TPU the slot
is written first and the product takes it as one more slot (below). Elsewhere the product reads
the buffer before the write, the slot's own term apart, and the write follows every read of
the value it overwrites by data (`_written_and_read`, `_after`): XLA:CPU fused a write made
first into two copies of the buffer, and, as it drops optimization barriers before copy
insertion, copied the buffer twice a layer to write in place after reads that no data ordered.

On a TPU, a buffer read whole (one read group, no window) is kept slots major, tokens minor,
as the baseline keeps its stack of the layers' kv, so that each layer's projection writes its
raw kv into its slot in place (SLOT_MAJOR_LAYOUT); it is zero-filled. Where the reads take
slices, the scan's buffer starts uninitialized (`lax.empty`) instead, a zero fill writing all
L slots once more, and the forward's reads zero the slots past the layer inside the product
that reads them, since a zero weight does not cancel a NaN; by the backward every slot has been
written. Other platforms, and a stack unrolled over its layers, zero-fill it
(UNINITIALIZED_BUFFER_PLATFORMS). Each layer's routed kv, which it saves for the backward, is
constrained on a TPU too, to the layout in which the compiler counted the fewest bytes
(ROUTED_LAYOUTS; for dense reads, the one the backward reads it in). On a GPU the buffers the
products read are kept row-major, the layout they read (ROW_MAJOR_BUFFER_PLATFORMS).

In the row-by-row backward one buffer serves both passes: slots j <= l still hold raw kv
(needed by the readers still to go) and slots i > l the cotangents (their raw kv is no longer
needed). Each layer's backward uses the residuals its forward saved (a `jax.vjp` per half,
stacked by the scan; the normed input, which both halves save, stacked once), as autodiff
would, except off the TPU for the layer's parameters, which the backward takes from the stacked
parameters again, so that the forward stacks no float32 copy of them (SAVED_PARAMS_PLATFORMS).
On the TPU the own term is one more slot of the product: no float32 partial sum is
written and read back, and no separate mix of the own kv (at 1.2B the largest of the routing's
costs besides its reads). Per-layer memory is then the baseline's (the routed kv that attention
reads replaces its kv); the stack adds one buffer: linear in depth.

Reads are bounded by read groups (`read_groups`, one per parameter segment): a layer of segment
[start, stop) reads slots < stop forward and i >= start backward, through a `lax.switch` on its
group, so the masked slots are not read. A router window of k reads by dynamic slices instead:
layer 0's slot plus the k slots up to the layer (forward, and the router gradient), and the k
readers from it on (backward; layer 0's cotangent from all, summed as they go under the scan,
so that no layer branches on its index): O(L k) slot reads, the ring's count. The backward
slices its windows in the buffer's layout (WINDOW_BUFFER_LAYOUT), or the TPU compiler copies
the whole buffer to read k slots. Two other forms cost more on the TPU compiler (deep setup,
README): rings of k + 1 raw kv and k cotangents read whole (the compiler copied them between
layouts every layer), and the one-product router gradient (`_backward_gram`: fewer bytes
scanned, more unrolled, more HBM).
The same switch picks the layer's parameters from its segment's stacked tree, so the segments are
never concatenated into one copy of all layer parameters (1.2B setup: 3.4 GiB per device). One scan,
not one per segment: the TPU compiler kept several layers' attention temporaries live across
per-segment loops (1.2B: +6.6 GiB with 4 loops).
Same parameters, same math as the push (tested equal); init, decoding and analysis use the push.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.layout import Layout, with_layout_constraint

from lime_jax.model.pull import read_slots

# kv_fn(params_l, x_BxTxD, layer_idx, positions_BxT) -> (kv_raw [B, T, R, 2, Hd], handoff): a
# layer's first half, up to its raw kv (compute dtype), and what the rest takes from it (the
# normed input: computed and saved once).
KvFn = Callable[[Any, jax.Array, Any, jax.Array], tuple[jax.Array, Any]]
# layer_fn(params_l, x_BxTxD, handoff, routed_BxTxRx2xHd, layer_idx, positions_BxT) -> x_next: the
# rest of the layer, given its routed kv (compute dtype; the router's weights are not its
# parameters).
LayerFn = Callable[[Any, jax.Array, Any, jax.Array, Any, jax.Array], jax.Array]
# reader_weights(params_S) -> W [L_reader, R, L_src, R] from the per-segment parameters, entries
# j > i zero (sources up to the reader itself: the diagonal is each layer's own term).
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


# Where a scan whose reads take slices (a window, or several read groups) starts its buffer
# uninitialized: platforms whose compiler was seen to fuse `_written`'s select into the product
# (the TPU's; on a GPU the product is a library call that a select may not fuse into, not
# measured). Elsewhere it is zero-filled, as an unrolled stack's and whole reads' always are
# (`_fresh_buffer`).
UNINITIALIZED_BUFFER_PLATFORMS = ("tpu",)

# Where the buffer and the routed kv are constrained to layouts chosen here (SLOT_MAJOR_LAYOUT,
# ROUTED_LAYOUTS; layouts are major to minor, over the arrays' axes): the TPU compiler's, the
# one they were measured on. Each changes the program's bytes, not its math.
LAYOUT_PLATFORMS = ("tpu",)

# A buffer read whole (one read group, no window) is kept slots major, tokens minor ([L, R, B,
# T, 2, Hd] as [L, B, R, 2, Hd, T], the layout of the baseline's stack of its layers' kv), so
# that each layer's projection writes its raw kv into its slot in place. In its own layout
# (tokens minor, then heads, then slots) the TPU compiler wrote the projection to a temporary
# and copied it into the slot (1.2B setup on TPU v5p, scanned: 805.2 -> 804.1 GB a step, step
# estimate 0.4617 -> 0.4612 s). Reads that take slices keep the compiler's own, since in this
# one they cost far more (1.2B, 8 read groups, unrolled: 673.8 -> 891.7 GB; deep setup, window
# 8, scanned, zero-filled: 289.0 -> 533.7 GB).
SLOT_MAJOR_LAYOUT = (0, 2, 1, 4, 5, 3)

# The routed kv ([B, T, R, 2, Hd]), by how the buffer is read: "dense" as [2, B, R, Hd, T], the
# layout in which the attention's backward reads the baseline's saved kv; "window" as [B, R, 2,
# Hd, T]. Each layer saves its routed kv for the backward; in the mix's own output layout ([B, 2,
# Hd, R, T]) the backward sliced it from the stack of saved residuals and copied it into the
# layout its products take, and the saved query's stack followed it into another layout (one
# copy more). Constrained, the forward's write of the stack transposes as it writes. TPU v5p,
# scanned (--cost scaled): 1.2B 804.1 -> 800.7 GB a step, 0.4612 -> 0.4598 s; with 4 query
# blocks 704.0 -> 688.4 GB; deep dense 303.4 -> 294.2 GB; deep window 8: 289.0 -> 282.8 GB
# (293.6 in the dense layout). Unrolled: 1.2B 641.2 -> 639.6 GB, 8 read groups 673.8 -> 667.9,
# deep dense 223.5 -> 222.3; the deep window rose, 180.3 -> 180.4 (8 read groups: 180.4 -> 180.6).
ROUTED_LAYOUTS = {"dense": (3, 0, 2, 4, 1), "window": (0, 2, 3, 4, 1)}

# A windowed backward's buffer ([L, R, B, T, 2, Hd] as [L, B, 2, Hd, R, T]: the layout of its
# one-slot writes) and each window of readers sliced from it, before the product takes its own
# copy of the k slots. Unconstrained, the TPU compiler gave the product's layout (slots next to
# heads) to the slice's operand and so copied the whole buffer to read k of its slots, at every
# layer (deep setup, window 8: 935.6 k estimated cycles a layer; constrained, the slice with its
# copy 92.6 k).
WINDOW_BUFFER_LAYOUT = (0, 2, 4, 5, 1, 3)


# Where the buffer's products are einsums, whose operand order jnp.einsum picks (it put the
# buffer on the left): the TPU's, whose compiler was measured with them. Elsewhere the buffer
# is the operand that the dot takes as it is (`_mix_by_dot`, `_gram_by_dot`): on the left,
# XLA:CPU copied the whole buffer into [B, T, 2, Hd, N, S] before each product (64 slots of the
# bench's shape, each product alone: the mix 42-46 -> 9 ms, the router row 55-69 -> 6-8). The GPU
# takes the CPU's form, as a plain GEMM over the buffer in memory (not measured there). On the
# TPU compiler the dot forms cost the windowed deep setup 1% more (scanned: 228.8 -> 231.4 GB).
EINSUM_PLATFORMS = ("tpu",)

# Where the buffers the products read are constrained to row-major ([L, R, B, T, 2, Hd] as it
# lies, in which the products read it as an [L*R, rest] matrix), at their fills and at each write
# a product reads after (`_written_and_read`; not the forward's writes of the routed kv): GPUs'.
# Unconstrained, XLA:GPU carried the one-product backward's routed kv buffer in the layout in
# which the attention reads a slot ([B, L, R, 2, Hd, T]) and transposed all of it before each
# layer's pull of the readers' cotangents: 1 GiB read and written a layer at the accelerator
# check's shapes (deviceless compile for one H100, 1.2B and deep setups). Now the forward writes
# that layout and the buffer is transposed once, between the loops: HBM 1.2B 32.99 -> 34.10 GiB,
# deep 15.89 (the same). Not timed on a GPU.
ROW_MAJOR_BUFFER_PLATFORMS = ("cuda", "rocm")


def _on_platforms(platforms: tuple[str, ...], chosen: Callable, default: Callable, *args):
  """`chosen(*args)` when compiled for one of `platforms`, else `default(*args)`: chosen when
  lowering, so the compiler sees one of them."""
  return jax.lax.platform_dependent(*args, default=default, **{p: chosen for p in platforms})


# Where a layer's slot is written before the product that reads it, which takes it as one more
# slot: the TPU's, whose compiler was measured that way (the own term inside the product, no
# float32 partial sum). Elsewhere the product reads the buffer before the write, with the slot's
# weight zeroed, and the own term is a product of its own: XLA:CPU fused the write both into the
# carried buffer and into the bitcast that feeds the product, each writing into its own copy of
# the buffer (4 copies of it a layer; test_kv_pull's memory test with remat dots, 8 layers:
# 8084104 temp bytes, 1.586x the baseline's). Read first, no layer copies it (`_after`): the
# CPU bench's shape, pull over 8 segments at 64 layers, 3.052x the baseline's step -> 1.538x
# (the buffer [L, B, T, R, 2, Hd] and written first, as before 2026-12-07 -> now; README).
WRITE_FIRST_PLATFORMS = ("tpu",)


# Where the backward takes each layer's parameters from its VJP's saved residuals, which the
# forward's scan stacks (a copy of every layer's parameters): the TPU's, whose compiler was
# measured that way (it stored the copies in the compute dtype; taking them again cost it bytes,
# 1.2B setup, scanned: 800.7 -> 810.0 GB a step, README). Elsewhere the backward takes them from
# the stacked parameters again (`_layer_params`) and the compiler drops the forward's unused
# stack, which XLA:CPU and XLA:GPU kept in float32: CPU bench shape, 64 layers, 8 segments,
# 2198.0 -> 1943.0 MiB temp; GPU compiler, 1.2B setup on one H100, 36.97 -> 32.99 GiB.
SAVED_PARAMS_PLATFORMS = ("tpu",)


def _after(x: jax.Array, results) -> jax.Array:
  """`x` (the same values; a -0 may read +0), computed after every array in `results` (a
  pytree) by data: XLA:CPU expands optimization barriers before copy insertion, so only a real
  dependency lets an in-place write wait for the reads of the value it overwrites (without one
  it copied the whole buffer, twice a layer). The zero it adds is never NaN."""
  zero = jnp.zeros((), jnp.float32)
  for leaf in jax.tree.leaves(results):
    first = leaf.reshape(-1)[0].astype(jnp.float32)
    zero = zero + jnp.where(jnp.isfinite(first), first, 0) * 0
  return x + zero.astype(x.dtype)


def _written_and_read(buf_LxRxBxTx2xHd, slot_RxBxTx2xHd, l, whole_reads: bool, weights,
                      slot_axis: int, read: Callable, own: Callable, other_reads=()):
  """(`read(weights, buffer, own_written)` of the buffer with `slot` written into slot l,
  that buffer), in its platform's order (WRITE_FIRST_PLATFORMS). Read first (own_written
  False: slot l is not yet written), slot l's weights on `slot_axis` are zeroed,
  `own(those weights, slot[None])` adds its term, and the write follows the read and the
  results of the buffer's `other_reads` by data (`_after`)."""
  def write(buf_LxRxBxTx2xHd, slot_RxBxTx2xHd):
    return _in_buffer_layout(jax.lax.dynamic_update_index_in_dim(
        buf_LxRxBxTx2xHd, slot_RxBxTx2xHd, l, 0), whole_reads)

  def write_first(weights, buf_LxRxBxTx2xHd, slot_RxBxTx2xHd):
    buf_LxRxBxTx2xHd = write(buf_LxRxBxTx2xHd, slot_RxBxTx2xHd)
    return read(weights, buf_LxRxBxTx2xHd, True), buf_LxRxBxTx2xHd

  def read_first(weights, buf_LxRxBxTx2xHd, slot_RxBxTx2xHd):
    slot_N = jnp.arange(weights.shape[slot_axis])
    shape = [1] * weights.ndim
    shape[slot_axis] = -1
    others = jnp.where((slot_N == l).reshape(shape), 0, weights)
    mixed = read(others, buf_LxRxBxTx2xHd, False) + own(read_slots(weights, l, 1, slot_axis),
                                                        slot_RxBxTx2xHd[None])
    # The write after the read, by data (a compiler that wrote first would copy the buffer).
    return mixed, write(buf_LxRxBxTx2xHd, _after(slot_RxBxTx2xHd, (mixed, other_reads)))

  return _on_platforms(WRITE_FIRST_PLATFORMS, write_first, read_first, weights,
                       buf_LxRxBxTx2xHd, slot_RxBxTx2xHd)


def _reads_whole(groups: tuple[ReadGroup, ...], window: int | None) -> bool:
  """Whether every read of the buffer takes all of it: one read group, no window."""
  return window is None and len(groups) == 1


def _may_start_uninitialized(unrolled: bool, whole_reads: bool) -> bool:
  """Whether the forward's buffer starts uninitialized where the platform allows
  (UNINITIALIZED_BUFFER_PLATFORMS): under the scan, with reads that take slices. The TPU
  compiler fused the select that an uninitialized buffer needs neither into the unrolled
  program's products (1.2B setup, 4 layers: 162.8 GB a step against 160.6) nor into whole reads
  of the slot-major buffer (1.2B, scanned: 839.4 against 804.1 GB); there it is zero-filled."""
  return not unrolled and not whole_reads


def _fresh_buffer(shape: tuple[int, ...], dtype, may_start_uninitialized: bool,
                  whole_reads: bool) -> jax.Array:
  """The forward's empty buffer: uninitialized where `_may_start_uninitialized` and the
  platform allow (a zero fill writes every slot once more, 1.0 GB a step per device at the 1.2B
  setup's size on TPU v5p), else zero-filled, slots major where the reads take it whole
  (`_in_buffer_layout`)."""
  zeros = lambda: _in_buffer_layout(jnp.zeros(shape, dtype), whole_reads)  # noqa: E731
  if not may_start_uninitialized:
    return zeros()
  return _on_platforms(UNINITIALIZED_BUFFER_PLATFORMS, lambda: jax.lax.empty(shape, dtype),
                       zeros)


def _in_layout(x: jax.Array, layout: tuple[int, ...] | None,
               platforms: tuple[str, ...] | None = None) -> jax.Array:
  """`x` constrained to `layout` (major to minor) where compiled for one of `platforms`
  (LAYOUT_PLATFORMS by default, read when tracing; chosen when lowering); otherwise, or with no
  layout, as it is."""
  if layout is None:
    return x
  constrained = lambda x: with_layout_constraint(x, Layout(layout))  # noqa: E731
  return _on_platforms(LAYOUT_PLATFORMS if platforms is None else platforms, constrained,
                       lambda x: x, x)


def _in_buffer_layout(buf_LxRxBxTx2xHd: jax.Array, whole_reads: bool) -> jax.Array:
  """A buffer in its platform's layout: on a TPU, SLOT_MAJOR_LAYOUT where read whole
  (`_in_layout`); on a GPU row-major (ROW_MAJOR_BUFFER_PLATFORMS); elsewhere as it is."""
  buf_LxRxBxTx2xHd = _in_layout(buf_LxRxBxTx2xHd, SLOT_MAJOR_LAYOUT if whole_reads else None)
  return _in_layout(buf_LxRxBxTx2xHd, tuple(range(buf_LxRxBxTx2xHd.ndim)),
                    ROW_MAJOR_BUFFER_PLATFORMS)


def _written(kv_NxRxBxTx2xHd: jax.Array, first, last, may_start_uninitialized: bool
             ) -> jax.Array:
  """Slots first .. first+N-1 of the forward's buffer with those past slot `last` zeroed where
  it starts uninitialized (`_fresh_buffer`): an unwritten slot may hold anything, NaN included,
  which a zero weight would not cancel."""
  if not may_start_uninitialized:
    return kv_NxRxBxTx2xHd
  def masked(kv_NxRxBxTx2xHd, last):
    slot_N = first + jnp.arange(kv_NxRxBxTx2xHd.shape[0])
    return jnp.where((slot_N <= last)[:, None, None, None, None, None], kv_NxRxBxTx2xHd, 0)
  return _on_platforms(UNINITIALIZED_BUFFER_PLATFORMS, masked, lambda kv, last: kv,
                       kv_NxRxBxTx2xHd, last)


def _mix_sources(group: ReadGroup, may_start_uninitialized: bool, own_written: bool):
  """Forward read: sum_{j, s} W[r, j, s] kv_j[s] over the group's source slots, in float32
  (the row is zero past j = l, the reader's own slot). `own_written`: whether slot l is
  written yet; slots not yet written are masked (`_written`)."""
  def mix(W_RxLxR, buf_LxRxBxTx2xHd, l):
    last = l if own_written else l - 1
    return sum(_mix(read_slots(W_RxLxR, lo, hi - lo, 1),
                    _written(read_slots(buf_LxRxBxTx2xHd, lo, hi - lo), lo, last,
                             may_start_uninitialized)) for lo, hi in group.sources)
  return mix


def _to_slot(kv_BxTxRx2xHd):
  """A layer's kv (or its cotangent) in a buffer slot's axis order, [R, B, T, 2, Hd]."""
  return jnp.moveaxis(kv_BxTxRx2xHd, 2, 0)


def _from_slot(kv_RxBxTx2xHd):
  """A buffer slot back in the layers' axis order, [B, T, R, 2, Hd]."""
  return jnp.moveaxis(kv_RxBxTx2xHd, 0, 2)


def _mix(W_RxNxS, buf_NxSxBxTx2xHd):
  """sum_{j, s} W[r, j, s] buf[j, s], [B, T, R, 2, Hd] float32, in its platform's form
  (EINSUM_PLATFORMS)."""
  return _on_platforms(EINSUM_PLATFORMS, _mix_by_einsum, _mix_by_dot, W_RxNxS, buf_NxSxBxTx2xHd)


def _mix_by_einsum(W_RxNxS, buf_NxSxBxTx2xHd):
  return jnp.einsum("rjs,jsbtcd->btrcd", W_RxNxS, buf_NxSxBxTx2xHd,
                    preferred_element_type=jnp.float32)


def _mix_by_dot(W_RxNxS, buf_NxSxBxTx2xHd):
  mixed_RxBxTx2xHd = jax.lax.dot_general(W_RxNxS, buf_NxSxBxTx2xHd, (((1, 2), (0, 1)), ((), ())),
                                         preferred_element_type=jnp.float32)
  return _from_slot(mixed_RxBxTx2xHd)


def _gram(d_BxTxRx2xHd, buf_NxSxBxTx2xHd):
  """<d[r], buf[j, s]>, [R, N, S] float32, in its platform's form (EINSUM_PLATFORMS)."""
  return _on_platforms(EINSUM_PLATFORMS, _gram_by_einsum, _gram_by_dot, d_BxTxRx2xHd,
                       buf_NxSxBxTx2xHd)


def _gram_by_einsum(d_BxTxRx2xHd, buf_NxSxBxTx2xHd):
  return jnp.einsum("btrcd,jsbtcd->rjs", d_BxTxRx2xHd, buf_NxSxBxTx2xHd,
                    preferred_element_type=jnp.float32)


def _gram_by_dot(d_BxTxRx2xHd, buf_NxSxBxTx2xHd):
  gram_NxSxR = jax.lax.dot_general(buf_NxSxBxTx2xHd, d_BxTxRx2xHd,
                                   (((2, 3, 4, 5), (0, 1, 3, 4)), ((), ())),
                                   preferred_element_type=jnp.float32)
  return jnp.moveaxis(gram_NxSxR, 2, 0)


def _pull_readers(W_NxRxR, dr_NxRxBxTx2xHd) -> jax.Array:
  """sum_{i, r} W[i, r, s] drouted_i[r]: the cotangent N readers give one source's raw kv."""
  return _mix(jnp.moveaxis(W_NxRxR, 2, 0), dr_NxRxBxTx2xHd)


def _cotangent_from_readers(group: ReadGroup):
  """Backward: the raw kv's cotangent sum_{i, r} W[i, r, l, s] drouted_i[r] over the group's
  readers (the column is zero for i < l, whose slots still hold raw kv)."""
  lo, hi = group.readers
  def pull(W_LxRxR, buf_LxRxBxTx2xHd):
    return _pull_readers(read_slots(W_LxRxR, lo, hi - lo),
                         read_slots(buf_LxRxBxTx2xHd, lo, hi - lo))
  return pull


def _router_row_gradient(group: ReadGroup):
  """Backward: reader l's row dW[r, j, s] = <drouted_l[r], kv_j[s]> over the group's sources,
  zero elsewhere; entries j > l (slots that hold cotangents by now) are masked by the caller."""
  def grad(drouted_BxTxRx2xHd, buf_LxRxBxTx2xHd):
    L, R = buf_LxRxBxTx2xHd.shape[0], drouted_BxTxRx2xHd.shape[2]
    dW_RxLxR = jnp.zeros((R, L, R), jnp.float32)
    for lo, hi in group.sources:
      dW_RxLxR = dW_RxLxR.at[:, lo:hi].set(
          _gram(drouted_BxTxRx2xHd, read_slots(buf_LxRxBxTx2xHd, lo, hi - lo)))
    return dW_RxLxR
  return grad


def _window_start(first, size: int, L: int):
  """The start of a `size`-slot window that begins at `first` (traced or static), kept within
  slots 1..L-1 (slot 0 is read on its own)."""
  if isinstance(first, int):
    return min(max(first, 1), L - size)
  return jnp.clip(first, 1, L - size)


def _window_size(window: int, L: int) -> int:
  """Slots a window of k reads besides slot 0 (a window as deep as the stack reads all)."""
  return min(window, L - 1)


def _mix_window(window: int, l, W_RxLxR, buf_LxRxBxTx2xHd, own_written: bool,
                may_start_uninitialized: bool):
  """Forward read of a window of k: layer 0's slot and the k slots up to l (a clipped window
  reaches past l near the start, where the row is zero); `own_written`: whether slot l is
  written yet (slots not yet written are masked, `_written`)."""
  L = buf_LxRxBxTx2xHd.shape[0]
  last = l if own_written else l - 1
  first_1xRxBxTx2xHd = read_slots(buf_LxRxBxTx2xHd, 0, 1)
  if not own_written:  # at layer 0, slot 0 is not yet written
    first_1xRxBxTx2xHd = _written(first_1xRxBxTx2xHd, 0, last, may_start_uninitialized)
  routed_BxTxRx2xHd = _mix(read_slots(W_RxLxR, 0, 1, 1), first_1xRxBxTx2xHd)
  size = _window_size(window, L)
  if size == 0:
    return routed_BxTxRx2xHd
  start = _window_start(l - size + 1, size, L)
  return routed_BxTxRx2xHd + _mix(read_slots(W_RxLxR, start, size, 1),
                                  _written(read_slots(buf_LxRxBxTx2xHd, start, size), start,
                                           last, may_start_uninitialized))


def _window_slots(buf_LxRxBxTx2xHd: jax.Array, start, size: int, l) -> jax.Array:
  """Slots [start, start + size) of a windowed backward's buffer; under the scan (l traced)
  sliced in the buffer's layout (WINDOW_BUFFER_LAYOUT), so that a product that wants another
  copies only these. An unrolled stack's program counted more with the constraint (deep setup,
  window 8: 163.1 -> 173.2 GB a step)."""
  window_KxRxBxTx2xHd = read_slots(buf_LxRxBxTx2xHd, start, size)
  if isinstance(l, int):
    return window_KxRxBxTx2xHd
  return _in_layout(window_KxRxBxTx2xHd, WINDOW_BUFFER_LAYOUT)


def _cotangent_from_window(window: int, l, W_LxRxR, buf_LxRxBxTx2xHd):
  """Backward: the raw kv's cotangent from the readers i = l .. l+k-1 of its window (itself
  included). Layer 0's comes from every reader (all of them read it): here where l is static;
  under the scan (l traced) the backward sums it as the readers go (`_sums_layer_zero_cotangent`)
  and replaces what this gives layer 0."""
  L = buf_LxRxBxTx2xHd.shape[0]
  size = _window_size(window, L)
  if size == 0 or (isinstance(l, int) and l == 0):  # size 0: a one-layer stack
    return _pull_readers(W_LxRxR, buf_LxRxBxTx2xHd)
  start = _window_start(l, size, L)
  return _pull_readers(read_slots(W_LxRxR, start, size),
                       _window_slots(buf_LxRxBxTx2xHd, start, size, l))


def _sums_layer_zero_cotangent(window: int | None, scanned: bool, L: int) -> bool:
  """Whether the backward carries layer 0's raw kv cotangent, summed reader by reader (float32,
  one slot): a window under the scan. Read from all L slots at layer 0 instead, behind a
  conditional on the traced index, the TPU compiler counted that read at every layer (deep
  setup, window 8: 400.8 k estimated cycles a layer; run at one). Read once after the loop, it
  held one more copy of the buffer at the peak (deep setup, window 8: HBM 4.35 -> 4.83 GiB)."""
  return window is not None and scanned and _window_size(window, L) > 0


def _router_row_gradient_window(window: int, l, drouted_BxTxRx2xHd, buf_LxRxBxTx2xHd):
  """Backward: reader l's row over layer 0 and its window's k slots up to l (entries past l,
  which a clipped window reaches, are masked by the caller)."""
  L, R = buf_LxRxBxTx2xHd.shape[0], drouted_BxTxRx2xHd.shape[2]
  grad = lambda kv: _gram(drouted_BxTxRx2xHd, kv)  # noqa: E731
  from_first_RxR = grad(read_slots(buf_LxRxBxTx2xHd, 0, 1))
  dW_RxLxR = jnp.zeros((R, L, R), jnp.float32).at[:, :1].set(from_first_RxR)
  size = _window_size(window, L)
  if size == 0:
    return dW_RxLxR
  start = _window_start(l - size + 1, size, L)
  return jax.lax.dynamic_update_slice_in_dim(
      dW_RxLxR, grad(_window_slots(buf_LxRxBxTx2xHd, start, size, l)), start, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4, 5, 6))
def pull_stack(kv_fn: KvFn, layer_fn: LayerFn, weights_fn: WeightsFn,
               groups: tuple[ReadGroup, ...], window: int | None, kv_shape: tuple[int, ...],
               unroll: int, params_S: tuple[Any, ...], x_BxTxD: jax.Array,
               positions_BxT: jax.Array) -> jax.Array:
  """The layers, segment b's parameters `params_S[b]` (leading layer axis), each layer split
  into `kv_fn` (up to its raw kv) and `layer_fn` (the rest, from its routed kv); reads bounded
  by `groups` (read_groups), or by a router `window` of k (layer 0 and the k slots up to each
  layer; None: dense); the last output. kv_shape: (L, B, T, R, 2, Hd) and the compute dtype's
  name last; unroll: layers per scan iteration."""
  x_BxTxD, *_ = _forward(kv_fn, layer_fn, weights_fn, groups, window, kv_shape, unroll,
                         params_S, x_BxTxD, positions_BxT, save=False)
  return x_BxTxD


class _ResidualsLayout(NamedTuple):
  """How to rebuild a layer's two VJPs from its distinct residual leaves (static). Indices are
  into all the distinct leaves, `left_out` (by `without`) included."""

  tree_kv: Any
  tree_rest: Any
  n_kv: int  # the first half's leaf count
  positions: tuple[int, ...]  # each VJP leaf's distinct leaf
  left_out: int | None
  params_at: tuple[tuple[int, int], ...]  # (distinct leaf, parameter leaf): the very parameters


@jax.tree_util.register_pytree_node_class
class _LayerResiduals:
  """One layer's saved residuals: both halves' VJPs as their distinct leaves, each stacked once
  by the scan (both halves save the normed input; twice it would be another [L, B, T, D]).
  It knows which leaves are the layer's parameters themselves (`vjps`, SAVED_PARAMS_PLATFORMS)."""

  def __init__(self, leaves: tuple[Any, ...], layout: _ResidualsLayout):
    self.leaves, self.layout = leaves, layout

  @classmethod
  def of(cls, vjp_kv, vjp_rest, params_l) -> "_LayerResiduals":
    leaves_kv, tree_kv = jax.tree.flatten(vjp_kv)
    leaves_rest, tree_rest = jax.tree.flatten(vjp_rest)
    distinct, index, positions = [], {}, []
    for leaf in leaves_kv + leaves_rest:
      if id(leaf) not in index:
        index[id(leaf)] = len(distinct)
        distinct.append(leaf)
      positions.append(index[id(leaf)])
    params_at = tuple((index[id(p)], j) for j, p in enumerate(jax.tree.leaves(params_l))
                      if id(p) in index)
    return cls(tuple(distinct), _ResidualsLayout(tree_kv, tree_rest, len(leaves_kv),
                                                 tuple(positions), None, params_at))

  def without(self, leaf: jax.Array) -> "_LayerResiduals":
    """These residuals with `leaf` (one of them, the very array) left out; `with_left_out`
    puts an array in its place."""
    k = next((i for i, x in enumerate(self.leaves) if x is leaf), None)
    if k is None:  # _rest_keeps_routed said the layer would save it
      raise ValueError("kv_pull: a layer's VJP did not save its routed kv as the probe of layer 0"
                       " did; the one-product backward needs every layer to")
    return _LayerResiduals(self.leaves[:k] + self.leaves[k + 1:], self.layout._replace(left_out=k))

  def with_left_out(self, leaf: jax.Array) -> "_LayerResiduals":
    """The residuals that `without` left `leaf` out of, with it back in its place."""
    k = self.layout.left_out
    return _LayerResiduals(self.leaves[:k] + (leaf,) + self.leaves[k:],
                           self.layout._replace(left_out=None))

  def vjps(self, params_l):
    """(the first half's VJP, the rest's), their parameters the saved ones where compiled for
    SAVED_PARAMS_PLATFORMS, else those of `params_l` (the layer's, taken again). Not on
    residuals that `without` left a leaf out of."""
    layout, leaves = self.layout, list(self.leaves)
    params_at = layout.params_at
    if params_at:
      saved = tuple(leaves[i] for i, _ in params_at)
      taken_again = tuple(jax.tree.leaves(params_l)[j] for _, j in params_at)
      chosen = _on_platforms(SAVED_PARAMS_PLATFORMS, lambda saved, _: saved,
                             lambda _, taken_again: taken_again, saved, taken_again)
      for (i, _), leaf in zip(params_at, chosen):
        leaves[i] = leaf
    leaves = [leaves[i] for i in layout.positions]
    return (layout.tree_kv.unflatten(leaves[:layout.n_kv]),
            layout.tree_rest.unflatten(leaves[layout.n_kv:]))

  def tree_flatten(self):
    return self.leaves, self.layout

  @classmethod
  def tree_unflatten(cls, layout, leaves):
    return cls(tuple(leaves), layout)


def _rest_keeps_routed(kv_fn, layer_fn, groups, params_S, x_BxTxD, positions_BxT,
                       routed_shape: tuple[int, ...], dtype, unrolled: bool) -> bool:
  """Whether a layer's rest saves its routed kv itself for its VJP, as a remat policy's
  checkpoint saves its inputs (without a policy, autodiff may save slices of it instead); found
  by tracing layer 0, nothing computed."""
  kept = []
  def probe(params_S, x_BxTxD, routed_BxTxRx2xHd, traced_l):
    l = 0 if unrolled else traced_l  # the index as the stack passes it (layers.maybe_remat)
    params_l = _layer_params(groups, l, params_S)
    _, handoff = kv_fn(params_l, x_BxTxD, l, positions_BxT)
    rest = lambda p, x, h, r: layer_fn(p, x, h, r, l, positions_BxT)  # noqa: E731
    _, vjp_rest = jax.vjp(rest, params_l, x_BxTxD, handoff, routed_BxTxRx2xHd)
    kept.append(any(leaf is routed_BxTxRx2xHd for leaf in jax.tree.leaves(vjp_rest)))
  jax.eval_shape(probe, params_S, x_BxTxD, jax.ShapeDtypeStruct(routed_shape, dtype),
                 jnp.int32(0))
  return kept[0]


def _forward(kv_fn, layer_fn, weights_fn, groups, window, kv_shape, unroll, params_S, x_BxTxD,
             positions_BxT, save):
  """(the last output, the buffer, the router weights, the layers' saved residuals, and the
  routed kv buffer where the backward takes the router gradient as one product
  (`_backward_gram`), else None)."""
  *shape, dtype = kv_shape
  shape = [shape[0], shape[3], shape[1], shape[2], *shape[4:]]  # slots [L, R, B, T, 2, Hd]
  L = shape[0]
  W_LxRxLxR = weights_fn(params_S)
  whole_reads = _reads_whole(groups, window)
  unrolled = unroll >= L  # static layer indices (see pull_stack)
  may_start_uninitialized = _may_start_uninitialized(unrolled, whole_reads)
  routed_layout = ROUTED_LAYOUTS["dense" if window is None else "window"]
  # Each layer's routed kv goes into a buffer of its own rather than the residuals the scan
  # stacks: the backward turns it into the readers' cotangents in place (`_backward_gram`).
  gram = save and window is None and _rest_keeps_routed(
      kv_fn, layer_fn, groups, params_S, x_BxTxD, positions_BxT, tuple(kv_shape[1:-1]), dtype,
      unrolled)

  def body(carry, W_RxLxR, l):
    x_BxTxD, buf_LxRxBxTx2xHd, *routed_buf = carry
    params_l = _layer_params(groups, l, params_S)
    first_half = lambda p, x: kv_fn(p, x, l, positions_BxT)  # noqa: E731
    rest = lambda p, x, handoff, routed: layer_fn(p, x, handoff, routed, l,  # noqa: E731
                                                  positions_BxT)
    if save:
      (kv_BxTxRx2xHd, handoff), vjp_kv = jax.vjp(first_half, params_l, x_BxTxD)
    else:
      kv_BxTxRx2xHd, handoff = first_half(params_l, x_BxTxD)
    # Its own kv goes into slot l, around the read (`_written_and_read`). The previous layer's
    # reads of the buffer come first by data (they made this layer's input).
    if window is None:
      read = lambda W_RxLxR, buf_LxRxBxTx2xHd, own_written: _switch_on_group(  # noqa: E731
          groups, l,
          functools.partial(_mix_sources, may_start_uninitialized=may_start_uninitialized,
                            own_written=own_written),
          W_RxLxR, buf_LxRxBxTx2xHd, l)
    else:
      read = lambda W_RxLxR, buf_LxRxBxTx2xHd, own_written: _mix_window(  # noqa: E731
          window, l, W_RxLxR, buf_LxRxBxTx2xHd, own_written, may_start_uninitialized)
    routed_BxTxRx2xHd, buf_LxRxBxTx2xHd = _written_and_read(
        buf_LxRxBxTx2xHd, _to_slot(kv_BxTxRx2xHd.astype(dtype)), l, whole_reads, W_RxLxR, 1,
        read, _mix)
    # The float32 sum, rounded once; saved for the backward in ROUTED_LAYOUTS' layout.
    routed_BxTxRx2xHd = _in_layout(routed_BxTxRx2xHd.astype(dtype), routed_layout)
    if not save:
      return (rest(params_l, x_BxTxD, handoff, routed_BxTxRx2xHd), buf_LxRxBxTx2xHd), None
    x_next, vjp_rest = jax.vjp(rest, params_l, x_BxTxD, handoff, routed_BxTxRx2xHd)
    residuals = _LayerResiduals.of(vjp_kv, vjp_rest, params_l)
    if not gram:
      return (x_next, buf_LxRxBxTx2xHd), residuals
    routed_LxRxBxTx2xHd = jax.lax.dynamic_update_index_in_dim(
        routed_buf[0], _to_slot(routed_BxTxRx2xHd), l, 0)
    return (x_next, buf_LxRxBxTx2xHd, routed_LxRxBxTx2xHd), residuals.without(routed_BxTxRx2xHd)

  carry = (x_BxTxD, _fresh_buffer(tuple(shape), dtype, may_start_uninitialized, whole_reads))
  if gram:  # every slot is written before the backward reads any
    carry += (_fresh_buffer(tuple(shape), dtype, may_start_uninitialized=True,
                            whole_reads=False),)
  if unrolled:
    saved = []
    for l in range(L):
      carry, residuals = body(carry, W_LxRxLxR[l], l)
      saved.append(residuals)
  else:
    carry, saved = jax.lax.scan(lambda carry, layer: body(carry, *layer), carry,
                                (W_LxRxLxR, jnp.arange(L)), unroll=unroll)
  x_BxTxD, buf_LxRxBxTx2xHd, *routed_buf = carry
  return x_BxTxD, buf_LxRxBxTx2xHd, W_LxRxLxR, saved, (routed_buf[0] if gram else None)


def _pull_stack_fwd(kv_fn, layer_fn, weights_fn, groups, window, kv_shape, unroll, params_S,
                    x_BxTxD, positions_BxT):
  x_out, *residuals = _forward(kv_fn, layer_fn, weights_fn, groups, window, kv_shape, unroll,
                               params_S, x_BxTxD, positions_BxT, save=True)
  return x_out, (params_S, *residuals)


def _pull_stack_bwd(kv_fn, layer_fn, weights_fn, groups, window, kv_shape, unroll, residuals,
                    dx_BxTxD):
  del kv_fn, layer_fn, kv_shape
  params_S, buf_LxRxBxTx2xHd, W_LxRxLxR, saved, routed_LxRxBxTx2xHd = residuals
  columns_LxLxRxR = jnp.moveaxis(W_LxRxLxR, 2, 0)  # [source, reader, R, R]
  if routed_LxRxBxTx2xHd is None:
    dx_BxTxD, dparams_L, dW_LxRxLxR = _backward_by_rows(
        groups, window, unroll, params_S, buf_LxRxBxTx2xHd, columns_LxLxRxR, saved, dx_BxTxD)
  else:
    dx_BxTxD, dparams_L, dW_LxRxLxR = _backward_gram(
        groups, unroll, params_S, buf_LxRxBxTx2xHd, routed_LxRxBxTx2xHd, columns_LxLxRxR, saved,
        dx_BxTxD)
  dparams_S = tuple(jax.tree.map(lambda a: a[g.start:g.stop], dparams_L) for g in groups)
  _, weights_vjp = jax.vjp(weights_fn, params_S)
  (dparams_from_W,) = weights_vjp(dW_LxRxLxR)
  return jax.tree.map(jnp.add, dparams_S, dparams_from_W), dx_BxTxD, None


def _layers_in_reverse(body, carry, saved, columns_LxLxRxR, source_L, unroll):
  """`body(carry, layer l's residuals, its column, l) -> (carry, out)` from the last layer to
  the first: a Python loop where the forward ran unrolled (`saved` a list), else a reversed
  scan over l in `source_L` (0..L-1). (the final carry, the outs stacked over layers)."""
  L = source_L.shape[0]
  if isinstance(saved, list):
    outs = [None] * L
    for l in reversed(range(L)):  # the layers' remat keeps CSE off here (layers.maybe_remat)
      carry, outs[l] = body(carry, saved[l], columns_LxLxRxR[l], l)
    return carry, jax.tree.map(lambda *layers: jnp.stack(layers), *outs)
  return jax.lax.scan(lambda carry, layer: body(carry, *layer), carry,
                      (saved, columns_LxLxRxR, source_L), reverse=True, unroll=unroll)


def _backward_by_rows(groups, window, unroll, params_S, buf_LxRxBxTx2xHd, columns_LxLxRxR, saved,
                      dx_BxTxD):
  """The layers' backward, in reverse, each layer taking its router row's gradient from the
  buffer's raw kv: (dx, the layers' parameter gradients, dW [L, R, L, R])."""
  L = buf_LxRxBxTx2xHd.shape[0]
  dtype = buf_LxRxBxTx2xHd.dtype
  source_L = jnp.arange(L)
  whole_reads = _reads_whole(groups, window)
  first_column_LxRxR = columns_LxLxRxR[0]  # W[i, r, 0, s]: each reader's weights on layer 0

  def body(carry, layer_residuals: _LayerResiduals, column_LxRxR, l):
    # buf: slots j <= l raw kv, slots i > l the cotangents of readers i's routed kv. dfirst
    # (`_sums_layer_zero_cotangent`): layer 0's raw kv cotangent from readers l+1 and later.
    dx_BxTxD, buf_LxRxBxTx2xHd, *dfirst = carry
    vjp_kv, vjp_rest = layer_residuals.vjps(_layer_params(groups, l, params_S))
    dparams_rest, dx_rest_BxTxD, dhandoff, drouted_BxTxRx2xHd = vjp_rest(dx_BxTxD)
    if window is None:
      dW_RxLxR = _switch_on_group(groups, l, _router_row_gradient, drouted_BxTxRx2xHd,
                                  buf_LxRxBxTx2xHd)
    else:
      dW_RxLxR = _router_row_gradient_window(window, l, drouted_BxTxRx2xHd, buf_LxRxBxTx2xHd)
    dW_RxLxR = jnp.where((source_L <= l)[None, :, None], dW_RxLxR, 0.0)
    # Slot l's raw kv is read above and not needed again: its cotangent takes the slot, after
    # that read (a compiler that wrote first would copy the buffer). Only the TPU's compiler
    # keeps the barrier; elsewhere the write follows dW by data (`_written_and_read`).
    drouted_BxTxRx2xHd, dW_RxLxR = jax.lax.optimization_barrier((drouted_BxTxRx2xHd, dW_RxLxR))
    drouted_BxTxRx2xHd = drouted_BxTxRx2xHd.astype(dtype)
    if window is None:
      pull = lambda column_LxRxR, buf_LxRxBxTx2xHd, _: _switch_on_group(  # noqa: E731
          groups, l, _cotangent_from_readers, column_LxRxR, buf_LxRxBxTx2xHd)
    else:
      pull = lambda column_LxRxR, buf_LxRxBxTx2xHd, _: _cotangent_from_window(  # noqa: E731
          window, l, column_LxRxR, buf_LxRxBxTx2xHd)
    dkv_BxTxRx2xHd, buf_LxRxBxTx2xHd = _written_and_read(
        buf_LxRxBxTx2xHd, _to_slot(drouted_BxTxRx2xHd), l, whole_reads, column_LxRxR, 0, pull,
        _pull_readers, other_reads=dW_RxLxR)
    if dfirst:  # reader l's share of layer 0's cotangent; at layer 0 the sum is its cotangent
      dfirst = [dfirst[0] + _pull_readers(read_slots(first_column_LxRxR, l, 1),
                                          _to_slot(drouted_BxTxRx2xHd)[None])]
      dkv_BxTxRx2xHd = jnp.where(l == 0, dfirst[0], dkv_BxTxRx2xHd)
    dparams_kv, dx_kv_BxTxD = vjp_kv((dkv_BxTxRx2xHd.astype(dtype), dhandoff))
    dparams_l = jax.tree.map(jnp.add, dparams_kv, dparams_rest)
    return (dx_rest_BxTxD + dx_kv_BxTxD, buf_LxRxBxTx2xHd, *dfirst), (dparams_l, dW_RxLxR)

  carry = (dx_BxTxD, buf_LxRxBxTx2xHd)
  if _sums_layer_zero_cotangent(window, not isinstance(saved, list), L):
    _, R, B, T, *rest = buf_LxRxBxTx2xHd.shape
    carry += (jnp.zeros((B, T, R, *rest), jnp.float32),)
  carry, (dparams_L, dW_LxRxLxR) = _layers_in_reverse(
      body, carry, saved, columns_LxLxRxR, source_L, unroll)
  return carry[0], dparams_L, dW_LxRxLxR


def _backward_gram(groups, unroll, params_S, buf_LxRxBxTx2xHd, routed_LxRxBxTx2xHd, columns_LxLxRxR,
                   saved, dx_BxTxD):
  """The layers' backward, in reverse, for dense reads whose forward kept each layer's routed kv
  in a buffer (`_forward`): each layer reads its routed kv from its slot there, and its
  cotangent then takes the slot. The readers' cotangents are pulled from that buffer, and the
  raw kv buffer is not touched until, after the loop, one product gives the whole router
  gradient, dW[i, r, j, s] = <drouted_i[r], kv_j[s]> for j <= i: two buffers read once, where
  a row per layer reads the raw buffer once per layer (1.2B setup: 16 reads of 1.07 GB a step
  per device)."""
  L = buf_LxRxBxTx2xHd.shape[0]
  dtype = buf_LxRxBxTx2xHd.dtype
  source_L = jnp.arange(L)

  def body(carry, residuals_but_routed: _LayerResiduals, column_LxRxR, l):
    # routed: slots i < l the routed kv of layers i, slots i >= l the cotangents of readers i
    # (the column is zero for i < l).
    dx_BxTxD, routed_LxRxBxTx2xHd = carry
    routed_BxTxRx2xHd = _from_slot(read_slots(routed_LxRxBxTx2xHd, l, 1)[0])
    vjp_kv, vjp_rest = residuals_but_routed.with_left_out(routed_BxTxRx2xHd).vjps(
        _layer_params(groups, l, params_S))
    dparams_rest, dx_rest_BxTxD, dhandoff, drouted_BxTxRx2xHd = vjp_rest(dx_BxTxD)
    pull = lambda column_LxRxR, routed_LxRxBxTx2xHd, _: _switch_on_group(  # noqa: E731
        groups, l, _cotangent_from_readers, column_LxRxR, routed_LxRxBxTx2xHd)
    # The rest's VJP reads slot l (its routed kv) for its parameters' gradients too.
    dkv_BxTxRx2xHd, routed_LxRxBxTx2xHd = _written_and_read(
        routed_LxRxBxTx2xHd, _to_slot(drouted_BxTxRx2xHd.astype(dtype)), l, False,
        column_LxRxR, 0, pull, _pull_readers, other_reads=(dparams_rest, dx_rest_BxTxD))
    dparams_kv, dx_kv_BxTxD = vjp_kv((dkv_BxTxRx2xHd.astype(dtype), dhandoff))
    dparams_l = jax.tree.map(jnp.add, dparams_kv, dparams_rest)
    return (dx_rest_BxTxD + dx_kv_BxTxD, routed_LxRxBxTx2xHd), dparams_l

  (dx_BxTxD, drouted_LxRxBxTx2xHd), dparams_L = _layers_in_reverse(
      body, (dx_BxTxD, routed_LxRxBxTx2xHd), saved, columns_LxLxRxR, source_L, unroll)
  dW_LxRxLxR = jnp.einsum("irbtcd,jsbtcd->irjs", drouted_LxRxBxTx2xHd, buf_LxRxBxTx2xHd,
                          preferred_element_type=jnp.float32)
  return dx_BxTxD, dparams_L, jnp.where(
      (source_L[None, :] <= source_L[:, None])[:, None, :, None], dW_LxRxLxR, 0.0)


pull_stack.defvjp(_pull_stack_fwd, _pull_stack_bwd)
