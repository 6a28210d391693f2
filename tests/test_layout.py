"""The package layout, checked: who may import whom, no import cycles, short modules.

pyproxy's sub-packages are ordered the way a request's data flows: `config` at the
bottom, then `headers`, the backend `pool`, the `policy` rules, `observe`, the swappable
`runtime`, and on top of those the WSGI `proxy` app and the `ops` admin API. The `edge`
server knows only the WSGI contract (`wsgi.py`) and never the app; `process`, `cli` and
`demo` wire everything together. A reader can then learn the code bottom-up, and a
change low down cannot drag the layers above it into an import cycle.

The checker reads the source with `ast` (nothing is imported, so a broken module is
reported, not crashed on). It counts every pyproxy import for the direction rules:
module level, inside functions, and under `if TYPE_CHECKING:` (a type-only import is
still a dependency a reader must follow). Only module-level imports form the cycle
graph, since the others do not run while the module loads.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "pyproxy"
MAX_MODULE_LINES = 330

ANYTHING = None  # marks a package that may import every other one
LOW_LEVEL: frozenset[str] = frozenset()

# Package -> the other packages it may import (its own modules are always allowed).
ALLOWED: dict[str, frozenset[str] | None] = {
    "config": LOW_LEVEL,
    "wsgi": LOW_LEVEL,
    "__init__": LOW_LEVEL,
    "headers": frozenset({"config"}),
    "pool": frozenset({"config", "headers"}),
    "policy": frozenset({"config", "headers", "pool"}),
    "observe": frozenset({"config", "pool"}),
    "runtime": frozenset({"config", "headers", "pool", "policy", "observe"}),
    "proxy": frozenset({"wsgi", "config", "headers", "pool", "policy", "observe", "runtime"}),
    "edge": frozenset({"wsgi", "config", "headers"}),
    "ops": frozenset({"config", "headers", "pool", "policy", "observe", "runtime"}),
    "process": ANYTHING,
    "cli": ANYTHING,
    "demo": ANYTHING,
    "__main__": ANYTHING,
}
# Every module of pyproxy already runs `pyproxy/__init__.py` when it is imported, so a
# `from pyproxy import __version__` adds no dependency, as long as `__init__` itself
# imports nothing of pyproxy (the LOW_LEVEL rule above).
ALWAYS_ALLOWED = frozenset({"__init__"})

# Violations accepted for now, each with a comment saying why and what removes it.
# Empty: the layout holds. The test fails when a listed one disappears too, so the set
# cannot rot into a list of things that were fixed long ago.
KNOWN_VIOLATIONS: frozenset[tuple[str, str, str]] = frozenset()


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    at_load: bool  # runs while the importer loads: not in a function, not type-only


@dataclass(frozen=True)
class Violation:
    kind: str  # "import", "cycle", "length" or "unmapped"
    module: str
    detail: str
    explanation: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.module, self.detail)


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module under the package root."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def package_of(module: str) -> str:
    """pyproxy.pool.backend -> pool; pyproxy.headers -> headers; pyproxy -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def walk_imports(
    node: ast.AST, at_load: bool
) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement under node, with whether it runs while the module loads."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, at_load
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from walk_imports(child, at_load=False)
        elif isinstance(child, ast.If) and is_type_checking(child.test):
            for statement in child.body:
                yield from walk_imports(ast.Module(body=[statement], type_ignores=[]), False)
            for statement in child.orelse:
                yield from walk_imports(ast.Module(body=[statement], type_ignores=[]), at_load)
        else:
            yield from walk_imports(child, at_load)


def imports_of(module: str, path: Path, known: set[str]) -> list[Import]:
    """The pyproxy modules that `module` imports, resolved to dotted module names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for statement, at_load in walk_imports(tree, at_load=True):
        if isinstance(statement, ast.Import):
            targets = [alias.name for alias in statement.names]
        else:
            base = statement.module or ""
            if statement.level:  # relative: from . import x, from ..pool import y
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (statement.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import name` imports the module pkg.name if there is one, else pkg.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in statement.names
            ]
        for target in targets:
            if target.split(".")[0] == "pyproxy":
                found.append(Import(module, target, statement.lineno, at_load))
    return found


def direction_violations(imports: list[Import]) -> list[Violation]:
    violations = []
    for item in imports:
        source, target = package_of(item.importer), package_of(item.imported)
        if source not in ALLOWED:
            violations.append(
                Violation(
                    "unmapped",
                    item.importer,
                    "",
                    f"{item.importer}: package {source!r} has no rule in ALLOWED",
                )
            )
            continue
        allowed = ALLOWED[source]
        if source == target or target in ALWAYS_ALLOWED or allowed is ANYTHING or target in allowed:
            continue
        where = "" if item.at_load else " (inside a function or under TYPE_CHECKING)"
        rule = (
            f"may import only {', '.join(sorted(allowed))}"
            if allowed
            else "may import nothing of pyproxy"
        )
        violations.append(
            Violation(
                "import",
                item.importer,
                item.imported,
                f"{item.importer} line {item.line} imports {item.imported}{where}: {source} {rule}",
            )
        )
    return violations


def cycle_violations(imports: list[Import]) -> list[Violation]:
    """One violation per group of modules that import each other at module level,
    shown as the shortest cycle through the group's first module (a -> b -> a)."""
    graph: dict[str, set[str]] = {}
    for item in imports:
        if item.at_load and item.importer != item.imported:
            graph.setdefault(item.importer, set()).add(item.imported)

    def shortest_paths(start: str) -> dict[str, list[str]]:
        """Breadth first: every module start reaches -> the shortest path to it."""
        paths: dict[str, list[str]] = {}
        frontier = [[start]]
        while frontier:
            following = []
            for path in frontier:
                for imported in sorted(graph.get(path[-1], ())):
                    if imported not in paths:
                        paths[imported] = [*path, imported]
                        following.append(paths[imported])
            frontier = following
        return paths

    reach = {module: shortest_paths(module) for module in graph}
    violations = []
    reported: set[str] = set()
    for module in sorted(graph):
        if module in reported or module not in reach[module]:
            continue  # already shown with its group, or on no cycle
        reported |= {other for other in reach[module] if module in reach.get(other, {})}
        chain = " -> ".join(reach[module][module])
        violations.append(
            Violation("cycle", module, chain, f"import cycle at module level: {chain}")
        )
    return violations


