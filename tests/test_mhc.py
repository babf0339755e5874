"""mHC (model/mixers/mhc.py): shapes, the init (doubly stochastic mixing, the baseline with
phi = 0, finite nonzero gradients), Sinkhorn-Knopp on random inputs, causality, scan vs
unrolled, a float64 loop reference, cached decoding, parameter and FLOP accounting, training
memory, config errors."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lime_jax.config import ModelConfig
from lime_jax.model import flops, stack
from lime_jax.model import transformer as M
from lime_jax.model.layers import dtype_of
from lime_jax.model.mixers import mhc
from lime_jax.model.stack import LayerStack
from lime_jax.studies import bench
from lime_jax.train.optimizer import param_labels
import model_checks
from test_connections import _np_sublayers
from test_model import _np_rms_norm

BASE = ModelConfig(V=64, D=32, L=3, H=4, R=2, F=64, T=16, router="none", scan_segments=2)
CFG = BASE.replace(connections="mhc", hc_expansion=4)
# Column sums are exact after Sinkhorn's last (column) step; rows converge linearly, slowest
# near a permutation. Measured after the paper's 20 steps: at init (diagonal 0.9, logits moved
# ~0.01 by the gates) rows are off by ~1e-5; for logits N(0, 1) by 4e-5; for logits N(0, 1)
# around the init bias (near the identity) by up to 2.2e-2, which more steps remove.
COL_TOL, INIT_ROW_TOL, ROW_TOL, NEAR_PERMUTATION_ROW_TOL = 1e-6, 1e-4, 1e-4, 5e-2


def _is_mhc(path) -> bool:
  return str(getattr(path[-1], "key", path[-1])).startswith("hc_")


@functools.lru_cache(maxsize=None)
def _random_params(cfg):
  """Init with gates at 1 (so a x~ phi ~ N(0, 1)) and noise in the biases: the maps vary per
  token and copy."""
  def init(rng):
    params = M.init_params(cfg, rng)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.fold_in(rng, 1), len(leaves))
    new = []
    for k, (p, x) in zip(keys, leaves):
      name = str(getattr(p[-1], "key", p[-1]))
      if name == "hc_gate":
        x = jnp.ones_like(x)
      elif name.startswith("hc_bias"):
        x = x + 0.5 * jax.random.normal(k, x.shape)
      new.append(x)
    return jax.tree.unflatten(treedef, new)
  return jax.jit(init)(jax.random.key(0))


_tokens = model_checks.tokens


def _res_matrices(params, cfg, tokens_BxT):
  """Every sub-layer's H_res [2L, B, T, n, n] (sown; unrolled layout)."""
  unrolled = cfg.replace(scan_layers=False)
  p = stack.convert_layout(params, cfg, unrolled)
  _, state = jax.jit(functools.partial(M.Transformer(unrolled).apply, mutable=["intermediates"]))(
      {"params": p}, tokens_BxT)
  layers = state["intermediates"]["layers"]
  return np.stack([np.asarray(layers[f"layer_{l}"][sub]["res_matrix"][0])
                   for l in range(cfg.L) for sub in ("hc_attn", "hc_mlp")])


def test_shapes_and_dtypes():
  params = jax.eval_shape(functools.partial(M.init_params, CFG), jax.random.key(0))
  stacked = jax.eval_shape(lambda p: stack.stacked_layer_params(p, CFG), params)
  L, n, D = CFG.L, CFG.hc_expansion, CFG.D
  for sub in ("hc_attn", "hc_mlp"):
    chex.assert_shape(stacked[sub]["hc_phi"], (L, n, D, n * n + 2 * n))
    chex.assert_shape(stacked[sub]["hc_gate"], (L, 3))
    chex.assert_shape(stacked[sub]["hc_bias_pre"], (L, n))
    chex.assert_shape(stacked[sub]["hc_bias_post"], (L, n))
    chex.assert_shape(stacked[sub]["hc_bias_res"], (L, n, n))
  for dtype in ("float32", "bfloat16"):
    cfg = CFG.replace(compute_dtype=dtype)
    logits = M.Transformer(cfg).apply({"params": _random_params(CFG)}, _tokens(cfg, 3, 11))
    chex.assert_shape(logits, (3, 11, cfg.V))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)
  # The stream between layers keeps the compute dtype (float32 only inside the maps).
  cfg = CFG.replace(compute_dtype="bfloat16")
  x = jax.ShapeDtypeStruct((2, 8, D), dtype_of("bfloat16"))
  positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
  out, _ = jax.eval_shape(lambda p, x: LayerStack(cfg).apply({"params": p}, x, positions),
                          params["layers"], x)
  chex.assert_type(out, jnp.bfloat16)


