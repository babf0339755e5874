"""Checks every layer-stack variant must pass (core, hidden routers, connections), written once."""

import contextlib
import functools
import io

import chex
import jax
import jax.numpy as jnp
import numpy as np

from lime_jax.inference import decode
from lime_jax.model import transformer as M
from lime_jax.model import stack
from lime_jax.studies import bench
from lime_jax.train.loss import mean_loss


def tokens(cfg, B=2, T=None, seed=1):
  return jax.random.randint(jax.random.key(seed), (B, T or cfg.T), 0, cfg.V)


def next_token_loss(params, cfg, tokens_BxT):
  logits_BxTxV = M.Transformer(cfg).apply({"params": params}, tokens_BxT[:, :-1])
  return mean_loss(logits_BxTxV, tokens_BxT[:, 1:])


def assert_same_loss_and_grads(cfg, other_cfg, params, tokens_BxT, rtol=1e-5, atol=1e-6):
  """Training at `other_cfg` computes what it computes at `cfg`: the loss and every gradient."""
  def loss_and_grads(c):
    return jax.jit(jax.value_and_grad(lambda p: next_token_loss(p, c, tokens_BxT)))(params)

  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=rtol, atol=atol),
               loss_and_grads(other_cfg), loss_and_grads(cfg))


# XLA:CPU's code generation as users get it; conftest.py compiles the suite with the older,
# faster fusion emitters, which move a few bytes of buffer assignment.
USERS_CPU_CODEGEN = {"xla_cpu_use_fusion_emitters": True}


def compiled_as_users(lowered):
  """`lowered` compiled as a user's CPU program is: for checks of its structure or memory."""
  return lowered.compile(compiler_options=USERS_CPU_CODEGEN)


def train_step_temp_bytes(cfg, batch: int = 2) -> int:
  """Compiled temp bytes of the bench's training step at `cfg` (`lime-jax bench`'s measure)."""
  return bench.bench_point(cfg, batch, steps=0, measure_flops=False,
                           compiler_options=USERS_CPU_CODEGEN)["temp_bytes"]


def lowered_gradient(cfg, B=2):
  """The loss's gradient program for `cfg` on B token rows, lowered on abstract parameters and
  tokens (nothing initialized): for its text, or compiled, its cost and memory."""
  params = jax.eval_shape(functools.partial(M.init_params, cfg), jax.random.key(0))
  tokens_BxT = jax.ShapeDtypeStruct((B, cfg.T + 1), jnp.int32)
  return jax.jit(jax.grad(next_token_loss), static_argnums=1).lower(params, cfg, tokens_BxT)


def saved_residuals(fn, *args) -> list[str]:
  """What autodiff of `fn` at `args` saves for its backward, in JAX's public view
  (`jax.ad_checkpoint.print_saved_residuals`): one "dtype[shape] from ..." line each."""
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    jax.ad_checkpoint.print_saved_residuals(fn, *args)
  return printed.getvalue().splitlines()


def saved_float32_residuals(cfg, shape_tail, B=2):
  """How many float32 arrays whose shape ends in `shape_tail` the loss's gradient on B token
  rows saves for its backward (`saved_residuals`)."""
  params = M.init_params(cfg, jax.random.key(0))
  tokens_BxT = tokens(cfg, B=B, T=cfg.T + 1)
  tail = ",".join(map(str, shape_tail)) + "]"
  return sum(line.startswith("f32[") and line.split()[0].endswith(tail)
             for line in saved_residuals(lambda p: next_token_loss(p, cfg, tokens_BxT), params))


def assert_full_remat_recomputes(cfg):
  """Full remat must cost FLOPs in `cfg`'s compiled gradient step: at least half of the layers'
  attention and MLP products again, which a program that merged the backward's recomputation
  with the forward (straight-line code without CSE prevented) does not do."""
  def compiled_flops(cfg):
    cost = lowered_gradient(cfg).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]

  saved_all, recomputed = (compiled_flops(cfg.replace(remat_policy=p)) for p in ("none", "full"))
  attention_and_mlp = 2 * cfg.L * cfg.D * (4 * cfg.D + 3 * cfg.F) * 2 * cfg.T
  assert recomputed - saved_all >= 0.5 * attention_and_mlp


def assert_causal(cfg, params, t=6):
  """The log-prob at position t has exactly zero gradient w.r.t. embeddings after t, and some
  gradient w.r.t. every embedding up to t."""
  x_BxTxD = jax.random.normal(jax.random.key(2), (2, 12, cfg.D))

  def loss_at_t(x_BxTxD):
    logits = M.Transformer(cfg).apply({"params": params}, x_BxTxD,
                                      method=M.Transformer.from_embeddings)
    return jax.nn.log_softmax(logits[:, t])[:, 3].sum()

  grad_BxTxD = jax.jit(jax.grad(loss_at_t))(x_BxTxD)
  assert np.all(np.asarray(grad_BxTxD[:, t + 1:]) == 0.0)
  assert np.all(np.abs(np.asarray(grad_BxTxD[:, :t + 1])).sum(axis=(0, 2)) > 0)


