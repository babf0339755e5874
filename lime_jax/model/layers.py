"""Building blocks shared by every layer: RMSNorm, RoPE, causal GQA attention, SwiGLU MLP,
sub-block rematerialization, and the key/value cache that attention appends to when decoding."""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from lime_jax.config import ModelConfig
from lime_jax.model.lse_attention import lse_attention, query_block_bounds
from lime_jax.model.projection import project

normal_init = nn.initializers.normal(stddev=0.02)


def logical(init, *axes: str | None):
  """`init` whose parameter carries logical axis names, one per dimension.

  Modules name axes only; `sharding.py` maps the names to mesh axes by the config's rules.
  Names: vocab, embed, mlp, heads, kv_heads, head_dim, norm, readers, sources, layers (added by
  nn.scan); None for a small axis that is never sharded.
  """
  return nn.with_logical_partitioning(init, axes)


def constrain(x: jax.Array, *axes: str | None) -> jax.Array:
  """Pins an activation's layout by logical axis names (batch, length, act_embed, kv_heads,
  readers, head_dim, ...); a no-op outside a mesh, i.e. unless `sharding.Layout.scope()` is on."""
  return nn.with_logical_constraint(x, axes)


def dtype_of(name: str) -> jnp.dtype:
  return jnp.dtype(name)


def rms_normalize(x_xD: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) over the last axis, in float32: RMSNorm without its scale (the one RMS norm;
  RMSNorm, the hidden routers' state buffer and hyper-connections' non-affine norms use it)."""
  x32_xD = x_xD.astype(jnp.float32)
  return x32_xD * jax.lax.rsqrt(jnp.mean(jnp.square(x32_xD), axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
  """RMSNorm computed in float32, returned in the compute dtype."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    scale_D = self.param("scale", logical(nn.initializers.ones, "norm"), (x_BxTxD.shape[-1],),
                         dtype_of(self.cfg.param_dtype))
    y_BxTxD = rms_normalize(x_BxTxD, self.cfg.norm_eps) * scale_D.astype(jnp.float32)[None, None, :]
    return y_BxTxD.astype(dtype_of(self.cfg.compute_dtype))


# Remat policies by config name (config.REMAT_POLICIES; "none" means no remat).
REMAT_POLICY_FNS = {
    "full": None,  # save nothing inside the sub-block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_proj": jax.checkpoint_policies.save_only_these_names("q_proj", "mlp_hidden"),
}


def maybe_remat(module_cls, cfg: ModelConfig, straight_line: bool):
  """`module_cls`, rematerialized by the config's policy.

  Only sub-blocks that do not own a cross-layer carry are rematerialized: a checkpoint whose
  input is LIMe's accumulator would save one copy of it per layer (spec section 5).
  `straight_line`: the layers run as straight-line code (a Python loop, or a scan unrolled
  over all its layers), where the backward's recomputation sits beside the forward and XLA
  would merge the two (undoing the remat) unless CSE is prevented; inside a scan loop the
  forward and backward are apart, and the barriers that prevent it would only cost fusion.
  """
  if cfg.remat_policy == "none":
    return module_cls
  return nn.remat(module_cls, policy=REMAT_POLICY_FNS[cfg.remat_policy],
                  prevent_cse=straight_line)


