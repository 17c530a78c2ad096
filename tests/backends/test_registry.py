"""The device registry (backends/registry.py): every device folder is found, and each spec points at real code.

The core finds drivers and fuzz targets only through it (tests/test_layering.py),
so a device folder the registry missed would silently drop out of the bench
and the fuzz runner.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from vhost_user import devices
from vhost_user.backends import registry
from vhost_user.fuzzing import CORE_TARGETS, TARGET_MODULES

REPO = Path(__file__).resolve().parents[2]
FOLDERS = sorted(p.name for p in (REPO / "backends").iterdir() if (p / "__init__.py").is_file())


def test_registry_finds_every_device_folder():
    assert list(registry.specs()) == FOLDERS


@pytest.mark.parametrize("name", FOLDERS)
def test_registry_spec_names_its_program_and_a_driver_class_that_imports(name):
    spec = registry.spec(name)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert spec.name == name
    assert scripts[spec.program] == f"vhost_user.backends.{name}.__main__:main"
    cls = devices.driver(name)
    assert cls.__module__ == f"vhost_user.backends.{name}.driver"
    assert callable(getattr(cls, "close")) and hasattr(cls, "__enter__")


def test_registry_fuzz_targets_are_the_devices_plus_the_core():
    device_targets = registry.fuzz_targets()
    assert dict(TARGET_MODULES) == {**CORE_TARGETS, **device_targets}
    for target, module in device_targets.items():
        owner = module.split(".")[2]
        assert target in registry.spec(owner).fuzz_targets, (target, module)


def test_registry_unknown_device_is_a_key_error():
    with pytest.raises(KeyError):
        registry.spec("no-such-device")
    with pytest.raises(KeyError):
        devices.driver("registry")  # a module of backends/, not a device folder
