"""HF Llama export/import: an independent NumPy forward of the exported files, exact round
trips, tensor names and shapes, transformers (when installed), and bad input."""

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lime_jax.cli import export as export_cmd
from lime_jax.cli import import_ as import_cmd
from lime_jax.interop import hf as export
from lime_jax.model import transformer as model
from lime_jax.model import stack
from lime_jax.model.mixers import kv_routing as routing
from lime_jax.config import ModelConfig

MHA = dict(V=61, D=32, L=3, H=4, R=4, F=48, T=16)
GQA = dict(V=61, D=32, L=4, H=4, R=2, F=40, T=16)
B, T = 2, 7


def _cfg(shape: dict, router: str, tied: bool, scan: bool = True) -> ModelConfig:
  return ModelConfig(**shape, router=router, tie_embeddings=tied, scan_layers=scan,
                     scan_segments=2, rope_theta=500.0, norm_eps=1e-5)


# XLA's CPU backend needs ~20 s to optimize the init program (its many threefry draws);
# unoptimized code computes the same model (up to rounding) in a fraction of that.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.lru_cache(maxsize=None)
def _init_fn(cfg: ModelConfig):
  return jax.jit(model.init_params, static_argnums=0).lower(cfg, jax.random.key(0)).compile(
      compiler_options=FAST_COMPILE)


@functools.lru_cache(maxsize=None)
def _forward_fn(cfg: ModelConfig):
  abstract = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
  apply = jax.jit(lambda p, x: model.Transformer(cfg).apply({"params": p}, x))
  return apply.lower(abstract, jax.ShapeDtypeStruct((B, T), jnp.int32)).compile(
      compiler_options=FAST_COMPILE)


def _init(cfg: ModelConfig, seed: int = 0) -> dict:
  return _init_fn(cfg)(jax.random.key(seed))


def _trained_like(cfg: ModelConfig, seed: int = 0) -> dict:
  """Random values in every learnable entry, as after training (norm scales around 1, routers
  far from identity). Masked router entries hold what init stores (their gradient is zero)."""
  abstract = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
    return jnp.asarray(base + 0.3 * rng.standard_normal(leaf.shape), leaf.dtype)

  params = jax.tree_util.tree_map_with_path(draw, abstract)
  if cfg.is_lime:
    stacked = stack.stacked_layer_params(params, cfg)
    canonical = np.zeros((cfg.L, cfg.L, cfg.R, cfg.R), np.float32)
    canonical[0, 0] = np.eye(cfg.R)
    learnable = routing.learnable_mask(cfg.L)[:, :, None, None]
    router = jnp.asarray(np.where(learnable, np.asarray(stacked["router"]), canonical))
    params = stack.with_stacked_layer_params(params, {**stacked, "router": router}, cfg)
  return params


def _tokens(cfg: ModelConfig) -> np.ndarray:
  return np.random.default_rng(0).integers(0, cfg.V, (B, T))


def _logits(params, cfg: ModelConfig, tokens) -> np.ndarray:
  return np.asarray(_forward_fn(cfg)(params, jnp.asarray(tokens, jnp.int32)))


# --- an independent forward pass that reads only the exported files -------------------------------

