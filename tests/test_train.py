"""The training loop: exact resume across processes, NaN stops, refusals that write nothing,
metrics content, and a short run that learns the embedded corpus."""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, child_env

from lime_jax.train import checkpoint as ckpt
from lime_jax.train import environment
from lime_jax.data import text as data_lib
from lime_jax.model import flops as flops_lib
from lime_jax.train import loop as train_lib
from lime_jax.cli.main import main
from lime_jax.train.experiment import load_experiment
from lime_jax.train.metrics import METRICS_FILE, TENSORBOARD_DIR, read_metrics
from lime_jax.data.tokenizers import load_tokenizer

N = 4  # steps before the restart; the full run is 2N
TINY = ["model.D=32", "model.L=2", "model.H=2", "model.F=64", "model.T=32", "data.seq_len=32",
        "data.batch_size=4", "optim.warmup_steps=2", f"optim.total_steps={2 * N}",
        "optim.grad_accum_steps=2", "run.log_every=1", "run.eval_every=2",
        "run.checkpoint_every=2", "run.keep_checkpoints=5", "run.progress=false"]


def _snapshot(directory):
  """Every file under a directory with its bytes, to prove nothing was written."""
  files = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, directory)] = f.read()
  return files


def _cli_error(capsys, argv):
  with pytest.raises(SystemExit) as exc:
    main(argv)
  assert exc.value.code == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and err.startswith("lime-jax train: "), err
  return err


