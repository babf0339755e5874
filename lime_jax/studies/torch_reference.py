"""The PyTorch yardstick for `lime-jax bench --against-torch`: transformers' LlamaForCausalLM
trained one step at a time on the CPU, at the shape of our baseline (`router: none`).

The step is what ours does: float32 forward, loss, backward, global-norm clipping and AdamW
with our optimizer's defaults (train/optimizer.py). It always runs in a Python process of its
own (in ours, a step of ours right after a PyTorch step ran slower, and each library keeps its
own allocator settings, cli/bench.py). Two ways to time it:
- `LlamaApart`: a worker process that runs one step per request, so PyTorch's steps join our
  rounds (bench.time_rounds) and ours/PyTorch is a median of ratios taken a step apart;
- `llama_step_point_apart`: one warm-up step, then the median of `steps` timed ones, after ours
  (`--sequential`): the ratio of two medians taken minutes apart, which this shared machine's
  drift moved by up to 20%.
The model is built from `interop.hf.hf_config`, so its shape is exactly the one our export
writes. This times Llama only: the reference LIMe code is not a package and is not fetched here.

torch and transformers are the optional `hf` extra; without them, a one-line error says so.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from typing import Any, IO

from lime_jax.config import ModelConfig
from lime_jax.interop import hf
from lime_jax.studies import bench
from lime_jax.train import environment
from lime_jax.train.optimizer import OptimConfig


_MISSING_TORCH = "--against-torch needs torch and transformers: pip install 'lime_jax[hf]'"


def _import_torch():
  try:
    import torch
    import transformers
  except ImportError:
    raise ValueError(_MISSING_TORCH) from None
  return torch, transformers


def _require_torch_installed() -> None:
  """The one-line error where torch or transformers is missing, without importing them: the
  process that asks is the one whose steps are timed, and should not hold torch's libraries."""
  if any(importlib.util.find_spec(name) is None for name in ("torch", "transformers")):
    raise ValueError(_MISSING_TORCH)


def llama_model(cfg: ModelConfig, seed: int = 0):
  """transformers' LlamaForCausalLM of `cfg`'s shape, float32, randomly initialized."""
  torch, transformers = _import_torch()
  torch.manual_seed(seed)
  keys = {k: v for k, v in hf.hf_config(cfg).items()
          if k not in ("architectures", "model_type", hf.LIME_CONFIG_KEY, "torch_dtype")}
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(**keys)).float().train()


def _require_baseline(cfg: ModelConfig) -> None:
  if cfg.router != "none" or cfg.connections != "none":
    raise ValueError(f"--against-torch times Llama, the baseline; got router={cfg.router},"
                     f" connections={cfg.connections}")


def _llama_record(cfg: ModelConfig) -> dict[str, Any]:
  """A Llama point's record before timing: what is not measured here is NaN."""
  nan = float("nan")
  return {"router": bench.TORCH_LLAMA, "depth": cfg.L, "width": cfg.D, "temp_bytes": nan,
          "flops": nan, "compile_s": nan}


def _torch_versions() -> dict[str, str]:
  torch, transformers = _import_torch()
  return {"torch": torch.__version__, "transformers": transformers.__version__}


def prepare_llama(cfg: ModelConfig, batch: int, seed: int = 0) -> bench.ReadyPoint:
  """A full training step of the HF Llama of `cfg`'s shape, ready to time (bench.time_rounds);
  what is not measured here is NaN in its record."""
  _require_baseline(cfg)
  torch, _ = _import_torch()
  model = llama_model(cfg, seed)
  optim = OptimConfig()
  adamw = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=(optim.b1, optim.b2),
                            eps=optim.eps, weight_decay=optim.weight_decay)
  tokens = torch.randint(0, cfg.V, (batch, cfg.T), generator=torch.Generator().manual_seed(seed))
  last = {"loss": float("nan")}

  def step() -> float:
    start = time.perf_counter()
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
    adamw.step()
    adamw.zero_grad(set_to_none=True)
    last["loss"] = float(loss.detach())  # waits for the step: torch's CPU ops are synchronous
    return time.perf_counter() - start

  return bench.ReadyPoint(_llama_record(cfg), step, lambda: last["loss"] == last["loss"])


def llama_step_point(cfg: ModelConfig, batch: int, steps: int, seed: int = 0) -> dict[str, Any]:
  """The Llama step timed on its own: median of `steps` after one warm-up (a record with
  bench.RECORD_KEYS)."""
  point = prepare_llama(cfg, batch, seed)
  (times,) = bench.time_rounds([point], steps)
  record = bench.finish_point(point, times, "sequential")
  record["environment"].update(_torch_versions())
  return record


# The child's program: one request (JSON on stdin) in, one record (the last line out) out.
_CHILD = """
import json, sys
from lime_jax.config import ModelConfig
from lime_jax.studies import torch_reference
request = json.load(sys.stdin)
print(json.dumps(torch_reference.llama_step_point(
    ModelConfig.from_dict(request["model"]), request["batch"], request["steps"], request["seed"])))
"""


