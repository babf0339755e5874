"""experiments/accelerator_check.sh's measurements (studies/accelerator_check.py), on a tiny
setup on the CPU; the real check needs a GPU or TPU."""

import json
import os
import pathlib
import shutil
import subprocess

import pytest

from lime_jax.studies import accelerator_check as check

REPO = pathlib.Path(__file__).resolve().parents[1]

TINY = """\
model: {V: 64, D: 32, L: 3, H: 2, F: 64, T: 16, router: ROUTER}
data: {seq_len: 16, batch_size: 2}
"""

# A failed point's stderr as JAX ends it: the exception, then a note.
STDERR_OF_AN_OOM = """Traceback (most recent call last):
  File "x.py", line 1, in <module>
jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: oom
--------------------
For simplicity, JAX has removed its internal frames from the traceback of the following exception.
"""


def test_a_point_reports_speed_memory_and_mfu(tmp_path, monkeypatch):
  for router, suffix, _ in check.ROUTERS:
    (tmp_path / f"tiny_{suffix}.yaml").write_text(TINY.replace("ROUTER", router))
  monkeypatch.setattr(check, "SETUPS", (("tiny", "tiny_{router}.yaml", 2, 16),))
  record = check.measure_point(str(tmp_path), 1, steps=2)
  assert (record["setup"], record["router"], record["batch"], record["length"]) == (
      "tiny", "kv-static", 2, 16)
  # LIMe in its accelerator form whatever the config says (TINY says neither)
  assert (record["routing_impl"], record["scan_segments"], record["attention_impl"],
          record["attention_query_blocks"]) == ("pull", 1, "dot_product", 1)
  assert record["step_s"] > 0 and record["tokens_per_s"] == pytest.approx(32 / record["step_s"])
  assert record["temp_bytes"] > 0
  assert record["mfu"] is None  # the CPU has no peak in the table
  assert record["environment"]["device_kind"] == record["device"]


def test_refuses_to_run_without_an_accelerator(capsys):
  assert check.main(["--out", "unused.json"]) == 2
  assert "no accelerator" in capsys.readouterr().err


def test_a_bad_output_path_is_refused_before_anything_runs(tmp_path, capsys):
  assert check.main(["--out", str(tmp_path / "missing" / "check.json")]) == 2
  assert "--out" in capsys.readouterr().err


def test_an_output_folder_gets_the_json_inside(tmp_path):
  assert check.output_path(str(tmp_path)) == str(tmp_path / "accelerator_check.json")
  assert check.output_path(str(tmp_path / "a.json")) == str(tmp_path / "a.json")
  with pytest.raises(ValueError, match="--out"):
    check.output_path("")


def test_the_error_line_is_the_exception_not_what_follows_it():
  assert check.error_line(STDERR_OF_AN_OOM, 1) == (
      "jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: oom")
  assert check.error_line("killed\n", -9) == "killed"
  assert check.error_line("", -9) == "exit code -9"


def test_a_failed_point_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
  """Device time is scarce: one point's failure (say, out of memory) must not lose the others,
  and what ran is on disk after every point."""
  written = []

  def fake_run(argv, **_):
    index = int(argv[argv.index("--point") + 1])
    (setup, *_), (router, *_) = check.point_of(index)
    if index == 3:
      return subprocess.CompletedProcess(argv, 1, "", STDERR_OF_AN_OOM)
    written.append(json.loads((tmp_path / "c.json").read_text()) if index else None)
    record = {"setup": setup, "router": router, "step_s": 2.0 if index % 2 else 1.0,
              "device": "fake", "environment": {}}
    return subprocess.CompletedProcess(argv, 0, json.dumps(record) + "\n", "")

  monkeypatch.setattr(check.subprocess, "run", fake_run)
  result = check.check(".", 1, str(tmp_path / "c.json"))
  assert [len(w["records"]) for w in written[1:]] == [1, 2]  # on disk after each point
  assert result["lime_over_baseline_step"] == {"paper_1p2b_L16": 2.0}
  assert result["failed"] == ["deep_D256_L64/kv-static"]
  assert result["records"][3]["error"] == "jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: oom"
  assert json.loads((tmp_path / "c.json").read_text()) == result


def _run_script(tmp_path, wheels: list[str], env: dict[str, str]) -> list[list[str]]:
  """experiments/accelerator_check.sh run from a copy of the repository layout in tmp_path,
  with a stand-in Python that logs each call (argv and PYTHONPATH); the logged calls."""
  (tmp_path / "experiments").mkdir()
  shutil.copy(REPO / "experiments" / "accelerator_check.sh", tmp_path / "experiments")
  for name in wheels:
    (tmp_path / ".whl").mkdir(exist_ok=True)
    (tmp_path / ".whl" / name).write_bytes(b"")
  log = tmp_path / "calls.jsonl"
  stand_in = tmp_path / "python"
  stand_in.write_text("#!/usr/bin/env python3\nimport json, os, sys\n"
                      f"open({str(log)!r}, 'a').write(json.dumps("
                      "[os.environ.get('PYTHONPATH', '')] + sys.argv[1:]) + '\\n')\n")
  stand_in.chmod(0o755)
  subprocess.run(["bash", str(tmp_path / "experiments" / "accelerator_check.sh")], check=True,
                 env={"PATH": os.environ["PATH"], "PYTHON": str(stand_in), **env})
  return [json.loads(line) for line in log.read_text().splitlines()]


def test_the_script_runs_the_check_with_its_settings(tmp_path):
  (call,) = _run_script(tmp_path, [], {"OUT": "out_dir", "STEPS": "3"})
  pythonpath, *argv = call
  assert argv == ["-m", "lime_jax.studies.accelerator_check", "--repo", ".", "--out", "out_dir",
                  "--steps", "3"]
  assert pythonpath.split(":")[0] == str(tmp_path)  # the repository's own lime_jax first


def test_the_script_installs_carried_wheels_without_network_first(tmp_path):
  install, run = _run_script(tmp_path, ["grain-0-py3-none-any.whl"], {})
  _, *install_argv = install
  assert install_argv[:3] == ["-m", "pip", "install"] and "--no-index" in install_argv
  site = install_argv[install_argv.index("--target") + 1]
  assert install_argv[-1] == ".whl/grain-0-py3-none-any.whl"
  assert run[0].split(":")[:2] == [str(tmp_path), site]
  assert run[run.index("--out") + 1] == "accelerator_check.json"
