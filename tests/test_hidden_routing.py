import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lime_jax.model import flops
from lime_jax.model.mixers import hidden_routing as hr
from lime_jax.model import transformer as M
from lime_jax.model import stack
from lime_jax.config import ModelConfig
from lime_jax.model.stack import LayerStack
from lime_jax.train.step import loss_fn
import model_checks

# L=3 with two segments: the pull stack runs segments of 1 and 2 layers.
CFG = ModelConfig(V=64, D=32, L=3, H=4, F=64, T=16, router="hidden-static", scan_segments=2)
ROUTERS = ("hidden-static", "hidden-dynamic")


_tokens = model_checks.tokens


@functools.lru_cache(maxsize=None)
def _params(cfg):
  """Random routers (masked entries included) and norm scales, so every path is exercised."""
  def init(rng):
    params = M.init_params(cfg, rng)
    stacked = stack.stacked_layer_params(params, cfg)
    router = jax.random.normal(jax.random.fold_in(rng, 1), stacked["router"].shape)
    if cfg.router == "hidden-dynamic":
      router = router / cfg.D ** 0.5
    scale = 1 + 0.3 * jax.random.normal(jax.random.fold_in(rng, 2), (cfg.L, cfg.D))
    stacked = dict(stacked, router=router, source_norm={"scale": scale})
    return stack.with_stacked_layer_params(params, stacked, cfg)
  return jax.jit(init)(jax.random.key(0))


_loss = model_checks.next_token_loss


@pytest.mark.parametrize("router", ROUTERS)
def test_shapes_and_layout(router):
  cfg = CFG.replace(router=router)
  params = _params(cfg)
  logits_BxTxV = jax.jit(M.Transformer(cfg).apply)({"params": params}, _tokens(cfg, B=3, T=11))
  chex.assert_shape(logits_BxTxV, (3, 11, cfg.V))
  chex.assert_type(logits_BxTxV, jnp.float32)
  chex.assert_tree_all_finite(logits_BxTxV)
  stacked = stack.stacked_layer_params(params, cfg)
  chex.assert_shape(stacked["kv_proj"], (cfg.L, cfg.D, cfg.H, 2, cfg.Hd))  # per query head
  chex.assert_shape(stacked["source_norm"]["scale"], (cfg.L, cfg.D))
  router_shape = (cfg.L, cfg.H, cfg.L) if router == "hidden-static" else (cfg.L, cfg.D, cfg.H, cfg.L)
  chex.assert_shape(stacked["router"], router_shape)


