"""The device registry: every device declares itself once, in one `DeviceSpec`.

Why: the core (vhost_user/) must know no device, yet the CLI's
`--print-capabilities` / `--print-description`, the sandbox, the fuzz runner
and the bench all need per-device facts. Each device folder `backends/<dev>/`
holds a `spec.py` whose `SPEC` is a `DeviceSpec`: its name, program, virtio
id, vhost-user type and features, its description line, and where its driver
model, bench, fuzz targets and sandbox additions are.

Devices are found two ways, so that both an in-tree folder and a package of
someone else's can add one:

* every sub-package of this package that has a `spec.py` (a new folder here
  needs no line in this file);
* every entry point of the group `vhost_user.devices` (ENTRY_POINT_GROUP) of
  any installed distribution, whose object is a `DeviceSpec`. A third-party
  package declares `[project.entry-points."vhost_user.devices"]
  mydev = "mypkg.spec:SPEC"`. An entry point may not take the name of a device
  already found; such a clash is refused by name, not silently shadowed.

Entries name modules as strings: reading a spec imports nothing but the
device's spec module, and the core reaches this module only through
importlib (`vhost_user.devices`), never by an import statement.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import pkgutil
from dataclasses import dataclass, field

__all__ = ["DeviceSpec", "ENTRY_POINT_GROUP", "spec", "specs", "by_program", "driver",
           "fuzz_targets"]

#: the entry-point group a distribution lists its devices under
ENTRY_POINT_GROUP = "vhost_user.devices"


@dataclass(frozen=True)
class DeviceSpec:
    name: str  #: the folder name, and how the core asks for the device ("blk")
    program: str  #: its console script ("vhost-user-blk")
    virtio_id: int  #: virtio 1.2 section 5 device id (blk 2, net 1, ...)
    vhost_user_type: str  #: "type" in QEMU's docs/interop/vhost-user.json ("block", "net", ...)
    description: str  #: one line for the description file libvirt reads
    driver: str  #: "module:Class" of its driver model for the built-in front-end
    features: tuple[str, ...] = ()  #: static vhost-user.json features of --print-capabilities
    bench: str | None = None  #: module with add_arguments(parser) and run(args) for vhost-user-bench
    fuzz_targets: dict[str, str] = field(default_factory=dict)  #: fuzz target name -> module
    sandbox: str | None = None  #: module that registers its seccomp profiles when imported
    summary: str = ""  #: one line for `vhost-user-bench --help` and listings

    def __post_init__(self):
        if not self.name or not self.program or self.virtio_id <= 0:
            raise ValueError(f"device spec {self.name!r}: a name, a program and a virtio id are required")

    def driver_class(self) -> type:
        module, _, attr = self.driver.partition(":")
        return getattr(importlib.import_module(module), attr)

    def capabilities(self) -> dict:
        """The --print-capabilities JSON (docs/interop/vhost-user.json), before run-time probes."""
        return {"type": self.vhost_user_type, "features": list(self.features)}

    def description_file(self) -> dict:
        """The description file's fields, its "binary" still the bare program name."""
        return {"description": self.description, "type": self.vhost_user_type,
                "binary": self.program}


def _package() -> str:
    return __name__.rpartition(".")[0]  # vhost_user.backends


def _folder_spec(name: str) -> DeviceSpec | None:
    module = f"{_package()}.{name}.spec"
    try:
        found = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        found = None
    return None if found is None else importlib.import_module(module).SPEC


def _folder_names() -> list[str]:
    pkg = importlib.import_module(_package())
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.ispkg)


def _entry_point_specs() -> dict[str, DeviceSpec]:
    out: dict[str, DeviceSpec] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found = ep.load()
        if not isinstance(found, DeviceSpec):
            raise TypeError(f"entry point {ep.name} = {ep.value}: not a DeviceSpec")
        if found.name != ep.name:
            raise ValueError(f"entry point {ep.name} = {ep.value}: its spec is named {found.name!r}")
        out.setdefault(ep.name, found)  # one distribution installed twice lists it twice
    return out


def specs() -> dict[str, DeviceSpec]:
    """Every device, by name, in name order: the folders here, then the entry points."""
    out = {}
    for name in _folder_names():
        found = _folder_spec(name)
        if found is not None:  # a folder without spec.py is a helper package, not a device
            out[name] = found
    for name, found in _entry_point_specs().items():
        mine = out.get(name)
        if mine is None:
            out[name] = found
        elif mine.driver != found.driver or mine.program != found.program:
            raise ValueError(f"device {name!r} is declared by an entry point and by "
                             f"{_package()}.{name}; rename one")
    return dict(sorted(out.items()))


def spec(name: str) -> DeviceSpec:
    """One device's spec (KeyError if there is none); a folder device imports only itself."""
    found = _folder_spec(name) if name.isidentifier() else None
    if found is not None:
        return found
    try:
        return specs()[name]
    except KeyError:
        raise KeyError(name) from None


def by_program(program: str) -> DeviceSpec:
    """The spec whose console script is `program` ("vhost-user-blk"); KeyError if none."""
    guess = program.removeprefix("vhost-user-")
    try:
        found = spec(guess)
        if found.program == program:
            return found
    except KeyError:
        pass
    for found in specs().values():
        if found.program == program:
            return found
    raise KeyError(program)


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
