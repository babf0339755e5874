#!/usr/bin/env python3
"""Builds README.md's layout section from the tree, so it cannot drift from the code.

Every module of lime_jax/ is listed with the first line of its docstring (a module without one
is an error naming the file: the docstring is where a reader learns why the module exists);
tests/ and configs/ are summarized. The section sits between `<!-- layout:begin -->` and
`<!-- layout:end -->` in README.md.

  python tools/readme_layout.py           # print the section
  python tools/readme_layout.py --write   # replace it in README.md
  python tools/readme_layout.py --check   # exit 1 with a diff when README.md is stale

Reads files only (ast and yaml), never imports lime_jax, so it runs while the package is broken.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import glob
import os
import sys

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "lime_jax"
BEGIN = "<!-- layout:begin -->"
END = "<!-- layout:end -->"
WIDTH = 100  # wrap lists of names at this column


class LayoutError(Exception):
  """A tree the section cannot be built from; the message is one line naming the file."""


def first_docstring_line(path: str, root: str) -> str | None:
  """The docstring's first line, `...` marking a sentence that goes on; None for an empty file
  (an `__init__.py` with nothing in it)."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  rel = os.path.relpath(path, root)
  try:
    tree = ast.parse(text, filename=rel)
  except SyntaxError as err:
    raise LayoutError(f"{rel}: cannot parse: {err.msg} (line {err.lineno})") from None
  doc = ast.get_docstring(tree)
  if doc:
    lines = doc.strip().splitlines()
    first = lines[0].strip()
    goes_on = len(lines) > 1 and lines[1].strip() and not first.endswith((".", ":", "!", "?"))
    return first + " ..." if goes_on else first
  if not tree.body:
    return None
  raise LayoutError(f"{rel}: no module docstring (its first line goes into the README layout)")


def _rows(rows: list[tuple[str, str]], indent: str) -> list[str]:
  """`name  text` rows with the text aligned in one column."""
  pad = max(len(name) for name, _ in rows) + 2
  return [f"{indent}{name.ljust(pad)}{text}".rstrip() for name, text in rows]


def _wrapped(head: str, names: list[str]) -> list[str]:
  """`head` followed by comma-separated names, wrapped under the first name."""
  lines, line = [], head
  for i, name in enumerate(names):
    item = name + ("," if i < len(names) - 1 else "")
    if line != head and len(line) + 1 + len(item) > WIDTH:
      lines.append(line)
      line = " " * len(head)
    line += " " + item
  return lines + [line]


def package_lines(root: str) -> list[str]:
  """lime_jax/ and its folders, one row per module, folders after the top-level modules."""
  top = os.path.join(root, PACKAGE)
  lines = [f"{PACKAGE}/"]

  def folder(path: str, depth: int) -> None:
    indent = "  " * depth
    names = sorted(os.listdir(path))
    modules = [n for n in names if n.endswith(".py") and n != "__init__.py"]
    rows = [(n, first_docstring_line(os.path.join(path, n), root)) for n in modules]
    if rows:
      lines.extend(_rows(rows, indent))
    for name in names:
      sub = os.path.join(path, name)
      if not os.path.isdir(sub) or not os.path.isfile(os.path.join(sub, "__init__.py")):
        continue
      about = first_docstring_line(os.path.join(sub, "__init__.py"), root)
      lines.append(f"{indent}{name}/" + (f"  {about}" if about else ""))
      folder(sub, depth + 1)

  folder(top, 1)
  return lines


def tests_lines(root: str) -> list[str]:
  tests = os.path.join(root, "tests")
  files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(tests, "*.py")))
  test_files = [f for f in files if f.startswith("test_")]
  helpers = [f for f in files if not f.startswith("test_")]
  lines = [f"tests/           {len(test_files)} test files (test_<module>.py), pytest"]
  rows = [(f, first_docstring_line(os.path.join(tests, f), root) or "") for f in helpers]
  return lines + (_rows(rows, "  ") if rows else [])


def _root_base(path: str, seen: tuple[str, ...] = ()) -> str:
  """The file at the bottom of `path`'s chain of first bases (itself when it has none)."""
  with open(path, encoding="utf-8") as f:
    values = yaml.safe_load(f) or {}
  base = values.get("base") if isinstance(values, dict) else None
  if isinstance(base, list):
    base = base[0] if base else None
  if not isinstance(base, str):
    return path
  nxt = os.path.normpath(os.path.join(os.path.dirname(path), base))
  if not os.path.isfile(nxt) or nxt in seen:
    raise LayoutError(f"{path}: base {base!r} is missing or makes a cycle")
  return _root_base(nxt, (*seen, path))


