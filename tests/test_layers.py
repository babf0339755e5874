"""layers.py: the fused attention option and attention by query blocks compute what our einsum
attention computes; remat recomputes in straight-line code too; the MLP saves no activation."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_checks

from lime_jax.inference import decode
from lime_jax.model import layers
from lime_jax.model import transformer as M
from lime_jax.config import ModelConfig


@pytest.mark.parametrize("R", [4, 2])  # MHA and GQA
def test_dot_product_attention_equals_einsum_attention(R):
  B, T, S, H, Hd = 2, 5, 9, 4, 8
  q, k, v = (jax.random.normal(key, shape) for key, shape in zip(
      jax.random.split(jax.random.key(0), 3), [(B, T, H, Hd), (B, S, R, Hd), (B, S, R, Hd)]))
  # Decoding-style positions: row 1's queries sit later, and some keys lie in their future.
  q_positions_BxT = jnp.array([[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]])
  k_positions_BxS = jnp.broadcast_to(jnp.arange(S), (B, S))
  want = layers.causal_attention(q, k, v, q_positions_BxT, k_positions_BxS)
  got = layers.causal_attention(q, k, v, q_positions_BxT, k_positions_BxS, "dot_product")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # A query must not see keys after it: changing a future key changes nothing.
  k_future = k.at[0, 6].set(100.0)
  np.testing.assert_allclose(
      layers.causal_attention(q, k_future, v, q_positions_BxT, k_positions_BxS, "dot_product")[0],
      got[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["dot_product", "lse_recompute"])
def test_model_logits_do_not_depend_on_the_attention_impl(impl):
  cfg = ModelConfig(V=32, D=32, L=2, H=4, R=2, F=64, T=8, scan_segments=2,
                    attention_impl="einsum")
  params = M.init_params(cfg, jax.random.key(0))
  tokens_BxT = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.V)
  logits = lambda c: M.Transformer(c).apply({"params": params}, tokens_BxT)
  np.testing.assert_allclose(logits(cfg.replace(attention_impl=impl)), logits(cfg),
                             rtol=1e-5, atol=1e-5)


def test_the_default_attention_saves_no_probabilities_and_blocks_by_platform():
  cfg = ModelConfig()
  assert (cfg.attention_impl, cfg.attention_query_blocks) == ("lse_recompute", None)


def test_blocks_by_platform_train_as_the_cpus_blocks_and_take_given_positions_in_one():
  """`attention_query_blocks: null` on the CPU: at T = 128 the program of 2 blocks (their
  [64, 128] logits tiles) and exactly its loss and gradients; with given positions, which
  blocks would refuse, exactly the logits of one block."""
  cfg = ModelConfig(V=32, D=32, L=2, H=4, R=2, F=64, T=128, router="kv-static",
                    scan_segments=1)
  assert re.search(r"x64x128xf32>", model_checks.lowered_gradient(cfg).as_text())
  params = M.init_params(cfg, jax.random.key(0))
  tokens_BxT = model_checks.tokens(cfg, T=129)  # 128 inputs
  model_checks.assert_same_loss_and_grads(cfg, cfg.replace(attention_query_blocks=2), params,
                                          tokens_BxT, rtol=0, atol=0)
  positions_BxT = jnp.broadcast_to(jnp.arange(128)[::-1], (2, 128))  # not in order
  logits = lambda c: M.Transformer(c).apply({"params": params}, tokens_BxT[:, 1:], positions_BxT)
  np.testing.assert_array_equal(logits(cfg), logits(cfg.replace(attention_query_blocks=1)))


def test_unknown_attention_impl_is_a_one_line_error():
  with pytest.raises(ValueError, match="attention_impl: unknown 'flash'"):
    ModelConfig(attention_impl="flash")


@pytest.mark.parametrize("impl", ["einsum", "dot_product"])
@pytest.mark.parametrize("R,T,blocks", [(4, 12, 4), (2, 10, 3), (2, 3, 5)])  # even, uneven, > T
def test_attention_by_query_blocks_equals_the_masked_whole(impl, R, T, blocks):
  B, H, Hd = 2, 4, 8
  q, k, v, cotangent = (jax.random.normal(key, shape) for key, shape in zip(
      jax.random.split(jax.random.key(0), 4),
      [(B, T, H, Hd), (B, T, R, Hd), (B, T, R, Hd), (B, T, H, Hd)]))
  positions_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))

  def loss_and_grads(query_blocks):
    loss = lambda q, k, v: jnp.sum(cotangent * layers.causal_attention(  # noqa: E731
        q, k, v, positions_BxT, positions_BxT, impl, query_blocks))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

  want, got = loss_and_grads(1), loss_and_grads(blocks)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5), got, want)


def test_attention_by_query_blocks_skips_the_masked_scores():
  """The point of the blocks: fewer score FLOPs (4 blocks compute 5/8 of the T x T scores)."""
  B, T, H, Hd = 1, 64, 2, 16
  q, k, v = (jnp.zeros((B, T, H, Hd)) for _ in range(3))
  positions_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))

  def score_flops(query_blocks):
    attend = lambda q, k, v: layers.causal_attention(  # noqa: E731
        q, k, v, positions_BxT, positions_BxT, "einsum", query_blocks)
    return jax.jit(attend).lower(q, k, v).cost_analysis()["flops"]

  whole, blocked = score_flops(1), score_flops(4)
  assert blocked < 0.7 * whole, (blocked, whole)


def test_attention_by_query_blocks_refuses_a_cache_length():
  q = jnp.zeros((1, 4, 2, 8))
  kv = jnp.zeros((1, 6, 2, 8))
  with pytest.raises(ValueError, match="query_blocks=2 needs the queries' own sequence as keys;"
                                       " got T=4 queries and S=6 keys"):
    layers.causal_attention(q, kv, kv, jnp.zeros((1, 4), int), jnp.zeros((1, 6), int),
                            "einsum", 2)


@pytest.mark.parametrize("variant", [dict(router="none"), dict(router="kv-static"),
                                     dict(router="kv-static", routing_impl="pull"),
                                     dict(router="depth-attention")],
                         ids=["none", "kv-static", "kv-pull", "depth-attention"])
def test_model_with_query_blocks_trains_and_decodes_as_without(variant):
  """The option changes only how the forward without a cache computes attention: the loss,
  its gradient and cached decoding (which attends by position over the cache) stay."""
  cfg = ModelConfig(V=32, D=32, L=3, H=4, R=2, F=64, T=12, scan_segments=2,
                    attention_query_blocks=1, **variant)
  blocked_cfg = cfg.replace(attention_query_blocks=4)
  params = M.init_params(cfg, jax.random.key(0))
  tokens_BxT = model_checks.tokens(cfg, T=12)

  model_checks.assert_same_loss_and_grads(cfg, blocked_cfg, params, tokens_BxT)
  cache = decode.init_cache(blocked_cfg, 2, 16)
  prefilled_BxTxV, _ = decode.prefill(params, blocked_cfg, tokens_BxT, cache, all_logits=True)
  np.testing.assert_allclose(prefilled_BxTxV,
                             M.Transformer(cfg).apply({"params": params}, tokens_BxT),
                             rtol=1e-5, atol=1e-5)


def test_query_blocks_must_be_a_positive_int():
  with pytest.raises(ValueError, match="attention_query_blocks"):
    ModelConfig(attention_query_blocks=0)


@pytest.mark.parametrize("layout", [dict(router="none", scan_unroll=4),
                                    # the push's one-layer segments: scans of one layer
                                    dict(router="kv-static", scan_segments=4)])
def test_remat_recomputes_in_straight_line_code(layout):
  """A scan unrolled over all its layers is straight-line code, where XLA would merge remat's
  recomputation in the backward with the forward if CSE were allowed, and run (and count) a
  step without it: full remat must cost FLOPs there."""
  model_checks.assert_full_remat_recomputes(
      ModelConfig(V=64, D=32, L=4, H=4, R=2, F=64, T=8).replace(**layout))


def test_the_mlp_saves_its_hidden_not_its_activation():
  """The MLP's backward recomputes silu(gate) * up from the saved gate and up products: no
  float32 [B, T, F] array is saved, and the gradient (hand-written: projection.project,
  layers.unstack_pair) is plain autodiff's."""
  cfg = ModelConfig(V=64, D=32, L=1, H=4, F=48, T=16, router="none")
  B = 2
  mlp = layers.Mlp(cfg)
  x = jax.random.normal(jax.random.key(0), (B, cfg.T, cfg.D))
  params = nn.unbox(mlp.init(jax.random.key(1), x))

  def loss(params, x, forward):
    return jnp.sum(jnp.sin(forward(params, x)))

  def unrematerialized(params, x):  # the same math by plain autodiff, without the checkpoint
    p = params["params"]
    h = jnp.einsum("btd,dkf->btkf", x, p["gate_up"])
    return jnp.einsum("btf,fd->btd", nn.silu(h[:, :, 0]) * h[:, :, 1], p["down"])

  saved = [line.split()[0] for line in model_checks.saved_residuals(
      lambda p, x: loss(p, x, mlp.apply), params, x)]
  assert f"f32[{B},{cfg.T},2,{cfg.F}]" in saved  # h, the products' output
  assert not [shape for shape in saved if shape.endswith(f"{cfg.T},{cfg.F}]")], saved
  # The unrematerialized form saves the activation's operands: what the check above detects.
  assert [line for line in model_checks.saved_residuals(
      lambda p, x: loss(p, x, unrematerialized), params, x)
          if line.split()[0] == f"f32[{B},{cfg.T},{cfg.F}]"]
  want = jax.grad(loss, argnums=(0, 1))(params, x, unrematerialized)
  got = jax.grad(loss, argnums=(0, 1))(params, x, mlp.apply)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("axis", [2, 3])
