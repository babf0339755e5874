"""Depth-Attention (mixers/depth_attention.py): no parameters, one layer is the baseline,
shapes, causality, scan vs unrolled, pull vs naive autodiff, a float64 loop reference, cached
decoding, FLOP accounting against XLA, training memory linear in depth, config rules."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lime_jax.config import ModelConfig
from lime_jax.inference import decode
from lime_jax.interop import hf
from lime_jax.model import flops
from lime_jax.model import stack
from lime_jax.model import transformer as M
from lime_jax.model.mixers import depth_attention as da
from lime_jax.model.stack import LayerStack
from lime_jax.studies import analysis, bench
from lime_jax.train.step import loss_fn
import model_checks
from test_model import _np_rms_norm, _np_rope

# L=3 in two segments: the pull stack runs segments of 1 and 2 layers.
MHA = ModelConfig(V=64, D=32, L=3, H=4, R=4, F=64, T=16, router="depth-attention",
                  scan_segments=2)
GQA = MHA.replace(R=2)

_tokens = model_checks.tokens


@functools.lru_cache(maxsize=None)
def _params(cfg):
  """Init with q and kv projections scaled up 10x: depth logits of order 1, so the depth
  weights are far from uniform and every term of the mix matters."""
  def init(rng):
    params = M.init_params(cfg, rng)
    stacked = stack.stacked_layer_params(params, cfg)
    attn = dict(stacked["attn"], q_proj=10 * stacked["attn"]["q_proj"])
    stacked = dict(stacked, attn=attn, kv_proj=10 * stacked["kv_proj"])
    return stack.with_stacked_layer_params(params, stacked, cfg)
  return jax.jit(init)(jax.random.key(0))


def test_adds_no_parameters():
  """The parameter tree is the baseline's, path for path and shape for shape."""
  for cfg in (MHA, GQA, GQA.replace(scan_layers=False)):
    shapes = jax.eval_shape(functools.partial(M.init_params, cfg), jax.random.key(0))
    base = cfg.replace(router="none")
    base_shapes = jax.eval_shape(functools.partial(M.init_params, base), jax.random.key(0))
    assert jax.tree.structure(shapes) == jax.tree.structure(base_shapes)
    assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, base_shapes)
    assert flops.mixer_params(cfg) == 0
    assert sum(x.size for x in jax.tree.leaves(shapes)) == flops.total_params(cfg) == \
        flops.total_params(base)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_one_layer_is_the_baseline(scan_layers):
  """With one layer the depth softmax has one source, weight exactly 1: the baseline."""
  cfg = GQA.replace(L=1, scan_layers=scan_layers)
  params = _params(cfg)
  tokens_BxT = _tokens(cfg, B=2, T=10)
  logits = M.Transformer(cfg).apply({"params": params}, tokens_BxT)
  base = M.Transformer(cfg.replace(router="none")).apply({"params": params}, tokens_BxT)
  np.testing.assert_array_equal(logits, base)
  # Two layers differ from the baseline: the second layer mixes.
  cfg2 = cfg.replace(L=2)
  params2 = _params(cfg2)
  two = M.Transformer(cfg2).apply({"params": params2}, tokens_BxT)
  two_base = M.Transformer(cfg2.replace(router="none")).apply({"params": params2}, tokens_BxT)
  assert float(jnp.abs(two - two_base).max()) > 1e-3


def test_shapes_and_causality():
  cfg = GQA
  params = _params(cfg)
  logits_BxTxV = jax.jit(M.Transformer(cfg).apply)({"params": params}, _tokens(cfg, B=3, T=11))
  chex.assert_shape(logits_BxTxV, (3, 11, cfg.V))
  chex.assert_type(logits_BxTxV, jnp.float32)
  chex.assert_tree_all_finite(logits_BxTxV)
  model_checks.assert_causal(cfg, params)


@pytest.mark.parametrize("cfg", [MHA, GQA], ids=["mha", "gqa"])
def test_scan_and_unrolled_agree(cfg):
  """Scanned training runs the pull form, unrolled plain autodiff: same loss and gradients."""
  model_checks.assert_scan_matches_unrolled(cfg, _params(cfg))


def test_pull_form_equals_autodiff_through_the_carried_buffer():
  cfg = GQA
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


# A loop-based reference of the forward from the method's equations, in float64 NumPy.

