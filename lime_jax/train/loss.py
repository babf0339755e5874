"""Next-token cross-entropy in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood [B, T], float32."""
  logits32_BxTxV = logits_BxTxV.astype(jnp.float32)
  log_z_BxT = jax.nn.logsumexp(logits32_BxTxV, axis=-1)
  target_logit_BxT = jnp.take_along_axis(logits32_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  return log_z_BxT - target_logit_BxT


def mean_loss(logits_BxTxV: jax.Array, targets_BxT: jax.Array,
              weights_BxT: jax.Array | None = None) -> jax.Array:
  """Mean cross-entropy over tokens with nonzero weight (all tokens when weights is None)."""
  nll_BxT = token_cross_entropy(logits_BxTxV, targets_BxT)
  if weights_BxT is None:
    return jnp.mean(nll_BxT)
  weights32_BxT = weights_BxT.astype(jnp.float32)
  return jnp.sum(nll_BxT * weights32_BxT) / jnp.maximum(jnp.sum(weights32_BxT), 1.0)
