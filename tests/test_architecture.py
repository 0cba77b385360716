"""The layer contract of `src/refusal_atlas`, checked on the source's syntax trees (no extra dependency).

Layers, lowest first; a module may import only its own package or a lower layer:

    foundation (errors, paths, io, hashing, terminal) -> taxonomy -> ontology -> lm -> curation -> mechinterp
    -> organism -> atlas -> cli

`refusal_atlas/__init__.py` is the public facade on top of every layer: it may import any of them
and nothing imports it (modules import `refusal_atlas.<module>`, never names from the facade).

Also enforced: no import cycle between modules or between packages; no module over 500 lines; no
project import inside a function; an import of any other module inside a function only with a reason
comment on the same line or the line above (an optional heavy dependency loaded on first use).

The checker functions are tested on a small planted tree first, so a checker that cannot fail is caught.
"""

from __future__ import annotations

import ast
import io
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "refusal_atlas"
PROJECT = "refusal_atlas"
LAYERS: list[set[str]] = [
    {"errors", "paths", "io", "hashing", "terminal"},
    {"taxonomy"},
    {"ontology"},
    {"lm"},
    {"curation"},
    {"mechinterp"},
    {"organism"},
    {"atlas"},
    {"cli"},
]
MAX_LINES = 500


# ------------------------------------------------------------------------------------ model
@dataclass
class Import:
    target: str  # dotted module name, resolved to a module that exists where possible
    line: int
    in_function: bool
    commented: bool


@dataclass
class Module:
    name: str  # refusal_atlas.x.y
    path: Path
    lines: int
    imports: list[Import] = field(default_factory=list)

    @property
    def package(self) -> str:
        """The top-level unit the layer order names: `taxonomy`, `errors`, ... ('' for the facade)."""
        parts = self.name.split(".")
        return parts[1] if len(parts) > 1 else ""


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = [root.name, *rel.parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _comment_lines(source: str) -> set[int]:
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            lines.add(tok.start[0])
    return lines


def _function_imports(tree: ast.AST) -> set[int]:
    """ids of Import/ImportFrom nodes nested in a function body (class bodies run at import time)."""
    inside: set[int] = set()

    def visit(node: ast.AST, in_fn: bool) -> None:
        for child in ast.iter_child_nodes(node):
            now = in_fn or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import | ast.ImportFrom) and in_fn:
                inside.add(id(child))
            visit(child, now)

    visit(tree, False)
    return inside


def parse_module(root: Path, path: Path, known: set[str]) -> Module:
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    name = module_name(root, path)
    comments = _comment_lines(source)
    in_fn = _function_imports(tree)
    is_pkg = path.name == "__init__.py"
    nodes = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    import_lines: set[int] = set()
    for n in nodes:
        import_lines.update(range(n.lineno, (n.end_lineno or n.lineno) + 1))

    def has_reason(node: ast.stmt) -> bool:
        span = range(node.lineno, (node.end_lineno or node.lineno) + 1)
        if any(line in comments for line in span):
            return True
        line = node.lineno - 1
        while line in import_lines:  # a block of imports may share the comment above it
            line -= 1
        return line in comments

    mod = Module(name, path, len(source.splitlines()))
    for n in nodes:
        targets: list[str] = []
        if isinstance(n, ast.Import):
            targets = [alias.name for alias in n.names]
        else:
            if n.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (n.level - 1)]
                prefix = ".".join(base + ([n.module] if n.module else []))
            else:
                prefix = n.module or ""
            for alias in n.names:
                sub = f"{prefix}.{alias.name}"
                targets.append(sub if sub in known else prefix)
        for target in dict.fromkeys(targets):
            mod.imports.append(Import(target, n.lineno, id(n) in in_fn, has_reason(n)))
    return mod


def load_tree(root: Path) -> dict[str, Module]:
    paths = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    known = {module_name(root, p) for p in paths}
    return {m.name: m for m in (parse_module(root, p, known) for p in paths)}


def layer_of(package: str, layers: list[set[str]]) -> int | None:
    return next((i for i, names in enumerate(layers) if package in names), None)


def project_target(imp: Import, modules: dict[str, Module], project: str) -> str | None:
    """The project module an import names (the closest existing parent for `from pkg import name`)."""
    if imp.target != project and not imp.target.startswith(project + "."):
        return None
    target = imp.target
    while target not in modules and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


# ------------------------------------------------------------------------------------ checks
def layer_violations(modules: dict[str, Module], layers: list[set[str]], project: str) -> list[str]:
    out = []
    for mod in modules.values():
        if mod.package == "":
            continue  # the facade sits on top of every layer
        mine = layer_of(mod.package, layers)
        if mine is None:
            out.append(f"{mod.name}: package {mod.package!r} is not in the layer order")
            continue
        for imp in mod.imports:
            target = project_target(imp, modules, project)
            if target is None:
                continue
            pkg = modules[target].package if target in modules else target.split(".")[1]
            if pkg == "":
                out.append(f"{mod.name}:{imp.line} imports the facade {project!r}; import the module instead")
                continue
            theirs = layer_of(pkg, layers)
            if theirs is not None and theirs > mine:
                out.append(f"{mod.name}:{imp.line} imports {target} (layer {pkg} is above {mod.package})")
    return sorted(out)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            node, children = work[-1]
            nxt = next(children, None)
            if nxt is not None:
                if nxt not in graph:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return sorted(found)


