"""The training loop: data -> jitted, donating train step -> metrics, evals and checkpoints.

A run lives in `run.out_dir`: `config.yaml` (resolved), `metrics.jsonl`, `environment.jsonl`
(versions, device and commit of every start; environment.py), `tensorboard/` and
`checkpoints/<step>/`. Steps are optimizer steps; with `optim.grad_accum_steps = k` each is k
micro-batches through optax.MultiSteps.

- Resume (`run.resume`): "auto" continues from the latest checkpoint when out_dir holds one,
  "always" (`--resume`) requires one, "never" refuses an out_dir that holds one. A checkpoint
  restores params, optimizer state, step, RNG and the data iterator, so N steps + N resumed
  steps equal 2N straight steps bit for bit. Every config field except the bookkeeping ones
  (`experiment.RESUMABLE_RUN_FIELDS`) must match the checkpoint's.
- One process per out_dir: process 0 holds `<out_dir>/run.lock` for the whole run
  (run_lock.py), so a second `train` on the same out_dir stops with a one-line error naming the
  holder's host and pid; the kernel drops the lock when its holder dies, however it dies.
- An unreadable newest checkpoint stops the run with an error that names the newest older step
  that restores and how to resume from it (move the damaged step aside); it is not skipped
  silently, since that would drop training and rewrite metrics over a possibly passing fault.
- Non-finite loss or gradient norm stops the run with `NonFiniteLossError` naming the step;
  in-flight checkpoint writes finish first, so the last good checkpoint stays restorable.
  Parameters are checked finite before each save, so a saved checkpoint is never poisoned.
- Process 0 logs every record to metrics.jsonl, TensorBoard and, with `run.wandb_project`, W&B
  (with the resolved config; `WANDB_MODE=offline` is honoured).
- The host fetches step n's metrics only after step n+1 is dispatched (metrics.DeferredFetch);
  it waits for the device only at evaluation, checkpoint and final steps.
- Sharded on the config's mesh (`mesh` section, sharding.py; default one device): the state is
  born sharded (jitted init with out_shardings), the step is jitted with in/out shardings and
  donation and runs under the mesh and logical rules, and each process places only its own
  batch rows (jax.make_array_from_process_local_data). Only process 0 writes logs and metrics;
  every process takes part in checkpoint writes (orbax), to `run.checkpoint_dir` (default
  `<out_dir>/checkpoints`; any orbax path, e.g. a gs:// bucket, shared by all hosts).
- With a `task` section the batches come from the synthetic task (answer-only loss weights) and
  evaluation runs on its test split: answer-token loss as val_loss, plus exact-match
  val_accuracy beside its chance level.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import yaml

from lime_jax.train import checkpoint as ckpt
from lime_jax.train import environment
from lime_jax.data import sources
from lime_jax.model import flops as flops_lib
from lime_jax.train import metrics as metrics_lib
from lime_jax.train import run_lock
from lime_jax.parallel import sharding as sharding_lib
from lime_jax.train.evaluate import filled_to_multiple, task_metrics, validation_loss
from lime_jax.train.experiment import (ExperimentConfig, check_vocab, computation_differences,
                                       config_differences)
from lime_jax.train.optimizer import lr_multiplier, make_optimizer
from lime_jax.train.step import TrainState, eval_step, init_train_state, train_step
from lime_jax.data.tokenizers import load_tokenizer

CONFIG_FILE = "config.yaml"


class ConfigMismatchError(ValueError):
  """run.out_dir holds a checkpoint of another config (resume_step)."""


class NonFiniteLossError(RuntimeError):
  """Training produced NaN/inf; the message names the step and the last good checkpoint."""


@dataclasses.dataclass
class TrainResult:
  out_dir: str
  step: int  # optimizer steps done
  loss: float | None  # last logged training loss
  val_loss: float | None  # last validation loss
  resumed_from: int | None
  wall_s: float
  val_accuracy: float | None = None  # last task exact-match accuracy (task runs only)


def init_state(model_cfg, tx, seed: int) -> dict[str, Any]:
  """The checkpointed tree: params, opt_state, step (micro-steps) and the RNG for later use."""
  init_rng, rng = jax.random.split(jax.random.key(seed))
  ts = init_train_state(model_cfg, tx, init_rng)
  return {"params": ts.params, "opt_state": ts.opt_state, "step": ts.step,
          "rng": jax.random.key_data(rng)}


def _train_step(state: dict[str, Any], batch, model_cfg, tx):
  ts = TrainState(step=state["step"], params=state["params"], opt_state=state["opt_state"])
  ts, metrics = train_step(ts, batch, model_cfg, tx)
  return dict(state, step=ts.step, params=ts.params, opt_state=ts.opt_state), metrics


@functools.lru_cache(maxsize=8)
def jitted_fns(model_cfg, optim_cfg, seed: int, layout: sharding_lib.Layout | None = None):
  """(init, step, eval) on `layout` (default: one device), jitted once per config in a process
  so that repeated runs (tests, sweeps) reuse the compiled executables. init's state is born
  sharded; the step takes global batches (sharding.place_local_batch), donates the state and
  runs under the mesh and rules; eval takes plain host batches and places them itself."""
  layout = layout or sharding_lib.single_device()
  tx, step, evaluate, shardings = _step_fns(model_cfg, optim_cfg, layout)
  init = jax.jit(functools.partial(init_state, model_cfg, tx, seed), out_shardings=shardings)
  return init, step, evaluate


@functools.lru_cache(maxsize=8)
def _step_fns(model_cfg, optim_cfg, layout: sharding_lib.Layout):
  # Not keyed by seed: runs that differ only in seed (sweeps) share one compiled step.
  tx = make_optimizer(optim_cfg)
  shardings = sharding_lib.state_shardings(
      jax.eval_shape(functools.partial(init_state, model_cfg, tx, 0)), model_cfg, layout)
  batch_sharding = layout.sharding(("batch", "length"))
  step = sharding_lib.OnMesh(jax.jit(
      functools.partial(_train_step, model_cfg=model_cfg, tx=tx),
      in_shardings=(shardings, batch_sharding), out_shardings=(shardings, layout.replicated),
      donate_argnums=0), layout)
  jitted_eval = sharded_eval(model_cfg, layout)

  def evaluate(params, batch):
    # Rows that do not split over the batch shards are filled up at zero weight.
    batch = filled_to_multiple(batch, layout.batch_shards)
    return jitted_eval(params, sharding_lib.place_global_batch(batch, layout))
  return tx, step, evaluate, shardings


def sharded_eval(model_cfg, layout: sharding_lib.Layout) -> sharding_lib.OnMesh:
  """The validation loss of (params, a batch whose rows split over the batch shards), jitted to
  run under the mesh's scope as the step does: its activation constraints keep the rows split.
  Outside the scope the TPU compiler followed the fsdp parameters' split of D and ran every row
  on every device (the 1.2B baseline on v5p:2x2x1: 592 GB accessed and 10.2 GB of temporaries
  a batch, against 146 GB and 3.1 GB in the scope)."""
  return sharding_lib.OnMesh(jax.jit(functools.partial(eval_step, model_cfg=model_cfg),
                                     out_shardings=layout.replicated), layout)


def make_batches(cfg: ExperimentConfig, tokenizer) -> tuple[Any, list[dict[str, Any]]]:
  """(endless resumable training iterator, fixed evaluation batches): the task's when the
  config has one, else the text corpus's."""
  # Each process reads only its own rows of every global batch.
  shard = {"process_index": jax.process_index(), "process_count": jax.process_count()}
  return (sources.train_iterator(cfg.data, cfg.task, tokenizer, **shard),
          sources.eval_batches(cfg.data, cfg.task, tokenizer))


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def abstract_state(init_fn) -> Any:
  """Shapes, dtypes and shardings of the state (a jitted init's out_shardings): what a
  checkpoint restores into, onto whatever mesh `init_fn` was built for."""
  return jax.eval_shape(init_fn)


