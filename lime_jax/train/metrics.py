"""Training metrics: a JSONL log, TensorBoard events, a tqdm bar, throughput and MFU.

`<out_dir>/metrics.jsonl` holds one JSON object per logged step with at least
  step, loss, tokens, flops (cumulative training FLOPs), tokens_per_s, mfu (null without a
  known peak), and val_loss / val_ppl on evaluation steps.
TensorBoard event files go to `<out_dir>/tensorboard/`. With `run.wandb_project` set, the same
records also go to Weights & Biases (the optional `wandb` package: `pip install 'lime_jax[wandb]'`),
with the resolved config; `WANDB_MODE=offline` (wandb's own setting) keeps them on disk under
`<out_dir>/wandb/` for `wandb sync`. A resumed run continues the same W&B run (its id is kept in
`<out_dir>/wandb_run_id`).

The host never waits for the device in the hot loop: `DeferredFetch` hands back step n's
metrics only after step n+1 has been dispatched.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from typing import Any, Iterable, Mapping

import jax

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"

# Dense bf16 peak FLOP/s per chip, from vendor datasheets; keys match `device.device_kind`
# by prefix (longest first). CPUs have no meaningful peak: MFU is null there.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p reports "TPU v5"
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,  # SXM; the PCIe part is slower
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def device_peak_flops(device_kind: str) -> float | None:
  for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
    if device_kind.startswith(prefix):
      return PEAK_FLOPS[prefix]
  return None


def peak_flops(configured: float | None, devices: Iterable[Any] | None = None) -> float | None:
  """The run's peak FLOP/s: the configured value, else the table value times the devices."""
  if configured is not None:
    return float(configured)
  devices = list(devices if devices is not None else jax.devices())
  peaks = [device_peak_flops(d.device_kind) for d in devices]
  if not peaks or any(p is None for p in peaks):
    return None
  return float(sum(peaks))


def mfu(flops_per_s: float | None, peak: float | None) -> float | None:
  if flops_per_s is None or peak is None:
    return None
  return flops_per_s / peak


class DeferredFetch:
  """Holds the device metrics of the newest step; `push` returns the previous step's on host.

  Called right after dispatching step n+1, the fetch of step n overlaps step n+1's compute.
  """

  def __init__(self):
    self._pending: tuple[int, Any] | None = None

  def push(self, step: int, metrics: Any) -> tuple[int, dict[str, float]] | None:
    previous, self._pending = self._pending, (step, metrics)
    return _to_host(previous)

  def flush(self) -> tuple[int, dict[str, float]] | None:
    """Blocks for the newest step (used at eval / checkpoint / end, which sync anyway)."""
    previous, self._pending = self._pending, None
    return _to_host(previous)


def _to_host(item: tuple[int, Any] | None) -> tuple[int, dict[str, float]] | None:
  if item is None:
    return None
  step, metrics = item
  return step, {k: float(v) for k, v in jax.device_get(metrics).items()}


class Throughput:
  """Tokens/s between marks. The first mark after (re)start only starts the clock, so that
  compilation never counts."""

  def __init__(self):
    self._start: float | None = None
    self._tokens = 0

  def restart(self) -> None:
    """Forget the time so far (after an eval or a checkpoint, which are not training)."""
    self._start, self._tokens = time.perf_counter(), 0

  def add(self, tokens: int) -> None:
    if self._start is None:
      self._start = time.perf_counter()
    else:
      self._tokens += tokens

  def rate(self) -> float | None:
    """Tokens/s since the last `take`/`restart`; None before any timed tokens."""
    if self._start is None or self._tokens == 0:
      return None
    elapsed = time.perf_counter() - self._start
    return self._tokens / elapsed if elapsed > 0 else None

  def take(self) -> float | None:
    rate = self.rate()
    if self._start is not None and self._tokens:
      self.restart()
    return rate


def read_metrics(path: str) -> list[dict[str, Any]]:
  """Records of a metrics.jsonl (a run directory or the file itself); [] if absent."""
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  if not os.path.isfile(path):
    return []
  records = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        # A process killed mid-write can leave a torn last line; anything else is damage.
        if f.readline():
          raise ValueError(f"{path}:{line_no}: not a JSON object") from None
  return records


