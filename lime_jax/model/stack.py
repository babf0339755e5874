"""The layer stack: all L blocks, for every cross-layer method.

Layers run under `nn.scan` (one compiled body whatever the depth; one scan per segment of the
method's `segments()`) or unrolled (`scan_layers: false`, a cross-check that also does only the
live work of sparse methods). Training of a method with `pulls = True` runs its whole-stack
VJP (`mixer.pull`: pull.py, kv_pull.py) over the scanned parameters instead. Decoding threads
a `KVCache` in the carry, so its layout [L, B, S, R, Hd] is one whatever the scan layout and
each layer updates its slots in place (see inference/decode.py).

Parameters: `segment_{b}/block/...` with a leading layer axis when scanned, `layer_{l}/...` when
unrolled, and stack-level ones of the method (DenseFormer's embedding weights);
`stacked_layer_params` gives one [L, ...] view of either layout.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from lime_jax.config import ModelConfig
from lime_jax.model import mixers
from lime_jax.model.block import Block
from lime_jax.model.layers import KVCache


class _ScanBody(nn.Module):
  """Adapts Block to nn.scan's (carry, xs) -> (carry, ys) signature."""

  cfg: ModelConfig
  first_reader: int = 0
  unrolled_scan: bool = False  # the scan is unrolled over all its layers (Block)

  @nn.compact
  def __call__(self, carry, layer_idx, positions_BxT):
    stream, mixer_carry, cache = carry
    block = Block(self.cfg, self.first_reader, self.unrolled_scan, name="block")
    return block(stream, mixer_carry, layer_idx, positions_BxT, cache), None


def _apply_block(cfg: ModelConfig, params_l, x_BxTxD, carry, layer_idx, positions_BxT,
                 kv_only: bool = False, attn_input_BxTxD: jax.Array | None = None):
  """One layer as a pure function of its parameters (the pull form's layer_fn); the pull's
  one scan over all layers is straight-line code when unrolled over them. `kv_only`: the
  layer's first half, (raw kv, attention input), and `attn_input_BxTxD` the second's given
  that input (Block.kv_only)."""
  block = Block(cfg, unrolled_scan=cfg.scan_unroll >= cfg.L, kv_only=kv_only)
  if kv_only:
    return block.apply({"params": params_l}, x_BxTxD, carry, layer_idx, positions_BxT)
  x_BxTxD, carry, _ = block.apply({"params": params_l}, x_BxTxD, carry, layer_idx, positions_BxT,
                                  attn_input_BxTxD=attn_input_BxTxD)
  return x_BxTxD, carry


class LayerStack(nn.Module):
  """All L layers: (x [B, T, D], cache) -> (x, cache); the cache is None when not decoding."""

  cfg: ModelConfig
  naive: bool = False  # pulling methods: plain autodiff through the scan (tests' reference)

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array,
               cache: KVCache | None = None,
               positions_in_order: bool = False) -> tuple[jax.Array, KVCache | None]:
    """`positions_in_order`: every row's positions are 0..T-1 (Transformer's default), which
    `attention_query_blocks: null` needs to block the attention by platform; without it the
    layers attend in one block."""
    cfg = self.cfg
    if cfg.attention_query_blocks is None and not positions_in_order:
      cfg = cfg.replace(attention_query_blocks=1)
    mixer = mixers.build(cfg)
    stream, carry = mixer.start(self, x_BxTxD)
    if not cfg.scan_layers:
      for l in range(cfg.L):
        stream, carry, cache = Block(cfg, name=f"layer_{l}")(stream, carry, l, positions_BxT, cache)
      return mixer.finish(self, stream, carry), cache
    # The pull form needs plain training: no init, decoding or sown analysis intermediates.
    if mixer.pulls and not (self.naive or cache is not None or self.is_initializing()
                            or self.is_mutable_collection("intermediates")):
      params = nn.unbox(self.variables["params"])
      params_S = tuple(params[f"segment_{b}"]["block"] for b in range(len(mixer.segments())))
      stream, carry = mixer.pull(functools.partial(_apply_block, cfg), params_S, stream, carry,
                                 positions_BxT)
      return mixer.finish(self, stream, carry), None
    for b, (start, stop) in enumerate(mixer.segments()):
      segment = nn.scan(
          _ScanBody, variable_axes={"params": 0}, split_rngs={"params": True},
          metadata_params={nn.PARTITION_NAME: "layers"},
          in_axes=(0, nn.broadcast), length=stop - start,
          unroll=min(cfg.scan_unroll, stop - start))(
              cfg, start, cfg.scan_unroll >= stop - start, name=f"segment_{b}")
      (stream, carry, cache), _ = segment((stream, carry, cache), jnp.arange(start, stop),
                                          positions_BxT)
      carry = mixer.after_segment(carry, start, stop)
    return mixer.finish(self, stream, carry), cache


def stacked_layer_params(params: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
  """The per-layer parameters stacked over layers (leading L axis), from any layout.

  Keys: attn_norm/scale [L, D], kv_proj [L, D, R, 2, Hd], attn/q_proj [L, D, H, Hd],
  attn/o_proj [L, H, Hd, D], mlp_norm/scale, mlp/gate_up [L, D, 2, F], mlp/down [L, F, D],
  and the method's (LIMe: router [L_src, L_reader, R, R], push layout, see kv_routing.py).
  """
  layers = params["layers"]
  if cfg.scan_layers:
    parts = [layers[f"segment_{b}"]["block"] for b in range(len(mixers.build(cfg).segments()))]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
  return jax.tree.map(lambda *xs: jnp.stack(xs), *[layers[f"layer_{l}"] for l in range(cfg.L)])


def with_stacked_layer_params(params: dict[str, Any], stacked: dict[str, Any],
                              cfg: ModelConfig) -> dict[str, Any]:
  """Returns `params` with its layers replaced by `stacked`, laid out as `cfg` expects."""
  if cfg.scan_layers:
    layers = {f"segment_{b}": {"block": jax.tree.map(lambda x: x[start:stop], stacked)}
              for b, (start, stop) in enumerate(mixers.build(cfg).segments())}
  else:
    layers = {f"layer_{l}": jax.tree.map(lambda x: x[l], stacked) for l in range(cfg.L)}
  # Stack-level parameters (DenseFormer's embedding weights) are kept as they are.
  extra = {k: v for k, v in params.get("layers", {}).items()
           if not k.startswith(("segment_", "layer_"))}
  return {**params, "layers": {**extra, **layers}}


def convert_layout(params: dict[str, Any], from_cfg: ModelConfig,
                   to_cfg: ModelConfig) -> dict[str, Any]:
  """Re-lays parameters between scanned / unrolled / differently segmented configs."""
  return with_stacked_layer_params(params, stacked_layer_params(params, from_cfg), to_cfg)
