"""kv routing in pull form (`routing_impl: pull`, model/kv_pull.py): the push's math exactly,
with memory linear in depth."""

import collections
import functools
import re

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from lime_jax.config import ModelConfig
from lime_jax.model import flops, kv_pull, stack
from lime_jax.model.mixers import kv_routing
from lime_jax.model import transformer as M
import model_checks
from test_bench import SMALL

CFG = ModelConfig(V=64, D=32, L=6, H=4, R=2, F=64, T=8, scan_segments=2)


def _random_router_params(cfg):
  """Random values in every stored router entry (masked ones too: they must be ignored)."""
  params = M.init_params(cfg, jax.random.key(0))
  stacked = stack.stacked_layer_params(params, cfg)
  stacked = dict(stacked, router=jax.random.normal(jax.random.key(7), stacked["router"].shape))
  return stack.with_stacked_layer_params(params, stacked, cfg)


def _push_and_pull(cfg):
  """(loss, grads) of the push and of the pull, on random routers and tokens."""
  params = _random_router_params(cfg)
  tokens_BxT = model_checks.tokens(cfg, T=cfg.T + 1)
  value_and_grad = jax.jit(jax.value_and_grad(model_checks.next_token_loss), static_argnums=1)
  return (value_and_grad(params, cfg, tokens_BxT),
          value_and_grad(params, cfg.replace(routing_impl="pull"), tokens_BxT))


