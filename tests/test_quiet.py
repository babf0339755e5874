"""The commands' quieting of library noise (cli/quiet.py)."""

import os
import subprocess
import sys
import textwrap

import pytest

# A task that fails with nobody to retrieve its error, collected after its loop closed: what
# orbax's sibling reads of a damaged checkpoint leave behind.
_ORPHANED_FAILURE = textwrap.dedent("""
    import asyncio, gc, sys
    from lime_jax.cli import quiet
    if sys.argv[1] == "quiet":
      quiet.quiet_libraries()
    async def read():
      raise ValueError("DATA_LOSS: damaged")
    loop = asyncio.new_event_loop()
    task = loop.create_task(read())
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()
    del task
    gc.collect()
    print("lime-jax eval: the one line", file=sys.stderr)
""")


@pytest.mark.parametrize("mode", ["quiet", "plain"])
def test_unretrieved_task_errors_are_not_printed(mode):
  proc = subprocess.run([sys.executable, "-c", _ORPHANED_FAILURE, mode],
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                        text=True, timeout=120, check=True)
  if mode == "quiet":
    assert proc.stderr == "lime-jax eval: the one line\n", proc.stderr
  else:  # what the filter removes is there without it
    assert "Task exception was never retrieved" in proc.stderr, proc.stderr
