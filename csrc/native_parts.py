"""Which C each device adds to the two native modules (issue 16: the core knows no device).

A device with C puts a `native.json` in its folder (backends/<dev>/), e.g.

    {"engine": {"sources": ["blk.c"], "headers": ["blk.h"], "depends": ["blk_hdr.h"]},
     "driver": {"sources": ["driver_blk.c"], "headers": ["driver_blk.h"]}}

`engine` goes into `vhost_user._native` (beside the ring core), `driver` into
`vhost_user._driver` (beside the driver-side ring). `sources` are compiled;
`headers` are the ones whose cdef-begin/cdef-end regions Python sees (in
that order, after the core's), and are included by the module's preamble;
`depends` are other headers the sources include (for rebuilds only). Every
name is a file in that folder. The builders read these files as JSON and
never import the package, so a new device is a new folder and nothing in
csrc/ or setup.py changes. Devices come in folder-name order.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

__all__ = ["PARTS", "REPO", "DevicePart", "ModuleInputs", "device_parts", "module_inputs"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("engine", "driver")
_LISTS = ("sources", "headers", "depends")


@dataclass(frozen=True)
class DevicePart:
    """One device's contribution to one native module (paths relative to the repository)."""

    device: str
    folder: str
    sources: tuple[str, ...]
    headers: tuple[str, ...]
    depends: tuple[str, ...]


def _names(path: str, part: str, key: str, value, folder: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{path}: {part}.{key}: not a list of file names")
    out = []
    for name in value:
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise ValueError(f"{path}: {part}.{key}: {name!r} is not a file name in {folder}")
        if not os.path.isfile(os.path.join(REPO, folder, name)):
            raise ValueError(f"{path}: {part}.{key}: {name} does not exist in {folder}")
        out.append(os.path.join(folder, name))
    return tuple(out)


def _shown(path: str) -> str:
    """`path` as an error names it: relative to the repository when inside it."""
    rel = os.path.relpath(path, REPO)
    return path if rel.startswith("..") else rel


def _read(path: str) -> dict:
    shown = _shown(path)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{shown}: {e}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{shown}: not an object naming {' or '.join(PARTS)}")
    unknown = sorted(set(data) - set(PARTS))
    if unknown:
        raise ValueError(f"{shown}: unknown part {unknown[0]!r} (known: {', '.join(PARTS)})")
    return data


def _part(path: str, device: str, folder: str, part: str, spec) -> DevicePart:
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: {part}: not an object")
    unknown = sorted(set(spec) - set(_LISTS))
    if unknown:
        raise ValueError(f"{path}: {part}: unknown key {unknown[0]!r} (known: {', '.join(_LISTS)})")
    lists = {k: _names(path, part, k, spec.get(k, []), folder) for k in _LISTS}
    if not lists["sources"]:
        raise ValueError(f"{path}: {part}.sources: empty")
    return DevicePart(device, folder, **lists)


def device_parts(part: str, backends: str = "backends") -> list[DevicePart]:
    """Every device's `part` ("engine" or "driver"), from backends/*/native.json."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r} (known: {', '.join(PARTS)})")
    root = os.path.join(REPO, backends)
    found = []
    for device in sorted(os.listdir(root)):
        folder = os.path.join(backends, device)
        path = os.path.join(REPO, folder, "native.json")
        if not os.path.isfile(path):
            continue
        data = _read(path)
        if part in data:
            found.append(_part(_shown(path), device, folder, part, data[part]))
    return found


@dataclass(frozen=True)
class ModuleInputs:
    """What one cffi module is built from: the core's files, then every device's."""

    sources: list[str]        # relative to the repository (setuptools runs there)
    headers: list[str]        # absolute: the cdef is read from these, in order
    include_dirs: list[str]   # csrc/ and each contributing device folder
    depends: list[str]

    @property
    def preamble(self) -> str:
        """The C the module's own source starts with: every binding header."""
        return "".join(f'#include "{os.path.basename(h)}"\n' for h in self.headers)


def module_inputs(part: str, sources, headers, depends=()) -> ModuleInputs:
    """The core's `sources`, `headers` and `depends` (names in csrc/) plus every device's `part`."""
    devices = device_parts(part)
    names = list({*headers, *depends})
    for d in devices:
        names += {os.path.basename(h) for h in (*d.headers, *d.depends)}
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ValueError(f"{part}: header {clash[0]} is named twice (one include path holds them all)")
    return ModuleInputs(
        sources=[f"csrc/{s}" for s in sources] + [s for d in devices for s in d.sources],
        headers=[os.path.join(REPO, "csrc", h) for h in headers]
        + [os.path.join(REPO, h) for d in devices for h in d.headers],
        include_dirs=["csrc"] + [d.folder for d in devices],
        depends=[f"csrc/{h}" for h in (*headers, *depends)]
        + [h for d in devices for h in (*d.headers, *d.depends)],
    )
