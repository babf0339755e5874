import argparse
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lime_jax.cli import generate as generate_cmd
from lime_jax.inference import decode
from lime_jax.model import transformer as M
from lime_jax.model import stack
from lime_jax.config import ModelConfig
import model_checks

# L=3 with two segments: the scanned LIMe stack runs segments of 1 and 2 layers.
MHA = ModelConfig(V=64, D=32, L=3, H=4, R=4, F=64, T=32, scan_segments=2)
GQA = MHA.replace(R=2)
ROUTERS = ("none", "kv-static")


@functools.lru_cache(maxsize=None)
def _params(cfg):
  """One compiled program per config (eager tree surgery would compile op by op)."""
  def init(rng):
    params = M.init_params(cfg, rng)
    if cfg.is_lime:  # random values in every stored router entry, masked ones included
      stacked = stack.stacked_layer_params(params, cfg)
      router = jax.random.normal(jax.random.fold_in(rng, 1), stacked["router"].shape)
      params = stack.with_stacked_layer_params(params, dict(stacked, router=router), cfg)
    return params
  return jax.jit(init)(jax.random.key(0))


_convert_layout = jax.jit(stack.convert_layout, static_argnums=(1, 2))


def _tokens(cfg, B, T, seed=1):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, cfg.V)


@functools.partial(jax.jit, static_argnums=1)
def _forward(params, cfg, tokens_BxT):
  return M.Transformer(cfg).apply({"params": params}, tokens_BxT)


def _cached_logits(params, cfg, tokens_BxT, prefix, max_len, decode_cfg=None):
  """Logits of every position: prefill of `prefix` tokens, then one decode step per token."""
  B, T = tokens_BxT.shape
  cache = decode.init_cache(cfg, B, max_len)
  logits_BxPxV, cache = decode.prefill(params, cfg, tokens_BxT[:, :prefix], cache, all_logits=True)
  decode_cfg = decode_cfg or cfg
  if decode_cfg != cfg:
    params = _convert_layout(params, cfg, decode_cfg)
  steps = []
  for t in range(prefix, T):
    logits_BxV, cache = decode.decode_step(params, decode_cfg, tokens_BxT[:, t:t + 1], cache)
    steps.append(logits_BxV)
  np.testing.assert_array_equal(cache.length_B, T)
  return jnp.concatenate([logits_BxPxV, jnp.stack(steps, axis=1)], axis=1)


