"""Checkpoints: exact round trips, retention, one-line errors, and a real kill mid-save."""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, child_env

from lime_jax.train import checkpoint as ckpt
from lime_jax.train import loop as train_lib
from lime_jax.cli.main import main
from lime_jax.train.experiment import load_experiment
from lime_jax.train.metrics import read_metrics
from lime_jax.train.optimizer import OptimConfig, make_optimizer


def _state(seed=0, width=3):
  rng = np.random.default_rng(seed)
  params = {"embed": jnp.asarray(rng.normal(size=(5, width)), jnp.float32),
            "layers": {"router": jnp.asarray(rng.normal(size=(2, 2, 2)), jnp.float32),
                       "scale": jnp.ones((2, width), jnp.float32)}}
  tx = make_optimizer(OptimConfig(grad_accum_steps=2))  # MultiSteps + multi_transform state
  return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(7),
          "rng": jax.random.key_data(jax.random.key(seed))}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact_and_keeps_last_k(tmp_path):
  saver = ckpt.Checkpointer(str(tmp_path), keep=2)
  states = {s: _state(seed=s) for s in (1, 2, 3)}
  for s, state in states.items():
    saver.save(s, state, {"next_index": 10 * s}, {"model": {"D": 3}, "step": s})
  saver.wait()
  saver.close()
  assert ckpt.all_steps(str(tmp_path)) == [2, 3]
  restored = ckpt.restore(str(tmp_path), _abstract(states[3]))
  assert restored.step == 3
  assert restored.data_state == {"next_index": 30}
  assert restored.config == {"model": {"D": 3}, "step": 3}
  _assert_trees_equal(restored.state, states[3])
  older = ckpt.restore(str(tmp_path), _abstract(states[2]), step=2)
  _assert_trees_equal(older.state, states[2])
  assert ckpt.read_config(str(tmp_path)) == (3, {"model": {"D": 3}, "step": 3})


