"""The `lime-jax` console script and `python -m lime_jax`: the process's allocator setting, then
the command line (main.py).

XLA:CPU allocates a step's temporaries afresh at every call, and glibc serves blocks over 32 MiB
from fresh mappings, so every step faults its temporaries in 4 KiB at a time (a fifth of the
bench's 16-layer CPU step in `perf`; README, "Against PyTorch"). glibc's tunable
`glibc.malloc.hugetlb=1` has malloc ask for transparent huge pages on those mappings (madvise,
which kernels in the `madvise` and `always` modes grant), 2 MiB a fault: the bench's baseline
step 7-12% faster on the project's machine (16 and 64 layers), at the same resident memory.
glibc reads its tunables only when a process starts, so the script starts itself once more with
the tunable added to GLIBC_TUNABLES (same process id, arguments and interpreter options), before
anything heavy is imported. A GLIBC_TUNABLES that names the tunable already is left alone
(`hugetlb=0` opts out); systems other than Linux with glibc run unchanged. `main(argv)` called
from Python never restarts its caller.
"""

from __future__ import annotations

import os
import sys

from lime_jax.cli.glibc_tunables import glibc_malloc, with_huge_pages


def restart_with_huge_pages() -> None:
  """Replaces this process by the same command with the tunable set, where glibc runs it and
  the tunable is not set yet; returns where nothing is to be done or the restart fails."""
  tunables = with_huge_pages(os.environ.get("GLIBC_TUNABLES"))
  if tunables is None or not glibc_malloc() or not sys.executable or not sys.orig_argv:
    return
  previous = os.environ.get("GLIBC_TUNABLES")
  os.environ["GLIBC_TUNABLES"] = tunables
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execv(sys.executable, sys.orig_argv)
  except OSError:  # run on as we are, and leave the environment as it was
    if previous is None:
      del os.environ["GLIBC_TUNABLES"]
    else:
      os.environ["GLIBC_TUNABLES"] = previous


def entry() -> None:
  restart_with_huge_pages()
  from lime_jax.cli.main import main  # after the restart: jax and flax take 1.6 s to import
  sys.exit(main())
