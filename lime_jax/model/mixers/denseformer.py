"""DenseFormer (Pagliardini et al., arXiv 2402.02622; `connections: denseformer`), a cross-layer
baseline LIMe is compared against (router `none`).

With X_0 the embeddings and X_{l+1} the output of block l, the input of block l+1 (and the final
output after the last block) is the depth-weighted average Y_l = sum_j alpha[l, j] X_j over
sources j <= l+1 with (l+1-j) % dilation == 0, present only after blocks with
(l+1) % period == 0 (elsewhere Y_l = X_{l+1}). alpha starts at 1 on X_{l+1} and 0 elsewhere: the
plain model, exactly.

Memory. Carrying all X_j and reading them at every layer is the spec's L^2 trap (section 5).
DenseFormer uses the push primitive (push.py) instead: source j adds alpha[i, j] X_j into one
float32 slot per later reader i, then block l reads slot l, so training memory stays linear in
depth. The push weights are stored by source (block l owns alpha[:, l+1], the stack owns
alpha[:, 0]). The accumulator is [I, 1, B, T, D]: one "head", as the primitive mixes heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from lime_jax.config import ModelConfig
from lime_jax.model import push
from lime_jax.model.layers import logical
from lime_jax.model.mixers.base import Mixer


def dwa_live_mask(L: int, dilation: int = 1, period: int = 1) -> np.ndarray:
  """Boolean [L+1 sources, L readers]: True where alpha[i, j] is a parameter.

  Reader i is the average after block i (source j = i+1 is that block's output, j = 0 the
  embeddings); readers with (i+1) % period != 0 have no average and no parameters.
  """
  source_Sx1, reader_1xL = np.arange(L + 1)[:, None], np.arange(L)[None, :]
  return ((source_Sx1 <= reader_1xL + 1) & ((reader_1xL + 1 - source_Sx1) % dilation == 0)
          & ((reader_1xL + 1) % period == 0))


def num_denseformer_params(cfg: ModelConfig) -> int:
  """L(L+3)/2 for the 1x1 DenseFormer (the paper's count); fewer with dilation or period."""
  return int(dwa_live_mask(cfg.L, cfg.denseformer_dilation, cfg.denseformer_period).sum())


def _dwa_effective(cfg: ModelConfig, stored_L: jax.Array, source) -> jax.Array:
  """Push weights of source j over readers [L]: the stored ones where live, else the fixed
  identity (1 for reader j-1 when it has no average, 0 elsewhere)."""
  reader_L = jnp.arange(cfg.L)
  period, dilation = cfg.denseformer_period, cfg.denseformer_dilation
  has_dwa_L = (reader_L + 1) % period == 0
  live_L = (source <= reader_L + 1) & ((reader_L + 1 - source) % dilation == 0) & has_dwa_L
  fixed_L = (~has_dwa_L & (reader_L + 1 == source)).astype(jnp.float32)
  return jnp.where(live_L, stored_L.astype(jnp.float32), fixed_L)


def _dwa_init(cfg: ModelConfig, source):
  """alpha[i, j] = 1 for j == i+1 (the block's own output), 0 elsewhere: the plain model."""
  return lambda rng: (jnp.arange(cfg.L) + 1 == source).astype(jnp.float32)


class DenseFormerInput(nn.Module):
  """Starts the accumulator [L, 1, B, T, D] with the embeddings' weighted contributions."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    cfg = self.cfg
    stored_L = self.param("dwa", logical(_dwa_init(cfg, 0), "readers"))
    weights_L = _dwa_effective(cfg, stored_L, 0)
    return weights_L[:, None, None, None, None] * x_BxTxD.astype(jnp.float32)[None, None]


class DepthWeightedAverage(nn.Module):
  """After block l: pushes X_{l+1} into every later reader's slot and returns (Y_l, acc).

  The accumulator holds readers first_reader .. L-1 (earlier ones have read theirs). With a
  Python-int layer index (unrolled) only live slots are touched; under nn.scan every slot.
  """

  cfg: ModelConfig
  first_reader: int = 0

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, acc_Ix1xBxTxD: jax.Array, layer_idx):
    cfg = self.cfg
    stored_L = self.param("dwa", logical(_dwa_init(cfg, layer_idx + 1), "readers"))
    weights_Ix1x1 = _dwa_effective(cfg, stored_L, layer_idx + 1)[self.first_reader:, None, None]
    live_slots = None
    if isinstance(layer_idx, int):
      live_I = np.asarray(dwa_live_mask(cfg.L, cfg.denseformer_dilation, cfg.denseformer_period)
                          [layer_idx + 1, self.first_reader:])
      live_I[layer_idx - self.first_reader] = True  # its own slot: fixed 1 without an average
      live_slots = np.flatnonzero(live_I)
    acc_Ix1xBxTxD, y_1xBxTxD = push.push_and_read(
        acc_Ix1xBxTxD, weights_Ix1x1, x_BxTxD.astype(jnp.float32)[None],
        layer_idx - self.first_reader, live_slots)
    return y_1xBxTxD[0].astype(x_BxTxD.dtype), acc_Ix1xBxTxD


def dwa_weights(stacked_dwa_LxL: jax.Array, embed_dwa_L: jax.Array, cfg: ModelConfig) -> jax.Array:
  """All DenseFormer weights as one masked alpha [L_reader, L+1 sources] (paper layout).

  Takes the block-stored push weights stacked over blocks [L, L_reader] and the stack's [L].
  """
  stored_SxL = jnp.concatenate([embed_dwa_L[None], stacked_dwa_LxL], axis=0)
  effective_SxL = jax.vmap(lambda w, j: _dwa_effective(cfg, w, j))(stored_SxL,
                                                                  jnp.arange(cfg.L + 1))
  return effective_SxL.T


class DenseFormer(Mixer):
  """Carry: the float32 accumulator acc [I, 1, B, T, D], one slot per block output I to come."""

  exportable = False

  def segments(self) -> list[tuple[int, int]]:
    return push.segment_bounds(self.cfg.L, self.cfg.scan_segments)

  def start(self, stack: nn.Module, x_BxTxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    del stack  # the input weights become the calling stack's child
    return x_BxTxD, DenseFormerInput(self.cfg, name="denseformer_input")(x_BxTxD)

  def after_segment(self, acc_Ix1xBxTxD: jax.Array, start: int, stop: int) -> jax.Array:
    return acc_Ix1xBxTxD[stop - start:]

  def after_layer(self, block: nn.Module, x_BxTxD: jax.Array, acc_Ix1xBxTxD: jax.Array,
                  layer_idx) -> tuple[jax.Array, jax.Array]:
    return DepthWeightedAverage(self.cfg, block.first_reader, name="denseformer")(
        x_BxTxD, acc_Ix1xBxTxD, layer_idx)

  def extra_params(self) -> int:
    return num_denseformer_params(self.cfg)

  def extra_macs_per_token(self) -> int:
    """D per live averaging weight."""
    return self.cfg.D * num_denseformer_params(self.cfg)

  def executed_push_macs_per_token(self) -> int:
    """Under nn.scan block l updates every slot of its segment's accumulator; unrolled, only its
    live slots (and its own). The embeddings' push touches all L slots either way."""
    cfg = self.cfg
    live_LxL = dwa_live_mask(cfg.L, cfg.denseformer_dilation,
                             cfg.denseformer_period)[1:].copy()  # block l = source l+1
    live_LxL[range(cfg.L), range(cfg.L)] = True
    if not cfg.scan_layers:
      return cfg.D * int(live_LxL.sum()) + cfg.L * cfg.D
    slots = sum((stop - start) * (cfg.L - start) for start, stop in self.segments())
    return cfg.D * slots + cfg.L * cfg.D