def import_graph(modules: dict[str, Module], project: str) -> dict[str, set[str]]:
    """Module -> project modules it imports at any depth (the facade is left out: it sits on top)."""
    graph: dict[str, set[str]] = {}
    for mod in modules.values():
        if mod.package == "":
            continue
        targets = {project_target(i, modules, project) for i in mod.imports}
        graph[mod.name] = {t for t in targets if t and t != mod.name and t in modules and modules[t].package}
    return graph


def module_cycles(modules: dict[str, Module], project: str) -> list[str]:
    return [" <-> ".join(c) for c in _cycles(import_graph(modules, project))]


def package_cycles(modules: dict[str, Module], project: str) -> list[str]:
    graph: dict[str, set[str]] = {}
    for name, targets in import_graph(modules, project).items():
        pkg = modules[name].package
        graph.setdefault(pkg, set()).update(modules[t].package for t in targets if modules[t].package != pkg)
    return [" <-> ".join(c) for c in _cycles(graph)]


def size_violations(modules: dict[str, Module], limit: int) -> list[str]:
    return sorted(f"{m.name}: {m.lines} lines (limit {limit})" for m in modules.values() if m.lines > limit)


def function_import_violations(modules: dict[str, Module], project: str) -> list[str]:
    out = []
    for mod in modules.values():
        for imp in mod.imports:
            if not imp.in_function:
                continue
            if imp.target == project or imp.target.startswith(project + "."):
                out.append(f"{mod.name}:{imp.line} imports {imp.target} inside a function (project import)")
            elif not imp.commented:
                out.append(f"{mod.name}:{imp.line} imports {imp.target} inside a function without a reason comment")
    return sorted(out)


# ------------------------------------------------------------------------------------ self-test
PLANTED = {
    "__init__.py": "from toy.top import thing\n",
    "errors.py": "X = 1\n",
    "low/__init__.py": "",
    "low/a.py": "from toy.low import b\nfrom toy import errors\n",
    "low/b.py": "from toy.low.a import X\nfrom toy.high import c\n",
    "high/__init__.py": "",
    "high/c.py": (
        "def f():\n"
        "    import json\n"
        "    # optional heavy dependency, loaded on first use\n"
        "    import numpy\n"
        "    import pandas  # heavy\n"
        "    from toy.low import a\n"
        "    return json, numpy, pandas, a\n"
    ),
    "top/__init__.py": "thing = 1\n",
    "odd/__init__.py": "from toy import thing\n",
    "long.py": "x = 1\n" * 12,
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Module]:
    root = tmp_path_factory.mktemp("src") / "toy"
    for rel, text in PLANTED.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return load_tree(root)


def test_checker_finds_every_planted_violation(planted: dict[str, Module]) -> None:
    layers = [{"errors", "long"}, {"low"}, {"high"}, {"top"}]
    assert layer_violations(planted, layers, "toy") == [
        "toy.low.b:2 imports toy.high.c (layer high is above low)",
        "toy.odd: package 'odd' is not in the layer order",
    ]
    assert module_cycles(planted, "toy") == ["toy.high.c <-> toy.low.a <-> toy.low.b"]  # via the function import
    assert package_cycles(planted, "toy") == ["high <-> low"]
    assert size_violations(planted, 10) == ["toy.long: 12 lines (limit 10)"]
    assert function_import_violations(planted, "toy") == [
        "toy.high.c:2 imports json inside a function without a reason comment",
        "toy.high.c:6 imports toy.low.a inside a function (project import)",
    ]


def test_checker_flags_imports_of_the_facade(tmp_path: Path) -> None:
    root = tmp_path / "toy"
    (root / "low").mkdir(parents=True)
    (root / "__init__.py").write_text("VERSION = 1\n")
    (root / "low" / "__init__.py").write_text("from toy import VERSION\n")
    assert layer_violations(load_tree(root), [{"low"}], "toy") == [
        "toy.low:1 imports the facade 'toy'; import the module instead"]


# ------------------------------------------------------------------------------------ the contract
@pytest.fixture(scope="module")
def tree() -> dict[str, Module]:
    return load_tree(ROOT)


def test_the_facade_and_every_layer_exist(tree: dict[str, Module]) -> None:
    assert PROJECT in tree
    packages = {m.package for m in tree.values()} - {""}
    assert packages == set().union(*LAYERS)


def test_imports_only_go_down_the_layers(tree: dict[str, Module]) -> None:
    bad = layer_violations(tree, LAYERS, PROJECT)
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycle_between_modules(tree: dict[str, Module]) -> None:
    bad = module_cycles(tree, PROJECT)
    assert not bad, "module cycles:\n" + "\n".join(bad)


def test_no_import_cycle_between_packages(tree: dict[str, Module]) -> None:
    bad = package_cycles(tree, PROJECT)
    assert not bad, "package cycles:\n" + "\n".join(bad)


def test_no_module_over_the_size_limit(tree: dict[str, Module]) -> None:
    bad = size_violations(tree, MAX_LINES)
    assert not bad, "modules too long:\n" + "\n".join(bad)


def test_imports_inside_functions_are_optional_heavy_dependencies_with_a_reason(tree: dict[str, Module]) -> None:
    bad = function_import_violations(tree, PROJECT)
    assert not bad, f"{len(bad)} imports inside functions:\n" + "\n".join(bad)
