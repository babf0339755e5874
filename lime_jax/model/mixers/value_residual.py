"""Value residual learning (ResFormer; Zhou et al., arXiv 2410.17897; `router: value-residual`),
a cheap cross-layer control LIMe is compared against. Not a LIMe router (`ModelConfig.is_lime`
is False).

Every layer's attention reads values that mix in the first layer's values (keys unchanged):

    layer 0:       v'_0 = v_0                                  (a plain layer)
    layer l >= 1:  v'_l = lambda_l,1 v_l + lambda_l,2 v_0      (per token, head and channel)

in the paper's learnable form (its lambda_1 V_n + lambda_2 V_1): two learnable scalars per layer.
Both start at 0.5, our choice: the fixed ResFormer's U_n = A_n (V_n + V_1) / 2, so training
starts from the paper's main model. With lambda = (1, 0) the model is the baseline
(`router: none`) exactly.

Parameters: `value_lambda` [2] = (lambda_l,1, lambda_l,2) in every layer, so every layer has one
shape under nn.scan; layer 0's is not used (zero gradient) and not counted. It is in the optimizer's
`no_decay` group (main lr): decay would pull both weights, lambda_l,1 included, towards zero.

Carry: layer 0's raw values v_0 [B, T, R, Hd] in the compute dtype, per position, so cached
decoding recomputes it for the new tokens, and the KV cache holds the mixed values v'. Training
memory: v_0 is one [B, T, R, Hd] carry, which autodiff of the scan saves once per layer
(lambda_l,2's gradient reads it), like each layer's own values: linear in depth. The mix runs in
float32 and returns in the compute dtype; its backward keeps v and v_0 in the compute dtype
(`mixed_values`), not their float32 copies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from lime_jax.model.layers import dtype_of, logical, normal_init
from lime_jax.model.mixers.base import Mixer, project_kv

LAMBDA_INIT = 0.5


@jax.custom_vjp
def mixed_values(self_weight, first_weight, v_BxTxRxHd: jax.Array,
                 v0_BxTxRxHd: jax.Array) -> jax.Array:
  """self_weight v + first_weight v_0, summed in float32 and returned in v's dtype. Its backward
  keeps v and v_0 in their own dtype: autodiff of the float32 sum saved their float32 copies for
  the weights' gradients, two float32 [B, T, R, Hd] a layer in bf16 runs."""
  mixed32_BxTxRxHd = (self_weight * v_BxTxRxHd.astype(jnp.float32)
                      + first_weight * v0_BxTxRxHd.astype(jnp.float32))
  return mixed32_BxTxRxHd.astype(v_BxTxRxHd.dtype)


def _mixed_values_fwd(self_weight, first_weight, v_BxTxRxHd, v0_BxTxRxHd):
  return (mixed_values(self_weight, first_weight, v_BxTxRxHd, v0_BxTxRxHd),
          (self_weight, first_weight, v_BxTxRxHd, v0_BxTxRxHd))


def _mixed_values_bwd(residuals, dmixed_BxTxRxHd):
  self_weight, first_weight, v_BxTxRxHd, v0_BxTxRxHd = residuals
  dmixed32_BxTxRxHd = dmixed_BxTxRxHd.astype(jnp.float32)
  dself = jnp.sum(dmixed32_BxTxRxHd * v_BxTxRxHd.astype(jnp.float32))
  dfirst = jnp.sum(dmixed32_BxTxRxHd * v0_BxTxRxHd.astype(jnp.float32))
  return (dself.astype(jnp.result_type(self_weight)), dfirst.astype(jnp.result_type(first_weight)),
          (self_weight * dmixed32_BxTxRxHd).astype(v_BxTxRxHd.dtype),
          (first_weight * dmixed32_BxTxRxHd).astype(v0_BxTxRxHd.dtype))


mixed_values.defvjp(_mixed_values_fwd, _mixed_values_bwd)


class ValueResidual(Mixer):
  """`router: value-residual`. Carry: layer 0's values v_0 [B, T, R, Hd] (zeros before it)."""

  exportable = False  # the reference (LIMe / Llama) format has no value residual

  def start(self, stack: nn.Module, x_BxTxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    del stack
    cfg = self.cfg
    B, T, _ = x_BxTxD.shape
    return x_BxTxD, jnp.zeros((B, T, cfg.R, cfg.Hd), dtype_of(cfg.compute_dtype))

  def kv(self, block: nn.Module, x_BxTxD: jax.Array, h_BxTxD: jax.Array, v0_BxTxRxHd: jax.Array,
         layer_idx) -> tuple[jax.Array, jax.Array]:
    del x_BxTxD
    cfg = self.cfg
    lambda_2 = block.param("value_lambda", logical(nn.initializers.constant(LAMBDA_INIT), None),
                           (2,), jnp.float32)
    kv_BxTxRx2xHd = project_kv(block, cfg, h_BxTxD, normal_init)
    k_BxTxRxHd, v_BxTxRxHd = kv_BxTxRx2xHd[:, :, :, 0], kv_BxTxRx2xHd[:, :, :, 1]
    is_first = layer_idx == 0  # a Python bool unrolled, traced under nn.scan
    v0_BxTxRxHd = jnp.where(is_first, v_BxTxRxHd, v0_BxTxRxHd)
    # Layer 0 mixes with (1, 0): 1 v_0 + 0 v_0 is v_0 exactly, without a select over [B, T, R, Hd].
    self_weight = jnp.where(is_first, 1.0, lambda_2[0])
    first_weight = jnp.where(is_first, 0.0, lambda_2[1])
    v_BxTxRxHd = mixed_values(self_weight, first_weight, v_BxTxRxHd, v0_BxTxRxHd)
    return jnp.stack([k_BxTxRxHd, v_BxTxRxHd], axis=3), v0_BxTxRxHd

  def extra_params(self) -> int:
    """Two mixing scalars per layer l >= 1 (layer 0's stored pair is unused)."""
    return 2 * (self.cfg.L - 1)

  def extra_macs_per_token(self) -> int:
    """Per layer l >= 1: lambda_2 v_0 added to lambda_1 v_l, 2 R Hd multiply-adds per token."""
    return 2 * (self.cfg.L - 1) * self.cfg.R * self.cfg.Hd