def test_init_mixing_matrix_is_doubly_stochastic_near_the_identity():
  params = M.init_params(CFG, jax.random.key(0))
  res = _res_matrices(params, CFG, _tokens(CFG, 2, 12))  # random tokens
  n = CFG.hc_expansion
  np.testing.assert_allclose(res.sum(axis=-2), 1.0, atol=COL_TOL)
  np.testing.assert_allclose(res.sum(axis=-1), 1.0, atol=INIT_ROW_TOL)
  assert np.all(res > 0)  # no entry underflowed: never an exact permutation
  # Near the init matrix d I + (1-d)/(n-1) (J - I): the gates (0.01) move it only slightly.
  init = np.where(np.eye(n, dtype=bool), mhc.RES_INIT_DIAGONAL,
                  (1 - mhc.RES_INIT_DIAGONAL) / (n - 1))
  np.testing.assert_allclose(res, np.broadcast_to(init, res.shape), atol=0.02)
  # The bias alone is Sinkhorn's fixed point.
  fixed = mhc.sinkhorn(mhc.res_bias_init(n), CFG.sinkhorn_iterations)
  np.testing.assert_allclose(fixed, init, rtol=1e-6)


def test_sinkhorn_is_doubly_stochastic_for_random_inputs():
  sinkhorn = jax.jit(mhc.sinkhorn, static_argnums=1)
  logits = jax.random.normal(jax.random.key(3), (256, 4, 4))
  out = np.asarray(sinkhorn(logits, 20))
  np.testing.assert_allclose(out.sum(axis=-2), 1.0, atol=COL_TOL)
  np.testing.assert_allclose(out.sum(axis=-1), 1.0, atol=ROW_TOL)
  assert np.all(out > 0)
  # Near the identity convergence is slow, but it converges.
  near = mhc.res_bias_init(4)[None] + logits
  row_error = {t: np.abs(np.asarray(sinkhorn(near, t)).sum(axis=-1) - 1).max()
               for t in (20, 100, 300)}
  assert NEAR_PERMUTATION_ROW_TOL > row_error[20] > row_error[100] > row_error[300], row_error
  assert row_error[300] < 1e-5, row_error
  # The model with random weights (gates 1): logits N(0, 1) around the init bias, per token.
  res = _res_matrices(_random_params(CFG), CFG, _tokens(CFG, 2, 12))
  np.testing.assert_allclose(res.sum(axis=-2), 1.0, atol=COL_TOL)
  np.testing.assert_allclose(res.sum(axis=-1), 1.0, atol=NEAR_PERMUTATION_ROW_TOL)
  assert np.all(res > 0)
  assert res.std(axis=(1, 2)).max() > 0.05  # the maps really vary per token
  # Extreme logits (a near permutation): no NaN, no overflow, columns still sum to 1.
  extreme = np.asarray(sinkhorn(200.0 * jnp.eye(4) - 100.0, 20))
  assert np.all(np.isfinite(extreme))
  np.testing.assert_allclose(extreme.sum(axis=-2), 1.0, atol=COL_TOL)


