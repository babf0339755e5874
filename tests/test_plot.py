"""The validation-loss-vs-FLOPs plot, from metrics.jsonl files."""

import json

import pytest

from lime_jax.cli.main import main
from lime_jax.studies.plots import plot_val_loss_vs_flops, val_curve

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(directory, losses, flops_per_step):
  directory.mkdir(parents=True)
  with open(directory / "metrics.jsonl", "w") as f:
    for i, loss in enumerate(losses, start=1):
      f.write(json.dumps({"step": i, "loss": loss + 0.1, "flops": i * flops_per_step}) + "\n")
      if i % 2 == 0:
        f.write(json.dumps({"step": i + 0.5, "loss": loss, "flops": i * flops_per_step,
                            "val_loss": loss}) + "\n")
  return str(directory)


def test_val_curve_takes_only_eval_records(tmp_path):
  run = _run(tmp_path / "a", [3.0, 2.5, 2.2, 2.0], 10.0)
  assert val_curve(run) == ([20.0, 40.0], [2.5, 2.0])


def test_plot_writes_a_png(tmp_path):
  a = _run(tmp_path / "lime", [3.0, 2.5, 2.2, 2.0], 1e9)
  b = _run(tmp_path / "baseline", [3.0, 2.6, 2.3, 2.1], 0.98e9)
  out = tmp_path / "plots" / "val.png"
  assert plot_val_loss_vs_flops([a, b], str(out)) == str(out)
  data = out.read_bytes()
  assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_plot_errors(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match=r"empty: metrics.jsonl has no val_loss records"):
    plot_val_loss_vs_flops([str(empty)], str(tmp_path / "x.png"))
  with pytest.raises(ValueError, match=r"no such directory"):
    plot_val_loss_vs_flops([str(tmp_path / "nope")], str(tmp_path / "x.png"))
  run = _run(tmp_path / "a", [3.0, 2.0], 1.0)
  with pytest.raises(ValueError, match=r"2 labels for 1 runs"):
    plot_val_loss_vs_flops([run], str(tmp_path / "x.png"), labels=["a", "b"])
  assert not (tmp_path / "x.png").exists()


def test_plot_cli(tmp_path, capsys):
  a = _run(tmp_path / "a", [3.0, 2.0], 1.0)
  out = tmp_path / "cli.png"
  assert main(["plot", a, "--out", str(out), "--labels", "lime"]) == 0
  assert out.read_bytes().startswith(PNG_MAGIC)
  assert f"wrote {out}" in capsys.readouterr().out
  with pytest.raises(SystemExit) as exc:
    main(["plot", str(tmp_path / "missing"), "--out", str(tmp_path / "y.png")])
  assert exc.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("lime-jax plot: plot: run directory") and "\n" not in err
  assert not (tmp_path / "y.png").exists()
