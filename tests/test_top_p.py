import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lime_jax.model import transformer as M
from lime_jax.model import stack
from lime_jax.model import top_p
from lime_jax.config import ModelConfig
from lime_jax.train.optimizer import OptimConfig, make_optimizer
from lime_jax.train.step import init_train_state, loss_fn, train_step

CFG = ModelConfig(V=64, D=32, L=3, H=4, F=64, T=8, router="hidden-static", top_p=0.6,
                  top_p_refresh=2)
KV_CFG = CFG.replace(router="kv-static", R=2, scan_segments=2)
CFGS = {"hidden-static": CFG, "kv-static": KV_CFG}


def _fresh_masks(router, cfg):
  return (top_p.kv_masks if cfg.router == "kv-static" else top_p.masks)(router, cfg)


def _np_keep(w_N, p):
  """The spec's rule, written directly: sort, grow the prefix until its mass exceeds p."""
  order = np.argsort(-w_N, kind="stable")
  keep, mass = np.zeros(len(w_N), bool), 0.0
  for k in order:
    keep[k] = True
    mass += w_N[k]
    if mass > p:
      break
  return keep


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_keep_mask_matches_numpy_reference(p):
  logits_RxN = np.random.default_rng(0).normal(size=(64, 7)) * 2
  w_RxN = np.exp(logits_RxN) / np.exp(logits_RxN).sum(-1, keepdims=True)
  got = np.asarray(top_p.keep_mask(jnp.asarray(w_RxN, jnp.float32), p))
  np.testing.assert_array_equal(got, np.stack([_np_keep(w, p) for w in w_RxN]))
  assert got.any(-1).all()


def test_masks_prune_expected_entries():
  logits_LxHxL = jax.random.normal(jax.random.key(0), (CFG.L, CFG.H, CFG.L))
  mask = np.asarray(top_p.masks(logits_LxHxL, CFG))
  logits = np.asarray(logits_LxHxL, np.float64)
  for i in range(CFG.L):
    for h in range(CFG.H):
      w = np.exp(logits[i, h, :i + 1]) / np.exp(logits[i, h, :i + 1]).sum()
      np.testing.assert_array_equal(mask[i, h, :i + 1], _np_keep(w, CFG.top_p))
      assert np.all(mask[i, h, i + 1:] == 0)
  assert 0 < mask.sum() < np.tril(np.ones((CFG.L, CFG.L))).sum() * CFG.H  # something pruned


def test_kv_masks_prune_by_magnitude_per_reader_head():
  cfg = KV_CFG
  params = M.init_params(cfg, jax.random.key(3))
  push = stack.stacked_layer_params(params, cfg)["router"]  # [L_src, L_reader, R, R]
  mask = np.asarray(top_p.kv_masks(push, cfg))
  W = np.asarray(M.router_weights(params, cfg.replace(top_p=None)), np.float64)  # [Li, R, Lj, R]
  for i in range(cfg.L):
    for r in range(cfg.R):
      row = np.abs(W[i, r, :i + 1]).ravel()  # sources j <= i, heads s
      want = _np_keep(row / row.sum(), cfg.top_p).reshape(i + 1, cfg.R)
      np.testing.assert_array_equal(mask[:i + 1, i, r, :], want)
      assert np.all(mask[i + 1:, i, r, :] == 0)  # future sources are never kept
  assert 0 < mask.sum() < np.asarray(M.router_weights(params, cfg.replace(top_p=None)) != 0).sum()


def _batch(cfg, seed=1):
  tokens = jax.random.randint(jax.random.key(seed), (2, cfg.T + 1), 0, cfg.V)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


@pytest.mark.parametrize("router", sorted(CFGS))
def test_top_p_of_one_equals_the_unpruned_router(router):
  cfg = CFGS[router].replace(top_p=1.0)
  plain_cfg = cfg.replace(top_p=None)
  params = M.init_params(cfg, jax.random.key(0))
  params = top_p.refresh(params, cfg, jnp.int32(0))
  plain = stack.with_stacked_layer_params(
      params, {k: v for k, v in stack.stacked_layer_params(params, cfg).items() if k != "top_p_mask"},
      plain_cfg)
  batch = _batch(cfg)
  grad = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)
  loss, grads = grad(params, cfg, batch)
  plain_loss, plain_grads = grad(plain, plain_cfg, batch)
  assert float(loss) == float(plain_loss)
  stacked = stack.stacked_layer_params(grads, cfg)
  np.testing.assert_array_equal(stacked.pop("top_p_mask"), 0.0)
  jax.tree.map(np.testing.assert_array_equal, stacked,
               stack.stacked_layer_params(plain_grads, plain_cfg))


@pytest.mark.parametrize("router", sorted(CFGS))
def test_mask_refreshes_only_on_schedule_and_pruned_logits_get_no_gradient(router):
  cfg = CFGS[router]
  tx = make_optimizer(OptimConfig(warmup_steps=0, router_lr=0.5))
  state = init_train_state(cfg, tx, jax.random.key(0))
  step = jax.jit(functools.partial(train_step, model_cfg=cfg, tx=tx))
  mask_of = lambda params: np.asarray(stack.stacked_layer_params(params, cfg)["top_p_mask"])
  logits_of = lambda params: stack.stacked_layer_params(params, cfg)["router"]
  masks = []
  for n in range(4):
    expected = (np.asarray(_fresh_masks(logits_of(state.params), cfg)) if n % 2 == 0
                else masks[-1])
    state, _ = step(state, _batch(cfg, seed=n))
    masks.append(mask_of(state.params))  # the mask the step used (the optimizer leaves it)
    np.testing.assert_array_equal(masks[-1], expected)
  assert not np.array_equal(masks[0], masks[2])  # lr 0.5 moves the logits enough to re-prune
  grads = jax.grad(loss_fn)(state.params, cfg, _batch(cfg))
  pruned = (mask_of(state.params) == 0)
  assert pruned.any()
  assert np.all(np.asarray(stack.stacked_layer_params(grads, cfg)["router"])[pruned] == 0)
