"""virtio-blk features of our back-end as a real Linux guest sees them.

* DISCARD: ``blkdiscard`` in the guest punches holes in the image file, so
  the file's allocated blocks shrink and the range reads back as zeroes.
* RO: with ``--read-only`` the kernel marks the disk read-only, refuses
  writes without a crash, and the image does not change by a byte.

The discard test needs the host to look at the image between two guest
steps. The guest waits for the host by polling sector 0 of its disk with
O_DIRECT until the host has written a token there through the image file
(the back-end serves every read from that file, no cache in between).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import secrets
import time
from pathlib import Path

import pytest

from harness.backend import BackendProcess
from harness.guestblk import ours_argv, sparse_image

pytestmark = pytest.mark.guest

MiB = 1 << 20
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_SEEK_DATA = getattr(os, "SEEK_DATA", 3)
_SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


def allocated(path: Path) -> int:
    """Bytes the file system has allocated to ``path`` (st_blocks is in 512-byte units)."""
    return os.stat(path).st_blocks * 512


def require_punch_hole(directory: Path) -> None:
    """Fail clearly if ``directory``'s file system cannot punch holes (the test would be moot)."""
    probe = directory / "punch-probe"
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"x" * 65536)
        os.fsync(fd)
        if libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, 65536) != 0:
            err = ctypes.get_errno()
            pytest.fail(f"{directory}: no hole punching ({errno.errorcode.get(err, err)}); "
                        "run pytest with --basetemp on ext4, xfs or tmpfs", pytrace=False)
    finally:
        os.close(fd)
        probe.unlink()


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def guest_value(result, label: str) -> str:
    for line in result.lines:
        if line.startswith(label + " "):
            return line.split(None, 1)[1]
    raise AssertionError(f"guest printed no {label!r} line:\n{result.output}")


@pytest.fixture
def ours(short_tmp, tmp_path):
    """Factory: start our back-end on a fresh 64 MiB image; stopped at teardown."""
    started: list[BackendProcess] = []

    def start(image: Path, *extra: str) -> BackendProcess:
        sock = short_tmp / "blk.sock"
        backend = BackendProcess(ours_argv(image, sock, *extra), sock,
                                 tmp_path / "ours.log").start()
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.stop()


def test_guest_blk_discard_punches_holes_in_image(guest_vm, ours, tmp_path):
    require_punch_hole(tmp_path)
    image = sparse_image(tmp_path / "disk.img", 64 * MiB)
    token = secrets.token_hex(8)
    backend = ours(image)
    vm = guest_vm()
    vm.add_vhost_user_blk(backend.socket, num_queues=1)
    # 8 MiB of data at 8 MiB, then (after the host has measured) discard the
    # middle 4 MiB of it: 10..14 MiB.
    vm.start(f"""
        set -e
        vhu_wait_dev /dev/vda
        echo "discard-max $(cat /sys/block/vda/queue/discard_max_bytes)"
        dd if=/dev/urandom of=/tmp/p bs=1M count=8 2>/dev/null
        dd if=/tmp/p of=/dev/vda bs=1M seek=8 conv=fsync 2>/dev/null
        vhu_mark written
        n=0
        until dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | grep -q {token}; do
            n=$((n + 1)); [ $n -lt 600 ] || exit 3; sleep 0.1
        done
        blkdiscard -o $((10 * 1048576)) -l $((4 * 1048576)) /dev/vda
        echo "discard-rc $?"
        echo 3 > /proc/sys/vm/drop_caches
        echo "hole $(dd if=/dev/vda bs=1M skip=10 count=4 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
        echo "head $(dd if=/dev/vda bs=1M skip=8 count=2 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
        echo "want-head $(dd if=/tmp/p bs=1M count=2 2>/dev/null | sha256sum | cut -d' ' -f1)"
        echo "tail $(dd if=/dev/vda bs=1M skip=14 count=2 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
        echo "want-tail $(dd if=/tmp/p bs=1M skip=6 count=2 2>/dev/null | sha256sum | cut -d' ' -f1)"
    """)
    vm.wait_for_marker("written", timeout=60)
    before = allocated(image)
    with open(image, "r+b") as handle:
        handle.write(token.encode())
        handle.flush()
    result = vm.wait(timeout=60)
    after = allocated(image)

    assert int(guest_value(result, "discard-max")) > 0, result.output
    assert guest_value(result, "discard-rc") == "0", result.output
    assert before >= 8 * MiB, f"only {before} bytes allocated after an 8 MiB write"
    # 4 MiB went back to the file system (allow a block or two of rounding).
    assert before - after >= 4 * MiB - 8192, (before, after)
    with open(image, "rb") as handle:
        fd = handle.fileno()
        assert os.lseek(fd, 10 * MiB, _SEEK_HOLE) == 10 * MiB
        assert os.lseek(fd, 10 * MiB, _SEEK_DATA) == 14 * MiB
    assert guest_value(result, "hole") == hashlib.sha256(bytes(4 * MiB)).hexdigest()
    assert guest_value(result, "head") == guest_value(result, "want-head")
    assert guest_value(result, "tail") == guest_value(result, "want-tail")


def test_guest_blk_read_only_backend_refuses_guest_writes(guest_vm, ours, tmp_path):
    image = sparse_image(tmp_path / "disk.img", 64 * MiB)
    data = os.urandom(MiB)
    with open(image, "r+b") as handle:
        handle.seek(2 * MiB)
        handle.write(data)
    digest_before = hashlib.sha256(image.read_bytes()).hexdigest()
    backend = ours(image, "--read-only")
    vm = guest_vm()
    vm.add_vhost_user_blk(backend.socket, num_queues=1)
    result = vm.run("""
        vhu_wait_dev /dev/vda || exit 1
        echo "sysfs-ro $(cat /sys/block/vda/ro)"
        echo "getro $(blockdev --getro /dev/vda)"
        dd if=/dev/urandom of=/dev/vda bs=4k count=1 seek=512 oflag=direct 2>/tmp/dd.err
        echo "dd-rc $?"
        echo "dd-err $(cat /tmp/dd.err)"
        dd if=/dev/urandom of=/dev/vda bs=4k count=1 conv=fsync 2>/dev/null
        echo "dd2-rc $?"
        blockdev --setrw /dev/vda 2>/dev/null
        dd if=/dev/urandom of=/dev/vda bs=4k count=1 oflag=direct 2>/dev/null
        echo "dd3-rc $?"
        echo "read $(dd if=/dev/vda bs=64k skip=32 count=16 2>/dev/null | sha256sum | cut -d' ' -f1)"
        echo "dmesg-bad $(dmesg | grep -cE 'Call Trace|BUG:|Oops')"
    """, timeout=60)
    assert "sysfs-ro 1" in result.lines, result.output
    assert "getro 1" in result.lines, result.output
    for key in ("dd-rc", "dd2-rc", "dd3-rc"):
        assert guest_value(result, key) != "0", result.output
    assert guest_value(result, "read") == hashlib.sha256(data).hexdigest()
    assert "dmesg-bad 0" in result.lines, result.output
    console = vm.console.read_text(errors="replace")
    assert "Call Trace" not in console and "Kernel panic" not in console, vm.console_tail()
    assert backend.running, backend.log_tail()
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest_before
