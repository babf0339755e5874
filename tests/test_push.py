"""The push accumulator (model/push.py): its hand-written VJP against autodiff of the plain
formula, and its CPU forms against the einsums other platforms compile."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lime_jax.model import push
import model_checks

# (I, R, S, payload's trailing axes): kv routing's [B, T, 2, Hd] payload, DenseFormer's [B, T, D]
SHAPES = [(5, 2, 2, (2, 3, 2, 4)), (4, 1, 1, (2, 3, 8))]


def _operands(I, R, S, P):
  keys = jax.random.split(jax.random.key(0), 4)
  acc_IxRxP = jax.random.normal(keys[0], (I, R, *P))
  weights_IxRxS = jax.random.normal(keys[1], (I, R, S))
  payload_SxP = jax.random.normal(keys[2], (S, *P))
  probe_RxP = jax.random.normal(keys[3], (R, *P))  # what the read's cotangent is
  return acc_IxRxP, weights_IxRxS, payload_SxP, probe_RxP


def _objective(push_read):
  """A scalar of both outputs, so both cotangents are non-zero."""
  def objective(acc_IxRxP, weights_IxRxS, payload_SxP, probe_RxP, slot):
    new_acc_IxRxP, read_RxP = push_read(acc_IxRxP, weights_IxRxS, payload_SxP, slot)
    return jnp.sum(jnp.sin(new_acc_IxRxP)) + jnp.sum(read_RxP * probe_RxP)
  return objective


def _plain_push_read(acc_IxRxP, weights_IxRxS, payload_SxP, slot):
  new_acc_IxRxP = acc_IxRxP + jnp.tensordot(weights_IxRxS, payload_SxP, axes=1)
  return new_acc_IxRxP, new_acc_IxRxP[slot]


@pytest.mark.parametrize("I,R,S,P", SHAPES)
@pytest.mark.parametrize("slot", [0, 3])
def test_traced_slot_gradients_equal_autodiff(I, R, S, P, slot):
  """The scan's form (traced slot, custom VJP) against autodiff of acc + W (x) payload."""
  acc_IxRxP, weights_IxRxS, payload_SxP, probe_RxP = _operands(I, R, S, P)
  args = (acc_IxRxP, weights_IxRxS, payload_SxP, probe_RxP)
  grad = jax.grad(_objective(push.push_and_read), argnums=(0, 1, 2))
  expected = jax.grad(_objective(_plain_push_read), argnums=(0, 1, 2))(*args, slot)
  got = jax.jit(grad)(*args, jnp.int32(slot))
  for name, g, e in zip(("acc", "weights", "payload"), got, expected):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("I,R,S,P", SHAPES)
def test_static_slot_touches_only_live_slots(I, R, S, P):
  acc_IxRxP, weights_IxRxS, payload_SxP, _ = _operands(I, R, S, P)
  live_I = np.array([1, 3])
  new_acc_IxRxP, read_RxP = push.push_and_read(acc_IxRxP, weights_IxRxS, payload_SxP, 3, live_I)
  expected_IxRxP, _ = _plain_push_read(acc_IxRxP, weights_IxRxS, payload_SxP, 3)
  dead_I = np.setdiff1d(np.arange(I), live_I)
  np.testing.assert_array_equal(new_acc_IxRxP[dead_I], acc_IxRxP[dead_I])
  np.testing.assert_allclose(new_acc_IxRxP[live_I], expected_IxRxP[live_I], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(read_RxP, new_acc_IxRxP[3])


@pytest.mark.parametrize("I,R,S,P", SHAPES)
@pytest.mark.parametrize("live", [(3, 4), (1, 3), (0, 2, 3)])
def test_static_slot_gradients_equal_autodiff(I, R, S, P, live):
  """The unrolled form (known live slots; the mix's own backward) against autodiff of the
  plain formula on those slots: evenly spaced slots (a slice) and others (a scatter)."""
  acc_IxRxP, weights_IxRxS, payload_SxP, probe_RxP = _operands(I, R, S, P)
  live_I, slot = np.array(live), 3

  def plain(acc_IxRxP, weights_IxRxS, payload_SxP, slot):
    mixed = jnp.tensordot(weights_IxRxS[live_I], payload_SxP, axes=1)
    new_acc_IxRxP = acc_IxRxP.at[live_I].add(mixed)
    return new_acc_IxRxP, new_acc_IxRxP[slot]

  def unrolled(acc_IxRxP, weights_IxRxS, payload_SxP, slot):
    return push.push_and_read(acc_IxRxP, weights_IxRxS, payload_SxP, slot, live_I)

  args = (acc_IxRxP, weights_IxRxS, payload_SxP, probe_RxP, slot)
  expected = jax.grad(_objective(plain), argnums=(0, 1, 2))(*args)
  got = jax.grad(_objective(unrolled), argnums=(0, 1, 2))(*args)
  for name, g, e in zip(("acc", "weights", "payload"), got, expected):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5, err_msg=name)


