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

fio alone drags in about 65 MB of shared libraries (librbd, ceph, ICU...),
which would triple the image and add about a second of unpacking to every
boot under TCG. It therefore lives in an optional *layer*, a second cached
archive appended only for scripts that use it (``LAYERS``; ``GuestVM``
picks layers whose tool name appears in the script, or takes an explicit
list).

The ``gl`` layer carries two GL clients, kmscube and glmark2-es2-drm, and
what they need beyond what ``ldd`` shows (``LAYER_FILES``): the pieces Mesa,
glvnd and glmark2 open with dlopen (libEGL_mesa, the glvnd EGL vendor file,
libgbm's DRI backend, the virtio_gpu DRI driver, libEGL/libGLESv2) and
glmark2's data, each with its own ``ldd`` libraries. libgallium pulls in
libLLVM: the layer is about 200 MB, so a guest that uses it needs about
1 GiB of RAM.

Per boot, a further tiny newc archive holding ``/vhu/script`` (the test's
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
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from .cache import cached_dir, prune, short_hash
from .cpio import CpioWriter
from .kernel import GuestKernel, GuestSetupError

__all__ = ["GUEST_MODULES", "GUEST_TOOLS", "LAYERS", "LAYER_FILES", "Initramfs", "boot_initrd",
           "build_initramfs", "layers_for"]

#: Modules loaded at boot, by module name, with the virtio device ID whose
#: presence they need (None: always). Dependencies come from modules.dep.
#: A device driver is only inserted when such a device exists: the DRM stack
#: alone costs ~0.3 s of emulated boot.
GUEST_MODULES = (
    ("virtio_pci", None),
    ("virtio_blk", 2),
    ("virtio_net", 1),
    ("vmw_vsock_virtio_transport", 19),
    ("virtio_gpu", 16),
    ("virtio_rng", 4),
    ("crc32c_generic", None),  # ext4/jbd2 softdep "crypto-crc32c"; not in modules.dep
    ("ext4", None),
)

#: Host programs copied into the guest (first directory on PATH that has them).
GUEST_TOOLS = ("fio", "socat", "mkfs.ext4", "mke2fs", "e2fsck", "blkdiscard", "ethtool",
               "kmscube", "glmark2-es2-drm")

#: Optional archives: layer name -> the tools it carries (with their libraries).
LAYERS = {"fio": ("fio",), "ethtool": ("ethtool",), "gl": ("kmscube", "glmark2-es2-drm")}

_LIBDIR = f"/usr/lib/{sysconfig.get_config_var('MULTIARCH') or 'x86_64-linux-gnu'}"

#: Files a layer carries besides its tools, at the same paths, each with the
#: libraries ``ldd`` names: (glob, required). Mesa and glvnd dlopen these.
LAYER_FILES = {
    "gl": (
        (f"{_LIBDIR}/libEGL_mesa.so.0", True),
        ("/usr/share/glvnd/egl_vendor.d/50_mesa.json", True),
        (f"{_LIBDIR}/dri/virtio_gpu_dri.so", True),
        (f"{_LIBDIR}/gbm/dri_gbm.so", False),  # Mesa >= 24.3 moved libgbm's backend here
        ("/usr/share/drirc.d/*.conf", False),
        ("/usr/share/glmark2/**/*", True),  # glmark2's models, shaders, textures
        (f"{_LIBDIR}/libGLESv2.so.2", True),  # glmark2 dlopens these two
        (f"{_LIBDIR}/libEGL.so.1", True),
    ),
}

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
while read -r virtio_id mods; do
    if [ "$virtio_id" != "-" ]; then
        grep -qx "$virtio_id" /sys/bus/virtio/devices/*/device 2>/dev/null || continue
    fi
    for mod in $mods; do
        name=$(basename "$mod" .ko | tr - _)
        # module.param=value from the kernel command line, as modprobe passes them
        args=$(tr ' ' '\n' < /proc/cmdline | sed -n "s/^$name\.//p")
        grep -q "^$name " /proc/modules || insmod "$mod" $args || echo "vhu-init: insmod $mod failed"
    done
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
    """The cached base archive, the optional layer archives, and what they hold."""

    path: Path
    layers: dict[str, Path]
    modules: tuple[str, ...]
    tools: tuple[str, ...]


def layers_for(script: str) -> tuple[str, ...]:
    """The layers whose tools ``script`` mentions as a word (``fio`` -> ``("fio",)``)."""
    return tuple(name for name, tools in LAYERS.items()
                 if any(re.search(rf"(?<![\w.-]){re.escape(t)}(?![\w.-])", script)
                        for t in tools))


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


def _layer_files(layer: str) -> list[Path]:
    """The host files LAYER_FILES names for ``layer`` (globs expanded)."""
    found: list[Path] = []
    for pattern, required in LAYER_FILES.get(layer, ()):
        matches = sorted(p for p in Path("/").glob(pattern.lstrip("/")) if p.is_file())
        if required and not matches:
            raise GuestSetupError(f"{pattern} not found on the host (layer {layer}); "
                                  "run tools/install-test-deps.sh")
        found += matches
    return found


def _inputs(kernel: GuestKernel) -> tuple[Path, dict[str, Path], list[tuple[int | None, list[str]]]]:
    busybox = _find_tool("busybox")
    tools = {name: _find_tool(name) for name in GUEST_TOOLS}
    modules = [(virtio_id, resolve_modules(kernel.modules_dir, (name,)))
               for name, virtio_id in GUEST_MODULES]
    return busybox, tools, modules


def _cache_key(kernel: GuestKernel, busybox: Path, tools: dict[str, Path]) -> str:
    stamps = []
    extra = [f for layer in LAYER_FILES for f in _layer_files(layer)]
    for path in [busybox, *tools.values(), *extra]:
        for file in [path, *map(Path, _shared_libs(path))]:
            st = file.stat()
            stamps.append(f"{file}:{st.st_size}:{int(st.st_mtime)}")
    source = Path(__file__).read_text()
    return short_hash(kernel.package, kernel.version, source, *stamps)


def _add_tools(cpio: CpioWriter, tools: dict[str, Path], skip_libs: set[str],
               files: list[Path] = ()) -> set[str]:
    libs: set[str] = set()
    for name, path in tools.items():
        where = "usr/sbin" if "/sbin/" in str(path) else "usr/bin"
        cpio.file(f"{where}/{name}", path.resolve().read_bytes(), 0o755)
        libs.update(_shared_libs(path))
    for path in files:  # at their own path (a symlink's target's bytes)
        cpio.file(str(path).lstrip("/"), path.resolve().read_bytes(), 0o755)
        libs.update(_shared_libs(path))
    libs -= {str(p) for p in files}
    for lib in sorted(libs - skip_libs):
        cpio.file(lib, Path(lib).resolve().read_bytes(), 0o755)
    return libs


def _write_base(kernel: GuestKernel, busybox: Path, tools: dict[str, Path],
                modules: list[tuple[int | None, list[str]]], out: Path) -> set[str]:
    with open(out, "wb") as handle:
        cpio = CpioWriter(handle)
        for d in ("dev", "proc", "sys", "tmp", "run", "mnt", "root", "etc/vhu", "usr/bin",
                  "usr/sbin", "sbin"):
            cpio.mkdir(d)
        cpio.chardev("dev/console", 5, 1)
        cpio.chardev("dev/null", 1, 3, 0o666)
        cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
        cpio.file("init", INIT.encode(), 0o755)
        libs = _add_tools(cpio, tools, set())
        if Path("/etc/mke2fs.conf").exists():
            cpio.file("etc/mke2fs.conf", Path("/etc/mke2fs.conf").read_bytes())
        base = f"lib/modules/{kernel.release}"
        for rel in sorted({rel for _, rels in modules for rel in rels}):
            plain = re.sub(r"\.(xz|zst|gz)$", "", rel)
            cpio.file(f"{base}/{plain}", _module_bytes(kernel.modules_dir / rel))
        listed = []
        for virtio_id, rels in modules:
            tag = "-" if virtio_id is None else f"0x{virtio_id:04x}"
            paths = [f"/{base}/" + re.sub(r"\.(xz|zst|gz)$", "", rel) for rel in rels]
            listed.append(" ".join([tag, *paths]))
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
    return libs


def _write_all(kernel: GuestKernel, busybox: Path, tools: dict[str, Path],
               modules: list[tuple[int | None, list[str]]], work: Path) -> None:
    optional = {t for names in LAYERS.values() for t in names}
    base_libs = _write_base(kernel, busybox,
                            {n: p for n, p in tools.items() if n not in optional},
                            modules, work / "initramfs.cpio")
    for layer, names in LAYERS.items():
        with open(work / f"layer-{layer}.cpio", "wb") as handle:
            cpio = CpioWriter(handle)
            _add_tools(cpio, {n: tools[n] for n in names}, base_libs, _layer_files(layer))
            cpio.close()


def build_initramfs(kernel: GuestKernel) -> Initramfs:
    """Return the cached base initramfs for ``kernel``, building it on first use."""
    busybox, tools, modules = _inputs(kernel)
    key = _cache_key(kernel, busybox, tools)
    where = cached_dir(
        f"initramfs-{kernel.release}-{key}",
        lambda work: _write_all(kernel, busybox, tools, modules, work),
    )
    prune("initramfs-", where.name)
    return Initramfs(where / "initramfs.cpio",
                     {name: where / f"layer-{name}.cpio" for name in LAYERS},
                     tuple(name for name, _ in GUEST_MODULES), tuple(GUEST_TOOLS))


def boot_initrd(initramfs: Initramfs, script: str, token: str, out: Path,
                layers: tuple[str, ...] | None = None) -> Path:
    """Write base + ``layers`` + an archive with ``/vhu/script`` and ``/vhu/env`` to ``out``.

    ``layers=None`` picks them from the script (:func:`layers_for`).
    """
    if layers is None:
        layers = layers_for(script)
    extra = io.BytesIO()
    cpio = CpioWriter(extra)
    cpio.file("vhu/env", f"VHU_TOKEN={token}\nexport VHU_TOKEN\n".encode())
    cpio.file("vhu/script", (PRELUDE + script).encode(), 0o755)
    cpio.close()
    with open(out, "wb") as handle:
        for part in [initramfs.path, *(initramfs.layers[name] for name in layers)]:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, handle, 1 << 20)
        handle.write(extra.getvalue())
    return out