@pytest.mark.parametrize("changes", [
    {}, {"R": 4}, {"top_p": 0.8}, {"router_window": 2, "router_dilation": 3},
    {"router_window": 2}, {"router_window": 1}, {"router_window": 3, "scan_segments": 3},
    {"scan_segments": 1}, {"scan_segments": 6}, {"remat_policy": "full"}, {"scan_unroll": 6},
    {"scan_unroll": 6, "router_window": 2}, {"scan_unroll": 4}, {"router_window": 6},
    {"router_window": 3, "L": 9, "scan_segments": 3}, {"router_window": 4, "top_p": 0.8},
    {"remat_policy": "dots"}, {"remat_policy": "dots", "scan_segments": 1},
    {"remat_policy": "dots", "scan_unroll": 2}, {"remat_policy": "save_proj", "top_p": 0.8},
    {"remat_policy": "dots", "router_window": 2}, {"remat_policy": "dots", "scan_unroll": 6},
], ids=str)
def test_pull_equals_push(changes):
  """Loss and every gradient (routers, kv projections, the rest) as the push form computes
  them; the push is checked against the loop reference in test_model.py."""
  (loss_push, grads_push), (loss_pull, grads_pull) = _push_and_pull(CFG.replace(**changes))
  np.testing.assert_allclose(loss_pull, loss_push, rtol=1e-6)
  chex.assert_trees_all_close(grads_pull, grads_push, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("changes", [
    {}, {"scan_unroll": 2}, {"router_window": 3, "scan_segments": 1},
    {"router_window": 3, "L": 9, "scan_segments": 3}, {"remat_policy": "dots"},
    {"remat_policy": "dots", "scan_segments": 1},
], ids=str)
def test_pull_reads_no_slot_before_its_write(changes, monkeypatch):
  """On a TPU a scan whose reads take slices (several read groups, or a window) starts its
  buffer uninitialized (`lax.empty`), as it does the routed kv buffer of the one-product
  router gradient (kv_pull._backward_gram). Here the CPU takes that path too, with the buffers
  filled with NaN, which a zero router weight would not cancel: the pull still gives the push's
  loss and gradients, so no slot is read unmasked before its layer writes it."""
  def nan_filled(shape, dtype, **_):
    return jnp.full(shape, jnp.nan, dtype)
  monkeypatch.setattr(jax.lax, "empty", nan_filled)
  monkeypatch.setattr(kv_pull, "UNINITIALIZED_BUFFER_PLATFORMS", ("cpu",))
  (loss_push, grads_push), (loss_pull, grads_pull) = _push_and_pull(CFG.replace(**changes))
  np.testing.assert_allclose(loss_pull, loss_push, rtol=1e-6)
  chex.assert_trees_all_close(grads_pull, grads_push, rtol=1e-5, atol=1e-6)


def _layout_constraints(cfg) -> collections.Counter:
  """How many of the gradient program's layout constraints ask for each layout (minor to
  major, as the lowered text has them)."""
  text = model_checks.lowered_gradient(cfg).as_text()
  constraints = [line for line in text.splitlines() if "@LayoutConstraint" in line]
  return collections.Counter(
      tuple(int(axis) for axis in re.search(r"result_layouts = \[dense<\[([\d, ]+)\]>",
                                            line).group(1).split(", "))
      for line in constraints)


def _minor_to_major(layout: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(reversed(layout))


@pytest.mark.parametrize("changes", [
    {"scan_segments": 1}, {"scan_segments": 1, "scan_unroll": 2},
    {"scan_segments": 1, "scan_unroll": 6}, {"router_window": 2},
    {"router_window": 2, "scan_unroll": 6}, {"scan_segments": 2},
], ids=str)
def test_pull_in_its_tpu_layouts_equals_push(changes, monkeypatch):
  """On a TPU the pull constrains layouts (kv_pull.LAYOUT_PLATFORMS): a buffer read whole (one
  read group, no window) slots major (SLOT_MAJOR_LAYOUT), the routed kv by whether the reads
  are dense or a window (ROUTED_LAYOUTS), and a scanned window's backward reads in the
  buffer's own layout (WINDOW_BUFFER_LAYOUT); the CPU's program has none. Here the CPU takes that
  path too: the program then carries exactly those constraints and gives the push's loss and
  gradients."""
  cfg = CFG.replace(**changes)
  pull = cfg.replace(routing_impl="pull")
  assert not _layout_constraints(pull)
  monkeypatch.setattr(kv_pull, "LAYOUT_PLATFORMS", ("cpu",))
  constraints = _layout_constraints(pull)
  routed = _minor_to_major(kv_pull.ROUTED_LAYOUTS["dense" if cfg.router_window is None
                                                   else "window"])
  slot_major = _minor_to_major(kv_pull.SLOT_MAJOR_LAYOUT)
  window_slices = _minor_to_major(kv_pull.WINDOW_BUFFER_LAYOUT)
  whole = cfg.router_window is None and cfg.scan_segments == 1
  windowed = cfg.router_window is not None and cfg.scan_unroll < cfg.L  # scanned only
  assert set(constraints) == ({routed, slot_major} if whole else
                              {routed, window_slices} if windowed else {routed})
  assert constraints[routed] >= 1  # each layer's routed kv (a scan body once)
  if whole:  # the fresh buffer and each write of it, forward and backward
    assert constraints[slot_major] >= 3
  if windowed:  # the backward's two window reads, the readers' and the router row's
    assert constraints[window_slices] >= 2
  (loss_push, grads_push), (loss_pull, grads_pull) = _push_and_pull(cfg)
  np.testing.assert_allclose(loss_pull, loss_push, rtol=1e-6)
  chex.assert_trees_all_close(grads_pull, grads_push, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("changes", [
    {"scan_segments": 1, "remat_policy": "dots"}, {"scan_segments": 2},
], ids=str)
def test_pull_in_its_gpu_layouts_equals_push(changes, monkeypatch):
  """On a GPU the buffers the products read are constrained row-major
  (kv_pull.ROW_MAJOR_BUFFER_PLATFORMS); the CPU's program has no constraint. Here the CPU takes
  that path: the program then carries row-major constraints on the buffers only (their fills
  and the writes a product reads after) and gives the push's loss and gradients."""
  cfg = CFG.replace(**changes)
  pull = cfg.replace(routing_impl="pull")
  assert not _layout_constraints(pull)
  monkeypatch.setattr(kv_pull, "ROW_MAJOR_BUFFER_PLATFORMS", ("cpu",))
  constraints = _layout_constraints(pull)
  assert set(constraints) == {(5, 4, 3, 2, 1, 0)}  # minor to major: [L, R, B, T, 2, Hd] as is
  # The raw buffer's fill and forward write; the routed kv buffer's fill, where the backward is
  # the one product (remat), and the backward's write of the buffer it pulls from.
  assert constraints[(5, 4, 3, 2, 1, 0)] == (4 if cfg.remat_policy == "dots" else 3)
  (loss_push, grads_push), (loss_pull, grads_pull) = _push_and_pull(cfg)
  np.testing.assert_allclose(loss_pull, loss_push, rtol=1e-6)
  chex.assert_trees_all_close(grads_pull, grads_push, rtol=1e-5, atol=1e-6)


def test_pull_in_bfloat16_stays_close_to_push():
  """bf16 compute: the buffer holds bf16 raw kv, the mix accumulates in float32 (as the push)."""
  cfg = CFG.replace(compute_dtype="bfloat16")
  (loss_push, grads_push), (loss_pull, grads_pull) = _push_and_pull(cfg)
  np.testing.assert_allclose(loss_pull, loss_push, rtol=2e-3)
  router_push = stack.stacked_layer_params(grads_push, cfg)["router"]
  router_pull = stack.stacked_layer_params(grads_pull, cfg)["router"]
  assert jnp.all(jnp.isfinite(router_pull))
  np.testing.assert_allclose(router_pull, router_push, rtol=0.05, atol=0.05 * float(
      jnp.max(jnp.abs(router_push))))


@pytest.mark.parametrize("changes", [{"scan_segments": 1}, {"scan_segments": 2},
                                     {"scan_segments": 1, "router_window": 3},
                                     {"scan_segments": 1, "remat_policy": "dots"}], ids=str)
def test_pull_training_memory_grows_linearly_with_depth(changes):
  """test_bench.py's criterion (which catches the quadratic carried buffer), for the window's
  reads too."""
  cfg = SMALL.replace(routing_impl="pull", **changes)
  temp_L = model_checks.train_step_temp_bytes(cfg.replace(L=4))
  temp_2L = model_checks.train_step_temp_bytes(cfg.replace(L=8))
  assert temp_2L <= 2.1 * temp_L, (temp_L, temp_2L)
  base_2L = model_checks.train_step_temp_bytes(cfg.replace(L=8, router="none", router_window=None))
  assert temp_2L <= 1.5 * base_2L, (temp_2L, base_2L)


def _kv_sized_residuals(cfg, router: str) -> int:
  """How many [B, T, R, 2, Hd]-sized arrays one layer's VJP keeps for its backward (bf16,
  `remat: dots`, as the accelerator setups train): the pull's layer against the baseline's."""
  cfg = cfg.replace(router=router, compute_dtype="bfloat16", remat_policy="dots")
  params_l = jax.tree.map(lambda a: a[1], stack.stacked_layer_params(
      M.init_params(cfg, jax.random.key(0)), cfg))
  B = 2
  x_BxTxD = jnp.ones((B, cfg.T, cfg.D), jnp.float32)
  positions_BxT = jnp.broadcast_to(jnp.arange(cfg.T), (B, cfg.T))
  layer_fn = functools.partial(stack._apply_block, cfg)
  if router == "none":
    run = lambda p, x: layer_fn(p, x, None, 1, positions_BxT)[0]  # noqa: E731
    args = (params_l, x_BxTxD)
  else:  # both halves of the layer, as the pull saves them (the kv is the buffer's)
    routed_BxTxRx2xHd = jnp.ones((B, cfg.T, cfg.R, 2, cfg.Hd), jnp.bfloat16)
    def run(p, x, routed):
      kv_BxTxRx2xHd, attn_input_BxTxD = kv_routing._pulled_kv(layer_fn, p, x, 1, positions_BxT)
      return kv_routing._pulled_layer(layer_fn, p, x, attn_input_BxTxD, routed, 1,
                                      positions_BxT), kv_BxTxRx2xHd
    args = (params_l, x_BxTxD, routed_BxTxRx2xHd)
  residuals = model_checks.saved_residuals(run, *args)
  shapes = [tuple(int(n) for n in match.group(1).split(",") if n)
            for match in map(re.compile(r"^\w+\[([\d,]*)\]").match, residuals) if match]
  assert shapes, residuals
  kv_size = B * cfg.T * cfg.R * 2 * cfg.Hd
  return sum(1 for shape in shapes if np.prod(shape) == kv_size and len(shape) >= 4)


def test_pull_layer_keeps_no_more_kv_copies_than_the_baseline_layer():
  """The routed kv attention reads is the pull layer's one kv-sized residual, as the baseline's
  own kv is: its raw kv (for its router row's gradient) is read back from the buffer."""
  cfg = CFG.replace(D=48, H=3, R=3, Hd=16, T=16)  # sizes where no other array has kv's size
  assert _kv_sized_residuals(cfg, "none") == 1
  assert _kv_sized_residuals(cfg, "kv-static") == 1


def test_pull_does_not_concatenate_the_segments_parameters():
  """Each layer's parameters are read from its own segment: no copy of all layers' (a 3.4 GiB
  temporary per device in the 1.2B setup on TPU v5p)."""
  cfg = CFG.replace(routing_impl="pull", scan_segments=3)
  params = M.init_params(cfg, jax.random.key(0))
  gate_up_shape = stack.stacked_layer_params(params, cfg)["mlp"]["gate_up"].shape  # [L, ...]
  shapes = [eqn.outvars[0].aval.shape for eqn in model_checks.all_eqns(model_checks.grad_jaxpr(cfg))
            if eqn.primitive.name == "concatenate"]
  assert shapes, "expected the router concatenation at least"
  assert gate_up_shape not in shapes, shapes


def test_read_groups_cover_exactly_the_dense_sources_and_readers():
  """Every (reader, source) pair j <= i is read by the reader's group forward and by the
  source's group backward; a group reads no slot past its segment's end."""
  L = 12
  groups = kv_pull.read_groups([(0, 4), (4, 8), (8, 12)], L)
  for g in groups:
    (lo, hi), = g.sources
    assert (lo, hi) == (0, g.stop) and g.readers == (g.start, L)
  assert [g.segment for g in groups] == [0, 1, 2]


def test_windowed_pull_reads_order_L_k_slots():
  """A window reads layer 0 and the window's slots: the pull's count is the ring's, L (k + 1), where
  a dense read plan of the same segments is about L^2 / 2."""
  cfg = CFG.replace(L=16, routing_impl="pull", router_window=3, scan_segments=4)
  per_slot = 2 * cfg.Hd * cfg.R * cfg.R
  assert flops.executed_push_macs_per_token(cfg) == per_slot * cfg.L * (1 + 3)
  dense = flops.executed_push_macs_per_token(cfg.replace(router_window=None))
  assert dense == per_slot * (4 * 4 + 4 * 8 + 4 * 12 + 4 * 16)



def test_fully_unrolled_pull_picks_each_layers_reads_at_trace_time():
  """`plan` counts cost on the program with every layer unrolled: there no `lax.switch` may be
  left, since XLA keeps it and counts every branch's reads. (A `lax.platform_dependent` choice
  is a cond too, resolved when lowering: not counted.)"""
  cfg = CFG.replace(routing_impl="pull", scan_segments=3)
  switches = lambda cfg: model_checks.value_branches(model_checks.grad_jaxpr(cfg))  # noqa: E731
  assert switches(cfg) > 0  # the scan's per-layer choice of reads
  assert switches(cfg.replace(scan_unroll=cfg.L)) == 0


def _buffer_test(cfg):
  """Whether a jaxpr value is shaped like the pull's buffer [L, R, B, T, 2, Hd]."""
  return lambda v: getattr(v.aval, "shape", ())[:1] == (cfg.L,) and v.aval.ndim == 6


def _writes_not_after_reads(jaxpr, is_buffer) -> tuple[int, int]:
  """(in-place writes of the buffer, those that some read of the same buffer value does not
  precede by data dependency) in one jaxpr, values passed through an optimization barrier being
  the same buffer. A compiler may schedule such a write first and must then copy the buffer."""
  produced_by = {id(v): e for e in jaxpr.eqns for v in e.outvars}
  same_value = {}  # barrier output -> its input
  for e in jaxpr.eqns:
    if e.primitive.name == "optimization_barrier":
      same_value.update({id(o): i for i, o in zip(e.invars, e.outvars)})
  def root(v):
    while id(v) in same_value:
      v = same_value[id(v)]
    return id(v)
  def ancestors(e):
    seen, todo = set(), [e]
    while todo:
      for v in todo.pop().invars:
        if id(v) in produced_by and id(produced_by[id(v)]) not in seen:
          seen.add(id(produced_by[id(v)]))
          todo.append(produced_by[id(v)])
    return seen
  writes = [e for e in jaxpr.eqns if e.invars and is_buffer(e.invars[0]) and (
      e.primitive.name == "dynamic_update_slice"
      or e.params.get("name") == "dynamic_update_index_in_dim")]
  unordered = 0
  for write in writes:
    buffer = root(write.invars[0])
    reads = [e for e in jaxpr.eqns
             if e is not write and e.primitive.name != "optimization_barrier"
             and any(not isinstance(v, jax.extend.core.Literal) and root(v) == buffer
                     for v in e.invars)]
    before = ancestors(write)
    unordered += any(id(r) not in before for r in reads)
  return len(writes), unordered


def _static_slot_reads(jaxpr, is_buffer) -> tuple[int, int]:
  """(slices of the buffer, those whose slot range is fixed at compile time) in one jaxpr."""
  reads = [e for e in jaxpr.eqns if e.primitive.name in ("slice", "dynamic_slice")
           and is_buffer(e.invars[0])]
  static = [e for e in reads if e.primitive.name == "slice"
            or isinstance(e.invars[1], jax.extend.core.Literal)]
  return len(reads), len(static)


@pytest.mark.parametrize("changes", [{"router_window": 3, "scan_segments": 1},
                                     {"scan_segments": 3}], ids=["window", "dense-segments"])
def test_buffer_slot_reads_start_where_the_compiler_cannot_see(changes):
  """From a static slice of the buffer the TPU compiler made a convolution over the whole
  buffer with negative padding, and charged it all the buffer's bytes (deep setup, 64 layers:
  7 of 64 slots for 280 MiB instead of 52). Every slot read must be a dynamic slice with a
  start that is not a constant, in the unrolled program too, where the layer index is."""
  cfg = CFG.replace(routing_impl="pull", scan_unroll=CFG.L, **changes)
  counts = [_static_slot_reads(each, _buffer_test(cfg))
            for each in model_checks.all_jaxprs(model_checks.grad_jaxpr(cfg))]
  reads, static = map(sum, zip(*counts))
  assert reads >= 2 * cfg.L  # each layer reads slots forward and backward
  assert static == 0


@pytest.mark.parametrize("changes", [{"router_window": 3}, {}], ids=["window", "dense"])
def test_each_layers_buffer_write_follows_its_reads(changes):
  """Every in-place write of the buffer must come after every read of the value it
  overwrites. Forward, a layer's raw kv follows the previous layer's reads by data. Backward,
  the routed kv's cotangent does not depend on the router gradient's read of the slot it
  takes, so only an explicit ordering keeps the write after it. Without it the TPU compiler
  scheduled the write first and copied the whole buffer in every layer of the unrolled program
  (deep setup at 16 layers, window 8: 29 copies, about 10% of the step's bytes). Off the TPU
  the forward reads before it writes too, ordered by data (kv_pull._after). Checked on the
  unrolled program, where each layer's reads and write are separate equations."""
  cfg = CFG.replace(routing_impl="pull", scan_segments=1, scan_unroll=CFG.L, **changes)
  counts = [_writes_not_after_reads(each, _buffer_test(cfg))
            for each in model_checks.all_jaxprs(model_checks.grad_jaxpr(cfg))]
  writes, unordered = map(sum, zip(*counts))
  assert writes >= 2 * cfg.L  # each layer writes once forward and once backward
  assert unordered == 0


def _router_gradient_products(cfg) -> collections.Counter:
  """How many products of the gradient program give (part of) a router row's gradient [R, n,
  R] and how many the whole router gradient [L, R, L, R], from slots of a kv buffer."""
  def kind(shape):
    if shape == (cfg.L, cfg.R, cfg.L, cfg.R):
      return "whole"
    return "row" if len(shape) == 3 and shape[0] == shape[2] == cfg.R else None
  is_slots = lambda v: getattr(v.aval, "ndim", 0) == 6  # noqa: E731
  return collections.Counter(
      kind(eqn.outvars[0].aval.shape) for eqn in model_checks.all_eqns(model_checks.grad_jaxpr(cfg))
      if eqn.primitive.name == "dot_general" and any(map(is_slots, eqn.invars)))


@pytest.mark.parametrize("changes", [{"scan_segments": 1}, {"scan_segments": 3},
                                     {"scan_segments": 1, "scan_unroll": 2},
                                     {"scan_segments": 1, "scan_unroll": CFG.L}], ids=str)
def test_dense_pull_under_remat_takes_the_router_gradient_in_one_product(changes):
  """With a remat policy, whose checkpoint saves each layer's routed kv as it is, the forward
  keeps those in a buffer whose slots the backward overwrites with their cotangents; one
  product of it with the raw kv buffer after the loop is the router gradient. A row per layer
  would read the whole raw buffer once more per layer (1.2B setup on TPU v5p: 16 x 1.07 GB a
  step per device). Without a policy, or with a window (O(L k) reads), the rows stay."""
  cfg = CFG.replace(routing_impl="pull", **changes)
  products = _router_gradient_products(cfg.replace(remat_policy="dots"))
  assert products["whole"] == 1 and products["row"] == 0, products
  assert _router_gradient_products(cfg)["row"] >= 1  # remat none: the rows
  products = _router_gradient_products(cfg.replace(remat_policy="dots", router_window=2))
  assert products["whole"] == 0 and products["row"] >= 1, products


def test_routed_buffer_writes_follow_their_reads():
  """The one-product backward reads each layer's routed kv from its slot and then writes the
  cotangent there: the write must depend on the read (kv_pull._backward_gram), or a compiler
  may schedule it first and copy the buffer."""
  cfg = CFG.replace(routing_impl="pull", scan_segments=1, remat_policy="dots")
  counts = [_writes_not_after_reads(each, _buffer_test(cfg))
            for each in model_checks.all_jaxprs(model_checks.grad_jaxpr(cfg))]
  writes, unordered = map(sum, zip(*counts))
  assert writes >= 3  # the forward's two buffers and the backward's routed kv buffer
  assert unordered == 0


def _buffer_copies_per_layer(cfg) -> list[str]:
  """The copies of a whole kv buffer ([L, R, B, T, 2, Hd]) that the CPU's compiled gradient
  program makes outside its entry computation: inside the layer loops, once a layer."""
  hlo = model_checks.compiled_as_users(model_checks.lowered_gradient(cfg)).as_text()
  buffer = re.compile(rf"= f32\[{cfg.L},{cfg.R},\d+,\d+,2,{cfg.Hd}\]\{{[\d,]*\}} copy\(")
  return [line.strip() for name, lines in model_checks.hlo_computations(hlo).items()
          if name != "ENTRY" for line in lines if buffer.search(line)]


@pytest.mark.parametrize("changes", [
    {"scan_segments": 1}, {"scan_segments": 1, "remat_policy": "dots"},
    {"scan_segments": 1, "router_window": 3}, {"scan_segments": 2},
], ids=str)
def test_cpu_layer_loops_copy_no_buffer(changes):
  """Off the TPU each layer reads the buffer before it writes its slot, the write following the
  reads by data (kv_pull._written_and_read): XLA:CPU fused a write made first into two copies
  of the buffer, and copied it twice a layer to write in place after reads that no data
  ordered (it expands optimization barriers before copy insertion)."""
  cfg = CFG.replace(routing_impl="pull", **changes)
  assert _buffer_copies_per_layer(cfg) == []


def _stacks_of_gate_up(cfg) -> int:
  """Arrays stacked over layers in the shape of the MLP's gate_up parameter ([L, D, 2, F]) by
  the layer loops of the CPU's compiled gradient program (fused writes of a layer's slice)."""
  hlo = model_checks.compiled_as_users(model_checks.lowered_gradient(cfg)).as_text()
  stack_write = re.compile(
      rf"ROOT %\S+ = f32\[{cfg.L},{cfg.D},2,{cfg.F}\]\{{[\d,]*\}} dynamic-update-slice\(")
  return sum(bool(stack_write.search(line))
             for name, lines in model_checks.hlo_computations(hlo).items() if name != "ENTRY"
             for line in lines)


@pytest.mark.parametrize("changes", [
    {"scan_segments": 1}, {"scan_segments": 1, "remat_policy": "dots"},
    {"scan_segments": 2, "router_window": 3},
], ids=str)
def test_cpu_forward_loop_stacks_no_parameters(changes, monkeypatch):
  """Off the TPU the backward takes each layer's parameters from the stacked ones again
  (kv_pull.SAVED_PARAMS_PLATFORMS), so the forward loop does not stack a copy of them with the
  layers' residuals: only the backward's gradient is stacked. Saved, the forward's stack shows."""
  cfg = CFG.replace(routing_impl="pull", **changes)
  assert _stacks_of_gate_up(cfg) == 1  # the gradient
  monkeypatch.setattr(kv_pull, "SAVED_PARAMS_PLATFORMS", ("tpu", "cpu"))
  assert _stacks_of_gate_up(cfg) == 2  # and the saved parameters


def test_unrolled_pull_recomputes_what_remat_dropped():
  """The scanned pull's backward loop recomputes what remat did not save, apart from the
  forward loop. Run unrolled (the cost program of `lime-jax plan`) the layers are straight-line
  code, where XLA would merge that recomputation with the forward unless remat prevents CSE
  there (layers.maybe_remat), and count a program that training never runs: full remat must
  cost FLOPs."""
  model_checks.assert_full_remat_recomputes(
      CFG.replace(routing_impl="pull", scan_segments=1, scan_unroll=CFG.L, router_window=3))
