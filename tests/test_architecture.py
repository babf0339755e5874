"""The package's shape, read statically from the source: no import cycles, imports pointing one
way between the subpackages, and a README layout section that matches the tree.

Imports are read with `ast` from every file, wherever they sit (an import inside a function still
ties two modules together; it only hides the tie from a reader). Nothing here imports lime_jax.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "lime_jax"

# Which top-level parts of lime_jax each part may import (its own part always). The layers, from
# the bottom: errors, config <- data, model <- parallel <- train, inference, interop (siblings:
# they do not import each other) <- studies, evaluation (siblings) <- cli <- __main__.
# `lime_jax` is the package's own __init__.
_BASE = {"errors", "config"}
ALLOWED = {
    "errors": set(),
    "config": {"errors"},
    "data": _BASE,
    "model": _BASE,
    "parallel": _BASE | {"data", "model"},
    "train": _BASE | {"data", "model", "parallel"},
    "inference": _BASE | {"data", "model", "parallel"},
    "interop": _BASE | {"data", "model", "parallel"},
    "studies": _BASE | {"data", "model", "parallel", "train", "inference", "interop"},
    "evaluation": _BASE | {"data", "model", "parallel", "train", "inference", "interop"},
    "cli": _BASE | {"data", "model", "parallel", "train", "inference", "interop", "studies",
                    "evaluation"},
    "__main__": {"cli"},
    PACKAGE: _BASE,
}


def find_modules(root: str = REPO) -> dict[str, str]:
  """Dotted module name -> file, for every .py file under lime_jax/ (packages by their name)."""
  found = {}
  for folder, dirs, files in os.walk(os.path.join(root, PACKAGE)):
    dirs[:] = sorted(d for d in dirs if d != "__pycache__")
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        dotted = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
        found[dotted.removesuffix(".__init__")] = path
  return found


def _with_packages(name: str) -> list[str]:
  """`a.b.c` -> [a, a.b, a.b.c]: importing a module runs each enclosing package's __init__."""
  parts = name.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imported_names(module: str, path: str) -> set[str]:
  """Every dotted name `module` imports, relative imports resolved, with the enclosing packages."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), filename=path)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        names.update(_with_packages(alias.name))
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        package = module.split(".")
        if not path.endswith("__init__.py"):
          package = package[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
      names.update(_with_packages(base))
      names.update(f"{base}.{alias.name}" for alias in node.names)  # a submodule, maybe
  return names


def import_graph(root: str = REPO) -> dict[str, set[str]]:
  """Module -> the lime_jax modules it imports. A module's own enclosing packages are left out:
  they run before it whoever imports it, so an __init__ that re-exports is not a cycle."""
  modules = find_modules(root)
  graph = {}
  for module, path in modules.items():
    graph[module] = {name for name in imported_names(module, path)
                     if name in modules and name != module and not module.startswith(name + ".")}
  return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
  """Tarjan's components with more than one module: each holds at least one cycle."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return sorted(found)


def shortest_cycle(graph: dict[str, set[str]], start: str, within: set[str]) -> list[str]:
  """start -> ... -> start, the fewest steps, inside one component: a concrete loop to read."""
  paths = {start: [start]}
  frontier = [start]
  while frontier:
    nxt = []
    for v in frontier:
      for w in sorted(graph[v] & within):
        if w == start:
          return paths[v] + [start]
        if w not in paths:
          paths[w] = paths[v] + [w]
          nxt.append(w)
    frontier = nxt
  return [start]