@pytest.mark.parametrize("cfg", [MHA, GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("router", ROUTERS)
def test_cached_decoding_matches_full_forward(cfg, router):
  """Prefill + token-by-token decoding give the full forward's logits at every position,
  scanned and unrolled, and a cache filled by the scanned model serves the unrolled one."""
  scan_cfg = cfg.replace(router=router)
  unrolled_cfg = scan_cfg.replace(scan_layers=False)
  params = _params(scan_cfg)
  unrolled_params = _convert_layout(params, scan_cfg, unrolled_cfg)
  tokens_BxT = _tokens(cfg, B=2, T=12)
  full_BxTxV = _forward(params, scan_cfg, tokens_BxT)
  for c, p in ((scan_cfg, params), (unrolled_cfg, unrolled_params)):
    cached_BxTxV = _cached_logits(p, c, tokens_BxT, prefix=5, max_len=16)
    np.testing.assert_allclose(cached_BxTxV, full_BxTxV, rtol=1e-5, atol=1e-5, err_msg=str(c))
  crossed_BxTxV = _cached_logits(params, scan_cfg, tokens_BxT, prefix=5, max_len=16,
                                 decode_cfg=unrolled_cfg)
  np.testing.assert_allclose(crossed_BxTxV, full_BxTxV, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("router", ROUTERS)
def test_ragged_prefill_gives_each_rows_last_logits(router):
  cfg = GQA.replace(router=router)
  params = _params(cfg)
  tokens_BxT = _tokens(cfg, B=3, T=8)
  lengths_B = np.array([8, 3, 5], np.int32)
  full_BxTxV = _forward(params, cfg, tokens_BxT)
  logits_BxV, cache = decode.prefill(params, cfg, tokens_BxT, decode.init_cache(cfg, 3, 10),
                                     lengths_B)
  chex.assert_shape(logits_BxV, (3, cfg.V))
  np.testing.assert_array_equal(cache.length_B, lengths_B)
  np.testing.assert_allclose(logits_BxV, full_BxTxV[np.arange(3), lengths_B - 1],
                             rtol=1e-5, atol=1e-5)
  # Each row continues at its own position, over its padding slots.
  next_Bx1 = _tokens(cfg, B=3, T=1, seed=4)
  step_BxV, _ = decode.decode_step(params, cfg, next_Bx1, cache)
  rows_BxT = np.zeros((3, 9), np.int32)  # causal: the zeros after each row are never seen
  for b, n in enumerate(lengths_B):
    rows_BxT[b, :n + 1] = np.append(tokens_BxT[b, :n], next_Bx1[b])
  np.testing.assert_allclose(step_BxV, _forward(params, cfg, rows_BxT)[np.arange(3), lengths_B],
                             rtol=1e-5, atol=1e-5)


def test_cache_memory_equals_baseline():
  """LIMe's cache is the baseline's (same pytree, shapes, bytes), a decode step updates it in
  place, and LIMe's extra step memory is about the new token's routing accumulator, whatever
  the cache length."""
  B, S = 2, 128
  base_cfg, lime_cfg = GQA.replace(router="none"), GQA.replace(router="kv-static")
  base, lime = decode.init_cache(base_cfg, B, S), decode.init_cache(lime_cfg, B, S)
  chex.assert_trees_all_equal_shapes_and_dtypes(base, lime)
  expected = 2 * GQA.L * B * S * GQA.R * GQA.Hd * 4 + B * 4
  assert decode.cache_bytes(base) == decode.cache_bytes(lime) == expected
  temp = {}
  for cfg, cache in ((base_cfg, base), (lime_cfg, lime)):
    params = jax.eval_shape(functools.partial(M.init_params, cfg), jax.random.key(0))
    token_Bx1 = jax.ShapeDtypeStruct((B, 1), jnp.int32)
    _, new_cache = jax.eval_shape(functools.partial(decode.decode_step, cfg=cfg), params,
                                  token_Bx1=token_Bx1, cache=cache)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_cache, cache)
    compiled = model_checks.compiled_as_users(
        decode._decode_step.lower(params, token_Bx1, cache, cfg=cfg))
    memory = compiled.memory_analysis()
    assert memory.alias_size_in_bytes == expected  # donated: output cache = input buffers
    temp[cfg.router] = memory.temp_size_in_bytes
  acc_bytes = GQA.L * GQA.R * B * 2 * GQA.Hd * 4  # [L, R, B, 1, 2, Hd] float32
  assert 0 <= temp["kv-static"] - temp["none"] <= 2 * acc_bytes, temp


@pytest.mark.parametrize("changes", [dict(router="kv-static"),
                                     dict(router="none", connections="hyper-static")])
def test_decoding_programs_carry_no_remat_barriers(changes):
  """Straight-line layers (unrolled) with a remat policy: their gradient carries optimization
  barriers (the remat's CSE guard), which would only cost fusion in decoding; the decode
  step's program has none, though the MLP and the connections are wrapped in the same remat
  there (a checkpoint that is never differentiated lowers to its body)."""
  cfg = MHA.replace(scan_layers=False, remat_policy="dots", **changes)
  params = jax.eval_shape(functools.partial(M.init_params, cfg), jax.random.key(0))
  cache = jax.eval_shape(functools.partial(decode.init_cache, cfg, 2, cfg.T))
  token_Bx1 = jax.ShapeDtypeStruct((2, 1), jnp.int32)
  decode_text = decode._decode_step.lower(params, token_Bx1, cache, cfg=cfg).as_text()
  assert "optimization_barrier" not in decode_text

  def loss(params, tokens_BxT):
    return M.Transformer(cfg).apply({"params": params}, tokens_BxT).mean()

  tokens_BxT = jax.ShapeDtypeStruct((2, 8), jnp.int32)
  assert "optimization_barrier" in jax.jit(jax.grad(loss)).lower(params, tokens_BxT).as_text()


def test_greedy_generate_matches_argmax_of_full_forwards():
  cfg = GQA
  params = _params(cfg)
  prompts = [[5, 9, 2, 33, 7], [12, 3]]
  result = decode.generate(params, cfg, prompts, 5, jax.random.key(0), temperature=0.0)
  for prompt, new in zip(prompts, result.tokens):
    sequence = list(prompt)
    for _ in range(5):  # a fixed-length buffer: causal, so the padding after it is never seen
      buffer_1xT = np.zeros((1, cfg.T), np.int32)
      buffer_1xT[0, :len(sequence)] = sequence
      sequence.append(int(jnp.argmax(_forward(params, cfg, buffer_1xT)[0, len(sequence) - 1])))
    assert new == sequence[len(prompt):]
  assert result.sampled == 10 and result.tokens_per_s > 0
  # top-k = 1 is greedy whatever the temperature and top-p (same compiled program).
  top1 = decode.generate(params, cfg, prompts, 5, jax.random.key(1), temperature=3.0, top_k=1,
                         top_p=0.5)
  assert top1.tokens == result.tokens and top1.compile_s == 0.0


def test_batch_of_different_lengths_equals_each_alone():
  cfg = MHA
  params = _params(cfg)
  prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7], [1, 8, 2, 8, 1]]
  run = lambda ps, eos=None: decode.generate(params, cfg, ps, 6, jax.random.key(0),
                                             temperature=0.0, eos_id=eos, max_len=16).tokens
  together = run(prompts)
  assert together == [run([p])[0] for p in prompts]
  # A row stops at its eos (not returned); the others run on.
  eos = together[1][2]
  with_eos = run(prompts, eos)
  for row, alone in zip(with_eos, together):
    expected = alone[:alone.index(eos)] if eos in alone else alone
    assert row == expected


