"""How the core reaches device code: by name, through the registry in backends/.

The core imports no back-end (tests/test_layering.py checks it). Where it
needs one at run time -- the CLI's description and capabilities, the fuzz
runner's device targets, the bench's driver models and per-device benches,
a sandbox profile -- it asks the registry (backends/registry.py), whose
module name is data here, so the layering is the same installed or in a
checkout. The registry also lists devices other distributions declare under
the `vhost_user.devices` entry-point group.
"""
from __future__ import annotations

import importlib

__all__ = ["REGISTRY", "registry", "spec", "specs", "by_program", "driver", "fuzz_targets",
           "load_sandbox"]

#: where the device specs are collected
REGISTRY = "vhost_user.backends.registry"


def registry():
    return importlib.import_module(REGISTRY)


def spec(name: str):
    """The DeviceSpec of device `name` (KeyError if there is none)."""
    return registry().spec(name)


def specs() -> dict:
    """Every device's DeviceSpec, by name."""
    return registry().specs()


def by_program(program: str):
    """The DeviceSpec whose program is `program` ("vhost-user-blk")."""
    return registry().by_program(program)


def driver(name: str) -> type:
    """The driver model class of device `name` ("blk" -> BlkDriver)."""
    return registry().driver(name)


def fuzz_targets() -> dict[str, str]:
    """Every device's fuzz targets: target name -> module."""
    return registry().fuzz_targets()


def load_sandbox(profile: str) -> bool:
    """Import the sandbox additions of the device a profile belongs to ("gpu-virgl" -> gpu).

    A device's sandbox module registers its profiles when imported; a device's
    own program has imported it already, this serves the rest (a test, a tool).
    False when no device declares that profile's module.
    """
    try:
        found = spec(profile.split("-", 1)[0])
    except KeyError:
        return False
    if not found.sandbox:
        return False
    importlib.import_module(found.sandbox)
    return True
