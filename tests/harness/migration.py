"""Live migration of a harness guest from one QEMU process to a second one.

``incoming(source, replace)`` starts the destination QEMU with the source's
own command line (as QEMU requires: the same devices and memory), its own
console, QMP socket and ``-incoming unix:...``, and every string in
``replace`` swapped (a back-end socket path for the destination's own
back-end process). ``begin`` starts QMP ``migrate`` on the source, ``wait``
polls ``query-migrate`` until a condition holds (by default: completed), and
``migrate`` does both; once completed the destination's console continues
the source's, so ``dest.wait()`` sees the whole script's output.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from .qemu import GuestError, GuestVM

__all__ = ["incoming", "begin", "wait", "migrate"]


def incoming(source: GuestVM, workdir: Path, replace: dict[str, str] | None = None) -> GuestVM:
    """Start the destination QEMU for ``source``, waiting for its migration stream."""
    if source._proc is None:
        raise ValueError("the source guest is not running")
    dest = GuestVM(source.kernel, source.initramfs, workdir, qemu=source.qemu,
                   memory_mb=source.memory_mb, cpus=source.cpus, accel=source.accel,
                   append=source.append, firmware=source.firmware)
    swaps = {str(source.console): str(dest.console), str(source.qmp_path): str(dest.qmp_path)}
    swaps.update(replace or {})
    cmd = []
    for arg in source.command:
        for old, new in swaps.items():
            arg = arg.replace(old, new)
        cmd.append(arg)
    dest.migration_uri = f"unix:{dest._sockdir / 'migrate.sock'}"
    cmd += ["-incoming", dest.migration_uri]
    (dest.workdir / "qemu-cmdline.txt").write_text(" ".join(cmd) + "\n")
    dest.console.write_bytes(b"")
    dest._stderr = open(dest.workdir / "qemu-stderr.log", "wb")
    dest._token = source._token
    dest._started = source._started
    dest._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=dest._stderr,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while not (dest._sockdir / "migrate.sock").exists():
        if dest._proc.poll() is not None or time.monotonic() > deadline:
            raise GuestError(dest._explain("the destination QEMU did not listen for the migration"))
        time.sleep(0.05)
    return dest


def begin(source: GuestVM, dest: GuestVM, **parameters) -> None:
    """Set QMP migration ``parameters`` (``max-bandwidth``, ``downtime-limit``...) and start."""
    if parameters:
        source.qmp("migrate-set-parameters", **parameters)
    source.qmp("migrate", uri=dest.migration_uri)


def wait(source: GuestVM, dest: GuestVM, until=None, *, timeout: float = 180.0) -> dict:
    """Poll ``query-migrate`` until ``until(info)`` holds (default: completed); return it.

    Raises GuestError if the migration fails first. Once it completed, the
    destination's console continues the source's.
    """
    deadline = time.monotonic() + timeout
    while True:
        info = source.qmp("query-migrate")
        status = info.get("status")
        if status in ("failed", "cancelled") or time.monotonic() > deadline:
            raise GuestError(source._explain(f"migration {status}: {info}"))
        if status == "completed":
            dest._seen = source._poll_console()
            dest._pos = 0
            dest.marks.update(source.marks)
        if until(info) if until is not None else status == "completed":
            return info
        time.sleep(0.1)


def migrate(source: GuestVM, dest: GuestVM, *, timeout: float = 180.0, **parameters) -> dict:
    """Migrate ``source`` into ``dest`` in one go; return the final ``query-migrate``."""
    begin(source, dest, **parameters)
    return wait(source, dest, timeout=timeout)
