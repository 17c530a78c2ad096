"""Real libvirt drives our back-ends: it starts vhost-user-gpu itself, and attaches vhost-user-blk.

A private libvirtd (tests/harness/libvirt.py: Debian's daemon in its own
mount namespace, every file under one temporary root) boots the harness
kernel and initramfs from domain XML, with QEMU 10 as ``<emulator>``:

- gpu: ``<video><model type='virtio'/><driver name='vhostuser'/></video>``.
  libvirt picks our description file (named to sort before QEMU's own
  50-qemu-gpu.json, which stays installed), runs its ``binary`` with
  ``--fd=N`` (one end of a socket pair) and hands QEMU the other end. The
  guest writes a known image to /dev/fb0; ``virsh screenshot`` must show
  exactly those pixels, and the process libvirt started must be ours.
- blk: ``<disk type='vhostuser'>`` on a socket that a back-end started by
  the test serves, with ``<reconnect>``. The back-end is killed while the
  guest runs and restarted; the guest's reads and writes after that go to
  the new process, and the image file on the host holds what it wrote.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from harness import short_tempdir
from harness.backend import BackendProcess
from harness.fixtures import guest_unavailable, require_tool
from harness.guestgpu import BLOCK, expected_frame
from harness.libvirt import LibvirtDaemon, LibvirtGuest, process_cmdline

pytestmark = pytest.mark.guest

MiB = 1 << 20
IMAGE_MB = 64
#: Sorts before QEMU's 50-qemu-gpu.json: libvirt takes the first gpu description by file name.
GPU_DESCRIPTION = "40-vhost-user-gpu.json"
MAGIC = b"vhu-host-restart"


def console_script(name: str) -> str:
    """Our console script ``name`` in the environment that runs the tests (absolute)."""
    path = Path(sys.executable).parent / name
    if not os.access(path, os.X_OK):
        guest_unavailable(f"{path} not found: install the package into this environment")
    return str(path)


@pytest.fixture(scope="module")
def libvirt_daemon():
    if os.geteuid() != 0:
        guest_unavailable("libvirtd in a private mount namespace needs root")
    daemon = LibvirtDaemon(short_tempdir("vhu-lv-"), libvirtd=require_tool("libvirtd"),
                           virsh=require_tool("virsh"), unshare=require_tool("unshare"))
    try:
        yield daemon.start()
    finally:
        daemon.stop()
        shutil.rmtree(daemon.root, ignore_errors=True)


@pytest.fixture
def libvirt_guest(libvirt_daemon, qemu_binary, guest_kernel, guest_initramfs, tmp_path):
    guests: list[LibvirtGuest] = []

    def make(name: str, devices: str, **kwargs) -> LibvirtGuest:
        guest = LibvirtGuest(libvirt_daemon, name, guest_kernel, guest_initramfs,
                             tmp_path / name, devices, emulator=qemu_binary, **kwargs)
        guests.append(guest)
        return guest

    yield make
    for guest in guests:
        guest.close()


def _fb_script() -> str:
    """Fill /dev/fb0 with the BLOCK pattern in one write, then wait to be looked at."""
    octal = "".join(f"\\{b:03o}" for b in BLOCK)
    return f"""
