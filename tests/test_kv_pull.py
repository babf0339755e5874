"""kv routing in pull form (`routing_impl: pull`, model/kv_pull.py): the push's math exactly,
with memory linear in depth."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lime_jax.config import ModelConfig
from lime_jax.model import stack
from lime_jax.model import transformer as M
from lime_jax.train.loss import mean_loss
from test_bench import SMALL, _train_step_temp_bytes

CFG = ModelConfig(V=64, D=32, L=6, H=4, R=2, F=64, T=8, scan_segments=2)


def _loss(params, cfg, tokens_BxT):
  logits = M.Transformer(cfg).apply({"params": params}, tokens_BxT[:, :-1])
  return mean_loss(logits, tokens_BxT[:, 1:])


def _random_router_params(cfg):
  """Random values in every stored router entry (masked ones too: they must be ignored)."""
  params = M.init_params(cfg, jax.random.key(0))
  stacked = stack.stacked_layer_params(params, cfg)
  stacked = dict(stacked, router=jax.random.normal(jax.random.key(7), stacked["router"].shape))
  return stack.with_stacked_layer_params(params, stacked, cfg)


def _push_and_pull(cfg):
  """(loss, grads) of the push and of the pull, on random routers and tokens."""
  params = _random_router_params(cfg)
  tokens_BxT = jax.random.randint(jax.random.key(1), (2, cfg.T + 1), 0, cfg.V)
  value_and_grad = jax.jit(jax.value_and_grad(_loss), static_argnums=1)
  return (value_and_grad(params, cfg, tokens_BxT),
          value_and_grad(params, cfg.replace(routing_impl="pull"), tokens_BxT))


@pytest.mark.parametrize("changes", [
    {}, {"R": 4}, {"top_p": 0.8}, {"router_window": 2, "router_dilation": 3},
    {"router_window": 2}, {"scan_segments": 1}, {"scan_segments": 6}, {"remat_policy": "full"},
], ids=str)
def test_pull_equals_push(changes):
  """Loss and every gradient (routers, kv projections, the rest) as the push form computes
  them; the push is checked against the loop reference in test_model.py."""
  (loss_push, grads_push), (loss_pull, grads_pull) = _push_and_pull(CFG.replace(**changes))
  np.testing.assert_allclose(loss_pull, loss_push, rtol=1e-6)
  chex.assert_trees_all_close(grads_pull, grads_push, rtol=1e-5, atol=1e-6)


def test_pull_in_bfloat16_stays_close_to_push():
  """bf16 compute: the buffer holds bf16 raw kv, the mix accumulates in float32 (as the push)."""
  cfg = CFG.replace(compute_dtype="bfloat16")
  (loss_push, grads_push), (loss_pull, grads_pull) = _push_and_pull(cfg)
  np.testing.assert_allclose(loss_pull, loss_push, rtol=2e-3)
  router_push = stack.stacked_layer_params(grads_push, cfg)["router"]
  router_pull = stack.stacked_layer_params(grads_pull, cfg)["router"]
  assert jnp.all(jnp.isfinite(router_pull))
  np.testing.assert_allclose(router_pull, router_push, rtol=0.05, atol=0.05 * float(
      jnp.max(jnp.abs(router_push))))


@pytest.mark.parametrize("segments", [1, 2])
def test_pull_training_memory_grows_linearly_with_depth(segments):
  """test_bench.py's criterion (which catches the quadratic carried buffer)."""
  cfg = SMALL.replace(scan_segments=segments, routing_impl="pull")
  temp_L = _train_step_temp_bytes(cfg.replace(L=4))
  temp_2L = _train_step_temp_bytes(cfg.replace(L=8))
  assert temp_2L <= 2.1 * temp_L, (temp_L, temp_2L)
  base_2L = _train_step_temp_bytes(cfg.replace(L=8, router="none"))
  assert temp_2L <= 1.5 * base_2L, (temp_2L, base_2L)
