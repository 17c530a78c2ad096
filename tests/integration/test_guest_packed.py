"""Packed virtqueues (virtio 1.2, 2.8) under real Linux guests: QEMU 10 with ``packed=on``.

Each device is booted once with every queue packed. The guest's own view
proves the layout was negotiated (bit 34 of /sys/bus/virtio/devices/*/features)
and the back-end's log that its queues started packed; the work itself is the
same the split-ring guest tests check (fio verify, a TCP stream, a vsock
stream, a scanout), so a lost or doubled buffer shows as a failed check.
"""

from __future__ import annotations

import hashlib
import os
import sys

import numpy as np
import pytest

from harness.backend import BackendProcess
from harness.fixtures import require_tool
from harness.guestgpu import expected_frame, fb_script, screen_matches
from harness.guestnet import guest_ip, line_value, ping_until, send_until_acked
from vsock_proc import (WAIT_VSOCK, add_guest_vsock, connect_when_listening, guest_vsock_backend,
                        hash_one_connection)

pytestmark = pytest.mark.guest

MiB = 1 << 20

#: prints "packed-bit N" for each virtio device: N is feature bit 34 as the guest acked it
PACKED_BIT = """
for f in /sys/bus/virtio/devices/*/features; do
    echo "packed-bit $(cut -c35 < $f) $(cat ${f%/features}/device)"
done
"""


def _packed_bits(lines: list[str], device_id: str) -> list[str]:
    """Bit 34 as the guest acked it, once per virtio device with `device_id` (PACKED_BIT)."""
    return [line.split()[1] for line in lines
            if line.startswith("packed-bit ") and line.split()[2] == device_id]


def _shot_summary(shot, expect) -> str:
    if shot is None:
        return "none"
    if shot.shape != expect.shape:
        return f"shape {shot.shape}, want {expect.shape}"
    return f"{int(np.count_nonzero((shot != expect).any(axis=2)))} pixels differ"


def _assert_queues_packed(backend: BackendProcess, at_least: int) -> None:
    """The back-end logged `at_least` queues started packed and none started split."""
    log = backend.log_tail(1 << 20)
    packed, split = log.count("started (packed ring"), log.count("started (split ring")
    assert packed >= at_least and split == 0, backend.explain(
        f"{packed} queues started packed (want >= {at_least}), {split} split")


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
    assert _packed_bits(result.lines, "0x0002") == ["1"], result.output
    assert "fio-rc 0" in result.lines, result.output
    terse = next(line for line in result.lines if line.startswith("terse ")).split(";")
    assert terse[4] == "0" and int(terse[5]) == 2 * 8192, result.output
    assert "big-io same" in result.lines, result.output
    _assert_queues_packed(backend, 2)


def test_guest_net_on_packed_rings_moves_a_tcp_stream_between_two_guests(guest_vm, short_tmp,
                                                                          tmp_path):
    socks = [short_tmp / "vm0.sock", short_tmp / "vm1.sock"]
    argv = [sys.executable, "-m", "vhost_user.backends.net", "--socket", str(socks[0]),
            "--socket", str(socks[1]), "-v"]
    backend = BackendProcess(argv, socks[1], tmp_path / "net.log").start()
    macs = ["52:54:00:12:34:01", "52:54:00:12:34:02"]
    try:
        server, client = guest_vm(memory_mb=512), guest_vm(memory_mb=512)
        for vm, sock, mac in ((server, socks[0], macs[0]), (client, socks[1], macs[1])):
            vm.add_args("-chardev", f"socket,id=n0,path={sock}",
                        "-netdev", "vhost-user,id=net0,chardev=n0",
                        "-device", f"virtio-net-pci,netdev=net0,mac={mac},packed=on")
        server.start(PACKED_BIT + guest_ip("10.0.0.1") + ping_until("10.0.0.2") + """
            mkfifo /tmp/f; exec 3<>/tmp/f
            nc -l -p 5000 <&3 > /tmp/r
            digest=$(sha256sum < /tmp/r | cut -d' ' -f1)
            echo "recv $digest $(wc -c < /tmp/r)"
            echo "$digest" | nc 10.0.0.2 5001
            sleep 2
        """)
        client.start(PACKED_BIT + guest_ip("10.0.0.2") + """
            dd if=/dev/urandom of=/tmp/d bs=1M count=16 2>/dev/null
            echo "sent $(sha256sum < /tmp/d | cut -d' ' -f1)"
        """ + ping_until("10.0.0.1") + send_until_acked("10.0.0.1", 5000, 5001, tries=60, ack_wait=120))
        sent = client.wait(timeout=240)
        got = server.wait(timeout=240)
    finally:
        backend.stop()
    for result in (sent, got):
        assert _packed_bits(result.lines, "0x0001") == ["1"], result.output
    assert "ping 10.0.0.1 ok" in sent.lines, backend.explain(sent.output)
    digest, size = line_value(got, "recv")
    assert int(size) == 16 * MiB, backend.explain(got.output)
    assert digest == line_value(sent, "sent")[0] == line_value(sent, "ack")[0], backend.explain(
        f"server got {digest}; client:\n{sent.output}")
    _assert_queues_packed(backend, 4)   # rx and tx of both ports


