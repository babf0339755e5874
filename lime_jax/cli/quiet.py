"""Keeps the terminal for the run itself: every command (and the default job) calls
`quiet_libraries` before it starts."""

from __future__ import annotations

import logging
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


# What asyncio logs for a task or future whose exception nobody retrieved, once it is collected.
UNRETRIEVED = ("Task exception was never retrieved", "Future exception was never retrieved")


def _quiet_orphaned_reads() -> None:
  """After a failed orbax read, tensorstore callbacks still fire into orbax's closed event loop,
  and the read's sibling tasks fail on the same damage with nobody to retrieve their errors:
  Python would print each as an ignored exception, and asyncio log each with its traceback,
  after our one-line message (depending on when the tasks are collected). The library's own
  code runs no asyncio."""
  logging.getLogger("asyncio").addFilter(
      lambda record: not str(record.msg).startswith(UNRETRIEVED))
  previous = sys.unraisablehook

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      return
    previous(unraisable)

  sys.unraisablehook = hook