def length_violations(modules: dict[str, Path]) -> list[Violation]:
    violations = []
    for module, path in modules.items():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE_LINES:
            violations.append(
                Violation(
                    "length",
                    module,
                    f"over {MAX_MODULE_LINES} lines",
                    f"{module} has {lines} lines, over the {MAX_MODULE_LINES} limit",
                )
            )
    return violations


def check_layout(root: Path) -> list[Violation]:
    modules = module_names(root)
    known = set(modules)
    imports = [item for module, path in modules.items() for item in imports_of(module, path, known)]
    return direction_violations(imports) + cycle_violations(imports) + length_violations(modules)


def assert_only_known(violations: list[Violation], kinds: set[str]) -> None:
    found = {v.key: v for v in violations if v.kind in kinds}
    known = {key for key in KNOWN_VIOLATIONS if key[0] in kinds}
    new = [found[key].explanation for key in sorted(found.keys() - known)]
    fixed = sorted(known - found.keys())
    for line in new:
        print(line)
    message = "\n".join(
        ["layout violations:", *new]
        + (["fixed, so remove from KNOWN_VIOLATIONS:", *map(str, fixed)] if fixed else [])
    )
    assert not new and not fixed, message


def test_packages_import_only_downward() -> None:
    assert_only_known(check_layout(PACKAGE_ROOT), {"import", "unmapped"})


def test_no_import_cycles_at_module_level() -> None:
    assert_only_known(check_layout(PACKAGE_ROOT), {"cycle"})


def test_modules_are_short() -> None:
    assert_only_known(check_layout(PACKAGE_ROOT), {"length"})


def test_the_checker_sees_every_kind_of_import(tmp_path: Path) -> None:
    root = tmp_path / "pyproxy"
    files = {
        "__init__.py": '__version__ = "0"\n',
        "config/__init__.py": "",
        # The lowest layer reaching up, inside a function: a direction violation only.
        "config/schema.py": "def late():\n    from pyproxy.pool import backend\n",
        "pool/__init__.py": "",
        # Type-only import of a higher layer: a direction violation, not a cycle edge.
        "pool/backend.py": (
            "from typing import TYPE_CHECKING\n"
            "from pyproxy import __version__\n"
            "from pyproxy.config.schema import late\n"
            "if TYPE_CHECKING:\n    from pyproxy.runtime.snapshot import Runtime\n"
        ),
        "runtime/__init__.py": "",
        "runtime/snapshot.py": "from pyproxy.pool import backend\nfrom .swap import x\n",
        "runtime/swap.py": "import pyproxy.runtime.snapshot\n",
        "edge/__init__.py": "",
        "edge/server.py": "from pyproxy.proxy import app\n" + "pass\n" * MAX_MODULE_LINES,
        "proxy/__init__.py": "",
        "proxy/app.py": "import pyproxy.edge.server as edge\n",
        "brandnew.py": "from pyproxy.pool.backend import x\n",
        # Two cycles through the same three modules: one group, reported once.
        "policy/__init__.py": "",
        "policy/a.py": "from pyproxy.policy import b\n",
        "policy/b.py": "from pyproxy.policy import a, c\n",
        "policy/c.py": "import pyproxy.policy.a\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)

    found = {v.key for v in check_layout(root)}

    assert found == {
        ("import", "pyproxy.config.schema", "pyproxy.pool.backend"),
        ("import", "pyproxy.pool.backend", "pyproxy.runtime.snapshot"),
        ("import", "pyproxy.edge.server", "pyproxy.proxy.app"),
        ("import", "pyproxy.proxy.app", "pyproxy.edge.server"),
        ("unmapped", "pyproxy.brandnew", ""),
        (
            "cycle",
            "pyproxy.edge.server",
            "pyproxy.edge.server -> pyproxy.proxy.app -> pyproxy.edge.server",
        ),
        (
            "cycle",
            "pyproxy.runtime.snapshot",
            "pyproxy.runtime.snapshot -> pyproxy.runtime.swap -> pyproxy.runtime.snapshot",
        ),
        ("cycle", "pyproxy.policy.a", "pyproxy.policy.a -> pyproxy.policy.b -> pyproxy.policy.a"),
        ("length", "pyproxy.edge.server", f"over {MAX_MODULE_LINES} lines"),
    }


def test_a_violation_names_the_module_and_the_import(tmp_path: Path) -> None:
    root = tmp_path / "pyproxy"
    (root / "config").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "config" / "__init__.py").write_text("")
    (root / "config" / "load.py").write_text("\n\nfrom pyproxy.headers import via_names\n")
    (root / "headers.py").write_text("")

    [violation] = check_layout(root)

    assert violation.explanation == (
        "pyproxy.config.load line 3 imports pyproxy.headers: config may import nothing of pyproxy"
    )
