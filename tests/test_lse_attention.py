"""lse_attention.py: the einsum attention's values and gradients, by query blocks too, with no
[T, S] array saved for the backward."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_checks

from lime_jax.config import ModelConfig
from lime_jax.model import layers, lse_attention
from lime_jax.model import transformer as M


def _inputs(B, T, S, H, R, Hd, dtype=jnp.float32):
  shapes = [(B, T, H, Hd), (B, S, R, Hd), (B, S, R, Hd), (B, T, H, Hd)]
  return [jax.random.normal(key, shape).astype(dtype)
          for key, shape in zip(jax.random.split(jax.random.key(0), 4), shapes)]


def _loss_and_grads(impl, q, k, v, cotangent, q_positions_BxT, k_positions_BxS, blocks=1):
  def loss(q, k, v):
    out = layers.causal_attention(q, k, v, q_positions_BxT, k_positions_BxS, impl, blocks)
    return jnp.sum(cotangent.astype(jnp.float32) * out.astype(jnp.float32))

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("R", [4, 2])  # MHA and GQA
def test_equals_einsum_attention_at_any_positions(R):
  """Decoding-style positions (S != T, some keys in the queries' future), and a row whose
  queries see no key at all (the einsum form's uniform row, in the backward too)."""
  B, T, S, H, Hd = 3, 5, 9, 4, 8
  q, k, v, cotangent = _inputs(B, T, S, H, R, Hd)
  q_positions_BxT = jnp.array([[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [-3, -2, -1, 0, 1]])
  k_positions_BxS = jnp.broadcast_to(jnp.arange(S), (B, S))
  want = _loss_and_grads("einsum", q, k, v, cotangent, q_positions_BxT, k_positions_BxS)
  got = _loss_and_grads("lse_recompute", q, k, v, cotangent, q_positions_BxT, k_positions_BxS)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5), got, want)


@pytest.mark.parametrize("R,T,blocks", [(4, 12, 4), (2, 10, 3), (2, 3, 5)])  # even, uneven, > T
def test_by_query_blocks_equals_einsum_attention(R, T, blocks):
  B, H, Hd = 2, 4, 8
  q, k, v, cotangent = _inputs(B, T, T, H, R, Hd)
  positions_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
  want = _loss_and_grads("einsum", q, k, v, cotangent, positions_BxT, positions_BxT)
  got = _loss_and_grads("lse_recompute", q, k, v, cotangent, positions_BxT, positions_BxT, blocks)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5), got, want)


