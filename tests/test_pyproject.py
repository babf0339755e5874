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