def apply_rope(x_BxTxNxHd: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
  """Rotates query or key heads by their positions; math in float32."""
  Hd = x_BxTxNxHd.shape[-1]
  inv_freq_Hd2 = 1.0 / (theta ** (jnp.arange(0, Hd, 2, dtype=jnp.float32) / Hd))
  angle_BxTxHd2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_Hd2[None, None, :]
  angle_BxTx1xHd = jnp.concatenate([angle_BxTxHd2, angle_BxTxHd2], axis=-1)[:, :, None, :]
  x32 = x_BxTxNxHd.astype(jnp.float32)
  half = Hd // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  out = x32 * jnp.cos(angle_BxTx1xHd) + rotated * jnp.sin(angle_BxTx1xHd)
  return out.astype(x_BxTxNxHd.dtype)


def causal_attention(q_BxTxHxHd: jax.Array, k_BxSxRxHd: jax.Array, v_BxSxRxHd: jax.Array,
                     q_positions_BxT: jax.Array, k_positions_BxS: jax.Array,
                     impl: str = "einsum", query_blocks: int | None = 1) -> jax.Array:
  """Grouped-query causal attention; logits and softmax in float32.

  A key at position s is visible to a query at position t iff s <= t, so the same function
  serves a full forward (S == T) and cached decoding (S is the cache length).

  `query_blocks` > 1 splits the queries into that many contiguous blocks, and each attends only
  to the keys up to its own end, so the masked triangle is mostly not computed (2 blocks: 3/4
  of the scores, 4 blocks: 5/8). Exact only where both sides hold the sequence's own positions
  in order (S == T, positions increasing along it, as in a forward without a cache): the keys
  past a block's end then lie in the future of all its queries. None: by platform with
  `lse_recompute` (lse_attention.cpu_query_blocks on the CPU, one block elsewhere, and one where
  S != T), one block with the other impls.
  """
  T, S = q_BxTxHxHd.shape[1], k_BxSxRxHd.shape[1]
  if query_blocks is None:
    if impl == "lse_recompute":
      return lse_attention(q_BxTxHxHd, k_BxSxRxHd, v_BxSxRxHd, q_positions_BxT,
                           k_positions_BxS, None)
    query_blocks = 1
  blocks = min(query_blocks, T)  # a sequence shorter than the blocks: one query per block
  if blocks > 1 and S != T:
    raise ValueError(f"causal_attention: query_blocks={query_blocks} needs the queries' own"
                     f" sequence as keys; got T={T} queries and S={S} keys")
  if impl == "lse_recompute":  # blocks its backward too
    return lse_attention(q_BxTxHxHd, k_BxSxRxHd, v_BxSxRxHd, q_positions_BxT, k_positions_BxS,
                         blocks)
  if blocks == 1:
    return _masked_attention(q_BxTxHxHd, k_BxSxRxHd, v_BxSxRxHd, q_positions_BxT,
                             k_positions_BxS, impl)
  outs_BxTbxHxHd = [
      _masked_attention(q_BxTxHxHd[:, start:end], k_BxSxRxHd[:, :end], v_BxSxRxHd[:, :end],
                        q_positions_BxT[:, start:end], k_positions_BxS[:, :end], impl)
      for start, end in query_block_bounds(T, blocks)]
  return jnp.concatenate(outs_BxTbxHxHd, axis=1)


def _masked_attention(q_BxTxHxHd: jax.Array, k_BxSxRxHd: jax.Array, v_BxSxRxHd: jax.Array,
                      q_positions_BxT: jax.Array, k_positions_BxS: jax.Array,
                      impl: str) -> jax.Array:
  """Every query against every key, the invisible ones masked."""
  if impl == "dot_product":  # jax.nn's, fused where the device has a kernel; GQA and masks work
    visible_Bx1xTxS = (k_positions_BxS[:, None, :] <= q_positions_BxT[:, :, None])[:, None]
    return jax.nn.dot_product_attention(q_BxTxHxHd, k_BxSxRxHd.astype(q_BxTxHxHd.dtype),
                                        v_BxSxRxHd.astype(q_BxTxHxHd.dtype),
                                        mask=visible_Bx1xTxS)
  B, T, H, Hd = q_BxTxHxHd.shape
  R = k_BxSxRxHd.shape[2]
  q_BxTxRxGxHd = q_BxTxHxHd.reshape(B, T, R, H // R, Hd)
  logits_BxRxGxTxS = jnp.einsum("btrgd,bsrd->brgts", q_BxTxRxGxHd, k_BxSxRxHd,
                                preferred_element_type=jnp.float32) / jnp.sqrt(Hd).astype(jnp.float32)
  visible_BxTxS = k_positions_BxS[:, None, :] <= q_positions_BxT[:, :, None]
  logits_BxRxGxTxS = jnp.where(visible_BxTxS[:, None, None], logits_BxRxGxTxS,
                               jnp.finfo(jnp.float32).min)
  probs_BxRxGxTxS = jax.nn.softmax(logits_BxRxGxTxS, axis=-1).astype(v_BxSxRxHd.dtype)
  out_BxTxRxGxHd = jnp.einsum("brgts,bsrd->btrgd", probs_BxRxGxTxS, v_BxSxRxHd)
  return out_BxTxRxGxHd.reshape(B, T, H, Hd)


class KVCache(NamedTuple):
  """Rotated keys and values of every layer, as attention reads them (for LIMe: routed k', v').

  Slot s of row b holds that row's position s, so the causal mask by position alone hides
  slots not yet written (or holding a shorter prompt's padding): they lie in the future.
  """

  k_LxBxSxRxHd: jax.Array
  v_LxBxSxRxHd: jax.Array
  length_B: jax.Array  # int32 tokens cached per row; the next token goes to slot length_B[b]


def cache_append(cache: KVCache, layer_idx, k_BxTxRxHd: jax.Array, v_BxTxRxHd: jax.Array,
                 positions_BxT: jax.Array) -> KVCache:
  """Writes one layer's new keys/values into their slots; touches only those B*T entries."""
  rows_Bx1 = jnp.arange(k_BxTxRxHd.shape[0])[:, None]
  dtype = cache.k_LxBxSxRxHd.dtype
  return cache._replace(
      k_LxBxSxRxHd=cache.k_LxBxSxRxHd.at[layer_idx, rows_Bx1, positions_BxT].set(
          k_BxTxRxHd.astype(dtype)),
      v_LxBxSxRxHd=cache.v_LxBxSxRxHd.at[layer_idx, rows_Bx1, positions_BxT].set(
          v_BxTxRxHd.astype(dtype)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def unstack_pair(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """x's two entries along `axis` (of size 2), as `x[..., 0, ...]` and `x[..., 1, ...]`.

  On the CPU the backward writes x's cotangent once, as the stack of the two; autodiff's slices
  transpose to two zero-padded arrays of x's shape and their sum, three writes of x's size,
  which XLA:CPU runs as such. Elsewhere it is autodiff's, which those compilers fuse (as
  projection.project, decided when the step is lowered)."""
  return _slices(x, axis)


def _slices(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  return tuple(jax.lax.index_in_dim(x, i, axis, keepdims=False) for i in range(2))


def _unstack_pair_forward(x: jax.Array, axis: int):
  return _slices(x, axis), None


def _unstack_pair_backward(axis: int, _, cotangents):
  def stacked(first, second):
    return jnp.stack([first, second], axis=axis)

  def autodiff(first, second):
    shape = (*first.shape[:axis], 2, *first.shape[axis:])
    return jax.vjp(lambda x: _slices(x, axis), jnp.zeros(shape, first.dtype))[1]((first, second))[0]

  return (jax.lax.platform_dependent(*cotangents, cpu=stacked, default=autodiff),)


unstack_pair.defvjp(_unstack_pair_forward, _unstack_pair_backward)


def activate_and_project_down(h_BxTx2xF: jax.Array, down_FxD: jax.Array) -> jax.Array:
  """silu(gate) * up, projected down."""
  gate_BxTxF, up_BxTxF = unstack_pair(h_BxTx2xF, 2)
  return jnp.einsum("btf,fd->btd", nn.silu(gate_BxTxF) * up_BxTxF, down_FxD)


class Mlp(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)).

  The activation is rematerialized: the backward recomputes it from h, the gate and up
  products' output, which is saved anyway, instead of saving autodiff's [B, T, F]
  intermediates of it (silu's and the product's operands) for every layer; elementwise work
  is cheaper than those bytes (README, "The MLP's activation, rematerialized").
  `straight_line` as for layers.maybe_remat: CSE prevented where the layer is straight-line code.
  """

  cfg: ModelConfig
  straight_line: bool = True

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    cfg = self.cfg
    pdt, cdt = dtype_of(cfg.param_dtype), dtype_of(cfg.compute_dtype)
    gate_up_Dx2xF = self.param("gate_up", logical(normal_init, "embed", None, "mlp"),
                               (cfg.D, 2, cfg.F), pdt)
    down_FxD = self.param("down", logical(normal_init, "mlp", "embed"), (cfg.F, cfg.D), pdt)
    h_BxTx2xF = project("btd,dkf->btkf", x_BxTxD, gate_up_Dx2xF.astype(cdt))
    h_BxTx2xF = checkpoint_name(h_BxTx2xF, "mlp_hidden")
    activate = jax.checkpoint(activate_and_project_down, prevent_cse=self.straight_line)
    return activate(h_BxTx2xF, down_FxD.astype(cdt))


class Attention(nn.Module):
  """Query projection, RoPE, causal attention over given (routed) keys/values, output projection.

  The key/value projection lives in the layer, because LIMe routes the raw kv across layers
  before attention sees them. With a cache (decoding), the new tokens' rotated keys/values are
  written to layer `layer_idx`'s slots and the queries attend over the whole cache; returns
  (output, cache), the cache None without one.
  """

  cfg: ModelConfig
  # (q before RoPE, kv, mix_input, layer_idx) -> the kv to attend over: a method that mixes the
  # kv by the layer's query (mixers/depth_attention.py); None: the kv as given.
  query_mix: Callable | None = None

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, kv_BxSxRx2xHd: jax.Array, q_positions_BxT: jax.Array,
               k_positions_BxS: jax.Array, cache: KVCache | None = None,
               layer_idx=None, mix_input: Any = None) -> tuple[jax.Array, KVCache | None]:
    cfg = self.cfg
    pdt, cdt = dtype_of(cfg.param_dtype), dtype_of(cfg.compute_dtype)
    q_proj_DxHxHd = self.param("q_proj", logical(normal_init, "embed", "heads", "head_dim"),
                               (cfg.D, cfg.H, cfg.Hd), pdt)
    o_proj_HxHdxD = self.param("o_proj", logical(normal_init, "heads", "head_dim", "embed"),
                               (cfg.H, cfg.Hd, cfg.D), pdt)
    q_BxTxHxHd = project("btd,dhk->bthk", x_BxTxD, q_proj_DxHxHd.astype(cdt))
    q_BxTxHxHd = checkpoint_name(q_BxTxHxHd, "q_proj")
    if self.query_mix is not None:  # S is the new tokens here, T == S
      kv_BxSxRx2xHd = self.query_mix(q_BxTxHxHd, kv_BxSxRx2xHd, mix_input, layer_idx)
    q_BxTxHxHd = apply_rope(q_BxTxHxHd, q_positions_BxT, cfg.rope_theta)
    k_BxSxRxHd, v_BxSxRxHd = unstack_pair(kv_BxSxRx2xHd, 3)
    k_BxSxRxHd = apply_rope(k_BxSxRxHd, k_positions_BxS, cfg.rope_theta)
    if cache is not None:  # here S is the new tokens; afterwards, the cache length
      cache = cache_append(cache, layer_idx, k_BxSxRxHd, v_BxSxRxHd, k_positions_BxS)
      k_BxSxRxHd = cache.k_LxBxSxRxHd[layer_idx]
      v_BxSxRxHd = cache.v_LxBxSxRxHd[layer_idx]
      B, S = k_BxSxRxHd.shape[:2]
      k_positions_BxS = jnp.broadcast_to(jnp.arange(S), (B, S))
    # Without a cache, blocks see the sequence's own positions 0..T-1 on both sides: others are
    # refused (transformer.py) or run in one block (stack.py, for None).
    query_blocks = cfg.attention_query_blocks if cache is None else 1
    out_BxTxHxHd = causal_attention(q_BxTxHxHd, k_BxSxRxHd, v_BxSxRxHd, q_positions_BxT,
                                    k_positions_BxS, cfg.attention_impl, query_blocks)
    out_BxTxD = project("bthk,hkd->btd", out_BxTxHxHd.astype(cdt), o_proj_HxHdxD.astype(cdt))
    return out_BxTxD, cache
