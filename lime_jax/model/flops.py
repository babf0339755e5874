"""The single source of parameter and FLOP counts (spec section 4), used by MFU logging,
benchmarks, sweeps and plots alike. Each cross-layer method states its own share (mixers/).

Counts are analytic. One multiply-add is 2 FLOPs; a training step costs 3x the forward
(forward, plus gradients w.r.t. activations and weights).
"""

from __future__ import annotations

from lime_jax.config import ModelConfig
from lime_jax.model import mixers


def layer_params(cfg: ModelConfig) -> int:
  """Parameters of one baseline layer: q, kv, o projections, SwiGLU, two norm scales."""
  attention = cfg.D * cfg.H * cfg.Hd + cfg.D * cfg.R * 2 * cfg.Hd + cfg.H * cfg.Hd * cfg.D
  mlp = 3 * cfg.D * cfg.F
  return attention + mlp + 2 * cfg.D


def mixer_params(cfg: ModelConfig) -> int:
  """The cross-layer method's extra parameters: LIMe's routers R^2 (L(L+1)/2 - 1) for kv
  routing, the hidden routers' logits or maps and norms, hyper-connections' and DenseFormer's
  weights; 0 for the baseline."""
  return mixers.build(cfg).extra_params()


def embedding_params(cfg: ModelConfig) -> int:
  return cfg.V * cfg.D * (1 if cfg.tie_embeddings else 2)


def non_embedding_params(cfg: ModelConfig) -> int:
  return cfg.L * layer_params(cfg) + mixer_params(cfg) + cfg.D  # + final norm


def total_params(cfg: ModelConfig) -> int:
  return non_embedding_params(cfg) + embedding_params(cfg)


def mixer_macs_per_token(cfg: ModelConfig) -> int:
  """The method's extra forward multiply-adds per token (model FLOPs). kv-static: the spec's
  2 Hd R^2 (L(L+1)/2 - 1)."""
  return mixers.build(cfg).extra_macs_per_token()


def executed_push_macs_per_token(cfg: ModelConfig) -> int:
  """Multiply-adds per token that a push accumulator (kv-static, DenseFormer) executes.

  Differs from the model FLOPs: under nn.scan a layer's traced index cannot slice, so layer l
  updates every slot of its segment's accumulator, masked ones included. 0 without one.
  """
  return mixers.build(cfg).executed_push_macs_per_token()


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
  """Forward FLOPs per token at sequence length `seq_len`.

  Matmuls over all weights (the unembedding included, the embedding lookup not), attention
  scores and weighted values over the full causal window (counted as T/2 keys on average),
  and the cross-layer method's mixing.
  """
  matmul_macs = cfg.L * (layer_params(cfg) - 2 * cfg.D) + cfg.D * cfg.V
  attention_macs = cfg.L * 2 * cfg.H * cfg.Hd * seq_len // 2
  return 2 * (matmul_macs + attention_macs + mixer_macs_per_token(cfg))


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
  """Model FLOPs of a training step (3x the forward; recomputation not counted, as MFU wants)."""
  return 3 * forward_flops_per_token(cfg, seq_len)


def recompute_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
  """FLOPs a training step spends re-running forwards: the hidden routers' pull-form backward
  re-runs every layer once (mixers/hidden_routing.py); 0 otherwise (remat policies not counted)."""
  return mixers.build(cfg).recompute_flops_per_token(forward_flops_per_token(cfg, seq_len))


def step_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
  """FLOPs a training step executes: model FLOPs plus recomputation."""
  return train_flops_per_token(cfg, seq_len) + recompute_flops_per_token(cfg, seq_len)


def mixer_train_flops(cfg: ModelConfig, tokens: int, seq_len: int | None = None) -> int:
  """Training-step FLOPs that the cross-layer method adds over the baseline (plus, for the
  hidden routers, the recomputed forward of their pull-form backward, at `seq_len`, default
  cfg.T)."""
  recompute = recompute_flops_per_token(cfg, seq_len or cfg.T)
  return (3 * 2 * mixer_macs_per_token(cfg) + recompute) * tokens
