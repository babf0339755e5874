"""AdamW with parameter groups: LIMe routers get their own lr and no weight decay.

Groups (by parameter path):
- `router`: lr `router_lr` (1e-2), no weight decay. Decaying routers caused NaNs for users of
  similar cross-layer methods (spec section 2).
- `no_decay`: norms, embeddings and the baselines' mixing weights (DenseFormer `dwa`,
  hyper-connections and mHC `hc_*`, Attention Residuals' pseudo-queries and key norms
  `attn_res_*`, value residual `value_lambda`), main lr, no weight decay.
- `decay`: everything else, main lr, weight decay `weight_decay`.
- `frozen`: top-p masks (top_p.py), state kept in the parameters; their update is zero.
All share the warmup + cosine multiplier and the global-norm clip.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import optax

from lime_jax.config import build_dataclass

GROUPS = ("router", "no_decay", "decay", "frozen")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 1e-3
  router_lr: float = 1e-2
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip: float = 1.0
  warmup_steps: int = 200
  total_steps: int = 20_000
  final_lr_fraction: float = 0.1  # cosine floor, as a fraction of the peak lr
  grad_accum_steps: int = 1

  def __post_init__(self):
    for name in ("lr", "router_lr", "b1", "b2", "eps"):
      if not getattr(self, name) > 0:
        raise ValueError(f"optim.{name}: must be > 0, got {getattr(self, name)}")
    for name in ("b1", "b2"):
      if not getattr(self, name) < 1:
        raise ValueError(f"optim.{name}: must be < 1, got {getattr(self, name)}")
    if self.weight_decay < 0:
      raise ValueError(f"optim.weight_decay: must be >= 0, got {self.weight_decay}")
    if self.grad_clip < 0:
      raise ValueError(f"optim.grad_clip: must be >= 0 (0 disables), got {self.grad_clip}")
    if self.warmup_steps < 0:
      raise ValueError(f"optim.warmup_steps: must be >= 0, got {self.warmup_steps}")
    if self.total_steps < 1:
      raise ValueError(f"optim.total_steps: must be >= 1, got {self.total_steps}")
    if not 0 <= self.final_lr_fraction <= 1:
      raise ValueError(f"optim.final_lr_fraction: must be in [0, 1], got {self.final_lr_fraction}")
    if self.grad_accum_steps < 1:
      raise ValueError(f"optim.grad_accum_steps: must be >= 1, got {self.grad_accum_steps}")

  @classmethod
  def from_dict(cls, values: Mapping[str, Any], where: str = "optim") -> "OptimConfig":
    return build_dataclass(cls, values, where)


def lr_multiplier(cfg: OptimConfig) -> optax.Schedule:
  """Linear warmup from 0 to 1, then cosine from 1 to `final_lr_fraction`."""
  decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, 1.0, max(cfg.warmup_steps, 1)),
       optax.cosine_decay_schedule(1.0, decay_steps, alpha=cfg.final_lr_fraction)],
      boundaries=[cfg.warmup_steps])


def param_group(path: tuple[Any, ...]) -> str:
  names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  leaf = names[-1]
  if leaf == "router":
    return "router"
  if leaf == "top_p_mask":
    return "frozen"
  if leaf in ("embed", "unembed", "scale"):
    return "no_decay"
  if leaf in ("dwa", "value_lambda") or leaf.startswith(("hc_", "attn_res_")):
    # DenseFormer / hyper-connection mixing weights start at the identity (AttnRes' queries at
    # the uniform average); decay would pull them towards zero, away from it. Main lr: the
    # baselines as their papers train them.
    return "no_decay"
  return "decay"


def param_labels(params: Any) -> Any:
  return jax.tree_util.tree_map_with_path(lambda path, _: param_group(path), params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  multiplier = lr_multiplier(cfg)

  def adamw(peak_lr: float, weight_decay: float) -> optax.GradientTransformation:
    return optax.adamw(lambda step: peak_lr * multiplier(step), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                       weight_decay=weight_decay)

  tx = optax.multi_transform(
      {"router": adamw(cfg.router_lr, 0.0),
       "no_decay": adamw(cfg.lr, 0.0),
       "decay": adamw(cfg.lr, cfg.weight_decay),
       "frozen": optax.set_to_zero()},
      param_labels)
  if cfg.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
  if cfg.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
  return tx