def checkpoint_dir(cfg: ExperimentConfig) -> str:
  return cfg.run.checkpoint_dir or ckpt.checkpoint_dir(cfg.run.out_dir)


class _Silent:
  """The metrics sink of processes other than 0: one process writes the logs."""

  def write(self, record) -> None:
    del record

  def close(self) -> None:
    pass


def resume_step(cfg: ExperimentConfig, mode: str) -> int | None:
  """The checkpoint step to resume from, None to start fresh; refuses mismatches (ValueError),
  and warns on stderr where only how the model is computed changed (config.COMPUTATION_FIELDS)."""
  ckpt_dir = checkpoint_dir(cfg)
  latest = ckpt.latest_step(ckpt_dir)
  if latest is None:
    if mode == "always":
      raise ValueError(f"run.resume: no checkpoint to resume in {ckpt_dir}")
    return None
  if mode == "never":
    raise ValueError(
        f"run.out_dir: {cfg.run.out_dir} already holds a checkpoint (step {latest}); resume it"
        " (run.resume=auto) or choose another run.out_dir")
  _, saved = ckpt.read_config(ckpt_dir, latest)
  diffs = config_differences(saved, cfg.to_dict())
  if diffs:
    more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
    raise ConfigMismatchError(
        f"run.out_dir: {cfg.run.out_dir} holds a checkpoint (step {latest}) of a different"
        f" config: {'; '.join(diffs[:3])}{more}; use the same config or another run.out_dir")
  computed_otherwise = computation_differences(saved, cfg.to_dict())
  if computed_otherwise and jax.process_index() == 0:
    print(f"warning: {cfg.run.out_dir}: resuming at step {latest} with"
          f" {'; '.join(computed_otherwise)}: the same model computed another way; the steps from"
          " here are not bitwise those of an uninterrupted run", file=sys.stderr)
  return latest


