"""`lime-jax bench --against-torch`: PyTorch Llama timed at our baseline's shape."""

import io
import json
import os
import subprocess
import sys

import pytest

from lime_jax.cli.main import main
from lime_jax.model import flops
from lime_jax.studies import bench, torch_reference
from conftest import child_env

TINY = ["--depths", "2", "--width", "32", "--heads", "2", "--kv-heads", "2", "--mlp", "64",
        "--vocab", "64", "--batch", "2", "--length", "16", "--steps", "1"]


@pytest.mark.integration
def test_llama_has_our_baselines_shape():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  for tied in (False, True):
    cfg = bench.variant_config("none", V=64, D=32, L=3, H=4, R=2, F=48, T=16,
                               tie_embeddings=tied)
    model = torch_reference.llama_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == flops.total_params(cfg)


@pytest.mark.integration
def test_bench_against_torch_reports_ours_over_pytorch(tmp_path, capsys, monkeypatch):
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  # As the launcher leaves it (cli/launch.py): PyTorch's process must run without huge pages.
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1")
  out = tmp_path / "bench.json"
  assert main(["bench", *TINY, "--steps", "3", "--against-torch", "--json", str(out)]) == 0
  records = json.loads(out.read_text())
  assert [r["router"] for r in records] == ["none", "kv-static", bench.TORCH_LLAMA]
  theirs = records[-1]
  assert set(theirs) == set(bench.RECORD_KEYS) and theirs["depth"] == 2
  assert len(theirs["step_times"]) == 3 and min(theirs["step_times"]) > 0
  assert theirs["environment"]["torch"] == torch.__version__
  # Timed in a process of its own, with glibc's default malloc; ours kept the setting.
  assert theirs["environment"]["glibc_tunables"] == "glibc.malloc.arena_max=4"
  assert records[0]["environment"]["glibc_tunables"] == (
      "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1")
  printed = capsys.readouterr().out
  table = printed[printed.index("| router | depth | step s | PyTorch Llama step s"):]
  ours = records[0]
  # PyTorch's steps run in our rounds: the median of the per-round ratios, and their range.
  assert ours["timing"] == theirs["timing"] == "interleaved"
  ratios = sorted(m / t for m, t in zip(ours["step_times"], theirs["step_times"]))
  assert f"| none | 2 | {ours['step_s']:.3f} | {theirs['step_s']:.3f} |" \
         f" {ratios[1]:.3f} | {ratios[0]:.3f}-{ratios[2]:.3f} |" in table
  assert "| kv-static | 2 |" in table
  # PyTorch's record stays out of the method/baseline ratios.
  tables = printed[printed.index("| router |"):printed.index("| router | depth | step s |")]
  assert "| none | 2 |" in tables and bench.TORCH_LLAMA not in tables


@pytest.mark.integration
def test_sequential_times_pytorch_after_ours(tmp_path, capsys):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  out = tmp_path / "bench.json"
  assert main(["bench", *TINY, "--routers", "none", "--sequential", "--against-torch",
               "--json", str(out)]) == 0
  ours, theirs = json.loads(out.read_text())
  assert theirs["router"] == bench.TORCH_LLAMA
  # Each timed on its own: the ratio of the medians, no range.
  assert ours["timing"] == theirs["timing"] == "sequential"
  assert f"| none | 2 | {ours['step_s']:.3f} | {theirs['step_s']:.3f} |" \
         f" {ours['step_s'] / theirs['step_s']:.3f} |  |" in capsys.readouterr().out


def _llama_request(cfg, batch: int = 2, seed: int = 0) -> str:
  return json.dumps({"model": cfg.to_dict(), "batch": batch, "seed": seed}) + "\n"


@pytest.mark.integration
def test_the_worker_replies_one_json_line_per_command():
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  cfg = bench.variant_config("none", V=64, D=32, L=2, H=2, R=2, F=64, T=16)
  replies = io.StringIO()
  torch_reference.serve_llama_steps(io.StringIO(_llama_request(cfg) + "step\nstep\ndescribe\n"),
                                    replies)
  ready, *steps, described = [json.loads(line) for line in replies.getvalue().splitlines()]
  assert ready == {"ready": True}
  assert len(steps) == 2 and all(s["step_s"] > 0 and s["finite"] for s in steps)
  assert described["environment"]["torch"] == torch.__version__
  with pytest.raises(ValueError, match="unknown command 'bogus'"):
    torch_reference.serve_llama_steps(io.StringIO(_llama_request(cfg) + "bogus\n"), io.StringIO())