def test_unstack_pair_gradient_is_autodiffs_written_as_one_stack(axis):
  """The MLP's gate and up (axis 2), attention's keys and values (axis 3): the same values and
  gradient as slicing, with the backward a stack, not autodiff's zero-padded sum."""
  shape = [2, 6, 4, 3, 5]
  shape[axis] = 2
  x = jax.random.normal(jax.random.key(0), shape)
  part_shape = shape[:axis] + shape[axis + 1:]
  cotangents = [jax.random.normal(key, part_shape) for key in jax.random.split(jax.random.key(1))]

  def sliced(x):
    return tuple(jax.lax.index_in_dim(x, i, axis, keepdims=False) for i in range(2))

  def loss(unstack):
    return lambda x: sum(jnp.sum(c * jnp.sin(part)) for c, part in zip(cotangents, unstack(x)))

  got, want = layers.unstack_pair(x, axis), sliced(x)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)
  np.testing.assert_array_equal(jax.grad(loss(lambda x: layers.unstack_pair(x, axis)))(x),
                                jax.grad(loss(sliced))(x))

  def lowered_grad(unstack, platform):
    return jax.jit(jax.grad(loss(unstack))).trace(x).lower(
        lowering_platforms=(platform,)).as_text()

  assert "stablehlo.pad" not in lowered_grad(lambda x: layers.unstack_pair(x, axis), "cpu")
  assert "stablehlo.pad" in lowered_grad(sliced, "cpu")  # the check can fail
  for accelerator in ("tpu", "cuda"):  # autodiff's backward, lowered on this host
    assert "stablehlo.pad" in lowered_grad(lambda x: layers.unstack_pair(x, axis), accelerator)