def assert_scan_matches_unrolled(scan_cfg, params):
  """Scanned and unrolled layers give the same loss and gradients; returns the scanned grads."""
  unrolled_cfg = scan_cfg.replace(scan_layers=False)
  tokens_BxT = tokens(scan_cfg, T=scan_cfg.T + 1)
  loss_and_grad = jax.jit(jax.value_and_grad(next_token_loss), static_argnums=1)
  loss_s, grads_s = loss_and_grad(params, scan_cfg, tokens_BxT)
  loss_u, grads_u = loss_and_grad(stack.convert_layout(params, scan_cfg, unrolled_cfg), unrolled_cfg,
                                  tokens_BxT)
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
  chex.assert_trees_all_close(grads_s, stack.convert_layout(grads_u, unrolled_cfg, scan_cfg),
                              rtol=1e-5, atol=1e-6)
  return grads_s


def assert_cached_decoding_matches_full_forward(cfg, params, T=10, prefix=6, cache_len=12):
  """Prefill of `prefix` tokens, then one decode step per token up to T: the full forward's
  logits (rtol, atol 1e-5)."""
  tokens_BxT = tokens(cfg, B=2, T=T)
  full_BxTxV = jax.jit(M.Transformer(cfg).apply)({"params": params}, tokens_BxT)
  cache = decode.init_cache(cfg, 2, cache_len)
  logits_BxPxV, cache = decode.prefill(params, cfg, tokens_BxT[:, :prefix], cache, all_logits=True)
  steps = [logits_BxPxV]
  for t in range(prefix, T):
    logits_BxV, cache = decode.decode_step(params, cfg, tokens_BxT[:, t:t + 1], cache)
    steps.append(logits_BxV[:, None])
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full_BxTxV, rtol=1e-5, atol=1e-5,
                             err_msg=str(cfg))


def stack_grad_temp_bytes(cfg, naive=False, B=2, T=64) -> int:
  """Compiled temp bytes of the layer stack's gradient (LayerStack `naive`: plain autodiff for
  pulling methods), the training-memory regression checks' measure."""
  shapes = jax.eval_shape(functools.partial(M.init_params, cfg), jax.random.key(0))["layers"]
  positions_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))

  def loss(p, x):
    out, _ = stack.LayerStack(cfg, naive=naive).apply({"params": p}, x, positions_BxT)
    return jnp.sum(out)

  x = jax.ShapeDtypeStruct((B, T, cfg.D), jnp.float32)
  compiled = compiled_as_users(jax.jit(jax.grad(loss)).lower(shapes, x))
  return compiled.memory_analysis().temp_size_in_bytes


def hlo_computations(hlo: str) -> dict[str, list[str]]:
  """The instruction lines of each computation in HLO text, by name (without its `%`; the entry
  computation's under "ENTRY")."""
  computations, lines = {}, None
  for line in hlo.splitlines():
    if line.startswith("}"):
      lines = None
    elif line.startswith(("%", "ENTRY ")):
      name = "ENTRY" if line.startswith("ENTRY ") else line[1:].split(" ", 1)[0]
      lines = computations.setdefault(name, [])
    elif lines is not None:
      lines.append(line)
  return computations


def all_jaxprs(jaxpr):
  """`jaxpr` and every jaxpr nested in its equations (scan, custom_vjp, jit...)."""
  yield jaxpr
  for eqn in jaxpr.eqns:
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        inner = getattr(sub, "jaxpr", sub)  # a closed jaxpr, or a jaxpr itself
        if hasattr(inner, "eqns"):
          yield from all_jaxprs(inner)


def all_eqns(jaxpr):
  """Every equation of `jaxpr` and of the jaxprs nested in its equations."""
  for each in all_jaxprs(jaxpr):
    yield from each.eqns


def grad_jaxpr(cfg):
  """The jaxpr of the loss's gradient for `cfg` (a small random batch)."""
  params = M.init_params(cfg, jax.random.key(0))
  return jax.make_jaxpr(jax.grad(next_token_loss), static_argnums=1)(
      params, cfg, tokens(cfg, T=cfg.T + 1)).jaxpr


def value_branches(jaxpr) -> int:
  """How many conditionals (`cond`, `switch`) in `jaxpr` and the jaxprs nested in it branch on
  a computed value rather than on the platform compiled for (`lax.platform_dependent`)."""
  return sum(eqn.primitive.name == "cond" and not eqn.params.get("branches_platforms")
             for eqn in all_eqns(jaxpr))
