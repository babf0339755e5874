"""Experiment configs: YAML + overrides, derived defaults, and one-line errors via the CLI."""

import glob
import os

import pytest

from lime_jax.cli import default_run
from lime_jax.cli.main import main
from lime_jax.train.experiment import (ExperimentConfig, apply_overrides, check_vocab,
                                 config_differences, load_experiment, parse_yaml)
from lime_jax.data.tokenizers import BYTE_VOCAB

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
TINY = ["model.D=32", "model.L=2", "model.H=2", "model.F=64", "model.T=32", "data.seq_len=32",
        "data.batch_size=4", "run.steps=2", "run.progress=false"]


def _write(tmp_path, text, name="c.yaml"):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def _cli_error(capsys, argv):
  with pytest.raises(SystemExit) as exc:
    main(argv)
  assert exc.value.code == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err, err
  assert err.startswith(f"lime-jax {argv[0]}: "), err
  return err


def test_every_config_file_validates():
  names = {os.path.basename(p) for p in CONFIGS}
  expected = {"paper_1p2b_none.yaml", "paper_1p2b_lime.yaml", "cpu_small_none.yaml",
              "cpu_small_lime.yaml"}
  expected |= {f"deep_L{L}_{r}.yaml" for L in (32, 64, 128) for r in ("none", "lime")}
  assert expected <= names
  for path in CONFIGS:
    cfg = load_experiment(path)
    assert cfg.model.T >= cfg.data.seq_len
    assert cfg.optim.total_steps == cfg.run.steps
    baseline = {"_hc.yaml": "hyper-dynamic", "_denseformer.yaml": "denseformer"}
    if any(path.endswith(k) for k in baseline):  # cross-layer baselines: router none
      want = next(v for k, v in baseline.items() if path.endswith(k))
      assert (cfg.model.router, cfg.model.connections) == ("none", want), path
      continue
    hidden = [r for r in ("hidden-static", "hidden-dynamic") if r.replace("-", "_") in path]
    want_router = "none" if path.endswith("_none.yaml") else (hidden or ["kv-static"])[0]
    assert cfg.model.router == want_router, path


def test_paper_config_matches_the_spec():
  cfg = load_experiment(os.path.join(REPO, "configs", "paper_1p2b_lime.yaml"))
  m, o = cfg.model, cfg.optim
  assert (m.L, m.D, m.F, m.H, m.Hd, m.V, m.T) == (16, 2048, 8192, 32, 64, 50257, 2048)
  assert m.tie_embeddings and m.compute_dtype == "bfloat16" and m.param_dtype == "float32"
  assert cfg.data.batch_size * o.grad_accum_steps == 1024 and cfg.data.seq_len == 2048
  assert (o.lr, o.router_lr, o.b1, o.b2, o.eps, o.weight_decay, o.grad_clip) == (
      1e-3, 1e-2, 0.9, 0.95, 1e-8, 0.1, 1.0)
  assert (o.warmup_steps, cfg.run.steps, cfg.data.source) == (200, 20_000, "fineweb")


def test_cpu_small_configs_are_the_embedded_default():
  for name, router in default_run.RUNS:
    suffix = "lime" if router == "kv-static" else "none"
    from_yaml = load_experiment(os.path.join(REPO, "configs", f"cpu_small_{suffix}.yaml"))
    embedded = default_run.run_config(name, router, "runs/default")
    assert from_yaml.model == embedded.model
    assert from_yaml.data == embedded.data
    assert from_yaml.optim == embedded.optim
    assert from_yaml.run.steps == embedded.run.steps


def test_overrides_are_yaml_values():
  cfg = load_experiment(None, TINY + ["optim.lr=1e-2", "run.peak_flops=2e12",
                                      "model.tie_embeddings=false", "data.max_documents=null"])
  assert cfg.optim.lr == 0.01 and isinstance(cfg.optim.lr, float)
  assert cfg.run.peak_flops == 2e12
  assert cfg.model.tie_embeddings is False and cfg.data.max_documents is None
  assert parse_yaml("1e-3", "x") == 1e-3 and parse_yaml("abc", "x") == "abc"
  base = {"model": {"D": 8}}
  out = apply_overrides(base, ["model.L=3"])
  assert out == {"model": {"D": 8, "L": 3}} and base == {"model": {"D": 8}}


def test_yaml_file_and_overrides_combine(tmp_path):
  path = _write(tmp_path, "model:\n  D: 32\n  L: 2\n  H: 2\n  F: 64\n  T: 64\n"
                "data:\n  seq_len: 64\noptim:\n  lr: 1e-3\nrun:\n  steps: 7\n")
  cfg = load_experiment(path, ["model.L=3"])
  assert (cfg.model.D, cfg.model.L, cfg.optim.lr, cfg.run.steps) == (32, 3, 1e-3, 7)
  again = ExperimentConfig.from_dict(cfg.to_dict())
  assert again == cfg


