"""Probe (not library code): what the pull's three products over its buffer cost on this CPU,
with the buffer as the library keeps it ([L, R, B, T, 2, Hd], heads next to slots: kv_pull's
own products, the buffer the operand that the dot takes as it lies) and as it kept it before
2026-12-07 ([L, B, T, R, 2, Hd], the layers' kv stacked, read by einsums, written here as the
library wrote them).

The products of a layer, over all L slots (one read group): the mix sum_{j, s} W[r, j, s]
kv_j[s] (forward), the readers' pull sum_{i, r} W[i, r, s] dr_i[r] (backward) and the router
row <dr[r], kv_j[s]> (backward). Shapes: the CPU bench's at 64 layers, B 4, T 256, R 4, Hd 64,
float32 (the buffer 128 MiB).

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 JAX_PLATFORMS=cpu python \
        experiments/probes/pull_buffer_order_cost.py

Prints ms per product, median of 7 calls, for each order, and the largest difference between
the two orders' results (the router row sums 131072 products of unit normals: 1e-3 is float32
rounding). Measured 2026-12-07 (this 2-core machine, jax 0.10.2, two runs, the stacked order
then kv_pull's own functions): the mix 46.3 / 42.0 -> 8.6 / 8.7 ms, the readers' pull 51.3 /
50.0 -> 9.8 / 10.7 ms, the router row 68.6 / 55.3 -> 7.5 / 6.1 ms; a third run, once the
order was adopted: 39.9 -> 8.6, 42.5 -> 10.4, 59.1 -> 6.0 ms. As [L, B, T, R, 2, Hd] XLA:CPU
copies the whole buffer into [B, T, 2, Hd, L, R] before each one.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from lime_jax.model import kv_pull

L, B, T, R, HD = 64, 4, 256, 4, 64
WHOLE = kv_pull.read_groups([(0, L)], L)[0]  # one read group: every product reads all L slots


def median_ms(fn, *args, calls: int = 7) -> float:
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def mix_stacked(W_RxLxR, buf_LxBxTxRx2xHd):
  return jnp.einsum("rjs,jbtscd->btrcd", W_RxLxR, buf_LxBxTxRx2xHd,
                    preferred_element_type=jnp.float32)


def mix_heads_next(W_RxLxR, buf_LxRxBxTx2xHd):
  mix = kv_pull._mix_sources(WHOLE, may_start_uninitialized=False, own_written=True)
  return mix(W_RxLxR, buf_LxRxBxTx2xHd, L - 1)


def pull_stacked(W_LxRxR, dr_LxBxTxRx2xHd):
  return jnp.einsum("irs,ibtrcd->btscd", W_LxRxR, dr_LxBxTxRx2xHd,
                    preferred_element_type=jnp.float32)


def pull_heads_next(W_LxRxR, dr_LxRxBxTx2xHd):
  return kv_pull._cotangent_from_readers(WHOLE)(W_LxRxR, dr_LxRxBxTx2xHd)


def row_stacked(dr_BxTxRx2xHd, buf_LxBxTxRx2xHd):
  return jnp.einsum("btrcd,jbtscd->rjs", dr_BxTxRx2xHd, buf_LxBxTxRx2xHd,
                    preferred_element_type=jnp.float32)


def row_heads_next(dr_BxTxRx2xHd, buf_LxRxBxTx2xHd):
  return kv_pull._router_row_gradient(WHOLE)(dr_BxTxRx2xHd, buf_LxRxBxTx2xHd)


def main():
  keys = jax.random.split(jax.random.key(0), 4)
  buf_LxBxTxRx2xHd = jax.random.normal(keys[0], (L, B, T, R, 2, HD))
  buf_LxRxBxTx2xHd = jnp.moveaxis(buf_LxBxTxRx2xHd, 3, 1)
  W_RxLxR = jax.random.normal(keys[1], (R, L, R))
  W_LxRxR = jax.random.normal(keys[2], (L, R, R))
  dr_BxTxRx2xHd = jax.random.normal(keys[3], (B, T, R, 2, HD))
  cases = {
      "mix": (mix_stacked, mix_heads_next, W_RxLxR),
      "readers' pull": (pull_stacked, pull_heads_next, W_LxRxR),
      "router row": (row_stacked, row_heads_next, dr_BxTxRx2xHd),
  }
  for name, (stacked, heads_next, small) in cases.items():
    difference = float(jnp.abs(stacked(small, buf_LxBxTxRx2xHd)
                               - heads_next(small, buf_LxRxBxTx2xHd)).max())
    print(f"{name}: [L, B, T, R, 2, Hd] {median_ms(stacked, small, buf_LxBxTxRx2xHd):.1f} ms, "
          f"[L, R, B, T, 2, Hd] {median_ms(heads_next, small, buf_LxRxBxTx2xHd):.1f} ms "
          f"(largest difference {difference:.1e})")


if __name__ == "__main__":
  main()