def test_relative_directories(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  state = _state()
  saver = ckpt.Checkpointer(os.path.join("run", "checkpoints"), keep=1)
  saver.save(2, state, {}, {"model": {}})
  saver.wait()
  saver.close()
  assert ckpt.latest_step(os.path.join("run", "checkpoints")) == 2
  assert ckpt.read_config(os.path.join("run", "checkpoints")) == (2, {"model": {}})
  directory, step = ckpt.resolve_dir("run")
  _assert_trees_equal(ckpt.restore(directory, _abstract(state)).state, state)


def test_async_save_survives_donation_of_the_saved_arrays(tmp_path):
  state = _state()
  expected = jax.tree.map(np.array, state)
  saver = ckpt.Checkpointer(str(tmp_path), keep=1, async_save=True)
  saver.save(1, state, {}, {})
  bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
  state = bump(state)  # the saved buffers are donated while the write may still be running
  jax.block_until_ready(state)
  saver.wait()
  saver.close()
  _assert_trees_equal(ckpt.restore(str(tmp_path), _abstract(expected)).state, expected)


def test_mismatched_model_is_a_one_line_error(tmp_path):
  saver = ckpt.Checkpointer(str(tmp_path), keep=1)
  saver.save(4, _state(width=3), {}, {})
  saver.wait()
  saver.close()
  with pytest.raises(ckpt.CheckpointError) as exc:
    ckpt.restore(str(tmp_path), _abstract(_state(width=4)))
  msg = str(exc.value)
  assert "params/embed has shape (5, 3), the model expects (5, 4)" in msg and "\n" not in msg
  wider = _state()
  wider["params"]["extra"] = jnp.zeros(2)
  with pytest.raises(ckpt.CheckpointError, match=r"has no array params/extra"):
    ckpt.restore(str(tmp_path), _abstract(wider))
  with pytest.raises(ckpt.CheckpointError, match=r"no step 5; available steps: \[4\]"):
    ckpt.restore(str(tmp_path), _abstract(_state()), step=5)


# A failed orbax read leaves its pending asyncio reads to die with the event loop: noise, not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_checkpoint_is_a_one_line_error(tmp_path):
  saver = ckpt.Checkpointer(str(tmp_path), keep=1)
  saver.save(1, _state(), {"next_index": 1}, {"model": {}})
  saver.wait()
  saver.close()
  state_dir = tmp_path / "1" / "state"
  data_files = [os.path.join(root, f) for root, _, files in os.walk(state_dir) for f in files
                if "/d/" in os.path.join(root, f)]
  assert data_files, "expected orbax array data files"
  for f in data_files:
    with open(f, "r+b") as fh:
      size = os.path.getsize(f)
      fh.write(b"\x00garbage" * (size // 8 + 1))
  with pytest.raises(ckpt.CheckpointError) as exc:
    ckpt.restore(str(tmp_path), _abstract(_state()))
  msg = str(exc.value)
  assert msg.startswith(f"checkpoint {tmp_path}/1: cannot") and "\n" not in msg, msg
  (tmp_path / "1" / "config" / "metadata").write_text("{not json")
  with pytest.raises(ckpt.CheckpointError, match=r"cannot read its config"):
    ckpt.read_config(str(tmp_path))


def test_unfinished_save_is_invisible_and_directories_resolve(tmp_path):
  saver = ckpt.Checkpointer(str(tmp_path / "checkpoints"), keep=2)
  saver.save(3, _state(), {}, {})
  saver.wait()
  saver.close()
  (tmp_path / "checkpoints" / "5.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)
  assert ckpt.latest_step(str(tmp_path / "checkpoints")) == 3
  assert ckpt.latest_step(str(tmp_path / "absent")) is None
  assert ckpt.resolve_dir(str(tmp_path)) == (str(tmp_path / "checkpoints"), None)
  assert ckpt.resolve_dir(str(tmp_path / "checkpoints" / "3")) == (str(tmp_path / "checkpoints"), 3)
  with pytest.raises(ckpt.CheckpointError, match="no such directory"):
    ckpt.resolve_dir(str(tmp_path / "absent"))
  with pytest.raises(ckpt.CheckpointError, match="holds no finished checkpoint"):
    ckpt.restore(str(tmp_path), _abstract(_state()))


# --- a real process, killed while it writes a checkpoint ---------------------------------------

# Runs `lime-jax train` with one change: when orbax's real async save of checkpoint HOOK_STEP
# reaches its config item (the arrays and the iterator state are being written into the step's
# temporary directory, nothing is committed), the child announces it in HOOK_MARKER and stalls
# there, so that the SIGKILL lands mid-save every time instead of by luck.
_HOOKED_TRAIN = r"""
import os, sys, time
from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch
original = jch.JsonCheckpointHandler._save_fn
prefix = os.environ["HOOK_STEP"] + "."
async def stalled(self, x, directory):
  if isinstance(x, dict) and "model" in x and directory.parent.name.startswith(prefix):
    with open(os.environ["HOOK_MARKER"], "w") as f:
      f.write(str(directory.parent))
    time.sleep(600)
  return await original(self, x, directory)
jch.JsonCheckpointHandler._save_fn = stalled
from lime_jax.cli.main import main
sys.exit(main(sys.argv[1:]))
"""

TINY = ["model.D=32", "model.L=2", "model.H=2", "model.F=64", "model.T=32", "data.seq_len=32",
        "data.batch_size=4", "optim.warmup_steps=2", "optim.total_steps=6", "run.log_every=1",
        "run.eval_every=2", "run.checkpoint_every=2", "run.keep_checkpoints=3",
        "run.progress=false", "run.tensorboard=false"]


def test_kill_during_save_leaves_previous_checkpoint_restorable(tmp_path, capsys):
  out = tmp_path / "run"
  marker = tmp_path / "saving"
  env = dict(child_env(), HOOK_STEP="4", HOOK_MARKER=str(marker))
  proc = subprocess.Popen(
      [sys.executable, "-c", _HOOKED_TRAIN, "train", *TINY, "run.steps=1000",
       f"run.out_dir={out}"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 300
    while not marker.exists():  # the child creates it from inside the save of step 4
      assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
      assert time.monotonic() < deadline, "the child never reached the save of step 4"
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == -signal.SIGKILL

  ckpt_dir = out / "checkpoints"
  leftovers = [n for n in os.listdir(ckpt_dir) if n.startswith("4.")]
  assert leftovers and "tmp" in leftovers[0], os.listdir(ckpt_dir)  # killed mid-save
  assert not (ckpt_dir / "4").exists()
  assert ckpt.latest_step(str(ckpt_dir)) == 2

  # The previous checkpoint restores, and training resumes from it.
  assert main(["eval", "--checkpoint", str(out)]) == 0
  assert '"step": 2' in capsys.readouterr().out
  cfg = load_experiment(None, [*TINY, "run.steps=6", f"run.out_dir={out}"])
  result = train_lib.train(cfg)
  assert result.resumed_from == 2 and result.step == 6
  assert sorted(os.listdir(ckpt_dir)) == ["2", "4", "6"]  # the half-written 4 was cleaned up
  steps = [r["step"] for r in read_metrics(str(out))]
  assert steps == list(range(1, 7))  # records the killed run wrote after step 2 were dropped

  # And it equals a run that was never interrupted.
  straight = train_lib.train(load_experiment(None, [*TINY, "run.steps=6",
                                                    f"run.out_dir={tmp_path / 'straight'}"]))
  assert straight.val_loss == result.val_loss and straight.loss == result.loss
  init_fn = train_lib.jitted_fns(cfg.model, cfg.optim, cfg.run.seed)[0]
  abstract = train_lib.abstract_state(init_fn)
  _assert_trees_equal(ckpt.restore(str(ckpt_dir), abstract).state,
                      ckpt.restore(str(tmp_path / "straight" / "checkpoints"), abstract).state)