def _payload_from(x_xD, proj_DxSxC):
  """A payload [S, *P] made from other arrays, as LIMe's raw kv from the normed input."""
  return jnp.tanh(jnp.einsum("...d,dsc->s...c", x_xD, proj_DxSxC))


def _payload_inputs(S, P, D=3):
  """x [*P[:-1], D] and proj [D, S, P[-1]], which `_payload_from` makes a payload [S, *P]."""
  keys = jax.random.split(jax.random.key(1), 2)
  return (jax.random.normal(keys[0], (*P[:-1], D)), jax.random.normal(keys[1], (D, S, P[-1])))


def _recomputed_objective(recompute: bool):
  """`_objective` of a push whose payload is `_payload_from(*inputs)`, given as a `Recomputed`
  one or computed before the push."""
  def push_read(acc_IxRxP, weights_IxRxS, inputs, slot):
    payload = push.Recomputed(_payload_from, inputs)
    return push.push_and_read(acc_IxRxP, weights_IxRxS,
                              payload if recompute else payload.value(), slot)
  return _objective(push_read)


@pytest.mark.parametrize("I,R,S,P", SHAPES)
@pytest.mark.parametrize("slot", [0, 3])
def test_recomputed_payload_gradients_equal_autodiff(I, R, S, P, slot):
  """A `Recomputed` payload: the same values and gradients, its inputs' included, as autodiff
  of the plain formula on fn(*inputs)."""
  acc_IxRxP, weights_IxRxS, _, probe_RxP = _operands(I, R, S, P)
  inputs = _payload_inputs(S, P)

  def plain(acc_IxRxP, weights_IxRxS, inputs, slot):
    payload_SxP = _payload_from(*inputs)
    return _plain_push_read(acc_IxRxP, weights_IxRxS, payload_SxP, slot)

  args = (acc_IxRxP, weights_IxRxS, inputs, probe_RxP)
  expected_value, expected = jax.value_and_grad(_objective(plain), argnums=(0, 1, 2))(*args, slot)
  value, got = jax.jit(jax.value_and_grad(_recomputed_objective(True), argnums=(0, 1, 2)))(
      *args, jnp.int32(slot))
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  got, expected = jax.tree.leaves(got), jax.tree.leaves(expected)
  for name, g, e in zip(("acc", "weights", "x", "proj"), got, expected):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5, err_msg=name)


def _scan_residuals(recompute: bool, I, R, S, P) -> list[str]:
  """What the gradient of a scan of pushes, one payload computed per layer, saves: a line per
  residual, its type first (f32[...])."""
  acc_IxRxP, weights_IxRxS, _, probe_RxP = _operands(I, R, S, P)
  x_xD, proj_DxSxC = _payload_inputs(S, P)
  objective = _recomputed_objective(recompute)

  def loss(x_LxxD, proj_LxDxSxC):
    def layer(acc_IxRxP, xs):
      x_xD, proj_DxSxC, slot = xs
      return acc_IxRxP, objective(acc_IxRxP, weights_IxRxS, (x_xD, proj_DxSxC), probe_RxP, slot)
    return jnp.sum(jax.lax.scan(layer, acc_IxRxP, (x_LxxD, proj_LxDxSxC, jnp.arange(I)))[1])

  stacked = (jnp.stack([x_xD] * I), jnp.stack([proj_DxSxC] * I))
  return [line.split()[0] for line in model_checks.saved_residuals(loss, *stacked)]


