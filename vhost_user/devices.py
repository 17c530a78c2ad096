"""How the core reaches device code: by name, through the registry in backends/.

The core imports no back-end (tests/test_layering.py checks it). Where it
needs one at run time -- the fuzz runner's device targets, the bench's
driver models -- it asks the registry (backends/registry.py), whose module
name is data here, so the layering is the same installed or in a checkout.
"""
from __future__ import annotations

import importlib

__all__ = ["REGISTRY", "registry", "driver", "fuzz_targets"]

#: where the device specs are collected
REGISTRY = "vhost_user.backends.registry"


def registry():
    return importlib.import_module(REGISTRY)


def driver(name: str) -> type:
    """The driver model class of device `name` ("blk" -> BlkDriver)."""
    return registry().driver(name)


def fuzz_targets() -> dict[str, str]:
    """Every device's fuzz targets: target name -> module."""
    return registry().fuzz_targets()
