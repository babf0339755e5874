"""The train state and one optimizer step: loss, gradient, update. Pure functions, jit-ready."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from lime_jax.model import top_p
from lime_jax.config import ModelConfig
from lime_jax.train.loss import mean_loss
from lime_jax.model.transformer import Transformer, init_params

Batch = dict[str, jax.Array]  # inputs_BxT, targets_BxT, optional weights_BxT


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def init_train_state(model_cfg: ModelConfig, tx: optax.GradientTransformation,
                     rng: jax.Array) -> TrainState:
  params = init_params(model_cfg, rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def loss_fn(params: Any, model_cfg: ModelConfig, batch: Batch) -> jax.Array:
  logits_BxTxV = Transformer(model_cfg).apply({"params": params}, batch["inputs"])
  return mean_loss(logits_BxTxV, batch["targets"], batch.get("weights"))


def train_step(state: TrainState, batch: Batch, model_cfg: ModelConfig,
               tx: optax.GradientTransformation) -> tuple[TrainState, dict[str, jax.Array]]:
  params = top_p.refresh(state.params, model_cfg, state.step)  # no-op unless model_cfg.top_p
  loss, grads = jax.value_and_grad(loss_fn)(params, model_cfg, batch)
  updates, opt_state = tx.update(grads, state.opt_state, params)
  params = optax.apply_updates(params, updates)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: Batch, model_cfg: ModelConfig) -> jax.Array:
  return loss_fn(params, model_cfg, batch)
