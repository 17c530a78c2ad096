"""vhost-user-blk under a real Linux guest: data integrity through the kernel's virtio-blk.

Each test boots once. The back-end is a parameter: ``BLK_BACKENDS`` maps a
name to a function building its argv; every test runs against each. The
peer implementation (qemu-storage-daemon) proves the harness itself; our
own back-end is added to the table when it is ready, e.g.::

    "vhost-user-blk": lambda image, sock, nq: [
        "vhost-user-blk", "--socket", sock, "--image", image, "--num-queues", nq],
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from harness.backend import BackendProcess, qsd_blk_argv
from harness.fixtures import require_tool

pytestmark = pytest.mark.guest

IMAGE_MB = 64
MiB = 1 << 20

BLK_BACKENDS = {
    "ours": lambda image, sock, nq: [
        sys.executable, "-m", "vhost_user.backends.blk", "--socket", sock, "--image", image,
        "--num-queues", str(nq), "-v"],
    "qsd": lambda image, sock, nq: qsd_blk_argv(image, sock, nq,
                                                qsd=require_tool("qemu-storage-daemon")),
}


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def guest_sha(result, label: str) -> str:
    """The hash the guest printed as ``label <sha256>``."""
    for line in result.lines:
        if line.startswith(label + " "):
            return line.split()[1]
    raise AssertionError(f"guest printed no {label!r} line:\n{result.output}")


@pytest.fixture
def blk_num_queues() -> int:
    """Queues the back-end exports and QEMU requests; parametrize to override."""
    return 1


@pytest.fixture
def blk_image(tmp_path):
    """A sparse raw image, zero-filled."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as handle:
        handle.truncate(IMAGE_MB * MiB)
    return image


@pytest.fixture(params=sorted(BLK_BACKENDS))
def blk_backend(request, blk_image, blk_num_queues, short_tmp, tmp_path):
    """A started back-end serving ``blk_image``; ``.socket`` is its path.

    Yields the :class:`BackendProcess` so crash-recovery tests can
    ``kill()``/``restart()`` it; ``blk_socket`` is the plain path.
    """
    sock = short_tmp / "blk.sock"
    argv = BLK_BACKENDS[request.param](str(blk_image), str(sock), blk_num_queues)
    backend = BackendProcess(argv, sock, tmp_path / f"{request.param}.log").start()
    yield backend
    backend.stop()


@pytest.fixture
def blk_socket(blk_backend):
    return blk_backend.socket


def boot_blk(guest_vm, blk_backend, num_queues: int = 1, cpus: int = 1):
    vm = guest_vm(cpus=cpus)
    vm.add_vhost_user_blk(blk_backend.socket, num_queues=num_queues)
    return vm


def test_guest_blk_guest_write_lands_in_image(guest_vm, blk_backend, blk_image):
    vm = boot_blk(guest_vm, blk_backend)
    result = vm.run("""
        set -e
        vhu_wait_dev /dev/vda
        echo "sectors $(cat /sys/block/vda/size)"
        dd if=/dev/urandom of=/tmp/p bs=64k count=16 2>/dev/null
        echo "pattern $(sha256sum < /tmp/p | cut -d' ' -f1)"
        dd if=/tmp/p of=/dev/vda bs=64k seek=16 conv=fsync 2>/dev/null
        echo 3 > /proc/sys/vm/drop_caches
        echo "readback $(dd if=/dev/vda bs=64k skip=16 count=16 2>/dev/null | sha256sum | cut -d' ' -f1)"
    """, timeout=90)
    assert f"sectors {IMAGE_MB * MiB // 512}" in result.lines, result.output
    pattern = guest_sha(result, "pattern")
    assert guest_sha(result, "readback") == pattern
    with open(blk_image, "rb") as handle:
        handle.seek(1 * MiB)
        assert sha256_of(handle.read(1 * MiB)) == pattern, blk_backend.log_tail()


def test_guest_blk_guest_reads_host_pattern(guest_vm, blk_backend, blk_image):
    data = os.urandom(1 * MiB)
    with open(blk_image, "r+b") as handle:
        handle.seek(4 * MiB)
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    vm = boot_blk(guest_vm, blk_backend)
    result = vm.run("""
        vhu_wait_dev /dev/vda || exit 1
        echo "read $(dd if=/dev/vda bs=64k skip=64 count=16 2>/dev/null | sha256sum | cut -d' ' -f1)"
        echo "zero $(dd if=/dev/vda bs=64k count=16 2>/dev/null | sha256sum | cut -d' ' -f1)"
    """, timeout=90)
    assert guest_sha(result, "read") == sha256_of(data)
    assert guest_sha(result, "zero") == sha256_of(bytes(1 * MiB))


