import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lime_jax.model import transformer as M
from lime_jax.model import stack
from lime_jax.model.mixers import kv_routing as routing
from lime_jax.config import ModelConfig
import model_checks

MHA = ModelConfig(V=64, D=32, L=4, H=4, R=4, F=64, T=16)
GQA = ModelConfig(V=64, D=32, L=4, H=4, R=2, F=64, T=16)
ROUTERS = ("none", "kv-static")


_tokens = model_checks.tokens


def _randomize_routers(params, cfg, seed=3):
  """Random values in every stored router entry, masked ones included."""
  stacked = stack.stacked_layer_params(params, cfg)
  stacked = dict(stacked, router=jax.random.normal(jax.random.key(seed), stacked["router"].shape))
  return stack.with_stacked_layer_params(params, stacked, cfg)


_loss = model_checks.next_token_loss


class ShapeTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_shapes(self):
    for cfg in (MHA, GQA):
      for router in ROUTERS:
        c = cfg.replace(router=router)
        params = M.init_params(c, jax.random.key(0))
        tokens_BxT = _tokens(c, B=3, T=11)
        logits_BxTxV = self.variant(M.Transformer(c).apply)({"params": params}, tokens_BxT)
        chex.assert_shape(logits_BxTxV, (3, 11, c.V))
        chex.assert_type(logits_BxTxV, jnp.float32)
        chex.assert_tree_all_finite(logits_BxTxV)
        stacked = stack.stacked_layer_params(params, c)
        chex.assert_shape(stacked["kv_proj"], (c.L, c.D, c.R, 2, c.Hd))
        chex.assert_shape(stacked["attn"]["q_proj"], (c.L, c.D, c.H, c.Hd))
        if c.is_lime:
          chex.assert_shape(stacked["router"], (c.L, c.L, c.R, c.R))
          chex.assert_shape(M.router_weights(params, c), (c.L, c.R, c.L, c.R))

  @chex.variants(with_jit=True, without_jit=True)
  def test_push_and_read_shapes(self):
    L, R, B, T, Hd = 6, 2, 3, 5, 4
    push_LxRxR = routing.init_push_weights(jax.random.key(0), 2, L, R)
    kv_BxTxRx2xHd = jnp.ones((B, T, R, 2, Hd), jnp.bfloat16)
    payload_RxBxTx2xHd = routing.as_payload(kv_BxTxRx2xHd)
    for first_reader in (0, 2):
      acc = jnp.zeros((L - first_reader, R, B, T, 2, Hd), jnp.float32)
      fn = self.variant(functools.partial(routing.push_and_read, first_reader=first_reader))
      acc_out, routed_BxTxRx2xHd = fn(acc, push_LxRxR, payload_RxBxTx2xHd, jnp.int32(2))
      chex.assert_shape(acc_out, acc.shape)
      chex.assert_shape(routed_BxTxRx2xHd, (B, T, R, 2, Hd))
      chex.assert_type(routed_BxTxRx2xHd, jnp.float32)  # routing math stays float32


@pytest.mark.parametrize("router", ROUTERS)
def test_causality(router):
  """The loss at position t has exactly zero gradient w.r.t. embeddings after t."""
  cfg = GQA.replace(router=router)
  params = M.init_params(cfg, jax.random.key(0))
  if cfg.is_lime:
    params = _randomize_routers(params, cfg)
  model_checks.assert_causal(cfg, params)


