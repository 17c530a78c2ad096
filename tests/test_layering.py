"""The layering the tree promises, read from the source (issue 16).

- the core (`vhost_user/`, including the built-in front-end and the fuzz
  runner) imports nothing from `vhost_user.backends`: it reaches device code
  by name through the registry (backends/registry.py), never by an import;
- the protocol codec (`protocol/`, imported as `vhost_user.protocol`)
  imports nothing from `vhost_user` outside itself.

Every `import` and `from ... import` statement of every .py file is read
with `ast`, wherever it sits (module level, inside functions, under `if`),
and relative imports are resolved against the file's installed package name.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: source folder -> the package name it installs as (setup.py's mapping)
SOURCES = {"vhost_user": "vhost_user", "protocol": "vhost_user.protocol"}


def _package_of(path: Path, folder: str) -> str:
    rel = path.relative_to(REPO / folder).with_suffix("")
    parts = [SOURCES[folder], *rel.parts]
    return ".".join(parts[:-1])  # x/__init__.py is package x; x/y.py is in package x


def _imports(path: Path, folder: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _package_of(path, folder)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # `from vhost_user import backends` names the package in the alias
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def _files(folder: str) -> list[Path]:
    return sorted(p for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts)


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_layering_scan_sees_every_source_file():
    for folder in SOURCES:
        assert _files(folder), f"no .py under {folder}/"
    assert any(_within(m, "vhost_user.protocol") for p in _files("vhost_user") for _, m in _imports(p, "vhost_user"))


@pytest.mark.parametrize("path", _files("vhost_user"), ids=lambda p: str(p.relative_to(REPO)))
def test_layering_core_module_imports_no_backend(path):
    bad = [f"{path.relative_to(REPO)}:{line}: imports {module}"
           for line, module in _imports(path, "vhost_user") if _within(module, "vhost_user.backends")]
    assert not bad, "the core must reach devices through the registry, not by import:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", _files("protocol"), ids=lambda p: str(p.relative_to(REPO)))
def test_layering_protocol_imports_nothing_of_vhost_user_outside_itself(path):
    bad = [f"{path.relative_to(REPO)}:{line}: imports {module}"
           for line, module in _imports(path, "protocol")
           if _within(module, "vhost_user") and not _within(module, "vhost_user.protocol")
           and module != "vhost_user"]
    assert not bad, "protocol/ is the pure codec:\n" + "\n".join(bad)
