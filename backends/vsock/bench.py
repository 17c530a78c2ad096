"""`vhost-user-bench vsock`: one stream guest to host and host to guest per write size.

The built-in front-end is the guest (its C stream loop), a Unix socket
program the host; memcpy and a Unix socket pair are measured in the same run
as the ceilings.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

from vhost_user.cli import parse_size
from vhost_user.frontend.bench import memcpy_mb_s, process_cpu_seconds

from .driver import VsockDriver

__all__ = ["add_arguments", "run", "run_vsock_bench", "unix_socket_mb_s"]


def add_arguments(p) -> None:
    """The options of `vhost-user-bench vsock`."""
    p.add_argument("--socket", "-s", required=True, help="back-end socket path (the VM's --socket)")
    p.add_argument("--uds-path", required=True, help="the VM's --uds-path (host side)")
    p.add_argument("--write-size", type=parse_size, action="append",
                   help="bytes per write (repeatable; default 4k and 64k)")
    p.add_argument("--runtime", type=float, default=3.0, help="seconds per direction and size")
    p.add_argument("--port", type=int, default=5555, help="vsock port used for the runs")
    p.add_argument("--pid", type=int, help="back-end pid, to report its CPU time")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")


def unix_socket_mb_s(size: int, seconds: float = 1.0) -> float:
    """MB/s through one AF_UNIX stream pair with `size`-byte writes and a 4 MiB reader buffer:
    the kernel path every vsock byte to or from a host program takes anyway (two copies),
    so the ceiling for a back-end that relays to host sockets."""
    import socket as so

    a, b = so.socketpair(so.AF_UNIX, so.SOCK_STREAM)
    got = {"n": 0}

    def sink():
        buf = bytearray(4 << 20)
        while n := b.recv_into(buf):
            got["n"] += n

    t = threading.Thread(target=sink, daemon=True)
    t.start()
    data = os.urandom(size)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(64):
            a.sendall(data)
    a.shutdown(so.SHUT_WR)
    t.join(30)
    elapsed = time.perf_counter() - t0
    a.close()
    b.close()
    return got["n"] / elapsed / 1e6


def run_vsock_bench(socket_path: str, uds_path: str, *, write_sizes=(4096, 65536), runtime: float = 3.0,
                    port: int = 5555, pid: int | None = None) -> list[dict]:
    """MB/s of one stream guest->host and host->guest per write size (built-in front-end as the
    guest, a Unix socket program as the host), with memcpy bandwidth measured in the same run."""
    import socket as so


    ceiling = memcpy_mb_s()
    reports = []
    with VsockDriver.attach(socket_path, tx_slots=128, buf_alloc=1 << 20, queue_size=256) as drv:
        # A back-end that served an earlier front-end sends TRANSPORT_RESET on another
        # queue than its answers, so it can land after our connection is established and
        # reset it: take the event before connecting.
        deadline = time.monotonic() + 0.5
        while not drv.events and time.monotonic() < deadline:
            drv.poll(0.05)
        for size in write_sizes:
            socket_ceiling = unix_socket_mb_s(size)
            for direction in ("guest-to-host", "host-to-guest"):
                cpu0 = process_cpu_seconds(pid) if pid else None
                if direction == "guest-to-host":
                    moved, elapsed = _vsock_g2h(drv, so, f"{uds_path}_{port}", port, size, runtime)
                else:
                    moved, elapsed = _vsock_h2g(drv, so, uds_path, port, size, runtime)
                cpu = process_cpu_seconds(pid) - cpu0 if pid else None
                mb_s = moved / elapsed / 1e6
                reports.append({"direction": direction, "write_size": size, "bytes": moved,
                                "elapsed_s": elapsed, "mb_s": mb_s, "memcpy_mb_s": ceiling,
                                "ratio_to_memcpy": mb_s / ceiling, "unix_socket_mb_s": socket_ceiling,
                                "ratio_to_unix_socket": mb_s / socket_ceiling, "backend_cpu_s": cpu,
                                # what one back-end core could carry if the driver were free
                                "backend_mb_per_cpu_s": moved / cpu / 1e6 if cpu else None})
                port += 1
    return reports


def _vsock_g2h(drv, so, path: str, port: int, size: int, runtime: float) -> tuple[int, float]:
    """The C loop sends `size`-byte packets for `runtime` s; a host program counts what
    arrives. Bytes and time are the host's (first send to last byte received)."""
    if os.path.exists(path):
        os.unlink(path)
    listener = so.socket(so.AF_UNIX, so.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    got = {"n": 0, "t": 0.0}

    def sink():
        conn, _ = listener.accept()
        buf = bytearray(4 << 20)
        with conn:
            while n := conn.recv_into(buf):
                got["n"] += n
                got["t"] = time.monotonic()

    t = threading.Thread(target=sink, daemon=True)
    t.start()
    sock = drv.connect(port)
    t0 = time.monotonic()
    result = drv.stream_bench(sock, "g2h", payload=os.urandom(size), duration=runtime)
    sock.close()
    t.join(30)
    listener.close()
    os.unlink(path)
    if got["n"] != result.tx_bytes:
        print(f"vsock guest-to-host: host received {got['n']} bytes, driver sent {result.tx_bytes}",
              file=sys.stderr)
    return got["n"], got["t"] - t0


def _vsock_h2g(drv, so, uds_path: str, port: int, size: int, runtime: float) -> tuple[int, float]:
    """A host program writes `size`-byte chunks for `runtime` s and closes; the C loop
    consumes them. Bytes and time are the driver's (first to last byte received)."""
    drv.listen(port)
    stop = threading.Event()

    def source():
        c = so.socket(so.AF_UNIX, so.SOCK_STREAM)
        c.connect(uds_path)
        c.sendall(b"CONNECT %d\n" % port)
        while not c.recv(64).endswith(b"\n"):
            pass
        data = os.urandom(size)
        while not stop.is_set():
            c.sendall(data)
        c.close()

    t = threading.Thread(target=source, daemon=True)
    t.start()
    sock = drv.accept(port)
    timer = threading.Timer(runtime, stop.set)
    timer.start()
    try:
        result = drv.stream_bench(sock, "h2g", stall_timeout=30)
    finally:
        stop.set()
        timer.cancel()
    t.join(30)
    sock.close()
    return result.rx_bytes, result.elapsed_s


def run(args) -> int:
    """Run `vhost-user-bench vsock` with its parsed options; the exit code."""
    reports = run_vsock_bench(args.socket, args.uds_path, write_sizes=tuple(args.write_size or (4096, 65536)),
                              runtime=args.runtime, port=args.port, pid=args.pid)
    for r in reports:
        if args.json:
            print(json.dumps(r))
        else:
            cpu = (f" back-end CPU {r['backend_cpu_s']:.2f} s = {r['backend_mb_per_cpu_s']:.0f} MB per CPU-second"
                   if r["backend_cpu_s"] else "")
            print(f"vsock {r['direction']:13} write {r['write_size']:>6}: {r['mb_s']:8.1f} MB/s "
                  f"(memcpy {r['memcpy_mb_s']:.0f} MB/s, {100 * r['ratio_to_memcpy']:.1f}%; "
                  f"unix socket pair {r['unix_socket_mb_s']:.0f} MB/s, {100 * r['ratio_to_unix_socket']:.0f}%){cpu}")
    return 0
