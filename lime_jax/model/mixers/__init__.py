"""Cross-layer methods, one module each behind the `Mixer` interface (base.py), chosen here by
config name: `router` for LIMe's routers, `connections` for the baselines it is compared with.

The names and their config-time rules (which need no JAX) are declared in lime_jax/config.py;
tests/model/test_mixers.py checks that this registry and those names agree.
"""

from __future__ import annotations

from lime_jax.config import ModelConfig
from lime_jax.model.mixers.attn_res import AttentionResiduals
from lime_jax.model.mixers.base import Mixer, straight_line
from lime_jax.model.mixers.denseformer import DenseFormer
from lime_jax.model.mixers.depth_attention import DepthAttention
from lime_jax.model.mixers.hidden_routing import HiddenRouting
from lime_jax.model.mixers.hyper import HyperConnections
from lime_jax.model.mixers.kv_routing import KvRouting
from lime_jax.model.mixers.mhc import ManifoldHyperConnections
from lime_jax.model.mixers.value_residual import ValueResidual

MIXERS: dict[str, type[Mixer]] = {
    "none": Mixer,
    "kv-static": KvRouting,
    "hidden-static": HiddenRouting,
    "hidden-dynamic": HiddenRouting,
    "hyper-static": HyperConnections,
    "hyper-dynamic": HyperConnections,
    "denseformer": DenseFormer,
    "attn-res": AttentionResiduals,
    "block-attn-res": AttentionResiduals,
    "depth-attention": DepthAttention,
    "value-residual": ValueResidual,
    "mhc": ManifoldHyperConnections,
}


def method_name(cfg: ModelConfig) -> str:
  """The config's cross-layer method: its router, or else its connections (they are exclusive)."""
  return cfg.router if cfg.router != "none" else cfg.connections


def build(cfg: ModelConfig) -> Mixer:
  """The mixer that implements `cfg`'s cross-layer method."""
  return MIXERS[method_name(cfg)](cfg)