def test_guest_blk_ext4_survives_host_fsck(guest_vm, blk_backend, blk_image):
    debugfs = require_tool("debugfs")
    e2fsck = require_tool("e2fsck")
    vm = boot_blk(guest_vm, blk_backend)
    result = vm.run("""
        set -e
        vhu_wait_dev /dev/vda
        mkfs.ext4 -q -F /dev/vda
        mount -t ext4 /dev/vda /mnt
        dd if=/dev/urandom of=/mnt/f bs=64k count=32 2>/dev/null
        mkdir /mnt/d
        for i in 1 2 3 4 5 6 7 8; do echo "file $i" > /mnt/d/small$i; done
        sync
        echo "f $(sha256sum < /mnt/f | cut -d' ' -f1)"
        umount /mnt
    """, timeout=120)
    fsck = subprocess.run([e2fsck, "-fn", str(blk_image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cat = subprocess.run([debugfs, "-R", "cat /f", str(blk_image)], capture_output=True)
    assert cat.returncode == 0, cat.stderr
    assert len(cat.stdout) == 2 * MiB
    assert sha256_of(cat.stdout) == guest_sha(result, "f")
    small = subprocess.run([debugfs, "-R", "cat /d/small8", str(blk_image)],
                           capture_output=True)
    assert small.stdout == b"file 8\n"


@pytest.mark.parametrize("blk_num_queues", [1, 2])
def test_guest_blk_fio_verify(guest_vm, blk_backend, blk_num_queues):
    """Random writes verified by crc32c; with 2 queues, one job pinned per vCPU so both are used."""
    nq = blk_num_queues
    vm = boot_blk(guest_vm, blk_backend, num_queues=nq, cpus=nq)
    result = vm.run(f"""
        set -e
        vhu_wait_dev /dev/vda
        echo "queues $(ls /sys/block/vda/mq | wc -l)"
        fio --name=verify --filename=/dev/vda --ioengine=libaio --direct=1 \\
            --rw=randwrite --bs=4k --size=8m --iodepth=16 \\
            --numjobs={nq} --offset_increment=16m --cpus_allowed=0-{nq - 1} \\
            --cpus_allowed_policy=split --group_reporting \\
            --verify=crc32c --do_verify=1 --verify_fatal=1 \\
            --output-format=terse --terse-version=3 > /tmp/fio.out || rc=$?
        echo "fio-rc ${{rc:-0}}"
        echo "terse $(grep '^3;' /tmp/fio.out | cut -d';' -f1-6)"
        # Completions per virtqueue: one MSI-X vector per queue ("virtioN-req.Q").
        grep -E 'virtio[0-9]+-req\\.' /proc/interrupts | while read -r irq counts; do
            set -- $counts; total=0
            while [ $# -gt 0 ] && [ "$1" -eq "$1" ] 2>/dev/null; do total=$((total + $1)); shift; done
            echo "irqs ${{counts##* }} $total"
        done
    """, timeout=150)
    assert f"queues {nq}" in result.lines, result.output
    assert "fio-rc 0" in result.lines, result.output
    terse = next(line for line in result.lines if line.startswith("terse ")).split(";")
    assert terse[4] == "0", f"fio error field: {result.output}"
    assert int(terse[5]) == 8192 * nq, f"fio verified {terse[5]} KiB: {result.output}"
    per_queue = [int(line.split()[2]) for line in result.lines if line.startswith("irqs ")]
    assert len(per_queue) == nq and all(n > 0 for n in per_queue), result.output


def test_guest_blk_fio_survives_backend_restart(guest_vm, blk_backend):
    """SIGKILL the back-end while the guest's fio runs; QEMU reconnects, fio still verifies.

    Requests in flight at the kill are replayed from the inflight region
    (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), so no write may be lost.
    """
    vm = guest_vm()
    vm.add_vhost_user_blk(blk_backend.socket, num_queues=1, reconnect_ms=100)
    vm.start("""
        vhu_wait_dev /dev/vda || exit 1
        fio --name=crash --filename=/dev/vda --ioengine=libaio --direct=1 \\
            --rw=randwrite --bs=4k --size=24m --iodepth=16 \\
            --verify=crc32c --do_verify=1 --verify_fatal=1 \\
            --output-format=terse --terse-version=3 > /tmp/fio.out &
        pid=$!
        sleep 0.5
        kill -0 $pid && vhu_mark fio-running
        wait $pid
        echo "fio-rc $?"
        echo "terse $(grep '^3;' /tmp/fio.out | cut -d';' -f1-6)"
    """)
    vm.wait_for_marker("fio-running", timeout=60)
    blk_backend.kill()
    blk_backend.start()
    result = vm.wait(timeout=120)
    assert "fio-rc 0" in result.lines, result.output
    terse = next(line for line in result.lines if line.startswith("terse ")).split(";")
    assert terse[4] == "0" and int(terse[5]) == 24 * 1024, result.output
    assert blk_backend.starts == 2


def test_guest_blk_fio_verify_on_a_polling_backend(guest_vm, blk_image, short_tmp, tmp_path):
    """--poll-us under QEMU and the guest kernel's driver (EVENT_IDX on): requests the
    worker picks up while it polls, with kicks off, verify like the rest."""
    sock = short_tmp / "blk.sock"
    argv = BLK_BACKENDS["ours"](str(blk_image), str(sock), 1) + ["--poll-us", "20000"]
    backend = BackendProcess(argv, sock, tmp_path / "ours.log").start()
    try:
        vm = boot_blk(guest_vm, backend)
        vm.start("""
            vhu_wait_dev /dev/vda || exit 1
            fio --name=verify --filename=/dev/vda --ioengine=libaio --direct=1 \\
                --rw=randwrite --bs=4k --size=8m --iodepth=4 \\
                --verify=crc32c --do_verify=1 --verify_fatal=1 \\
                --output-format=terse --terse-version=3 > /tmp/fio.out || rc=$?
            echo "fio-rc ${rc:-0}"
            echo "terse $(grep '^3;' /tmp/fio.out | cut -d';' -f1-6)"
            vhu_mark fio-done
            sleep 3
        """)
        vm.wait_for_marker("fio-done", timeout=150)
        queue = backend.log_stats()[str(sock)]["queues"]["0"]
        result = vm.wait(timeout=60)
    finally:
        backend.stop()
    assert "fio-rc 0" in result.lines, result.output
    terse = next(line for line in result.lines if line.startswith("terse ")).split(";")
    assert terse[4] == "0" and int(terse[5]) == 8192, result.output
    assert queue["polled"] > 0 and queue["requests"] >= 4096, queue