def test_against_torch_refuses_a_topology(capsys):
  with pytest.raises(SystemExit) as err:
    main(["bench", *TINY, "--against-torch", "--topology", "v5p:2x2x1"])
  assert err.value.code == 2
  stderr = capsys.readouterr().err
  assert stderr.startswith("lime-jax bench: ") and "--against-torch" in stderr
  assert stderr.count("\n") == 1


def test_without_torch_the_error_says_how_to_get_it(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
  cfg = bench.variant_config("none", V=64, D=32, L=2, H=2, R=2, F=64, T=16)
  with pytest.raises(ValueError, match=r"pip install 'lime_jax\[hf\]'"):
    torch_reference.llama_step_point(cfg, 2, 1)
  with pytest.raises(ValueError, match=r"pip install 'lime_jax\[hf\]'"):  # before any child
    torch_reference.llama_step_point_apart(cfg, 2, 1, dict(os.environ))
  with pytest.raises(ValueError, match=r"pip install 'lime_jax\[hf\]'"):
    torch_reference.LlamaApart(cfg, 2, dict(os.environ))


def test_the_timed_process_does_not_import_torch(monkeypatch):
  """Our own steps are timed in this process, so only the child may load torch: the check that
  it is installed looks it up without importing it."""
  monkeypatch.setitem(sys.modules, "torch", None)  # an import of torch here would fail
  monkeypatch.setattr(torch_reference.importlib.util, "find_spec", lambda name: object())
  ran = []

  def child(argv, **kwargs):
    ran.append(argv)
    return subprocess.CompletedProcess(argv, 0, stdout='{"step_s": 1.0}\n', stderr="")

  monkeypatch.setattr(torch_reference.subprocess, "run", child)
  cfg = bench.variant_config("none", V=64, D=32, L=2, H=2, R=2, F=64, T=16)
  assert torch_reference.llama_step_point_apart(cfg, 2, 1, {}) == {"step_s": 1.0}
  assert len(ran) == 1


@pytest.mark.integration
def test_the_worker_runs_in_its_own_process(monkeypatch):
  """PyTorch's steps in our rounds: torch loads in the worker only, and leaving the context ends
  the worker."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  monkeypatch.setitem(sys.modules, "torch", None)  # an import of torch here would fail
  monkeypatch.setattr(torch_reference.importlib.util, "find_spec", lambda name: object())
  cfg = bench.variant_config("none", V=64, D=32, L=2, H=2, R=2, F=64, T=16)
  with torch_reference.LlamaApart(cfg, 2, child_env()) as worker:
    (times,) = bench.time_rounds([worker.point], 2)
    assert len(times) == 2 and min(times) > 0 and worker.point.finite()
    assert worker.point.record["router"] == bench.TORCH_LLAMA
    assert "torch" in worker.worker_environment()
  assert worker._child.poll() is not None


def test_only_the_baseline_has_a_pytorch_twin(monkeypatch):
  cfg = bench.variant_config("kv-static", V=64, D=32, L=2, H=2, R=2, F=64, T=16)
  with pytest.raises(ValueError, match="times Llama, the baseline"):
    torch_reference.llama_step_point(cfg, 2, 1)
  monkeypatch.setattr(torch_reference.importlib.util, "find_spec", lambda name: object())
  monkeypatch.setattr(torch_reference.subprocess, "Popen", None)  # no worker may start
  with pytest.raises(ValueError, match="times Llama, the baseline"):
    torch_reference.LlamaApart(cfg, 2, {})


@pytest.mark.integration
def test_the_child_process_error_comes_back_in_one_line():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  cfg = bench.variant_config("kv-static", V=64, D=32, L=2, H=2, R=2, F=64, T=16)
  with pytest.raises(ValueError, match=r"the PyTorch process failed \(exit 1\): ValueError:"
                                       r" --against-torch times Llama, the baseline") as err:
    torch_reference.llama_step_point_apart(cfg, 2, 1, child_env())
  assert "\n" not in str(err.value)


@pytest.mark.integration
def test_the_workers_error_comes_back_in_one_line():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  cfg = bench.variant_config("none", V=64, D=32, L=2, H=2, R=2, F=64, T=16)
  with torch_reference.LlamaApart(cfg, 2, child_env()) as worker:
    with pytest.raises(ValueError, match=r"the PyTorch process failed \(exit 1\): ValueError:"
                                         r" serve_llama_steps: unknown command 'bogus'") as err:
      worker._ask("bogus")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"the PyTorch process failed \(exit 1\)"):
      worker.point.step()  # the worker is gone: every later request says so
