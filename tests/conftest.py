"""Test-wide JAX settings; they must be in place before JAX starts.

Environment variables (not only jax.config) so subprocesses that tests start agree.
Compile time dominates this suite (tiny models, many programs): the rbg PRNG and LLVM at -O0
cut it several-fold on CPU. Tests need reproducibility only within one JAX version, and
memory_analysis comes from XLA's buffer assignment, which the LLVM level does not change.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()
# 8 fake CPU devices for the sharding tests (tests/test_sharding.py). Everything else still
# runs on one: jit places unsharded work on device 0, and the default mesh is one device.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ["XLA_FLAGS"]
                             + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

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
