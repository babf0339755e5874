"""Checks every layer-stack variant must pass (core, hidden routers, connections), written once."""

import chex
import jax
import numpy as np

from lime_jax.model import transformer as M
from lime_jax.model import stack
from lime_jax.train.loss import mean_loss


def tokens(cfg, B=2, T=None, seed=1):
  return jax.random.randint(jax.random.key(seed), (B, T or cfg.T), 0, cfg.V)


def next_token_loss(params, cfg, tokens_BxT):
  logits_BxTxV = M.Transformer(cfg).apply({"params": params}, tokens_BxT[:, :-1])
  return mean_loss(logits_BxTxV, tokens_BxT[:, 1:])


def assert_causal(cfg, params, t=6):
  """The log-prob at position t has exactly zero gradient w.r.t. embeddings after t, and some
  gradient w.r.t. every embedding up to t."""
  x_BxTxD = jax.random.normal(jax.random.key(2), (2, 12, cfg.D))

  def loss_at_t(x_BxTxD):
    logits = M.Transformer(cfg).apply({"params": params}, x_BxTxD,
                                      method=M.Transformer.from_embeddings)
    return jax.nn.log_softmax(logits[:, t])[:, 3].sum()

  grad_BxTxD = jax.jit(jax.grad(loss_at_t))(x_BxTxD)
  assert np.all(np.asarray(grad_BxTxD[:, t + 1:]) == 0.0)
  assert np.all(np.abs(np.asarray(grad_BxTxD[:, :t + 1])).sum(axis=(0, 2)) > 0)


def assert_scan_matches_unrolled(scan_cfg, params):
  """Scanned and unrolled layers give the same loss and gradients; returns the scanned grads."""
  unrolled_cfg = scan_cfg.replace(scan_layers=False)
  tokens_BxT = tokens(scan_cfg, T=scan_cfg.T + 1)
  loss_and_grad = jax.jit(jax.value_and_grad(next_token_loss), static_argnums=1)
  loss_s, grads_s = loss_and_grad(params, scan_cfg, tokens_BxT)
  loss_u, grads_u = loss_and_grad(stack.convert_layout(params, scan_cfg, unrolled_cfg), unrolled_cfg,
                                  tokens_BxT)
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
  chex.assert_trees_all_close(grads_s, stack.convert_layout(grads_u, unrolled_cfg, scan_cfg),
                              rtol=1e-5, atol=1e-6)
  return grads_s
