"""The paper's per-layer analyses (spec section 8): value entropy, token separability, routers.

- Value entropy: per sequence, the value vectors Z [T, C = R*Hd] standardized by dataset
  statistics; the Renyi entropy (alpha = 0.5) of the eigenvalues of Z Z^T over their trace.
  High entropy = the values span many directions (no representation collapse).
- Token separability: value vectors (and hidden states) at occurrences of a few words
  ("is", "are", "was", "were"); a multinomial logistic-regression probe, k-fold accuracy.
- Router heatmaps: |W| of `model.router_weights`, reader layer x source layer.

Activations come from the `sow`n intermediates of `model.Block`, read in the unrolled layout.
Word occurrences: a word is matched case-sensitively between non-word characters (regex `\\b`);
its representation is taken at the token holding the word's LAST character (byte tokenizer: the
last byte; tokenizer.json: via the tokenizer's character offsets).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lime_jax.model import stack
from lime_jax.model import transformer as M
from lime_jax.config import ModelConfig

DEFAULT_WORDS = ("is", "are", "was", "were")
RENYI_ALPHA = 0.5


# ---------------------------------------------------------------------------------------------
# Value entropy.


def renyi_entropy(z_TxC: np.ndarray, alpha: float = RENYI_ALPHA) -> float:
  """Renyi entropy of the normalized spectrum of K = Z Z^T (float64)."""
  z_TxC = np.asarray(z_TxC, np.float64)
  # Z Z^T and Z^T Z share their nonzero eigenvalues: use the smaller Gram matrix.
  gram = z_TxC @ z_TxC.T if z_TxC.shape[0] <= z_TxC.shape[1] else z_TxC.T @ z_TxC
  eig = np.clip(np.linalg.eigvalsh(gram), 0.0, None)
  trace = eig.sum()
  if not trace > 0:
    return float("nan")
  lam = eig / trace
  # Round-off eigenvalues (~1e-16) would add ~1e-8 each under alpha = 0.5: keep the numerical
  # rank only, as matrix_rank does.
  lam = lam[lam > max(gram.shape) * np.finfo(np.float64).eps * lam.max()]
  return float(np.log(np.sum(lam ** alpha)) / (1.0 - alpha))


def value_entropy(values_NxTxC: np.ndarray, alpha: float = RENYI_ALPHA) -> tuple[float, float]:
  """(mean, std) over sequences of the Renyi entropy of standardized value vectors."""
  values_NxTxC = np.asarray(values_NxTxC, np.float64)
  mean_C = values_NxTxC.mean(axis=(0, 1))
  std_C = values_NxTxC.std(axis=(0, 1))
  # A constant channel carries no information; leave it at zero rather than divide by zero.
  z_NxTxC = (values_NxTxC - mean_C) / np.where(std_C > 0, std_C, 1.0)
  entropies_N = np.array([renyi_entropy(z_TxC, alpha) for z_TxC in z_NxTxC])
  return float(np.nanmean(entropies_N)), float(np.nanstd(entropies_N))


# ---------------------------------------------------------------------------------------------
# Token separability: a linear probe with k-fold cross-validation.


def _fit_logistic(x_NxC: np.ndarray, y_N: np.ndarray, n_classes: int, steps: int,
                  l2: float) -> np.ndarray:
  """Multinomial logistic regression (bias in the last row), full-batch Nesterov descent."""
  N, C = x_NxC.shape
  x_NxC1 = np.concatenate([x_NxC, np.ones((N, 1))], axis=1)
  onehot_NxK = np.eye(n_classes)[y_N]
  # Softmax cross-entropy has Hessian <= 1/2 * X^T X / N: the step 1/Lipschitz is safe.
  lipschitz = 0.5 * np.linalg.norm(x_NxC1, 2) ** 2 / N + l2
  lr = 1.0 / lipschitz
  w_C1xK = np.zeros((C + 1, n_classes))
  w_prev = w_C1xK
  for t in range(steps):
    look_C1xK = w_C1xK + (t / (t + 3)) * (w_C1xK - w_prev)
    logits_NxK = x_NxC1 @ look_C1xK
    logits_NxK -= logits_NxK.max(axis=1, keepdims=True)
    p_NxK = np.exp(logits_NxK)
    p_NxK /= p_NxK.sum(axis=1, keepdims=True)
    grad_C1xK = x_NxC1.T @ (p_NxK - onehot_NxK) / N + l2 * look_C1xK
    w_prev, w_C1xK = w_C1xK, look_C1xK - lr * grad_C1xK
  return w_C1xK


def _fold_ids(labels_N: np.ndarray, folds: int, seed: int) -> np.ndarray:
  """Stratified fold of each sample: every class is spread over the folds evenly."""
  rng = np.random.default_rng(seed)
  fold_N = np.empty(len(labels_N), np.int64)
  offset = 0
  for c in np.unique(labels_N):
    idx = rng.permutation(np.flatnonzero(labels_N == c))
    fold_N[idx] = (offset + np.arange(len(idx))) % folds
    offset += len(idx)  # the next class continues round-robin, so folds stay balanced in size
  return fold_N


def token_separability(features_NxC: np.ndarray, labels_N: np.ndarray, folds: int = 5,
                       seed: int = 0, steps: int = 300, l2: float = 1e-4) -> tuple[float, float]:
  """(mean, std) held-out accuracy of a linear probe over `folds` stratified folds.

  Classes with fewer than `folds` samples are dropped (some fold could not test them);
  NaN when fewer than two classes remain.
  """
  x_NxC = np.asarray(features_NxC, np.float64)
  labels_N = np.asarray(labels_N)
  classes, counts = np.unique(labels_N, return_counts=True)
  keep_N = np.isin(labels_N, classes[counts >= folds])
  x_NxC = x_NxC[keep_N]
  _, y_N = np.unique(labels_N[keep_N], return_inverse=True)
  n_classes = int(y_N.max()) + 1 if len(y_N) else 0
  if n_classes < 2 or len(y_N) < folds:
    return float("nan"), float("nan")
  fold_N = _fold_ids(y_N, folds, seed)
  accuracies = []
  for k in range(folds):
    train, test = fold_N != k, fold_N == k
    # Standardize with training statistics only, so the held-out fold stays unseen.
    mean_C = x_NxC[train].mean(axis=0)
    std_C = x_NxC[train].std(axis=0)
    std_C = np.where(std_C > 0, std_C, 1.0)
    w = _fit_logistic((x_NxC[train] - mean_C) / std_C, y_N[train], n_classes, steps, l2)
    x_test = np.concatenate([(x_NxC[test] - mean_C) / std_C, np.ones((test.sum(), 1))], axis=1)
    accuracies.append(np.mean(np.argmax(x_test @ w, axis=1) == y_N[test]))
  return float(np.mean(accuracies)), float(np.std(accuracies))


# ---------------------------------------------------------------------------------------------
# Word occurrences -> token positions; sequences.


def _word_pattern(words: Sequence[str]) -> re.Pattern:
  return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b")


def _encode_with_char_ends(text: str, tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """(token ids, the character index just past each token) of one text."""
  if hasattr(tokenizer, "_tok"):  # HFTokenizer: the Rust encoding knows its offsets
    enc = tokenizer._tok.encode(text, add_special_tokens=False)  # pylint: disable=protected-access
    return (np.asarray(enc.ids, np.int32),
            np.asarray([end for _, end in enc.offsets], np.int64))
  ids = np.asarray(tokenizer.encode(text), np.int32)
  if len(ids) != len(text.encode("utf-8")):
    raise ValueError("analysis: word positions need the byte tokenizer or a tokenizer.json")
  # Byte b belongs to the character whose UTF-8 bytes cover it; map bytes to character ends.
  char_ends = np.arange(1, len(text) + 1, dtype=np.int64)
  if text.isascii():
    return ids, char_ends
  return ids, np.repeat(char_ends, [len(ch.encode("utf-8")) for ch in text])


def word_token_positions(text: str, tokenizer, words: Sequence[str]) -> tuple[
    np.ndarray, list[tuple[int, str]]]:
  """(token ids of text, [(index of the token holding each word's last character, word)])."""
  ids_T, char_end_T = _encode_with_char_ends(text, tokenizer)
  hits = []
  for m in _word_pattern(words).finditer(text):
    # The first token whose end passes the word's last character holds that character.
    t = int(np.searchsorted(char_end_T, m.end(), side="left"))
    if t < len(ids_T):
      hits.append((t, m.group(1)))
  return ids_T, hits


def build_sequences(texts: Sequence[str], tokenizer, words: Sequence[str], seq_len: int,
                    max_sequences: int) -> tuple[np.ndarray, list[tuple[int, int, str]]]:
  """Texts as BOS text EOS, concatenated and cut into [N, seq_len] (the remainder dropped).

  Returns the tokens and the word occurrences inside them as (sequence, position, word).
  """
  stream, hits = [], []
  offset = 0
  for text in texts:
    ids_T, doc_hits = word_token_positions(text, tokenizer, words)
    stream.append(np.concatenate([[tokenizer.bos_id], ids_T, [tokenizer.eos_id]]).astype(np.int32))
    hits.extend((offset + 1 + t, w) for t, w in doc_hits)
    offset += len(ids_T) + 2
    if offset >= seq_len * max_sequences:
      break
  tokens = np.concatenate(stream)
  N = min(len(tokens) // seq_len, max_sequences)
  if N == 0:
    raise ValueError(f"analysis: text has {len(tokens)} tokens, fewer than seq_len={seq_len}")
  tokens_NxT = tokens[:N * seq_len].reshape(N, seq_len)
  occurrences = [(g // seq_len, g % seq_len, w) for g, w in hits if g < N * seq_len]
  return tokens_NxT, occurrences


# ---------------------------------------------------------------------------------------------
# Activations.


def collect_activations(params: dict[str, Any], cfg: ModelConfig, tokens_NxT: np.ndarray,
                        batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Per-layer values [L, N, T, R*Hd] and hidden states [L, N, T, D], float32 numpy."""
  unrolled = cfg.replace(scan_layers=False)
  params = stack.convert_layout(params, cfg, unrolled) if cfg.scan_layers else params

  @jax.jit
  def forward(p, tokens_BxT):
    _, state = M.Transformer(unrolled).apply({"params": p}, tokens_BxT, mutable=["intermediates"])
    layers = state["intermediates"]["layers"]
    values_LxBxTxRxHd = jnp.stack([layers[f"layer_{l}"]["values"][0] for l in range(cfg.L)])
    hidden_LxBxTxD = jnp.stack([layers[f"layer_{l}"]["hidden"][0] for l in range(cfg.L)])
    return (values_LxBxTxRxHd.astype(jnp.float32).reshape(*values_LxBxTxRxHd.shape[:3], -1),
            hidden_LxBxTxD.astype(jnp.float32))

  values, hidden = [], []
  for start in range(0, len(tokens_NxT), batch_size):
    v, h = forward(params, jnp.asarray(tokens_NxT[start:start + batch_size]))
    values.append(np.asarray(v))
    hidden.append(np.asarray(h))
  return np.concatenate(values, axis=1), np.concatenate(hidden, axis=1)


def router_heatmaps(params: dict[str, Any], cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
  """|W| as [L_reader, L_src] (mean over both heads) and [R_reader, L_reader, L_src] (mean over
  source heads): how much each reader layer (head) draws on each source layer."""
  abs_w = np.abs(np.asarray(M.router_weights(params, cfg), np.float64))  # [Lr, R, Ls, R]
  per_head_RxLxL = abs_w.mean(axis=3).transpose(1, 0, 2)
  return per_head_RxLxL.mean(axis=0), per_head_RxLxL


# ---------------------------------------------------------------------------------------------
# The analysis of one or two models: JSON and figures.


def _finite_or_none(x: float) -> float | None:
  return float(x) if math.isfinite(x) else None


def analyze_model(params: dict[str, Any], cfg: ModelConfig, tokens_NxT: np.ndarray,
                  occurrences: list[tuple[int, int, str]], label: str, folds: int = 5,
                  seed: int = 0) -> dict[str, Any]:
  """Per-layer metrics of one model as a JSON-ready dict (NaN -> None)."""
  values_LxNxTxC, hidden_LxNxTxD = collect_activations(params, cfg, tokens_NxT)
  seq_O = np.array([s for s, _, _ in occurrences], np.int64)
  pos_O = np.array([t for _, t, _ in occurrences], np.int64)
  labels_O = np.array([w for _, _, w in occurrences])
  layers = []
  for l in range(cfg.L):
    ent_mean, ent_std = value_entropy(values_LxNxTxC[l])
    v_mean, v_std = token_separability(values_LxNxTxC[l][seq_O, pos_O], labels_O, folds, seed)
    h_mean, h_std = token_separability(hidden_LxNxTxD[l][seq_O, pos_O], labels_O, folds, seed)
    layers.append({
        "layer": l,
        "value_entropy_mean": _finite_or_none(ent_mean),
        "value_entropy_std": _finite_or_none(ent_std),
        "value_separability_mean": _finite_or_none(v_mean),
        "value_separability_std": _finite_or_none(v_std),
        "hidden_separability_mean": _finite_or_none(h_mean),
        "hidden_separability_std": _finite_or_none(h_std),
    })
  result = {"label": label, "router": cfg.router, "L": cfg.L, "R": cfg.R, "layers": layers,
            "router_heatmap": None, "router_heatmap_per_head": None}
  if cfg.router == "kv-static":  # heatmaps of the kv routers W (the hidden routers: not yet)
    mean_LxL, per_head_RxLxL = router_heatmaps(params, cfg)
    result["router_heatmap"] = mean_LxL.tolist()
    result["router_heatmap_per_head"] = per_head_RxLxL.tolist()
  return result


def _default_label(cfg: ModelConfig) -> str:
  if cfg.is_lime:
    return "LIMe"
  return "baseline" if cfg.router == "none" else cfg.router  # a non-LIMe router: its name


def analyze(params: dict[str, Any], cfg: ModelConfig, tokenizer, texts: Sequence[str],
            words: Sequence[str], out_dir: str,
            compare: tuple[dict[str, Any], ModelConfig, str] | None = None, *,
            label: str | None = None, seq_len: int | None = None, max_sequences: int = 32,
            folds: int = 5, seed: int = 0) -> dict[str, Any]:
  """Writes out_dir/analysis.json and PNGs (entropy, separability, router heatmaps).

  `compare` = (params, cfg, label) of a second model (same tokenizer), drawn beside the first.
  Returns the JSON dict.
  """
  models = [(params, cfg, label or _default_label(cfg))]
  if compare is not None:
    models.append(compare)
  seq_len = seq_len or min(c.T for _, c, _ in models)
  if seq_len > min(c.T for _, c, _ in models):
    raise ValueError(f"analysis: seq_len={seq_len} exceeds the models' maximum length"
                     f" T={min(c.T for _, c, _ in models)}")
  tokens_NxT, occurrences = build_sequences(texts, tokenizer, words, seq_len, max_sequences)
  counts = {w: sum(1 for _, _, x in occurrences if x == w) for w in words}
  if sum(c >= folds for c in counts.values()) < 2:
    print(f"analysis: warning: word counts {counts}; separability needs two words with at least"
          f" {folds} occurrences each (raise --max-sequences)")
  report = {
      "words": list(words), "word_counts": counts, "n_sequences": int(len(tokens_NxT)),
      "seq_len": int(seq_len), "folds": folds,
      "probe_words": [w for w in words if counts[w] >= folds], "renyi_alpha": RENYI_ALPHA,
      "models": [analyze_model(p, c, tokens_NxT, occurrences, lab, folds, seed)
                 for p, c, lab in models],
  }
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "analysis.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
  report["figures"] = plot_report(report, out_dir)
  return report


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _series(m: dict[str, Any], key: str) -> tuple[np.ndarray, np.ndarray]:
  nan = lambda x: np.nan if x is None else x
  return (np.array([nan(r[f"{key}_mean"]) for r in m["layers"]], np.float64),
          np.array([nan(r[f"{key}_std"]) for r in m["layers"]], np.float64))


def plot_report(report: dict[str, Any], out_dir: str) -> list[str]:
  """One PNG per metric, all models in each; returns the paths written."""
  plt = _pyplot()
  paths = []

  fig, ax = plt.subplots(figsize=(6, 4))
  for m in report["models"]:
    mean, std = _series(m, "value_entropy")
    ax.errorbar(np.arange(m["L"]), mean, yerr=std, marker="o", capsize=3, label=m["label"])
  ax.set(xlabel="layer", ylabel="value entropy (Renyi, alpha=0.5)", title="Value entropy")
  ax.legend()
  paths.append(_save(fig, plt, out_dir, "value_entropy.png"))

  fig, ax = plt.subplots(figsize=(6, 4))
  for i, m in enumerate(report["models"]):
    for key, style in (("value_separability", "-"), ("hidden_separability", "--")):
      mean, std = _series(m, key)
      ax.errorbar(np.arange(m["L"]), mean, yerr=std, marker="o", capsize=3, linestyle=style,
                  color=f"C{i}", label=f"{m['label']} {key.split('_')[0]}s")
  ax.set(xlabel="layer", ylabel=f"probe accuracy ({report['folds']}-fold)",
         title="Token separability: " + "/".join(report["words"]))
  ax.legend()
  paths.append(_save(fig, plt, out_dir, "separability.png"))

  lime = [m for m in report["models"] if m["router_heatmap"] is not None]
  if lime:
    fig, axes = plt.subplots(1, len(lime), figsize=(4.5 * len(lime), 4), squeeze=False)
    for ax, m in zip(axes[0], lime):
      _heatmap(fig, ax, np.array(m["router_heatmap"]), f"{m['label']}: |W| mean over heads")
    paths.append(_save(fig, plt, out_dir, "router_heatmap.png"))
    R = max(m["R"] for m in lime)
    fig, axes = plt.subplots(len(lime), R, figsize=(3.2 * R, 3 * len(lime)), squeeze=False)
    for row, m in zip(axes, lime):
      for r, ax in enumerate(row):
        if r < m["R"]:
          _heatmap(fig, ax, np.array(m["router_heatmap_per_head"][r]), f"{m['label']} head {r}")
        else:
          ax.axis("off")
    paths.append(_save(fig, plt, out_dir, "router_heatmap_per_head.png"))
  return paths


def _heatmap(fig, ax, w_LxL: np.ndarray, title: str) -> None:
  im = ax.imshow(w_LxL, cmap="viridis", origin="upper")
  ax.set(xlabel="source layer", ylabel="reader layer", title=title)
  fig.colorbar(im, ax=ax, fraction=0.046)


def _save(fig, plt, out_dir: str, name: str) -> str:
  path = os.path.join(out_dir, name)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
