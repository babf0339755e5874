"""Value residual (model/mixers/value_residual.py): shapes, the init and the zero mix (the
baseline exactly), causality, scan vs unrolled, a float64 loop reference, cached decoding,
parameter and FLOP accounting, training memory next to a naive carried buffer, not LIMe."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lime_jax.config import ModelConfig
from lime_jax.model import flops, mixers, stack
from lime_jax.model import transformer as M
from lime_jax.model.mixers.base import project_kv
from lime_jax.model.mixers.value_residual import LAMBDA_INIT, ValueResidual, mixed_values
from lime_jax.model.layers import normal_init
from lime_jax.studies import bench
from lime_jax.train.optimizer import param_labels
import model_checks
from test_model import _np_rms_norm, _np_rope

BASE = ModelConfig(V=64, D=32, L=3, H=4, R=2, F=64, T=16, router="none", scan_segments=2)
CFG = BASE.replace(router="value-residual")


def _is_lambda(path) -> bool:
  return str(getattr(path[-1], "key", path[-1])) == "value_lambda"


def _with_lambdas(params, cfg, lambda_Lx2):
  stacked = stack.stacked_layer_params(params, cfg)
  return stack.with_stacked_layer_params(params, dict(stacked, value_lambda=lambda_Lx2), cfg)


@functools.lru_cache(maxsize=None)
def _random_params(cfg):
  """Init with random mixing weights (layer 0's unused pair too)."""
  def init(rng):
    params = M.init_params(cfg, rng)
    lambdas = 0.5 + 0.5 * jax.random.normal(jax.random.fold_in(rng, 1), (cfg.L, 2))
    return _with_lambdas(params, cfg, lambdas)
  return jax.jit(init)(jax.random.key(0))


_tokens = model_checks.tokens


def test_shapes_init_and_not_lime():
  params = M.init_params(CFG, jax.random.key(0))
  lambdas = np.asarray(stack.stacked_layer_params(params, CFG)["value_lambda"])
  np.testing.assert_array_equal(lambdas, np.full((CFG.L, 2), LAMBDA_INIT))
  logits = M.Transformer(CFG).apply({"params": params}, _tokens(CFG, 3, 11))
  chex.assert_shape(logits, (3, 11, CFG.V))
  chex.assert_type(logits, jnp.float32)
  assert not CFG.is_lime and type(mixers.build(CFG)) is ValueResidual
  assert not mixers.build(CFG).exportable


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_zero_mix_equals_baseline_exactly(compute_dtype):
  """lambda = (1, 0) in every layer: the baseline's logits bit for bit, same base params."""
  base_cfg, cfg = (c.replace(compute_dtype=compute_dtype) for c in (BASE, CFG))
  base_params = M.init_params(base_cfg, jax.random.key(0))
  stacked = dict(stack.stacked_layer_params(base_params, base_cfg),
                 value_lambda=jnp.tile(jnp.array([1.0, 0.0]), (cfg.L, 1)))
  params = stack.with_stacked_layer_params(base_params, stacked, cfg)
  tokens = _tokens(cfg)
  apply = jax.jit(lambda p, c, t: M.Transformer(c).apply({"params": p}, t), static_argnums=1)
  np.testing.assert_array_equal(apply(params, cfg, tokens), apply(base_params, base_cfg, tokens))
  # ... and the default init (0.5, 0.5) differs from it.
  init = _with_lambdas(params, cfg, jnp.full((cfg.L, 2), LAMBDA_INIT))
  assert not np.allclose(apply(init, cfg, tokens), apply(base_params, base_cfg, tokens))


def test_causality():
  model_checks.assert_causal(CFG, _random_params(CFG))


def test_scan_and_unrolled_agree_and_layer_0_pair_is_unused():
  grads = model_checks.assert_scan_matches_unrolled(CFG, _random_params(CFG))
  grad_Lx2 = np.asarray(stack.stacked_layer_params(grads, CFG)["value_lambda"])
  assert np.all(grad_Lx2[0] == 0.0) and np.all(grad_Lx2[1:] != 0.0)


def _np_reference_logits(params, cfg, tokens_T):
  """The paper's equations, one layer at a time in float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), stack.stacked_layer_params(params, cfg))
  embed = np.asarray(params["embed"], np.float64)
  x = embed[np.asarray(tokens_T)]
  T, group = x.shape[0], cfg.H // cfg.R
  causal = np.tril(np.ones((T, T), bool))
  v_first = None
  for l in range(cfg.L):
    h = _np_rms_norm(x, p["attn_norm"]["scale"][l], cfg.norm_eps)
    kv = np.einsum("td,drck->trck", h, p["kv_proj"][l])
    q = _np_rope(np.einsum("td,dhk->thk", h, p["attn"]["q_proj"][l]), cfg.rope_theta)
    k, v = _np_rope(kv[:, :, 0], cfg.rope_theta), kv[:, :, 1]
    if l == 0:
      v_first = v
    else:
      lambda_self, lambda_first = p["value_lambda"][l]
      v = lambda_self * v + lambda_first * v_first
    out = np.zeros((T, cfg.H, cfg.Hd))
    for head in range(cfg.H):
      scores = np.where(causal, q[:, head] @ k[:, head // group].T / np.sqrt(cfg.Hd), -np.inf)
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      out[:, head] = probs / probs.sum(-1, keepdims=True) @ v[:, head // group]
    x = x + np.einsum("thk,hkd->td", out, p["attn"]["o_proj"][l])
    h = _np_rms_norm(x, p["mlp_norm"]["scale"][l], cfg.norm_eps)
    gate, up = h @ p["mlp"]["gate_up"][l][:, 0], h @ p["mlp"]["gate_up"][l][:, 1]
    x = x + (gate / (1 + np.exp(-gate)) * up) @ p["mlp"]["down"][l]
  h = _np_rms_norm(x, np.asarray(params["final_norm"]["scale"], np.float64), cfg.norm_eps)
  return h @ embed.T


def test_matches_loop_reference():
  params = _random_params(CFG)
  tokens = _tokens(CFG, B=2, T=8)
  logits = np.asarray(jax.jit(M.Transformer(CFG).apply)({"params": params}, tokens))
  for b in range(2):
    np.testing.assert_allclose(logits[b], _np_reference_logits(params, CFG, tokens[b]),
                               rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_cached_decoding_matches_full_forward(scan_layers):
  cfg = CFG.replace(scan_layers=scan_layers)
  params = _random_params(CFG)
  if not scan_layers:
    params = stack.convert_layout(params, CFG, cfg)
  model_checks.assert_cached_decoding_matches_full_forward(cfg, params)


def test_parameter_count_is_exact_and_groups():
  params = jax.eval_shape(functools.partial(M.init_params, CFG), jax.random.key(0))
  stored = sum(x.size for x in jax.tree.leaves(params))
  assert stored - 2 == flops.total_params(CFG)  # layer 0's stored pair is not a parameter
  assert flops.mixer_params(CFG) == 2 * (CFG.L - 1)
  assert flops.total_params(CFG) - flops.total_params(BASE) == flops.mixer_params(CFG)
  labels = jax.tree_util.tree_leaves_with_path(param_labels(params))
  assert {g for p, g in labels if _is_lambda(p)} == {"no_decay"}


def test_flops_match_cost_analysis():
  """Extra step FLOPs over the baseline from XLA's cost analysis (scan unrolled, bench.py's
  method) against flops.py's 2 R Hd (L - 1) multiply-adds per token, i.e. 3 x 2 x 2 = 12 train
  FLOPs per value element and mixing layer. The mix is element-wise, so XLA's count differs in
  kind from the 3x-forward rule: the backward also reduces for both lambdas and selects the
  carry, and under the scan layer 0 runs the (1, 0) mix too. Measured: 16 FLOPs per element and
  layer, all L layers, exactly linear in L; the ratio to the rule is checked within [1, 1.5)."""
  base = ModelConfig(V=64, D=128, L=4, H=4, R=4, F=256, T=64, router="none", scan_segments=2)
  B = 2

  def step_flops(c):
    return bench._cost_flops(model_checks.lowered_gradient(c.replace(scan_unroll=c.L), B))

  elements = B * base.T * base.R * base.Hd
  extra = {L: step_flops(base.replace(L=L, router="value-residual")) - step_flops(base.replace(L=L))
           for L in (4, 8)}
  per_layer = (extra[8] - extra[4]) / 4 / elements
  np.testing.assert_allclose(extra[4], 4 * per_layer * elements, rtol=1e-6)  # every layer alike
  cfg = base.replace(router="value-residual")
  formula = 3 * 2 * flops.mixer_macs_per_token(cfg) * B * cfg.T
  assert formula == 3 * 2 * 2 * (cfg.L - 1) * elements
  assert 1.0 <= per_layer / 12 < 1.5, per_layer


class _NaiveValueResidual(ValueResidual):
  """The same model written with a carried buffer of every layer's values [L, B, T, R, Hd],
  read by a masked mix over all of it (as a dense value residual would): autodiff saves the
  buffer once per layer, O(L^2)."""

  def start(self, stack_module, x_BxTxD):
    cfg = self.cfg
    B, T, _ = x_BxTxD.shape
    return x_BxTxD, jnp.zeros((cfg.L, B, T, cfg.R, cfg.Hd), jnp.float32)

  def kv(self, block, x_BxTxD, h_BxTxD, buffer_LxBxTxRxHd, layer_idx):
    lambda_2 = block.param("value_lambda", lambda rng: jnp.full((2,), LAMBDA_INIT))
    kv_BxTxRx2xHd = project_kv(block, self.cfg, h_BxTxD, normal_init)
    v_BxTxRxHd = kv_BxTxRx2xHd[:, :, :, 1]
    buffer_LxBxTxRxHd = jax.lax.dynamic_update_index_in_dim(buffer_LxBxTxRxHd, v_BxTxRxHd,
                                                            layer_idx, 0)
    first_L = (jnp.arange(self.cfg.L) == 0) * lambda_2[1]
    mixed = lambda_2[0] * v_BxTxRxHd + jnp.einsum("l,lbtrh->btrh", first_L, buffer_LxBxTxRxHd)
    v_BxTxRxHd = jnp.where(layer_idx == 0, v_BxTxRxHd, mixed)
    return kv_BxTxRx2xHd.at[:, :, :, 1].set(v_BxTxRxHd), buffer_LxBxTxRxHd


def test_training_memory_grows_linearly_with_depth(monkeypatch):
  """Gradient temp bytes of the stack: at 16 layers within 2.1x of 8 (v_0 is one carry); the
  naive carried buffer of all values fails the same check."""
  cfg = CFG.replace(D=64, H=4, R=4, Hd=16, F=128, T=64, scan_segments=1)
  temp_8, temp_16 = (model_checks.stack_grad_temp_bytes(cfg.replace(L=L)) for L in (8, 16))
  assert temp_16 <= 2.1 * temp_8, (temp_8, temp_16)
  monkeypatch.setitem(mixers.MIXERS, "value-residual", _NaiveValueResidual)
  naive_8, naive_16 = (model_checks.stack_grad_temp_bytes(cfg.replace(L=L)) for L in (8, 16))
  assert naive_16 > 2.1 * naive_8, (naive_8, naive_16)
  assert temp_16 < naive_16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mixed_values_gradient_is_autodiffs(dtype):
  """mixed_values' own backward (v and v_0 saved in their dtype) gives autodiff's gradients, in
  the same dtypes."""
  v_BxTxRxHd, v0_BxTxRxHd, dmixed_BxTxRxHd = (
      jax.random.normal(jax.random.key(i), (2, 5, 3, 4)).astype(dtype) for i in range(3))
  weights = (jnp.float32(0.7), jnp.float32(-0.4))
  autodiff = lambda a, b, v, v0: (a * v.astype(jnp.float32)  # noqa: E731
                                  + b * v0.astype(jnp.float32)).astype(v.dtype)
  expected = jax.vjp(autodiff, *weights, v_BxTxRxHd, v0_BxTxRxHd)[1](dmixed_BxTxRxHd)
  got = jax.vjp(mixed_values, *weights, v_BxTxRxHd, v0_BxTxRxHd)[1](dmixed_BxTxRxHd)
  chex.assert_trees_all_equal_dtypes(got, expected)
  chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_mix_saves_no_float32_copy_of_the_values(scan_layers):
  """In bf16 under a remat policy the value residual saves no float32 [B, T, R, Hd] array (the
  baseline saves none): autodiff of the float32 mix saved v's and v_0's copies, two a layer."""
  cfg = BASE.replace(compute_dtype="bfloat16", remat_policy="dots", scan_layers=scan_layers)
  per_depth = lambda cfg: [model_checks.saved_float32_residuals(  # noqa: E731
      cfg.replace(L=L), (2, cfg.T, cfg.R, cfg.Hd)) for L in (2, 3)]
  assert per_depth(cfg.replace(router="value-residual")) == per_depth(cfg)


@pytest.mark.parametrize("changes, message", [
    (dict(router_window=2), "sparse routing needs a LIMe router, got router='value-residual'"),
    (dict(top_p=0.5), "ModelConfig.top_p: pruning needs router in"),
    (dict(connections="mhc"), "does not combine with router='value-residual'"),
])
def test_bad_config_is_one_line_error(changes, message):
  with pytest.raises(ValueError, match=message):
    CFG.replace(**changes)
