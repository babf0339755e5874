"""glibc's GLIBC_TUNABLES, as the console script (launch.py) and the PyTorch yardstick
(`bench --against-torch`) set them: malloc's transparent huge pages on or off. Standard library
only: the launcher reads it before anything heavy is imported."""

from __future__ import annotations

import os
import sys

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"


def _entries(tunables: str | None) -> list[str]:
  """GLIBC_TUNABLES' `name=value` entries (a colon-separated list, empty ones dropped)."""
  return [entry for entry in (tunables or "").split(":") if entry]


def _names_huge_pages(entry: str) -> bool:
  return entry.split("=", 1)[0] == HUGE_PAGES_TUNABLE


def with_huge_pages(tunables: str | None) -> str | None:
  """GLIBC_TUNABLES with malloc's transparent huge pages on, keeping its other entries; None
  where it names the tunable already."""
  entries = _entries(tunables)
  if any(map(_names_huge_pages, entries)):
    return None
  return ":".join([*entries, f"{HUGE_PAGES_TUNABLE}=1"])


def without_huge_pages(tunables: str | None) -> str:
  """GLIBC_TUNABLES without the tunable (glibc's default), keeping its other entries."""
  return ":".join(entry for entry in _entries(tunables) if not _names_huge_pages(entry))


def glibc_malloc() -> bool:
  """Whether this process runs on Linux with glibc (whose malloc reads the tunables)."""
  try:
    return sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
  except (ValueError, OSError, AttributeError):  # no such name here, or no glibc
    return False
