import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lime_jax.model import transformer as M
from lime_jax.config import ModelConfig
from lime_jax.train.optimizer import OptimConfig, lr_multiplier, make_optimizer, param_labels


def _params():
  return {"embed": jnp.ones((4, 2)), "final_norm": {"scale": jnp.ones(2)},
          "layers": {"router": jnp.ones((3, 2, 2)), "kv_proj": jnp.ones((2, 2)),
                     "attn_norm": {"scale": jnp.ones(2)}}}


def _one_step(grad_value: float, **optim):
  params = _params()
  tx = make_optimizer(OptimConfig(warmup_steps=0, total_steps=100, **optim))
  grads = jax.tree.map(lambda p: jnp.full_like(p, grad_value), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  return optax.apply_updates(params, updates)


def test_zero_gradient_step_decays_only_the_decay_group():
  new = _one_step(0.0)
  np.testing.assert_array_equal(new["layers"]["router"], 1.0)  # routers: no weight decay
  np.testing.assert_array_equal(new["embed"], 1.0)
  np.testing.assert_array_equal(new["final_norm"]["scale"], 1.0)
  np.testing.assert_array_equal(new["layers"]["attn_norm"]["scale"], 1.0)
  np.testing.assert_allclose(new["layers"]["kv_proj"], 1.0 - 1e-3 * 0.1, rtol=1e-6)


def test_router_group_uses_its_own_learning_rate():
  # Adam's first step moves every entry by lr * sign(grad) (bias-corrected moments).
  new = _one_step(0.5)
  np.testing.assert_allclose(new["layers"]["router"], 1.0 - 1e-2, rtol=1e-5)
  np.testing.assert_allclose(new["embed"], 1.0 - 1e-3, rtol=1e-5)
  np.testing.assert_allclose(new["layers"]["kv_proj"], 1.0 - 1e-3 - 1e-3 * 0.1, rtol=1e-5)
  new = _one_step(0.5, router_lr=3e-2)
  np.testing.assert_allclose(new["layers"]["router"], 1.0 - 3e-2, rtol=1e-5)


def test_labels_on_the_real_model():
  cfg = ModelConfig(V=32, D=16, L=3, H=2, F=32, T=8)
  labels = jax.tree_util.tree_flatten_with_path(param_labels(M.init_params(cfg, jax.random.key(0))))[0]
  by_leaf = {}
  for path, label in labels:
    by_leaf.setdefault(path[-1].key, set()).add(label)
  assert by_leaf["router"] == {"router"}
  assert by_leaf["embed"] == {"no_decay"} and by_leaf["scale"] == {"no_decay"}
  for name in ("kv_proj", "q_proj", "o_proj", "gate_up", "down"):
    assert by_leaf[name] == {"decay"}, name


def test_schedule_warmup_then_cosine_to_floor():
  schedule = lr_multiplier(OptimConfig(warmup_steps=10, total_steps=110, final_lr_fraction=0.1))
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(5)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(10)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(60)), 0.55, rtol=1e-5)
  np.testing.assert_allclose(float(schedule(110)), 0.1, rtol=1e-5)


def test_gradient_accumulation_averages_micro_batches():
  params = _params()
  tx = make_optimizer(OptimConfig(warmup_steps=0, grad_accum_steps=2, grad_clip=0.0))
  state = tx.init(params)
  g1 = jax.tree.map(lambda p: jnp.full_like(p, 1.0), params)
  updates, state = tx.update(g1, state, params)
  assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
  updates, state = tx.update(jax.tree.map(lambda g: -3 * g, g1), state, params)
  assert float(updates["layers"]["router"][0, 0, 0]) > 0  # mean gradient -1 moves params up


@pytest.mark.parametrize("field, value", [("lr", 0.0), ("b2", 1.0), ("weight_decay", -1.0),
                                          ("total_steps", 0), ("grad_accum_steps", 0),
                                          ("final_lr_fraction", 2.0)])
def test_bad_values_name_the_field(field, value):
  with pytest.raises(ValueError, match=rf"optim\.{field}:"):
    OptimConfig(**{field: value})
