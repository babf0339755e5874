"""Model configuration: one frozen dataclass, validated on construction.

Field names follow the axis letters used in tensor names throughout the package:
V vocab, D width, L layers, H query heads, R key/value heads, Hd head size, F MLP width,
T maximum length.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

ROUTERS = ("none", "kv-static", "hidden-static", "hidden-dynamic", "depth-attention",
           "value-residual")
# LIMe's routers (`is_lime`); the others are none and the kv-level methods compared with it.
LIME_ROUTERS = ("kv-static", "hidden-static", "hidden-dynamic")
HIDDEN_ROUTERS = ("hidden-static", "hidden-dynamic")  # the paper's v1; see hidden_routing.py
TOP_P_ROUTERS = ("kv-static", "hidden-static")  # the static routers top-p prunes (top_p.py)
REMAT_POLICIES = ("none", "full", "dots", "save_proj")
ATTENTION_IMPLS = ("einsum", "dot_product", "lse_recompute")  # layers.causal_attention
# kv routing's training data movement (model/mixers/kv_routing.py): the float32 push accumulator,
# or the pull over a compute-dtype buffer of raw kv with a read-only backward (model/kv_pull.py).
ROUTING_IMPLS = ("push", "pull")
# The push's raw kv under nn.scan: recomputed in the backward from the layer's normed input, or
# saved (one float32 kv per layer more memory, one kv projection per layer less compute).
PUSH_RAW_KV = ("recompute", "save")
# kv-static's kv projection init: the reference code's U(+-1/sqrt(D)), or the baseline's N(0, 0.02).
KV_INITS = ("reference", "baseline")
CONNECTIONS = ("none", "hyper-static", "hyper-dynamic", "denseformer", "attn-res",
               "block-attn-res", "mhc")  # cross-layer baselines
DTYPES = ("float32", "bfloat16", "float16")


class ConfigSection:
  """replace / to_dict / from_dict for a frozen config dataclass; `section` names it in errors."""

  section = ""

  def replace(self, **changes: Any):
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any], where: str | None = None):
    """Builds a config from a mapping; unknown keys and wrong types raise ValueError."""
    return build_dataclass(cls, values, where or cls.section)


# ModelConfig fields that choose how the same parameters compute the same math (its float
# rounding, not the model): a run resumes across them (train/experiment.py), an import loads
# across them (interop/hf.py).
COMPUTATION_FIELDS = ("scan_unroll", "remat_policy", "attention_query_blocks", "attention_impl",
                      "routing_impl", "push_raw_kv")


@dataclasses.dataclass(frozen=True)
class ModelConfig(ConfigSection):
  """A decoder-only Llama-style model, optionally with LIMe key/value routing."""

  section = "model"

  V: int = 256  # vocabulary size
  D: int = 256  # model width
  L: int = 8  # layers
  H: int = 4  # query heads
  R: int | None = None  # key/value heads (None: same as H, i.e. MHA)
  Hd: int | None = None  # head size (None: D // H)
  F: int = 1024  # SwiGLU hidden width
  T: int = 256  # maximum sequence length (RoPE tables)
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  router: str = "kv-static"
  scan_layers: bool = True
  scan_segments: int = 8  # LIMe: scans over contiguous layer ranges; see routing.segment_bounds
  scan_unroll: int = 1  # layers per scan iteration (L = straight-line code, same math)
  remat_policy: str = "none"
  # lse_recompute: float32-softmax attention that saves a log-sum-exp per query instead of the
  # probabilities and recomputes them in the backward (model/lse_attention.py); einsum: the same
  # math by plain autodiff, which saves the float32 [B, H, T, S] probabilities (the default
  # until 2026-12-06); dot_product: jax.nn.dot_product_attention, which picks the fused kernel
  # the device offers (cuDNN flash attention on NVIDIA GPUs) or XLA's own.
  attention_impl: str = "lse_recompute"
  # Attention without a cache (training, evaluation) by this many query blocks, each reading
  # the keys up to its own end, so the masked triangle is mostly not computed (4: 5/8 of the
  # scores); exact, since those forwards run at positions 0..T-1 (layers.causal_attention).
  # 1: every query against every key, masked. None (the default; null in YAML): by platform,
  # with `lse_recompute`: where the step is lowered for the CPU, blocks of at least 64 queries,
  # at most 4 (lse_attention.cpu_query_blocks); one block on accelerators, with given positions
  # and with the other impls. configs/setups/paper_1p2b.yaml sets 4.
  attention_query_blocks: int | None = None
  # Sparse LIMe routing (any LIMe router): reader i reads source j <= i only if j == 0, or
  # i - j < router_window (the last `window` layers, itself included), or (i - j) % router_dilation
  # == 0. Both set: the union. None: dense. See routing.live_mask.
  router_window: int | None = None
  router_dilation: int | None = None
  # Top-p pruning of a static router (top_p.py): per reader and head keep the smallest set of
  # largest weights holding more than top_p of the mass; None: off. Mask refreshed every
  # top_p_refresh steps.
  top_p: float | None = None
  top_p_refresh: int = 100
  routing_impl: str = "push"  # kv-static training under nn.scan: push or pull (ROUTING_IMPLS)
  push_raw_kv: str = "recompute"  # PUSH_RAW_KV; kv_routing.py's module doc
  # kv-static init ablations (experiments/RESULTS.md): the kv projection's init (KV_INITS), and a
  # factor on the routers' off-diagonal init bound (1: the reference; 0: each layer reads itself).
  kv_init: str = "reference"
  router_init_scale: float = 1.0
  # Cross-layer baselines (connections.py), each with router "none".
  connections: str = "none"
  hc_expansion: int = 4  # hyper-connections: n copies of the residual stream
  denseformer_dilation: int = 1  # DenseFormer: reader i weights X_j only if (i+1-j) % dilation == 0
  denseformer_period: int = 1  # DenseFormer: a weighted average after every period-th block only
  # Block Attention Residuals: the 2L sub-layers are grouped into this many blocks of equal size
  # (the paper's N, about 8); `attn-res` is the full form, one block per sub-layer.
  attn_res_blocks: int = 8
  sinkhorn_iterations: int = 20  # mHC: Sinkhorn-Knopp steps projecting H_res (mixers/mhc.py)

  def __post_init__(self):
    for name in ("V", "D", "L", "H", "F", "T", "scan_segments", "scan_unroll"):
      _require_positive_int(name, getattr(self, name))
    if self.attention_query_blocks is not None:
      _require_positive_int("attention_query_blocks", self.attention_query_blocks)
    if self.R is None:
      object.__setattr__(self, "R", self.H)
    _require_positive_int("R", self.R)
    if self.Hd is None:
      if self.D % self.H:
        raise ValueError(
            f"ModelConfig.Hd: not given and D={self.D} is not divisible by H={self.H};"
            " set Hd explicitly")
      object.__setattr__(self, "Hd", self.D // self.H)
    _require_positive_int("Hd", self.Hd)
    if self.H % self.R:
      raise ValueError(
          f"ModelConfig.R: H={self.H} query heads must be divisible by R={self.R} kv heads")
    if self.H * self.Hd != self.D:
      raise ValueError(
          f"ModelConfig.Hd: H*Hd={self.H}*{self.Hd}={self.H * self.Hd} must equal D={self.D}")
    if self.Hd % 2:
      raise ValueError(f"ModelConfig.Hd: RoPE needs an even head size, got {self.Hd}")
    if self.router not in ROUTERS:
      raise ValueError(f"ModelConfig.router: unknown router {self.router!r}; choose from {ROUTERS}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
          f"ModelConfig.remat_policy: unknown policy {self.remat_policy!r};"
          f" choose from {REMAT_POLICIES}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"ModelConfig.attention_impl: unknown {self.attention_impl!r}; choose from"
                       f" {ATTENTION_IMPLS}")
    for name in ("param_dtype", "compute_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(
            f"ModelConfig.{name}: unknown dtype {getattr(self, name)!r}; choose from {DTYPES}")
    for name in ("router_window", "router_dilation"):
      if getattr(self, name) is not None:
        _require_positive_int(name, getattr(self, name))
        if not self.is_lime:
          raise ValueError(f"ModelConfig.{name}: sparse routing needs a LIMe router, got"
                           f" router={self.router!r}")
    if self.router in HIDDEN_ROUTERS and self.R != self.H:
      raise ValueError(f"ModelConfig.R: router={self.router!r} builds K/V per query head, so it"
                       f" needs R = H (got R={self.R}, H={self.H}); GQA does not apply")
    _require_positive_int("top_p_refresh", self.top_p_refresh)
    if self.routing_impl not in ROUTING_IMPLS:
      raise ValueError(f"ModelConfig.routing_impl: unknown {self.routing_impl!r}; choose from"
                       f" {ROUTING_IMPLS}")
    if self.push_raw_kv not in PUSH_RAW_KV:
      raise ValueError(f"ModelConfig.push_raw_kv: unknown {self.push_raw_kv!r}; choose from"
                       f" {PUSH_RAW_KV}")
    if self.kv_init not in KV_INITS:
      raise ValueError(f"ModelConfig.kv_init: unknown {self.kv_init!r}; choose from {KV_INITS}")
    if not self.router_init_scale >= 0:
      raise ValueError(f"ModelConfig.router_init_scale: must be >= 0, got {self.router_init_scale}")
    for name in ("kv_init", "router_init_scale"):
      if getattr(self, name) != _FIELD_DEFAULTS[name] and self.router != "kv-static":
        raise ValueError(f"ModelConfig.{name}: applies to router 'kv-static' only, got"
                         f" router={self.router!r}")
    if self.top_p is not None:
      if self.router not in TOP_P_ROUTERS:
        raise ValueError(f"ModelConfig.top_p: pruning needs router in {TOP_P_ROUTERS},"
                         f" got router={self.router!r}")
      if not 0 < self.top_p <= 1:
        raise ValueError(f"ModelConfig.top_p: must be in (0, 1], got {self.top_p}")
    for name in ("hc_expansion", "denseformer_dilation", "denseformer_period", "attn_res_blocks",
                 "sinkhorn_iterations"):
      _require_positive_int(name, getattr(self, name))
    if self.connections == "block-attn-res" and (2 * self.L) % self.attn_res_blocks:
      raise ValueError(f"ModelConfig.attn_res_blocks: the 2L = {2 * self.L} sub-layers must split"
                       f" into {self.attn_res_blocks} blocks of equal size")
    if self.connections not in CONNECTIONS:
      raise ValueError(f"ModelConfig.connections: unknown connections {self.connections!r};"
                       f" choose from {CONNECTIONS}")
    if self.connections == "mhc" and self.hc_expansion < 2:
      raise ValueError(f"ModelConfig.hc_expansion: connections 'mhc' needs at least 2 copies of"
                       f" the stream, got {self.hc_expansion}")
    if self.connections != "none" and self.router != "none":
      raise ValueError(f"ModelConfig.connections: {self.connections!r} is a baseline and does not"
                       f" combine with router={self.router!r}; set router: none")
    if not self.rope_theta > 0:
      raise ValueError(f"ModelConfig.rope_theta: must be > 0, got {self.rope_theta}")
    if not self.norm_eps > 0:
      raise ValueError(f"ModelConfig.norm_eps: must be > 0, got {self.norm_eps}")

  @property
  def is_lime(self) -> bool:
    return self.router in LIME_ROUTERS


_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}


def require_positive_int(field: str, value: Any) -> None:
  """The one positive-integer check for every config and argument; `field` names it in errors."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{field}: must be a positive integer, got {value!r}")


