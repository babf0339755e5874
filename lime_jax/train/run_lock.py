"""One training process per `run.out_dir`: a lock file that names its holder.

`<out_dir>/run.lock` is held with an exclusive `fcntl.flock` for the whole run, and holds the
holder's host, pid and start time as JSON. A second `lime-jax train` on the same out_dir (a
resubmitted job while the first still runs) fails to take the lock and stops with a one-line
`RunLockedError` naming the holder, before it writes anything.

A stale lock cannot block: the kernel drops a flock when its holder's file descriptor closes,
which happens however the process ends (exit, exception, SIGKILL, OOM kill). So the lock is
held exactly while the holding process is alive; the JSON left by a dead holder is only text,
overwritten by the next run. No pid probing, so a recycled pid cannot fake a live holder. On a
shared filesystem the lock is as good as its flock: NFSv4 and Lustre mounted with `flock` lock
across hosts (a dead host's lock goes when its lease expires); a filesystem without locks
(e.g. a bucket mount) gives no protection.

Releasing removes the file. A taker checks that the file it locked is still the one at the path
(same inode), so a process that opened the file just before its holder removed it cannot end up
holding a lock on a file that no longer exists.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from typing import Any

LOCK_FILE = "run.lock"


class RunLockedError(ValueError):
  """Another live process holds the out_dir; the message names it."""


def lock_path(out_dir: str) -> str:
  return os.path.join(out_dir, LOCK_FILE)


def holder_record() -> dict[str, Any]:
  """What a holder writes into the lock file: enough to find the process."""
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


class RunLock:
  """The held lock of one out_dir; `release` (or a `with` block) gives it back."""

  def __init__(self, path: str, fd: int):
    self.path = path
    self._fd: int | None = fd

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.unlink(self.path)  # while still locked: a taker then re-checks the inode and retries
    except FileNotFoundError:
      pass
    os.close(self._fd)  # drops the flock
    self._fd = None

  def __enter__(self) -> "RunLock":
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def acquire(out_dir: str) -> RunLock:
  """Takes `out_dir`'s lock (creating out_dir), or raises RunLockedError naming the holder."""
  os.makedirs(out_dir, exist_ok=True)
  path = lock_path(out_dir)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      raise RunLockedError(
          f"run.out_dir: {out_dir} is in use by another training process ({_describe(holder)};"
          f" lock {path}); wait for it to end or stop it, or choose another run.out_dir") from None
    except BaseException:
      os.close(fd)
      raise
    try:
      same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same_file = False
    if not same_file:  # its holder removed it after we opened it: take the new file
      os.close(fd)
      continue
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(holder_record()) + "\n").encode("utf-8"))
    os.fsync(fd)
    return RunLock(path, fd)


def _read_holder(fd: int) -> dict[str, Any] | None:
  try:
    text = os.pread(fd, 4096, 0).decode("utf-8")
    holder = json.loads(text)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError):
    return None  # the holder is between taking the lock and writing its record
  return holder if isinstance(holder, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
  if holder is None:
    return "a holder that has not written its host and pid yet"
  return (f"pid {holder.get('pid')} on host {holder.get('host')}, since"
          f" {holder.get('since')}")
