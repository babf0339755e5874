"""Probe (not library code): the GPU compiler's memory for the train step, without a GPU.

XLA's GPU compiler runs deviceless when given a target config (the device's description) in
place of a device: `jax.experimental.topologies.get_topology_desc(platform="cuda",
target_config=..., topology="1x1x1")`. The compiled step's `memory_analysis()` is then the GPU
compiler's own buffer assignment for that device. Its `cost_analysis()` came back empty here
(jax 0.10.2), so this gives memory only, no bytes or step estimate.

Needs JAX's CUDA plugin, which the project does not install (several GB of NVIDIA wheels): in a
virtual environment of its own,

    python3 -m venv /tmp/gpuenv && /tmp/gpuenv/bin/pip install 'jax[cuda12]==0.10.2'
    PYTHONPATH=.:.venv/lib/python3.11/site-packages /tmp/gpuenv/bin/python \
        experiments/probes/gpu_compiler_memory.py CONFIG [overrides ...]

(the project's own packages from its .venv, JAX and the plugin from the new one, same jax
version). Prints the step's memory on one H100 SXM (80 GB), the mesh one device.
"""

import sys

import jax

jax.config.update("jax_platforms", "cpu")  # the compiler only: no GPU here

from jax.experimental import topologies  # noqa: E402

from lime_jax.train import plan as plan_lib  # noqa: E402
from lime_jax.train.experiment import load_experiment  # noqa: E402

GIB = 2 ** 30

# NVIDIA H100 SXM 80 GB, from its published specification: 132 SMs at 1.98 GHz, compute
# capability 9.0, 3.35 TB/s of HBM3, 50 MiB of L2, 228 KiB of shared memory per SM.
H100_SXM_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def main() -> None:
  config, *overrides = sys.argv[1:]
  gpu = topologies.get_topology_desc(platform="cuda", target_config=H100_SXM_TARGET,
                                     topology="1x1x1")
  cfg = load_experiment(config, ["mesh.data=1", "mesh.fsdp=1", *overrides])
  plan = plan_lib.compile_on(cfg, list(gpu.devices))
  print(f"{config} {' '.join(overrides)}: {plan.per_device_bytes / GIB:.2f} GiB on one H100"
        f" ({plan_lib.breakdown(plan)}), compiled in {plan.compile_s:.1f} s")


if __name__ == "__main__":
  main()
