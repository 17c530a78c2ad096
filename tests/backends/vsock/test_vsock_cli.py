"""The `vhost-user-vsock` command line: rust-vmm vhost-device-vsock options plus the suite's conventions."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from vhost_user.backends.vsock.__main__ import parse_vm
from vhost_user.backends.vsock.driver import VsockDriver


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhost_user.backends.vsock", *args],
                          capture_output=True, text=True, timeout=30)


def test_vsock_print_capabilities_is_vsock_json():
    out = _run("--print-capabilities")
    assert out.returncode == 0
    assert json.loads(out.stdout)["type"] == "vsock"


def test_vsock_vm_option_parses_like_vhost_device_vsock():
    vm = parse_vm("guest-cid=4,socket=/tmp/a.sock,uds-path=/tmp/a.vsock,groups=g1+g2,tx-buffer-size=128K")
    assert vm == {"guest-cid": 4, "socket": "/tmp/a.sock", "uds-path": "/tmp/a.vsock",
                  "groups": frozenset({"g1", "g2"}), "tx-buffer-size": 128 << 10}


@pytest.mark.parametrize("args,needle", [
    (["--guest-cid", "3"], "--socket"),
    (["--vm", "socket=/tmp/x"], "guest-cid"),
    (["--vm", "guest-cid=3,socket=/tmp/x,colour=red"], "colour"),
    (["--guest-cid", "2", "--socket", "/tmp/vsock-cli-bad.sock"], "3..4294967294"),
    ([], "--guest-cid"),
])
def test_vsock_bad_command_lines_fail_with_a_message(args, needle):
    out = _run(*args)
    assert out.returncode != 0
    assert needle in out.stderr


@pytest.mark.parametrize("option,value,needle", [
    ("--capture-buffer", "4K", "--capture-buffer 4096 must be 64K..1G"),
    ("--capture-snaplen", "0", "size must be positive"),
    ("--capture-snaplen", "1M", "must be 1..256K"),
])
def test_vsock_bad_capture_sizes_are_usage_errors(sockdir, option, value, needle):
    out = _run("--guest-cid", "3", "--socket", os.path.join(sockdir, "s"), "--pcap",
               os.path.join(sockdir, "x.pcap"), option, value)
    assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not os.path.exists(os.path.join(sockdir, "x.pcap"))  # refused before anything was opened


def test_vsock_two_vms_with_one_cid_are_refused(sockdir):
    a, b = os.path.join(sockdir, "a.sock"), os.path.join(sockdir, "b.sock")
    out = _run("--vm", f"guest-cid=3,socket={a}", "--vm", f"guest-cid=3,socket={b}")
    assert out.returncode != 0 and "CID" in out.stderr


def test_vsock_sigterm_removes_sockets(sockdir, vsock_proc):
    sock, uds = os.path.join(sockdir, "vm.sock"), os.path.join(sockdir, "vm.vsock")
    bp = vsock_proc("--guest-cid", "3", "--socket", sock, "--uds-path", uds, wait_for=sock)
    assert os.path.exists(uds)
    with VsockDriver.attach(sock) as drv:  # the event loop (and its signal handlers) is running
        assert drv.cid == 3
    assert bp.stop(signal.SIGTERM) == 0
    assert not os.path.exists(sock) and not os.path.exists(uds)


def test_vsock_serves_an_inherited_listening_fd(sockdir):
    path = os.path.join(sockdir, "inherited.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    fd = listener.fileno()
    proc = subprocess.Popen([sys.executable, "-m", "vhost_user.backends.vsock", "--guest-cid", "7",
                             "--fd", str(fd)], pass_fds=(fd,), stderr=subprocess.PIPE)
    listener.close()
    try:
        with VsockDriver.attach(path) as drv:
            assert drv.cid == 7
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