class Trainer:
  """One run. The constructor validates everything and writes nothing; `run` trains."""

  def __init__(self, cfg: ExperimentConfig, *, resume: str | None = None):
    self.cfg = cfg
    run = cfg.run
    self.tokenizer = load_tokenizer(cfg.data.tokenizer)
    check_vocab(cfg, self.tokenizer.vocab_size)
    self.ckpt_dir = checkpoint_dir(cfg)
    self.layout = sharding_lib.Layout.from_config(cfg.mesh)
    sharding_lib.check_batch(cfg.batch_size, self.layout,
                             sources.batch_format(cfg.data, cfg.task).batch_size_field)
    self._batch_sharding = self.layout.batch_sharding(cfg.batch_size)
    self.is_main = jax.process_index() == 0
    if run.wandb_project is not None and self.is_main:
      metrics_lib.import_wandb()  # a missing package stops the run before anything is written
    self._init, self._step_fn, self._eval_fn = jitted_fns(cfg.model, cfg.optim, run.seed,
                                                          self.layout)
    try:
      self.start = resume_step(cfg, resume or run.resume)
    except ckpt.CheckpointError as err:  # the latest step's config is unreadable
      raise self._unreadable(ckpt.latest_step(self.ckpt_dir), err) from None
    self.data_iter, self.val_batches = make_batches(cfg, self.tokenizer)
    self.k = cfg.optim.grad_accum_steps
    self.micro_tokens = cfg.batch_size * cfg.seq_len
    self.flops_per_token = flops_lib.train_flops_per_token(cfg.model, cfg.seq_len)
    self.peak = metrics_lib.peak_flops(run.peak_flops)
    self._lr = lr_multiplier(cfg.optim)

  # --- setup -----------------------------------------------------------------------------------

  def _initial_state(self) -> dict[str, Any]:
    if self.start is None:
      return self._init()
    try:
      restored = ckpt.restore(self.ckpt_dir, abstract_state(self._init), self.start)
    except ckpt.CheckpointError as err:
      raise self._unreadable(self.start, err) from None
    micro = int(restored.state["step"])
    if micro != self.start * self.k:
      raise ckpt.CheckpointError(
          f"checkpoint {self.ckpt_dir}/{self.start}: holds {micro} micro-steps, expected"
          f" {self.start} steps x {self.k}")
    try:
      self.data_iter.set_state(restored.data_state)
    except Exception as err:  # grain raises assorted types on a foreign state
      raise ckpt.CheckpointError(
          f"checkpoint {self.ckpt_dir}/{self.start}: data iterator state {restored.data_state!r}"
          f" does not fit this data config: {err}") from None
    return restored.state

  def _unreadable(self, step: int, err: ckpt.CheckpointError) -> ckpt.CheckpointError:
    """An unreadable newest checkpoint: the error names the newest older one that reads."""
    return ckpt.unreadable(self.ckpt_dir, step, err, abstract_state(self._init))

  # --- the loop --------------------------------------------------------------------------------

  def run(self) -> TrainResult:
    """Trains while holding run.out_dir's lock (process 0; run_lock.py): a second process on
    the same out_dir stops with a RunLockedError before it writes anything."""
    lock = run_lock.acquire(self.cfg.run.out_dir) if self.is_main else None
    try:
      return self._run()
    finally:
      if lock is not None:
        lock.release()

  def _run(self) -> TrainResult:
    cfg, run = self.cfg, self.cfg.run
    t0 = time.perf_counter()
    state = self._initial_state()
    start = self.start or 0
    if self.is_main:
      os.makedirs(run.out_dir, exist_ok=True)
      with open(os.path.join(run.out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
      changed = environment.record(run.out_dir, start)
      if changed:
        print(changed, file=sys.stderr)
    if self.start is not None and run.progress and self.is_main:
      print(f"resuming {run.out_dir} from step {self.start}", file=sys.stderr)

    self.writer = (metrics_lib.MetricsWriter(run.out_dir, resume_step=start,
                                             tensorboard=run.tensorboard,
                                             wandb_project=run.wandb_project,
                                             config=cfg.to_dict())
                   if self.is_main else _Silent())
    self.checkpointer = ckpt.Checkpointer(self.ckpt_dir, keep=run.keep_checkpoints,
                                          async_save=run.async_checkpointing)
    self.bar = metrics_lib.ProgressBar(run.steps, start, run.progress and self.is_main,
                                       desc=os.path.basename(os.path.normpath(run.out_dir)))
    self.throughput = metrics_lib.Throughput()
    self._window = {"loss": 0.0, "grad_norm": 0.0, "n": 0}
    self._last_saved = self.start
    self._last = {"loss": None, "val_loss": None, "val_accuracy": None}
    self._t_train = time.perf_counter()

    step_fn = self._step_fn
    deferred = metrics_lib.DeferredFetch()
    try:
      for micro in range(start * self.k, run.steps * self.k):
        batch = sharding_lib.place_local_batch(next(self.data_iter), self._batch_sharding)
        state, step_metrics = step_fn(state, batch)
        self._consume(deferred.push(micro + 1, step_metrics))  # step micro, while micro+1 runs
        if (micro + 1) % self.k:
          continue
        step = (micro + 1) // self.k
        if self._is_sync(step):
          self._consume(deferred.flush())
          self._sync(step, state)
    finally:
      self.checkpointer.wait()  # an in-flight save completes even when the run stops
      self.checkpointer.close()
      self.writer.close()
      self.bar.close()
    if start >= run.steps:
      self._last.update(_last_logged(run.out_dir))
    return TrainResult(out_dir=run.out_dir, step=max(run.steps, start), loss=self._last["loss"],
                       val_loss=self._last["val_loss"], resumed_from=self.start,
                       wall_s=time.perf_counter() - t0, val_accuracy=self._last["val_accuracy"])

  def _is_sync(self, step: int) -> bool:
    run = self.cfg.run
    return step % run.eval_every == 0 or step % run.checkpoint_every == 0 or step == run.steps

  def _consume(self, item: tuple[int, dict[str, float]] | None) -> None:
    """Host-side work for one finished micro-step: NaN check, averages, plain log steps."""
    if item is None:
      return
    micro, values = item
    step = -(-micro // self.k)  # the optimizer step this micro-batch belongs to
    for key in ("loss", "grad_norm"):
      if not math.isfinite(values[key]):
        self._stop(step, key, values[key])
    self._window["loss"] += values["loss"]
    self._window["grad_norm"] += values["grad_norm"]
    self._window["n"] += 1
    self.throughput.add(self.micro_tokens)
    if micro % self.k == 0 and step % self.cfg.run.log_every == 0 and not self._is_sync(step):
      self._log(step)

  def _sync(self, step: int, state: dict[str, Any]) -> None:
    """Evaluation, logging and checkpointing at a step where the host waits anyway."""
    run = self.cfg.run
    val_loss, extra = None, {}
    if step % run.eval_every == 0 or step == run.steps:
      val_loss, _ = validation_loss(state["params"], self.val_batches, self._eval_fn)
      if self.cfg.task is not None:
        extra = task_metrics(state["params"], self.cfg.model, self.cfg.task, self.layout)
    if step % run.log_every == 0 or val_loss is not None or step == run.steps:
      self._log(step, val_loss, extra)
    if step % run.checkpoint_every == 0 or step == run.steps:
      if not bool(_all_finite(state["params"])):
        self._stop(step, "parameters", float("nan"))
      self.checkpointer.save(step, state, self.data_iter.get_state(), self.cfg.to_dict())
      self._last_saved = step
    self.throughput.restart()  # eval and save time is not training time

  def _log(self, step: int, val_loss: float | None = None,
           extra: dict[str, float] | None = None) -> None:
    n = max(self._window["n"], 1)
    tokens = step * self.micro_tokens * self.k
    tokens_per_s = self.throughput.take()
    flops_per_s = tokens_per_s * self.flops_per_token if tokens_per_s is not None else None
    record = {
        "step": step,
        "loss": self._window["loss"] / n,
        "grad_norm": self._window["grad_norm"] / n,
        "lr": self.cfg.optim.lr * float(self._lr(step - 1)),
        "tokens": tokens,
        "flops": tokens * self.flops_per_token,
        "tokens_per_s": tokens_per_s,
        "mfu": metrics_lib.mfu(flops_per_s, self.peak),
        "elapsed_s": time.perf_counter() - self._t_train,
    }
    if val_loss is not None:
      record["val_loss"] = val_loss
      record["val_ppl"] = math.exp(min(val_loss, 700.0))
      self._last["val_loss"] = val_loss
    if extra:
      record.update(extra)
      self._last["val_accuracy"] = extra.get("val_accuracy")
    self._last["loss"] = record["loss"]
    self._window = {"loss": 0.0, "grad_norm": 0.0, "n": 0}
    self.writer.write(record)
    self.bar.update(step, record)

  def _stop(self, step: int, what: str, value: float) -> None:
    where = (f"the last good checkpoint is step {self._last_saved} in {self.ckpt_dir}"
             if self._last_saved is not None else "no checkpoint was saved")
    label = {"loss": "training loss", "grad_norm": "gradient norm"}.get(what, what)
    raise NonFiniteLossError(
        f"non-finite {label} ({value}) at step {step}; training stopped, {where}")


def _last_logged(out_dir: str) -> dict[str, float | None]:
  records = metrics_lib.read_metrics(out_dir)
  loss = next((r["loss"] for r in reversed(records) if r.get("loss") is not None), None)
  val = next((r["val_loss"] for r in reversed(records) if r.get("val_loss") is not None), None)
  acc = next((r["val_accuracy"] for r in reversed(records)
              if r.get("val_accuracy") is not None), None)
  return {"loss": loss, "val_loss": val, "val_accuracy": acc}


def train(cfg: ExperimentConfig, *, resume: str | None = None) -> TrainResult:
  """Validates (ValueError on bad input, before anything is written), then trains."""
  return Trainer(cfg, resume=resume).run()
