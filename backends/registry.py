"""The device registry: every back-end folder declares itself once, in its `spec.py`.

Why: the core (vhost_user/) must know no device, yet the fuzz runner and the
bench reach device code (fuzz targets, driver models). Each device folder
`backends/<dev>/` holds a `spec.py` whose `SPEC` is a `DeviceSpec`: its
name, its program, where its driver model and its fuzz targets are. This
module finds them by scanning the folders, so a new device is one folder and
no line here. Entries name modules as strings: reading a spec imports
nothing but the device package, and the core reaches this module only
through importlib (`vhost_user.devices`), never by an import statement.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from dataclasses import dataclass, field

__all__ = ["DeviceSpec", "spec", "specs", "driver", "fuzz_targets"]


@dataclass(frozen=True)
class DeviceSpec:
    name: str  #: the folder name, and how the core asks for the device ("blk")
    program: str  #: its console script ("vhost-user-blk")
    driver: str  #: "module:Class" of its driver model for the built-in front-end
    fuzz_targets: dict[str, str] = field(default_factory=dict)  #: fuzz target name -> module

    def driver_class(self) -> type:
        module, _, attr = self.driver.partition(":")
        return getattr(importlib.import_module(module), attr)


def _package() -> str:
    return __name__.rpartition(".")[0]  # vhost_user.backends


def spec(name: str) -> DeviceSpec:
    """One device's spec, importing only that device (KeyError if there is none)."""
    module = f"{_package()}.{name}.spec"
    try:
        found = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        found = None
    if found is None:
        raise KeyError(name)
    return importlib.import_module(module).SPEC


def specs() -> dict[str, DeviceSpec]:
    """Every device that has a spec.py, by name, in name order."""
    pkg = importlib.import_module(_package())
    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.ispkg)
    out = {}
    for name in names:
        try:
            out[name] = spec(name)
        except KeyError:
            continue  # a helper package, not a device
    return out


def driver(name: str) -> type:
    """The driver model class of device `name` (e.g. BlkDriver for "blk")."""
    return spec(name).driver_class()


def fuzz_targets() -> dict[str, str]:
    """Every device's fuzz targets: target name -> module, devices in name order."""
    out: dict[str, str] = {}
    for dev in specs().values():
        for target, module in dev.fuzz_targets.items():
            if target in out:
                raise ValueError(f"fuzz target {target!r} declared twice ({out[target]}, {module})")
            out[target] = module
    return out
