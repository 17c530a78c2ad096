"""Packed virtqueues (virtio 1.2, 2.8) under real Linux guests: QEMU 10 with ``packed=on``.

Each device is booted once with every queue packed. The guest's own view
proves the layout was negotiated (bit 34 of /sys/bus/virtio/devices/*/features)
and the back-end's log that its queues started packed; the work itself is the
same the split-ring guest tests check (fio verify, a TCP stream, a vsock
stream, a scanout), so a lost or doubled buffer shows as a failed check.
"""

from __future__ import annotations

import sys

import pytest

from harness.backend import BackendProcess

pytestmark = pytest.mark.guest

MiB = 1 << 20

#: prints "packed-bit N" for each virtio device: N is feature bit 34 as the guest acked it
PACKED_BIT = """
for f in /sys/bus/virtio/devices/*/features; do
    echo "packed-bit $(cut -c35 < $f) $(cat ${f%/features}/device)"
done
"""


def _packed_bits(result, device_id: str) -> list[str]:
    return [line.split()[1] for line in result.lines
            if line.startswith("packed-bit ") and line.split()[2] == device_id]


def _packed_queues(backend: BackendProcess) -> int:
    return backend.log_tail(1 << 20).count("packed ring")


def test_guest_blk_on_packed_rings_passes_fio_verify(guest_vm, short_tmp, tmp_path):
    image = tmp_path / "disk.img"
    with open(image, "wb") as handle:
        handle.truncate(64 * MiB)
    sock = short_tmp / "blk.sock"
    argv = [sys.executable, "-m", "vhost_user.backends.blk", "--socket", str(sock),
            "--image", str(image), "--num-queues", "2", "-v"]
    backend = BackendProcess(argv, sock, tmp_path / "blk.log").start()
    try:
        vm = guest_vm(cpus=2)
        vm.add_vhost_user_blk(sock, num_queues=2, packed="on")
        result = vm.run(PACKED_BIT + """
            set -e
            vhu_wait_dev /dev/vda
            fio --name=verify --filename=/dev/vda --ioengine=libaio --direct=1 \\
                --rw=randwrite --bs=4k --size=8m --iodepth=32 --numjobs=2 \\
                --offset_increment=16m --cpus_allowed=0-1 --cpus_allowed_policy=split \\
                --group_reporting --verify=crc32c --do_verify=1 --verify_fatal=1 \\
                --output-format=terse --terse-version=3 > /tmp/fio.out || rc=$?
            echo "fio-rc ${rc:-0}"
            echo "terse $(grep '^3;' /tmp/fio.out | cut -d';' -f1-6)"
            dd if=/dev/urandom of=/tmp/p bs=1M count=4 2>/dev/null
            dd if=/tmp/p of=/dev/vda bs=1M seek=32 oflag=direct 2>/dev/null
            echo 3 > /proc/sys/vm/drop_caches
            a=$(sha256sum < /tmp/p | cut -d' ' -f1)
            b=$(dd if=/dev/vda bs=1M skip=32 count=4 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
            [ "$a" = "$b" ] && echo "big-io same"
        """, timeout=240)
    finally:
        backend.stop()
    assert _packed_bits(result, "0x0002") == ["1"], result.output
    assert "fio-rc 0" in result.lines, result.output
    terse = next(line for line in result.lines if line.startswith("terse ")).split(";")
    assert terse[4] == "0" and int(terse[5]) == 2 * 8192, result.output
    assert "big-io same" in result.lines, result.output
    assert _packed_queues(backend) >= 2, backend.log_tail()