def configs_lines(root: str) -> list[str]:
  """configs/: the setups, the experiments grouped by the setup they overlay, the sweeps, the
  lm-eval task sets."""
  configs = os.path.join(root, "configs")
  rel = lambda p: os.path.relpath(p, configs)
  lines = ["configs/         experiment YAML; a file names `base:` files it overlays"]
  setups = sorted(glob.glob(os.path.join(configs, "setups", "*.yaml")))
  if setups:
    lines += _wrapped("  setups/        shared settings:", [rel(p)[len("setups/"):] for p in setups])
  groups: dict[str, list[str]] = {}
  for path in sorted(glob.glob(os.path.join(configs, "*.yaml"))):
    groups.setdefault(rel(_root_base(path)), []).append(os.path.basename(path)[:-5])
  for setup, names in sorted(groups.items()):
    head = f"  on {setup}:" if setup.startswith("setups/") else "  standalone:"
    lines += _wrapped(head, names)
  sweeps = sorted(glob.glob(os.path.join(configs, "sweeps", "*.yaml")))
  if sweeps:
    lines += _wrapped("  sweeps/        `lime-jax sweep` grids:",
                      [os.path.basename(p)[:-5] for p in sweeps])
  task_sets = sorted(glob.glob(os.path.join(configs, "lm_eval", "*.yaml")))
  if task_sets:
    lines += _wrapped("  lm_eval/       `lime-jax lm-eval --config` task sets:",
                      [os.path.basename(p)[:-5] for p in task_sets])
  tokenizers = sorted(glob.glob(os.path.join(configs, "tokenizers", "*.json")))
  if tokenizers:
    lines += _wrapped("  tokenizers/    tokenizer.json files `lime-jax tokenizer train` rebuilds:",
                      [os.path.basename(p) for p in tokenizers])
  return lines


def other_lines(root: str) -> list[str]:
  """experiments/ by its files, tools/ by its scripts' docstrings."""
  lines = []
  experiments = os.path.join(root, "experiments")
  if os.path.isdir(experiments):
    names = sorted(os.listdir(experiments))
    files = [n for n in names if os.path.isfile(os.path.join(experiments, n))]
    lines += _wrapped("experiments/     studies built on the library:", files)
    for name in names:
      sub = os.path.join(experiments, name)
      if os.path.isdir(sub):
        lines += _wrapped(f"  {name}/".ljust(17)[:-1], sorted(os.listdir(sub)))
  tools = sorted(glob.glob(os.path.join(root, "tools", "*.py")))
  if tools:
    lines.append("tools/")
    lines += _rows([(os.path.basename(p), first_docstring_line(p, root) or "") for p in tools], "  ")
  return lines


def section(root: str = REPO) -> str:
  """The text between the markers: a fenced tree."""
  body = (package_lines(root) + configs_lines(root) + other_lines(root) + tests_lines(root))
  return "\n".join(["```", *body, "```"]) + "\n"


def _split(readme: str, path: str) -> tuple[str, str, str]:
  begin, end = readme.find(BEGIN), readme.find(END)
  if begin < 0 or end < begin:
    raise LayoutError(f"{path}: no {BEGIN} ... {END} markers around the layout section")
  start = begin + len(BEGIN) + 1  # the newline after the marker
  return readme[:start], readme[start:end], readme[end:]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--write", action="store_true", help="replace the section in README.md")
  mode.add_argument("--check", action="store_true", help="exit 1 with a diff when it is stale")
  parser.add_argument("--root", default=REPO, help="repository root (default: this checkout)")
  args = parser.parse_args(argv)
  readme_path = os.path.join(args.root, "README.md")
  try:
    new = section(args.root)
    if not (args.write or args.check):
      sys.stdout.write(new)
      return 0
    with open(readme_path, encoding="utf-8") as f:
      readme = f.read()
    head, old, tail = _split(readme, readme_path)
  except LayoutError as err:
    print(f"readme_layout: {err}", file=sys.stderr)
    return 2
  if args.check:
    if old == new:
      return 0
    sys.stdout.writelines(difflib.unified_diff(
        old.splitlines(keepends=True), new.splitlines(keepends=True),
        "README.md (layout section)", "the tree now"))
    print("README.md's layout section is stale: run `python tools/readme_layout.py --write`",
          file=sys.stderr)
    return 1
  if old != new:
    with open(readme_path, "w", encoding="utf-8") as f:
      f.write(head + new + tail)
  return 0


if __name__ == "__main__":
  sys.exit(main())
