"""The interface every cross-layer method implements, and the plain residual stream (the Llama
baseline) that is its default.

The layer stack (stack.py) and the block (block.py) are written once; a method changes them only
through these hooks, in this order:

    stream, carry = start(stack, x)            once per forward, before layer 0
    per layer l (block.py):
      x, mix = enter(block, stream, carry, 2l, "attn")   a sub-layer's input from the stream
      kv, carry = kv(block, x, h, carry, l)     the layer's raw keys/values (h = attn_norm(x))
      kv = query_mix(q, kv, carry, l)           inside attention, if the method mixes by query
      stream, carry = leave(stream, carry, attn_out, mix)   the state after the sub-layer
      (the same enter/leave around the MLP, sub-layer 2l+1, "mlp")
      stream, carry = after_layer(block, stream, carry, l)
    carry = after_segment(carry, start, stop)   between nn.scan segments
    x = finish(stack, stream, carry)            after the last layer

`block` and `stack` are the calling Flax modules: a hook creates its parameters and sub-modules
in their scope, so parameter paths name the layer (`segment_0/block/router`), not the method.
The carry is whatever the method threads through the scan (None for the baseline); decoding
starts a fresh carry for the new tokens in every call, as all methods here mix per position,
and the KV cache (layers.KVCache) is the same for every method. Methods also state their
parameter and FLOP counts (flops.py sums them) and how training keeps memory linear in depth.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from lime_jax.config import ModelConfig
from lime_jax.model import pull as pull_lib
from lime_jax.model.layers import dtype_of, logical, normal_init
from lime_jax.model.projection import project


def straight_line(block: nn.Module, layer_idx) -> bool:
  """Whether `block` runs as straight-line code (layers.maybe_remat): its index is a Python int
  (a Python loop), or its scan is unrolled over all its layers (a traced index)."""
  return block.unrolled_scan or isinstance(layer_idx, int)


class Mixer:
  """The plain pre-norm residual stream: every hook is the identity (`router: none`)."""

  # Whether training runs a whole-stack VJP (`pull`) instead of nn.scan's autodiff: for a
  # carried buffer that every layer reads, which autodiff would save once per layer.
  pulls: bool = False
  # Whether `lime-jax export` can write the model in the reference code's format.
  exportable: bool = True
  # For a method that mixes the kv by the layer's query (Depth-Attention): a function
  # (q_BxTxHxHd before RoPE, kv_BxTxRx2xHd, carry, layer_idx) -> the kv attention reads, run
  # inside Attention, which owns the query; `carry` is what `kv` returned. None otherwise.
  query_mix = None

  def __init__(self, cfg: ModelConfig):
    self.cfg = cfg

  # --- the stack ---------------------------------------------------------------------------

  def segments(self) -> list[tuple[int, int]]:
    """[start, stop) layer ranges, one nn.scan each; one unless the carry shrinks per segment."""
    return [(0, self.cfg.L)]

  def start(self, stack: nn.Module, x_BxTxD: jax.Array) -> tuple[Any, Any]:
    """(stream, carry) entering layer 0 from the embeddings."""
    del stack
    return x_BxTxD, None

  def after_segment(self, carry: Any, start: int, stop: int) -> Any:
    """The carry after layers start..stop-1 ran (a segment may drop slots no one reads)."""
    del start, stop
    return carry

  def pull(self, layer_fn, params_S: tuple[Any, ...], stream: Any, carry: Any,
           positions_BxT: jax.Array) -> tuple[Any, Any]:
    """Training's forward for `pulls` methods: the generic pull form (pull.py), which re-runs
    each layer in the backward. layer_fn(params_l, stream, carry, l, positions) -> (stream, carry)
    is one layer; params_S the scanned parameters of each of `segments()`, stacked over its
    layers. Returns the final (stream, carry)."""
    params_L = (params_S[0] if len(params_S) == 1  # one stacked tree: no copy
                else jax.tree.map(lambda *parts: jnp.concatenate(parts), *params_S))
    bounds = tuple((start, stop, self.pull_slots(stop)) for start, stop in self.pull_segments())
    return pull_lib.pull_stack(layer_fn, bounds, self.cfg.scan_unroll, params_L, stream, carry,
                               positions_BxT)

  def pull_segments(self) -> list[tuple[int, int]]:
    """The pull form's scan segments."""
    return self.segments()

  def pull_slots(self, stop: int) -> int:
    """How many leading buffer slots layers before `stop` touch (one slot per layer here)."""
    return stop

  def finish(self, stack: nn.Module, stream: Any, carry: Any) -> jax.Array:
    """The stack's output [B, T, D] from the final stream and carry (a method may create its
    output parameters in `stack`)."""
    del stack, carry
    return self.hidden(stream)

  def hidden(self, stream: Any) -> jax.Array:
    """The hidden state [B, T, D] a stream stands for (the analysis hooks sow it per layer)."""
    return stream

  def stream_axes(self) -> tuple[str | None, ...]:
    """Logical axis names of the stream between layers (for sharding constraints)."""
    return ("batch", "length", "act_embed")

  # --- a layer -----------------------------------------------------------------------------

  def enter(self, block: nn.Module, stream: Any, carry: Any, sublayer_idx,
            name: str) -> tuple[jax.Array, Any]:
    """A sub-layer's input x [B, T, D] and what `leave` needs; `name` ("attn" or "mlp") is for
    its parameters, which the method prefixes with its own name."""
    del block, carry, sublayer_idx, name
    return stream, None

  def leave(self, stream: Any, carry: Any, out_BxTxD: jax.Array, mix: Any) -> tuple[Any, Any]:
    """The stream and carry after a sub-layer with output `out`: the residual add."""
    del mix
    return stream + out_BxTxD, carry

  def kv(self, block: nn.Module, x_BxTxD: jax.Array, h_BxTxD: jax.Array, carry: Any,
         layer_idx) -> tuple[jax.Array, Any]:
    """The layer's keys and values [B, T, R, 2, Hd] (before RoPE) from its normed input h."""
    del x_BxTxD
    return project_kv(block, self.cfg, h_BxTxD, normal_init), carry

  def after_layer(self, block: nn.Module, stream: Any, carry: Any, layer_idx) -> tuple[Any, Any]:
    """The stream and carry after the layer's MLP."""
    del block, layer_idx
    return stream, carry

  # --- accounting (flops.py) ---------------------------------------------------------------

  def extra_params(self) -> int:
    """Parameters the method adds to the baseline's."""
    return 0

  def extra_macs_per_token(self) -> int:
    """Forward multiply-adds per token the method adds (the model FLOPs MFU counts)."""
    return 0

  def executed_push_macs_per_token(self) -> int:
    """Multiply-adds per token that the method's push accumulator (push.py) executes, masked
    slots under nn.scan included; 0 for a method without one."""
    return 0

  def recompute_flops_per_token(self, forward_flops_per_token: int) -> int:
    """FLOPs a training step spends re-running forwards (a pull-form backward); 0 otherwise."""
    del forward_flops_per_token
    return 0


