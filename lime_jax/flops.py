"""The single source of parameter and FLOP counts (spec section 4), used by MFU logging,
benchmarks, sweeps and plots alike.

Counts are analytic. One multiply-add is 2 FLOPs; a training step costs 3x the forward
(forward, plus gradients w.r.t. activations and weights).
"""

from __future__ import annotations

from lime_jax.config import ModelConfig
from lime_jax.routing import num_router_params


def layer_params(cfg: ModelConfig) -> int:
  """Parameters of one baseline layer: q, kv, o projections, SwiGLU, two norm scales."""
  attention = cfg.D * cfg.H * cfg.Hd + cfg.D * cfg.R * 2 * cfg.Hd + cfg.H * cfg.Hd * cfg.D
  mlp = 3 * cfg.D * cfg.F
  return attention + mlp + 2 * cfg.D


def router_params(cfg: ModelConfig) -> int:
  """LIMe's extra parameters: R^2 (L(L+1)/2 - 1) for kv routing, 0 for the baseline."""
  return num_router_params(cfg.L, cfg.R) if cfg.router == "kv-static" else 0


def embedding_params(cfg: ModelConfig) -> int:
  return cfg.V * cfg.D * (1 if cfg.tie_embeddings else 2)


def non_embedding_params(cfg: ModelConfig) -> int:
  return cfg.L * layer_params(cfg) + router_params(cfg) + cfg.D  # + final norm


def total_params(cfg: ModelConfig) -> int:
  return non_embedding_params(cfg) + embedding_params(cfg)


def routing_macs_per_token(cfg: ModelConfig) -> int:
  """The spec's extra forward multiply-adds per token: 2 Hd R^2 (L(L+1)/2 - 1)."""
  return 2 * cfg.Hd * router_params(cfg)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
  """Forward FLOPs per token at sequence length `seq_len`.

  Matmuls over all weights (the unembedding included, the embedding lookup not), attention
  scores and weighted values over the full causal window (counted as T/2 keys on average),
  and LIMe routing.
  """
  matmul_macs = cfg.L * (layer_params(cfg) - 2 * cfg.D) + cfg.D * cfg.V
  attention_macs = cfg.L * 2 * cfg.H * cfg.Hd * seq_len // 2
  return 2 * (matmul_macs + attention_macs + routing_macs_per_token(cfg))


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
  return 3 * forward_flops_per_token(cfg, seq_len)


def routing_train_flops(cfg: ModelConfig, tokens: int) -> int:
  """Training-step FLOPs that LIMe routing adds over the baseline, per the spec formula."""
  return 3 * 2 * routing_macs_per_token(cfg) * tokens
