"""`lime-jax eval`: the validation loss of a checkpoint, and one-line errors for bad ones."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from lime_jax.cli.main import main
from lime_jax.cli.eval import evaluate_checkpoint
from lime_jax.train.metrics import read_metrics

TINY = ["model.D=32", "model.L=2", "model.H=2", "model.F=64", "model.T=32", "data.seq_len=32",
        "data.batch_size=4", "data.val_batches=3", "optim.warmup_steps=2", "run.steps=4",
        "run.log_every=2", "run.eval_every=2", "run.checkpoint_every=2",
        "run.progress=false", "run.tensorboard=false"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("eval") / "run"
  assert main(["train", *TINY, f"run.out_dir={out}"]) == 0
  return out


def _cli_error(capsys, argv):
  with pytest.raises(SystemExit) as exc:
    main(argv)
  assert exc.value.code == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and err.startswith("lime-jax eval: "), err
  return err


def test_eval_matches_the_loss_logged_in_training(run_dir, capsys, tmp_path):
  logged = {r["step"]: r["val_loss"] for r in read_metrics(str(run_dir)) if "val_loss" in r}
  out_json = tmp_path / "result.json"
  assert main(["eval", "--checkpoint", str(run_dir), "--json", str(out_json)]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["step"] == 4 and result["val_loss"] == pytest.approx(logged[4], abs=1e-6)
  assert result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]))
  assert result["val_tokens"] == 3 * 4 * 32
  assert json.loads(out_json.read_text()) == result
  earlier = evaluate_checkpoint(str(run_dir / "checkpoints" / "2"))
  assert earlier["step"] == 2 and earlier["val_loss"] == pytest.approx(logged[2], abs=1e-6)
  assert earlier["val_loss"] > result["val_loss"]
  fewer = evaluate_checkpoint(str(run_dir), step=2, overrides=["data.val_batches=1"])
  assert fewer["val_tokens"] == 4 * 32


def test_eval_bad_inputs(run_dir, tmp_path, capsys):
  err = _cli_error(capsys, ["eval", "--checkpoint", str(tmp_path / "nope")])
  assert "no such directory" in err
  empty = tmp_path / "empty"
  empty.mkdir()
  assert "holds no finished checkpoint" in _cli_error(capsys, ["eval", "--checkpoint", str(empty)])
  err = _cli_error(capsys, ["eval", "--checkpoint", str(run_dir), "--step", "3"])
  assert "no step 3; available steps: [2, 4]" in err
  err = _cli_error(capsys, ["eval", "--checkpoint", str(run_dir), "model.D=64"])
  assert "eval accepts only data.* overrides" in err
  err = _cli_error(capsys, ["eval", "--checkpoint", str(run_dir), "data.bogus=1"])
  assert "data: unknown key(s) ['bogus']" in err


def test_eval_corrupt_and_mismatched_checkpoints(run_dir, tmp_path, capsys):
  corrupt = tmp_path / "corrupt"
  shutil.copytree(run_dir, corrupt)
  (corrupt / "checkpoints" / "4" / "config" / "metadata").write_text("{broken")
  err = _cli_error(capsys, ["eval", "--checkpoint", str(corrupt)])
  assert "checkpoints/4: cannot read its config" in err

  # A config whose model no longer matches the stored arrays (e.g. an edited checkpoint).
  mismatched = tmp_path / "mismatched"
  shutil.copytree(run_dir, mismatched)
  config_file = mismatched / "checkpoints" / "4" / "config" / "metadata"
  config = json.loads(config_file.read_text())
  config["model"]["F"] = 128
  config_file.write_text(json.dumps(config))
  err = _cli_error(capsys, ["eval", "--checkpoint", str(mismatched)])
  assert "checkpoints/4: array params/" in err and "the model expects" in err

  damaged = tmp_path / "damaged"
  shutil.copytree(run_dir, damaged)
  for root, _, names in os.walk(damaged / "checkpoints" / "4" / "state"):
    for name in names:
      with open(os.path.join(root, name), "r+b") as f:
        f.write(b"\xff" * 64)
  err = _cli_error(capsys, ["eval", "--checkpoint", str(damaged)])
  assert "checkpoints/4: cannot" in err

  # In a real process too: exit 2 and exactly one line, no asyncio noise from orbax's reads
  # (damaged array data, not metadata, is what leaves tensorstore reads behind).
  data_only = tmp_path / "data_only"
  shutil.copytree(run_dir, data_only)
  for root, _, names in os.walk(data_only / "checkpoints" / "4" / "state"):
    for name in names:
      if os.path.basename(root) == "d":
        with open(os.path.join(root, name), "r+b") as f:
          f.write(b"garbage!" * 64)
  proc = subprocess.run([sys.executable, "-m", "lime_jax", "eval", "--checkpoint", str(data_only)],
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("lime-jax eval: "), proc.stderr
