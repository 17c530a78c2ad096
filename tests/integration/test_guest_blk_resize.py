"""Online resize and cache mode of our vhost-user-blk as a real Linux guest sees them.

The host grows the image with truncate and sends SIGHUP; the back-end tells
QEMU (BACKEND_CONFIG_CHANGE_MSG), QEMU reads the new capacity and raises the
config interrupt, and the guest's /sys/block/vda/size changes without a
reboot. The guest polls for it (a bounded loop in its shell) and then writes
into the grown part. It also switches the disk to writethrough through
virtio_blk's cache_type attribute, which QEMU forwards as SET_CONFIG.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys

import pytest

from harness.backend import BackendProcess

pytestmark = pytest.mark.guest

MiB = 1 << 20
OLD, NEW = 32 * MiB, 64 * MiB


def _value(result, label: str) -> str:
    for line in result.lines:
        if line.startswith(label + " "):
            return line.split(None, 1)[1]
    raise AssertionError(f"guest printed no {label!r} line:\n{result.output}")


def test_guest_blk_sees_the_grown_disk_without_reboot(guest_vm, short_tmp, tmp_path):
    image = tmp_path / "disk.img"
    with open(image, "wb") as handle:
        handle.truncate(OLD)
    sock = short_tmp / "blk.sock"
    backend = BackendProcess([sys.executable, "-m", "vhost_user.backends.blk", "--socket", str(sock),
                              "--image", str(image), "-v"], sock, tmp_path / "ours.log").start()
    try:
        vm = guest_vm()
        vm.add_vhost_user_blk(backend.socket, num_queues=1)
        vm.start(f"""
            vhu_wait_dev /dev/vda || exit 1
            echo "size-before $(cat /sys/block/vda/size)"
            vhu_mark booted
            n=0
            until [ "$(cat /sys/block/vda/size)" = "{NEW // 512}" ]; do
                n=$((n + 1)); [ $n -lt 1200 ] || break; sleep 0.1
            done
            echo "size-after $(cat /sys/block/vda/size)"
            dd if=/dev/urandom of=/tmp/p bs=1M count=1 2>/dev/null
            dd if=/tmp/p of=/dev/vda bs=1M seek={NEW // MiB - 1} oflag=direct 2>/dev/null
            echo "tail-rc $?"
            echo "want-tail $(sha256sum /tmp/p | cut -d' ' -f1)"
            echo "cache-before $(cat /sys/block/vda/cache_type)"
            echo "write through" > /sys/block/vda/cache_type
            echo "cache-after $(cat /sys/block/vda/cache_type)"
            echo "dmesg-bad $(dmesg | grep -cE 'Call Trace|BUG:|Oops')"
        """)
        vm.wait_for_marker("booted", timeout=120)
        os.truncate(image, NEW)
        os.kill(backend.pid, signal.SIGHUP)
        result = vm.wait(timeout=180)
        assert _value(result, "size-before") == str(OLD // 512), result.output
        assert _value(result, "size-after") == str(NEW // 512), result.output
        assert _value(result, "tail-rc") == "0", result.output
        with open(image, "rb") as handle:
            handle.seek(NEW - MiB)
            assert hashlib.sha256(handle.read(MiB)).hexdigest() == _value(result, "want-tail")
        assert _value(result, "cache-before") == "write back", result.output
        assert _value(result, "cache-after") == "write through", result.output
        assert "dmesg-bad 0" in result.lines, result.output
        log = backend.log_tail(200)
        assert f"{OLD // 512} -> {NEW // 512} sectors" in log, log
        assert "cache mode: writethrough" in log, log
        assert backend.running, log
    finally:
        backend.stop()
