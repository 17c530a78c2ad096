"""vhost-user-gpu under a real Linux guest (QEMU 10, TCG, -display none).

The guest's virtio_gpu drives the back-end; its fbdev writes a known image to
/dev/fb0 in one write; the host takes a QMP screendump and compares pixels.
Every test runs against our back-end (2D, and with --virgl, where the guest
negotiates VIRTIO_GPU_F_VIRGL and its fbdev goes through virglrenderer) and
against QEMU's own /usr/lib/qemu/vhost-user-gpu, which proves the test itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from harness.fixtures import require_tool
from harness.guestgpu import expected_frame, fb_script, screen_matches

pytestmark = pytest.mark.guest

QEMU_GPU = "/usr/lib/qemu/vhost-user-gpu"
GPU_BACKENDS = {
    "ours": lambda sock: [sys.executable, "-m", "vhost_user.backends.gpu", "--socket-path", sock,
                          "--verbose"],
    "ours-virgl": lambda sock: [sys.executable, "-m", "vhost_user.backends.gpu", "--socket-path",
                                sock, "--virgl", "--verbose"],
    "qemu": lambda sock: [require_tool(QEMU_GPU), "--socket-path", sock],
}


@pytest.fixture(params=sorted(GPU_BACKENDS))
def gpu_socket(request, short_tmp, tmp_path):
    """A started back-end; waits for the socket file without connecting
    (QEMU's back-end accepts exactly one connection)."""
    sock = str(short_tmp / "gpu.sock")
    log_path = tmp_path / f"{request.param}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(GPU_BACKENDS[request.param](sock), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            assert proc.poll() is None, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, "back-end did not create its socket"
            time.sleep(0.05)
        time.sleep(0.2)  # bind() comes just before listen()
        yield sock
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("xres,yres", [(1280, 800), (800, 600)])
def test_guest_fb0_image_reaches_the_qmp_screendump(guest_vm, gpu_socket, tmp_path, xres, yres):
    vm = guest_vm(cpus=1)
    vm.add_args("-chardev", f"socket,id=g0,path={gpu_socket}",
                "-device", f"vhost-user-gpu-pci,id=gpu0,chardev=g0,xres={xres},yres={yres}")
    vm.start(fb_script(xres * 4 * yres))
    vm.wait_for_marker("written", timeout=120)
    shot = screen_matches(vm, str(tmp_path / "shot.ppm"), expected_frame(xres, yres, xres * 4))
    assert shot is not None and shot.shape == (yres, xres, 3)
    assert np.array_equal(shot, expected_frame(xres, yres, xres * 4))


def test_guest_second_scanout_shows_the_cloned_framebuffer(guest_vm, gpu_socket, tmp_path):
    vm = guest_vm(cpus=1, append="video=Virtual-1:800x600 video=Virtual-2:640x480e")
    vm.add_args("-chardev", f"socket,id=g0,path={gpu_socket}",
                "-device", "vhost-user-gpu-pci,id=gpu0,chardev=g0,max_outputs=2")
    stride, height = 800 * 4, 600
    vm.start(fb_script(stride * height))
    vm.wait_for_marker("written", timeout=120)
    # fbdev clones one 800x600 framebuffer onto both CRTCs but its visible (and
    # flushed) area is the smallest mode, 640x480: head 0 shows that corner.
    visible = expected_frame(640, 480, stride)
    head0 = np.zeros((600, 800, 3), np.uint8)
    head0[:480, :640] = visible
    for head, expect in enumerate([head0, visible]):
        h, w = expect.shape[:2]
        shot = screen_matches(vm, str(tmp_path / f"head{head}.ppm"), expect, head=head)
        assert shot is not None and shot.shape == (h, w, 3), f"head {head}"
        assert np.array_equal(shot, expect), f"head {head}"
