"""studies/plan_table.py: the table experiments/methods_on_tpu.sh prints from plan records."""

import json
import subprocess
import sys

import pytest

from lime_jax.studies import plan_table


def _plan_record(hbm_gib: float, tflops: float, gb: float, step_s: float, roofline_s: float):
  # the fields `lime-jax plan --json` writes, as one record in a list
  return [{"router": "r", "topology": "v5p:2x2x1", "devices": 4, "cost_method": "scaled",
           "per_device_bytes": hbm_gib * 2**30, "xla_flops": tflops * 1e12,
           "xla_bytes": gb * 1e9, "compiler_step_s": step_s, "roofline_step_s": roofline_s,
           "fits": True}]


def test_each_config_is_given_over_the_baseline(tmp_path):
  (tmp_path / "none.json").write_text(json.dumps(_plan_record(20.0, 60.0, 500.0, 0.4, 0.2)))
  (tmp_path / "lime.json").write_text(json.dumps(_plan_record(21.0, 61.2, 540.0, 0.42, 0.216)))
  lines = plan_table.table(tmp_path).splitlines()
  assert lines[2] == "| none | 20.00 | 60.00 | 500.0 | 0.4000 | 0.2000 |"
  assert lines[3] == ("| lime | 21.00 (1.050x) | 61.20 (1.020x) | 540.0 (1.080x) "
                      "| 0.4200 (1.050x) | 0.2160 (1.080x) |")
  assert lines[-1] == "v5p:2x2x1, 4 devices, cost scaled; ratios over none."


def test_a_config_that_does_not_fit_says_so(tmp_path):
  (tmp_path / "none.json").write_text(json.dumps(_plan_record(20.0, 60.0, 500.0, 0.4, 0.2)))
  record = _plan_record(99.0, 60.0, 500.0, 0.4, 0.2)
  record[0]["fits"] = False
  (tmp_path / "mhc.json").write_text(json.dumps(record))
  assert plan_table.table(tmp_path).splitlines()[3].startswith("| mhc (does not fit) | 99.00 (4.950x)")


@pytest.mark.parametrize("files, message", [
    ({"lime.json": _plan_record(1, 1, 1, 1, 1)}, "no none.json in"),
    ({"none.json": "{"}, "none.json: not JSON"),
    ({"none.json": {"router": "none"}}, "none.json: not a `lime-jax plan --json` record"),
])
def test_bad_folders_get_one_line_and_exit_code_2(tmp_path, files, message):
  for name, content in files.items():
    (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content))
  result = subprocess.run([sys.executable, "-m", "lime_jax.studies.plan_table", str(tmp_path)],
                          capture_output=True, text=True)
  assert result.returncode == 2
  assert result.stderr.startswith("plan_table: ") and message in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
