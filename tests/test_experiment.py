"""Experiment configs: YAML + overrides, derived defaults, and one-line errors via the CLI."""

import glob
import os

import pytest

from lime_jax.cli import default_run
from lime_jax.cli.main import main
from lime_jax.train.experiment import (ExperimentConfig, apply_overrides, check_vocab,
                                 computation_differences, config_differences,
                                 load_experiment, parse_yaml, read_yaml)
from lime_jax.data.tokenizers import BYTE_VOCAB

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
# Every experiment file, setups included; sweeps are read by load_sweep, lm_eval task sets by
# evaluation/harness.read_task_set instead.
EXPERIMENT_FILES = sorted(set(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"),
                                        recursive=True))
                          - set(glob.glob(os.path.join(REPO, "configs", "sweeps", "*.yaml")))
                          - set(glob.glob(os.path.join(REPO, "configs", "lm_eval", "*.yaml"))))
SWEEP_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "sweeps", "*.yaml")))
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
    # Cross-layer baselines by file suffix (router none), the longest suffix first.
    baseline = [("_hc.yaml", "hyper-dynamic"), ("_denseformer.yaml", "denseformer"),
                ("_mhc.yaml", "mhc"), ("_block_attn_res.yaml", "block-attn-res"),
                ("_attn_res.yaml", "attn-res")]
    want = next((v for k, v in baseline if path.endswith(k)), None)
    if want is not None:
      assert (cfg.model.router, cfg.model.connections) == ("none", want), path
      continue
    named = [r for r in ("hidden-static", "hidden-dynamic", "depth-attention", "value-residual")
             if r.replace("-", "_") in path]
    want_router = "none" if path.endswith("_none.yaml") else (named or ["kv-static"])[0]
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
  # Accelerators train the pull form over one segment (README: the TPU compiler's HBM and bytes).
  assert (m.routing_impl, m.scan_segments) == ("pull", 1)


@pytest.mark.parametrize("name", ["deep_L32_lime", "deep_L64_lime", "deep_L128_lime",
                                  "deep_L64_lime_window", "deep_L128_lime_window"])
def test_deep_lime_configs_train_the_accelerator_form(name):
  # The deep setup is an accelerator job too: the pull over one segment, as the 1.2B config
  # (README: on the TPU compiler 1.25x the baseline's bytes against the push's 1.58x).
  cfg = load_experiment(os.path.join(REPO, "configs", f"{name}.yaml"))
  assert (cfg.model.router, cfg.model.routing_impl, cfg.model.scan_segments) == (
      "kv-static", "pull", 1)


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
    (["run.wandb_project=''"], r"run.wandb_project: must be a non-empty name or null"),
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


def test_fields_of_how_the_model_is_computed_may_differ_on_resume():
  """A run started at yesterday's defaults resumes at today's: such fields are listed apart."""
  a = load_experiment(None, TINY + ["model.attention_query_blocks=1", "model.remat_policy=none"])
  b = load_experiment(None, TINY + ["model.attention_query_blocks=null", "model.remat_policy=full",
                                    "model.D=64"])
  assert config_differences(a.to_dict(), b.to_dict()) == ["model.D: 32 -> 64", "model.Hd: 16 -> 32"]
  assert computation_differences(a.to_dict(), b.to_dict()) == [
      "model.attention_query_blocks: 1 -> None", "model.remat_policy: 'none' -> 'full'"]
  assert computation_differences(a.to_dict(), a.to_dict()) == []


def test_a_field_added_after_a_checkpoint_resumes_at_its_default():
  """A checkpoint saved before data.text_documents existed resumes; a non-default value not."""
  current = load_experiment(None, TINY).to_dict()
  saved = {**current, "data": {k: v for k, v in current["data"].items() if k != "text_documents"}}
  assert config_differences(saved, current) == []
  changed = {**current, "data": {**current["data"], "source": "text", "path": "x",
                                 "text_documents": "line"}}
  assert "data.text_documents: 'file' -> 'line'" in config_differences(saved, changed)
  with_task = {**current, "task": {"name": "mqar"}}
  assert "task.name: '<absent>' -> 'mqar'" in config_differences(current, with_task)


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


# --- composition: `base:` files ------------------------------------------------------------------

SETUP = """\
model: {D: 32, L: 2, H: 2, F: 64, T: 32, router: none}
data: {seq_len: 32, batch_size: 4}
optim: {lr: 1e-3}
run: {steps: 7, out_dir: runs/setup}
"""


def test_base_is_merged_under_the_file(tmp_path):
  (tmp_path / "setups").mkdir()
  _write(tmp_path, SETUP, "setups/tiny.yaml")
  path = _write(tmp_path, "base: setups/tiny.yaml\nmodel: {router: kv-static}\n"
                "run: {out_dir: runs/lime}\n", "lime.yaml")
  values = read_yaml(path)
  assert "base" not in values
  assert values["model"] == {"D": 32, "L": 2, "H": 2, "F": 64, "T": 32, "router": "kv-static"}
  assert values["run"] == {"steps": 7, "out_dir": "runs/lime"}
  _write(tmp_path, "x: {a: {b: 1, c: 2}, d: [1, 2]}\n", "nested.yaml")
  nested = _write(tmp_path, "base: nested.yaml\nx: {a: {c: null}, d: [3]}\n", "over.yaml")
  assert read_yaml(nested) == {"x": {"a": {"b": 1, "c": None}, "d": [3]}}  # lists replace
  cfg = load_experiment(path)
  assert (cfg.model.router, cfg.model.D, cfg.optim.lr, cfg.run.out_dir) == (
      "kv-static", 32, 1e-3, "runs/lime")
  # What a run saves is the resolved config: no `base`, and it rebuilds the same config.
  saved = cfg.to_dict()
  assert "base" not in saved and ExperimentConfig.from_dict(saved) == cfg


