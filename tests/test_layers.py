"""layers.py: the fused attention option computes what our einsum attention computes; remat
recomputes in straight-line code too."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_checks

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


def test_model_logits_do_not_depend_on_the_attention_impl():
  cfg = ModelConfig(V=32, D=32, L=2, H=4, R=2, F=64, T=8, scan_segments=2)
  params = M.init_params(cfg, jax.random.key(0))
  tokens_BxT = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.V)
  logits = lambda c: M.Transformer(c).apply({"params": params}, tokens_BxT)
  np.testing.assert_allclose(logits(cfg.replace(attention_impl="dot_product")), logits(cfg),
                             rtol=1e-5, atol=1e-5)


def test_unknown_attention_impl_is_a_one_line_error():
  with pytest.raises(ValueError, match="attention_impl: unknown 'flash'"):
    ModelConfig(attention_impl="flash")


@pytest.mark.parametrize("layout", [dict(router="none", scan_unroll=4),
                                    # the push's one-layer segments: scans of one layer
                                    dict(router="kv-static", scan_segments=4)])
def test_remat_recomputes_in_straight_line_code(layout):
  """A scan unrolled over all its layers is straight-line code, where XLA would merge remat's
  recomputation in the backward with the forward if CSE were allowed, and run (and count) a
  step without it: full remat must cost FLOPs there."""
  model_checks.assert_full_remat_recomputes(
      ModelConfig(V=64, D=32, L=4, H=4, R=2, F=64, T=8).replace(**layout))
