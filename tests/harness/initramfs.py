"""The guest's whole userland: one uncompressed initramfs, built once, cached.

Theory of operation
-------------------
The guest has no disk of its own: every disk it sees is a device under test.
Its userland is busybox-static (shell, dd, sha256sum, mount, ...) plus the
few host binaries a test needs that busybox lacks or fakes (fio, socat, the
real mkfs.ext4/e2fsck, blkdiscard), each copied with the shared libraries
``ldd`` names and the dynamic loader, at the same paths. The kernel modules
for the virtio transports and devices are taken from the unpacked kernel
package, their load order resolved from ``modules.dep`` on the host, and
stored uncompressed (Debian's 6.1 ships plain .ko; later kernels ship .ko.xz
or .ko.zst, which busybox insmod cannot load and the 6.1 kernel cannot
decompress). ``/init`` inserts them with ``insmod`` in that order: that does
not depend on busybox modprobe's reading of modules.dep.

Per boot, a second tiny newc archive holding ``/vhu/script`` (the test's
shell script, with a prelude) is appended to a copy of the cached image; the
kernel unpacks concatenated archives in order. Unlike the kernel command line
(2 KiB on x86) or fw_cfg (byte-wise port reads under TCG, plus a module),
this has no size limit and costs nothing at boot.

``/init`` runs the script with output both on the console (so a hang still
shows how far it got) and in a file, then prints the file between
``@@VHU-BEGIN:<token>@@`` and ``@@VHU-END:<token>:<status>@@`` with kernel
console messages muted, so the host parses clean output even if the kernel
logged while the script ran. The token is random per boot, so nothing
earlier in the log can be mistaken for a marker. ``vhu_mark NAME`` prints
``@@VHU-MARK:<token>:NAME@@`` for host-side ``wait_for_marker``.
"""

from __future__ import annotations

import io
import lzma
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .cache import cached_dir, short_hash
from .cpio import CpioWriter
from .kernel import GuestKernel, GuestSetupError

__all__ = ["GUEST_MODULES", "GUEST_TOOLS", "Initramfs", "build_initramfs", "boot_initrd"]

#: Modules loaded at boot, by module name; dependencies are added from modules.dep.
GUEST_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "vmw_vsock_virtio_transport",
    "virtio_gpu",
    "crc32c_generic",  # ext4/jbd2 softdep "crypto-crc32c"; not in modules.dep
    "ext4",
)

#: Host programs copied into the guest (first directory on PATH that has them).
GUEST_TOOLS = ("fio", "socat", "mkfs.ext4", "mke2fs", "e2fsck", "blkdiscard")

INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /mnt /sbin /usr/bin /usr/sbin
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
while read -r mod; do
    insmod "$mod" || echo "vhu-init: insmod $mod failed"
done < /etc/vhu/modules
[ -e /vhu/env ] && . /vhu/env
echo "@@VHU-UPTIME:$(cut -d' ' -f1 /proc/uptime)@@"
if [ -e /vhu/script ]; then
    { sh /vhu/script < /dev/null; echo $? > /tmp/vhu-rc; } 2>&1 | tee /tmp/vhu-out
else
    echo 127 > /tmp/vhu-rc; : > /tmp/vhu-out