def _restore(out_dir, overrides=()):
  cfg = load_experiment(None, [*TINY, *overrides])
  init_fn = train_lib.jitted_fns(cfg.model, cfg.optim, cfg.run.seed)[0]
  return ckpt.restore(ckpt.checkpoint_dir(str(out_dir)), train_lib.abstract_state(init_fn))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A: 2N steps straight. B: N steps here, then N more in a fresh process."""
  root = tmp_path_factory.mktemp("runs")
  straight, split = root / "straight", root / "split"
  assert main(["train", *TINY, f"run.steps={2 * N}", f"run.out_dir={straight}"]) == 0
  assert main(["train", *TINY, f"run.steps={N}", f"run.out_dir={split}"]) == 0
  assert ckpt.latest_step(str(split / "checkpoints")) == N
  proc = subprocess.run(
      [sys.executable, "-m", "lime_jax", "train", *TINY, f"run.steps={2 * N}",
       f"run.out_dir={split}"], cwd=REPO, env=child_env(),
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return {"straight": straight, "split": split, "child_stdout": proc.stdout,
          "child_stderr": proc.stderr}


def test_resume_in_a_fresh_process_is_bit_identical(runs):
  assert f"step {2 * N}" in runs["child_stdout"]
  a, b = read_metrics(str(runs["straight"])), read_metrics(str(runs["split"]))
  assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 2 * N + 1))
  for key in ("loss", "grad_norm", "val_loss", "flops", "tokens"):
    assert [r.get(key) for r in a] == [r.get(key) for r in b], key
  state_a, state_b = _restore(runs["straight"]), _restore(runs["split"])
  assert state_a.step == state_b.step == 2 * N
  assert state_a.data_state == state_b.data_state
  for x, y in zip(jax.tree.leaves(state_a.state), jax.tree.leaves(state_b.state)):
    assert np.array_equal(np.asarray(x), np.asarray(y))  # params, opt_state, step, rng
  assert int(state_a.state["step"]) == 2 * N * 2  # micro-steps with accumulation 2
  # Both starts recorded their environment; the same one, so the resume did not warn.
  starts = environment.read(str(runs["split"]))
  assert [r["start_step"] for r in starts] == [0, N]
  assert not environment.changed_fields(starts[0], starts[1])
  assert "different environment" not in runs["child_stderr"]


def test_metrics_records(runs):
  out = runs["straight"]
  records = read_metrics(str(out))
  cfg = load_experiment(None, TINY)
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.optim.grad_accum_steps
  per_token = flops_lib.train_flops_per_token(cfg.model, cfg.data.seq_len)
  for r in records:
    assert {"step", "loss", "tokens_per_s", "mfu", "flops", "tokens", "lr"} <= set(r)
    assert r["tokens"] == r["step"] * tokens_per_step
    assert r["flops"] == r["tokens"] * per_token  # cumulative training FLOPs
    assert r["mfu"] is None  # CPU: no known peak
    assert math.isfinite(r["loss"])
    assert ("val_loss" in r) == (r["step"] % 2 == 0)
    if "val_loss" in r:
      assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
  assert all(r["tokens_per_s"] > 0 for r in records[1:])
  assert records[-1]["loss"] < records[0]["loss"]
  assert os.listdir(out / TENSORBOARD_DIR)
  assert (out / "config.yaml").exists()


def test_finished_run_resumes_to_nothing(runs, tmp_path):
  out = tmp_path / "done"
  shutil.copytree(runs["straight"], out)
  before = read_metrics(str(out))
  result = train_lib.train(load_experiment(None, [*TINY, f"run.steps={2 * N}",
                                                  f"run.out_dir={out}"]))
  assert result.resumed_from == 2 * N and result.step == 2 * N
  assert result.val_loss == before[-1]["val_loss"]
  assert read_metrics(str(out)) == before


def test_a_run_resumes_with_the_model_computed_another_way_and_says_so(runs, tmp_path, capsys):
  """Fields that change only how the same model is computed (a default that moved, a remat
  policy to fit memory) resume, with a warning that the steps are no longer bitwise."""
  out = tmp_path / "other_way"
  shutil.copytree(runs["straight"], out)
  result = train_lib.train(load_experiment(None, [*TINY, "model.attention_query_blocks=2",
                                                  f"run.steps={2 * N + 1}",
                                                  f"run.out_dir={out}"]))
  assert result.resumed_from == 2 * N and result.step == 2 * N + 1
  err = capsys.readouterr().err
  assert "resuming at step 8 with model.attention_query_blocks: None -> 2:" in err
  assert "not bitwise those of an uninterrupted run" in err


def test_mismatched_config_refuses_and_writes_nothing(runs, tmp_path, capsys):
  out = tmp_path / "copy"
  shutil.copytree(runs["straight"], out)
  before = _snapshot(out)
  err = _cli_error(capsys, ["train", *TINY, "model.D=64", f"run.steps={2 * N + 2}",
                            f"run.out_dir={out}"])
  assert "holds a checkpoint (step 8) of a different config: model.D: 32 -> 64" in err
  err = _cli_error(capsys, ["train", *TINY, "run.resume=never", f"run.out_dir={out}"])
  assert "already holds a checkpoint (step 8)" in err
  assert _snapshot(out) == before


def test_corrupt_checkpoint_refuses_and_writes_nothing(runs, tmp_path, capsys):
  out = tmp_path / "copy"
  shutil.copytree(runs["straight"], out)
  for root, _, names in os.walk(out / "checkpoints" / str(2 * N) / "state"):
    for name in names:
      with open(os.path.join(root, name), "r+b") as f:
        f.write(b"\xff" * 64)
  before = _snapshot(out)
  err = _cli_error(capsys, ["train", *TINY, f"run.steps={2 * N + 2}", f"run.out_dir={out}"])
  assert f"checkpoints/{2 * N}: cannot" in err
  assert _snapshot(out) == before
  # The error names the newest step that still reads and how to resume from it; doing so works.
  ckpt_dir = os.path.abspath(out / "checkpoints")
  assert (f"step {2 * N - 2} reads fine: to resume from it, move step {2 * N} aside (e.g. mv"
          f" {ckpt_dir}/{2 * N} {ckpt_dir}/{2 * N}.damaged) and run again") in err
  os.rename(f"{ckpt_dir}/{2 * N}", f"{ckpt_dir}/{2 * N}.damaged")
  result = train_lib.train(load_experiment(None, [*TINY, f"run.steps={2 * N}",
                                                  f"run.out_dir={out}"]))
  assert result.resumed_from == 2 * N - 2 and result.step == 2 * N
  assert [r["step"] for r in read_metrics(str(out))] == list(range(1, 2 * N + 1))


def test_unreadable_newest_config_names_the_older_good_step(runs, tmp_path, capsys):
  out = tmp_path / "copy"
  shutil.copytree(runs["straight"], out)
  (out / "checkpoints" / str(2 * N) / "config" / "metadata").write_text("{not json")
  err = _cli_error(capsys, ["train", *TINY, f"run.steps={2 * N + 2}", f"run.out_dir={out}"])
  assert f"checkpoints/{2 * N}: cannot read its config" in err
  assert f"step {2 * N - 2} reads fine" in err


def test_non_finite_loss_stops_with_exit_2_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
  out = tmp_path / "nan"
  # An absurd learning rate blows the parameters up after the first update.
  bad = [*TINY, "optim.lr=1e30", "optim.warmup_steps=0", "optim.grad_accum_steps=1",
         "run.checkpoint_every=1", "run.eval_every=100", "run.steps=20", f"run.out_dir={out}"]
  err = _cli_error(capsys, ["train", *bad])
  assert ("non-finite training loss" in err or "non-finite gradient norm" in err) and "at step " in err
  bad_step = int(err.split("at step ")[1].split(";")[0])
  last_good = bad_step - 1
  assert f"the last good checkpoint is step {last_good}" in err
  assert ckpt.latest_step(str(out / "checkpoints")) == last_good
  restored = _restore(out, ["optim.lr=1e30", "optim.warmup_steps=0", "optim.grad_accum_steps=1"])
  assert restored.step == last_good
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.state["params"]))
  logged = read_metrics(str(out))
  assert [r["step"] for r in logged] == list(range(1, last_good + 1))


def test_short_run_beats_the_unigram_entropy(tmp_path):
  cfg = load_experiment(None, [
      "model.D=64", "model.L=2", "model.H=4", "model.F=256", "model.T=64", "data.seq_len=64",
      "data.batch_size=16", "data.val_batches=4", "optim.lr=3e-3", "optim.warmup_steps=20",
      "run.steps=150", "run.log_every=50", "run.eval_every=150", "run.checkpoint_every=150",
      "run.progress=false", "run.tensorboard=false", f"run.out_dir={tmp_path / 'q'}"])
  entropy = data_lib.unigram_entropy(cfg.data, load_tokenizer(cfg.data.tokenizer))
  result = train_lib.train(cfg)
  # A unigram model cannot beat `entropy`; context-using models must, by a clear margin.
  assert result.val_loss < entropy - 0.5, (result.val_loss, entropy)
  with open(tmp_path / "q" / METRICS_FILE) as f:
    assert json.loads(f.readlines()[-1])["val_loss"] == result.val_loss
