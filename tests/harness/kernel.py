"""The guest kernel: Debian's own ``linux-image-amd64``, unpacked, never installed.

Theory of operation
-------------------
The back-ends must be proven against the virtio drivers of a real,
unmodified distribution kernel, so the harness uses the kernel package the
machine's apt sources already serve (no extra download host, no kernel
build). ``linux-image-amd64`` is a meta-package; its ``Depends`` names the
real ``linux-image-6.x-amd64`` package, whose exact version keys the cache.

The package is fetched with ``apt-get download`` (no root needed) and
unpacked with ``dpkg-deb -x`` into the cache: installing it would touch the
host's /boot and bootloader. The package ships no ``modules.dep`` (the
postinst runs depmod), so ``depmod -b`` is run on the unpacked tree.

Under TCG a bzImage spends seconds decompressing itself with emulated
instructions before Linux starts. The uncompressed ELF ``vmlinux`` is
carved out of the bzImage (xz, gzip or zstd payload) and booted through
QEMU's PVH entry instead. Measured with qboot on 2 cores, script-to-poweroff
wall time: 6.1 (xz) 3.1-3.4 s vmlinux vs 6.1-7.2 s bzImage; 6.12 (zstd)
3.6 s vs 4.5-6.6 s. ``bzimage`` stays available.

Environment:
  VHOST_USER_TEST_KERNEL_SUITE  apt target release to take the kernel from,
                                e.g. ``bookworm-backports`` (default: the
                                candidate apt would install).
  VHOST_USER_TEST_KERNEL_IMAGE  ``vmlinux`` (default) or ``bzimage``.
"""

from __future__ import annotations

import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from .cache import cached_dir

__all__ = ["GuestKernel", "GuestSetupError", "fetch_kernel", "resolve_kernel_package"]

META_PACKAGE = "linux-image-amd64"
ENV_SUITE = "VHOST_USER_TEST_KERNEL_SUITE"
ENV_IMAGE = "VHOST_USER_TEST_KERNEL_IMAGE"


class GuestSetupError(RuntimeError):
    """The guest could not be prepared (missing tool, apt lists, bad package)."""


@dataclass(frozen=True)
class GuestKernel:
    """Paths of an unpacked guest kernel.

    ``image`` is what QEMU's ``-kernel`` gets: the ELF vmlinux (faster under
    TCG) unless $VHOST_USER_TEST_KERNEL_IMAGE=bzimage.
    """

    package: str
    version: str
    release: str
    root: Path
    bzimage: Path
    vmlinux: Path | None

    @property
    def modules_dir(self) -> Path:
        """``lib/modules/<release>`` inside the unpacked tree (has modules.dep)."""
        return self.root / "lib" / "modules" / self.release

    @property
    def image(self) -> Path:
        """The file to boot with ``-kernel``."""
        want = os.environ.get(ENV_IMAGE, "vmlinux").lower()
        if want == "vmlinux" and self.vmlinux is not None:
            return self.vmlinux
        return self.bzimage


def _apt_target() -> list[str]:
    suite = os.environ.get(ENV_SUITE)
    return ["-t", suite] if suite else []


def _run(cmd: list[str], **kwargs) -> str:
    try:
        done = subprocess.run(cmd, check=True, capture_output=True, text=True, **kwargs)
    except FileNotFoundError as exc:
        raise GuestSetupError(f"{cmd[0]} not found; run tools/install-test-deps.sh") from exc
    except subprocess.CalledProcessError as exc:
        raise GuestSetupError(
            f"{' '.join(cmd)} failed ({exc.returncode}): {exc.stderr.strip()[-2000:]}"
        ) from exc
    return done.stdout


def _show(package: str) -> dict[str, str]:
    text = _run(["apt-cache", *_apt_target(), "show", "--no-all-versions", package])
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep and not line.startswith(" "):
            fields.setdefault(key, value)
    if "Version" not in fields:
        raise GuestSetupError(
            f"apt knows no {package}; run 'apt-get update' (tools/install-test-deps.sh does)"
        )
    return fields


