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


# -- one declaration per device -------------------------------------------------------------
@pytest.mark.parametrize("name", FOLDERS)
def test_registry_spec_is_the_one_declaration_the_device_and_its_program_use(name):
    """virtio id, device name, capabilities and description come from the spec alone."""
    import importlib
    import json
    import subprocess
    import sys

    spec = registry.spec(name)
    device = importlib.import_module(f"vhost_user.backends.{name}.device")
    classes = [c for c in vars(device).values()
               if isinstance(c, type) and getattr(c, "virtio_id", 0) and c.__module__ == device.__name__]
    assert classes and all(c.virtio_id == spec.virtio_id and c.device_type == name for c in classes)
    run = [sys.executable, "-m", f"vhost_user.backends.{name}"]
    caps = json.loads(subprocess.run(run + ["--print-capabilities"], capture_output=True,
                                     text=True, check=True).stdout)
    assert caps["type"] == spec.vhost_user_type
    assert set(spec.features) <= set(caps["features"])
    desc = json.loads(subprocess.run(run + ["--print-description"], capture_output=True,
                                     text=True, check=True).stdout)
    assert desc["description"] == spec.description and desc["type"] == spec.vhost_user_type
    assert desc["binary"].endswith("/" + spec.program)


def test_bench_has_one_sub_command_per_device_with_a_bench():
    from vhost_user.frontend import bench

    with_bench = sorted(n for n, s in registry.specs().items() if s.bench)
    assert sorted(bench.benches()) == with_bench
    assert {"blk", "net", "vsock", "gpu"} <= set(with_bench)
    choices = bench._parser()._subparsers._group_actions[0].choices
    assert sorted(choices) == with_bench


# -- a device from another distribution (the vhost_user.devices entry-point group) -------
PLUGIN_SPEC = '''
from vhost_user.backends.registry import DeviceSpec

SPEC = DeviceSpec(
    name="{name}", program="vhost-user-{name}", virtio_id=42, vhost_user_type="{name}",
    description="a device from another package", driver="{pkg}.driver:Driver",
    bench="{pkg}.bench", fuzz_targets={{"{name}-input": "{pkg}.fuzz"}},
)
'''
PLUGIN_BENCH = '''
def add_arguments(p):
    p.add_argument("--socket", required=True)


def run(args):
    print("plugin bench on", args.socket)
    return 0
'''


def _install_plugin(root: Path, name: str, pkg: str) -> None:
    """A distribution on sys.path the way pip installs one: package + dist-info with entry points."""
    (root / pkg).mkdir()
    (root / pkg / "__init__.py").write_text("")
    (root / pkg / "spec.py").write_text(PLUGIN_SPEC.format(name=name, pkg=pkg))
    (root / pkg / "driver.py").write_text("class Driver:\n    pass\n")
    (root / pkg / "bench.py").write_text(PLUGIN_BENCH)
    info = root / f"{pkg}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {pkg}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        f"[{registry.ENTRY_POINT_GROUP}]\n{name} = {pkg}.spec:SPEC\n")


def test_a_device_of_another_distribution_joins_through_its_entry_point(tmp_path, monkeypatch, capsys):
    _install_plugin(tmp_path, "plug", "vu_plugin_dev")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = registry.specs()
    assert "plug" in found and list(found) == sorted(found)
    assert set(FOLDERS) < set(found)
    assert registry.spec("plug").virtio_id == 42
    assert registry.by_program("vhost-user-plug").name == "plug"
    assert devices.driver("plug").__module__ == "vu_plugin_dev.driver"
    assert registry.fuzz_targets()["plug-input"] == "vu_plugin_dev.fuzz"
    from vhost_user.frontend import bench

    assert bench.main(["plug", "--socket", "/nowhere"]) == 0
    assert capsys.readouterr().out == "plugin bench on /nowhere\n"


def test_an_entry_point_cannot_take_the_name_of_a_device_folder(tmp_path, monkeypatch):
    _install_plugin(tmp_path, "blk", "vu_plugin_blk")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="'blk' is declared by an entry point"):
        registry.specs()


@pytest.mark.parametrize("name", FOLDERS)
def test_device_folder_docstring_names_every_file_in_the_folder(name):
    """What lives where is said where a reader lands: the package's opening docstring."""
    import ast

    folder = REPO / "backends" / name
    doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text())) or ""
    files = sorted(p.name for p in folder.iterdir()
                   if p.suffix in (".py", ".c") and p.name != "__init__.py")
    assert files and [f for f in files if f"`{f}`" not in doc] == []
