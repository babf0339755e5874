"""Scoring text with a model: continuation log-likelihoods equal the forward's per-token sums
(batched, padded, truncated or not), rolling windows cover every token, generation is the
cached decoder cut at stop strings."""

import jax
import numpy as np
import pytest

from lime_jax.config import ModelConfig
from lime_jax.data.tokenizers import ByteTokenizer
from lime_jax.evaluation.scoring import Scorer
from lime_jax.inference import decode
from lime_jax.model import transformer as M

CFG = ModelConfig(V=258, D=32, L=2, H=2, F=64, T=16)  # the byte vocabulary
BYTE = ByteTokenizer()


@pytest.fixture(scope="module")
def params():
  return M.init_params(CFG, jax.random.key(0))


@jax.jit
def _logits(params, inputs_1xT):
  return M.Transformer(CFG).apply({"params": params}, inputs_1xT)


def _forward_logprobs(params, sequence):
  """Float64 log-softmax of one row's logits: [len - 1, V]. The row sits in a T-token buffer
  (causal: the padding after it is never seen), so one compiled forward serves every row."""
  n = len(sequence) - 1
  buffer_1xT = np.zeros((1, CFG.T), np.int32)
  buffer_1xT[0, :n] = sequence[:-1]
  logits = np.asarray(_logits(params, buffer_1xT), np.float64)[0, :n]
  top = logits.max(-1, keepdims=True)
  return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def _expected(params, context, continuation):
  sequence = (list(context) + list(continuation))[-(CFG.T + 1):]
  logp = _forward_logprobs(params, sequence)
  n = len(continuation)
  rows = np.arange(len(sequence) - 1 - n, len(sequence) - 1)
  targets = np.array(sequence[-n:])
  greedy = bool(np.all(np.argmax(logp[rows], -1) == targets))
  return float(logp[rows, targets].sum()), greedy


def test_loglikelihood_tokens_equal_the_forward_in_any_batch(params):
  rng = np.random.default_rng(0)
  pairs = [([256, 5, 9], [33, 7]), ([256], [1]), ([256, *rng.integers(0, 256, 20)], [4, 4, 4]),
           ([256, 65, 66, 67, 68, 69], [70, 71, 72, 73, 74, 75, 76]), ([256, 3], [2] * 16)]
  expected = [_expected(params, c, x) for c, x in pairs]
  for batch_size in (1, 3):  # rows padded and sorted differently: the same numbers
    got = Scorer(params, CFG, BYTE, batch_size).loglikelihood_tokens(pairs)
    np.testing.assert_allclose([g[0] for g in got], [e[0] for e in expected], rtol=1e-5)
    assert [g[1] for g in got] == [e[1] for e in expected]
  # A continuation the model would produce greedily is reported as greedy.
  context = [256, 10, 20]
  first = int(np.argmax(_forward_logprobs(params, context + [0])[-1]))
  assert Scorer(params, CFG, BYTE, 1).loglikelihood_tokens([(context, [first])])[0][1] is True
  with pytest.raises(ValueError, match="^pairs: pair 0 has a 17-token continuation"):
    Scorer(params, CFG, BYTE).loglikelihood_tokens([([256], [1] * 17)])


def test_text_pairs_start_with_bos_and_move_trailing_space(params):
  scorer = Scorer(params, CFG, BYTE, 1)
  assert scorer.encode_pair("Q: a? ", "yes") == ([256, *b"Q: a?"], list(b" yes"))
  assert scorer.encode_pair("", "hi") == ([256], list(b"hi"))
  got = scorer.loglikelihood([("Q: a? ", "yes")])[0]
  assert got[0] == pytest.approx(_expected(params, [256, *b"Q: a?"], list(b" yes"))[0], rel=1e-5)


def test_rolling_loglikelihood_scores_every_token_in_windows(params):
  text = "a longer text than sixteen bytes, in windows"
  tokens = list(text.encode())
  scorer = Scorer(params, CFG, BYTE, 3)
  sequence = [256] + tokens
  total = 0.0
  for start in range(0, len(tokens), CFG.T):  # window w predicts tokens w*T .. w*T + T - 1
    window = sequence[start:start + CFG.T + 1]
    logp = _forward_logprobs(params, window)
    total += logp[np.arange(len(window) - 1), window[1:]].sum()
  assert scorer.rolling_loglikelihood([text, ""]) == pytest.approx([total, 0.0], rel=1e-5)


def test_generate_is_the_greedy_cached_decoder_cut_at_stop_strings(params):
  scorer = Scorer(params, CFG, BYTE, 2)
  contexts = ["ab", "hello"]
  result = decode.generate(params, CFG, [[256, *c.encode()] for c in contexts], 6,
                           jax.random.key(0), temperature=0.0, eos_id=BYTE.eos_id)
  full = [BYTE.decode(t) for t in result.tokens]
  assert scorer.generate(contexts, until=[], max_new_tokens=6) == full
  stop = full[0][2:4]  # a stop string inside the first continuation
  cut = scorer.generate(contexts, until=[stop, ""], max_new_tokens=6)
  assert cut[0] == full[0][:full[0].index(stop)]
  assert cut[1] == (full[1][:full[1].index(stop)] if stop in full[1] else full[1])
  # A long context keeps its last tokens so that it and the new tokens fit T.
  assert len(scorer.generate(["x" * 40], until=[], max_new_tokens=100)) == 1
