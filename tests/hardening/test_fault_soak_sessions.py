"""vhost-user-vsock and vhost-user-gpu outlive a crashed QEMU and serve the next one.

QEMU 10 cannot reconnect vhost-user-vsock-pci or vhost-user-gpu-pci to a
restarted back-end (RELIABILITY.md, "Back-end restart": realize does not wait
for the asynchronous connect and there is no reconnect handler), so what a
user of these devices gets after a crash is the next QEMU session. Here the
first QEMU is SIGKILLed while a host program streams into the guest over
vsock and the display shows a frame; the same back-end processes then serve
a second QEMU: the first session's stream has ended at the host (not left
hanging), a new connection carries every byte (sha256), and the display
shows the second session's frame pixel for pixel.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time

import numpy as np
import pytest

from harness.backend import BackendProcess
from vsock_proc import connect_when_listening

pytestmark = pytest.mark.guest

W, H = 800, 600


def _block(seed: int) -> bytes:
    return bytes((i * 7 + seed) % 255 + 1 for i in range(1004))  # 251 pixels: rows do not repeat


def _expected(block: bytes) -> np.ndarray:
    size = W * 4 * H
    frame = (block * (size // len(block) + 1))[:size]
    return np.frombuffer(frame, np.uint8).reshape(H, W, 4)[:, :, [2, 1, 0]]


def _script(block: bytes) -> str:
    octal = "".join(f"\\{b:03o}" for b in block)
    size = W * 4 * H
    return f"""
n=0; while ! grep -q vmw_vsock_virtio_transport /proc/modules; do
    n=$((n + 1)); [ "$n" -gt 100 ] && {{ echo "no virtio vsock transport"; exit 1; }}; sleep 0.1
done
mkdir -p /tmp/r
socat -u VSOCK-LISTEN:7000,fork SYSTEM:'sha256sum > /tmp/r/got.$$' &
L=$!
n=0; while [ ! -e /dev/fb0 ]; do n=$((n+1)); [ $n -gt 200 ] && {{ echo no fb0; exit 1; }}; sleep 0.1; done
for v in /sys/class/vtconsole/vtcon*; do echo 0 > $v/bind 2>/dev/null; done
printf '{octal}' > /tmp/img
while [ $(stat -c %s /tmp/img) -lt {size} ]; do cat /tmp/img /tmp/img > /tmp/t; mv /tmp/t /tmp/img; done
head -c {size} /tmp/img > /tmp/frame
dd if=/tmp/frame of=/dev/fb0 bs={size} count=1 2>/dev/null || exit 2
rm /tmp/img /tmp/frame
vhu_mark ready
# sha256sum writes its line once, at the end of the stream
n=0; until [ -n "$(cat /tmp/r/* 2>/dev/null)" ]; do n=$((n + 1)); [ "$n" -gt 1200 ] && break; sleep 0.1; done
echo "got $(cat /tmp/r/* | cut -d' ' -f1)"
kill $L
"""


def _connect(uds: str, port: int) -> socket.socket:
    return connect_when_listening(uds, port, timeout=60, sock_timeout=60)[0]


def _screen(vm, path: str, expect: np.ndarray, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        vm.qmp("screendump", filename=path, device="gpu0")
        data = open(path, "rb").read()
        parts = data.split(maxsplit=4)
        if parts[1:3] == [b"%d" % W, b"%d" % H]:
            shot = np.frombuffer(parts[4][:W * H * 3], np.uint8).reshape(H, W, 3)
            if np.array_equal(shot, expect):
                return True
        time.sleep(0.5)
    return False


def _vm(guest_vm, vsock_sock, gpu_sock):
    vm = guest_vm(cpus=1, memory_mb=256)
    vm.add_args("-chardev", f"socket,id=vs0,path={vsock_sock}",
                "-device", "vhost-user-vsock-pci,chardev=vs0",
                "-chardev", f"socket,id=g0,path={gpu_sock}",
                "-device", f"vhost-user-gpu-pci,id=gpu0,chardev=g0,xres={W},yres={H}")
    return vm


def test_vsock_and_gpu_serve_the_next_qemu_after_a_qemu_crash(guest_vm, short_tmp, tmp_path):
    vsock_sock, gpu_sock = short_tmp / "vs.sock", short_tmp / "gpu.sock"
    uds = str(short_tmp / "vs.vsock")
    vsock = BackendProcess([sys.executable, "-m", "vhost_user.backends.vsock", "-v", "--guest-cid", "3",
                            "--socket", str(vsock_sock), "--uds-path", uds],
                           vsock_sock, tmp_path / "vsock.log").start()
    gpu = BackendProcess([sys.executable, "-m", "vhost_user.backends.gpu", "--socket-path", str(gpu_sock),
                          "--verbose"], gpu_sock, tmp_path / "gpu.log").start()
    try:
        # Session 1: a stream flows and a frame is shown when QEMU dies.
        first = _vm(guest_vm, vsock_sock, gpu_sock)
        first.start(_script(_block(13)))
        first.wait_for_marker("ready", timeout=240)
        assert _screen(first, str(tmp_path / "s1.ppm"), _expected(_block(13))), "session 1 frame"
        stream = _connect(uds, 7000)
        flowing, ended = threading.Event(), threading.Event()

        def feed() -> None:
            chunk = os.urandom(64 << 10)
            try:
                while True:
                    stream.sendall(chunk)
                    flowing.set()
            except OSError:
                ended.set()

        threading.Thread(target=feed, daemon=True).start()
        assert flowing.wait(30)
        first.kill()
        # The back-end ends the host side of the dead session's stream.
        assert ended.wait(60), "the host program's stream outlived the QEMU it went to"
        stream.close()
        assert vsock.running and gpu.running, vsock.log_tail() + gpu.log_tail()

        # Session 2: a new QEMU on the same back-end processes.
        second = _vm(guest_vm, vsock_sock, gpu_sock)
        second.start(_script(_block(101)))
        second.wait_for_marker("ready", timeout=240)
        assert _screen(second, str(tmp_path / "s2.ppm"), _expected(_block(101))), "session 2 frame"
        data = os.urandom(1 << 20)
        s = _connect(uds, 7000)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        result = second.wait(timeout=120)
        s.close()
        assert f"got {hashlib.sha256(data).hexdigest()}" in result.lines, result.output
    finally:
        vsock.stop()
        gpu.stop()