def test_init_with_zero_phi_equals_baseline():
  """phi = 0: H_pre = 1/n, H_post = 1, H_res doubly stochastic, so each copy holds the
  baseline's state and the model gives the baseline's logits (the final RMSNorm removes the
  factor n of the copies' sum, exactly when its eps is negligible)."""
  base_cfg, cfg = BASE.replace(norm_eps=1e-12), CFG.replace(norm_eps=1e-12)
  base_params = M.init_params(base_cfg, jax.random.key(0))
  params = M.init_params(cfg, jax.random.key(5))
  stacked = dict(stack.stacked_layer_params(params, cfg))
  stacked.update(stack.stacked_layer_params(base_params, base_cfg))
  for sub in ("hc_attn", "hc_mlp"):
    stacked[sub] = dict(stacked[sub], hc_phi=jnp.zeros_like(stacked[sub]["hc_phi"]))
  params = stack.with_stacked_layer_params({**base_params, "layers": params["layers"]}, stacked,
                                           cfg)
  tokens = _tokens(cfg)
  apply = jax.jit(lambda p, c, t: M.Transformer(c).apply({"params": p}, t), static_argnums=1)
  np.testing.assert_allclose(apply(params, cfg, tokens), apply(base_params, base_cfg, tokens),
                             rtol=1e-5, atol=1e-5)


def test_gradients_at_init_are_finite_and_nonzero():
  params = M.init_params(CFG, jax.random.key(0))
  grads = jax.jit(jax.grad(model_checks.next_token_loss), static_argnums=1)(
      params, CFG, _tokens(CFG, T=CFG.T + 1))
  chex.assert_tree_all_finite(grads)
  stacked = stack.stacked_layer_params(grads, CFG)
  for sub in ("hc_attn", "hc_mlp"):
    for name, g in stacked[sub].items():
      # Layer 0's attention reads n equal copies, which H_res cannot change: from layer 1 on.
      g = np.asarray(g)[1:]
      assert np.all(np.abs(g).reshape(g.shape[0], -1).max(axis=1) > 0), (sub, name)


def test_causality():
  model_checks.assert_causal(CFG, _random_params(CFG))


def test_scan_and_unrolled_agree():
  model_checks.assert_scan_matches_unrolled(CFG, _random_params(CFG))


def _np_sinkhorn(M_NxN, iterations):
  """The paper's Sinkhorn-Knopp: M(0) = exp(H~), M(t) = T_c(T_r(M(t-1)))."""
  M_NxN = np.exp(M_NxN)
  for _ in range(iterations):
    M_NxN = M_NxN / M_NxN.sum(axis=1, keepdims=True)
    M_NxN = M_NxN / M_NxN.sum(axis=0, keepdims=True)
  return M_NxN


def _np_reference_logits(params, cfg, tokens_T):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), stack.stacked_layer_params(params, cfg))
  embed = np.asarray(params["embed"], np.float64)
  x0 = embed[np.asarray(tokens_T)]
  T, n, D = x0.shape[0], cfg.hc_expansion, cfg.D
  sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z))
  x = np.stack([x0] * n)  # [n, T, D]
  for l in range(cfg.L):
    for sub, f in zip(("hc_attn", "hc_mlp"), _np_sublayers(p, cfg, l, T)):
      w = p[sub]
      phi = w["hc_phi"][l].reshape(n * D, -1)  # rows: vec(x) = (copy, channel)
      a_pre, a_post, a_res = w["hc_gate"][l]
      inputs, posts, ress = [], [], []
      for t in range(T):
        flat = x[:, t].reshape(n * D)
        normed = flat / np.sqrt(np.mean(flat ** 2) + cfg.norm_eps)
        proj = normed @ phi
        h_pre = sigmoid(a_pre * proj[:n] + w["hc_bias_pre"][l])
        posts.append(2 * sigmoid(a_post * proj[n:2 * n] + w["hc_bias_post"][l]))
        ress.append(_np_sinkhorn(a_res * proj[2 * n:].reshape(n, n) + w["hc_bias_res"][l],
                                 cfg.sinkhorn_iterations))
        inputs.append(h_pre @ x[:, t])
      out = f(np.stack(inputs))
      x = np.stack([np.stack([ress[t][c] @ x[:, t] + posts[t][c] * out[t] for t in range(T)])
                    for c in range(n)])
  h = _np_rms_norm(x.sum(axis=0), np.asarray(params["final_norm"]["scale"], np.float64),
                   cfg.norm_eps)
  return h @ embed.T


