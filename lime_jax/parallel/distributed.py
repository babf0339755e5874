"""Multi-host start-up: JAX's own multi-controller runtime (`jax.distributed`), nothing more.

Every host runs the same `lime-jax train` command (its flags: lime_jax/cli/train.py). Which
processes form one job comes from, in this order:

1. explicit settings: `--coordinator HOST:PORT --num-processes N --process-id I` (or the
   environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); all three
   are required together;
2. `--distributed`: JAX detects the cluster itself (Cloud TPU pod slices, SLURM, Open MPI);
3. a SLURM step with more than one task (`srun` sets SLURM_NTASKS > 1): as 2;
4. otherwise a single process, and jax.distributed is not started.

It must run before anything starts JAX's backends. CPU-only jobs (tests, the two-process check)
need cross-process CPU collectives, so gloo is switched on first; accelerators ignore it.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Mapping

import jax

ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}
FLAGS = {"coordinator": "--coordinator", "num_processes": "--num-processes",
         "process_id": "--process-id"}


def settings(args: argparse.Namespace, environ: Mapping[str, str] | None = None
             ) -> dict[str, Any] | None:
  """Keyword arguments for jax.distributed.initialize, {} to auto-detect, None for one process."""
  environ = os.environ if environ is None else environ
  values = {}
  for key, var in ENV.items():
    value = getattr(args, key, None)
    if value is None and environ.get(var):
      value = environ[var]
    values[key] = value
  given = [k for k, v in values.items() if v is not None]
  if given:
    missing = [FLAGS[k] for k in ENV if values[k] is None]
    if missing:
      raise ValueError(f"distributed: {FLAGS[given[0]]} needs {' and '.join(missing)} too"
                       f" (or {', '.join(ENV[k] for k in ENV if values[k] is None)})")
    num, pid = _int(values, "num_processes"), _int(values, "process_id")
    if num < 1 or not 0 <= pid < num:
      raise ValueError(f"distributed: --process-id must be in [0, {num}), got {pid}")
    if ":" not in str(values["coordinator"]):
      raise ValueError(f"distributed: --coordinator must be HOST:PORT, got {values['coordinator']!r}")
    return {"coordinator_address": str(values["coordinator"]), "num_processes": num,
            "process_id": pid}
  if getattr(args, "distributed", False):
    return {}
  if int(environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in environ:
    return {}
  return None


def _int(values: Mapping[str, Any], key: str) -> int:
  try:
    return int(values[key])
  except (TypeError, ValueError):
    raise ValueError(f"distributed: {FLAGS[key]} must be an integer, got {values[key]!r}") from None


def initialize(kwargs: dict[str, Any] | None) -> bool:
  """Starts jax.distributed (True) unless `kwargs` is None (one process, False)."""
  if kwargs is None:
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  return True
