"""The structure stays easy to change: read from the source with ``ast`` (nothing is imported).

* no import cycle among ``kdistill`` modules (an import inside a function counts as much as one at
  the top: a cycle hidden in a function is still a cycle);
* no ``kdistill`` module is imported inside a function (those hide cycles and surprise readers);
  only optional third-party packages (vllm, matplotlib, tqdm, peft, ...) may be;
* no module is over 450 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "kdistill"
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """``(imported kdistill module, inside a function?)`` for every import statement of a module."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def resolve(target: str) -> str:
        """The module a dotted name lives in (``kdistill.models.load_model`` -> ``kdistill.models``)."""
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        return target

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "kdistill":
                        found.append((resolve(alias.name), in_function))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                if mod.split(".")[0] == "kdistill":
                    for alias in child.names:  # `from kdistill.methods import logit` imports a module
                        sub = f"{mod}.{alias.name}"
                        found.append((sub if sub in MODULES else resolve(mod), in_function))
            visit(child, nested)

    visit(tree, False)
    return [(m, f) for m, f in found if m and m != name]


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    edges = {m: sorted({t for t, _ in deps}) for m, deps in GRAPH.items()}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            strong(v)
    return out


def test_the_checker_sees_imports():
    """The graph is not empty by accident: known edges are found, at module and function level."""
    assert ("kdistill.config", False) in GRAPH["kdistill.run"]
    assert ("kdistill.methods.base", False) in GRAPH["kdistill.methods.logit"]
    sample = ast.parse("def f():\n    from kdistill.run import run\n")
    assert any(isinstance(n, ast.ImportFrom) for n in ast.walk(sample))


def test_no_import_cycles():
    assert _cycles() == []


def test_no_function_level_imports_of_kdistill_modules():
    local = sorted({(m, t) for m, deps in GRAPH.items() for t, inside in deps if inside})
    assert local == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    n = len(MODULES[name].read_text().splitlines())
    assert n <= MAX_LINES, f"{name} has {n} lines (at most {MAX_LINES}: split it where a seam shows)"


def test_one_run_for_every_method():
    """The sequence method runs through the same run as every other method: no second run path."""
    assert "kdistill.sequence_pipeline" not in MODULES and "kdistill.pipeline" not in MODULES
    tree = ast.parse(MODULES["kdistill.run"].read_text())
    methods = {"logit", "sequence", "on_policy", "on_policy_filter", "self_distill", "zephyr", "dpo", "progressive"}
    kinds = {"LocalTeacher", "CachedTeacher", "ServedTeacher", "ApiTextTeacher", "MultiTeacher"}
    named = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    named |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not named & methods, "kdistill.run names a method: ask the method's class instead"
    assert not named & kinds, "kdistill.run names a teacher kind: ask the teacher instead"
