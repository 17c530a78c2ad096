"""The vhost-user-blk program as users and libvirt/systemd meet it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from backends_proc import spawn
from harness.backend import BackendProcess
from vhost_user.backends.blk.driver import BlkDriver

BLK = [sys.executable, "-m", "vhost_user.backends.blk"]


def test_print_capabilities_is_vhost_user_json_block_schema():
    out = subprocess.run(BLK + ["--print-capabilities"], capture_output=True, text=True, check=True)
    caps = json.loads(out.stdout)
    assert caps == {"type": "block", "features": ["read-only", "blk-file"]}


def test_print_description_names_installed_binary():
    out = subprocess.run(BLK + ["--print-description"], capture_output=True, text=True, check=True)
    desc = json.loads(out.stdout)
    assert desc["type"] == "block"
    assert os.path.isabs(desc["binary"]) and os.access(desc["binary"], os.X_OK)
    caps = subprocess.run([desc["binary"], "--print-capabilities"], capture_output=True, text=True)
    assert json.loads(caps.stdout)["type"] == "block"


def test_missing_socket_is_a_usage_error():
    out = subprocess.run(BLK, capture_output=True, text=True)
    assert out.returncode == 2 and "--socket" in out.stderr


def test_direct_without_image_is_a_usage_error(sockdir):
    out = subprocess.run(BLK + ["--socket", os.path.join(sockdir, "s"), "--direct"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "O_DIRECT" in out.stderr and "Traceback" not in out.stderr



@pytest.mark.parametrize("value", ["17", "-1"])
def test_io_threads_out_of_range_is_a_usage_error(sockdir, value):
    out = subprocess.run(BLK + ["--socket", os.path.join(sockdir, "s"), "--io-threads", value],
                         capture_output=True, text=True)
    assert out.returncode == 2 and f"--io-threads {value}" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr

def test_missing_image_is_a_clear_error(sockdir):
    out = subprocess.run(BLK + ["--socket", os.path.join(sockdir, "s"), "--image", "/nonexistent/x"],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "cannot open image" in out.stderr


def test_direct_image_serves_io(sockdir, shm_image):
    image = shm_image(8 << 20)
    sock = os.path.join(sockdir, "d.sock")
    bp = spawn(BLK + ["--socket", sock, "--image", image, "--direct"], sock, os.path.join(sockdir, "d.log"))
    try:
        with BlkDriver.connect(sock) as drv:
            drv.write(8, b"d" * 4096)
            assert drv.read(8, 4096) == b"d" * 4096
    finally:
        assert bp.stop() == 0


def _listener(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(4)
    return s


def test_fd_serves_inherited_listening_socket(sockdir, shm_image):
    path = os.path.join(sockdir, "act.sock")
    listener = _listener(path)
    fd = listener.fileno()
    log = os.path.join(sockdir, "fd.log")
    proc = subprocess.Popen(BLK + ["--fd", str(fd), "--image", shm_image(8 << 20)],
                            pass_fds=(fd,), stderr=open(log, "wb"))
    listener.close()
    bp = BackendProcess.adopt(proc, path, log)
    try:
        with BlkDriver.connect(path) as drv:
            drv.write(0, b"f" * 512)
            assert drv.read(0, 512) == b"f" * 512
    finally:
        assert bp.stop() == 0


def test_systemd_socket_activation_on_fd_3(sockdir, shm_image):
    """LISTEN_PID/LISTEN_FDS as systemd sets them, the socket on fd 3, no --fd."""
    path = os.path.join(sockdir, "sd.sock")
    listener = _listener(path)
    log = os.path.join(sockdir, "sd.log")
    code = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_PID'] = str(os.getpid());"
            "os.environ['LISTEN_FDS'] = '1'; from vhost_user.backends.blk.__main__ import main;"
            "sys.exit(main(sys.argv[2:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(listener.fileno()),
                             "--image", shm_image(8 << 20)],
                            pass_fds=(listener.fileno(),), stderr=open(log, "wb"))
    listener.close()
    bp = BackendProcess.adopt(proc, path, log)
    try:
        with BlkDriver.connect(path) as drv:
            drv.write(0, b"s" * 512)
            assert drv.read(0, 512) == b"s" * 512
    finally:
        assert bp.stop() == 0


def test_fd_that_is_not_a_listening_socket_is_refused(sockdir):
    r, w = os.pipe()
    try:
        out = subprocess.run(BLK + ["--fd", str(r)], pass_fds=(r,), capture_output=True, text=True)
    finally:
        os.close(r)
        os.close(w)
    assert out.returncode == 1 and "--fd" in out.stderr


def test_direct_on_file_system_without_o_direct_is_a_clear_error(sockdir):
    """ramfs has no O_DIRECT: --direct must say so instead of failing later."""
    if os.geteuid() != 0:
        pytest.skip("mounting a ramfs needs root")
    mnt = os.path.join(sockdir, "ramfs")
    os.mkdir(mnt)
    subprocess.run(["mount", "-t", "ramfs", "ramfs", mnt], check=True)
    try:
        image = os.path.join(mnt, "disk.img")
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        out = subprocess.run(BLK + ["--socket", os.path.join(sockdir, "s"), "--image", image, "--direct"],
                             capture_output=True, text=True)
        assert out.returncode == 1
        assert "does not support O_DIRECT" in out.stderr
    finally:
        subprocess.run(["umount", mnt], check=True)
