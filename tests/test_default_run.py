"""The embedded default job, shrunk to a few steps: both runs, the summary and the plot."""

import pytest

from lime_jax.cli import default_run
from lime_jax.model import flops
from lime_jax.cli.main import main
from lime_jax.train.metrics import read_metrics

SHRINK = ["model.D=32", "model.L=2", "model.H=2", "model.F=64", "run.steps=4", "run.eval_every=2",
          "run.checkpoint_every=4", "run.progress=false", "run.tensorboard=false", "run.peak_flops=1e11"]


def test_default_job_trains_both_and_plots(tmp_path, capsys):
  assert default_run.main(["--out-dir", str(tmp_path), *SHRINK]) == 0
  out = capsys.readouterr().out
  for name in ("lime", "baseline"):
    records = read_metrics(str(tmp_path / name))
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    assert f"{name:8s} final validation loss {records[-1]['val_loss']:.4f}" in out
    # MFU against the configured peak, with FLOPs from lime_jax.model.flops.
    cfg = default_run.run_config(name, dict(default_run.RUNS)[name], str(tmp_path), SHRINK)
    per_token = flops.train_flops_per_token(cfg.model, cfg.data.seq_len)
    timed = [r for r in records if r["tokens_per_s"] is not None]
    assert timed
    for r in timed:
      assert r["mfu"] == pytest.approx(r["tokens_per_s"] * per_token / 1e11)
  png = tmp_path / "val_loss_vs_flops.png"
  assert png.read_bytes().startswith(b"\x89PNG") and f"wrote {png}" in out


def test_default_job_bad_override_is_one_line(tmp_path, capsys):
  assert default_run.main(["--out-dir", str(tmp_path / "x"), "model.D=wide"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("lime-jax train: ") and "model.D" in err and "\n" not in err
  assert not (tmp_path / "x").exists()


def test_train_default_flag_takes_no_config(capsys):
  with pytest.raises(SystemExit) as exc:
    main(["train", "--default", "model.D=32"])
  assert exc.value.code == 2
  assert "--default takes no --config" in capsys.readouterr().err
