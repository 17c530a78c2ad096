"""Our vhost-user-gpu offering RESOURCE_BLOB and RESOURCE_UUID to a real Linux guest (QEMU 10, TCG).

What a guest can negotiate here is QEMU's choice, not ours: QEMU 10.0's
vhost-user-gpu-pci builds the guest's feature offer itself
(hw/display/vhost-user-gpu.c, realize: it forwards the back-end's VIRGL,
EDID and RESOURCE_UUID bits, and virtio-gpu-base.c adds RESOURCE_BLOB only
for a `blob=on` property that vhost-user-gpu-pci does not have). So the
guest sees `+edid -resource_blob` and acks RESOURCE_UUID, and Linux 6.1's
virtio_gpu_mode_dumb_create keeps its 2D path (RESOURCE_CREATE_2D + ATTACH_BACKING)
because `has_resource_blob` is false. The generic vhost-user-device-pci,
which would pass the bit through, is not user-creatable in QEMU 10.

The test proves what can be proven: the offer reaches QEMU (the guest acks
UUID), QEMU withholds BLOB (the guest's own log says so), and fb0 still
reaches the QMP screendump with the new features offered. If a QEMU ever
forwards RESOURCE_BLOB, the same test demands that the guest's fbdev really
went through CREATE_BLOB + SET_SCANOUT_BLOB (our back-end's log and counters).
The blob commands themselves, in the order Linux sends them, are proven
with the built-in front-end (tests/backends/gpu/test_gpu_blob.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from harness.guestgpu import expected_frame, fb_script, screen_matches

pytestmark = pytest.mark.guest

BLOB, UUID = 3, 2

FEATURES_SCRIPT = r"""
for d in /sys/bus/virtio/devices/*; do
  [ "$(cat $d/device)" = 0x0010 ] && echo "gpu-features $(cat $d/features)"
done
dmesg | grep -o '\[drm\] features: .*' | head -1
"""


@pytest.fixture
def gpu_backend_proc(short_tmp, tmp_path):
    """Our back-end, started; yields (socket path, log path)."""
    sock = str(short_tmp / "gpu.sock")
    log_path = tmp_path / "gpu.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vhost_user.backends.gpu", "--socket-path",
                                 sock, "--verbose"], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            assert proc.poll() is None, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, "back-end did not create its socket"
            time.sleep(0.05)
        time.sleep(0.2)
        yield sock, log_path
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_guest_negotiates_our_blob_offer_as_qemu_allows_and_fb0_reaches_the_screendump(
        guest_vm, gpu_backend_proc, tmp_path):
    sock, log_path = gpu_backend_proc
    xres, yres = 800, 600
    vm = guest_vm(cpus=1)
    vm.add_args("-chardev", f"socket,id=g0,path={sock}",
                "-device", f"vhost-user-gpu-pci,id=gpu0,chardev=g0,xres={xres},yres={yres}")
    vm.start(FEATURES_SCRIPT + fb_script(xres * 4 * yres))
    vm.wait_for_marker("written", timeout=120)
    shot = screen_matches(vm, str(tmp_path / "shot.ppm"), expected_frame(xres, yres, xres * 4))
    assert shot is not None and np.array_equal(shot, expected_frame(xres, yres, xres * 4))

    console = vm.console.read_text(errors="replace")
    bits = re.search(r"gpu-features ([01]{64})", console)
    drm = re.search(r"\[drm\] features: (.*)", console)
    assert bits and drm, vm.console_tail()
    acked = bits.group(1)
    log = log_path.read_text(errors="replace")
    assert acked[UUID] == "1", f"guest did not ack RESOURCE_UUID: {acked}"   # our offer got through
    if acked[BLOB] == "1":
        # A VMM that forwards RESOURCE_BLOB: fbdev's dumb buffer must be a guest blob.
        assert "+resource_blob" in drm.group(1), drm.group(0)
        assert re.search(r"scanout 0 shows blob \d+ \(800x600, stride 3200", log), log[-3000:]
    else:
        # QEMU 10.0: vhost-user-gpu-pci withholds RESOURCE_BLOB from the guest.
        assert "-resource_blob" in drm.group(1), drm.group(0)
        assert "shows blob" not in log, log[-3000:]
    assert " WARNING " not in log, log[-3000:]