def test_guest_vsock_on_packed_rings_moves_a_stream_each_way(guest_vm, short_tmp, tmp_path):
    require_tool("socat")
    uds = str(short_tmp / "vm3.vsock")
    sock = short_tmp / "vm3.sock"
    backend = guest_vsock_backend(sock, tmp_path / "vsock.log", "--guest-cid", "3",
                                  "--socket", str(sock), "--uds-path", uds)
    size = 16 * MiB
    try:
        received: dict = {}
        listener = hash_one_connection(uds + "_5000", received)
        vm = guest_vm(cpus=1, memory_mb=512)
        add_guest_vsock(vm, sock, ",packed=on")
        vm.start(WAIT_VSOCK + PACKED_BIT + f"""
            set -e
            dd if=/dev/urandom of=/tmp/p bs=1M count={size // MiB} 2>/dev/null
            echo "up $(sha256sum < /tmp/p | cut -d' ' -f1)"
            socat -u FILE:/tmp/p VSOCK-CONNECT:2:5000
            vhu_mark listening
            socat -u VSOCK-LISTEN:5001 STDOUT | sha256sum | cut -d' ' -f1 > /tmp/down
            echo "down $(cat /tmp/down)"
        """)
        down = os.urandom(size)
        vm.wait_for_marker("listening", timeout=240)
        s, _ = connect_when_listening(uds, 5001, timeout=120)
        s.sendall(down)
        s.close()
        result = vm.wait(timeout=240)
        listener.join(30)
    finally:
        backend.stop()
    assert _packed_bits(result.lines, "0x0013") == ["1"], result.output
    assert received.get("bytes") == size, backend.explain(f"host got {received}")
    assert received["sha"] == line_value(result, "up")[0], backend.explain(
        f"host got {received['sha']}; guest:\n{result.output}")
    assert line_value(result, "down")[0] == hashlib.sha256(down).hexdigest(), backend.explain(
        f"host sent {hashlib.sha256(down).hexdigest()}; guest:\n{result.output}")
    _assert_queues_packed(backend, 2)   # rx and tx (the event queue is never kicked)


def test_guest_gpu_on_packed_rings_shows_the_framebuffer(guest_vm, short_tmp, tmp_path):
    sock = short_tmp / "gpu.sock"
    argv = [sys.executable, "-m", "vhost_user.backends.gpu", "--socket-path", str(sock),
            "--verbose"]
    backend = BackendProcess(argv, sock, tmp_path / "gpu.log", probe_connect=False).start()
    xres, yres = 800, 600
    try:
        vm = guest_vm(cpus=1)
        vm.add_args("-chardev", f"socket,id=g0,path={sock}",
                    "-device", f"vhost-user-gpu-pci,id=gpu0,chardev=g0,xres={xres},yres={yres},"
                               "packed=on")
        # bit 34 once the driver has probed (fb0 is there), before the script sleeps
        vm.start(fb_script(xres * 4 * yres).replace("vhu_mark written",
                                                    PACKED_BIT + "vhu_mark written"))
        vm.wait_for_marker("written", timeout=120)
        console = vm.console_tail(1000).splitlines()
        expect = expected_frame(xres, yres, xres * 4)
        shot = screen_matches(vm, str(tmp_path / "shot.ppm"), expect)
    finally:
        backend.stop()
    assert _packed_bits(console, "0x0010") == ["1"], "\n".join(console)
    assert shot is not None and np.array_equal(shot, expect), backend.explain(
        f"the screendump never showed the fb0 pattern (last shot: {_shot_summary(shot, expect)})")
    _assert_queues_packed(backend, 2)   # control and cursor
