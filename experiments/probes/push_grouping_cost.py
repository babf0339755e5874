"""Probe (not library code): what the push's data movement costs on this CPU per layer, done
one layer at a time (the library's scanned push) or k layers at once (one product whose
contraction is k*S), isolated from the rest of the step.

One layer's push adds `weights [I*R, S] x kv [S, P]` into the float32 accumulator [I*R, P]
(a read and a write of every live slot), and its backward forms two products over the
accumulator's cotangent (two reads). Grouping k layers' sources reads and writes the slots
once per k layers for the same multiply-adds. Shapes: the bench's at 64 layers in 8 segments,
I*R = 144 rows (36 live slots of 4 heads on average), S = 4, P = B*T*2*Hd = 4*256*2*64.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 JAX_PLATFORMS=cpu python \
        experiments/probes/push_grouping_cost.py

Prints ms per layer for the forward update and the backward products, one layer per call (as
the scan runs them) and k at once. Measured 2026-12-07 (this 2-core AMD EPYC, jax 0.10.2, two
runs): one layer 8.4 / 8.0 ms forward and 7.6 / 7.7 ms backward; k = 2 at once 5.2 / 5.6 and
4.4 / 4.2 ms a layer, k = 4 2.9 / 3.0 and 2.9 / 2.7, k = 8 1.9 / 1.9 and 2.9 / 2.5. At 64
layers the per-layer figures sum to about 1 s a step, more than LIMe's whole extra time there
(0.87 s), so in the step much of the push overlaps other work. The blocked push (README,
"Where LIMe's time goes at 64 layers") is this grouping with k a segment's 8 layers; it gained
3% at 64 layers.
"""

import functools
import time

import jax
import jax.numpy as jnp

ROWS_IR, S, P = 144, 4, 4 * 256 * 2 * 64
CALLS = 20


def _ms_per_call(fn, *args) -> float:
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(CALLS):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / CALLS * 1e3


@jax.jit
def one_layer_update(acc_IRxP, weights_IRxS, kv_SxP):
  """The CPU's per-layer push: S broadcast multiply-adds fused into one pass over the slots."""
  terms = (weights_IRxS[:, s:s + 1] * kv_SxP[s][None] for s in range(S))
  return acc_IRxP + functools.reduce(jnp.add, terms)


@jax.jit
def group_update(acc_IRxP, weights_IRxkS, kv_kSxP):
  return acc_IRxP + weights_IRxkS @ kv_kSxP


@jax.jit
def backward_products(dacc_IRxP, weights_IRxS, kv_SxP):
  """The two products over the accumulator's cotangent, for one layer (S sources) or k (k*S)."""
  return dacc_IRxP @ kv_SxP.T, weights_IRxS.T @ dacc_IRxP


def main() -> None:
  keys = jax.random.split(jax.random.key(0), 3)
  acc_IRxP = jax.random.normal(keys[0], (ROWS_IR, P))
  weights_IRxS = jax.random.normal(keys[1], (ROWS_IR, S))
  kv_SxP = jax.random.normal(keys[2], (S, P))
  forward = _ms_per_call(one_layer_update, acc_IRxP, weights_IRxS, kv_SxP)
  backward = _ms_per_call(backward_products, acc_IRxP, weights_IRxS, kv_SxP)
  print(f"one layer per call: forward {forward:.1f} ms, backward {backward:.1f} ms a layer")
  for k in (2, 4, 8):
    weights_IRxkS = jnp.tile(weights_IRxS, (1, k))
    kv_kSxP = jnp.tile(kv_SxP, (k, 1))
    forward = _ms_per_call(group_update, acc_IRxP, weights_IRxkS, kv_kSxP) / k
    backward = _ms_per_call(backward_products, acc_IRxP, weights_IRxkS, kv_kSxP) / k
    print(f"k = {k} layers at once: forward {forward:.1f} ms, backward {backward:.1f} ms a layer")


if __name__ == "__main__":
  main()