def llama_step_point_apart(cfg: ModelConfig, batch: int, steps: int, env: dict[str, str],
                           seed: int = 0) -> dict[str, Any]:
  """`llama_step_point` in a fresh Python process with environment `env`: neither library's
  allocations, threads or caches are the other's (in one process, a step of ours right after
  a PyTorch step ran 5.2 against 4.4 s at 64 layers), and each runs with its own allocator
  settings (cli/bench.py)."""
  _require_torch_installed()  # without torch: the one-line error here, not a child's traceback
  request = json.dumps({"model": cfg.to_dict(), "batch": batch, "steps": steps, "seed": seed})
  child = subprocess.run([sys.executable, "-c", _CHILD], input=request, capture_output=True,
                         text=True, env=env, check=False)
  lines = child.stdout.strip().splitlines()
  if child.returncode != 0 or not lines:
    raise _child_failed(child.returncode, child.stderr)
  return json.loads(lines[-1])


def _child_failed(returncode: int | None, stderr: str) -> ValueError:
  tail = (stderr.strip().splitlines() or ["no output"])[-1]
  return ValueError(f"--against-torch: the PyTorch process failed (exit {returncode}): {tail}")


def serve_llama_steps(requests: IO[str], replies: IO[str]) -> None:
  """The worker's loop (`LlamaApart`'s child): a JSON request (model, batch, seed), then one
  line per command: `step` runs a step and replies its seconds and whether its loss was finite,
  `describe` replies this process's environment; end of input ends it. A reply is one JSON line
  (whatever else a library prints goes to stderr, not here)."""
  request = json.loads(requests.readline())
  point = prepare_llama(ModelConfig.from_dict(request["model"]), request["batch"],
                        request["seed"])

  def reply(obj: dict[str, Any]) -> None:
    replies.write(json.dumps(obj) + "\n")
    replies.flush()

  reply({"ready": True})
  for line in requests:
    command = line.strip()
    if command == "step":
      seconds = point.step()
      reply({"step_s": seconds, "finite": point.finite()})
    elif command == "describe":
      reply({"environment": dict(environment.describe(), **_torch_versions())})
    else:
      raise ValueError(f"serve_llama_steps: unknown command {command!r}")


_WORKER = """
import sys
from lime_jax.studies import torch_reference
replies = sys.stdout
sys.stdout = sys.stderr  # the replies' stream carries replies only
torch_reference.serve_llama_steps(sys.stdin, replies)
"""


class LlamaApart:
  """PyTorch's Llama step in a worker process of its own (environment `env`), timed one step
  per request: `point` joins bench.time_rounds beside ours, so each round pairs a step of ours
  with one of PyTorch's taken seconds apart. Only one library runs at a time: the worker waits
  on its input while ours steps, and ours waits on the reply while it steps. A context manager:
  leaving it ends the worker; `worker_environment()` is the worker's own (versions, malloc
  settings), for its record."""

  def __init__(self, cfg: ModelConfig, batch: int, env: dict[str, str], seed: int = 0):
    _require_torch_installed()  # without torch: the one-line error here, not a child's traceback
    _require_baseline(cfg)  # said before a process starts
    self._stderr = tempfile.TemporaryFile(mode="w+")  # a file: a full pipe would block the worker
    self._child = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                   env=env, bufsize=1)
    self._last = {"finite": False}
    self._failure: ValueError | None = None  # once the worker has ended, every request says why
    self._ask(json.dumps({"model": cfg.to_dict(), "batch": batch, "seed": seed}))
    self.point = bench.ReadyPoint(_llama_record(cfg), self._step, lambda: self._last["finite"])

  def _ask(self, line: str) -> dict[str, Any]:
    if self._failure is not None:
      raise self._failure
    try:
      self._child.stdin.write(line + "\n")
      self._child.stdin.flush()
      reply = self._child.stdout.readline()
    except BrokenPipeError:
      reply = ""
    if not reply:  # the worker ended: its own error, in one line
      self._end_worker()
      self._stderr.seek(0)
      self._failure = _child_failed(self._child.returncode, self._stderr.read())
      self.close()
      raise self._failure
    return json.loads(reply)

  def _step(self) -> float:
    self._last = self._ask("step")
    return self._last["step_s"]

  def worker_environment(self) -> dict[str, Any]:
    return self._ask("describe")["environment"]

  def close(self) -> None:
    self._end_worker()
    self._stderr.close()

  def _end_worker(self) -> None:
    if self._child.poll() is None:
      self._child.stdin.close()
      try:
        self._child.wait(timeout=60)
      except subprocess.TimeoutExpired:
        self._child.kill()
        self._child.wait()

  def __enter__(self) -> "LlamaApart":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
