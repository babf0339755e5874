"""A weight projection whose backward, on the CPU, forms the weight's gradient in the weight's
own axis order.

Autodiff of `einsum("btd,dkf->btkf", x, w)` forms dw as `einsum(g, x)` in g's axis order,
[k, f, d], then transposes it to w's [d, k, f]. XLA:CPU's matrix kernels take operands only in
row-major canonical form, so that costs a transposed copy of g (the larger side: [B*T, 2F] for
the MLP's gate and up) and a transposed write of the result into the scan's gradient stack;
contracting x with g in w's order needs only x transposed (to [D, B*T]). Same products, same
math (README, "Backward layouts for the CPU"). Where XLA compiles for a TPU or GPU the backward
is autodiff's (jax.lax.platform_dependent, decided when the step is lowered): those compilers
assign their own layouts, and the TPU compiler's deep LIMe step read 0.6% more bytes with the
CPU's form.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def project(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
  """`jnp.einsum(spec, x, w)` for an activation x and a weight w ("btd,dkf->btkf"): every axis
  in exactly two of x, w and the output, none in all three."""
  return _checked_einsum(spec, x, w)


def _checked_einsum(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
  """The projection itself, for `project` and its forward rule alike; a plain function, since
  the forward rule calling `project` nests the custom VJP, which changes what
  `remat_policy: dots` saves (473cbf8)."""
  _axes(spec)
  return jnp.einsum(spec, x, w)


def _axes(spec: str) -> tuple[str, str, str]:
  operands, out_axes = spec.split("->")
  x_axes, w_axes = operands.split(",")
  for axis in set(spec) - set(",->"):
    if (axis in x_axes) + (axis in w_axes) + (axis in out_axes) != 2:
      raise ValueError(f"projection.project: axis {axis!r} of {spec!r} must appear in exactly"
                       " two of the activation, the weight and the output")
  return x_axes, w_axes, out_axes


def contract(a: jax.Array, a_axes: str, b: jax.Array, b_axes: str, out_axes: str) -> jax.Array:
  """`einsum(f"{a_axes},{b_axes}->{out_axes}", a, b)` (no batch axes) as one product whose
  contracting dimensions run in a's axis order; einsum sorts them by letter, which can ask for
  transposed copies of both operands where none is needed."""
  contracting = [axis for axis in a_axes if axis in b_axes]
  dims = (([a_axes.index(axis) for axis in contracting],
           [b_axes.index(axis) for axis in contracting]), ((), ()))
  product = jax.lax.dot_general(a, b, dims)
  product_axes = ([axis for axis in a_axes if axis not in b_axes]
                  + [axis for axis in b_axes if axis not in a_axes])
  order = tuple(product_axes.index(axis) for axis in out_axes)
  return product if order == tuple(range(len(order))) else jnp.transpose(product, order)


def _project_forward(spec: str, x: jax.Array, w: jax.Array):
  return _checked_einsum(spec, x, w), (x, w)


def _project_backward(spec: str, residuals, g: jax.Array):
  x, w = residuals
  x_axes, w_axes, out_axes = _axes(spec)

  def weight_order(x, w, g):
    return contract(g, out_axes, w, w_axes, x_axes), contract(x, x_axes, g, out_axes, w_axes)

  def autodiff(x, w, g):
    return jax.vjp(functools.partial(jnp.einsum, spec), x, w)[1](g)

  return jax.lax.platform_dependent(x, w, g, cpu=weight_order, default=autodiff)


project.defvjp(_project_forward, _project_backward)
