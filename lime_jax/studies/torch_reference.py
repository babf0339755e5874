"""The PyTorch yardstick for `lime-jax bench --against-torch`: transformers' LlamaForCausalLM
trained one step at a time on the CPU, at the shape of our baseline (`router: none`).

The step is what ours does: float32 forward, loss, backward, global-norm clipping and AdamW
with our optimizer's defaults (train/optimizer.py), one warm-up step, then the median of
`steps` timed ones. The model is built from `interop.hf.hf_config`, so its shape is exactly
the one our export writes. This times Llama only: the reference LIMe code is not a package
and is not fetched here.

torch and transformers are the optional `hf` extra; without them, a one-line error says so.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from lime_jax.config import ModelConfig
from lime_jax.interop import hf
from lime_jax.studies.bench import TORCH_LLAMA
from lime_jax.train.optimizer import OptimConfig



def _import_torch():
  try:
    import torch
    import transformers
  except ImportError:
    raise ValueError("--against-torch needs torch and transformers:"
                     " pip install 'lime_jax[hf]'") from None
  return torch, transformers


def llama_model(cfg: ModelConfig, seed: int = 0):
  """transformers' LlamaForCausalLM of `cfg`'s shape, float32, randomly initialized."""
  torch, transformers = _import_torch()
  torch.manual_seed(seed)
  keys = {k: v for k, v in hf.hf_config(cfg).items()
          if k not in ("architectures", "model_type", hf.LIME_CONFIG_KEY, "torch_dtype")}
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(**keys)).float().train()


def llama_step_point(cfg: ModelConfig, batch: int, steps: int, seed: int = 0) -> dict[str, Any]:
  """Median wall time of a full training step of the HF Llama of `cfg`'s shape (a record with
  bench.RECORD_KEYS; what is not measured here is NaN)."""
  if cfg.router != "none" or cfg.connections != "none":
    raise ValueError(f"--against-torch times Llama, the baseline; got router={cfg.router},"
                     f" connections={cfg.connections}")
  torch, _ = _import_torch()
  model = llama_model(cfg, seed)
  optim = OptimConfig()
  adamw = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=(optim.b1, optim.b2),
                            eps=optim.eps, weight_decay=optim.weight_decay)
  tokens = torch.randint(0, cfg.V, (batch, cfg.T), generator=torch.Generator().manual_seed(seed))

  def step() -> float:
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
    adamw.step()
    adamw.zero_grad(set_to_none=True)
    return float(loss.detach())

  times = []
  for i in range(steps + 1):
    start = time.perf_counter()
    loss = step()
    if i:  # the first call pays one-off allocation costs, as bench_point's does
      times.append(time.perf_counter() - start)
  if times and loss != loss:
    raise RuntimeError(f"bench: non-finite torch loss at depth={cfg.L}")
  nan = float("nan")
  return {"router": TORCH_LLAMA, "depth": cfg.L, "width": cfg.D, "temp_bytes": nan, "flops": nan,
          "compile_s": nan, "step_s": statistics.median(times) if times else nan}
