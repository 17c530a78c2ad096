"""Stream throughput of vhost-user-vsock under a real Linux guest (not a test: a benchmark).

Run from the repository root:  python tests/integration/bench_guest_vsock.py [--runtime-mb N]

One guest (QEMU, TCG unless KVM is usable) with vhost-user-vsock-pci; for
write sizes 4 KiB and 64 KiB, socat in the guest sends N MiB to a host
program on `<uds-path>_<port>` and receives N MiB from a host program that
used `CONNECT <port>`. Times are taken on the host, from the first byte to
EOF. Beside them: the host's memcpy bandwidth and the guest's own memory
bandwidth (`dd if=/dev/zero of=/dev/null`), the ceilings.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.backend import BackendProcess  # noqa: E402
from harness.initramfs import build_initramfs  # noqa: E402
from harness.kernel import fetch_kernel  # noqa: E402
from harness.qemu import GuestVM, short_tempdir  # noqa: E402
from vhost_user.frontend.bench import memcpy_mb_s, process_cpu_seconds  # noqa: E402

SIZES = (4096, 65536)


def _sink(path: str, result: dict) -> threading.Thread:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def run():
        conn, _ = listener.accept()
        buf = bytearray(1 << 20)
        n = conn.recv_into(buf)
        t0, total = time.monotonic(), n
        while n := conn.recv_into(buf):
            total += n
        result.update(bytes=total, seconds=time.monotonic() - t0)
        conn.close()
        listener.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _source(uds: str, port: int, size: int, total: int) -> dict:
    data = os.urandom(size)
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(uds)
        s.sendall(b"CONNECT %d\n" % port)
        line = s.recv(64)
        if line.startswith(b"OK"):
            break
        s.close()
        time.sleep(0.2)
    t0 = time.monotonic()
    for _ in range(total // size):
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)  # the guest closes once it has read everything
    result = {"bytes": total, "seconds": time.monotonic() - t0}
    s.close()
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runtime-mb", type=int, default=64, help="MiB per direction and size")
    args = p.parse_args()
    mib = args.runtime_mb
    work = Path(tempfile.mkdtemp(prefix="vsock-bench-"))
    sockdir = short_tempdir("vsb-")
    kernel = fetch_kernel()
    initramfs = build_initramfs(kernel)
    uds = str(sockdir / "vm.vsock")
    backend = BackendProcess([sys.executable, "-m", "vhost_user.backends.vsock", "--guest-cid", "3",
                              "--socket", str(sockdir / "vm.sock"), "--uds-path", uds],
                             sockdir / "vm.sock", work / "vsock.log").start()
    vm = GuestVM(kernel, initramfs, work / "vm", memory_mb=512)
    vm.add_args("-chardev", f"socket,id=vs0,path={sockdir / 'vm.sock'}",
                "-device", "vhost-user-vsock-pci,chardev=vs0")
    script = "while ! grep -q vmw_vsock_virtio_transport /proc/modules; do sleep 0.1; done\n"
    # the guest's own copy bandwidth: 1 GiB through dd, timed by /proc/uptime (centiseconds)
    script += ("t0=$(cut -d' ' -f1 /proc/uptime | tr -d .); dd if=/dev/zero of=/dev/null bs=64k count=16384 "
               "2>/dev/null; t1=$(cut -d' ' -f1 /proc/uptime | tr -d .); "
               "echo \"guestcopy $(( 1073741824 / (t1 - t0 + 1) * 100 ))\"\n")
    for i, size in enumerate(SIZES):
        script += (f"dd if=/dev/zero bs={size} count={mib * 1048576 // size} 2>/dev/null | "
                   f"socat -b {size} -u - VSOCK-CONNECT:2:{6000 + i}\n")
        script += f"vhu_mark listen{i}\nsocat -b {size} -u VSOCK-LISTEN:{7000 + i} - > /dev/null\n"
    results = []
    try:
        sinks = []
        for i, size in enumerate(SIZES):
            sinks.append({})
        threads = [_sink(f"{uds}_{6000 + i}", sinks[i]) for i in range(len(SIZES))]
        vm.start(script)
        cpu0 = process_cpu_seconds(backend.pid)
        for i, size in enumerate(SIZES):
            while threads[i].is_alive():
                threads[i].join(1)
                if not vm.running:
                    raise RuntimeError(f"the guest stopped early:\n{vm.console_tail()}")
            cpu1 = process_cpu_seconds(backend.pid)
            results.append(("guest-to-host", size, dict(sinks[i], cpu=cpu1 - cpu0)))
            vm.wait_for_marker(f"listen{i}", timeout=600)
            r = _source(uds, 7000 + i, size, mib << 20)
            cpu0 = process_cpu_seconds(backend.pid)
            results.append(("host-to-guest", size, dict(r, cpu=cpu0 - cpu1)))
        out = vm.wait(timeout=600)
    finally:
        vm.close()
        backend.stop()
        shutil.rmtree(sockdir, ignore_errors=True)
    guest_copy = next(int(line.split()[1]) for line in out.lines if line.startswith("guestcopy"))
    host_copy = memcpy_mb_s()
    accel = "kvm" if "accel=kvm" in (work / "vm" / "qemu-cmdline.txt").read_text() else "tcg"
    print(f"host memcpy {host_copy:.0f} MB/s; guest memory bandwidth (dd in the {accel} guest) "
          f"{guest_copy / 1e6:.0f} MB/s")
    for direction, size, r in results:
        mb_s = r["bytes"] / r["seconds"] / 1e6
        print(f"vsock {direction:13} write {size:>6}: {mb_s:8.1f} MB/s  ({r['bytes'] >> 20} MiB in "
              f"{r['seconds']:.2f} s; {100 * mb_s * 1e6 / guest_copy:.1f}% of the guest's dd bandwidth; "
              f"back-end CPU {r['cpu']:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
