"""Causal GQA attention with a hand-written backward that saves each query's log-sum-exp, not the
probabilities (`attention_impl: lse_recompute`).

Autodiff of the masked softmax attention (layers.causal_attention's einsum form) saves the float32
probabilities [B, R, G, T, S] of every layer and runs its backward as several passes over them.
This form saves the output and each query's log-sum-exp, as its two float32 parts (the row's
maximum and its sum of exponentials, so that a row with no visible key recomputes as the einsum
form's uniform row), and the backward recomputes the probabilities from the logits: one more
[T, S] product per layer and far fewer bytes, which is where XLA:CPU's attention time went
(README, "Attention with a saved log-sum-exp"). The math is the einsum form's: float32 logits,
the same mask, float32 softmax statistics; the forward's output is normalized after the value
product (the exponentials cast to the value dtype for it), and results agree with the einsum
form to float32 rounding.

`query_blocks` > 1 runs the queries in that many contiguous blocks, each against the keys up to
the block's end only, forward and backward: exact only where both sides hold the sequence's own
positions in order (layers.causal_attention checks S == T; transformer.py refuses given
positions), since the keys past a block's end then lie in every one of its queries' future.
`query_blocks=None` blocks by platform: `cpu_query_blocks(T)` where XLA compiles for the CPU,
one block elsewhere (jax.lax.platform_dependent, decided when the step is lowered, so a TPU
program compiled on a CPU host gets one block); with given positions the layer stack passes 1.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp


# Where XLA compiles for the CPU, blocks of at least this many queries, at most this many blocks.
# At the bench's T = 256, attention's forward and backward over 16 layers took 0.62x the time
# with 4 blocks (README, "Query blocks on the CPU by default"); blocks of fewer queries add more
# ops than the masked scores they skip.
CPU_QUERY_BLOCK_MIN = 64
CPU_QUERY_BLOCKS_MAX = 4


def cpu_query_blocks(T: int) -> int:
  """The query blocks `query_blocks=None` runs `T` queries in on the CPU."""
  return max(1, min(CPU_QUERY_BLOCKS_MAX, T // CPU_QUERY_BLOCK_MIN))


def lse_attention(q_BxTxHxHd: jax.Array, k_BxSxRxHd: jax.Array, v_BxSxRxHd: jax.Array,
                  q_positions_BxT: jax.Array, k_positions_BxS: jax.Array,
                  query_blocks: int | None = 1) -> jax.Array:
  """out[b, t, h] = softmax over visible s of q.k / sqrt(Hd), times v; key s visible to query t
  iff k_position <= q_position. Returns [B, T, H, Hd] in the value dtype. `query_blocks`: see
  the module doc; None needs the same positions in order as blocks do (or S != T: one block)."""
  return _attention(q_BxTxHxHd, k_BxSxRxHd, v_BxSxRxHd, q_positions_BxT, k_positions_BxS,
                    query_blocks)


def query_block_bounds(T: int, blocks: int) -> list[tuple[int, int]]:
  """(start, end) of each of `blocks` contiguous query blocks of near-equal size (also the
  einsum form's blocks, layers.causal_attention)."""
  ends = [round(T * (b + 1) / blocks) for b in range(blocks)]
  return list(zip([0] + ends[:-1], ends))


def _block_bounds(T: int, S: int, blocks: int) -> list[tuple[int, int, int]]:
  """(query start, query end, key end) of each block; one block reads every key."""
  if blocks == 1:
    return [(0, T, S)]
  return [(start, end, end) for start, end in query_block_bounds(T, blocks)]


def _heads_major(q_BxTxHxHd: jax.Array, R: int) -> jax.Array:
  B, T, H, Hd = q_BxTxHxHd.shape
  return q_BxTxHxHd.reshape(B, T, R, H // R, Hd).transpose(0, 2, 3, 1, 4)


def _tokens_major(x_BxRxGxTxHd: jax.Array) -> jax.Array:
  B, R, G, T, Hd = x_BxRxGxTxHd.shape
  return x_BxRxGxTxHd.transpose(0, 3, 1, 2, 4).reshape(B, T, R * G, Hd)


def _join_blocks(blocks_BxRxGxTbxN: list[jax.Array]) -> jax.Array:
  """The query blocks' parts, joined along the query axis."""
  if len(blocks_BxRxGxTbxN) == 1:
    return blocks_BxRxGxTbxN[0]
  return jnp.concatenate(blocks_BxRxGxTbxN, axis=3)


def _masked_logits(q_BxRxGxTbxHd, k_BxRxSbxHd, q_positions_BxTb, k_positions_BxSb):
  """float32 logits of one block, invisible keys at float32's minimum (as the einsum form), and
  which keys are visible, [B, 1, 1, Tb, Sb]."""
  Hd = q_BxRxGxTbxHd.shape[-1]
  logits_BxRxGxTbxSb = jnp.einsum("brgtd,brsd->brgts", q_BxRxGxTbxHd, k_BxRxSbxHd,
                                  preferred_element_type=jnp.float32)
  logits_BxRxGxTbxSb = logits_BxRxGxTbxSb / jnp.sqrt(Hd).astype(jnp.float32)
  visible_BxTbxSb = k_positions_BxSb[:, None, :] <= q_positions_BxTb[:, :, None]
  visible_Bx1x1xTbxSb = visible_BxTbxSb[:, None, None]
  return (jnp.where(visible_Bx1x1xTbxSb, logits_BxRxGxTbxSb, jnp.finfo(jnp.float32).min),
          visible_Bx1x1xTbxSb)


def _by_platform(query_blocks: int | None, T: int, S: int, run: Callable, *args):
  """`run(blocks, *args)` with `query_blocks`, or for None with the platform's blocks: only the
  branch of the platform the step is lowered for is compiled. Used inside the custom VJP's
  forward and backward rules, so autodiff never sees the branches (each has its own residuals
  otherwise)."""
  if query_blocks is not None:
    return run(query_blocks, *args)
  cpu_blocks = cpu_query_blocks(T) if S == T else 1
  if cpu_blocks == 1:
    return run(1, *args)
  return jax.lax.platform_dependent(*args, cpu=functools.partial(run, cpu_blocks),
                                    default=functools.partial(run, 1))


def _forward(q_BxTxHxHd, k_BxSxRxHd, v_BxSxRxHd, q_positions_BxT, k_positions_BxS, query_blocks):
  return _by_platform(query_blocks, q_BxTxHxHd.shape[1], k_BxSxRxHd.shape[1], _forward_blocks,
                      q_BxTxHxHd, k_BxSxRxHd, v_BxSxRxHd, q_positions_BxT, k_positions_BxS)


def _forward_blocks(query_blocks, q_BxTxHxHd, k_BxSxRxHd, v_BxSxRxHd, q_positions_BxT,
                    k_positions_BxS):
  T, S, R = q_BxTxHxHd.shape[1], k_BxSxRxHd.shape[1], k_BxSxRxHd.shape[2]
  q_BxRxGxTxHd = _heads_major(q_BxTxHxHd, R)
  k_BxRxSxHd = k_BxSxRxHd.transpose(0, 2, 1, 3)
  v_BxRxSxHd = v_BxSxRxHd.transpose(0, 2, 1, 3)
  outs, maxes, sums = [], [], []  # per query block
  for start, end, key_end in _block_bounds(T, S, query_blocks):
    logits_BxRxGxTbxSb, _ = _masked_logits(
        q_BxRxGxTxHd[:, :, :, start:end], k_BxRxSxHd[:, :, :key_end],
        q_positions_BxT[:, start:end], k_positions_BxS[:, :key_end])
    max_BxRxGxTbx1 = jnp.max(logits_BxRxGxTbxSb, axis=-1, keepdims=True)
    exp_BxRxGxTbxSb = jnp.exp(logits_BxRxGxTbxSb - max_BxRxGxTbx1)
    sum_BxRxGxTbx1 = jnp.sum(exp_BxRxGxTbxSb, axis=-1, keepdims=True)
    # Normalized after the value product, so the exponentials have one [T, S] consumer each
    # (the sum and the product) and need not be written out between them.
    unnormalized_BxRxGxTbxHd = jnp.einsum(
        "brgts,brsd->brgtd", exp_BxRxGxTbxSb.astype(v_BxSxRxHd.dtype),
        v_BxRxSxHd[:, :, :key_end], preferred_element_type=jnp.float32)
    outs.append((unnormalized_BxRxGxTbxHd / sum_BxRxGxTbx1).astype(v_BxSxRxHd.dtype))
    maxes.append(max_BxRxGxTbx1)
    sums.append(sum_BxRxGxTbx1)
  out_BxRxGxTxHd = _join_blocks(outs)
  residuals = (q_BxRxGxTxHd, k_BxRxSxHd, v_BxRxSxHd, out_BxRxGxTxHd, _join_blocks(maxes),
               _join_blocks(sums), q_positions_BxT, k_positions_BxS)
  return _tokens_major(out_BxRxGxTxHd), residuals


def _sum_over_query_blocks(per_block_BxRxSbxHd: list[jax.Array], bounds) -> jax.Array:
  """[B, R, S, Hd]: key s's gradient summed over the query blocks that read it (block b reads
  keys below its key end). Built by key ranges and joined, not by in-place adds into a zero
  buffer: on XLA:CPU those adds fused into the push's accumulator update and cost it copies
  of its whole accumulator (README, "Attention with a saved log-sum-exp")."""
  if len(per_block_BxRxSbxHd) == 1:
    return per_block_BxRxSbxHd[0]
  key_starts = [0] + [key_end for _, _, key_end in bounds[:-1]]
  pieces = []
  for key_start, (_, _, key_end) in zip(key_starts, bounds):
    readers = [grad[:, :, key_start:key_end] for grad, (_, _, block_key_end)
               in zip(per_block_BxRxSbxHd, bounds) if block_key_end >= key_end]
    pieces.append(functools.reduce(jnp.add, readers))
  return jnp.concatenate(pieces, axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q_BxTxHxHd, k_BxSxRxHd, v_BxSxRxHd, q_positions_BxT, k_positions_BxS,
               query_blocks):
  return _forward(q_BxTxHxHd, k_BxSxRxHd, v_BxSxRxHd, q_positions_BxT, k_positions_BxS,
                  query_blocks)[0]


def _backward(query_blocks, residuals, dout_BxTxHxHd):
  q_BxRxGxTxHd, k_BxRxSxHd = residuals[:2]
  dq, dk, dv = _by_platform(query_blocks, q_BxRxGxTxHd.shape[3], k_BxRxSxHd.shape[2],
                            _backward_blocks, residuals, dout_BxTxHxHd)
  return dq, dk, dv, None, None


def _backward_blocks(query_blocks, residuals, dout_BxTxHxHd):
  """The softmax's VJP, the probabilities recomputed in float32 from the saved max and sum:
  dlogits = p * (dp - sum_s p dp), where sum_s p dp = dout . out (a row sum, no [T, S] pass)."""
  (q_BxRxGxTxHd, k_BxRxSxHd, v_BxRxSxHd, out_BxRxGxTxHd, max_BxRxGxTx1, sum_BxRxGxTx1,
   q_positions_BxT, k_positions_BxS) = residuals
  T, S, Hd = q_BxRxGxTxHd.shape[3], k_BxRxSxHd.shape[2], q_BxRxGxTxHd.shape[4]
  R = k_BxRxSxHd.shape[1]
  dout_BxRxGxTxHd = _heads_major(dout_BxTxHxHd, R)
  dot_BxRxGxTx1 = jnp.sum(dout_BxRxGxTxHd.astype(jnp.float32)
                          * out_BxRxGxTxHd.astype(jnp.float32), axis=-1, keepdims=True)
  bounds = _block_bounds(T, S, query_blocks)
  dqs, dks, dvs = [], [], []  # per query block
  for start, end, key_end in bounds:
    q_BxRxGxTbxHd = q_BxRxGxTxHd[:, :, :, start:end]
    dout_BxRxGxTbxHd = dout_BxRxGxTxHd[:, :, :, start:end]
    k_BxRxSbxHd, v_BxRxSbxHd = k_BxRxSxHd[:, :, :key_end], v_BxRxSxHd[:, :, :key_end]
    logits_BxRxGxTbxSb, visible_Bx1x1xTbxSb = _masked_logits(
        q_BxRxGxTbxHd, k_BxRxSbxHd, q_positions_BxT[:, start:end], k_positions_BxS[:, :key_end])
    probs_BxRxGxTbxSb = (jnp.exp(logits_BxRxGxTbxSb - max_BxRxGxTx1[:, :, :, start:end])
                         / sum_BxRxGxTx1[:, :, :, start:end])
    dvs.append(jnp.einsum("brgts,brgtd->brsd", probs_BxRxGxTbxSb.astype(v_BxRxSbxHd.dtype),
                          dout_BxRxGxTbxHd, preferred_element_type=jnp.float32))
    dprobs_BxRxGxTbxSb = jnp.einsum("brgtd,brsd->brgts", dout_BxRxGxTbxHd, v_BxRxSbxHd,
                                    preferred_element_type=jnp.float32)
    # The mask passes no gradient to q or k (a row with no visible key has nonzero probs).
    dscores_BxRxGxTbxSb = jnp.where(
        visible_Bx1x1xTbxSb,
        probs_BxRxGxTbxSb * (dprobs_BxRxGxTbxSb - dot_BxRxGxTx1[:, :, :, start:end]), 0.0)
    dlogits_BxRxGxTbxSb = dscores_BxRxGxTbxSb / jnp.sqrt(Hd).astype(jnp.float32)
    dqs.append(jnp.einsum("brgts,brsd->brgtd", dlogits_BxRxGxTbxSb.astype(k_BxRxSbxHd.dtype),
                          k_BxRxSbxHd, preferred_element_type=jnp.float32))
    dks.append(jnp.einsum("brgts,brgtd->brsd", dlogits_BxRxGxTbxSb.astype(q_BxRxGxTbxHd.dtype),
                          q_BxRxGxTbxHd, preferred_element_type=jnp.float32))
  dq = _tokens_major(_join_blocks(dqs)).astype(q_BxRxGxTxHd.dtype)
  dk = _sum_over_query_blocks(dks, bounds).transpose(0, 2, 1, 3).astype(k_BxRxSxHd.dtype)
  dv = _sum_over_query_blocks(dvs, bounds).transpose(0, 2, 1, 3).astype(v_BxRxSxHd.dtype)
  return dq, dk, dv


_attention.defvjp(_forward, _backward)