def _rms_norm(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rotate_half(x):
  half = x.shape[-1] // 2
  return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _reference_logits(hf_dir: str, tokens_BxT: np.ndarray) -> np.ndarray:
  """HF LlamaForCausalLM conventions in float64, plus the LIMe reference kv buffer routing."""
  with open(os.path.join(hf_dir, "config.json")) as f:
    c = json.load(f)
  tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
  w = {k: v.astype(np.float64) for k, v in tensors.items()}
  H, R, Hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
  eps = c["rms_norm_eps"]
  lime = c.get("lime_router") == "kv-static"
  Bn, Tn = tokens_BxT.shape
  inv_freq = 1.0 / c["rope_theta"] ** (np.arange(0, Hd, 2) / Hd)
  freqs_TxHd2 = np.arange(Tn)[:, None] * inv_freq[None]
  emb_TxHd = np.concatenate([freqs_TxHd2, freqs_TxHd2], axis=-1)
  cos, sin = np.cos(emb_TxHd), np.sin(emb_TxHd)
  causal_TxT = np.tril(np.ones((Tn, Tn), bool))
  x = w["model.embed_tokens.weight"][tokens_BxT]
  buffer = []  # reference: raw kv of every layer so far, rows (layer, head)
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    h = _rms_norm(x, w[p + "input_layernorm.weight"], eps)
    q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(Bn, Tn, H, Hd).transpose(0, 2, 1, 3)
    if lime:
      kv = h @ w[p + "self_attn.kv_proj_weight"].T  # column c*R + head
      buffer.append(kv.reshape(Bn, Tn, 2 * Hd, R).transpose(3, 0, 1, 2))  # [R, B, T, 2Hd]
      if i == 0:
        routed = buffer[0]
      else:
        routed = np.einsum("rn,nbtc->rbtc", w[p + "self_attn.lime_router.static_weights"],
                           np.concatenate(buffer))
      k, v = routed[..., :Hd].transpose(1, 0, 2, 3), routed[..., Hd:].transpose(1, 0, 2, 3)
    else:
      k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(Bn, Tn, R, Hd).transpose(0, 2, 1, 3)
      v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(Bn, Tn, R, Hd).transpose(0, 2, 1, 3)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    k, v = np.repeat(k, H // R, axis=1), np.repeat(v, H // R, axis=1)  # HF repeat_kv
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(Hd)
    scores = np.where(causal_TxT, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attn = (probs @ v).transpose(0, 2, 1, 3).reshape(Bn, Tn, H * Hd)
    x = x + attn @ w[p + "self_attn.o_proj.weight"].T
    h = _rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
    gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
    x = x + (gate / (1.0 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
  x = _rms_norm(x, w["model.norm.weight"], eps)
  head = w["model.embed_tokens.weight"] if c["tie_word_embeddings"] else w["lm_head.weight"]
  return x @ head.T


# Each pair of (MHA/GQA, router, tied/untied) occurs in one of the four cases.
CASES = [(MHA, "none", True), (MHA, "kv-static", False), (GQA, "none", False),
         (GQA, "kv-static", True)]


CASE_IDS = [f"{'gqa' if s['R'] < s['H'] else 'mha'}-{r}-{'tied' if t else 'untied'}"
            for s, r, t in CASES]


@pytest.mark.parametrize("shape,router,tied", CASES, ids=CASE_IDS)
def test_reference_forward_of_export_matches_flax(tmp_path, shape, router, tied):
  cfg = _cfg(shape, router, tied)
  params = _trained_like(cfg)
  export.export_params(params, cfg, str(tmp_path))
  ours = _logits(params, cfg, _tokens(cfg))
  ref = _reference_logits(str(tmp_path), _tokens(cfg))
  assert np.abs(ours).max() > 1.0  # not a degenerate comparison
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_export_ignores_masked_router_entries(tmp_path):
  cfg = _cfg(GQA, "kv-static", tied=True)
  params = _trained_like(cfg)
  stacked = stack.stacked_layer_params(params, cfg)
  garbage = jax.random.normal(jax.random.key(7), stacked["router"].shape)
  learnable = jnp.asarray(routing.learnable_mask(cfg.L))[:, :, None, None]
  router = jnp.where(learnable, stacked["router"], garbage)
  noisy = stack.with_stacked_layer_params(params, {**stacked, "router": router}, cfg)
  export.export_params(noisy, cfg, str(tmp_path / "noisy"))
  export.export_params(params, cfg, str(tmp_path / "clean"))
  noisy_t = load_file(str(tmp_path / "noisy" / "model.safetensors"))
  clean_t = load_file(str(tmp_path / "clean" / "model.safetensors"))
  assert all(np.array_equal(noisy_t[k], clean_t[k]) for k in clean_t)
  imported, _ = export.import_params(str(tmp_path / "noisy"))
  _assert_trees_equal(imported, params)  # masked entries come back canonical
  np.testing.assert_array_equal(_logits(imported, cfg, _tokens(cfg)),
                                _logits(noisy, cfg, _tokens(cfg)))


# --- round trips ----------------------------------------------------------------------------------

def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


ROUND_TRIPS = [("none", True), ("none", False), ("kv-static", True), ("kv-static", False)]


@pytest.mark.parametrize("router,scan", ROUND_TRIPS,
                         ids=[f"{r}-{'scanned' if s else 'unrolled'}" for r, s in ROUND_TRIPS])
def test_round_trip_is_exact(tmp_path, router, scan):
  # The configs of the forward cases above, so their compiled forwards are reused.
  cfg = _cfg(GQA, router, tied=router == "kv-static", scan=scan)
  sources = [("trained", _trained_like(cfg, seed=5))]
  if cfg.is_lime:  # init's masked router entries are what import must reproduce
    sources.append(("init", _init(cfg, seed=3)))
  for name, params in sources:
    export.export_params(params, cfg, str(tmp_path / name))
    imported, imported_cfg = export.import_params(str(tmp_path / name))
    assert imported_cfg == cfg
    _assert_trees_equal(imported, params)
    if scan:  # equal trees give equal logits; checked where the forward is compiled anyway
      np.testing.assert_array_equal(_logits(imported, cfg, _tokens(cfg)),
                                    _logits(params, cfg, _tokens(cfg)))


def test_import_into_another_layout_and_dtype(tmp_path):
  cfg = _cfg(MHA, "kv-static", tied=True, scan=True)
  params = _trained_like(cfg)
  export.export_params(params, cfg, str(tmp_path))
  unrolled = cfg.replace(scan_layers=False)
  imported, got_cfg = export.import_params(str(tmp_path), unrolled)
  assert got_cfg == unrolled
  _assert_trees_equal(imported, stack.convert_layout(params, cfg, unrolled))
  bf16 = cfg.replace(param_dtype="bfloat16")
  imported, _ = export.import_params(str(tmp_path), bf16)
  assert imported["embed"].dtype == jnp.bfloat16
  assert stack.stacked_layer_params(imported, bf16)["router"].dtype == jnp.float32  # as init
  export.export_params(imported, bf16, str(tmp_path / "bf16"))  # bf16 -> f32 -> bf16 is exact
  _assert_trees_equal(export.import_params(str(tmp_path / "bf16"), bf16)[0], imported)


def test_import_into_other_attention_and_routing_forms(tmp_path):
  """The attention and routing forms (the push's raw kv recomputed or saved too) compute the
  same model (each tested equal to the others where it is defined): an export loads into a
  config that picks other ones, as into another layout. An export from before 2026-12-06 says
  `attention_impl: einsum`, then the default."""
  cfg = _cfg(MHA, "kv-static", tied=True, scan=True).replace(attention_impl="einsum",
                                                             routing_impl="push")
  params = _trained_like(cfg)
  export.export_params(params, cfg, str(tmp_path))
  other = cfg.replace(attention_impl="lse_recompute", routing_impl="pull", push_raw_kv="save")
  imported, got_cfg = export.import_params(str(tmp_path), other)
  assert got_cfg == other
  _assert_trees_equal(imported, params)


def test_plain_llama_config_without_our_key_imports(tmp_path):
  cfg = _cfg(GQA, "none", tied=False)
  params = _trained_like(cfg)
  export.export_params(params, cfg, str(tmp_path))
  path = tmp_path / "config.json"
  hf = json.loads(path.read_text())
  del hf["lime_jax_config"]
  path.write_text(json.dumps(hf))
  imported, got_cfg = export.import_params(str(tmp_path), cfg)
  assert got_cfg == cfg
  _assert_trees_equal(imported, params)
  _, derived = export.import_params(str(tmp_path))  # layout fields take their defaults
  assert derived == cfg.replace(scan_segments=ModelConfig().scan_segments)


# --- names and shapes -----------------------------------------------------------------------------

@pytest.mark.parametrize("router", ["none", "kv-static"])
def test_file_names_shapes_and_config(tmp_path, router):
  cfg = _cfg(GQA, router, tied=False)
  V, D, L, H, R, Hd, F = cfg.V, cfg.D, cfg.L, cfg.H, cfg.R, cfg.Hd, cfg.F
  params = _trained_like(cfg)
  export.export_params(params, cfg, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
  tensors = load_file(str(tmp_path / "model.safetensors"))
  want = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
  for i in range(L):
    p = f"model.layers.{i}."
    want.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                 p + "self_attn.q_proj.weight": (H * Hd, D),
                 p + "self_attn.o_proj.weight": (D, H * Hd),
                 p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                 p + "mlp.down_proj.weight": (D, F)})
    if router == "none":
      want.update({p + "self_attn.k_proj.weight": (R * Hd, D),
                   p + "self_attn.v_proj.weight": (R * Hd, D)})
    else:
      want[p + "self_attn.kv_proj_weight"] = (2 * Hd * R, D)
      if i >= 1:
        want[p + "self_attn.lime_router.static_weights"] = (R, (i + 1) * R)
  assert {k: v.shape for k, v in tensors.items()} == want
  assert all(v.dtype == np.float32 for v in tensors.values())

  # Spot-check individual entries against our parameter layout.
  stacked = stack.stacked_layer_params(params, cfg)
  l, h, r, d, dd = 1, 1, 1, 3, 5
  np.testing.assert_array_equal(tensors["model.layers.1.self_attn.q_proj.weight"][h * Hd + d, dd],
                                stacked["attn"]["q_proj"][l, dd, h, d])
  np.testing.assert_array_equal(tensors["lm_head.weight"], np.asarray(params["unembed"]).T)
  if router == "kv-static":
    kv = tensors["model.layers.1.self_attn.kv_proj_weight"]
    np.testing.assert_array_equal(kv[d * R + r, dd], stacked["kv_proj"][l, dd, r, 0, d])  # key
    np.testing.assert_array_equal(kv[(Hd + d) * R + r, dd], stacked["kv_proj"][l, dd, r, 1, d])
    W = np.asarray(model.router_weights(params, cfg))
    static = tensors["model.layers.3.self_attn.lime_router.static_weights"]
    for j in range(4):
      np.testing.assert_array_equal(static[:, j * R:(j + 1) * R], W[3, :, j, :])
  else:
    np.testing.assert_array_equal(tensors["model.layers.1.self_attn.v_proj.weight"][r * Hd + d, dd],
                                  stacked["kv_proj"][l, dd, r, 1, d])

  hf = json.loads((tmp_path / "config.json").read_text())
  assert hf["architectures"] == ["LIMeForCausalLM" if cfg.is_lime else "LlamaForCausalLM"]
  assert {k: hf[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                             "num_key_value_heads", "num_hidden_layers", "head_dim", "vocab_size",
                             "rms_norm_eps", "rope_theta", "tie_word_embeddings",
                             "max_position_embeddings", "hidden_act", "attention_bias",
                             "mlp_bias", "torch_dtype", "model_type")} == {
      "hidden_size": D, "intermediate_size": F, "num_attention_heads": H,
      "num_key_value_heads": R, "num_hidden_layers": L, "head_dim": Hd, "vocab_size": V,
      "rms_norm_eps": 1e-5, "rope_theta": 500.0, "tie_word_embeddings": False,
      "max_position_embeddings": cfg.T, "hidden_act": "silu", "attention_bias": False,
      "mlp_bias": False, "torch_dtype": "float32", "model_type": "llama"}
  assert hf.get("lime_router") == (None if router == "none" else "kv-static")
  assert ModelConfig.from_dict(hf["lime_jax_config"]) == cfg


def test_tied_export_has_no_lm_head(tmp_path):
  cfg = _cfg(MHA, "none", tied=True)
  export.export_params(_trained_like(cfg), cfg, str(tmp_path))
  assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))


# --- transformers (optional; `make test` installs it) ------------------------------------------

@pytest.mark.integration
def test_transformers_llama_matches(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  for tied in (True, False):
    cfg = _cfg(GQA, "none", tied=tied)
    params = _trained_like(cfg)
    out = str(tmp_path / str(tied))
    export.export_params(params, cfg, out)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(
        out, torch_dtype=torch.float32, attn_implementation="eager")
    hf_model.eval()
    with torch.no_grad():
      theirs = hf_model(torch.tensor(_tokens(cfg))).logits.numpy()
    np.testing.assert_allclose(_logits(params, cfg, _tokens(cfg)), theirs, rtol=1e-4, atol=1e-4)


# --- bad input ------------------------------------------------------------------------------------

@pytest.fixture
def exported(tmp_path):
  cfg = _cfg(GQA, "kv-static", tied=True)
  export.export_params(_trained_like(cfg), cfg, str(tmp_path))
  return tmp_path


def _edit_config(directory, **changes):
  path = directory / "config.json"
  hf = json.loads(path.read_text())
  for key, value in changes.items():
    if value is None:
      hf.pop(key, None)
    else:
      hf[key] = value
  path.write_text(json.dumps(hf))


def _one_line_error(directory, *, cfg=None) -> str:
  with pytest.raises(ValueError) as info:
    export.import_params(str(directory), cfg)
  text = str(info.value)
  assert "\n" not in text
  return text


def test_missing_directory_and_files(tmp_path, exported):
  assert "no such directory" in _one_line_error(tmp_path / "nope")
  os.remove(exported / "model.safetensors")
  assert "model.safetensors: missing" in _one_line_error(exported)
  (tmp_path / "empty").mkdir()
  assert "config.json: missing" in _one_line_error(tmp_path / "empty")


def test_damaged_files(exported):
  (exported / "model.safetensors").write_bytes(b"not a safetensors file")
  assert "model.safetensors: cannot read" in _one_line_error(exported)
  (exported / "config.json").write_text("{not json")
  assert "config.json: not readable JSON" in _one_line_error(exported)


def test_config_disagreeing_with_tensors(exported):
  _edit_config(exported, lime_jax_config=None, intermediate_size=64)
  text = _one_line_error(exported)
  assert "model.safetensors" in text and "mlp.gate_proj.weight" in text and "(40, 32)" in text


def test_config_disagreeing_with_our_key(exported):
  _edit_config(exported, num_hidden_layers=3)
  text = _one_line_error(exported)
  assert "config.json" in text and "'num_hidden_layers'" in text


def test_missing_and_extra_tensors(exported):
  tensors = load_file(str(exported / "model.safetensors"))
  del tensors["model.layers.2.self_attn.lime_router.static_weights"]
  save_file(tensors, str(exported / "model.safetensors"))
  text = _one_line_error(exported)
  assert "missing tensor model.layers.2.self_attn.lime_router.static_weights" in text
  tensors["model.layers.2.self_attn.lime_router.static_weights"] = np.zeros((2, 6), np.float32)
  tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 32), np.float32)
  save_file(tensors, str(exported / "model.safetensors"))
  assert "unexpected tensor model.layers.0.self_attn.k_proj.weight" in _one_line_error(exported)


def test_given_config_must_describe_the_same_model(exported):
  cfg = _cfg(GQA, "kv-static", tied=True).replace(F=64)
  assert "F=40" in _one_line_error(exported, cfg=cfg)


def test_unsupported_llama_features(exported):
  _edit_config(exported, rope_scaling={"rope_type": "llama3", "factor": 8.0})
  assert "'rope_scaling'" in _one_line_error(exported)
  _edit_config(exported, rope_scaling=None, attention_bias=True)
  assert "'attention_bias'" in _one_line_error(exported)


# --- command line ---------------------------------------------------------------------------------

def test_run_export_and_import_with_injected_checkpoint_io(tmp_path, capsys):
  cfg = _cfg(MHA, "kv-static", tied=False)
  params = _trained_like(cfg)
  seen = {}

  def load_params(path, step=None):
    seen["load"] = (path, step)
    return params, cfg

  parser = argparse.ArgumentParser()
  export_cmd.add_arguments(parser)
  args = parser.parse_args(["--checkpoint", "runs/x", "--step", "4", "--out", str(tmp_path / "hf")])
  assert export_cmd.run(args, load_params=load_params) == 0
  assert seen["load"] == ("runs/x", 4)
  assert json.loads(capsys.readouterr().out)["router"] == "kv-static"

  parser = argparse.ArgumentParser()
  import_cmd.add_arguments(parser)
  args = parser.parse_args(["--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")])
  import_cmd.run(args, save_params=lambda p, c, out: seen.update(save=(p, c, out)))
  saved_params, saved_cfg, out = seen["save"]
  assert saved_cfg == cfg and out == str(tmp_path / "ckpt")
  _assert_trees_equal(saved_params, params)


