"""Every third-party module the package imports comes from a dependency pyproject.toml declares.

A module that happens to be installed in a developer's environment but is not declared passes every other test
there and fails on a fresh machine; this test fails here instead.
"""

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions

from conftest import REPO


def imported_top_level(folder) -> set[str]:
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(group: str | None = None) -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] if group is None else project["optional-dependencies"][group]
    return {normalize(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in requirements}


def undeclared(folders, allowed: set[str]) -> dict[str, list[str]]:
    own = {"harness", "harness_plugins", "conftest"}
    dists = packages_distributions()
    missing = {}
    for module in sorted(set().union(*(imported_top_level(REPO / f) for f in folders))):
        if module in sys.stdlib_module_names or module in own or module.startswith("_"):
            continue
        providers = {normalize(d) for d in dists.get(module, [module])}
        if not providers & allowed:
            missing[module] = sorted(providers)
    return missing


def test_package_imports_are_declared_dependencies():
    # an optional extra's import is guarded (harness.tracking: BadInput naming the extra when it is missing)
    assert undeclared(["harness", "plugins"], declared() | declared("tensorboard")) == {}


def test_test_imports_are_declared_dependencies():
    assert undeclared(["tests"], declared() | declared("test")) == {}