def test_vocab_defaults_to_the_tokenizer_and_explicit_vocab_is_checked():
  cfg = load_experiment(None, TINY)
  assert cfg.model.V == BYTE_VOCAB
  padded = load_experiment(None, TINY + ["model.V=512"])
  check_vocab(padded, BYTE_VOCAB)
  small = load_experiment(None, TINY + ["model.V=256"])
  with pytest.raises(ValueError, match=r"model.V: 256 is smaller than the tokenizer's vocab_size 258"):
    check_vocab(small, BYTE_VOCAB)


def test_total_steps_follows_run_steps_unless_given():
  assert load_experiment(None, TINY + ["run.steps=9"]).optim.total_steps == 9
  assert load_experiment(None, TINY + ["run.steps=9", "optim.total_steps=20"]).optim.total_steps == 20


@pytest.mark.parametrize("overrides, message", [
    (["model.T=16"], r"model.T: 16 must be >= data.seq_len 32"),
    (["model.Dx=3"], r"model: unknown key\(s\) \['Dx'\]"),
    (["model.D=wide"], r"model.D: expected int, got str 'wide'"),
    (["optim.lr=fast"], r"optim.lr: expected float"),
    (["run.resume=sometimes"], r"run.resume: must be one of"),
    (["run.steps=0"], r"run.steps: must be a positive integer"),
    (["train.steps=3"], r"unknown section 'train'"),
    (["steps=3"], r"expected section.key=value"),
    (["data.source=ftp"], r"data.source: unknown source 'ftp'"),
])
def test_bad_values_name_the_key(overrides, message):
  with pytest.raises(ValueError, match=message):
    load_experiment(None, TINY + overrides)


def test_file_errors_name_the_file(tmp_path):
  with pytest.raises(ValueError, match=r"config file .*nope.yaml: no such file"):
    load_experiment(str(tmp_path / "nope.yaml"))
  bad_section = _write(tmp_path, "modle:\n  D: 3\n", "s.yaml")
  with pytest.raises(ValueError, match=r"s.yaml: unknown section\(s\) \['modle'\]"):
    load_experiment(bad_section)
  bad_yaml = _write(tmp_path, "model: [\n", "y.yaml")
  with pytest.raises(ValueError, match=r"y.yaml: invalid YAML"):
    load_experiment(bad_yaml)
  not_mapping = _write(tmp_path, "- 1\n- 2\n", "l.yaml")
  with pytest.raises(ValueError, match=r"l.yaml: expected a mapping"):
    load_experiment(not_mapping)


def test_config_differences_ignore_bookkeeping():
  a = load_experiment(None, TINY + ["run.out_dir=a", "run.steps=5", "optim.total_steps=10"])
  b = load_experiment(None, TINY + ["run.out_dir=b", "run.steps=10", "optim.total_steps=10",
                                    "run.log_every=1"])
  assert config_differences(a.to_dict(), b.to_dict()) == []
  c = load_experiment(None, TINY + ["model.D=64", "run.seed=3"])
  diffs = config_differences(a.to_dict(), c.to_dict())
  assert "model.D: 32 -> 64" in diffs and "run.seed: 0 -> 3" in diffs


# --- the CLI: one line on stderr, exit code 2, nothing written ----------------------------------


def test_cli_missing_config_file(tmp_path, capsys):
  err = _cli_error(capsys, ["train", "--config", str(tmp_path / "missing.yaml")])
  assert "missing.yaml: no such file" in err


def test_cli_unknown_key_and_wrong_type(tmp_path, capsys):
  out = tmp_path / "run"
  path = _write(tmp_path, "model:\n  D: 32\n  widht: 3\n")
  err = _cli_error(capsys, ["train", "--config", path, f"run.out_dir={out}"])
  assert "model: unknown key(s) ['widht']" in err and "c.yaml" in err
  err = _cli_error(capsys, ["train", *TINY, "run.steps=many", f"run.out_dir={out}"])
  assert "run.steps: expected int, got str 'many'" in err
  assert not out.exists()


def test_cli_empty_corpus(tmp_path, capsys):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  out = tmp_path / "run"
  err = _cli_error(capsys, ["train", *TINY, "data.source=text", f"data.path={empty}",
                            "data.val_fraction=0", f"run.out_dir={out}"])
  assert "training tokens" in err and str(empty) in err
  err = _cli_error(capsys, ["train", *TINY, "data.source=text", f"data.path={tmp_path / 'no.txt'}",
                            f"run.out_dir={out}"])
  assert "no such file or directory" in err
  assert not out.exists()


def test_cli_vocab_too_small(tmp_path, capsys):
  out = tmp_path / "run"
  err = _cli_error(capsys, ["train", *TINY, "model.V=100", f"run.out_dir={out}"])
  assert "model.V: 100 is smaller" in err
  assert not out.exists()


def test_cli_resume_without_checkpoint(tmp_path, capsys):
  out = tmp_path / "run"
  err = _cli_error(capsys, ["train", "--resume", *TINY, f"run.out_dir={out}"])
  assert "no checkpoint to resume" in err
  assert not out.exists()