def require_seed(field: str, value: Any) -> None:
  """A seed must be an integer in [0, 2**32) (NumPy's and grain's range)."""
  if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
    raise ValueError(f"{field}: must be an integer in [0, 2**32), got {value!r}")


def _require_positive_int(name: str, value: Any) -> None:
  require_positive_int(f"ModelConfig.{name}", value)


def build_dataclass(cls, values: Mapping[str, Any], where: str):
  """Instantiates a frozen config dataclass from plain data with strict key and type checks."""
  if not isinstance(values, Mapping):
    raise ValueError(f"{where}: expected a mapping, got {type(values).__name__}")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
  kwargs = {}
  for key, value in values.items():
    kwargs[key] = _check_type(f"{where}.{key}", fields[key].type, value)
  return cls(**kwargs)


_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


def _check_type(where: str, annotation: Any, value: Any) -> Any:
  """Checks a value against a simple string annotation ('int', 'int | None', 'float', ...)."""
  text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
  options = [t.strip() for t in text.split("|")]
  if value is None:
    if "None" in options:
      return None
    raise ValueError(f"{where}: must not be null (expected {text})")
  for option in options:
    kind = _SCALARS.get(option)
    if kind is None:
      continue
    if kind is bool and isinstance(value, bool):
      return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
      return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if kind is str and isinstance(value, str):
      return value
  if not any(o in _SCALARS for o in options):  # containers: accept as given
    return value
  raise ValueError(f"{where}: expected {text}, got {type(value).__name__} {value!r}")