def test_matches_loop_reference():
  params = _random_params(CFG)
  tokens = _tokens(CFG, B=2, T=8)
  logits = np.asarray(jax.jit(M.Transformer(CFG).apply)({"params": params}, tokens))
  for b in range(2):
    np.testing.assert_allclose(logits[b], _np_reference_logits(params, CFG, tokens[b]),
                               rtol=2e-4, atol=2e-4)


def test_cached_decoding_matches_full_forward():
  model_checks.assert_cached_decoding_matches_full_forward(CFG, _random_params(CFG))


def test_parameter_count_is_exact_and_groups():
  params = jax.eval_shape(functools.partial(M.init_params, CFG), jax.random.key(0))
  assert sum(x.size for x in jax.tree.leaves(params)) == flops.total_params(CFG)
  n, D = CFG.hc_expansion, CFG.D
  assert flops.mixer_params(CFG) == 2 * CFG.L * ((n * D + 1) * (n * n + 2 * n) + 3)
  assert flops.total_params(CFG) - flops.total_params(BASE) == flops.mixer_params(CFG)
  labels = jax.tree_util.tree_leaves_with_path(param_labels(params))
  assert {g for p, g in labels if _is_mhc(p)} == {"no_decay"}


def test_flops_match_cost_analysis():
  """Extra step FLOPs over the baseline from XLA's cost analysis (scan unrolled, bench.py's
  method) against flops.py. Tolerance 25%: XLA also counts the element-wise work flops.py
  leaves out (Sinkhorn-Knopp's 2 x 20 log-sum-exps over n x n, sigmoids, the rms, the copies'
  final sum), as it does for the baseline's norms."""
  base = ModelConfig(V=64, D=128, L=4, H=4, R=4, F=256, T=64, router="none", scan_segments=2)
  cfg = base.replace(connections="mhc")
  B = 2

  def step_flops(c):
    return bench._cost_flops(model_checks.lowered_gradient(c.replace(scan_unroll=c.L), B))

  measured = step_flops(cfg) - step_flops(base)
  formula = 3 * 2 * flops.mixer_macs_per_token(cfg) * B * cfg.T
  assert formula == 3 * 2 * 2 * cfg.L * cfg.D * 4 * 5 * 6 * B * cfg.T
  assert 0.75 < measured / formula < 1.25, (measured, formula)


def test_training_memory_grows_linearly_with_depth():
  """Gradient temp bytes of the stack at 16 layers within 2.1x of 8 (the criterion that
  test_bench.py and test_value_residual.py show catching carried O(L) buffers): the stream is
  n x D per boundary and nothing else is carried."""
  cfg = CFG.replace(D=64, H=4, R=4, Hd=16, F=128, T=64, scan_segments=1)
  temp_8, temp_16 = (model_checks.stack_grad_temp_bytes(cfg.replace(L=L)) for L in (8, 16))
  assert temp_16 <= 2.1 * temp_8, (temp_8, temp_16)


@pytest.mark.parametrize("changes, message", [
    (dict(hc_expansion=1), "ModelConfig.hc_expansion: connections 'mhc' needs at least 2"),
    (dict(sinkhorn_iterations=0), "ModelConfig.sinkhorn_iterations: must be a positive integer"),
    (dict(router="value-residual"), "does not combine with router='value-residual'"),
])
def test_bad_config_is_one_line_error(changes, message):
  with pytest.raises(ValueError, match=message):
    CFG.replace(**changes)
