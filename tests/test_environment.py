"""A run's environment record: what it holds, and the warning on a resume elsewhere."""

import json
import os
import subprocess

import jax

from conftest import REPO

from lime_jax.train import environment


def test_describe_names_the_versions_backend_and_host():
  env = environment.describe()
  assert env["jax"] == jax.__version__
  assert env["jaxlib"] and env["flax"] and env["optax"]
  assert env["backend"] == jax.default_backend() == "cpu"
  assert env["device_kind"] == jax.devices()[0].device_kind
  assert env["device_count"] == jax.device_count()
  assert env["host_cpu"]
  label = environment.numeric_signature(env)
  assert label.startswith(f"jax {jax.__version__}, jaxlib {env['jaxlib']}, cpu ({env['host_cpu']})")


def test_each_start_is_appended_and_a_resume_on_another_environment_warns(tmp_path):
  out = str(tmp_path)
  assert environment.record(out, 0) is None
  assert environment.record(out, 4) is None  # the same environment: nothing to say
  records = environment.read(out)
  assert [r["start_step"] for r in records] == [0, 4]
  assert {k: v for k, v in records[0].items() if k not in ("start_step", "time")} == {
      k: v for k, v in records[1].items() if k not in ("start_step", "time")}

  older = dict(records[-1], start_step=4, jaxlib="0.4.1", host_cpu="Some Other CPU")
  with open(tmp_path / environment.ENVIRONMENT_FILE, "a", encoding="utf-8") as f:
    f.write(json.dumps(older) + "\n")
  warning = environment.record(out, 8)
  assert warning.startswith(f"warning: {out}: resuming at step 8 on a different environment")
  assert "jaxlib: '0.4.1' -> " in warning and "host_cpu: 'Some Other CPU' -> " in warning
  assert "\n" not in warning
  assert len(environment.read(out)) == 4  # recorded even when it warns


def test_a_run_without_a_record_reads_empty_and_a_cut_line_is_skipped(tmp_path):
  assert environment.read(str(tmp_path)) == []
  assert environment.record(str(tmp_path), 0) is None
  with open(tmp_path / environment.ENVIRONMENT_FILE, "a", encoding="utf-8") as f:
    f.write('{"start_step": 4, "jax')  # killed while appending
  assert environment.record(str(tmp_path), 4) is None  # compared with the whole record before
  assert [r["start_step"] for r in environment.read(str(tmp_path))] == [0, 4]


def test_the_commit_is_the_checkouts_own_and_none_for_a_package_inside_another_repo(
    tmp_path, monkeypatch):
  expected = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"],
                            capture_output=True, text=True, check=True).stdout.strip()
  assert environment.code_commit() == expected
  # A package installed under site-packages of a venv inside some repository is not that
  # repository's code: no commit.
  repo = tmp_path / "other"
  module = repo / "venv" / "site-packages" / "lime_jax" / "train" / "environment.py"
  module.parent.mkdir(parents=True)
  module.write_text("")
  subprocess.run(["git", "init", "-q", str(repo)], check=True)
  monkeypatch.setattr(environment, "__file__", str(module))
  assert environment.code_commit() is None