def _np_softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def _np_reference_logits(params, cfg, tokens_T):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), stack.stacked_layer_params(params, cfg))
  embed = np.asarray(params["embed"], np.float64)
  x = embed[np.asarray(tokens_T)]
  T = x.shape[0]
  G = cfg.H // cfg.R
  raw_kv = []  # raw_kv[j]: layer j's keys and values [T, R, 2, Hd] before RoPE
  for l in range(cfg.L):
    h = _np_rms_norm(x, p["attn_norm"]["scale"][l], cfg.norm_eps)
    raw_kv.append(np.einsum("td,drck->trck", h, p["kv_proj"][l]))
    q = np.einsum("td,dhk->thk", h, p["attn"]["q_proj"][l])  # before RoPE
    v = np.zeros((T, cfg.R, cfg.Hd))
    for t in range(T):
      for r in range(cfg.R):
        depth_query = np.mean([q[t, r * G + g] for g in range(G)], axis=0)
        scores = np.array([depth_query @ raw_kv[j][t, r, 0] for j in range(l + 1)])
        w = _np_softmax(scores / np.sqrt(cfg.Hd))
        v[t, r] = sum(w[j] * raw_kv[j][t, r, 1] for j in range(l + 1))
    q = _np_rope(q, cfg.rope_theta)
    k = _np_rope(raw_kv[l][:, :, 0], cfg.rope_theta)
    out = np.zeros((T, cfg.H, cfg.Hd))
    for head in range(cfg.H):
      scores = q[:, head] @ k[:, head // G].T / np.sqrt(cfg.Hd)
      scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      out[:, head] = probs / probs.sum(-1, keepdims=True) @ v[:, head // G]
    x = x + np.einsum("thk,hkd->td", out, p["attn"]["o_proj"][l])
    h = _np_rms_norm(x, p["mlp_norm"]["scale"][l], cfg.norm_eps)
    gate, up = h @ p["mlp"]["gate_up"][l][:, 0], h @ p["mlp"]["gate_up"][l][:, 1]
    x = x + (gate / (1 + np.exp(-gate)) * up) @ p["mlp"]["down"][l]
  h = _np_rms_norm(x, np.asarray(params["final_norm"]["scale"], np.float64), cfg.norm_eps)
  return h @ embed.T


@pytest.mark.parametrize("cfg, scan_layers", [(MHA, True), (GQA, True), (GQA, False)],
                         ids=["mha-scan", "gqa-scan", "gqa-unrolled"])
def test_matches_loop_reference(cfg, scan_layers):
  params = _params(cfg)
  run_cfg = cfg.replace(scan_layers=scan_layers)
  run_params = stack.convert_layout(params, cfg, run_cfg)
  tokens_BxT = _tokens(cfg, B=2, T=10)
  logits = np.asarray(jax.jit(M.Transformer(run_cfg).apply)({"params": run_params}, tokens_BxT))
  for b in range(2):
    np.testing.assert_allclose(logits[b], _np_reference_logits(params, cfg, tokens_BxT[b]),
                               rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("cfg", [MHA, GQA], ids=["mha", "gqa"])
def test_cached_decoding_matches_full_forward(cfg):
  """Prefill + token-by-token decoding (the cache holds the mixed values) give the full
  forward's logits, scanned and unrolled."""
  tokens_BxT = _tokens(cfg, B=2, T=9)
  params = _params(cfg)
  full_BxTxV = jax.jit(M.Transformer(cfg).apply)({"params": params}, tokens_BxT)
  for run_cfg in (cfg, cfg.replace(scan_layers=False)):
    run_params = stack.convert_layout(params, cfg, run_cfg)
    cache = decode.init_cache(run_cfg, 2, 12)
    logits_BxPxV, cache = decode.prefill(run_params, run_cfg, tokens_BxT[:, :5], cache,
                                         all_logits=True)
    steps = [logits_BxPxV]
    for t in range(5, 9):
      logits_BxV, cache = decode.decode_step(run_params, run_cfg, tokens_BxT[:, t:t + 1], cache)
      steps.append(logits_BxV[:, None])
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full_BxTxV, rtol=1e-5, atol=1e-5,
                               err_msg=str(run_cfg))


def test_cache_holds_the_mixed_values():
  """The cache's values are the depth mixes, not the raw values: layer 0's equal its raw
  values (one source), layer 1's differ from its raw values."""
  cfg = GQA.replace(scan_layers=False)
  params = _params(cfg)
  tokens_BxT = _tokens(cfg, B=1, T=6)
  _, cache = decode.prefill(params, cfg, tokens_BxT, decode.init_cache(cfg, 1, 6),
                            all_logits=True)
  _, state = M.Transformer(cfg).apply({"params": params}, tokens_BxT, mutable="intermediates")
  raw_values = state["intermediates"]["layers"]
  for l, differs in ((0, False), (1, True)):
    raw_BxTxRxHd = raw_values[f"layer_{l}"]["values"][0]
    gap = float(jnp.abs(cache.v_LxBxSxRxHd[l] - raw_BxTxRxHd).max())
    assert (gap > 1e-3) == differs, (l, gap)


@pytest.mark.parametrize("policy", ["full", "dots", "save_proj"])
def test_remat_gives_equal_gradients(policy):
  """Attention is rematerialized with the raw-kv buffer as an input: same gradients, scanned
  (pull form) and unrolled."""
  for cfg in (GQA, GQA.replace(scan_layers=False)):
    params = stack.convert_layout(_params(GQA), GQA, cfg)
    tokens_BxT = _tokens(cfg, T=cfg.T + 1)
    grad = jax.jit(jax.grad(model_checks.next_token_loss), static_argnums=1)
    chex.assert_trees_all_close(grad(params, cfg, tokens_BxT),
                                grad(params, cfg.replace(remat_policy=policy), tokens_BxT),
                                rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_is_finite_and_close():
  cfg = GQA
  params = _params(cfg)
  tokens_BxT = _tokens(cfg)
  logits32 = M.Transformer(cfg).apply({"params": params}, tokens_BxT)
  logits16 = M.Transformer(cfg.replace(compute_dtype="bfloat16")).apply({"params": params},
                                                                        tokens_BxT)
  chex.assert_type(logits16, jnp.float32)
  chex.assert_tree_all_finite(logits16)
  np.testing.assert_allclose(logits16, logits32, atol=0.05)
  assert float(jnp.abs(logits16 - logits32).max()) > 0  # bf16 really ran


def _cost_flops(cfg, B, grad):
  shapes = jax.eval_shape(functools.partial(M.init_params, cfg), jax.random.key(0))
  batch = {"inputs": jnp.zeros((B, cfg.T), jnp.int32), "targets": jnp.zeros((B, cfg.T), jnp.int32)}
  loss = functools.partial(loss_fn, model_cfg=cfg, batch=batch)
  return bench._cost_flops(jax.jit(jax.grad(loss) if grad else loss).lower(shapes))


def test_flops_match_cost_analysis():
  """flops.py against XLA's count. One scan segment per layer: layer l's traced reads then
  cover exactly slots 0..l, the live work the formula counts.

  - the forward's increment over the baseline against 2 * extra_macs_per_token: XLA also counts
    the element-wise work (scale, masked softmax) that flops.py leaves out, as it does the
    baseline's norms: 12% here (Hd 32), so the bound is [1, 1.2];
  - the whole forward and training step (pull-form recomputation included) against flops.py,
    [1, 1.2] as for the other methods (test_hidden_routing.py)."""
  B = 2
  cfg = ModelConfig(V=64, D=128, L=6, H=4, R=4, F=256, T=32, router="depth-attention",
                    scan_segments=6, scan_unroll=6)  # XLA counts a while-loop body once
  base = cfg.replace(router="none")
  assert flops.mixer_macs_per_token(cfg) == sum(2 * (l + 1) * cfg.R * cfg.Hd for l in range(cfg.L))
  extra = _cost_flops(cfg, B, grad=False) - _cost_flops(base, B, grad=False)
  formula = 2 * flops.mixer_macs_per_token(cfg) * B * cfg.T
  assert 1.0 <= extra / formula <= 1.2, (extra, formula)
  forward = _cost_flops(cfg, B, grad=False)
  step = _cost_flops(cfg, B, grad=True)
  assert 1.0 <= forward / (flops.forward_flops_per_token(cfg, cfg.T) * B * cfg.T) <= 1.2
  assert 1.0 <= step / (flops.step_flops_per_token(cfg, cfg.T) * B * cfg.T) <= 1.2


def test_training_memory_grows_linearly_with_depth():
  """Gradient temp memory of the layer stack: the pull form at 2L stays within 2.1x of L; plain
  autodiff through the scan (it saves the carried raw-kv buffer once per layer) fails it."""
  cfg = MHA.replace(D=64, Hd=16, F=128, T=64, scan_segments=1)
  pull_8, pull_16 = (model_checks.stack_grad_temp_bytes(cfg.replace(L=L), False) for L in (8, 16))
  assert pull_16 <= 2.1 * pull_8, (pull_8, pull_16)
  naive_8, naive_16 = (model_checks.stack_grad_temp_bytes(cfg.replace(L=L), True) for L in (8, 16))
  assert naive_16 > 2.1 * naive_8, (naive_8, naive_16)
  assert pull_16 < naive_16


def test_config_rules_and_labels(tmp_path):
  """Not LIMe: no sparse routing, top-p or connections; labelled by name; not exportable."""
  assert not MHA.is_lime
  with pytest.raises(ValueError, match="router_window: sparse routing needs a LIMe router, got"
                                       " router='depth-attention'"):
    MHA.replace(router_window=2)
  with pytest.raises(ValueError, match="ModelConfig.top_p: pruning needs router"):
    MHA.replace(top_p=0.9)
  with pytest.raises(ValueError, match="'denseformer' is a baseline and does not combine with"
                                       " router='depth-attention'"):
    MHA.replace(connections="denseformer")
  assert analysis._default_label(MHA) == "depth-attention"
  params = jax.eval_shape(functools.partial(M.init_params, MHA), jax.random.key(0))
  with pytest.raises(ValueError, match="export: router='depth-attention'"):
    hf.export_params(params, MHA, str(tmp_path))
  assert da.num_extra_macs(L=1, R=2, Hd=8) == 2 * 2 * 8
