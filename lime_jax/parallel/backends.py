"""Which JAX backends a command may start: a CPU-only machine with libtpu installed (for
`--topology` compiles) must behave as one without it.

With libtpu importable and JAX_PLATFORMS unset, JAX's first device query starts the TPU backend,
which on a machine without TPUs waits for cloud metadata and prints several error lines before
falling back to the CPU. `avoid_absent_tpu` runs first in every command and, only when libtpu is
installed but no TPU chip (and no CUDA plugin, whose GPU JAX should still find) is there,
restricts JAX to the CPU. An explicit JAX_PLATFORMS always wins. Compiling for a TPU topology needs no TPU
backend: libtpu is loaded as a compiler only (parallel/topology.py).
"""

from __future__ import annotations

import glob
import importlib.util
import os

import jax

# Device files a TPU VM exposes (v2-v4: /dev/accel*; v5e and later: VFIO groups).
TPU_DEVICE_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*")
CUDA_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin")


def _installed(module: str) -> bool:
  return importlib.util.find_spec(module) is not None


def tpu_attached() -> bool:
  return any(glob.glob(pattern) for pattern in TPU_DEVICE_FILES)


def avoid_absent_tpu() -> str | None:
  """Restricts JAX to the CPU when libtpu is installed but no TPU chip is attached (and no
  CUDA plugin is installed); returns "cpu" then, or None when it leaves JAX alone."""
  if (os.environ.get("JAX_PLATFORMS") or not _installed("libtpu") or tpu_attached()
      or any(_installed(p) for p in CUDA_PLUGINS)):
    return None
  os.environ["JAX_PLATFORMS"] = "cpu"  # for child processes (sweeps, launches)
  jax.config.update("jax_platforms", "cpu")
  return "cpu"