def test_base_chains_and_lists_apply_in_order(tmp_path):
  _write(tmp_path, SETUP, "a.yaml")
  _write(tmp_path, "base: a.yaml\nmodel: {L: 3}\nrun: {steps: 8}\n", "b.yaml")
  _write(tmp_path, "model: {L: 4, router: kv-static}\n", "c.yaml")
  path = _write(tmp_path, "base: [b.yaml, c.yaml]\nrun: {steps: 9}\n", "d.yaml")
  cfg = load_experiment(path)  # a <- b, then c on top of that, then d
  assert (cfg.model.D, cfg.model.L, cfg.model.router, cfg.run.steps) == (32, 4, "kv-static", 9)
  task = _write(tmp_path, "base: a.yaml\ntask: {name: mqar, seq_len: 32}\n", "task.yaml")
  cleared = _write(tmp_path, "base: task.yaml\ntask: null\n", "no_task.yaml")
  assert load_experiment(task).task is not None and load_experiment(cleared).task is None


def test_overrides_beat_the_file_which_beats_its_base(tmp_path):
  _write(tmp_path, SETUP, "setup.yaml")
  path = _write(tmp_path, "base: setup.yaml\nmodel: {L: 3}\noptim: {lr: 2e-3}\n", "o.yaml")
  cfg = load_experiment(path, ["model.L=5"])
  assert (cfg.model.L, cfg.optim.lr, cfg.model.D) == (5, 2e-3, 32)
  assert load_experiment(path).model.L == 3


def test_base_cycles_are_one_line_errors(tmp_path, capsys):
  _write(tmp_path, "base: b.yaml\nmodel: {L: 3}\n", "a.yaml")
  _write(tmp_path, "base: [c.yaml]\n", "b.yaml")
  path = _write(tmp_path, "base: a.yaml\n", "c.yaml")
  with pytest.raises(ValueError, match=r"config file .*c.yaml: base 'a.yaml' makes a cycle: "
                                       r"\S*a.yaml -> \S*b.yaml -> \S*c.yaml -> \S*a.yaml$"):
    load_experiment(str(tmp_path / "a.yaml"))
  itself = _write(tmp_path, "base: self.yaml\n", "self.yaml")
  with pytest.raises(ValueError, match=r"self.yaml: base 'self.yaml' makes a cycle"):
    load_experiment(itself)
  err = _cli_error(capsys, ["train", "--config", path, f"run.out_dir={tmp_path / 'run'}"])
  assert "makes a cycle" in err
  assert not (tmp_path / "run").exists()


def test_missing_or_bad_base_is_a_one_line_error(tmp_path, capsys):
  path = _write(tmp_path, "base: setups/nope.yaml\nmodel: {L: 3}\n", "o.yaml")
  with pytest.raises(ValueError, match=r"config file .*o.yaml: base 'setups/nope.yaml': no such file"
                                       r" .*setups/nope.yaml"):
    load_experiment(path)
  err = _cli_error(capsys, ["train", "--config", path, f"run.out_dir={tmp_path / 'run'}"])
  assert "o.yaml: base 'setups/nope.yaml': no such file" in err
  assert not (tmp_path / "run").exists()
  for text in ("base: 3\n", "base: []\n", "base: [a.yaml, {x: 1}]\n"):
    bad = _write(tmp_path, text, "bad.yaml")
    with pytest.raises(ValueError, match=r"bad.yaml: base: expected a path or a list of paths"):
      load_experiment(bad)
  _write(tmp_path, "model: [\n", "broken.yaml")
  on_broken = _write(tmp_path, "base: broken.yaml\n", "on_broken.yaml")
  with pytest.raises(ValueError, match=r"config file .*broken.yaml: invalid YAML"):
    load_experiment(on_broken)


def test_every_experiment_and_sweep_file_loads_and_validates():
  """Every file in configs/ resolves, validates and names no missing base; builds nothing."""
  from lime_jax.studies import sweep  # pylint: disable=g-import-not-at-top
  setups = [p for p in EXPERIMENT_FILES if os.sep + "setups" + os.sep in p]
  assert setups and len(EXPERIMENT_FILES) > len(CONFIGS)
  for path in EXPERIMENT_FILES:
    cfg = load_experiment(path)
    assert cfg.optim.total_steps == cfg.run.steps, path
    assert "base" not in read_yaml(path), path
  assert SWEEP_FILES
  for path in SWEEP_FILES:
    cfg = sweep.load_sweep(path)
    assert os.path.isfile(cfg.base), path
    points = sweep.expand(cfg)  # every point's experiment config, validated
    assert points and all(p.cfg.model.router in cfg.grid.routers for p in points), path


def test_sweep_with_a_missing_base_experiment_is_a_one_line_error(tmp_path):
  from lime_jax.studies import sweep  # pylint: disable=g-import-not-at-top
  path = _write(tmp_path, "base: nope.yaml\ngrid: {routers: [none]}\n", "s.yaml")
  with pytest.raises(ValueError, match=r"sweep file .*s.yaml: config file .*nope.yaml: no such file"):
    sweep.load_sweep(path)
