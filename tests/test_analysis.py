import argparse
import json
import math
import os

import chex
import jax
import numpy as np
import pytest

from lime_jax.cli import analyze as analyze_cmd
from lime_jax.studies import analysis as A
from lime_jax.model import transformer as M
from lime_jax.config import ModelConfig
from lime_jax.data.tokenizers import ByteTokenizer

TINY = ModelConfig(V=258, D=32, L=3, H=4, R=2, F=64, T=64)


def _text(n_sentences=120, seed=0):
  """Short sentences with the probed words; subjects fix the verb, so the words are learnable."""
  rng = np.random.default_rng(seed)
  subjects = {"is": "the cat", "are": "the dogs", "was": "a bird", "were": "some fish"}
  words = list(subjects)
  return " ".join(f"{subjects[w]} {w} here, héllo!" for w in rng.choice(words, n_sentences))


# ---------------------------------------------------------------------------------------------
# Math.


def test_entropy_rank_one_is_zero():
  a_C = np.array([1.0, -2.0, 0.5, 3.0])
  values_NxTxC = np.stack([np.tile(a_C, (6, 1)), np.tile(-a_C, (6, 1))])  # each sequence rank 1
  mean, std = A.value_entropy(values_NxTxC)
  assert abs(mean) < 1e-9 and abs(std) < 1e-9


def test_entropy_orthogonal_rows_is_log_t():
  T = 5
  eye_TxT = np.eye(T)
  mean, std = A.value_entropy(np.stack([eye_TxT, -eye_TxT]))  # standardizing keeps orthogonality
  assert mean == pytest.approx(math.log(T), abs=1e-9) and std == pytest.approx(0.0, abs=1e-9)
  # Orthogonal equal-norm rows give the maximum over all [T, C] matrices.
  rand = np.random.default_rng(0).normal(size=(20, T, 8))
  assert all(A.renyi_entropy(z) <= math.log(T) + 1e-9 for z in rand)


def test_entropy_grows_with_rank():
  rng = np.random.default_rng(1)
  T, C = 16, 16
  entropies = []
  for k in (1, 2, 4, 8, 16):
    z_TxC = rng.normal(size=(T, k)) @ rng.normal(size=(k, C))
    entropies.append(A.renyi_entropy(z_TxC))
  assert entropies[0] == pytest.approx(0.0, abs=1e-9)
  assert all(b > a for a, b in zip(entropies, entropies[1:]))
  # Equal eigenvalues: Renyi entropy of any order is log(rank).
  assert A.renyi_entropy(np.eye(T)[:, :4] @ np.eye(4, C)) == pytest.approx(math.log(4))


def test_separability_separable_and_random():
  rng = np.random.default_rng(0)
  n, C = 200, 10
  labels_N = rng.integers(0, 4, n)
  centers_KxC = 6.0 * rng.normal(size=(4, C))
  x_NxC = centers_KxC[labels_N] + rng.normal(size=(n, C))
  mean, std = A.token_separability(x_NxC, labels_N, folds=5, seed=0)
  assert mean > 0.98 and std < 0.05
  mean, _ = A.token_separability(rng.normal(size=(n, C)), labels_N, folds=5, seed=0)
  assert 0.1 < mean < 0.45  # chance is 0.25
  assert all(math.isnan(x) for x in A.token_separability(x_NxC, np.zeros(n), folds=5))
  # A class with fewer samples than folds is dropped: here that leaves one class.
  rare_N = np.where(np.arange(n) < 3, 1, 0)
  assert all(math.isnan(x) for x in A.token_separability(x_NxC, rare_N, folds=5))


def test_fold_ids_are_stratified():
  labels_N = np.repeat([0, 1, 2], [10, 20, 5])
  fold_N = A._fold_ids(labels_N, 5, seed=0)
  for c in range(3):
    counts = np.bincount(fold_N[labels_N == c], minlength=5)
    assert counts.max() - counts.min() <= 1


# ---------------------------------------------------------------------------------------------
# Word positions and sequences.


def test_word_positions_take_the_last_token():
  text = "this is, was: éwere are"
  ids_T, hits = A.word_token_positions(text, ByteTokenizer(), A.DEFAULT_WORDS)
  raw = text.encode("utf-8")
  assert [w for _, w in hits] == ["is", "was", "are"]  # "this" and "éwere" are not matches
  for t, w in hits:
    assert raw[t - len(w) + 1:t + 1] == w.encode()
  assert len(ids_T) == len(raw)


