"""vhost-user-gpu's command line: QEMU's flags, capabilities JSON, description file, --virgl."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from backends_proc import require_tool, wait_for_socket
from harness.backend import BackendProcess
from vhost_user.backends.gpu.commands import CtrlType as T
from vhost_user.backends.gpu.virgl import virgl_unavailable_reason
from vhost_user.backends.gpu.driver import GpuDriver

QEMU_GPU = "/usr/lib/qemu/vhost-user-gpu"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhost_user.backends.gpu", *args],
                          capture_output=True, text=True, timeout=60)


def test_gpu_cli_accepts_every_qemu_flag():
    help_text = _run("--help").stdout
    for flag in ("-s", "--socket-path", "-f", "--fd", "-c", "--print-capabilities",
                 "-v", "--virgl", "-r", "--render-node"):
        assert flag in help_text


def test_gpu_capabilities_have_qemus_shape_and_list_only_what_works():
    ours = json.loads(_run("-c").stdout)
    qemu = json.loads(subprocess.run([require_tool(QEMU_GPU), "--print-capabilities"],
                                     capture_output=True, text=True, timeout=30).stdout)
    assert set(ours) == set(qemu) == {"type", "features"}
    assert ours["type"] == qemu["type"] == "gpu"
    assert "render-node" not in ours["features"]  # 3D renders on surfaceless EGL, no node
    assert ("virgl" in ours["features"]) == (virgl_unavailable_reason() is None)


def test_gpu_description_file_names_the_installed_binary():
    desc = json.loads(_run("--print-description").stdout)
    assert desc["type"] == "gpu"
    assert os.path.basename(desc["binary"]) == "vhost-user-gpu"


def test_gpu_serves_on_an_inherited_fd(sockdir):
    path = os.path.join(sockdir, "inherited.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)
    log_path = os.path.join(sockdir, "fd.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vhost_user.backends.gpu", "-f",
                                 str(lsock.fileno()), "--verbose"], pass_fds=(lsock.fileno(),),
                                stdout=log, stderr=subprocess.STDOUT)
    lsock.close()
    bp = BackendProcess.adopt(proc, path, log_path)
    try:
        wait_for_socket(path, proc)
        with GpuDriver.connect(path) as drv:
            assert drv.create_2d(1, 4, 4) == T.RESP_OK_NODATA
    finally:
        assert bp.stop() == 0, bp.log()