def resolve_kernel_package(meta: str = META_PACKAGE) -> tuple[str, str]:
    """Return ``(package, version)`` of the real kernel image ``meta`` depends on."""
    depends = _show(meta).get("Depends", "")
    match = re.search(r"(linux-image-[0-9][^\s,(|]*)", depends)
    if not match:
        raise GuestSetupError(f"{meta} depends on no linux-image-<version> package: {depends!r}")
    package = match.group(1)
    return package, _show(package)["Version"]


def _download(package: str, version: str, into: Path) -> Path:
    # apt-get download drops privileges to _apt when run as root, which
    # cannot write into a root-owned 0700 temp dir: give it a 0755 dir and
    # tell apt not to sandbox, so no warning and no failure either way.
    into.chmod(0o755)
    sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
    cmd = ["apt-get", "-q", *sandbox, "download", f"{package}={version}"]
    _run(cmd, cwd=into)
    debs = sorted(into.glob("*.deb"))
    if len(debs) != 1:
        raise GuestSetupError(f"apt-get download {package} left {debs}")
    return debs[0]


def _payload(bzimage: bytes) -> bytes:
    """The compressed kernel inside a bzImage (boot protocol >= 2.08 header)."""
    if bzimage[0x202:0x206] != b"HdrS":
        raise GuestSetupError("not a bzImage: no HdrS header")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    return bzimage[start:start + length]


def extract_vmlinux(bzimage: Path, out: Path) -> Path:
    """Decompress the ELF kernel out of ``bzimage`` into ``out`` (xz, gzip, zstd)."""
    payload = _payload(bzimage.read_bytes())
    if payload.startswith(b"\xfd7zXZ\x00"):
        data = lzma.LZMADecompressor().decompress(payload)
    elif payload.startswith(b"\x1f\x8b"):
        import zlib
        data = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    elif payload.startswith(b"\x28\xb5\x2f\xfd"):
        # The build appends the uncompressed size (le32) to every payload;
        # zstd(1) rejects it as a truncated second frame, so cut it off.
        data = subprocess.run(["zstd", "-dc"], input=payload[:-4], capture_output=True,
                              check=True).stdout
    else:
        raise GuestSetupError(f"unknown kernel compression, magic {payload[:6].hex()}")
    if not data.startswith(b"\x7fELF"):
        raise GuestSetupError("decompressed kernel is not an ELF file")
    out.write_bytes(data)
    return out


def _build(package: str, version: str, work: Path) -> None:
    with tempfile.TemporaryDirectory(dir=work.parent) as dl:
        deb = _download(package, version, Path(dl))
        _run(["dpkg-deb", "-x", str(deb), str(work / "root")])
    releases = [p.name for p in (work / "root" / "lib" / "modules").iterdir()]
    if len(releases) != 1:
        raise GuestSetupError(f"{package} ships modules for {releases}, expected one release")
    depmod = shutil.which("depmod") or "/usr/sbin/depmod"
    _run([depmod, "-b", str(work / "root"), releases[0]])
    bzimage = next((work / "root" / "boot").glob("vmlinuz-*"))
    try:
        extract_vmlinux(bzimage, work / "vmlinux")
    except (GuestSetupError, lzma.LZMAError, OSError, subprocess.CalledProcessError) as exc:
        # The bzImage still boots, only slower; say why, once per fetch_kernel().
        (work / "vmlinux-error.txt").write_text(f"{type(exc).__name__}: {exc}\n")
    (work / "release").write_text(releases[0])


def fetch_kernel(meta: str = META_PACKAGE) -> GuestKernel:
    """Download (once), unpack and depmod the guest kernel; return its paths."""
    package, version = resolve_kernel_package(meta)
    safe = re.sub(r"[^A-Za-z0-9.+-]", "_", f"{package}_{version}")
    where = cached_dir(f"kernel-{safe}", lambda work: _build(package, version, work))
    vmlinux = where / "vmlinux"
    if not vmlinux.exists():
        error = where / "vmlinux-error.txt"
        reason = error.read_text().strip() if error.exists() else "no vmlinux in the cache"
        warnings.warn(f"booting the compressed bzImage (slower under TCG): {reason}",
                      stacklevel=2)
    return GuestKernel(
        package=package,
        version=version,
        release=(where / "release").read_text().strip(),
        root=where / "root",
        bzimage=next((where / "root" / "boot").glob("vmlinuz-*")),
        vmlinux=vmlinux if vmlinux.exists() else None,
    )
