"""The single source of parameter and FLOP counts (spec section 4), used by MFU logging,
benchmarks, sweeps and plots alike.

Counts are analytic. One multiply-add is 2 FLOPs; a training step costs 3x the forward
(forward, plus gradients w.r.t. activations and weights).
"""

from __future__ import annotations

from lime_jax.model import connections
from lime_jax.model import hidden_routing
from lime_jax.config import HIDDEN_ROUTERS, ModelConfig
from lime_jax.model import kv_routing as routing
from lime_jax.model.kv_routing import num_router_params


def layer_params(cfg: ModelConfig) -> int:
  """Parameters of one baseline layer: q, kv, o projections, SwiGLU, two norm scales."""
  attention = cfg.D * cfg.H * cfg.Hd + cfg.D * cfg.R * 2 * cfg.Hd + cfg.H * cfg.Hd * cfg.D
  mlp = 3 * cfg.D * cfg.F
  return attention + mlp + 2 * cfg.D


def router_params(cfg: ModelConfig) -> int:
  """LIMe's extra parameters: R^2 (L(L+1)/2 - 1) for kv routing, 0 for the baseline; for the
  hidden routers their logits (or dynamic maps) and extra norms (hidden_routing.py)."""
  if cfg.router in HIDDEN_ROUTERS:
    return hidden_routing.num_router_params(cfg.L, cfg.D, cfg.H, cfg.router, cfg.router_window,
                                            cfg.router_dilation)
  return (num_router_params(cfg.L, cfg.R, cfg.router_window, cfg.router_dilation)
          if cfg.router == "kv-static" else 0)


def embedding_params(cfg: ModelConfig) -> int:
  return cfg.V * cfg.D * (1 if cfg.tie_embeddings else 2)


def connection_params(cfg: ModelConfig) -> int:
  """Cross-layer baselines' extra parameters (connections.py): hyper-connections' static and
  dynamic weights, DenseFormer's live averaging weights (L(L+3)/2 for 1x1)."""
  return connections.num_hc_params(cfg) + connections.num_denseformer_params(cfg)


def non_embedding_params(cfg: ModelConfig) -> int:
  return (cfg.L * layer_params(cfg) + router_params(cfg) + connection_params(cfg)
          + cfg.D)  # + final norm


def total_params(cfg: ModelConfig) -> int:
  return non_embedding_params(cfg) + embedding_params(cfg)


def routing_macs_per_token(cfg: ModelConfig) -> int:
  """The extra forward multiply-adds per token. kv-static: the spec's 2 Hd R^2 (L(L+1)/2 - 1).
  Hidden routers, per live (reader >= 1, source) pair: the per-head mix H D, and for dynamic
  ones the logits D H too. Their per-head K/V projections (2 H D Hd per layer) are the baseline's
  kv projection with R = H, counted in layer_params."""
  if cfg.router in HIDDEN_ROUTERS:
    pairs = hidden_routing.num_live_pairs(cfg.L, cfg.router_window, cfg.router_dilation)
    return (1 if cfg.router == "hidden-static" else 2) * cfg.H * cfg.D * pairs
  return 2 * cfg.Hd * router_params(cfg)


def connection_macs_per_token(cfg: ModelConfig) -> int:
  """Extra forward multiply-adds per token of the cross-layer baselines (model FLOPs).

  Hyper-connections, per sub-layer (2 per layer): the input mix n D, the copies' mix n^2 D and
  the output's n D, i.e. D n (n+2); dynamic adds the projections of the n normed copies to
  n+2 weights, D n (n+2). Norms, tanh and the final sum of the copies are not counted (as
  norms are not for the baseline). DenseFormer: D per live averaging weight.
  """
  n = cfg.hc_expansion
  if connections.is_hyper(cfg):
    per_sublayer = cfg.D * n * (n + 2) * (2 if cfg.connections == "hyper-dynamic" else 1)
    return 2 * cfg.L * per_sublayer
  return cfg.D * connections.num_denseformer_params(cfg)


def executed_push_macs_per_token(cfg: ModelConfig) -> int:
  """Multiply-adds per token that the push accumulators (kv-static, DenseFormer) execute.

  Differs from the model FLOPs above: under nn.scan a layer's traced index cannot slice, so
  layer l updates every slot of its segment's accumulator (readers start..L-1), masked ones
  included; sparse kv routing (router_window / router_dilation) saves parameters there, not
  FLOPs. Unrolled (`scan_layers: false`), a layer touches only its live slots. DenseFormer's
  embedding push touches all L slots either way.
  """
  if cfg.router == "kv-static":
    per_slot = 2 * cfg.Hd * cfg.R * cfg.R
    live = routing.live_mask(cfg.L, cfg.router_window, cfg.router_dilation)  # [source, reader]
    extra = 0
  elif cfg.connections == "denseformer":
    per_slot = cfg.D
    live = connections.dwa_live_mask(cfg.L, cfg.denseformer_dilation,
                                     cfg.denseformer_period)[1:].copy()  # block l = source l+1
    live[range(cfg.L), range(cfg.L)] = True  # its own slot, fixed 1 without an average
    extra = cfg.L * cfg.D  # the embeddings' push
  else:
    return 0
  if not cfg.scan_layers:
    return per_slot * int(live.sum()) + extra
  slots = sum((stop - start) * (cfg.L - start) for start, stop in routing.segment_bounds(
      cfg.L, cfg.scan_segments))
  return per_slot * slots + extra


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
  """Forward FLOPs per token at sequence length `seq_len`.

  Matmuls over all weights (the unembedding included, the embedding lookup not), attention
  scores and weighted values over the full causal window (counted as T/2 keys on average),
  and LIMe routing.
  """
  matmul_macs = cfg.L * (layer_params(cfg) - 2 * cfg.D) + cfg.D * cfg.V
  attention_macs = cfg.L * 2 * cfg.H * cfg.Hd * seq_len // 2
  return 2 * (matmul_macs + attention_macs + routing_macs_per_token(cfg)
              + connection_macs_per_token(cfg))


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
  """Model FLOPs of a training step (3x the forward; recomputation not counted, as MFU wants)."""
  return 3 * forward_flops_per_token(cfg, seq_len)


def recompute_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
  """FLOPs a training step spends re-running forwards: the hidden routers' pull-form backward
  re-runs every layer once (hidden_routing.py); 0 otherwise (remat policies not counted).

  The re-run needs only what the layer's VJP reads, not the layer's output (the forward saved
  every layer's input), so the MLP's down projection is dead code there and XLA drops it;
  neither is the unembedding re-run."""
  if cfg.router not in HIDDEN_ROUTERS:
    return 0
  down_projections = 2 * cfg.L * cfg.F * cfg.D
  return forward_flops_per_token(cfg, seq_len) - 2 * cfg.D * cfg.V - down_projections


def step_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
  """FLOPs a training step executes: model FLOPs plus recomputation."""
  return train_flops_per_token(cfg, seq_len) + recompute_flops_per_token(cfg, seq_len)


def routing_train_flops(cfg: ModelConfig, tokens: int, seq_len: int | None = None) -> int:
  """Training-step FLOPs that LIMe routing adds over the baseline, per the spec formula (plus,
  for the hidden routers, the recomputed forward of their pull-form backward, at `seq_len`,
  default cfg.T)."""
  recompute = recompute_flops_per_token(cfg, seq_len or cfg.T)
  return (3 * 2 * routing_macs_per_token(cfg) + recompute) * tokens
