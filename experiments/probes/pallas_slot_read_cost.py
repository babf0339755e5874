"""Probe (not library code): can a Pallas TPU kernel that reads only the live slots of the kv
pull's buffer be compiled for a TPU topology on a CPU-only machine, and what does the TPU
compiler's `cost_analysis()` count for it?

The kernel is the pull's forward mix in a head-major layout, out[r, n] = sum_{j < live}
sum_s W[j, r, s] buf[j, s, n]: a grid over (token blocks, slots), the slot's block index taken
from a scalar-prefetched live count and clamped, so the dead slots repeat the last live block
(Pallas skips the copy of a block whose index did not change) and skip the product.

    JAX_PLATFORMS=cpu python experiments/probes/pallas_slot_read_cost.py

Prints: the kernel checked against the einsum on the CPU (Pallas interpreter), then the TPU
compiler's cost of the kernel without and with a declared `pl.CostEstimate`, and of XLA's
einsum over the whole buffer. Measured 2026-12-04 (jax 0.10.2, v5p:2x2x1, 16 slots, half live):
the kernel compiled; undeclared its cost is 1024 bytes and no FLOPs (the compiler does not look
inside), declared it is exactly the declaration. So `plan` could state a kernel's bytes only as
its author's arithmetic, not as the compiler's count.
"""

import functools

import jax
import jax.numpy as jnp

from lime_jax.parallel import backends, topology

backends.avoid_absent_tpu()

from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import tpu as pltpu  # noqa: E402

L, S, N, TN = 16, 32, 8192 * 16, 2048  # slots, kv heads, tokens x 2 Hd per device, block


def _kernel(live_ref, w_ref, buf_ref, out_ref, acc_ref):
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(j < live_ref[0])
  def _():
    acc_ref[...] += jnp.dot(w_ref[0], buf_ref[0], preferred_element_type=jnp.float32)

  @pl.when(j == pl.num_programs(1) - 1)
  def _():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def mix(live_1, w_LxRxS, buf_LxSxN, declare: bool, interpret: bool = False, n: int = N):
  live_slot = lambda j, live: jnp.minimum(j, live[0] - 1)  # noqa: E731
  spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(n // TN, L),
      in_specs=[pl.BlockSpec((1, S, S), lambda i, j, live: (live_slot(j, live), 0, 0)),
                pl.BlockSpec((1, S, TN), lambda i, j, live: (live_slot(j, live), 0, i))],
      out_specs=pl.BlockSpec((S, TN), lambda i, j, live: (0, i)),
      scratch_shapes=[pltpu.VMEM((S, TN), jnp.float32)])
  cost = None
  if declare:  # half the slots live: what the block specs copy in, and the output
    cost = pl.CostEstimate(flops=2 * S * S * n * L // 2, transcendentals=0,
                           bytes_accessed=2 * S * n * (L // 2 + 1))
  return pl.pallas_call(_kernel, grid_spec=spec, cost_estimate=cost, interpret=interpret,
                        out_shape=jax.ShapeDtypeStruct((S, n), jnp.bfloat16))(
                            live_1, w_LxRxS, buf_LxSxN)


def check_on_cpu() -> float:
  n = 2 * TN
  keys = jax.random.split(jax.random.key(0), 2)
  w = jax.random.normal(keys[0], (L, S, S), jnp.float32).astype(jnp.bfloat16)
  buf = jax.random.normal(keys[1], (L, S, n), jnp.float32).astype(jnp.bfloat16)
  live = 5
  got = mix(jnp.array([live], jnp.int32), w, buf, declare=False, interpret=True, n=n)
  want = jnp.einsum("jrs,jsn->rn", w[:live], buf[:live], preferred_element_type=jnp.float32)
  return float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.bfloat16).astype(jnp.float32))))


def main() -> None:
  print(f"kernel vs einsum on the CPU (interpreter), max |difference|: {check_on_cpu():.3g}")
  device = topology.tpu_slice("v5p:2x2x1").devices[0]
  one = jax.sharding.SingleDeviceSharding(device)
  args = (jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((L, S, S), jnp.bfloat16),
          jax.ShapeDtypeStruct((L, S, N), jnp.bfloat16))
  def cost(fn):
    compiled = jax.jit(fn, in_shardings=(one,) * 3, out_shardings=one).lower(*args).compile()
    c = compiled.cost_analysis()
    return {k: c.get(k) for k in ("flops", "bytes accessed", "optimal_seconds")}
  print("kernel, no declared cost:", cost(functools.partial(mix, declare=False)))
  print("kernel, declared cost:   ", cost(functools.partial(mix, declare=True)))
  print("XLA einsum, whole buffer:", cost(lambda live, w, b: jnp.einsum(
      "jrs,jsn->rn", w, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16)))
  print("bytes the live half reads and the output:", 2 * S * N * (L // 2 + 1))


if __name__ == "__main__":
  main()
