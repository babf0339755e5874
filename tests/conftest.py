"""Test-wide JAX settings; they must be in place before JAX starts.

Environment variables (not only jax.config) so subprocesses that tests start agree.
Compile time dominates this suite (tiny models, many programs): the rbg PRNG and LLVM at -O0
cut it several-fold on CPU. Tests need reproducibility only within one JAX version, and
memory_analysis comes from XLA's buffer assignment, which the LLVM level does not change.
XLA:CPU's older fusion emitters and unsplit code generation halve it again (the whole suite,
one host, one hour: 36 -> 19 min on 2 cores). The emitters move a few bytes of buffer
assignment (192 of 289 KB in a small gradient), so checks of a compiled CPU program's structure
or memory compile as users' programs do (model_checks.compiled_as_users).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")
# Each added unless XLA_FLAGS sets it already. The last: 8 fake CPU devices for the sharding
# tests (tests/test_sharding.py). Everything else still runs on one: jit places unsharded work
# on device 0, and the default mesh is one device.
for flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false",
             "--xla_cpu_parallel_codegen_split_count=1",
             "--xla_force_host_platform_device_count=8"):
  if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env():
  """The child process gets this process's numerics settings (set above)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             JAX_NUMPY_RANK_PROMOTION=str(jax.config.jax_numpy_rank_promotion))
  if jax.config.jax_default_matmul_precision is not None:
    env["JAX_DEFAULT_MATMUL_PRECISION"] = str(jax.config.jax_default_matmul_precision)
  return env


# Tests of optional integrations (transformers parity, lm-evaluation-harness, W&B) carry
# @pytest.mark.integration and skip without their package. `make test` installs them all and
# sets LIME_JAX_REQUIRE_INTEGRATIONS=1: a skip there is a failure, and the log lists their outcomes.
REQUIRE_INTEGRATIONS = os.environ.get("LIME_JAX_REQUIRE_INTEGRATIONS") == "1"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
  report = yield
  if REQUIRE_INTEGRATIONS and report.skipped and item.get_closest_marker("integration"):
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = (f"integration test skipped, but LIME_JAX_REQUIRE_INTEGRATIONS=1"
                       f" (make test installs its package): {reason}")
  return report


def pytest_terminal_summary(terminalreporter):
  seen = {}
  for outcome in ("passed", "failed", "skipped", "error"):
    for report in terminalreporter.stats.get(outcome, []):
      if "integration" in getattr(report, "keywords", {}) and (
          report.when == "call" or outcome != "passed"):
        seen[report.nodeid] = outcome.upper()
  if seen:
    terminalreporter.write_sep("-", "optional integrations")
    for nodeid, outcome in sorted(seen.items()):
      terminalreporter.write_line(f"{outcome} {nodeid}")
