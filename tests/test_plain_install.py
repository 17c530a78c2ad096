"""The README's first command alone: the wheel in a clean venv, no extras, no test packages.

Every program answers --help, --version and --print-capabilities, and each
option that writes a file works: vsock --pcap, net --pcap, gpu --display
png:DIR. The venv has no system site-packages, so a module only the test
extra installs (scapy, hypothesis) would break here as it did for a user.
The captures are then read by the test side (scapy), the independent reader.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backends_proc import spawn
from vhost_user.backends.gpu.driver import GpuDriver
from vhost_user.backends.net.driver import NetDriver
from vhost_user.backends.vsock.driver import VsockDriver
from vsock_proc import host_listener

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ["vhost-user-blk", "vhost-user-net", "vhost-user-vsock", "vhost-user-gpu", "vhost-user-rng"]
PROGRAMS = [*BACKENDS, "vhost-user-bench"]


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory) -> Path:
    """Build the wheel once and install it, without extras, into a venv of its own."""
    work = tmp_path_factory.mktemp("plain")
    wheels = work / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
                   check=True, timeout=600, capture_output=True)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    (wheel,) = wheels.glob("*.whl")
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], check=True, timeout=600,
                   capture_output=True)
    found = subprocess.run([str(venv / "bin" / "python"), "-c", "import scapy"], capture_output=True)
    assert found.returncode != 0, "the clean venv must not have the test extra"
    return venv / "bin"


@pytest.mark.parametrize("prog", PROGRAMS)
def test_plain_install_every_program_answers_help_and_version(clean_venv, prog):
    for args in (["--help"], ["--version"]):
        out = subprocess.run([str(clean_venv / prog), *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "Traceback" not in out.stderr
    assert out.stdout.strip() == f"{prog} 0.1.0" or out.stdout.startswith(prog), out.stdout


@pytest.mark.parametrize("prog", BACKENDS)
def test_plain_install_every_back_end_prints_capabilities(clean_venv, prog):
    out = subprocess.run([str(clean_venv / prog), "--print-capabilities"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and '"type"' in out.stdout, out.stderr


def _read_pcap(path: str):
    from scapy.utils import rdpcap
    return rdpcap(path)


def test_plain_install_vsock_pcap(clean_venv, sockdir):
    sock, uds, pcap = (os.path.join(sockdir, n) for n in ("vm3.sock", "vm3.vsock", "vsock.pcap"))
    bp = spawn([str(clean_venv / "vhost-user-vsock"), "--guest-cid", "3", "--socket", sock,
                "--uds-path", uds, "--pcap", pcap, "-v"], sock, os.path.join(sockdir, "vsock.log"))
    try:
        listener = host_listener(uds + "_5000")
        with VsockDriver.attach(sock) as drv:
            g = drv.connect(5000)
            h, _ = listener.accept()
            g.send(b"captured without scapy")
            assert h.recv(100) == b"captured without scapy"
    finally:
        assert bp.stop() == 0, bp.log()[-2000:]
    packets = _read_pcap(pcap)
    assert any(b"captured without scapy" in bytes(p) for p in packets), len(packets)


def test_plain_install_net_pcap(clean_venv, sockdir):
    from scapy.layers.l2 import Ether

    socks = [os.path.join(sockdir, f"p{i}.sock") for i in range(2)]
    pcap = os.path.join(sockdir, "net.pcap")
    bp = spawn([str(clean_venv / "vhost-user-net"), "--socket", socks[0], "--socket", socks[1],
                "--pcap", pcap, "-v"], socks[1], os.path.join(sockdir, "net.log"))
    try:
        a, b = NetDriver.connect(socks[0]), NetDriver.connect(socks[1])
        b.fill_rx()
        frame = bytes(Ether(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff") / (b"net capture" * 10))
        a.send(frame)
        assert [f for _, f in b.recv()] == [frame]
        time.sleep(0.2)  # the capture writer drains every few ms
        a.close()
        b.close()
    finally:
        assert bp.stop() == 0, bp.log()[-2000:]
    assert any(bytes(p) == frame for p in _read_pcap(pcap))


def test_plain_install_gpu_png_display(clean_venv, sockdir):
    from vhost_user.backends.gpu.commands import CtrlType as T, Format, Rect

    sock, out = os.path.join(sockdir, "gpu.sock"), os.path.join(sockdir, "png")
    bp = spawn([str(clean_venv / "vhost-user-gpu"), "--socket-path", sock, "--display", f"png:{out}"],
               sock, os.path.join(sockdir, "gpu.log"))
    try:
        with GpuDriver.connect(sock, display=False) as drv:
            assert drv.create_2d(1, 4, 4, Format.B8G8R8X8_UNORM) == T.RESP_OK_NODATA
            b = drv.alloc_backing(64)
            drv.write_backing(b, b"\x07" * 64)
            assert drv.attach_backing(1, b) == T.RESP_OK_NODATA
            assert drv.set_scanout(0, 1, Rect(0, 0, 4, 4)) == T.RESP_OK_NODATA
            assert drv.transfer(1, Rect(0, 0, 4, 4)) == T.RESP_OK_NODATA
            assert drv.flush(1, Rect(0, 0, 4, 4)) == T.RESP_OK_NODATA
        deadline = time.monotonic() + 10
        path = os.path.join(out, "scanout-0.png")
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    finally:
        assert bp.stop() == 0, bp.log()[-2000:]
