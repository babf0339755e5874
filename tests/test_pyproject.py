"""pyproject.toml: metadata setuptools reads without deprecation warnings, and extras that stay
optional (a plain install never pulls torch)."""

import os
import re
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject() -> dict:
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def test_license_is_an_spdx_string_with_a_setuptools_that_reads_it():
  meta = _pyproject()
  assert meta["project"]["license"] == "Apache-2.0"  # not the deprecated {text = ...} table
  # setuptools reads the SPDX string (PEP 639) from 77 on.
  setuptools = next(r for r in meta["build-system"]["requires"] if r.startswith("setuptools"))
  floor = re.fullmatch(r"setuptools>=(\d+)(?:\.\d+)*", setuptools)
  assert floor is not None and int(floor.group(1)) >= 77, setuptools


def _makefile() -> str:
  with open(os.path.join(REPO, "Makefile"), encoding="utf-8") as f:
    return f.read()


def _requirement_names(requirements: list[str]) -> set[str]:
  return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_torch_stays_optional_for_users():
  meta = _pyproject()
  assert "torch" not in _requirement_names(meta["project"]["dependencies"])
  assert "torch" not in _requirement_names(meta["project"]["optional-dependencies"]["dev"])
  assert "torch" in _requirement_names(meta["project"]["optional-dependencies"]["hf"])
  # `make install` (and so `make train`) installs the dev extra only.
  install = re.search(r"^\$\(STAMP\):.*?(?=^\S)", _makefile(), re.S | re.M).group(0)
  assert "-e '.[dev]'" in install and "torch" not in install.lower()


def test_make_test_installs_the_integrations_on_torchs_cpu_build():
  makefile = _makefile()
  assert re.search(r"^TORCH_CPU := torch==2\.13\.0\+cpu$", makefile, re.M)
  extras = re.search(r"^TEST_EXTRAS := (\S+)$", makefile, re.M).group(1).split(",")
  assert {"dev", "tpu", "hf", "wandb", "lm_eval"} <= set(extras)
  assert set(extras) <= set(_pyproject()["project"]["optional-dependencies"])
  stamp = re.search(r"^\$\(TEST_STAMP\):.*?(?=^\S)", makefile, re.S | re.M).group(0)
  # torch first, alone: the extras' plain "torch" is then already satisfied by the CPU build.
  assert stamp.index("--no-deps '$(TORCH_CPU)'") < stamp.index("-e '.[$(TEST_EXTRAS)]'")
  test = re.search(r"^test: \$\(TEST_STAMP\)\n\t(.*)$", makefile, re.M).group(1)
  assert "LIME_JAX_REQUIRE_INTEGRATIONS=1" in test  # a skipped integration fails
