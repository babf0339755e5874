"""`lime-jax bench`: memory, FLOPs, compile and step time of a train step vs depth, baseline vs
LIMe and the other cross-layer methods (lime_jax/studies/bench.py says what each number is)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os

from lime_jax.cli import glibc_tunables
from lime_jax.config import CONNECTIONS, ROUTERS
from lime_jax.parallel import topology
from lime_jax.studies import torch_reference
from lime_jax.studies.bench import (TORCH_LLAMA, bench_decode, finish_point, format_tables,
                                    prepare_point, ratio_rows, time_rounds, topology_point,
                                    topology_table, torch_table, variant_config)
from lime_jax.train import environment


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--depths", default="8,16,32,64,128", help="comma-separated layer counts")
  parser.add_argument("--routers", default="none,kv-static",
                      help=f"comma-separated variants: a router ({', '.join(ROUTERS)}) or a"
                           f" cross-layer baseline ({', '.join(CONNECTIONS[1:])}), each optionally"
                           " with :key=value model overrides, e.g. kv-static:router_window=4")
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--kv-heads", type=int, default=4)
  parser.add_argument("--mlp", type=int, default=1024)
  parser.add_argument("--vocab", type=int, default=256, help="256 = byte vocabulary")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--steps", type=int, default=3,
                      help="timed steps per point (median), in as many rounds: each round runs"
                           " one step of every variant at the depth (PyTorch's Llama's too)")
  parser.add_argument("--sequential", action="store_true",
                      help="time each point on its own, one after the other, instead of in"
                           " rounds (holds one compiled point at a time; PyTorch's after ours)")
  parser.add_argument("--remat", default="none")
  parser.add_argument("--decode", action="store_true",
                      help="also time greedy cached decoding (--length/2 prompt tokens, then"
                           " --decode-tokens new ones) and report the KV cache's bytes")
  parser.add_argument("--decode-tokens", type=int, default=64)
  parser.add_argument("--topology", default=None,
                      help="a TPU slice (e.g. v5p:2x2x1): compile each point with the TPU"
                           " compiler (fsdp over the slice, --batch is global) instead of running"
                           " it on the CPU; needs libtpu: pip install 'lime_jax[tpu]'")
  parser.add_argument("--against-torch", action="store_true",
                      help="also time transformers' LlamaForCausalLM (PyTorch, float32, AdamW) at"
                           " each depth's baseline shape, in a process of its own, and report"
                           " ours/PyTorch step ratios; needs pip install 'lime_jax[hf]'")
  parser.add_argument("--json", default=None, help="write the records to this JSON file")


def _parse_ints(text: str, flag: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None
  if not values or min(values) < 1:
    raise ValueError(f"{flag} needs positive integers, got {text!r}")
  return values


def _time_depth(args: argparse.Namespace, depth: int, routers: list[str],
                shape: dict[str, int]) -> list[dict]:
  """The depth's variants on this CPU: compiled, then timed in rounds, PyTorch's Llama among
  them in a worker process of its own (studies/torch_reference.py); with --sequential each
  point on its own, and PyTorch's after ours in a process of its own."""
  records, ready = [], []
  for router in routers:
    cfg = variant_config(router, L=depth, remat_policy=args.remat, **shape)
    point = prepare_point(cfg, args.batch)
    point.record.update(router=router, _cfg=cfg)  # the variant's label
    if args.sequential:
      (times,) = time_rounds([point], args.steps)
      records.append(finish_point(point, times, "sequential"))
    else:
      ready.append(point)
  llama_cfg = variant_config("none", L=depth, **shape)
  with contextlib.ExitStack() as stack:
    torch_worker = None
    if args.against_torch and not args.sequential:  # started after our compiles: not beside them
      torch_worker = stack.enter_context(
          torch_reference.LlamaApart(llama_cfg, args.batch, _torch_env()))
      ready.append(torch_worker.point)
    if ready:
      records = [finish_point(point, times, "interleaved")
                 for point, times in zip(ready, time_rounds(ready, args.steps))]
    if torch_worker is not None:
      records[-1]["environment"] = torch_worker.worker_environment()
  if args.against_torch and args.sequential:
    records.append(torch_reference.llama_step_point_apart(llama_cfg, args.batch, args.steps,
                                                          _torch_env()))
  for record in records:
    if record["router"] == TORCH_LLAMA:
      print(f"router={record['router']} depth={depth:4d} step={record['step_s']:7.3f} s",
            flush=True)
      continue
    if args.decode:
      record.update(bench_decode(record["_cfg"], args.batch, args.length // 2,
                                 args.decode_tokens))
      print(f"router={record['router']:9s} depth={depth:4d}"
            f" decode={record['decode_tokens_per_s']:8.1f} tokens/s"
            f" cache={record['cache_bytes'] / 2**20:7.2f} MiB", flush=True)
    print(f"router={record['router']:9s} depth={depth:4d}"
          f" temp={record['temp_bytes'] / 2**20:9.1f} MiB flops={record['flops'] / 1e9:9.2f} G"
          f" compile={record['compile_s']:6.2f} s step={record['step_s']:7.3f} s", flush=True)
  return records


def _torch_env() -> dict[str, str]:
  """PyTorch's process runs with glibc's default malloc: the transparent huge pages this
  command's launcher asks for (cli/launch.py), which make our steps 7-12% faster, made its
  16-layer step take 1.09 against 0.55 s (README, "Against PyTorch")."""
  env = dict(os.environ)
  tunables = glibc_tunables.without_huge_pages(env.pop("GLIBC_TUNABLES", None))
  if tunables:
    env["GLIBC_TUNABLES"] = tunables
  return env


def run(args: argparse.Namespace) -> int:
  depths = _parse_ints(args.depths, "--depths")
  routers = [r.strip() for r in args.routers.split(",") if r.strip()]
  if args.against_torch and args.topology is not None:  # said before libtpu is looked for
    raise ValueError("--against-torch times steps on this CPU; it does not combine with --topology")
  tpu = topology.tpu_slice(args.topology) if args.topology is not None else None
  shape = dict(V=args.vocab, D=args.width, H=args.heads, R=args.kv_heads, F=args.mlp,
               T=args.length)
  if tpu is None:
    env = environment.describe()
    print(f"host {env['host_cpu']}, jax {env['jax']}, jaxlib {env['jaxlib']},"
          f" commit {env['commit']}, XLA_FLAGS {env['xla_flags'] or '(none)'},"
          f" GLIBC_TUNABLES {env['glibc_tunables'] or '(none)'}", flush=True)
  records = []
  for depth in depths:
    if tpu is not None:
      for router in routers:
        cfg = variant_config(router, L=depth, remat_policy=args.remat, **shape)
        record = dict(topology_point(cfg, tpu, args.batch), router=router)
        print(f"router={router:9s} depth={depth:4d} {tpu.name}: HBM"
              f" {record['per_device_bytes'] / 2**30:.3f} GiB, compiler step"
              f" {record['compiler_step_s']:.4g} s, roofline {record['roofline_step_s']:.4g} s"
              f" (compiled in {record['compile_s']:.1f} s)", flush=True)
        records.append(record)
      continue
    records += _time_depth(args, depth, routers, shape)
  print()
  if tpu is not None:
    print(topology_table(records))
  else:
    print(format_tables(records, ratio_rows(records, args.batch)))
    if args.against_torch:
      print("\n" + torch_table(records))
  if args.json:
    with open(args.json, "w") as f:
      json.dump([{k: v for k, v in r.items() if not k.startswith("_")} for r in records], f,
                indent=1)
  return 0