def test_top_p_keeps_smallest_prefix_with_enough_mass():
  logits_BxV = jax.random.normal(jax.random.key(0), (4, 64)) * 2.0
  filter_fn = jax.jit(decode.filter_logits)
  for temperature, top_k, top_p in [(1.0, 0, 0.3), (1.0, 0, 0.9), (0.7, 0, 0.5),
                                    (1.0, 10, 0.8), (1.3, 5, 1.0), (1.0, 0, 1.0)]:
    kept_BxV = np.isfinite(np.asarray(filter_fn(logits_BxV, temperature, top_k, top_p)))
    scaled_BxV = np.asarray(logits_BxV, np.float64) / temperature
    for b in range(4):
      order = np.argsort(-scaled_BxV[b])
      if top_k:
        order = order[:top_k]
      probs = np.exp(scaled_BxV[b, order] - scaled_BxV[b, order].max())
      mass = np.cumsum(probs / probs.sum())
      n = int(np.searchsorted(mass, top_p - 1e-12)) + 1 if top_p < 1 else len(order)
      assert mass[n - 1] >= top_p - 1e-6 and (n == 1 or mass[n - 2] < top_p)
      np.testing.assert_array_equal(np.flatnonzero(kept_BxV[b]), np.sort(order[:n]))
  # Samples come from the kept set only; temperature 0 is the argmax.
  keys = jax.random.split(jax.random.key(1), 200)
  draws = jax.jit(jax.vmap(lambda k: decode.sample_tokens(k, logits_BxV, 1.0, 3, 1.0)))(keys)
  top3_Bx3 = np.argsort(-np.asarray(logits_BxV), axis=-1)[:, :3]
  for b in range(4):
    assert set(np.asarray(draws[:, b]).tolist()) <= set(top3_Bx3[b].tolist())
  greedy_B = decode.sample_tokens(jax.random.key(2), logits_BxV, 0.0, 0, 1.0)
  np.testing.assert_array_equal(greedy_B, np.argmax(logits_BxV, axis=-1))


