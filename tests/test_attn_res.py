"""Attention Residuals, full and block (mixers/attn_res.py): shapes, the uniform average at init,
causality, scan (pull form) vs unrolled, a float64 loop reference, cached decoding, parameter and
FLOP accounting, training memory."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lime_jax.config import ModelConfig
from lime_jax.model import flops
from lime_jax.model import stack
from lime_jax.model import transformer as M
from lime_jax.model.mixers import attn_res
from lime_jax.studies import bench
from lime_jax.train.optimizer import param_labels
import model_checks
from test_connections import _np_sublayers
from test_model import _np_rms_norm

BASE = ModelConfig(V=64, D=32, L=3, H=4, R=2, F=64, T=16, router="none", scan_segments=2)
VARIANTS = {
    "full": BASE.replace(connections="attn-res"),
    # 6 sub-layers in 2 blocks of 3: a block ends inside layer 1.
    "block-3": BASE.replace(connections="block-attn-res", attn_res_blocks=2),
    # 8 sub-layers in 2 blocks of 4: blocks end at layer boundaries.
    "block-4": BASE.replace(connections="block-attn-res", attn_res_blocks=2, L=4),
}


def _is_attn_res(path) -> bool:
  return str(getattr(path[-1], "key", path[-1])).startswith("attn_res_")


@functools.lru_cache(maxsize=None)
def _random_params(cfg):
  """Init params with random pseudo-queries and key norms, so every weight matters."""
  def init(rng):
    params = M.init_params(cfg, rng)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.fold_in(rng, 1), len(leaves))
    new = [x + 0.5 * jax.random.normal(k, x.shape) if _is_attn_res(p) else x
           for k, (p, x) in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, new)
  return jax.jit(init)(jax.random.key(0))


def test_shapes():
  cfg = VARIANTS["block-3"]
  params = jax.eval_shape(functools.partial(M.init_params, cfg), jax.random.key(0))
  logits = jax.eval_shape(M.Transformer(cfg).apply, {"params": params},
                          model_checks.tokens(cfg, 3, 11))
  chex.assert_shape(logits, (3, 11, cfg.V))
  stacked = jax.eval_shape(lambda p: stack.stacked_layer_params(p, cfg), params)
  for sub in ("attn", "mlp"):
    chex.assert_shape(stacked[f"attn_res_{sub}_query"], (cfg.L, cfg.D))
    chex.assert_shape(stacked[f"attn_res_{sub}_key_norm"], (cfg.L, cfg.D))
  chex.assert_shape(params["layers"]["attn_res_final_query"], (cfg.D,))


def test_zero_query_is_the_uniform_average():
  """With a zero pseudo-query every live source gets weight exactly 1/n, whatever the key norm."""
  scale_Nx1x1x1 = jnp.arange(1, 6)[:, None, None, None]  # sources of different sizes
  values_NxBxTxD = jax.random.normal(jax.random.key(0), (5, 2, 3, 8)) * scale_Nx1x1x1
  partial_BxTxD = jax.random.normal(jax.random.key(1), (2, 3, 8))
  live_N = jnp.array([True, True, True, False, False])
  scale_D = 1 + jax.random.normal(jax.random.key(2), (8,))
  got = attn_res.attend_over_depth(jnp.zeros(8), scale_D, values_NxBxTxD, live_N, partial_BxTxD)
  want = (values_NxBxTxD[:3].sum(0) + partial_BxTxD) / 4
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  got = attn_res.attend_over_depth(jnp.zeros(8), scale_D, values_NxBxTxD, live_N, partial_BxTxD,
                                   partial_live=False)
  np.testing.assert_allclose(got, values_NxBxTxD[:3].mean(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_init_equals_baseline(name):
  """At init each input is (1/#sources) x the plain residual stream, which the next RMSNorm maps
  to the baseline's normed input up to its eps (set negligible here: the average's rms is
  1/#sources of the stream's, so with 0.02-scale embeddings eps 1e-6 moves logits by ~3%)."""
  cfg = VARIANTS[name].replace(norm_eps=1e-12)
  base_cfg = BASE.replace(L=cfg.L, norm_eps=1e-12)
  params = M.init_params(cfg, jax.random.key(3))

  def without_attn_res(tree):
    return {k: without_attn_res(v) if isinstance(v, dict) else v for k, v in tree.items()
            if not k.startswith("attn_res_")}

  base_params = without_attn_res(params)
  chex.assert_trees_all_equal_shapes(
      base_params, jax.eval_shape(functools.partial(M.init_params, base_cfg), jax.random.key(0)))
  tokens = model_checks.tokens(cfg, B=2, T=12)
  logits = M.Transformer(cfg).apply({"params": params}, tokens)
  base_logits = M.Transformer(base_cfg).apply({"params": base_params}, tokens)
  np.testing.assert_allclose(logits, base_logits, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("name", ["full", "block-3"])
def test_causality(name):
  model_checks.assert_causal(VARIANTS[name], _random_params(VARIANTS[name]))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_scan_pull_and_unrolled_agree(name):
  """The scanned model trains through the pull form; unrolled layers use plain autodiff."""
  cfg = VARIANTS[name]
  grads = model_checks.assert_scan_matches_unrolled(cfg, _random_params(cfg))
  stacked = stack.stacked_layer_params(grads, cfg)
  grad_norms = {sub: np.abs(np.asarray(stacked[f"attn_res_{sub}_query"])).sum(-1)
                for sub in ("attn", "mlp")}
  # Every pseudo-query learns except sub-layer 0's: it has one source, the embeddings.
  assert grad_norms["attn"][0] == 0
  assert np.all(grad_norms["attn"][1:] > 0) and np.all(grad_norms["mlp"] > 0)
  assert np.abs(np.asarray(grads["layers"]["attn_res_final_query"])).sum() > 0


def _np_reference_logits(params, cfg, tokens_T):
  """Float64, from the paper: sources are the embeddings, the completed blocks and the current
  partial sum; a = softmax(w . RMSNorm(v)); the output attends over all blocks."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), stack.stacked_layer_params(params, cfg))
  top = jax.tree.map(lambda a: np.asarray(a, np.float64), params["layers"])
  embed = np.asarray(params["embed"], np.float64)
  T = len(tokens_T)
  S = 2 * cfg.L // attn_res.blocks_of(cfg)

  def attend(query, key_scale, sources):
    logits = np.array([[query @ (key_scale * v[t] / np.sqrt(np.mean(v[t] ** 2) + cfg.norm_eps))
                        for t in range(T)] for v in sources])  # [n, T]
    a = np.exp(logits - logits.max(0))
    a /= a.sum(0)
    return sum(a[n][:, None] * v for n, v in enumerate(sources))

  blocks, partial = [embed[np.asarray(tokens_T)]], None
  for l in range(cfg.L):
    for s, f in zip(("attn", "mlp"), _np_sublayers(p, cfg, l, T)):
      k = 2 * l + (s == "mlp")
      sources = blocks + ([] if partial is None else [partial])
      out = f(attend(p[f"attn_res_{s}_query"][l], p[f"attn_res_{s}_key_norm"][l], sources))
      partial = out if partial is None else partial + out
      if (k + 1) % S == 0:
        blocks, partial = blocks + [partial], None
  y = attend(top["attn_res_final_query"], top["attn_res_final_key_norm"], blocks)
  h = _np_rms_norm(y, np.asarray(params["final_norm"]["scale"], np.float64), cfg.norm_eps)
  return h @ embed.T


@pytest.mark.parametrize("name", list(VARIANTS))
def test_matches_loop_reference(name):
  cfg = VARIANTS[name]
  params = _random_params(cfg)
  tokens = model_checks.tokens(cfg, B=2, T=8)
  logits = np.asarray(jax.jit(M.Transformer(cfg).apply)({"params": params}, tokens))
  for b in range(2):
    np.testing.assert_allclose(logits[b], _np_reference_logits(params, cfg, tokens[b]),
                               rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("name", ["full", "block-3"])
def test_cached_decoding_matches_full_forward(name):
  cfg = VARIANTS[name]
  model_checks.assert_cached_decoding_matches_full_forward(cfg, _random_params(cfg))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_count_is_exact(name):
  cfg = VARIANTS[name]
  params = jax.eval_shape(functools.partial(M.init_params, cfg), jax.random.key(0))
  assert sum(x.size for x in jax.tree.leaves(params)) == flops.total_params(cfg)
  assert flops.mixer_params(cfg) == (4 * cfg.L + 2) * cfg.D
  n = sum(attn_res.AttentionResiduals(cfg).sources_per_reader())
  assert flops.mixer_macs_per_token(cfg) == 3 * cfg.D * n
  labels = jax.tree_util.tree_leaves_with_path(param_labels(params))
  assert {g for p, g in labels if _is_attn_res(p)} == {"no_decay"}


def test_sources_per_reader():
  full = attn_res.AttentionResiduals(VARIANTS["full"])
  assert full.sources_per_reader() == [1, 2, 3, 4, 5, 6, 7]  # embeddings + every output so far
  block = attn_res.AttentionResiduals(VARIANTS["block-3"])
  # Block 0 = sub-layers 0..2, block 1 = 3..5; then the output reads embeddings + 2 blocks.
  assert block.sources_per_reader() == [1, 2, 2, 2, 3, 3, 3]


@pytest.mark.parametrize("connections", ["attn-res", "block-attn-res"])
def test_flops_match_cost_analysis(connections):
  """Extra forward FLOPs over the baseline from XLA's cost analysis (unrolled layers, so every
  reader's live sources only) against flops.py."""
  base = ModelConfig(V=64, D=128, L=4, H=4, R=4, F=256, T=64, router="none", scan_layers=False)
  cfg = base.replace(connections=connections, attn_res_blocks=4)
  B = 2

  def forward_flops(c):
    params = jax.eval_shape(functools.partial(M.init_params, c), jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((B, c.T + 1), jnp.int32)
    loss = jax.jit(model_checks.next_token_loss, static_argnums=1)
    return bench._cost_flops(loss.lower(params, c, tokens))

  measured = forward_flops(cfg) - forward_flops(base)
  formula = 2 * flops.mixer_macs_per_token(cfg) * B * cfg.T
  assert 0.9 < measured / formula < 1.15, (measured, formula)


def test_training_memory_grows_linearly_with_depth():
  """Full AttnRes: the pull form at 2L stays within 2.1x of L; plain autodiff through the scan
  (which saves the [2L+1]-slot buffer per layer) fails the same check."""
  cfg = ModelConfig(V=64, D=64, L=8, H=4, F=128, T=64, router="none", connections="attn-res",
                    scan_segments=1)
  pull_8, pull_16 = (model_checks.stack_grad_temp_bytes(cfg.replace(L=L), False) for L in (8, 16))
  assert pull_16 <= 2.1 * pull_8, (pull_8, pull_16)
  naive_8, naive_16 = (model_checks.stack_grad_temp_bytes(cfg.replace(L=L), True) for L in (8, 16))
  assert naive_16 > 2.1 * naive_8, (naive_8, naive_16)


@pytest.mark.parametrize("changes, message", [
    (dict(connections="block-attn-res", attn_res_blocks=4), "ModelConfig.attn_res_blocks: the 2L"),
    (dict(connections="block-attn-res", attn_res_blocks=0), "attn_res_blocks: must be a positive"),
    (dict(connections="attn-res", router="kv-static"), "does not combine with router"),
])
def test_bad_config_is_one_line_error(changes, message):
  with pytest.raises(ValueError, match=message):
    BASE.replace(**changes)
