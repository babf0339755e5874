"""Hyper-connections and DenseFormer (connections.py): shapes, init equivalence with the
baseline, causality, scan vs unrolled, a float64 loop reference, cached decoding, parameter
and FLOP accounting, training memory."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lime_jax.studies import bench
from lime_jax.model.mixers import denseformer, hyper
from lime_jax.model import flops
from lime_jax.model import transformer as M
from lime_jax.model import stack
from lime_jax.config import ModelConfig
from lime_jax.train.optimizer import param_labels
import model_checks
from test_model import _np_rms_norm, _np_rope

# L=3 in two segments (1 and 2 layers): DenseFormer's segmented accumulator is exercised.
BASE = ModelConfig(V=64, D=32, L=3, H=4, R=2, F=64, T=16, router="none", scan_segments=2)
VARIANTS = {
    "hyper-static": BASE.replace(connections="hyper-static", hc_expansion=3),
    "hyper-dynamic": BASE.replace(connections="hyper-dynamic", hc_expansion=4),
    "denseformer": BASE.replace(connections="denseformer"),
    "denseformer-2x2": BASE.replace(connections="denseformer", denseformer_dilation=2,
                                    denseformer_period=2, L=4),
}


def _is_connection(path) -> bool:
  leaf = str(getattr(path[-1], "key", path[-1]))
  return leaf == "dwa" or leaf.startswith("hc_")


@functools.lru_cache(maxsize=None)
def _random_params(cfg):
  """Init params with noise in every connection weight (dead DenseFormer ones too)."""
  def init(rng):
    params = M.init_params(cfg, rng)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.fold_in(rng, 1), len(leaves))
    # Init plus noise: every weight matters, and the stream stays well conditioned.
    new = [x + 0.2 * jax.random.normal(k, x.shape) if _is_connection(p) else x
           for k, (p, x) in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, new)
  return jax.jit(init)(jax.random.key(0))


_tokens = model_checks.tokens


_loss = model_checks.next_token_loss


def test_shapes():
  # Traced only (eval_shape): values are checked by every test below.
  for name in ("hyper-dynamic", "denseformer"):
    cfg = VARIANTS[name]
    params = jax.eval_shape(functools.partial(M.init_params, cfg), jax.random.key(0))
    logits = jax.eval_shape(M.Transformer(cfg).apply, {"params": params}, _tokens(cfg, 3, 11))
    chex.assert_shape(logits, (3, 11, cfg.V))
    chex.assert_type(logits, jnp.float32)
    stacked = jax.eval_shape(lambda p: stack.stacked_layer_params(p, cfg), params)
    L, n = cfg.L, cfg.hc_expansion
    if name == "denseformer":
      chex.assert_shape(stacked["denseformer"]["dwa"], (L, L))
      chex.assert_shape(params["layers"]["denseformer_input"]["dwa"], (L,))
      continue
    for sub in ("hc_attn", "hc_mlp"):
      chex.assert_shape(stacked[sub]["hc_alpha"], (L, n, n + 1))
      chex.assert_shape(stacked[sub]["hc_beta"], (L, n))
      chex.assert_shape(stacked[sub]["hc_alpha_proj"], (L, cfg.D, n + 1))
      chex.assert_shape(stacked[sub]["hc_beta_proj"], (L, cfg.D))


@pytest.mark.parametrize("name", ["hyper-dynamic", "denseformer"])
def test_init_equals_baseline(name):
  """With the baseline's weights in the shared parameters, the variant at init gives the
  baseline's logits: bit-exact for DenseFormer; for hyper-connections exactly when the final
  RMSNorm's eps is negligible (the output is n x the baseline's state, and the norm removes
  the factor only up to eps; summing n copies rounds), close with the default eps."""
  apply = jax.jit(lambda params, cfg, tokens: M.Transformer(cfg).apply({"params": params}, tokens),
                  static_argnums=1)
  for eps in (1e-12, BASE.norm_eps) if name == "hyper-dynamic" else (1e-12,):
    base_cfg = BASE.replace(norm_eps=eps)
    cfg = VARIANTS[name].replace(norm_eps=eps)
    base_params = M.init_params(base_cfg, jax.random.key(0))
    params = M.init_params(cfg, jax.random.key(5))
    stacked = dict(stack.stacked_layer_params(params, cfg))
    stacked.update(stack.stacked_layer_params(base_params, base_cfg))
    params = stack.with_stacked_layer_params({**base_params, "layers": params["layers"]}, stacked, cfg)
    tokens = _tokens(cfg)
    base_logits = np.asarray(apply(base_params, base_cfg, tokens))
    logits = np.asarray(apply(params, cfg, tokens))
    if name == "denseformer":
      np.testing.assert_array_equal(logits, base_logits)
    elif eps == 1e-12:
      np.testing.assert_allclose(logits, base_logits, rtol=1e-6, atol=1e-6)
    else:
      np.testing.assert_allclose(logits, base_logits, atol=5e-3)
  # Init values per the papers / spec section 6.
  if name == "denseformer":
    alpha = np.asarray(denseformer.dwa_weights(
        stack.stacked_layer_params(params, cfg)["denseformer"]["dwa"],
        params["layers"]["denseformer_input"]["dwa"], cfg))
    np.testing.assert_array_equal(alpha, np.eye(cfg.L, cfg.L + 1, k=1))
  else:
    alpha = np.asarray(stack.stacked_layer_params(params, cfg)["hc_mlp"]["hc_alpha"])
    n = cfg.hc_expansion
    for l in range(cfg.L):
      np.testing.assert_array_equal(alpha[l, :, 0], np.eye(n)[(2 * l + 1) % n])
      np.testing.assert_array_equal(alpha[l, :, 1:], np.eye(n))


@pytest.mark.parametrize("name", ["hyper-dynamic", "denseformer-2x2"])
def test_causality(name):
  cfg = VARIANTS[name]
  params = _random_params(cfg)
  model_checks.assert_causal(cfg, params)


@pytest.mark.parametrize("name", ["hyper-dynamic", "denseformer-2x2"])
def test_scan_and_unrolled_agree(name):
  scan_cfg = VARIANTS[name]
  grads_s = model_checks.assert_scan_matches_unrolled(scan_cfg, _random_params(scan_cfg))
  if name.startswith("denseformer"):  # dead averaging weights: exactly zero gradient
    live = denseformer.dwa_live_mask(scan_cfg.L, scan_cfg.denseformer_dilation,
                                     scan_cfg.denseformer_period)  # [source, reader]
    grad_SxL = np.concatenate([np.asarray(grads_s["layers"]["denseformer_input"]["dwa"])[None],
                               np.asarray(stack.stacked_layer_params(grads_s, scan_cfg)
                                          ["denseformer"]["dwa"])])
    assert np.all(grad_SxL[~live] == 0.0) and np.all(grad_SxL[live] != 0.0)


# A float64 loop reference, from the papers' equations.

def _np_sublayers(p, cfg, l, T):
  group = cfg.H // cfg.R

  def attn(x):
    h = _np_rms_norm(x, p["attn_norm"]["scale"][l], cfg.norm_eps)
    kv = np.einsum("td,drck->trck", h, p["kv_proj"][l])
    q = _np_rope(np.einsum("td,dhk->thk", h, p["attn"]["q_proj"][l]), cfg.rope_theta)
    k, v = _np_rope(kv[:, :, 0], cfg.rope_theta), kv[:, :, 1]
    out = np.zeros((T, cfg.H, cfg.Hd))
    for head in range(cfg.H):
      scores = q[:, head] @ k[:, head // group].T / np.sqrt(cfg.Hd)
      scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      out[:, head] = probs / probs.sum(-1, keepdims=True) @ v[:, head // group]
    return np.einsum("thk,hkd->td", out, p["attn"]["o_proj"][l])

  def mlp(x):
    h = _np_rms_norm(x, p["mlp_norm"]["scale"][l], cfg.norm_eps)
    gate, up = h @ p["mlp"]["gate_up"][l][:, 0], h @ p["mlp"]["gate_up"][l][:, 1]
    return (gate / (1 + np.exp(-gate)) * up) @ p["mlp"]["down"][l]

  return attn, mlp


def _np_reference_logits(params, cfg, tokens_T):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), stack.stacked_layer_params(params, cfg))
  embed = np.asarray(params["embed"], np.float64)
  x0 = embed[np.asarray(tokens_T)]
  T, n = x0.shape[0], cfg.hc_expansion
  if cfg.connections.startswith("hyper"):
    H = [x0.copy() for _ in range(n)]
    for l in range(cfg.L):
      for sub, f in zip(("hc_attn", "hc_mlp"), _np_sublayers(p, cfg, l, T)):
        w = p[sub]
        alphas, betas = [], []  # per token: A [n, n+1], B [n]
        for t in range(T):
          alpha, beta = w["hc_alpha"][l].copy(), w["hc_beta"][l].copy()
          if cfg.connections == "hyper-dynamic":
            for m in range(n):
              normed = H[m][t] / np.sqrt(np.mean(H[m][t] ** 2) + cfg.norm_eps)
              alpha[m] += w["hc_alpha_scale"][l] * np.tanh(normed @ w["hc_alpha_proj"][l])
              beta[m] += w["hc_beta_scale"][l] * np.tanh(normed @ w["hc_beta_proj"][l])
          alphas.append(alpha)
          betas.append(beta)
        x = np.stack([sum(alphas[t][m, 0] * H[m][t] for m in range(n)) for t in range(T)])
        out = f(x)
        new_H = [np.stack([sum(alphas[t][m, 1 + c] * H[m][t] for m in range(n))
                           + betas[t][c] * out[t] for t in range(T)]) for c in range(n)]
        H = new_H
    y = sum(H)
  else:  # DenseFormer
    k, period = cfg.denseformer_dilation, cfg.denseformer_period
    stored = np.concatenate([np.asarray(params["layers"]["denseformer_input"]["dwa"])[None],
                             p["denseformer"]["dwa"]])  # [source, reader]
    X, y = [x0], x0
    for l in range(cfg.L):
      attn, mlp = _np_sublayers(p, cfg, l, T)
      x = y + attn(y)
      X.append(x + mlp(x))
      i = l + 1  # the paper's 1-based block index
      if i % period:
        y = X[i]
      else:
        y = sum(stored[j, l] * X[j] for j in range(i + 1) if (i - j) % k == 0)
  h = _np_rms_norm(y, np.asarray(params["final_norm"]["scale"], np.float64), cfg.norm_eps)
  return h @ embed.T


@pytest.mark.parametrize("name", ["hyper-static", "hyper-dynamic", "denseformer-2x2"])
def test_matches_loop_reference(name):
  cfg = VARIANTS[name]
  params = _random_params(cfg)
  tokens = _tokens(cfg, B=2, T=8)
  logits = np.asarray(jax.jit(M.Transformer(cfg).apply)({"params": params}, tokens))
  for b in range(2):
    np.testing.assert_allclose(logits[b], _np_reference_logits(params, cfg, tokens[b]),
                               rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("name", ["hyper-dynamic", "denseformer-2x2"])
def test_cached_decoding_matches_full_forward(name):
  model_checks.assert_cached_decoding_matches_full_forward(VARIANTS[name].replace(T=16),
                                                          _random_params(VARIANTS[name]))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_count_is_exact(name):
  cfg = VARIANTS[name]
  params = jax.eval_shape(functools.partial(M.init_params, cfg), jax.random.key(0))
  stored = sum(x.size for x in jax.tree.leaves(params))
  dead = 0
  if cfg.connections == "denseformer":  # stored [L+1, L], of which the live ones are parameters
    dead = (cfg.L + 1) * cfg.L - denseformer.num_denseformer_params(cfg)
  assert stored - dead == flops.total_params(cfg)
  assert flops.total_params(cfg) - flops.total_params(BASE.replace(L=cfg.L)) == \
      flops.mixer_params(cfg)
  if name == "denseformer":
    assert flops.mixer_params(cfg) == cfg.L * (cfg.L + 3) // 2  # the paper's count
  labels = jax.tree_util.tree_leaves_with_path(param_labels(params))
  assert {g for p, g in labels if _is_connection(p)} == {"no_decay"}


@pytest.mark.parametrize("name", ["hyper-dynamic", "denseformer"])
def test_flops_match_cost_analysis(name):
  """Extra step FLOPs over the baseline, from XLA's cost analysis of the step lowered with the
  scan unrolled (bench.py's method), against flops.py. DenseFormer: its executed push MACs
  (masked slots included). Tolerance 25%: XLA also counts element-wise work (tanh, norms,
  adds, the copies' final sum) that flops.py leaves out, as it does for the baseline's norms."""
  base = ModelConfig(V=64, D=128, L=4, H=4, R=4, F=256, T=64, router="none", scan_segments=2)
  cfg = base.replace(connections=name)
  B = 2

  def step_flops(c):
    params = jax.eval_shape(functools.partial(M.init_params, c), jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((B, c.T + 1), jnp.int32)
    grad = jax.jit(jax.grad(_loss), static_argnums=1)
    return bench._cost_flops(grad.lower(params, c.replace(scan_unroll=c.L), tokens))

  measured = step_flops(cfg) - step_flops(base)
  if name == "denseformer":
    formula = 3 * 2 * flops.executed_push_macs_per_token(cfg) * B * cfg.T
  else:
    formula = 3 * 2 * flops.mixer_macs_per_token(cfg) * B * cfg.T
  assert 0.75 < measured / formula < 1.25, (measured, formula)


def test_denseformer_training_memory_grows_linearly_with_depth():
  """Compiled temp bytes of the gradient at L and 2L layers (criterion of test_bench.py, which
  also shows it catches the quadratic carried buffer). Hyper-connections carry n x D per layer
  boundary through plain autodiff, linear by construction; `lime-jax bench` measures them."""
  cfg = ModelConfig(V=64, D=64, L=4, H=4, R=4, F=128, T=64, router="none",
                    connections="denseformer", scan_segments=2)

  def temp(c):
    params = jax.eval_shape(functools.partial(M.init_params, c), jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((2, c.T + 1), jnp.int32)
    compiled = model_checks.compiled_as_users(
        jax.jit(jax.grad(_loss), static_argnums=1).lower(params, c, tokens))
    return compiled.memory_analysis().temp_size_in_bytes

  temp_L, temp_2L = temp(cfg), temp(cfg.replace(L=8))
  assert temp_2L <= 2.1 * temp_L, (temp_L, temp_2L)


@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16"])
def test_written_output_gradient_is_autodiffs(out_dtype):
  """hyper.written_output's own backward (out saved in its dtype) gives autodiff's gradients,
  in the same dtypes."""
  beta_BxTxN = jax.random.normal(jax.random.key(0), (2, 5, 3))
  out_BxTxD = jax.random.normal(jax.random.key(1), (2, 5, 8)).astype(out_dtype)
  dH_NxBxTxD = jax.random.normal(jax.random.key(2), (3, 2, 5, 8))
  autodiff = lambda beta, out: jnp.einsum("btn,btd->nbtd", beta,  # noqa: E731
                                          out.astype(jnp.float32))
  expected = jax.vjp(autodiff, beta_BxTxN, out_BxTxD)[1](dH_NxBxTxD)
  got = jax.vjp(hyper.written_output, beta_BxTxN, out_BxTxD)[1](dH_NxBxTxD)
  chex.assert_trees_all_equal_dtypes(got, expected)
  chex.assert_trees_all_close(got, expected, rtol=1e-6)


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("connections", ["hyper-static", "hyper-dynamic", "mhc"])
def test_depth_connection_saves_no_float32_copy_of_the_output(connections, scan_layers):
  """In bf16 under a remat policy the connections save no float32 [B, T, D] array beyond the
  baseline's: the depth connection saved the sub-layer output's float32 copy, one a sub-layer."""
  cfg = ModelConfig(V=64, D=32, L=2, H=4, R=2, F=64, T=16, router="none",
                    compute_dtype="bfloat16", remat_policy="dots", scan_layers=scan_layers)
  per_depth = lambda cfg: [model_checks.saved_float32_residuals(  # noqa: E731
      cfg.replace(L=L), (2, cfg.T, cfg.D)) for L in (2, 3)]
  assert per_depth(cfg.replace(connections=connections)) == per_depth(cfg)


@pytest.mark.parametrize("changes, message", [
    (dict(connections="dense"), "ModelConfig.connections: unknown connections"),
    (dict(connections="denseformer", router="kv-static"), "does not combine with router"),
    (dict(hc_expansion=0), "ModelConfig.hc_expansion: must be a positive integer"),
    (dict(denseformer_period=-1), "ModelConfig.denseformer_period: must be a positive integer"),
])
def test_bad_config_is_one_line_error(changes, message):
  with pytest.raises(ValueError, match=message):
    BASE.replace(**changes)
