"""The `lime-jax` entry point: every subcommand is wired, and bad input exits 2 with one line."""

import pytest

from lime_jax.cli import build_parser, main


def test_subcommands_are_registered():
  parser = build_parser()
  for argv in (["bench", "--depths", "8"], ["train", "model.D=8"], ["eval", "--checkpoint", "x"],
               ["plot", "a", "--out", "p.png"],
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
