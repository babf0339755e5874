"""The `lime-jax` entry point: every subcommand is wired, and bad input exits 2 with one line."""

import pytest

from lime_jax.cli.main import build_parser, main, parse


def test_subcommands_are_registered():
  parser = build_parser()
  for argv in (["bench", "--depths", "8"], ["train", "model.D=8"], ["eval", "--checkpoint", "x"],
               ["plot", "a", "--out", "p.png"],
               ["export", "--checkpoint", "x", "--out", "y"], ["import", "--hf-dir", "x"],
               ["generate", "--checkpoint", "x", "--prompt", "hi"],
               ["analyze", "--checkpoint", "x", "--out", "y"],
               ["sweep", "--config", "s.yaml"], ["plan", "--devices", "2"],
               ["lm-eval", "--checkpoint", "x", "--tasks", "arc_easy,wic", "--num-fewshot", "3"],
               ["tokenizer", "train", "--files", "a.txt", "--vocab-size", "300", "--out", "t.json"]):
    assert callable(parser.parse_args(argv).func), argv


def test_tokenizer_train(tmp_path, capsys):
  text = tmp_path / "corpus.txt"
  text.write_text("the cat sat on the mat. " * 200)
  out = tmp_path / "tok" / "tokenizer.json"
  assert main(["tokenizer", "train", "--files", str(text), "--vocab-size", "300",
               "--out", str(out)]) == 0
  assert out.exists() and "vocab_size=" in capsys.readouterr().out
  with pytest.raises(SystemExit) as exc:
    main(["tokenizer", "train", "--files", str(tmp_path / "none.txt"), "--vocab-size", "300",
          "--out", str(tmp_path / "t2.json")])
  assert exc.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("lime-jax tokenizer: ") and "no such file" in err and "\n" not in err
  assert not (tmp_path / "t2.json").exists()


def test_export_and_import_a_trained_checkpoint(tmp_path, capsys):
  """train -> `lime-jax export` -> import gives the checkpoint's logits back exactly."""
  import jax
  import numpy as np
  from lime_jax.cli.export import load_model_params
  from lime_jax.interop import hf as export
  from lime_jax.model import transformer as model
  from lime_jax.train.experiment import load_experiment
  from lime_jax.train.loop import train
  run_dir, out = tmp_path / "run", tmp_path / "hf"
  cfg = load_experiment(None, [
      "model.D=32", "model.L=3", "model.H=2", "model.F=64", "model.T=16", "data.seq_len=16",
      "data.batch_size=2", "run.steps=2", "run.eval_every=2", "run.checkpoint_every=2",
      "run.progress=false", f"run.out_dir={run_dir}"])
  train(cfg)
  assert main(["export", "--checkpoint", str(run_dir), "--out", str(out)]) == 0
  assert main(["import", "--hf-dir", str(out)]) == 0
  assert '"router": "kv-static"' in capsys.readouterr().out
  assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "abc",
               "--max-new-tokens", "4", "--temperature", "0"]) == 0
  assert "tokens/s" in capsys.readouterr().out
  saved, saved_cfg = load_model_params(str(run_dir))
  imported, imported_cfg = export.import_params(str(out))
  tokens = np.arange(16, dtype=np.int32).reshape(1, 16) % 200
  logits = lambda p, c: np.asarray(model.Transformer(c).apply({"params": p}, tokens))
  np.testing.assert_array_equal(logits(imported, imported_cfg), logits(saved, saved_cfg))
  assert not np.allclose(logits(saved, saved_cfg),
                         logits(model.init_params(saved_cfg, jax.random.key(1)), saved_cfg))


def test_import_out_writes_a_training_checkpoint(tmp_path, capsys):
  """export -> `import --out` gives step 0 of a run: eval reads it (the source checkpoint's
  loss exactly), and train with the config.yaml it wrote resumes from it."""
  import json
  run_dir, hf_dir, out = tmp_path / "run", tmp_path / "hf", tmp_path / "imported"
  model = ["model.D=32", "model.L=2", "model.H=2", "model.F=64", "model.T=16"]
  run = ["data.seq_len=16", "data.batch_size=2", "run.steps=2", "run.eval_every=2",
         "run.checkpoint_every=2", "run.progress=false"]
  assert main(["train", *model, *run, f"run.out_dir={run_dir}"]) == 0
  assert main(["export", "--checkpoint", str(run_dir), "--out", str(hf_dir)]) == 0
  assert main(["import", "--hf-dir", str(hf_dir), "--out", str(out), *run]) == 0
  assert json.loads(capsys.readouterr().out.splitlines()[-1])["out"] == str(out)
  assert main(["eval", "--checkpoint", str(run_dir)]) == 0
  source = json.loads(capsys.readouterr().out)
  assert main(["eval", "--checkpoint", str(out)]) == 0
  imported = json.loads(capsys.readouterr().out)
  assert imported["step"] == 0 and imported["val_loss"] == source["val_loss"]
  assert main(["train", "--config", str(out / "config.yaml"), "--resume"]) == 0
  assert capsys.readouterr().out.startswith(f"{out}: step 2")
  for argv, message in (
      (["import", "--hf-dir", str(hf_dir), "--out", str(out), *run], "already holds a checkpoint"),
      (["import", "--hf-dir", str(hf_dir), "--out", str(tmp_path / "x"), "model.F=128", *run],
       "describes F=64, the given config has F=128"),
      (["import", "--hf-dir", str(hf_dir), "data.seq_len=16"], "give --out too")):
    with pytest.raises(SystemExit) as exc:
      main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lime-jax import: ") and message in err and "\n" not in err, err
  assert not (tmp_path / "x").exists()


def test_overrides_are_taken_on_either_side_of_an_option():
  args = parse(["plan", "--config", "c.yaml", "model.L=4", "--cost", "scaled", "mesh.fsdp=-1",
                "--json", "p.json", "model.L=8"])
  assert args.overrides == ["model.L=4", "mesh.fsdp=-1", "model.L=8"]  # in order: last wins
  assert (args.cost, args.json) == ("scaled", "p.json")


@pytest.mark.parametrize("argv", [["plan", "model.L=4", "--cost", "scaled", "typo"],
                                  ["plan", "--bogus"],
                                  ["tokenizer", "train", "--embedded", "--vocab-size", "300",
                                   "--out", "t.json", "model.L=4"]])
def test_other_stray_arguments_are_still_refused(argv, capsys):
  with pytest.raises(SystemExit) as exit_:
    parse(argv)
  assert exit_.value.code == 2
  assert "unrecognized arguments" in capsys.readouterr().err