def test_bfloat16_inputs_keep_their_dtype_and_the_einsum_values():
  B, T, H, R, Hd = 2, 16, 4, 2, 16
  q, k, v, cotangent = _inputs(B, T, T, H, R, Hd, jnp.bfloat16)
  positions_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
  want = _loss_and_grads("einsum", q, k, v, cotangent, positions_BxT, positions_BxT)
  got = _loss_and_grads("lse_recompute", q, k, v, cotangent, positions_BxT, positions_BxT, 2)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype
    np.testing.assert_allclose(np.float32(g), np.float32(w), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("impl,saves_scores", [("einsum", True), ("lse_recompute", False)])
def test_saves_no_query_by_key_array_for_the_backward(impl, saves_scores):
  """The point of the form: its VJP keeps per-query statistics, not [.., T, S] probabilities
  (the einsum form's autodiff does keep them, which is what this check would catch)."""
  B, T, H, R, Hd = 1, 24, 2, 2, 8
  q, k, v, _ = _inputs(B, T, T, H, R, Hd)
  positions_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
  _, backward = jax.vjp(lambda q, k, v: layers.causal_attention(
      q, k, v, positions_BxT, positions_BxT, impl), q, k, v)
  shapes = [leaf.shape for leaf in jax.tree.leaves(backward) if hasattr(leaf, "shape")]
  assert any(s[-2:] == (T, T) for s in shapes) == saves_scores, shapes


@pytest.mark.parametrize("variant", [dict(router="none"), dict(router="kv-static"),
                                     dict(router="kv-static", routing_impl="pull",
                                          remat_policy="dots"),
                                     dict(router="kv-static", scan_layers=False),
                                     dict(router="depth-attention")],
                         ids=["none", "kv-static", "kv-pull-remat", "unrolled", "depth-attention"])
@pytest.mark.parametrize("blocks", [1, 4])
def test_model_trains_as_with_einsum_attention(variant, blocks):
  cfg = ModelConfig(V=32, D=32, L=3, H=4, R=2, F=64, T=12, scan_segments=2,
                    attention_query_blocks=blocks, attention_impl="einsum", **variant)
  params = M.init_params(cfg, jax.random.key(0))
  tokens_BxT = model_checks.tokens(cfg, T=12)

  model_checks.assert_same_loss_and_grads(cfg, cfg.replace(attention_impl="lse_recompute"), params,
                                         tokens_BxT)


def test_blocked_backward_adds_no_copy_of_the_push_accumulator():
  """The blocks' key gradients are joined by key ranges: as in-place adds into a zero buffer,
  XLA:CPU fused them into the push's accumulator update and copied the whole accumulator in
  the backward's loops (8 copies here against the einsum attention's 2; at 64 layers on the
  bench, LIMe's step 5.26 s against 5.00 s)."""
  cfg = ModelConfig(V=64, D=64, L=8, H=4, R=4, F=128, T=32, scan_segments=2,
                    attention_query_blocks=4, attention_impl="einsum")
  B = 2  # model_checks.lowered_gradient's rows
  accumulator_copy = re.compile(rf"= f32\[\d+,{cfg.R},{B},{cfg.T},2,{cfg.Hd}\]\{{[\d,]+\}} copy\(")

  def accumulator_copies(c):
    compiled = model_checks.compiled_as_users(model_checks.lowered_gradient(c, B=B))
    return len(accumulator_copy.findall(compiled.as_text()))

  assert accumulator_copies(cfg.replace(attention_impl="lse_recompute")) <= accumulator_copies(cfg)


@pytest.mark.parametrize("T,blocks", [(16, 1), (64, 1), (127, 1), (128, 2), (200, 3), (256, 4),
                                      (2048, 4)])
def test_cpu_query_blocks_hold_at_least_64_queries_and_are_at_most_4(T, blocks):
  assert lse_attention.cpu_query_blocks(T) == blocks


def test_blocks_by_platform_are_the_cpus_blocks_on_the_cpu():
  """None runs lse_attention.cpu_query_blocks(T) blocks on the CPU: the same program and values
  as asking for them; one block where the keys are not the queries' own sequence."""
  B, T, H, R, Hd = 2, 128, 4, 2, 8
  q, k, v, cotangent = _inputs(B, T, T, H, R, Hd)
  positions_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
  by_platform = _loss_and_grads("lse_recompute", q, k, v, cotangent, positions_BxT,
                                positions_BxT, None)
  jax.tree.map(np.testing.assert_array_equal, by_platform,
               _loss_and_grads("lse_recompute", q, k, v, cotangent, positions_BxT,
                               positions_BxT, 2))
  q_short = q[:, :T // 2]
  jax.tree.map(np.testing.assert_array_equal,
               _loss_and_grads("lse_recompute", q_short, k, v, cotangent[:, :T // 2],
                               positions_BxT[:, :T // 2] + T // 2, positions_BxT, None),
               _loss_and_grads("lse_recompute", q_short, k, v, cotangent[:, :T // 2],
                               positions_BxT[:, :T // 2] + T // 2, positions_BxT, 1))


@pytest.mark.parametrize("impl", ["einsum", "dot_product"])
def test_blocks_by_platform_are_one_block_with_the_other_impls(impl):
  B, T, H, R, Hd = 1, 128, 2, 2, 8
  q, k, v, cotangent = _inputs(B, T, T, H, R, Hd)
  positions_BxT = jnp.arange(T)[None]
  jax.tree.map(np.testing.assert_array_equal,
               _loss_and_grads(impl, q, k, v, cotangent, positions_BxT, positions_BxT, None),
               _loss_and_grads(impl, q, k, v, cotangent, positions_BxT, positions_BxT, 1))


def _query_tiles(platform: str, blocks) -> set[str]:
  """The [.., Tb, Sb] logits tiles of the attention's gradient, lowered for `platform` (no
  device of it needed): 'AxB' strings of the last two dims of its float32 rank-5 tensors."""
  B, T, H, R, Hd = 1, 128, 2, 2, 8
  q, k, v, cotangent = _inputs(B, T, T, H, R, Hd)
  positions_BxT = jnp.arange(T)[None]

  def loss(q, k, v):
    out = layers.causal_attention(q, k, v, positions_BxT, positions_BxT, "lse_recompute", blocks)
    return jnp.sum(cotangent * out)

  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v).lower(
      lowering_platforms=(platform,)).as_text()
  return set(re.findall(r"tensor<1x2x1x(\d+x\d+)xf32>", text))


def test_blocks_by_platform_compile_one_block_for_accelerators():
  """Decided when the step is lowered: a TPU or GPU program, also one lowered on a CPU host
  (plan --topology), holds only the whole [T, S] logits; a CPU program only the blocks'."""
  one_block, two_blocks = _query_tiles("cpu", 1), _query_tiles("cpu", 2)
  assert "128x128" in one_block and "64x128" not in one_block
  assert {"64x64", "64x128"} <= two_blocks and "128x128" not in two_blocks
  assert _query_tiles("cpu", None) == two_blocks
  for accelerator in ("tpu", "cuda"):
    assert _query_tiles(accelerator, None) == _query_tiles(accelerator, 1) == one_block