fi
echo 1 > /proc/sys/kernel/printk
echo "@@VHU-BEGIN:$VHU_TOKEN@@"
cat /tmp/vhu-out
echo "@@VHU-END:$VHU_TOKEN:$(cat /tmp/vhu-rc)@@"
sync
poweroff -f
"""

PRELUDE = r"""# vhu prelude (tests/harness/initramfs.py)
vhu_mark() { echo "@@VHU-MARK:$VHU_TOKEN:$1@@" > /dev/console; }
vhu_wait_dev() {  # vhu_wait_dev /dev/vda [tenths of a second]
    n=0; while [ ! -b "$1" ]; do
        n=$((n + 1)); [ "$n" -gt "${2:-100}" ] && { echo "vhu: no $1" >&2; return 1; }
        sleep 0.1
    done
}
"""


@dataclass(frozen=True)
class Initramfs:
    """A built base image and what it contains."""

    path: Path
    modules: tuple[str, ...]
    tools: tuple[str, ...]


def _parse_modules_dep(modules_dir: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    by_name: dict[str, str] = {}
    deps: dict[str, list[str]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        name = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", os.path.basename(path)).replace("-", "_")
        by_name[name] = path
        deps[path] = rest.split()
    return by_name, deps


def resolve_modules(modules_dir: Path, wanted: tuple[str, ...]) -> list[str]:
    """Module paths (relative to ``modules_dir``) for ``wanted``, dependencies first.

    Names that are built into the kernel (modules.builtin) are skipped.
    """
    by_name, deps = _parse_modules_dep(modules_dir)
    builtin = {
        re.sub(r"\.ko$", "", os.path.basename(line)).replace("-", "_")
        for line in (modules_dir / "modules.builtin").read_text().split()
    }
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key in by_name:
            visit(by_name[key])
        elif key not in builtin:
            raise GuestSetupError(f"kernel has no module {name} (not in modules.dep or builtin)")
    return order


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".zst":
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    if path.suffix == ".gz":
        import gzip
        return gzip.decompress(data)
    return data


def _find_tool(name: str) -> Path:
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if not found:
        raise GuestSetupError(f"{name} not found on the host; run tools/install-test-deps.sh")
    return Path(found)


def _shared_libs(binary: Path) -> list[str]:
    """Absolute library paths ``ldd`` reports, the dynamic loader included."""
    done = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    if done.returncode != 0:  # "not a dynamic executable"
        return []
    libs = []
    for line in done.stdout.splitlines():
        match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if match:
            libs.append(match.group(1))
    return libs


def _inputs(kernel: GuestKernel) -> tuple[Path, dict[str, Path], list[str]]:
    busybox = _find_tool("busybox")
    tools = {name: _find_tool(name) for name in GUEST_TOOLS}
    modules = resolve_modules(kernel.modules_dir, GUEST_MODULES)
    return busybox, tools, modules


def _cache_key(kernel: GuestKernel, busybox: Path, tools: dict[str, Path]) -> str:
    stamps = []
    for path in [busybox, *tools.values()]:
        for file in [path, *map(Path, _shared_libs(path))]:
            st = file.stat()
            stamps.append(f"{file}:{st.st_size}:{int(st.st_mtime)}")
    source = Path(__file__).read_text()
    return short_hash(kernel.package, kernel.version, source, *stamps)


def _write(kernel: GuestKernel, busybox: Path, tools: dict[str, Path], modules: list[str],
           out: Path) -> None:
    with open(out, "wb") as handle:
        cpio = CpioWriter(handle)
        for d in ("dev", "proc", "sys", "tmp", "run", "mnt", "root", "etc/vhu", "usr/bin",
                  "usr/sbin", "sbin"):
            cpio.mkdir(d)
        cpio.chardev("dev/console", 5, 1)
        cpio.chardev("dev/null", 1, 3, 0o666)
        cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
        cpio.file("init", INIT.encode(), 0o755)
        libs: set[str] = set()
        for name, path in tools.items():
            where = "usr/sbin" if "/sbin/" in str(path) else "usr/bin"
            cpio.file(f"{where}/{name}", path.resolve().read_bytes(), 0o755)
            libs.update(_shared_libs(path))
        for lib in sorted(libs):
            cpio.file(lib, Path(lib).resolve().read_bytes(), 0o755)
        if Path("/etc/mke2fs.conf").exists():
            cpio.file("etc/mke2fs.conf", Path("/etc/mke2fs.conf").read_bytes())
        base = f"lib/modules/{kernel.release}"
        listed = []
        for rel in modules:
            plain = re.sub(r"\.(xz|zst|gz)$", "", rel)
            cpio.file(f"{base}/{plain}", _module_bytes(kernel.modules_dir / rel))
            listed.append(f"/{base}/{plain}")
        for meta in ("modules.dep", "modules.builtin", "modules.alias", "modules.softdep"):
            src = kernel.modules_dir / meta
            if src.exists():
                text = src.read_text()
                if meta == "modules.dep":
                    text = re.sub(r"\.ko\.(xz|zst|gz)\b", ".ko", text)
                cpio.file(f"{base}/{meta}", text.encode())
        cpio.file("etc/vhu/modules", ("\n".join(listed) + "\n").encode())
        cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        cpio.file("etc/group", b"root:x:0:\n")
        cpio.symlink("etc/mtab", "/proc/mounts")  # mke2fs checks for mounted devices
        cpio.close()


def build_initramfs(kernel: GuestKernel) -> Initramfs:
    """Return the cached base initramfs for ``kernel``, building it on first use."""
    busybox, tools, modules = _inputs(kernel)
    key = _cache_key(kernel, busybox, tools)
    where = cached_dir(
        f"initramfs-{kernel.release}-{key}",
        lambda work: _write(kernel, busybox, tools, modules, work / "initramfs.cpio"),
    )
    return Initramfs(where / "initramfs.cpio", tuple(GUEST_MODULES), tuple(GUEST_TOOLS))


def boot_initrd(base: Path, script: str, token: str, out: Path) -> Path:
    """Write ``base`` + an archive with ``/vhu/script`` and ``/vhu/env`` to ``out``."""
    extra = io.BytesIO()
    cpio = CpioWriter(extra)
    cpio.file("vhu/env", f"VHU_TOKEN={token}\nexport VHU_TOKEN\n".encode())
    cpio.file("vhu/script", (PRELUDE + script).encode(), 0o755)
    cpio.close()
    with open(out, "wb") as handle, open(base, "rb") as src:
        shutil.copyfileobj(src, handle, 1 << 20)
        handle.write(extra.getvalue())
    return out