@pytest.mark.parametrize("I,R,S,P", SHAPES)
def test_recomputed_payload_is_not_saved(I, R, S, P):
  """Under a scan the plain payload is saved once per layer, a `Recomputed` one is not."""
  stacked_payload = f"f32[{','.join(map(str, (I, S, *P)))}]"
  assert stacked_payload in _scan_residuals(False, I, R, S, P)
  assert stacked_payload not in _scan_residuals(True, I, R, S, P)


@pytest.mark.parametrize("I,R,S,P", SHAPES)
@pytest.mark.parametrize("slot", [0, 3])
def test_cpu_forms_equal_the_einsums(I, R, S, P, slot):
  """The CPU's multiply-adds and row-wise cotangents compute what the other platforms' einsums
  do."""
  acc_IxRxP, weights_IxRxS, payload_SxP, probe_RxP = _operands(I, R, S, P)
  np.testing.assert_allclose(push._mixed_by_loop(weights_IxRxS, payload_SxP),
                             push._mixed_by_dot(weights_IxRxS, payload_SxP), rtol=1e-5, atol=1e-5)
  args = (acc_IxRxP, probe_RxP, weights_IxRxS, payload_SxP, jnp.int32(slot))
  for got, expected in zip(push._cotangents_on_rows(*args), push._cotangents(*args)):
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _scanned_push_gradient_hlo(I, R, S, P):
  """The CPU program of the gradient of a scan that pushes into and reads every slot."""
  acc_IxRxP, weights_IxRxS, payload_SxP, _ = _operands(I, R, S, P)
  weights_LxIxRxS = jnp.stack([weights_IxRxS] * I)
  payload_LxSxP = jnp.stack([payload_SxP] * I)

  def loss(weights_LxIxRxS, payload_LxSxP):
    def layer(acc_IxRxP, xs):
      weights_IxRxS, payload_SxP, slot = xs
      acc_IxRxP, read_RxP = push.push_and_read(acc_IxRxP, weights_IxRxS, payload_SxP, slot)
      return acc_IxRxP, jnp.sum(jnp.sin(read_RxP))
    _, reads_L = jax.lax.scan(layer, jnp.zeros_like(acc_IxRxP),
                              (weights_LxIxRxS, payload_LxSxP, jnp.arange(I)))
    return jnp.sum(reads_L)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  return model_checks.compiled_as_users(grad.lower(weights_LxIxRxS, payload_LxSxP)).as_text()


def test_cpu_backward_is_two_dots_and_no_accumulator_copies():
  """On the CPU the backward's products contract one flattened axis each (the einsums'
  multi-axis contractions are the slow form this guards against), and the scanned backward
  never copies the accumulator's cotangent (the nested form copied it on every layer: 4 times
  here, 5 at the bench's shape)."""
  I, R, S, P = SHAPES[0]
  hlo = _scanned_push_gradient_hlo(I, R, S, P)
  contractions = re.findall(r"lhs_contracting_dims=\{([0-9,]*)\}", hlo)
  assert len(contractions) == 2, contractions
  assert all("," not in dims for dims in contractions), contractions
  computations = model_checks.hlo_computations(hlo)
  bodies = [computations[name] for name in re.findall(r"body=%([\w.\-]+)", hlo)]
  assert len(bodies) == 2, "expected the forward's and the backward's loop"
  accumulator_shapes = (f"f32[{','.join(map(str, (I, R, *P)))}]", f"f32[{I * R},{np.prod(P)}]")
  copies = [line for body in bodies for line in body
            if " copy(" in line and any(shape in line for shape in accumulator_shapes)]
  assert not copies, copies
