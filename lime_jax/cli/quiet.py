"""Keeps the terminal for the run itself: every command (and the default job) calls
`quiet_libraries` before it starts."""

from __future__ import annotations

import sys


def quiet_libraries() -> None:
  """orbax logs routine warnings through absl, and its failed reads leave noise (see
  `_quiet_orphaned_reads`)."""
  _quiet_orphaned_reads()
  try:  # absl comes with orbax and jax today, but neither promises it
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    absl_logging.set_verbosity(absl_logging.ERROR)
  except ImportError:
    pass


def _quiet_orphaned_reads() -> None:
  """After a failed orbax read, tensorstore callbacks still fire into orbax's closed event loop;
  Python would print each as an ignored exception after our one-line message."""
  previous = sys.unraisablehook

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      return
    previous(unraisable)

  sys.unraisablehook = hook