n=0; while [ ! -e /dev/fb0 ]; do n=$((n+1)); [ $n -gt 200 ] && {{ echo no fb0; exit 1; }}; sleep 0.1; done
for v in /sys/class/vtconsole/vtcon*; do echo 0 > $v/bind 2>/dev/null; done
size=$(( $(cat /sys/class/graphics/fb0/stride) * $(cut -d, -f2 /sys/class/graphics/fb0/virtual_size) ))
echo "geometry $(cat /sys/class/graphics/fb0/virtual_size) $(cat /sys/class/graphics/fb0/stride)" > /dev/console
printf '{octal}' > /tmp/img
while [ $(stat -c %s /tmp/img) -lt $size ]; do cat /tmp/img /tmp/img > /tmp/t; mv /tmp/t /tmp/img; done
head -c $size /tmp/img > /tmp/frame
dd if=/tmp/frame of=/dev/fb0 bs=$size count=1 2>/dev/null || exit 2
vhu_mark written
sleep 300
"""


def _screenshot(daemon: LibvirtDaemon, name: str, path: Path) -> np.ndarray:
    from PIL import Image
    daemon.virsh("screenshot", name, str(path), "--screen", "0")
    with Image.open(io.BytesIO(path.read_bytes())) as image:
        return np.asarray(image.convert("RGB"))


def test_libvirt_starts_our_gpu_backend_and_its_scanout_is_the_screenshot(
        libvirt_daemon, libvirt_guest, tmp_path):
    try:
        import PIL  # noqa: F401  (reads virsh's PNG screenshot)
    except ImportError:
        guest_unavailable("Pillow not installed (pip install '.[test]')")
    gpu = console_script("vhost-user-gpu")
    printed = subprocess.run([gpu, "--print-description"], capture_output=True, text=True,
                             check=True).stdout
    description = json.loads(printed)
    assert description["type"] == "gpu" and description["binary"] == gpu
    (libvirt_daemon.description_dir / GPU_DESCRIPTION).write_text(printed)
    assert (libvirt_daemon.description_dir / "50-qemu-gpu.json").exists() or not \
        Path("/usr/share/qemu/vhost-user/50-qemu-gpu.json").exists()

    vm = libvirt_guest("vhu-gpu", "<video><model type='virtio' heads='1'/>"
                                  "<driver name='vhostuser'/></video>")
    vm.start(_fb_script())
    vm.wait_for_marker("written", timeout=90)

    # The process libvirt started for the video device is ours, on a passed fd.
    helpers = {n: p for n, p in libvirt_daemon.pids().items()
               if n.endswith("-vhost-user-gpu.pid")}
    assert len(helpers) == 1, libvirt_daemon.pids()
    (helper_pid,) = helpers.values()
    argv = process_cmdline(helper_pid)
    assert gpu in argv[:2], argv  # the console script (argv[0] is its interpreter)
    assert any(re.fullmatch(r"--fd=\d+", arg) for arg in argv), argv
    assert vm.command[0] == vm.qemu  # our <emulator> (QEMU 10), not libvirt's pick
    qemu_argv = " ".join(vm.command)
    assert re.search(r'"driver":"vhost-user-(vga|gpu-pci)"', qemu_argv), qemu_argv
    assert re.search(r"-chardev socket,id=chr-vu-video0,fd=\d+", qemu_argv), qemu_argv

    match = re.search(r"geometry (\d+),(\d+) (\d+)", vm.console.read_text(errors="replace"))
    assert match, vm.console_tail()
    width, height, stride = map(int, match.groups())
    expect = expected_frame(width, height, stride)
    deadline = time.monotonic() + 30  # fbdev's deferred flush lands a little after the write
    shot = _screenshot(libvirt_daemon, "vhu-gpu", tmp_path / "shot.png")
    while not (shot.shape == expect.shape and np.array_equal(shot, expect)) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
        shot = _screenshot(libvirt_daemon, "vhu-gpu", tmp_path / "shot.png")
    assert shot.shape == expect.shape, (shot.shape, expect.shape)
    assert np.array_equal(shot, expect), f"{np.count_nonzero(shot != expect)} bytes differ"

    # Destroying the domain stops QEMU and the back-end libvirt started.
    libvirt_daemon.virsh("destroy", "vhu-gpu")
    deadline = time.monotonic() + 30
    while process_cmdline(helper_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_cmdline(helper_pid), "vhost-user-gpu outlived its domain"


def _disk_xml(sock: Path) -> str:
    return (f"<disk type='vhostuser' device='disk'><driver name='qemu' type='raw'/>"
            f"<source type='unix' path='{sock}'><reconnect enabled='yes' timeout='1'/></source>"
            f"<target dev='vda' bus='virtio'/></disk>")


def _guest_sha(result, label: str) -> str:
    for line in result.lines:
        if line.startswith(label + " "):
            return line.split()[1]
    raise AssertionError(f"guest printed no {label!r} line:\n{result.output}")


def test_libvirt_vhostuser_disk_survives_a_backend_restart(libvirt_guest, short_tmp, tmp_path):
    blk = console_script("vhost-user-blk")
    image = tmp_path / "disk.img"
    with open(image, "wb") as handle:
        handle.truncate(IMAGE_MB * MiB)
    sock = short_tmp / "blk.sock"
    backend = BackendProcess([blk, "--socket", sock, "--image", image, "-v"], sock,
                             tmp_path / "blk.log").start()
    try:
        vm = libvirt_guest("vhu-blk", _disk_xml(sock))
        vm.start(f"""
            set -e
            vhu_wait_dev /dev/vda
            echo "sectors $(cat /sys/block/vda/size)"
            dd if=/dev/urandom of=/tmp/p bs=64k count=16 2>/dev/null
            echo "pattern $(sha256sum < /tmp/p | cut -d' ' -f1)"
            dd if=/tmp/p of=/dev/vda bs=64k seek=16 conv=fsync 2>/dev/null
            vhu_mark written
            # Sector 0 says so once the host killed the back-end and restarted it.
            n=0
            until [ "$(echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c {len(MAGIC)})" = "{MAGIC.decode()}" ]; do
                n=$((n + 1)); [ $n -gt 900 ] && {{ echo "no restart seen"; exit 1; }}
                sleep 0.1
            done
            echo "readback $(dd if=/dev/vda bs=64k skip=16 count=16 2>/dev/null | sha256sum | cut -d' ' -f1)"
            dd if=/tmp/p of=/dev/vda bs=64k seek=48 conv=fsync 2>/dev/null
            echo "rewritten"
        """)
        vm.wait_for_marker("written", timeout=90)
        backend.kill()
        with open(image, "r+b") as handle:  # only the new process can show the guest this
            handle.write(MAGIC)
            handle.flush()
            os.fsync(handle.fileno())
        backend.start()
        emulator, qemu_argv = vm.command[0], " ".join(vm.command)
        result = vm.wait(timeout=90)
    finally:
        backend.stop()
    assert f"sectors {IMAGE_MB * MiB // 512}" in result.lines, result.output
    assert emulator == vm.qemu
    assert re.search(r'"driver":"vhost-user-blk-pci"', qemu_argv), qemu_argv
    pattern = _guest_sha(result, "pattern")
    assert _guest_sha(result, "readback") == pattern, result.output
    assert "rewritten" in result.lines, result.output
    data = image.read_bytes()
    assert hashlib.sha256(data[1 * MiB:2 * MiB]).hexdigest() == pattern
    assert hashlib.sha256(data[3 * MiB:4 * MiB]).hexdigest() == pattern, backend.log_tail()
    log = backend.log_path.read_text(errors="replace")
    assert backend.starts == 2 and log.count("queue 0 started") >= 2, backend.log_tail()