def test_build_sequences():
  tok = ByteTokenizer()
  tokens_NxT, occ = A.build_sequences(["a is b", "c are d were x"], tok, A.DEFAULT_WORDS, 4, 10)
  assert tokens_NxT.shape == (6, 4)  # 8 + 16 = 24 tokens -> 6 full rows
  flat = tokens_NxT.reshape(-1)
  for s, t, w in occ:
    assert chr(flat[s * 4 + t]) == w[-1]
  assert sorted(w for _, _, w in occ) == ["are", "is", "were"]


# ---------------------------------------------------------------------------------------------
# Model hooks and end to end.


@pytest.mark.parametrize("router", ("kv-static", "none"))
def test_sow_leaves_logits_unchanged(router):
  cfg = TINY.replace(router=router, scan_layers=False)
  params = M.init_params(cfg, jax.random.key(0))
  tokens_BxT = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.V)
  plain_BxTxV = M.Transformer(cfg).apply({"params": params}, tokens_BxT)
  sown_BxTxV, state = M.Transformer(cfg).apply({"params": params}, tokens_BxT,
                                               mutable=["intermediates"])
  np.testing.assert_array_equal(np.asarray(plain_BxTxV), np.asarray(sown_BxTxV))
  layer = state["intermediates"]["layers"]["layer_2"]
  chex.assert_shape(layer["values"][0], (2, 9, cfg.R, cfg.Hd))
  chex.assert_shape(layer["hidden"][0], (2, 9, cfg.D))


def _check_model_report(m, cfg):
  assert len(m["layers"]) == cfg.L
  for r in m["layers"]:
    for key in ("value_entropy", "value_separability", "hidden_separability"):
      for stat in ("mean", "std"):
        assert math.isfinite(r[f"{key}_{stat}"]), (key, stat)
    assert 0 <= r["value_separability_mean"] <= 1
    assert 0 < r["value_entropy_mean"] <= math.log(64) + 1e-6
  if cfg.is_lime:
    chex.assert_shape(np.array(m["router_heatmap"]), (cfg.L, cfg.L))
    chex.assert_shape(np.array(m["router_heatmap_per_head"]), (cfg.R, cfg.L, cfg.L))
    assert np.all(np.triu(np.array(m["router_heatmap"]), 1) == 0)  # no reads of later layers
  else:
    assert m["router_heatmap"] is None


def test_analyze_end_to_end(tmp_path):
  lime_cfg = TINY  # scanned layout: analyze converts it
  base_cfg = TINY.replace(router="none", scan_layers=False)
  lime_params = M.init_params(lime_cfg, jax.random.key(0))
  base_params = M.init_params(base_cfg, jax.random.key(1))
  out = str(tmp_path / "out")
  report = A.analyze(lime_params, lime_cfg, ByteTokenizer(), [_text()], A.DEFAULT_WORDS, out,
                     compare=(base_params, base_cfg, "baseline"), seq_len=64, max_sequences=16)
  assert report["n_sequences"] == 16 and report["seq_len"] == 64
  assert all(report["word_counts"][w] >= 3 for w in A.DEFAULT_WORDS)
  with open(os.path.join(out, "analysis.json")) as f:
    saved = json.load(f)
  assert [m["label"] for m in saved["models"]] == ["LIMe", "baseline"]
  _check_model_report(saved["models"][0], lime_cfg)
  _check_model_report(saved["models"][1], base_cfg)
  for name in ("value_entropy.png", "separability.png", "router_heatmap.png",
               "router_heatmap_per_head.png"):
    assert os.path.getsize(os.path.join(out, name)) > 1000


def test_run_cli(tmp_path, capsys):
  """`run` with an in-memory loader (the CLI passes lime_jax.cli.generate.load_for_decoding)."""
  from lime_jax.cli.generate import load_for_decoding as _load_for_generate  # the real loader
  assert callable(_load_for_generate)
  cfgs = {"a": TINY.replace(L=2), "b": TINY.replace(L=2, router="none")}

  def load_params(path):
    cfg = cfgs[os.path.basename(path)]
    return M.init_params(cfg, jax.random.key(0)), cfg, "byte"

  data = tmp_path / "text.txt"
  data.write_text(_text(60))
  parser = argparse.ArgumentParser()
  analyze_cmd.add_arguments(parser)
  args = parser.parse_args(["--checkpoint", str(tmp_path / "a"), "--compare", str(tmp_path / "b"),
                            "--data", str(data), "--seq-len", "32", "--max-sequences", "8",
                            "--words", "is,are", "--out", str(tmp_path / "out")])
  assert analyze_cmd.run(args, load_params) == 0
  saved = json.loads((tmp_path / "out" / "analysis.json").read_text())
  assert saved["words"] == ["is", "are"] and [m["label"] for m in saved["models"]] == ["a", "b"]
  assert "wrote" in capsys.readouterr().out