@pytest.mark.parametrize("kwargs, name", [
    (dict(prompt_tokens=[[1] * 20], max_len=16), "prompt_tokens"),
    (dict(prompt_tokens=[[1] * 12], max_len=16, max_new_tokens=8), "max_new_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(prompt_tokens=[[1, 2], []]), "prompt_tokens"),
    (dict(prompt_tokens=[[1, 64]]), "prompt_tokens"),
    (dict(eos_id=64), "eos_id"),
    (dict(prompt_tokens=[[1] * 30], max_new_tokens=4), "max_new_tokens"),  # 33 positions > T=32
])
def test_bad_inputs_raise_one_line_naming_the_argument(kwargs, name):
  cfg = GQA
  args = dict(params=None, cfg=cfg, prompt_tokens=[[1, 2, 3]], max_new_tokens=4,
              rng=jax.random.key(0))
  with pytest.raises(ValueError, match=f"^{name}:") as err:
    decode.generate(**{**args, **kwargs})
  assert "\n" not in str(err.value)


def test_prefill_rejects_too_many_tokens():
  cfg = GQA
  with pytest.raises(ValueError, match="^tokens_BxT:"):
    decode.prefill(None, cfg, jnp.zeros((1, 9), jnp.int32), decode.init_cache(cfg, 1, 8))
  with pytest.raises(ValueError, match="^lengths_B:"):
    decode.prefill(None, cfg, jnp.zeros((2, 4), jnp.int32), decode.init_cache(cfg, 2, 8),
                   np.array([4, 0]))


def test_run_generate_prints_text_and_speed(capsys):
  cfg = ModelConfig(V=258, D=32, L=2, H=2, F=64, T=64)  # byte tokenizer: 256 bytes + BOS/EOS
  params = M.init_params(cfg, jax.random.key(0))
  parser = argparse.ArgumentParser()
  generate_cmd.add_arguments(parser)
  args = parser.parse_args(["--checkpoint", "ckpt", "--prompt", "ab", "--prompt", "hello",
                            "--max-new-tokens", "4", "--temperature", "0.8", "--top-k", "20",
                            "--top-p", "0.9", "--seed", "3"])
  seen = []
  load = lambda path: seen.append(path) or (params, cfg, None)  # no tokenizer saved: byte
  assert generate_cmd.run(args, load) == 0
  out = capsys.readouterr().out
  assert seen == ["ckpt"]
  assert "=== prompt 0 ===\nab" in out and "=== prompt 1 ===\nhello" in out
  assert "tokens/s" in out
  args.top_p = 2.0
  with pytest.raises(ValueError, match="^top_p:"):
    generate_cmd.run(args, load)


def test_generate_stays_within_the_trained_length_unless_allowed():
  cfg = GQA  # T = 32
  params = _params(cfg)
  greedy = lambda prompts, n, **kw: decode.generate(params, cfg, prompts, n, jax.random.key(0),
                                                     temperature=0.0, **kw)
  assert len(greedy([[1] * 29], 4).tokens[0]) == 4  # 32 positions fed: exactly T
  with pytest.raises(ValueError, match="^max_new_tokens: a 30-token prompt and 4 new tokens feed"
                     " 33 positions, past the model's trained length T=32"):
    greedy([[1] * 30], 4)
  with pytest.raises(ValueError, match="^max_new_tokens: a 40-token prompt"):
    greedy([[2, 3], [1] * 40], 1)  # the longest prompt counts
  # Allowed, the cache grows to the positions fed and decoding equals the full forward.
  prompt = list(range(1, 31))
  new = greedy([prompt], 4, allow_past_length=True).tokens[0]
  sequence = list(prompt)
  for _ in range(4):  # one 34-token buffer: causal, so the padding after it is never seen
    buffer_1xT = np.zeros((1, 34), np.int32)
    buffer_1xT[0, :len(sequence)] = sequence
    sequence.append(int(jnp.argmax(_forward(params, cfg, buffer_1xT)[0, len(sequence) - 1])))
  assert new == sequence[len(prompt):]


def test_run_generate_refuses_past_the_trained_length_without_the_flag(capsys):
  cfg = ModelConfig(V=258, D=32, L=2, H=2, F=64, T=16)
  params = M.init_params(cfg, jax.random.key(0))
  parser = argparse.ArgumentParser()
  generate_cmd.add_arguments(parser)
  args = parser.parse_args(["--checkpoint", "ckpt", "--prompt", "x" * 12, "--max-new-tokens",
                            "5", "--temperature", "0"])
  load = lambda path: (params, cfg, None)
  with pytest.raises(ValueError, match="a 13-token prompt and 5 new tokens feed 17 positions,"
                     " past the model's trained length T=16.*--allow-past-length"):
    generate_cmd.run(args, load)
  args.allow_past_length = True
  assert generate_cmd.run(args, load) == 0
  assert "=== prompt 0 ===\n" + "x" * 12 in capsys.readouterr().out
