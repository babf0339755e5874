"""One pre-norm decoder layer, written once for every cross-layer method.

RMSNorm -> attention -> residual -> RMSNorm -> SwiGLU -> residual, where the method (a `Mixer`,
mixers/base.py) decides what "residual" means (a plain add, hyper-connections' copies), where the
layer's keys and values come from (its own projection, LIMe's routed kv), and what happens after
the layer (DenseFormer's depth-weighted average). With a cache (decoding), the new tokens' keys
and values are appended to it and attention reads the whole cache; the method's carry then spans
only the new tokens, all that per-position mixing needs.
"""

from __future__ import annotations

from typing import Any

import jax
import flax.linen as nn

from lime_jax.config import ModelConfig
from lime_jax.model import mixers
from lime_jax.model.layers import Attention, KVCache, Mlp, RMSNorm, constrain, maybe_remat


class Block(nn.Module):
  """Layer `layer_idx` (a Python int unrolled, traced under nn.scan): (stream, carry, cache) in
  and out; the stream and carry are the method's (mixers/base.py)."""

  cfg: ModelConfig
  first_reader: int = 0  # the first layer of this block's scan segment (push accumulators)
  # Its layers run as straight-line code although `layer_idx` is traced: a scan unrolled over
  # all of them (layers.maybe_remat). A Python-int `layer_idx` says so by itself.
  unrolled_scan: bool = False
  # Only the layer's first half: returns its raw kv and the attention's normed input. The kv
  # pull form runs a layer in two halves and routes in between (kv_pull.py); the second half
  # is given that normed input (`attn_input_BxTxD`), so the norm runs and is saved once.
  kv_only: bool = False

  @nn.compact
  def __call__(self, stream: Any, carry: Any, layer_idx, positions_BxT: jax.Array,
               cache: KVCache | None = None, attn_input_BxTxD: jax.Array | None = None):
    cfg = self.cfg
    mixer = mixers.build(cfg)
    straight_line = mixers.straight_line(self, layer_idx)
    # The norms too: outside a checkpoint, autodiff would save their float32 intermediates,
    # several [B, T, D] arrays a layer (1.2B setup: 2.1 GiB per device on the TPU compiler).
    Norm = maybe_remat(RMSNorm, cfg, straight_line) if cache is None else RMSNorm
    x_BxTxD, mix = mixer.enter(self, stream, carry, 2 * layer_idx, "attn")
    h_BxTxD = (Norm(cfg, name="attn_norm")(x_BxTxD) if attn_input_BxTxD is None
               else attn_input_BxTxD)
    kv_BxTxRx2xHd, carry = mixer.kv(self, x_BxTxD, h_BxTxD, carry, layer_idx)
    if self.kv_only:
      return kv_BxTxRx2xHd, h_BxTxD
    # Analysis hooks (studies/analysis.py); no-ops unless "intermediates" is mutable.
    self.sow("intermediates", "values", kv_BxTxRx2xHd[:, :, :, 1])
    # Depth-Attention mixes the kv by the layer's query: inside Attention, given the carry.
    mixes_by_query = mixer.query_mix is not None
    if cache is None:
      attention = maybe_remat(Attention, cfg, straight_line)(cfg, mixer.query_mix, name="attn")
      attn_BxTxD, _ = attention(h_BxTxD, kv_BxTxRx2xHd, positions_BxT, positions_BxT,
                                *((None, layer_idx, carry) if mixes_by_query else ()))
    else:  # decoding takes no gradients: no remat (the MLP's costs nothing either, tested)
      attn_BxTxD, cache = Attention(cfg, mixer.query_mix, name="attn")(
          h_BxTxD, kv_BxTxRx2xHd, positions_BxT, positions_BxT, cache, layer_idx,
          carry if mixes_by_query else None)
    stream, carry = mixer.leave(stream, carry, attn_BxTxD, mix)
    x_BxTxD, mix = mixer.enter(self, stream, carry, 2 * layer_idx + 1, "mlp")
    mlp = maybe_remat(Mlp, cfg, straight_line)(cfg, straight_line, name="mlp")
    stream, carry = mixer.leave(stream, carry, mlp(Norm(cfg, name="mlp_norm")(x_BxTxD)), mix)
    stream, carry = mixer.after_layer(self, stream, carry, layer_idx)
    stream = constrain(stream, *mixer.stream_axes())
    self.sow("intermediates", "hidden", mixer.hidden(stream))
    return stream, carry, cache
