"""Hugging Face Llama export and import: `model.safetensors` + `config.json`.

The baseline (`router: none`) is written under `LlamaForCausalLM` names and loads in
transformers as is. LIMe (`router: kv-static`) uses the reference implementation's names
(corl-team/lime, `LIMeForCausalLM`), which replace k_proj/v_proj per layer by

  self_attn.kv_proj_weight               [2*Hd*R, D]   row c*R + h: channel c of kv head h,
                                                       channels 0..Hd-1 key, Hd..2Hd-1 value
  self_attn.lime_router.static_weights   [R, (i+1)*R]  layer i >= 1; column j*R + s: head s
                                                       of source layer j (layer 0: identity)

No q/k permutation is needed: our RoPE already uses HF's rotate-half convention with
inv_freq = 1 / theta^(arange(0, Hd, 2) / Hd), so q_proj/k_proj rows keep their natural order.

`config.json` holds the LlamaConfig keys, `lime_router` for LIMe, and our full ModelConfig
under `lime_jax_config`, so an import is exact: export -> import gives the same parameters,
except router entries the push layout masks (readers before their source, the fixed layer-0
self entry), which come back as the values `routing.init_push_weights` stores for them. A
plain HF Llama directory without `lime_jax_config` imports too, its config derived from the
Llama keys.

Tensors are written in float32 whatever the parameter dtype (exact for bf16/f16 parameters,
which the import casts back). Every bad input is a one-line ValueError naming file and key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from lime_jax.config import COMPUTATION_FIELDS, ModelConfig
from lime_jax.errors import one_line
from lime_jax.model import mixers, stack
from lime_jax.model import transformer as model

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
LIME_CONFIG_KEY = "lime_jax_config"
LIME_ROUTER_KEY = "lime_router"

# ModelConfig fields that choose how parameters are laid out or computed, not what the model
# computes: an import may load into a config that differs from the file's only in these.
LAYOUT_FIELDS = ("T", "param_dtype", "compute_dtype", "scan_layers", "scan_segments",
                 *COMPUTATION_FIELDS)

# config.json keys derived from ModelConfig; on import each must agree with lime_jax_config.
_HF_KEYS = {"vocab_size": "V", "hidden_size": "D", "num_hidden_layers": "L",
            "num_attention_heads": "H", "num_key_value_heads": "R", "head_dim": "Hd",
            "intermediate_size": "F", "max_position_embeddings": "T", "rope_theta": "rope_theta",
            "rms_norm_eps": "norm_eps", "tie_word_embeddings": "tie_embeddings"}


# --- config.json ----------------------------------------------------------------------------------

def hf_config(cfg: ModelConfig) -> dict[str, Any]:
  """config.json contents: LlamaConfig keys plus the LIMe router and our exact ModelConfig."""
  hf = {
      "architectures": ["LIMeForCausalLM" if cfg.is_lime else "LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": cfg.V,
      "hidden_size": cfg.D,
      "intermediate_size": cfg.F,
      "num_hidden_layers": cfg.L,
      "num_attention_heads": cfg.H,
      "num_key_value_heads": cfg.R,
      "head_dim": cfg.Hd,
      "max_position_embeddings": cfg.T,
      "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": None,
      "tie_word_embeddings": cfg.tie_embeddings,
      "hidden_act": "silu",
      "attention_bias": False,
      "attention_dropout": 0.0,
      "mlp_bias": False,
      "pretraining_tp": 1,
      "use_cache": True,
      "torch_dtype": "float32",
  }
  if cfg.is_lime:
    hf[LIME_ROUTER_KEY] = cfg.router
  # Top-p masks are baked into the exported weights (model.router_weights applies them), so the
  # export is an unpruned-config kv-static model with those zeros.
  hf[LIME_CONFIG_KEY] = cfg.replace(top_p=None).to_dict()
  return hf


def config_from_hf(hf: Mapping[str, Any], where: str = CONFIG_FILE) -> ModelConfig:
  """The ModelConfig a config.json describes: `lime_jax_config` if present, else the Llama keys.

  With `lime_jax_config`, every Llama key present must agree with it, so a hand-edited file
  cannot silently load as a different model.
  """
  if not isinstance(hf, Mapping):
    raise ValueError(f"{where}: expected a JSON object, got {type(hf).__name__}")
  _check_llama_features(hf, where)
  router = hf.get(LIME_ROUTER_KEY, "none")
  if LIME_CONFIG_KEY in hf:
    try:
      cfg = ModelConfig.from_dict(hf[LIME_CONFIG_KEY], where=LIME_CONFIG_KEY)
    except ValueError as err:
      raise ValueError(f"{where}: {one_line(err, limit=300)}") from None
    for key, field in _HF_KEYS.items():
      if key in hf and hf[key] != getattr(cfg, field):
        raise ValueError(f"{where}: key {key!r} = {hf[key]!r} disagrees with"
                         f" {LIME_CONFIG_KEY}.{field} = {getattr(cfg, field)!r}")
    if router != cfg.router:
      raise ValueError(f"{where}: key {LIME_ROUTER_KEY!r} = {router!r} disagrees with"
                       f" {LIME_CONFIG_KEY}.router = {cfg.router!r}")
    return cfg
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads"):
    if key not in hf:
      raise ValueError(f"{where}: missing key {key!r}")
  values = {"V": hf["vocab_size"], "D": hf["hidden_size"], "F": hf["intermediate_size"],
            "L": hf["num_hidden_layers"], "H": hf["num_attention_heads"],
            "R": hf.get("num_key_value_heads"), "Hd": hf.get("head_dim"),
            "T": hf.get("max_position_embeddings", 2048),
            "rope_theta": _rope_theta(hf, where),
            "norm_eps": hf.get("rms_norm_eps", 1e-6),
            "tie_embeddings": hf.get("tie_word_embeddings", True), "router": router}
  try:
    return ModelConfig.from_dict(values, where="llama keys")
  except ValueError as err:
    raise ValueError(f"{where}: {one_line(err, limit=300)}") from None


def _check_llama_features(hf: Mapping[str, Any], where: str) -> None:
  """Refuses Llama variants this model does not implement, naming the key."""
  if hf.get("model_type", "llama") != "llama":
    raise ValueError(f"{where}: key 'model_type' = {hf['model_type']!r}; only 'llama' is supported")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{where}: key 'hidden_act' = {hf['hidden_act']!r}; only 'silu' is supported")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key, False):
      raise ValueError(f"{where}: key {key!r} = true; biases are not supported")
  for key in ("rope_scaling", "rope_parameters"):
    rope = hf.get(key)
    if rope is not None and not isinstance(rope, Mapping):
      raise ValueError(f"{where}: key {key!r} = {rope!r}; expected an object or null")
    if rope and rope.get("rope_type", rope.get("type", "default")) != "default":
      raise ValueError(f"{where}: key {key!r} = {rope!r}; only plain RoPE is supported")


def _rope_theta(hf: Mapping[str, Any], where: str) -> float:
  # Newer transformers move rope_theta into rope_parameters.
  if "rope_theta" in hf:
    return hf["rope_theta"]
  rope = hf.get("rope_parameters") or {}
  if "rope_theta" in rope:
    return rope["rope_theta"]
  raise ValueError(f"{where}: missing key 'rope_theta'")


# --- tensors --------------------------------------------------------------------------------------

def _layer(i: int) -> str:
  return f"model.layers.{i}."


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor name the export of `cfg` holds, with its shape."""
  V, D, H, R, Hd, F = cfg.V, cfg.D, cfg.H, cfg.R, cfg.Hd, cfg.F
  shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
  if not cfg.tie_embeddings:
    shapes["lm_head.weight"] = (V, D)
  for i in range(cfg.L):
    p = _layer(i)
    shapes[p + "input_layernorm.weight"] = (D,)
    shapes[p + "post_attention_layernorm.weight"] = (D,)
    shapes[p + "self_attn.q_proj.weight"] = (H * Hd, D)
    shapes[p + "self_attn.o_proj.weight"] = (D, H * Hd)
    if cfg.is_lime:
      shapes[p + "self_attn.kv_proj_weight"] = (2 * Hd * R, D)
      if i >= 1:
        shapes[p + "self_attn.lime_router.static_weights"] = (R, (i + 1) * R)
    else:
      shapes[p + "self_attn.k_proj.weight"] = (R * Hd, D)
      shapes[p + "self_attn.v_proj.weight"] = (R * Hd, D)
    shapes[p + "mlp.gate_proj.weight"] = (F, D)
    shapes[p + "mlp.up_proj.weight"] = (F, D)
    shapes[p + "mlp.down_proj.weight"] = (D, F)
  return shapes


