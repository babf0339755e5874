"""`lime-jax bench --against-torch`: PyTorch Llama timed at our baseline's shape."""

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
  assert main(["bench", *TINY, "--against-torch", "--json", str(out)]) == 0
  records = json.loads(out.read_text())
  assert [r["router"] for r in records] == ["none", "kv-static", bench.TORCH_LLAMA]
  theirs = records[-1]
  assert set(theirs) == set(bench.RECORD_KEYS) and theirs["depth"] == 2
  assert theirs["step_s"] > 0
  assert theirs["environment"]["torch"] == torch.__version__
  # Timed in a process of its own, with glibc's default malloc; ours kept the setting.
  assert theirs["environment"]["glibc_tunables"] == "glibc.malloc.arena_max=4"
  assert records[0]["environment"]["glibc_tunables"] == (
      "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1")
  printed = capsys.readouterr().out
  table = printed[printed.index("| router | depth | step s | PyTorch Llama step s"):]
  ours = records[0]
  # PyTorch's steps are timed on their own, after ours: the ratio of the medians, no range.
  assert ours["timing"] == "interleaved" and theirs["timing"] == "sequential"
  assert f"| none | 2 | {ours['step_s']:.3f} | {theirs['step_s']:.3f} |" \
         f" {ours['step_s'] / theirs['step_s']:.3f} |  |" in table
  assert "| kv-static | 2 |" in table
  # PyTorch's record stays out of the method/baseline ratios.
  tables = printed[printed.index("| router |"):printed.index("| router | depth | step s |")]
  assert "| none | 2 |" in tables and bench.TORCH_LLAMA not in tables


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


def test_only_the_baseline_has_a_pytorch_twin():
  cfg = bench.variant_config("kv-static", V=64, D=32, L=2, H=2, R=2, F=64, T=16)
  with pytest.raises(ValueError, match="times Llama, the baseline"):
    torch_reference.llama_step_point(cfg, 2, 1)


@pytest.mark.integration
def test_the_child_process_error_comes_back_in_one_line():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  cfg = bench.variant_config("kv-static", V=64, D=32, L=2, H=2, R=2, F=64, T=16)
  with pytest.raises(ValueError, match=r"the PyTorch process failed \(exit 1\): ValueError:"
                                       r" --against-torch times Llama, the baseline") as err:
    torch_reference.llama_step_point_apart(cfg, 2, 1, child_env())
  assert "\n" not in str(err.value)
