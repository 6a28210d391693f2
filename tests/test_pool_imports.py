"""pool/ is the bottom of the package above config/: it imports nothing of the layers
built on it (policy, runtime, proxy, ops, ...), not even for type checking. Otherwise
a change up there could reach down into how a backend connects, and the package
could not be read bottom-up. Checked on the source, so an import under
`if TYPE_CHECKING:` counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pyproxy.pool

# "pyproxy" itself: the package root holds only __version__ (the probe's User-Agent).
ALLOWED = ("pyproxy", "pyproxy.config", "pyproxy.headers", "pyproxy.pool")


def pyproxy_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name == "pyproxy" or name.startswith("pyproxy.")}


def test_pool_imports_only_config_headers_and_itself() -> None:
    package = Path(pyproxy.pool.__file__).parent
    modules = sorted(package.glob("*.py"))
    assert len(modules) > 5  # the package was found
    upward = {
        f"{path.name}: {name}"
        for path in modules
        for name in pyproxy_imports(path)
        if name not in ALLOWED and not name.startswith(tuple(a + "." for a in ALLOWED[1:]))
    }
    assert upward == set()
