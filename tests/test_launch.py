"""The console script's start (cli/launch.py): once more with glibc's transparent huge pages for
malloc, in the same process, keeping what the user set."""

import os
import subprocess
import sys

import pytest

from lime_jax.cli import glibc_tunables, launch
from conftest import REPO, child_env

GLIBC = glibc_tunables.glibc_malloc()
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode() -> str | None:
  """The kernel's transparent huge page mode (the bracketed word), None where unknown."""
  try:
    with open(THP_MODE_FILE, encoding="ascii") as f:
      return next(word[1:-1] for word in f.read().split() if word.startswith("["))
  except (OSError, StopIteration):
    return None


# In the child: restart, then report its process id, its tunables and how many KiB of
# transparent huge pages a 64 MiB malloc, touched, got (AnonHugePages before and after).
_PROBE = """
import ctypes, os
from lime_jax.cli import launch
launch.restart_with_huge_pages()
def huge_kib():
  with open("/proc/self/smaps_rollup") as f:
    return int(next(line for line in f if line.startswith("AnonHugePages")).split()[1])
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
before = huge_kib()
block = libc.malloc(64 << 20)
ctypes.memset(block, 1, 64 << 20)
print(os.getpid(), os.environ.get("GLIBC_TUNABLES"), huge_kib() - before)
"""


def _probe(tunables: str | None) -> tuple[int, list[str]]:
  env = {k: v for k, v in child_env().items() if k != "GLIBC_TUNABLES"}
  if tunables is not None:
    env["GLIBC_TUNABLES"] = tunables
  child = subprocess.Popen([sys.executable, "-c", _PROBE], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
  out, err = child.communicate(timeout=120)
  assert child.returncode == 0, err
  return child.pid, out.splitlines()


@pytest.mark.skipif(not GLIBC, reason="glibc on Linux only")
def test_the_script_restarts_itself_once_in_place_with_huge_pages():
  pid, lines = _probe(None)
  assert len(lines) == 1, lines  # the first start was replaced before it printed
  child_pid, tunables, huge_kib = lines[0].split()
  assert int(child_pid) == pid  # exec, not a child process
  assert tunables == "glibc.malloc.hugetlb=1"
  if _thp_mode() in ("madvise", "always"):  # the kernel grants them: malloc's block got some
    assert int(huge_kib) > 0, lines


@pytest.mark.skipif(not GLIBC, reason="glibc on Linux only")
def test_a_user_setting_is_kept_and_opts_out():
  _, lines = _probe("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0")
  assert len(lines) == 1, lines
  _, tunables, huge_kib = lines[0].split()
  assert tunables == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0"
  if _thp_mode() == "madvise":  # only madvised memory gets them: this is what the tunable adds
    assert int(huge_kib) == 0, lines


def test_main_called_from_python_never_restarts(monkeypatch):
  """Tests and notebooks call main(argv): only the script's entry restarts."""
  calls = []
  monkeypatch.setattr(launch.os, "execv", lambda *args: calls.append(args))
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  from lime_jax.cli import main
  with pytest.raises(SystemExit):
    main.main(["--help"])
  assert calls == []
  assert "GLIBC_TUNABLES" not in os.environ