def layer_rerun_flops_per_token(cfg: ModelConfig, forward_flops_per_token: int) -> int:
  """What the generic pull form's backward (pull.py) spends re-running every layer once. The
  re-run needs only what the layer's VJP reads, not the layer's output (the forward saved every
  layer's input), so the MLP's down projection is dead code there and XLA drops it; neither is
  the unembedding re-run."""
  return forward_flops_per_token - 2 * cfg.D * cfg.V - 2 * cfg.L * cfg.F * cfg.D


def project_kv(block: nn.Module, cfg: ModelConfig, h_BxTxD: jax.Array, init) -> jax.Array:
  """The standard kv projection of the normed input: a `kv_proj` [D, R, 2, Hd] in `block`."""
  return kv_projection(h_BxTxD, kv_proj_param(block, cfg, init))


def kv_proj_param(block: nn.Module, cfg: ModelConfig, init) -> jax.Array:
  """`block`'s kv projection [D, R, 2, Hd], in the parameter dtype."""
  return block.param("kv_proj", logical(init, "embed", "kv_heads", None, "head_dim"),
                     (cfg.D, cfg.R, 2, cfg.Hd), dtype_of(cfg.param_dtype))


def kv_projection(h_BxTxD: jax.Array, kv_proj_DxRx2xHd: jax.Array) -> jax.Array:
  """The normed input's keys and values [B, T, R, 2, Hd], in its dtype (the compute dtype)."""
  return project("btd,drck->btrck", h_BxTxD, kv_proj_DxRx2xHd.astype(h_BxTxD.dtype))