@pytest.mark.parametrize("cfg", [MHA, GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("router, segments", [("none", 1), ("kv-static", 1), ("kv-static", 3)])
def test_scan_and_unrolled_agree(cfg, router, segments):
  scan_cfg = cfg.replace(router=router, scan_segments=segments)
  params = M.init_params(scan_cfg, jax.random.key(0))
  if scan_cfg.is_lime:
    params = _randomize_routers(params, scan_cfg)
  model_checks.assert_scan_matches_unrolled(scan_cfg, params)


# A loop-based reference of the forward, straight from the spec's equations, in float64 NumPy.

def _np_rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _np_rope(x_TxNxHd, theta):
  T, _, Hd = x_TxNxHd.shape
  inv_freq = 1.0 / theta ** (np.arange(0, Hd, 2) / Hd)
  angle = np.arange(T)[:, None] * inv_freq[None, :]
  cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
  x1, x2 = x_TxNxHd[..., :Hd // 2], x_TxNxHd[..., Hd // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _np_spec_router(push_LsrcxLxRxR, l):
  """W_l [R, l+1, R] from the stored push weights: W_l[r, j, s] = push[j][l, r, s]."""
  return np.stack([push_LsrcxLxRxR[j, l] for j in range(l + 1)], axis=1)


def _np_reference_logits(params, cfg, tokens_T):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), stack.stacked_layer_params(params, cfg))
  embed = np.asarray(params["embed"], np.float64)
  x = embed[np.asarray(tokens_T)]
  T = x.shape[0]
  group = cfg.H // cfg.R
  raw_kv = []  # raw_kv[j]: layer j's keys and values [T, R, 2, Hd] before RoPE
  for l in range(cfg.L):
    h = _np_rms_norm(x, p["attn_norm"]["scale"][l], cfg.norm_eps)
    raw_kv.append(np.einsum("td,drck->trck", h, p["kv_proj"][l]))
    if cfg.is_lime and l > 0:
      W = _np_spec_router(p["router"], l)
      kv = np.zeros_like(raw_kv[l])
      for r in range(cfg.R):
        for j in range(l + 1):
          for s in range(cfg.R):
            kv[:, r] += W[r, j, s] * raw_kv[j][:, s]
    else:
      kv = raw_kv[l]
    q = _np_rope(np.einsum("td,dhk->thk", h, p["attn"]["q_proj"][l]), cfg.rope_theta)
    k = _np_rope(kv[:, :, 0], cfg.rope_theta)
    v = kv[:, :, 1]
    out = np.zeros((T, cfg.H, cfg.Hd))
    for head in range(cfg.H):
      scores = q[:, head] @ k[:, head // group].T / np.sqrt(cfg.Hd)
      scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      out[:, head] = probs @ v[:, head // group]
    x = x + np.einsum("thk,hkd->td", out, p["attn"]["o_proj"][l])
    h = _np_rms_norm(x, p["mlp_norm"]["scale"][l], cfg.norm_eps)
    gate = h @ p["mlp"]["gate_up"][l][:, 0]
    up = h @ p["mlp"]["gate_up"][l][:, 1]
    x = x + (gate / (1 + np.exp(-gate)) * up) @ p["mlp"]["down"][l]
  h = _np_rms_norm(x, np.asarray(params["final_norm"]["scale"], np.float64), cfg.norm_eps)
  return h @ embed.T


@pytest.mark.parametrize("cfg", [MHA, GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("scan_layers", [True, False])
def test_matches_loop_reference(cfg, router, scan_layers):
  cfg = cfg.replace(router=router, scan_layers=scan_layers, L=4, scan_segments=2)
  params = M.init_params(cfg, jax.random.key(0))
  if cfg.is_lime:
    # Random routers with masked entries set to zero: the reference reads stored values as is,
    # so this also checks that masked entries are never used.
    stacked = stack.stacked_layer_params(params, cfg)
    random = jax.random.normal(jax.random.key(5), stacked["router"].shape)
    keep = jnp.asarray(routing.learnable_mask(cfg.L))[:, :, None, None]
    eye = jnp.zeros_like(random).at[0, 0].set(jnp.eye(cfg.R))
    stacked = dict(stacked, router=jnp.where(keep, random, 0.0) + eye)
    params = stack.with_stacked_layer_params(params, stacked, cfg)
  tokens_BxT = _tokens(cfg, B=2, T=10)
  logits = np.asarray(M.Transformer(cfg).apply({"params": params}, tokens_BxT))
  for b in range(2):
    np.testing.assert_allclose(logits[b], _np_reference_logits(params, cfg, tokens_BxT[b]),
                               rtol=2e-4, atol=2e-4)


def test_router_view_is_the_spec_layout():
  cfg = GQA
  params = _randomize_routers(M.init_params(cfg, jax.random.key(0)), cfg)
  W = np.asarray(M.router_weights(params, cfg))
  push = np.asarray(stack.stacked_layer_params(params, cfg)["router"])
  for i in range(cfg.L):
    for j in range(cfg.L):
      expected = push[j, i] if (j <= i and (i, j) != (0, 0)) else 0.0
      if (i, j) == (0, 0):
        expected = np.eye(cfg.R)
      np.testing.assert_array_equal(W[i, :, j, :], expected)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_identity_router_equals_baseline(scan_layers):
  base_cfg = GQA.replace(router="none", scan_layers=scan_layers, scan_segments=2)
  lime_cfg = base_cfg.replace(router="kv-static")
  base_params = M.init_params(base_cfg, jax.random.key(0))
  lime_params = M.init_params(lime_cfg, jax.random.key(1))
  stacked = dict(stack.stacked_layer_params(base_params, base_cfg))
  # Identity on the layer's own heads, zero elsewhere; kv projection = the baseline's k and v.
  stacked["router"] = jnp.eye(lime_cfg.L)[:, :, None, None] * jnp.eye(lime_cfg.R)[None, None]
  lime_params = stack.with_stacked_layer_params(
      {**base_params, "layers": lime_params["layers"]}, stacked, lime_cfg)
  tokens_BxT = _tokens(base_cfg)
  base_logits = M.Transformer(base_cfg).apply({"params": base_params}, tokens_BxT)
  lime_logits = M.Transformer(lime_cfg).apply({"params": lime_params}, tokens_BxT)
  np.testing.assert_array_equal(np.asarray(lime_logits), np.asarray(base_logits))


def test_init_follows_spec():
  cfg = ModelConfig(V=64, D=64, L=6, H=8, R=8, F=64, T=8)
  params = M.init_params(cfg, jax.random.key(0))
  W = np.asarray(M.router_weights(params, cfg))
  for i in range(cfg.L):
    np.testing.assert_array_equal(W[i, :, i, :], np.eye(cfg.R))  # own heads: identity
    off = W[i, :, :i, :]
    bound = np.sqrt(3.0 / ((i + 1) * cfg.R))
    if i:
      assert np.abs(off).max() <= bound and np.abs(off).max() > 0.5 * bound
    assert np.all(W[i, :, i + 1:, :] == 0)
  kv = np.asarray(stack.stacked_layer_params(params, cfg)["kv_proj"])
  assert np.abs(kv).max() <= 1 / np.sqrt(cfg.D) and np.abs(kv).max() > 0.9 / np.sqrt(cfg.D)
  base = M.init_params(cfg.replace(router="none"), jax.random.key(0))
  base_kv = np.asarray(stack.stacked_layer_params(base, cfg.replace(router="none"))["kv_proj"])
  assert abs(base_kv.std() - 0.02) < 0.002


@pytest.mark.parametrize("scan_layers", [True, False])
def test_masked_router_entries_get_zero_gradient_and_stay_zero(scan_layers):
  from lime_jax.train.optimizer import OptimConfig, make_optimizer
  import optax
  cfg = GQA.replace(scan_layers=scan_layers, scan_segments=2)
  params = M.init_params(cfg, jax.random.key(0))
  grads = jax.jit(jax.grad(_loss), static_argnums=1)(params, cfg, _tokens(cfg, T=cfg.T + 1))
  router_grad = np.asarray(stack.stacked_layer_params(grads, cfg)["router"])  # [L_src, L_reader, R, R]
  mask = routing.learnable_mask(cfg.L)
  assert np.all(router_grad[~mask] == 0.0)
  nonzero_entries = int(np.count_nonzero(router_grad))
  assert nonzero_entries == routing.num_router_params(cfg.L, cfg.R)

  tx = make_optimizer(OptimConfig(warmup_steps=0))
  updates, _ = tx.update(grads, tx.init(params), params)
  new_params = optax.apply_updates(params, updates)
  before = np.asarray(stack.stacked_layer_params(params, cfg)["router"])
  after = np.asarray(stack.stacked_layer_params(new_params, cfg)["router"])
  source_after_reader = ~np.tril(np.ones((cfg.L, cfg.L), bool)).T  # j > i
  assert np.all(after[source_after_reader] == 0.0)
  np.testing.assert_array_equal(after[~mask], before[~mask])
  assert np.any(after[mask] != before[mask])


def test_extra_parameter_count_matches_spec():
  from lime_jax.model import flops
  for cfg in (MHA, GQA, MHA.replace(L=16)):
    lime = jax.eval_shape(functools.partial(M.init_params, cfg), jax.random.key(0))
    base = jax.eval_shape(functools.partial(M.init_params, cfg.replace(router="none")),
                          jax.random.key(0))
    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    stored_router = sum(x.size for path, x in jax.tree_util.tree_flatten_with_path(lime)[0]
                        if path[-1].key == "router")
    learnable = int(routing.learnable_mask(cfg.L).sum()) * cfg.R ** 2
    assert size(lime) - size(base) == stored_router
    assert learnable == cfg.R ** 2 * (cfg.L * (cfg.L + 1) // 2 - 1)
    assert size(base) == flops.total_params(cfg.replace(router="none"))
    assert size(lime) - stored_router + learnable == flops.total_params(cfg)


@pytest.mark.parametrize("policy", ["full", "dots", "save_proj"])
@pytest.mark.parametrize("router", ROUTERS)
def test_remat_gives_equal_gradients(policy, router):
  cfg = GQA.replace(router=router, scan_segments=2)
  params = M.init_params(cfg, jax.random.key(0))
  tokens_BxT = _tokens(cfg, T=cfg.T + 1)
  grads = jax.jit(jax.grad(_loss), static_argnums=1)(params, cfg, tokens_BxT)
  remat_grads = jax.jit(jax.grad(_loss), static_argnums=1)(
      params, cfg.replace(remat_policy=policy), tokens_BxT)
  chex.assert_trees_all_close(grads, remat_grads, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("connections", ["hyper-dynamic", "mhc"])
def test_remat_gives_equal_gradients_with_connections(connections):
  """The width connections are rematerialized too; recomputing them changes no gradient."""
  cfg = GQA.replace(router="none", connections=connections)
  params = M.init_params(cfg, jax.random.key(0))
  tokens_BxT = _tokens(cfg, T=cfg.T + 1)
  grads, remat_grads = (jax.jit(jax.grad(_loss), static_argnums=1)(
      params, cfg.replace(remat_policy=policy), tokens_BxT) for policy in ("none", "full"))
  chex.assert_trees_all_close(grads, remat_grads, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("variant", [dict(router="none"), dict(routing_impl="push"),
                                     dict(routing_impl="pull")])
def test_remat_leaves_no_float32_activations_per_layer(variant, scan_layers):
  """Under a remat policy the norms are rematerialized too: in bf16 no layer saves a float32
  [B, T, D] array (the norms' intermediates were six a layer); only the final norm's remain.
  Unrolled, a layer's residuals would add lines; scanned, one stacked line each."""
  cfg = GQA.replace(**{"router": "kv-static", "compute_dtype": "bfloat16",
                       "remat_policy": "dots", "scan_layers": scan_layers, **variant})
  per_depth = [model_checks.saved_float32_residuals(cfg.replace(L=L), (2, cfg.T, cfg.D))
               for L in (2, 4)]
  assert per_depth[0] == per_depth[1], per_depth
  assert per_depth[0] <= 3, per_depth


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("connections", ["hyper-static", "hyper-dynamic", "mhc"])
def test_remat_leaves_no_float32_copies_of_the_streams(connections, scan_layers):
  """Under a remat policy a hyper-connection's width connection is rematerialized too: in bf16
  no sub-layer saves its float32 copies of the n streams [n, B, T, D]."""
  cfg = GQA.replace(router="none", connections=connections, compute_dtype="bfloat16",
                    remat_policy="dots", scan_layers=scan_layers)
  # L != n: a stacked [L, B, T, D] would read like [n, B, T, D]
  n = cfg.hc_expansion
  assert [model_checks.saved_float32_residuals(cfg.replace(L=L), (n, 2, cfg.T, cfg.D))
          for L in (2, 3)] == [0, 0]


@pytest.mark.parametrize("router", ROUTERS)
def test_bfloat16_compute_is_finite_and_close(router):
  cfg = GQA.replace(router=router)
  params = M.init_params(cfg, jax.random.key(0))
  tokens_BxT = _tokens(cfg)
  logits32 = M.Transformer(cfg).apply({"params": params}, tokens_BxT)
  logits16 = M.Transformer(cfg.replace(compute_dtype="bfloat16")).apply({"params": params},
                                                                        tokens_BxT)
  chex.assert_type(logits16, jnp.float32)
  chex.assert_tree_all_finite(logits16)
  np.testing.assert_allclose(logits16, logits32, atol=0.05)
  assert float(jnp.abs(logits16 - logits32).max()) > 0  # bf16 really ran


def test_given_positions_are_refused_with_query_blocks():
  """Attention by query blocks assumes positions 0..T-1; others would be attended wrongly."""
  cfg = ModelConfig(V=32, D=32, L=2, H=4, F=64, T=8, router="none", attention_query_blocks=2)
  tokens_BxT = jnp.zeros((1, 8), jnp.int32)
  params = M.init_params(cfg, jax.random.key(0))
  with pytest.raises(ValueError, match="positions were given, but attention_query_blocks=2"
                                       " assumes positions 0..T-1"):
    M.Transformer(cfg).apply({"params": params}, tokens_BxT, jnp.arange(8)[None] + 3)