def _finite_or_none(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return None  # JSON has no NaN; null marks it
  return value


def import_wandb() -> Any:
  """The wandb module, or a one-line ValueError saying how to get it."""
  try:
    import wandb  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError("run.wandb_project: logging to Weights & Biases needs the wandb package"
                     " (pip install 'lime_jax[wandb]'), or leave run.wandb_project null") from None
  return wandb


def _scalars(record: Mapping[str, Any]) -> dict[str, float]:
  """The numeric entries of a record but its step: what TensorBoard and W&B plot."""
  return {k: v for k, v in record.items()
          if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _start_wandb(out_dir: str, project: str, config: Mapping[str, Any] | None) -> Any:
  """A W&B run for out_dir: the one it started before when resuming (same id), else a new one."""
  wandb = import_wandb()
  id_path = os.path.join(out_dir, WANDB_ID_FILE)
  if os.path.isfile(id_path):
    with open(id_path, encoding="utf-8") as f:
      run_id = f.read().strip()
  else:
    run_id = uuid.uuid4().hex[:16]  # W&B run ids: letters and digits
    with open(id_path, "w", encoding="utf-8") as f:
      f.write(run_id + "\n")
  return wandb.init(project=project, dir=out_dir, id=run_id, resume="allow",
                    name=os.path.basename(os.path.normpath(out_dir)),
                    config=dict(config or {}))


class MetricsWriter:
  """Appends records to metrics.jsonl, TensorBoard and (with `wandb_project`) W&B. Resuming at
  step s drops records after s, so that a run killed after its last checkpoint leaves no
  duplicate steps (W&B keeps what it had: it ignores steps it has already seen)."""

  def __init__(self, out_dir: str, *, resume_step: int = 0, tensorboard: bool = True,
               wandb_project: str | None = None, config: Mapping[str, Any] | None = None):
    os.makedirs(out_dir, exist_ok=True)
    self.path = os.path.join(out_dir, METRICS_FILE)
    kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
    with open(self.path, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    self._file = open(self.path, "a", encoding="utf-8")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      # purge_step hides events after the checkpoint that earlier event files still hold.
      self._tb = SummaryWriter(os.path.join(out_dir, TENSORBOARD_DIR),
                               purge_step=resume_step + 1 if resume_step else None)
    self._wandb = _start_wandb(out_dir, wandb_project, config) if wandb_project else None

  def write(self, record: Mapping[str, Any]) -> None:
    clean = {k: _finite_or_none(v) for k, v in record.items()}
    self._file.write(json.dumps(clean) + "\n")
    self._file.flush()
    step = int(record["step"])
    if self._tb is not None:
      for key, value in _scalars(record).items():
        self._tb.add_scalar(key, value, step)
    if self._wandb is not None:
      self._wandb.log(_scalars(record), step=step)

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()


def _si(value: float | None, unit: str = "") -> str:
  if value is None:
    return "-"
  for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= scale:
      return f"{value / scale:.1f}{suffix}{unit}"
  return f"{value:.1f}{unit}"


class ProgressBar:
  """tqdm bar over optimizer steps: step, loss, tokens/s, MFU; tqdm adds the ETA."""

  def __init__(self, total: int, initial: int, enabled: bool, desc: str | None = None):
    self._bar = None
    if enabled:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

  def update(self, step: int, record: Mapping[str, Any]) -> None:
    if self._bar is None:
      return
    postfix = {"loss": f"{record['loss']:.3f}", "tok/s": _si(record.get("tokens_per_s"))}
    postfix["mfu"] = f"{100 * record['mfu']:.1f}%" if record.get("mfu") is not None else "-"
    if record.get("val_loss") is not None:
      postfix["val"] = f"{record['val_loss']:.3f}"
    self._bar.set_postfix(postfix, refresh=False)
    self._bar.update(step - self._bar.n)  # update (not n=) keeps tqdm's rate and ETA right

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
