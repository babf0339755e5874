"""GLIBC_TUNABLES with malloc's transparent huge pages on (the launcher) and off (PyTorch's
process), the user's other entries kept."""

import pytest

from lime_jax.cli import glibc_tunables


@pytest.mark.parametrize("tunables, expected", [
    (None, "glibc.malloc.hugetlb=1"),
    ("", "glibc.malloc.hugetlb=1"),
    ("glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ("glibc.malloc.arena_max=2:", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ("glibc.malloc.hugetlb=0", None),  # the user's choice stands: no restart
    ("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", None),
])
def test_tunables_gain_huge_pages_unless_already_named(tunables, expected):
  assert glibc_tunables.with_huge_pages(tunables) == expected


@pytest.mark.parametrize("tunables, expected", [
    (None, ""), ("glibc.malloc.hugetlb=1", ""),
    ("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "glibc.malloc.arena_max=2"),
    ("glibc.malloc.hugetlb=1:glibc.malloc.arena_max=2:", "glibc.malloc.arena_max=2"),
])
def test_without_huge_pages_is_glibcs_default(tunables, expected):
  assert glibc_tunables.without_huge_pages(tunables) == expected