@pytest.mark.parametrize("router", ROUTERS)
def test_pull_form_equals_autodiff_through_the_carried_buffer(router):
  """The custom-VJP pull stack (two segments) gives the naive scan's output and gradients."""
  for cfg in (CFG.replace(router=router),):
    layer_params = _params(cfg)["layers"]
    x_BxTxD = jax.random.normal(jax.random.key(2), (2, 8, cfg.D))
    positions_BxT = jnp.broadcast_to(jnp.arange(8), (2, 8))
    probe_BxTxD = jax.random.normal(jax.random.key(3), x_BxTxD.shape)

    def loss(p, x, naive):
      out, _ = LayerStack(cfg, naive=naive).apply({"params": p}, x, positions_BxT)
      return jnp.sum(jnp.tanh(out) * probe_BxTxD)

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    pull_loss, pull_grads = value_and_grad(layer_params, x_BxTxD, False)
    naive_loss, naive_grads = value_and_grad(layer_params, x_BxTxD, True)
    np.testing.assert_allclose(pull_loss, naive_loss, rtol=1e-6)
    chex.assert_trees_all_close(pull_grads, naive_grads, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("router", ROUTERS)
def test_scan_and_unrolled_agree(router):
  scan_cfg = CFG.replace(router=router)
  grads_s = model_checks.assert_scan_matches_unrolled(scan_cfg, _params(scan_cfg))
  # Layer 0 is a plain layer; sources after the reader are masked: exactly zero gradient.
  stacked = stack.stacked_layer_params(grads_s, scan_cfg)
  assert np.all(np.asarray(stacked["router"][0]) == 0)
  assert np.all(np.asarray(stacked["source_norm"]["scale"][0]) == 0)
  router_LxxL = np.asarray(stacked["router"])
  for l in range(scan_cfg.L):
    assert np.all(router_LxxL[l, ..., l + 1:] == 0)
    if l:
      assert np.all(np.abs(router_LxxL[l, ..., :l + 1]).sum(axis=tuple(range(router_LxxL.ndim - 2)))
                    > 0)


@pytest.mark.parametrize("router", ROUTERS)
def test_causality(router):
  """The loss at position t has exactly zero gradient w.r.t. embeddings after t."""
  cfg = CFG.replace(router=router)
  params = _params(cfg)
  x_BxTxD = jax.random.normal(jax.random.key(2), (2, 12, cfg.D))
  t = 6

  def loss_at_t(x_BxTxD):
    logits = M.Transformer(cfg).apply({"params": params}, x_BxTxD, method="from_embeddings")
    return jnp.sum(logits[:, t])

  grad_BxTxD = jax.jit(jax.grad(loss_at_t))(x_BxTxD)
  assert np.all(np.asarray(grad_BxTxD[:, t + 1:]) == 0.0)
  assert np.all(np.abs(np.asarray(grad_BxTxD[:, :t + 1])).sum(axis=(0, 2)) > 0)


# A loop-based reference of the forward, straight from the spec's equations, in float64 NumPy.

def _np_rms(x, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _np_rope(x_TxNxHd, theta):
  T, _, Hd = x_TxNxHd.shape
  angle = np.arange(T)[:, None] / theta ** (np.arange(0, Hd, 2) / Hd)[None, :]
  cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
  x1, x2 = x_TxNxHd[..., :Hd // 2], x_TxNxHd[..., Hd // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _np_reference_logits(params, cfg, tokens_T):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), stack.stacked_layer_params(params, cfg))
  embed = np.asarray(params["embed"], np.float64)
  x = embed[np.asarray(tokens_T)]
  T = x.shape[0]
  states = []  # S_j: the residual stream entering layer j
  for l in range(cfg.L):
    states.append(x)
    h = _np_rms(x, cfg.norm_eps) * p["attn_norm"]["scale"][l]
    sources = [j for j in range(l + 1)
               if j == 0 or cfg.router_window is None or l - j < cfg.router_window]
    mixed = np.zeros((T, cfg.H, cfg.D))
    for head in range(cfg.H):
      if l == 0:
        mixed[:, head] = h
        continue
      if cfg.router == "hidden-static":
        logits = np.broadcast_to(p["router"][l][head, sources], (T, len(sources)))
      else:
        logits = h @ p["router"][l][:, head, sources]
      w = np.exp(logits - logits.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      for k, j in enumerate(sources):
        normed = _np_rms(states[j], cfg.norm_eps) * p["source_norm"]["scale"][l]
        mixed[:, head] += w[:, k:k + 1] * normed
    kv = np.einsum("thd,dhck->thck", mixed, p["kv_proj"][l])
    q = _np_rope(np.einsum("td,dhk->thk", h, p["attn"]["q_proj"][l]), cfg.rope_theta)
    k = _np_rope(kv[:, :, 0], cfg.rope_theta)
    out = np.zeros((T, cfg.H, cfg.Hd))
    for head in range(cfg.H):
      scores = q[:, head] @ k[:, head].T / np.sqrt(cfg.Hd)
      scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      out[:, head] = probs / probs.sum(-1, keepdims=True) @ kv[:, head, 1]
    x = x + np.einsum("thk,hkd->td", out, p["attn"]["o_proj"][l])
    h = _np_rms(x, cfg.norm_eps) * p["mlp_norm"]["scale"][l]
    gate, up = h @ p["mlp"]["gate_up"][l][:, 0], h @ p["mlp"]["gate_up"][l][:, 1]
    x = x + (gate / (1 + np.exp(-gate)) * up) @ p["mlp"]["down"][l]
  h = _np_rms(x, cfg.norm_eps) * np.asarray(params["final_norm"]["scale"], np.float64)
  return h @ embed.T


@pytest.mark.parametrize("router, scan_layers, window", [
    ("hidden-static", True, None), ("hidden-dynamic", True, None),
    ("hidden-static", False, None), ("hidden-dynamic", True, 2)])
def test_matches_loop_reference(router, scan_layers, window):
  cfg = CFG.replace(router=router, scan_layers=scan_layers, router_window=window)
  params = _params(cfg.replace(scan_layers=True))
  if not scan_layers:
    params = stack.convert_layout(params, cfg.replace(scan_layers=True), cfg)
  tokens_BxT = _tokens(cfg, B=2, T=10)
  logits = np.asarray(jax.jit(M.Transformer(cfg).apply)({"params": params}, tokens_BxT))
  for b in range(2):
    np.testing.assert_allclose(logits[b], _np_reference_logits(params, cfg, tokens_BxT[b]),
                               rtol=2e-4, atol=2e-4)


def test_init_follows_spec():
  cfg = CFG.replace(L=6)
  stacked = stack.stacked_layer_params(M.init_params(cfg, jax.random.key(0)), cfg)
  logits_LxHxL = np.asarray(stacked["router"])
  live = np.tril(np.ones((cfg.L, cfg.L), bool))[:, None, :].repeat(cfg.H, 1)
  assert np.all(logits_LxHxL[~live] == 0)
  assert 0.07 < logits_LxHxL[live].std() < 0.13  # N(0, 1) * 0.1
  np.testing.assert_array_equal(stacked["source_norm"]["scale"], 1.0)
  dyn_cfg = cfg.replace(router="hidden-dynamic")
  dynamic = np.asarray(stack.stacked_layer_params(M.init_params(dyn_cfg, jax.random.key(0)),
                                              dyn_cfg)["router"])
  dynamic_LxHxLxD = dynamic.transpose(0, 2, 3, 1)
  assert np.all(dynamic_LxHxLxD[~live] == 0)
  assert abs(dynamic_LxHxLxD[live].std() * cfg.D ** 0.5 - 0.1) < 0.02  # logits ~ 0.1 at init


@pytest.mark.parametrize("window, dilation", [(None, None), (2, None), (None, 2)])
@pytest.mark.parametrize("router", ROUTERS)
def test_parameter_count(router, window, dilation):
  cfg = CFG.replace(router=router, router_window=window, router_dilation=dilation, L=6)
  shapes = jax.eval_shape(functools.partial(M.init_params, cfg), jax.random.key(0))
  size = sum(x.size for x in jax.tree.leaves(shapes))
  stacked = jax.eval_shape(lambda p: stack.stacked_layer_params(p, cfg), shapes)
  stored = stacked["router"].size + stacked["source_norm"]["scale"].size
  live = hr.routing.live_mask(cfg.L, window, dilation)[:, 1:].sum()  # readers >= 1
  per_pair = cfg.H if router == "hidden-static" else cfg.D * cfg.H
  learnable = per_pair * live + (cfg.L - 1) * cfg.D
  assert flops.mixer_params(cfg) == learnable
  base = cfg.replace(router="none", router_window=None, router_dilation=None)
  assert size - stored + learnable == flops.total_params(cfg) == flops.total_params(base) + learnable
  if window is None and dilation is None:
    assert learnable == per_pair * (cfg.L * (cfg.L + 1) // 2 - 1) + (cfg.L - 1) * cfg.D


@pytest.mark.parametrize("router", ("none", "kv-static") + ROUTERS)
def test_flops_match_cost_analysis(router):
  """flops.py against XLA's count of the forward and of the gradient, layer scan unrolled.

  flops.py counts matmuls only; XLA also counts elementwise work (norms, softmax, masks), and
  the scanned stacks mix masked (zero-weight) sources inside each segment: at this tiny width
  that is 8-14% on top, so the bound is [1, 1.2].
  """
  B, T = 2, 16
  cfg = CFG.replace(router=router, T=T)
  unrolled = cfg.replace(scan_unroll=cfg.L)
  shapes = jax.eval_shape(functools.partial(M.init_params, cfg), jax.random.key(0))
  batch = {"inputs": jnp.zeros((B, T), jnp.int32), "targets": jnp.zeros((B, T), jnp.int32)}
  loss = functools.partial(loss_fn, model_cfg=unrolled, batch=batch)
  forward = jax.jit(loss).lower(shapes).cost_analysis()["flops"]
  step = jax.jit(jax.grad(loss)).lower(shapes).cost_analysis()["flops"]
  assert 1.0 <= forward / (flops.forward_flops_per_token(cfg, T) * B * T) <= 1.2
  assert 1.0 <= step / (flops.step_flops_per_token(cfg, T) * B * T) <= 1.2


def test_training_memory_grows_linearly_with_depth():
  """Gradient temp memory of the layer stack: the pull form at 2L stays within 2.1x of L; the
  naive carried buffer (autodiff saves it per layer) fails the same check."""
  cfg = CFG.replace(router="hidden-dynamic", D=64, Hd=16, F=128, T=64, scan_segments=1)
  pull_8, pull_16 = (model_checks.stack_grad_temp_bytes(cfg.replace(L=L), False) for L in (8, 16))
  assert pull_16 <= 2.1 * pull_8, (pull_8, pull_16)
  naive_8, naive_16 = (model_checks.stack_grad_temp_bytes(cfg.replace(L=L), True) for L in (8, 16))
  assert naive_16 > 2.1 * naive_8, (naive_8, naive_16)
  assert pull_16 < naive_16


@pytest.mark.parametrize("router", ROUTERS)
def test_cached_decoding_matches_full_forward(router):
  from lime_jax.inference import decode  # pylint: disable=g-import-not-at-top
  cfg = CFG.replace(router=router, L=3, T=32)
  params = _params(cfg)
  tokens_BxT = _tokens(cfg, B=2, T=9)
  full_BxTxV = jax.jit(M.Transformer(cfg).apply)({"params": params}, tokens_BxT)
  cache = decode.init_cache(cfg, 2, 12)
  logits_BxPxV, cache = decode.prefill(params, cfg, tokens_BxT[:, :5], cache, all_logits=True)
  steps = [logits_BxPxV]
  for t in range(5, 9):
    logits_BxV, cache = decode.decode_step(params, cfg, tokens_BxT[:, t:t + 1], cache)
    steps.append(logits_BxV[:, None])
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full_BxTxV, rtol=1e-5, atol=1e-5)


def test_config_errors_are_one_line():
  with pytest.raises(ValueError, match="ModelConfig.R: router='hidden-static'.*R = H"):
    CFG.replace(R=2)
  with pytest.raises(ValueError, match="router_weights: model has router='hidden-dynamic'"):
    M.router_weights(_params(CFG.replace(router="hidden-dynamic")), CFG.replace(router="hidden-dynamic"))