def part(module: str) -> str:
  """The top-level part of lime_jax a module belongs to: lime_jax.model.stack -> model."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else PACKAGE


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
  violations = []
  for module in sorted(graph):
    allowed = ALLOWED.get(part(module))
    names = graph[module]
    for name in sorted(names):
      target = part(name)
      if target == PACKAGE or target == part(module):
        continue
      if any(other.startswith(name + ".") for other in names):
        continue  # a package whose module is imported too: report the module only
      if allowed is None:
        violations.append(f"{module}: part {part(module)!r} is not in the layering table")
        break
      if target not in allowed:
        violations.append(f"{module} imports {name} ({part(module)} may not import {target})")
  return violations


# ---------------------------------------------------------------------------------------------


def test_the_static_reader_sees_every_kind_of_import(tmp_path):
  """Relative imports, imports inside functions, and the package __init__ an import runs."""
  pkg = tmp_path / PACKAGE
  (pkg / "a").mkdir(parents=True)
  (pkg / "b").mkdir()
  for init in (pkg, pkg / "a", pkg / "b"):
    (init / "__init__.py").write_text('"""p."""\n')
  (pkg / "a" / "x.py").write_text('"""x."""\ndef f():\n  from ..b import y\n  return y\n')
  (pkg / "b" / "y.py").write_text('"""y."""\nimport lime_jax.a.z\n')
  (pkg / "a" / "z.py").write_text('"""z."""\nfrom . import x\n')
  (pkg / "b" / "__init__.py").write_text('"""b."""\nfrom lime_jax.b import y\n')
  graph = import_graph(str(tmp_path))
  assert graph[f"{PACKAGE}.a.x"] == {f"{PACKAGE}.b", f"{PACKAGE}.b.y"}
  assert graph[f"{PACKAGE}.b.y"] == {f"{PACKAGE}.a", f"{PACKAGE}.a.z"}
  assert graph[f"{PACKAGE}.b"] == {f"{PACKAGE}.b.y"}  # an __init__ may import its own modules
  # b's __init__ imports y, y imports a.z, a.z imports a.x, whose function imports b.
  assert strongly_connected(graph) == [[f"{PACKAGE}.a.x", f"{PACKAGE}.a.z", f"{PACKAGE}.b",
                                        f"{PACKAGE}.b.y"]]
  assert layering_violations(graph) == [f"{PACKAGE}.a.x: part 'a' is not in the layering table",
                                        f"{PACKAGE}.b.y: part 'b' is not in the layering table"]


def test_no_import_cycles():
  graph = import_graph()
  cycles = []
  for component in strongly_connected(graph):
    loop = shortest_cycle(graph, component[0], set(component))
    cycles.append(f"{' -> '.join(loop)} (component: {', '.join(component)})")
  assert not cycles, f"{len(cycles)} import cycle(s) in {PACKAGE}:\n  " + "\n  ".join(cycles)


def test_imports_point_one_way_between_the_parts():
  graph = import_graph()
  parts = {part(m) for m in graph}
  assert parts <= set(ALLOWED), f"parts missing from ALLOWED: {sorted(parts - set(ALLOWED))}"
  violations = layering_violations(graph)
  assert not violations, (f"{len(violations)} import(s) against the layering:\n  "
                          + "\n  ".join(violations))


def test_only_the_entry_points_import_cli():
  graph = import_graph()
  outside = sorted(f"{m} imports {n}" for m, names in graph.items() for n in names
                   if part(n) == "cli" and part(m) not in ("cli", "__main__"))
  assert not outside, "\n  ".join(["cli is imported from outside the entry points:", *outside])


def test_readme_layout_section_matches_the_tree():
  """tools/readme_layout.py --check; the fix is `python tools/readme_layout.py --write`."""
  result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "readme_layout.py"),
                           "--check"], cwd=REPO, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr


def function_level_imports(root: str = REPO) -> list[str]:
  """`file:line (module imports name)` of every import of a lime_jax module inside a function or
  method body."""
  found = []
  for module, path in sorted(find_modules(root).items()):
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    for func in ast.walk(tree):
      if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      for node in ast.walk(func):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else
                 [PACKAGE] if isinstance(node, ast.ImportFrom) else [])
        for name in (n for n in names if n == PACKAGE or n.startswith(PACKAGE + ".")):
          found.append(f"{os.path.relpath(path, root)}:{node.lineno} ({module} imports {name})")
  return found


# The one import allowed inside a function (module: what it imports), and why.
DEFERRED_IMPORTS = {
    # The console script restarts its process before the command line's imports (1.6 s: jax,
    # flax), which would otherwise run twice.
    "lime_jax.cli.launch": "lime_jax.cli.main",
}


def test_no_function_level_imports_inside_the_package():
  """Imports sit at the top of the module: one inside a function only hides a dependency (and
  is how import cycles used to be dodged here). The exceptions are listed, and each is still
  needed (an entry can not outlive its import)."""
  found = function_level_imports()
  imports = [tuple(f.split(" (")[1][:-1].split(" imports ")) for f in found]
  assert sorted(imports) == sorted(DEFERRED_IMPORTS.items()), found


def test_the_function_level_import_check_can_fail(tmp_path):
  package = tmp_path / PACKAGE
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "a.py").write_text("def f():\n  from lime_jax import b\n  return b\n")
  (package / "b.py").write_text("import os\n")
  assert function_level_imports(str(tmp_path)) == [
      "lime_jax/a.py:2 (lime_jax.a imports lime_jax)"]
