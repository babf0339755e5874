"""TPU slices on any machine: the devices of a named topology (`v5p:2x2x1`, `v4:2x2x1`,
`v5e:2x2`, `v6e:2x2`, ...) for ahead-of-time compiles with the TPU compiler, and the published
per-chip figures the roofline uses.

libtpu (the optional `tpu` extra) is loaded as a compiler only: nothing runs, no TPU is needed,
and JAX's own backend stays the CPU (backends.py). The compiled program's `memory_analysis()`
is then the TPU compiler's buffer assignment and its `cost_analysis()` its FLOPs, bytes and step
estimate, per device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import tempfile

from jax.experimental import topologies

from lime_jax.errors import one_line

INSTALL_HINT = "pip install 'lime_jax[tpu]' (or 'jax[tpu]'), which brings libtpu"
_NAME = re.compile(r"^(v4|v5p|v5e|v6e):(\d+(?:x\d+){1,2})$")


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures: dense bf16 peak, HBM bandwidth and capacity."""

  peak_flops: float
  hbm_bytes_per_s: float
  hbm_bytes: float


# Google Cloud TPU documentation (system architecture pages), per chip.
CHIPS = {
    "v4": Chip(275e12, 1228e9, 32 * 2**30),
    "v5e": Chip(197e12, 819e9, 16 * 2**30),
    "v5p": Chip(459e12, 2765e9, 95 * 2**30),
    "v6e": Chip(918e12, 1640e9, 32 * 2**30),
}


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU topology: its devices (as JAX reports them) and the figures of one device."""

  name: str
  devices: tuple
  chip: Chip
  chips: int

  @property
  def devices_per_chip(self) -> int:
    return max(1, len(self.devices) // self.chips)

  @property
  def device_peak_flops(self) -> float:
    return self.chip.peak_flops / self.devices_per_chip

  @property
  def device_hbm_bytes_per_s(self) -> float:
    return self.chip.hbm_bytes_per_s / self.devices_per_chip

  @property
  def device_hbm_bytes(self) -> float:
    return self.chip.hbm_bytes / self.devices_per_chip

  def roofline_s(self, flops: float, bytes_accessed: float) -> float:
    """max(flops / peak, bytes / HBM bandwidth) of one device: the step cannot be faster."""
    return max(flops / self.device_peak_flops, bytes_accessed / self.device_hbm_bytes_per_s)


def check_name(name: str) -> tuple[str, int]:
  """(chip generation, number of chips) of a topology name; one-line ValueError otherwise."""
  match = _NAME.match(name)
  if not match:
    raise ValueError(f"--topology: expected <chip>:<AxB[xC]> with chip in {sorted(CHIPS)},"
                     f" e.g. v5p:2x2x1 or v5e:2x2; got {name!r}")
  return match.group(1), math.prod(int(n) for n in match.group(2).split("x"))


def tpu_slice(name: str) -> Slice:
  """The devices of topology `name`, via libtpu; ValueError naming the fix without it."""
  generation, chips = check_name(name)
  if importlib.util.find_spec("libtpu") is None:
    raise ValueError(f"--topology {name}: needs libtpu, which is not installed: {INSTALL_HINT}")
  # libtpu looks for a TPU VM's metadata and prints what it misses: none of it matters to a
  # compile-only topology, so its stderr is shown only when the lookup fails.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # Compile-only: several processes (a sweep's, parallel tests) may load libtpu at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  with _stderr_kept_on_error() as kept:
    try:
      devices = topologies.get_topology_desc(platform="tpu", topology_name=name).devices
    except Exception as err:  # JaxRuntimeError and friends; one line for the user
      raise ValueError(f"--topology {name}: libtpu refused it: {one_line(err, 300)}"
                       f"{kept()}") from None
  return Slice(name, tuple(devices), CHIPS[generation], chips)


@contextlib.contextmanager
def _stderr_kept_on_error():
  """Sends file descriptor 2 to a temporary file; yields a function giving its last line."""
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as sink:
    os.dup2(sink.fileno(), 2)
    def last_line() -> str:
      sink.seek(0)
      lines = [l for l in sink.read().decode(errors="replace").splitlines() if l.strip()]
      return f" ({one_line(lines[-1], 200)})" if lines else ""
    try:
      yield last_line
    finally:
      os.dup2(saved, 2)
      os.close(saved)
