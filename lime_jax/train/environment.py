"""What a run ran on: library versions, backend, device, host CPU and the code's commit.

Every start of a run (fresh or resumed) appends one line to `<out_dir>/environment.jsonl`.
Training is bitwise reproducible on one environment, not across them: a new jaxlib or another
host CPU (XLA:CPU compiles for the host's instruction set) changes float rounding, and on tasks
with sharp transitions (MQAR) that moved 120-step runs' final losses by up to 0.12 nats. So a
resume on a different environment warns, and sweeps report which environments their points ran
on (studies/sweep.py).
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import os
import platform
import subprocess
from typing import Any

import jax

ENVIRONMENT_FILE = "environment.jsonl"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")
# The fields whose change can change a run's floats (the commit can too, but is not always a
# numerical change; it is recorded, not compared).
NUMERIC_FIELDS = ("jax", "jaxlib", "backend", "device_kind", "host_cpu", "xla_flags")


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def host_cpu() -> str:
  """The host CPU's model name (/proc/cpuinfo on Linux; platform's name elsewhere)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _git(root: str, *args: str) -> str | None:
  try:
    out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                         timeout=10, check=False)
  except (OSError, subprocess.TimeoutExpired):
    return None
  if out.returncode != 0:
    return None
  return out.stdout.strip() or None


def code_commit() -> str | None:
  """`git describe --always --dirty` of the checkout lime_jax is imported from; None when it
  is not imported from a checkout's top level (an installed wheel, even one installed into a
  virtual environment that lives inside some other repository)."""
  package = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # .../lime_jax
  return _checkout_commit(os.path.dirname(package))


@functools.lru_cache(maxsize=None)
def _checkout_commit(root: str) -> str | None:
  # Read once per process: the checkout may move on while a long sweep runs the code it
  # imported at the start.
  top = _git(root, "rev-parse", "--show-toplevel")
  if top is None or os.path.realpath(top) != root:
    return None
  return _git(root, "describe", "--always", "--dirty")


def describe() -> dict[str, Any]:
  """This process's environment (starts JAX's backend if it is not started yet)."""
  device = jax.devices()[0]
  return {
      "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "python": platform.python_version(),
      **{name.replace("-", "_"): _version(name) for name in PACKAGES},
      "backend": jax.default_backend(),
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "process_count": jax.process_count(),
      "host_cpu": host_cpu(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),  # malloc's (cli/launch.py)
      "commit": code_commit(),
  }


def numeric_signature(env: dict[str, Any]) -> str:
  """A short label of the fields that change floats, e.g. 'jax 0.10.2, jaxlib 0.10.2, cpu (AMD
  EPYC)' (the device kind in place of the host CPU on accelerators)."""
  label = f"jax {env.get('jax')}, jaxlib {env.get('jaxlib')}, {env.get('backend')}"
  kind = env.get("device_kind")
  where = env.get("host_cpu") if env.get("backend") == "cpu" else kind
  label += f" ({where})" if where else ""
  return label + (f", XLA_FLAGS={env['xla_flags']}" if env.get("xla_flags") else "")


def read(out_dir: str) -> list[dict[str, Any]]:
  """The run's environment records, one per start, oldest first; [] for a run without any. A
  line cut short (a process killed while appending) is skipped: it must not stop a resume."""
  path = os.path.join(out_dir, ENVIRONMENT_FILE)
  if not os.path.isfile(path):
    return []
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def changed_fields(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
  """'field: old -> new' for each numeric field that differs."""
  return [f"{key}: {before.get(key)!r} -> {now.get(key)!r}" for key in NUMERIC_FIELDS
          if before.get(key) != now.get(key)]


def record(out_dir: str, start_step: int) -> str | None:
  """Appends this start's environment; returns a one-line warning when the previous start ran
  on a numerically different one (the resumed steps will not equal an uninterrupted run's)."""
  now = {"start_step": start_step, **describe()}
  earlier = read(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, ENVIRONMENT_FILE)
  with open(path, "ab+") as f:  # appends go to the end wherever the reads seek
    if f.seek(0, os.SEEK_END):
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b"\n":  # after a line cut short, start a new one
        f.write(b"\n")
    f.write((json.dumps(now) + "\n").encode("utf-8"))
  if not earlier or start_step == 0:
    return None
  changes = changed_fields(earlier[-1], now)
  if not changes:
    return None
  return (f"warning: {out_dir}: resuming at step {start_step} on a different environment"
          f" ({'; '.join(changes)}); the steps from here are not bitwise those of an"
          " uninterrupted run")