def to_hf_tensors(params: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Our parameters as HF-named float32 arrays (torch Linear layout: [out, in])."""
  def f32(x) -> np.ndarray:
    return np.asarray(x).astype(np.float32)

  L, D, H, R, Hd = cfg.L, cfg.D, cfg.H, cfg.R, cfg.Hd
  stacked = jax.tree.map(f32, stack.stacked_layer_params(params, cfg))
  tensors = {"model.embed_tokens.weight": f32(params["embed"]),
             "model.norm.weight": f32(params["final_norm"]["scale"])}
  if not cfg.tie_embeddings:
    tensors["lm_head.weight"] = f32(params["unembed"]).T
  if cfg.is_lime:
    W_LxRxLxR = f32(model.router_weights(params, cfg))  # masked, so unused entries never leak
  for i in range(L):
    p = _layer(i)
    tensors[p + "input_layernorm.weight"] = stacked["attn_norm"]["scale"][i]
    tensors[p + "post_attention_layernorm.weight"] = stacked["mlp_norm"]["scale"][i]
    tensors[p + "self_attn.q_proj.weight"] = (
        stacked["attn"]["q_proj"][i].transpose(1, 2, 0).reshape(H * Hd, D))
    tensors[p + "self_attn.o_proj.weight"] = stacked["attn"]["o_proj"][i].reshape(H * Hd, D).T
    kv_DxRx2xHd = stacked["kv_proj"][i]
    if cfg.is_lime:
      # Reference row c*R + h, c = kv*Hd + d: axes (2, Hd, R) flattened, then D.
      tensors[p + "self_attn.kv_proj_weight"] = (
          kv_DxRx2xHd.transpose(2, 3, 1, 0).reshape(2 * Hd * R, D))
      if i >= 1:
        tensors[p + "self_attn.lime_router.static_weights"] = (
            W_LxRxLxR[i, :, :i + 1, :].reshape(R, (i + 1) * R))
    else:
      for c, name in enumerate(("k_proj", "v_proj")):  # row h*Hd + d
        tensors[p + f"self_attn.{name}.weight"] = (
            kv_DxRx2xHd[:, :, c].transpose(1, 2, 0).reshape(R * Hd, D))
    tensors[p + "mlp.gate_proj.weight"] = stacked["mlp"]["gate_up"][i][:, 0].T
    tensors[p + "mlp.up_proj.weight"] = stacked["mlp"]["gate_up"][i][:, 1].T
    tensors[p + "mlp.down_proj.weight"] = stacked["mlp"]["down"][i].T
  return {name: np.ascontiguousarray(x) for name, x in tensors.items()}


def from_hf_tensors(tensors: Mapping[str, np.ndarray], cfg: ModelConfig,
                    where: str = WEIGHTS_FILE) -> dict[str, Any]:
  """HF-named arrays -> our parameter tree in `cfg`'s layout and dtypes; checks names/shapes."""
  check_tensors(tensors, cfg, where)
  L, D, H, R, Hd = cfg.L, cfg.D, cfg.H, cfg.R, cfg.Hd

  def get(name: str) -> np.ndarray:
    return np.asarray(tensors[name], np.float32)

  def per_layer(fn) -> np.ndarray:
    return np.stack([fn(_layer(i), i) for i in range(L)])

  stacked = {
      "attn_norm": {"scale": per_layer(lambda p, i: get(p + "input_layernorm.weight"))},
      "mlp_norm": {"scale": per_layer(lambda p, i: get(p + "post_attention_layernorm.weight"))},
      "attn": {
          "q_proj": per_layer(lambda p, i: get(p + "self_attn.q_proj.weight")
                              .reshape(H, Hd, D).transpose(2, 0, 1)),
          "o_proj": per_layer(lambda p, i: get(p + "self_attn.o_proj.weight").T.reshape(H, Hd, D)),
      },
      "mlp": {
          "gate_up": per_layer(lambda p, i: np.stack(
              [get(p + "mlp.gate_proj.weight").T, get(p + "mlp.up_proj.weight").T], axis=1)),
          "down": per_layer(lambda p, i: get(p + "mlp.down_proj.weight").T),
      },
  }
  if cfg.is_lime:
    stacked["kv_proj"] = per_layer(lambda p, i: get(p + "self_attn.kv_proj_weight")
                                   .reshape(2, Hd, R, D).transpose(3, 2, 0, 1))
    stacked["router"] = _push_weights(tensors, cfg)
  else:
    stacked["kv_proj"] = per_layer(lambda p, i: np.stack(
        [get(p + f"self_attn.{n}_proj.weight").reshape(R, Hd, D).transpose(2, 0, 1)
         for n in ("k", "v")], axis=2))
  top = {"embed": get("model.embed_tokens.weight"),
         "final_norm": {"scale": get("model.norm.weight")}}
  if not cfg.tie_embeddings:
    top["unembed"] = get("lm_head.weight").T
  params = stack.with_stacked_layer_params(top, stacked, cfg)
  # Cast to the dtypes init gives each leaf (routers stay float32 whatever param_dtype is).
  abstract = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
  if jax.tree.structure(abstract) != jax.tree.structure(params):
    raise ValueError(f"{where}: internal error: imported tree differs from the model's params")
  return jax.tree.map(lambda a, x: jnp.asarray(x, a.dtype), abstract, params)


def _push_weights(tensors: Mapping[str, np.ndarray], cfg: ModelConfig) -> np.ndarray:
  """static_weights of every reader -> push layout [L_src, L_reader, R, R].

  Masked entries get what routing.init_push_weights stores there (and training never moves,
  their gradient being zero): zero for readers before the source, identity for layer 0 itself.
  """
  L, R = cfg.L, cfg.R
  push_LxLxRxR = np.zeros((L, L, R, R), np.float32)
  push_LxLxRxR[0, 0] = np.eye(R, dtype=np.float32)
  for i in range(1, L):
    W_RxIxR = np.asarray(tensors[_layer(i) + "self_attn.lime_router.static_weights"],
                         np.float32).reshape(R, i + 1, R)
    push_LxLxRxR[:i + 1, i] = W_RxIxR.transpose(1, 0, 2)
  return push_LxLxRxR


def check_tensors(tensors: Mapping[str, np.ndarray], cfg: ModelConfig,
                  where: str = WEIGHTS_FILE) -> None:
  """Names and shapes must be exactly what `cfg` exports; a tied lm_head may repeat embed."""
  wanted = expected_shapes(cfg)
  got = dict(tensors)
  if cfg.tie_embeddings and "lm_head.weight" in got:
    if not np.array_equal(got["lm_head.weight"], got.get("model.embed_tokens.weight")):
      raise ValueError(f"{where}: has lm_head.weight different from model.embed_tokens.weight,"
                       f" but {CONFIG_FILE} says tie_word_embeddings=true")
    del got["lm_head.weight"]
  for name, shape in wanted.items():
    if name not in got:
      raise ValueError(f"{where}: missing tensor {name} (expected by {CONFIG_FILE}: {_arch(cfg)})")
    if tuple(got[name].shape) != shape:
      raise ValueError(f"{where}: tensor {name} has shape {tuple(got[name].shape)}, {CONFIG_FILE}"
                       f" ({_arch(cfg)}) expects {shape}")
    if not np.issubdtype(got[name].dtype, np.floating):
      raise ValueError(f"{where}: tensor {name} has dtype {got[name].dtype}, expected a float")
  extra = sorted(set(got) - set(wanted))
  if extra:
    raise ValueError(f"{where}: unexpected tensor {extra[0]} ({len(extra)} in all) for"
                     f" {CONFIG_FILE} ({_arch(cfg)})")


def _arch(cfg: ModelConfig) -> str:
  return (f"V={cfg.V} D={cfg.D} L={cfg.L} H={cfg.H} R={cfg.R} Hd={cfg.Hd} F={cfg.F}"
          f" router={cfg.router} tied={cfg.tie_embeddings}")


# --- directories ----------------------------------------------------------------------------------

def export_params(params: Mapping[str, Any], cfg: ModelConfig, out_dir: str) -> None:
  """Writes `out_dir/model.safetensors` and `out_dir/config.json` (created or overwritten)."""
  if not mixers.build(cfg).exportable:
    raise ValueError(f"export: router={cfg.router!r}, connections={cfg.connections!r} has no"
                     " Hugging Face layout here; only Llama and LIMe kv-static export")
  tensors = to_hf_tensors(params, cfg)
  check_tensors(tensors, cfg, where="export")
  os.makedirs(out_dir, exist_ok=True)
  # Temporary names, then renames: a killed export never leaves a half file under the real name.
  weights, config = os.path.join(out_dir, WEIGHTS_FILE), os.path.join(out_dir, CONFIG_FILE)
  save_file(tensors, weights + ".tmp", metadata={"format": "pt"})  # transformers wants "pt"
  with open(config + ".tmp", "w", encoding="utf-8") as f:
    json.dump(hf_config(cfg), f, indent=2)
    f.write("\n")
  os.replace(weights + ".tmp", weights)
  os.replace(config + ".tmp", config)


def import_params(in_dir: str,
                  cfg: ModelConfig | None = None) -> tuple[dict[str, Any], ModelConfig]:
  """Reads an exported (or plain HF Llama) directory into (params, cfg).

  `cfg` picks the layout to load into (scanned or not, dtypes); it must describe the same
  model as the file, differing at most in LAYOUT_FIELDS. Default: the stored config.
  """
  if not os.path.isdir(in_dir):
    raise ValueError(f"{in_dir}: no such directory")
  config_path, weights_path = os.path.join(in_dir, CONFIG_FILE), os.path.join(in_dir, WEIGHTS_FILE)
  for path in (config_path, weights_path):
    if not os.path.isfile(path):
      raise ValueError(f"{path}: missing")
  try:
    with open(config_path, encoding="utf-8") as f:
      hf = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
    raise ValueError(f"{config_path}: not readable JSON: {one_line(err, limit=300)}") from None
  file_cfg = config_from_hf(hf, where=config_path)
  if cfg is None:
    cfg = file_cfg
  else:
    _check_same_model(cfg, file_cfg, config_path)
  try:
    tensors = load_file(weights_path)
  except Exception as err:  # safetensors raises its own error types for damaged files
    raise ValueError(f"{weights_path}: cannot read: {one_line(err, limit=300)}") from None
  return from_hf_tensors(tensors, cfg, where=weights_path), cfg


def _check_same_model(cfg: ModelConfig, file_cfg: ModelConfig, where: str) -> None:
  for field in dataclasses.fields(ModelConfig):
    if field.name in LAYOUT_FIELDS:
      continue
    mine, theirs = getattr(cfg, field.name), getattr(file_cfg, field.name)
    if mine != theirs:
      raise ValueError(f"{where}: describes {field.name}={theirs!r}, the given config has"
                       f" {field.name}={mine!r}")
