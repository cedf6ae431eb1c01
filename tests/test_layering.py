"""The layering of `melo_ray` and `pipelines`, read from the source with `ast` (nothing is imported).

Rules a reader can trust:
- no import cycle, counting imports at module level and inside functions alike;
- no function-local import of a project module (such an import usually hides a cycle: the two modules
  are in the wrong place, and the shared piece belongs lower down). The few lazy imports that keep
  heavy optional parts off the import path of light commands are listed in `LAZY`, each with why;
- the library never imports the jobs (`pipelines`); only the command line may.

Loading a class from a "module:Class" string (the editor registry) is not an import statement, so it
is no edge here: the registry is above the editors by design and reaches them only by name.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("melo_ray", "pipelines")

# (importing module, imported module) -> why the import waits for the function that needs it. An entry
# must save something: the imported module brings in a HEAVY package that the importer does not load.
LAZY: dict[tuple[str, str], str] = {
    ("melo_ray.cli.main", "melo_ray.serving.app"): "Ray Serve and FastAPI, for `melo-ray serve` only",
    ("melo_ray.operations", "melo_ray.export"): "peft, for `melo-ray export` only",
}
HEAVY = frozenset({"torch", "transformers", "ray", "mlflow", "peft", "matplotlib", "fastapi"})


@dataclass(frozen=True)
class Import:
    """One import statement's edge to a project module."""

    source: str  # the importing module
    target: str  # the imported project module
    line: int
    local: bool  # inside a function body


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for package in PACKAGES for p in sorted((root / package).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement loads (`from pkg import name` may name a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: resolved against the importing module's package
        here = module.split(".") if is_package else module.split(".")[:-1]
        anchor = here[: len(here) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def _project_module(name: str, known: set[str]) -> str | None:
    while name and name not in known:  # `pkg.mod.attr` -> `pkg.mod`
        name = name.rpartition(".")[0]
    return name or None


@dataclass
class ModuleImports:
    edges: list[Import]
    external: set[str]  # third-party top-level packages imported at module level


def imports_of(module: str, path: Path, known: set[str]) -> ModuleImports:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    out = ModuleImports([], set())

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit_one(other, local)
                continue
            visit_one(child, local)

    def visit_one(node: ast.AST, local: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = _targets(node, module, is_package)
            if isinstance(node, ast.ImportFrom):  # `from pkg import mod` loads pkg.mod if it is one, else pkg
                modules = {n for n in names[:-1] if n in known} or {_project_module(names[-1], known)}
            else:
                modules = {_project_module(n, known) for n in names}
            for target in sorted(m for m in modules if m and m != module):
                out.edges.append(Import(module, target, node.lineno, local))
            if not local and not getattr(node, "level", 0):
                out.external |= {n.split(".")[0] for n in names if n and not _project_module(n, known)}
            return
        visit(node, local or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return out


def read_project(root: Path = ROOT) -> dict[str, ModuleImports]:
    modules = project_modules(root)
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def import_graph(root: Path = ROOT) -> list[Import]:
    return [edge for found in read_project(root).values() for edge in found.edges]


def heavy_packages(project: dict[str, ModuleImports], module: str) -> set[str]:
    """The HEAVY packages importing `module` loads (following module-level imports only)."""
    seen, todo, heavy = {module}, [module], set()
    while todo:
        found = project[todo.pop()]
        heavy |= found.external & HEAVY
        for edge in found.edges:
            if not edge.local and edge.target not in seen:
                seen.add(edge.target)
                todo.append(edge.target)
    return heavy


def find_cycles(edges: list[Import]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected group of modules."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm; the graph is small, recursion is fine
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_in(group, graph) for group in groups]


def _cycle_in(group: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the group's first module (breadth-first inside the group)."""
    start, members = group[0], set(group)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if nxt not in previous:
                    previous[nxt] = node
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    return group


def _where(edges: list[Import], source: str, target: str) -> str:
    lines = sorted({f"{e.line}{' (in a function)' if e.local else ''}" for e in edges
                    if e.source == source and e.target == target})
    return f"{source} -> {target} (line {', '.join(lines)})"


def test_no_import_cycles() -> None:
    edges = import_graph()
    cycles = find_cycles(edges)
    report = ["cycle: " + "; ".join(_where(edges, a, b) for a, b in zip(cycle, cycle[1:])) for cycle in cycles]
    assert not cycles, "import cycles (move the shared piece down a layer):\n" + "\n".join(report)


def test_no_function_local_project_imports() -> None:
    local = sorted({(e.source, e.target, e.line) for e in import_graph()
                    if e.local and (e.source, e.target) not in LAZY})
    assert not local, "function-local imports of project modules (import at the top; if that makes a cycle, " \
        "move the shared piece down; a lazy import of a heavy optional part goes in LAZY with why):\n" + \
        "\n".join(f"{s}:{line} imports {t}" for s, t, line in local)


def test_each_lazy_import_is_listed_saves_a_heavy_package_and_exists() -> None:
    project = read_project()
    local = {(e.source, e.target) for found in project.values() for e in found.edges if e.local}
    assert not set(LAZY) - local, f"LAZY entries with no such import: {sorted(set(LAZY) - local)}"
    for source, target in LAZY:
        saved = heavy_packages(project, target) - heavy_packages(project, source)
        assert saved, f"LAZY ({source}, {target}): {source} loads what {target} brings already; import it at the top"


def test_only_the_command_line_reaches_the_jobs() -> None:
    """The library never imports `pipelines`; the command line may (a one-way arrow)."""
    upward = sorted({f"{e.source}:{e.line}" for e in import_graph()
                     if e.source.startswith("melo_ray.") and not e.source.startswith("melo_ray.cli.")
                     and e.target.startswith("pipelines")})
    assert not upward, f"library modules importing the jobs: {upward}"


# -- the reader itself, on small made-up trees, so a broken reader cannot pass the rules above ----------
def test_reader_finds_a_cycle_through_a_function_local_import(tmp_path: Path) -> None:
    package = tmp_path / "melo_ray"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from melo_ray.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..c import thing\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from melo_ray import a\n"
                                  "import melo_ray.a as alias\n")
    (tmp_path / "pipelines").mkdir()
    edges = import_graph(tmp_path)
    assert find_cycles(edges) == [["melo_ray.a", "melo_ray.sub.b", "melo_ray.c", "melo_ray.a"]]
    assert [(e.source, e.target) for e in edges if e.local] == [("melo_ray.sub.b", "melo_ray.c")]
    assert sum(e.source == "melo_ray.c" for e in edges) == 1  # the TYPE_CHECKING import is no edge


def test_reader_weighs_only_module_level_imports(tmp_path: Path) -> None:
    package = tmp_path / "melo_ray"
    package.mkdir()
    (tmp_path / "pipelines").mkdir()
    (package / "__init__.py").write_text("")
    (package / "light.py").write_text("import json\n\ndef f():\n    import torch\n    from melo_ray import heavy\n")
    (package / "heavy.py").write_text("from melo_ray import model\n")
    (package / "model.py").write_text("import torch.nn\nfrom ray import serve\n")
    project = read_project(tmp_path)
    assert heavy_packages(project, "melo_ray.light") == set()
    assert heavy_packages(project, "melo_ray.heavy") == {"torch", "ray"}
