"""projection.py: the weight projection's values and gradients are einsum's, and its backward
forms the weight's gradient in the weight's axis order, with no transpose."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lime_jax.model.projection import contract, project

# The model's projections: MLP gate and up, query, output, kv (kv's axes not in letter order).
SPECS = {"btd,dkf->btkf": ((2, 6, 8), (8, 2, 12)),
         "btd,dhk->bthk": ((2, 6, 8), (8, 4, 3)),
         "bthk,hkd->btd": ((2, 6, 4, 3), (4, 3, 8)),
         "btd,drck->btrck": ((2, 6, 8), (8, 3, 2, 5))}


def _operands(spec, dtype=jnp.float32):
  x_shape, w_shape = SPECS[spec]
  kx, kw = jax.random.split(jax.random.key(0))
  return (jax.random.normal(kx, x_shape).astype(dtype),
          jax.random.normal(kw, w_shape).astype(dtype))


@pytest.mark.parametrize("spec", list(SPECS))
def test_values_and_gradients_equal_einsums(spec):
  x, w = _operands(spec)
  cotangent = jax.random.normal(jax.random.key(2), jnp.einsum(spec, x, w).shape)

  def loss(fn):
    return lambda x, w: jnp.sum(cotangent * fn(x, w))

  np.testing.assert_array_equal(project(spec, x, w), jnp.einsum(spec, x, w))
  got = jax.grad(loss(lambda x, w: project(spec, x, w)), argnums=(0, 1))(x, w)
  want = jax.grad(loss(lambda x, w: jnp.einsum(spec, x, w)), argnums=(0, 1))(x, w)
  for g, ref in zip(got, want):
    assert g.shape == ref.shape and g.dtype == ref.dtype
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5)


def test_bfloat16_gradients_keep_the_dtype():
  spec = "btd,dkf->btkf"
  x, w = _operands(spec, jnp.bfloat16)
  dx, dw = jax.grad(lambda x, w: jnp.sum(project(spec, x, w).astype(jnp.float32)),
                    argnums=(0, 1))(x, w)
  assert dx.dtype == dw.dtype == jnp.bfloat16


def _lowered_grad(fn, platform, *args) -> list[str]:
  """The products and transposes of fn's sum's gradient lowered for `platform` (no device of
  it needed), as StableHLO lines without value names, sorted."""
  grad = jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=tuple(range(len(args))))
  text = jax.jit(grad).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  return sorted(re.sub(r"%[\w#]+", "%", line.strip()) for line in text.splitlines()
                if "stablehlo.dot_general" in line or "stablehlo.transpose" in line)


@pytest.mark.parametrize("spec", list(SPECS))
def test_cpu_backward_has_no_transpose_and_accelerators_keep_autodiffs(spec):
  """On the CPU no transpose: autodiff forms dw in the cotangent's axis order and transposes
  it (einsum also orders contracting axes by letter, which transposes kv's). A TPU or GPU
  program, lowered on this host, holds autodiff's backward."""
  x, w = _operands(spec)
  project_grad = functools.partial(_lowered_grad, lambda x, w: project(spec, x, w))
  einsum_grad = functools.partial(_lowered_grad, lambda x, w: jnp.einsum(spec, x, w))

  def transposes(lines):
    return [line for line in lines if "stablehlo.transpose" in line]

  assert not transposes(project_grad("cpu", x, w))
  for accelerator in ("tpu", "cuda"):
    assert project_grad(accelerator, x, w) == einsum_grad(accelerator, x, w)
  if spec != "bthk,hkd->btd":  # the check can fail: autodiff's form transposes
    assert transposes(einsum_grad("cpu", x, w))


def test_contract_orders_contracting_axes_as_the_first_operand():
  a = jax.random.normal(jax.random.key(0), (6, 3, 2, 5))
  b = jax.random.normal(jax.random.key(1), (7, 3, 2, 5))
  got = contract(a, "trck", b, "drck", "td")
  np.testing.assert_allclose(got, jnp.einsum("trck,drck->td", a, b), rtol=1e-5, atol=1e-5)
  (dot,) = [e for e in jax.make_jaxpr(lambda a, b: contract(a, "trck", b, "drck", "td"))(
      a, b).eqns if str(e.primitive) == "dot_general"]
  assert dot.params["dimension_numbers"][0] == ((1, 2, 3), (1, 2, 3))


def test_a_spec_with_a_batch_or_summed_axis_is_refused():
  x, w = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
  for run in (project, jax.grad(lambda spec, x, w: jnp.sum(project(spec, x, w)), argnums=1)):
    with pytest.raises(ValueError, match="axis 'b'.*exactly two"):
      run("btd,bdf->btf", x, w)