@pytest.mark.parametrize("changes", [dict(router="hidden-static"), dict(connections="denseformer",
                                                                      router="none")])
def test_models_without_a_hf_layout_refuse_export_and_write_nothing(tmp_path, changes):
  cfg = ModelConfig(**MHA, **changes)
  with pytest.raises(ValueError, match="has no Hugging Face layout") as err:
    export.export_params({}, cfg, str(tmp_path / "out"))
  assert "\n" not in str(err.value)
  assert not (tmp_path / "out").exists()


def test_pruned_kv_router_exports_with_its_zeros_baked_in(tmp_path):
  from lime_jax.model import top_p  # pylint: disable=g-import-not-at-top
  cfg = _cfg(GQA, "kv-static", tied=True).replace(top_p=0.5)
  trained = _trained_like(cfg.replace(top_p=None), seed=5)
  stacked = stack.stacked_layer_params(trained, cfg.replace(top_p=None))
  stacked["top_p_mask"] = jnp.ones_like(stacked["router"])
  params = top_p.refresh(stack.with_stacked_layer_params(trained, stacked, cfg), cfg, jnp.int32(0))
  assert 0 < float(stack.stacked_layer_params(params, cfg)["top_p_mask"].mean()) < 1
  export.export_params(params, cfg, str(tmp_path))
  imported, imported_cfg = export.import_params(str(tmp_path))
  assert imported_cfg == cfg.replace(top_p=None)
  np.testing.assert_allclose(_logits(imported, imported_cfg, _tokens(cfg)),
                             np.asarray(model.Transformer(cfg).apply({"params": params},
                                                                    jnp.asarray(_tokens(cfg)))),
                             rtol=1e-5, atol=1e-5)
