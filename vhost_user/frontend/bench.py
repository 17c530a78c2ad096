"""`vhost-user-bench`: drive any vhost-user back-end through the built-in front-end.

The per-request driver work runs in C (vhost_user.frontend.driver_ring), one
thread per queue with the GIL released, so the numbers measure the back-end
and not Python. Each device's driver model is looked up by name in the device
registry (vhost_user.devices), as the front-end knows no device. Given the
back-end's pid, the back-end's CPU time per request is read from /proc before
and after the run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass

from vhost_user.cli import report_error, parse_size, version
from vhost_user.errors import VhostUserError
from vhost_user import devices
from vhost_user.frontend.driver_ring import bench_area_size

__all__ = ["BlkBenchSpec", "BlkBenchReport", "run_blk_bench", "process_cpu_seconds", "main"]

_PATTERNS = {
    "randread": (False, True),
    "randwrite": (True, True),
    "read": (False, False),
    "write": (True, False),
}


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and all its threads, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class BlkBenchSpec:
    socket: str
    rw: str = "randread"
    block_size: int = 4096
    iodepth: int = 32
    queues: int = 1
    runtime: float = 5.0
    queue_size: int = 256
    pid: int | None = None
    seed: int = 1


@dataclass
class BlkBenchReport:
    rw: str
    block_size: int
    iodepth: int
    queues: int
    requests: int
    errors: int
    elapsed_s: float
    iops: float
    mb_s: float
    p50_us: float
    p99_us: float
    backend_cpu_s: float | None
    backend_cpu_us_per_request: float | None

    def line(self) -> str:
        cpu = (f"  backend cpu {self.backend_cpu_us_per_request:.2f} us/req"
               if self.backend_cpu_us_per_request is not None else "")
        return (f"{self.rw} bs={self.block_size} qd={self.iodepth} queues={self.queues}: "
                f"{self.iops:,.0f} IOPS  {self.mb_s:,.1f} MB/s  p50 {self.p50_us:.1f} us  "
                f"p99 {self.p99_us:.1f} us  errors {self.errors}{cpu}")


def run_blk_bench(spec: BlkBenchSpec) -> BlkBenchReport:
    """Connect, run the pattern on every queue at once, disconnect."""
    if spec.rw not in _PATTERNS:
        raise ValueError(f"unknown pattern {spec.rw!r}; choose from {', '.join(_PATTERNS)}")
    write, random = _PATTERNS[spec.rw]
    qd = min(spec.iodepth, spec.queue_size // 3)
    ram = spec.queues * bench_area_size(spec.block_size, qd) + (32 << 20)
    ram = -(-ram // (2 << 20)) * (2 << 20)
    BlkDriver = devices.driver("blk")
    driver = BlkDriver.connect(spec.socket, num_queues=spec.queues, queue_size=spec.queue_size,
                               ram_size=ram, max_io=4096, slots_per_queue=1)
    try:
        capacity = driver.config.capacity if driver.config else 0
        if capacity * 512 < spec.block_size:
            raise ValueError("device too small for the block size")
        # Region 0 starts at GPA 0, so a GPA in it is also its offset in the ring's area.
        area = [driver.fe.ram.alloc(bench_area_size(spec.block_size, qd), 4096)
                for _ in range(spec.queues)]
        results = [None] * spec.queues
        errors: list[BaseException] = []

        def one(q: int) -> None:
            try:
                results[q] = driver.queues[q].ring.run_blk_bench(
                    write=write, block_size=spec.block_size, queue_depth=qd, random=random,
                    capacity_sectors=capacity, data_offset=area[q],
                    duration_s=spec.runtime, seed=spec.seed + q)
            except BaseException as exc:  # reported below, after all threads end
                errors.append(exc)

        cpu0 = process_cpu_seconds(spec.pid) if spec.pid else None
        threads = [threading.Thread(target=one, args=(q,)) for q in range(spec.queues)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        cpu = process_cpu_seconds(spec.pid) - cpu0 if spec.pid else None
        if errors:
            raise errors[0]
    finally:
        driver.close()
    requests = sum(r.requests for r in results)
    total_bytes = sum(r.bytes for r in results)
    return BlkBenchReport(
        rw=spec.rw, block_size=spec.block_size, iodepth=qd, queues=spec.queues,
        requests=requests, errors=sum(r.errors for r in results), elapsed_s=elapsed,
        iops=requests / elapsed, mb_s=total_bytes / elapsed / 1e6,
        p50_us=max(r.p50_us for r in results), p99_us=max(r.p99_us for r in results),
        backend_cpu_s=cpu,
        backend_cpu_us_per_request=(cpu / requests * 1e6) if cpu is not None and requests else None,
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhost-user-bench", description=__doc__.splitlines()[0])
    p.add_argument("-V", "--version", action="version", version=f"vhost-user-bench {version()}")
    sub = p.add_subparsers(dest="device", required=True)
    b = sub.add_parser("blk", help="benchmark a vhost-user-blk back-end")
    b.add_argument("--socket", "-s", required=True, help="back-end socket path")
    b.add_argument("--rw", default="randread", choices=sorted(_PATTERNS))
    b.add_argument("--bs", type=parse_size, default=4096, help="block size (default 4k)")
    b.add_argument("--iodepth", type=int, default=32, help="requests in flight per queue")
    b.add_argument("--queues", type=int, default=1, help="queues driven at once")
    b.add_argument("--runtime", type=float, default=5.0, help="seconds")
    b.add_argument("--queue-size", type=int, default=256)
    b.add_argument("--pid", type=int, help="back-end pid, to report its CPU time per request")
    b.add_argument("--json", action="store_true", help="print the report as JSON")
    g = sub.add_parser("gpu", help="full-frame transfer+flush cycles of vhost-user-gpu back-ends")
    g.add_argument("--socket", "-s", action="append", required=True,
                   help="back-end socket (repeat to compare back-ends in the same run)")
    g.add_argument("--pid", type=int, action="append", help="back-end pid per --socket (CPU time)")
    g.add_argument("--label", action="append", help="name per --socket")
    g.add_argument("--width", type=int, default=1920)
    g.add_argument("--height", type=int, default=1080)
    g.add_argument("--runtime", type=float, default=5.0, help="seconds per back-end")
    g.add_argument("--rounds", type=int, default=5, help="alternate the back-ends this often")
    g.add_argument("--json", action="store_true", help="print the reports as JSON")
    n = sub.add_parser("net", help="frames between two ports of vhost-user-net back-ends")
    n.add_argument("--pair", action="append", required=True, metavar="TX_SOCK,RX_SOCK",
                   help="two ports of one back-end: frames go in at the first and are "
                        "counted at the second (repeat to compare back-ends in the same run)")
    n.add_argument("--pid", type=int, action="append", help="back-end pid per --pair (CPU time)")
    n.add_argument("--label", action="append", help="name per --pair")
    n.add_argument("--frame-size", type=parse_size, action="append",
                   help="Ethernet frame bytes (repeatable; default 64 and 1500)")
    n.add_argument("--runtime", type=float, default=5.0, help="seconds per back-end and size")
    n.add_argument("--rounds", type=int, default=5, help="alternate the back-ends this often")
    n.add_argument("--queue-size", type=int, default=256)
    n.add_argument("--pause-others", action="store_true",
                   help="SIGSTOP the other back-ends (by --pid) during each one's slice, so a "
                        "busy-polling peer does not take the CPU from the one measured")
    n.add_argument("--json", action="store_true", help="print the reports as JSON")
    v = sub.add_parser("vsock", help="stream throughput through a vhost-user-vsock back-end")
    v.add_argument("--socket", "-s", required=True, help="back-end socket path (the VM's --socket)")
    v.add_argument("--uds-path", required=True, help="the VM's --uds-path (host side)")
    v.add_argument("--write-size", type=parse_size, action="append",
                   help="bytes per write (repeatable; default 4k and 64k)")
    v.add_argument("--runtime", type=float, default=3.0, help="seconds per direction and size")
    v.add_argument("--port", type=int, default=5555, help="vsock port used for the runs")
    v.add_argument("--pid", type=int, help="back-end pid, to report its CPU time")
    v.add_argument("--json", action="store_true", help="print the reports as JSON")
    return p


def run_net_bench(pairs: list[tuple[str, str]], *, frame_sizes=(64, 1500), pids=None,
                  labels=None, runtime: float = 5.0, rounds: int = 5,
                  queue_size: int = 256, pause_others: bool = False) -> list[dict]:
    """Frames/s and Gbit/s between two ports per back-end (generator and sink in C).

    The sink port first sends one broadcast so a learning switch knows its
    MAC; the generator then sends unicast UDP frames to it. Back-ends take
    turns in `rounds` slices so machine noise hits them alike.
    """
    from vhost_user.frontend.driver_ring import run_net_bench as drive

    NetDriver = devices.driver("net")

    pids = list(pids or []) + [None] * len(pairs)
    labels = list(labels or []) + [f"backend{i}" for i in range(len(pairs))]
    gen_mac, sink_mac = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
    ends: list[tuple] = []
    stats = []
    try:
        for tx_sock, rx_sock in pairs:
            gen = NetDriver.connect(tx_sock, queue_size=queue_size)
            sink = NetDriver.connect(rx_sock, queue_size=queue_size)
            ends.append((gen, sink))
            sink.send(_udp_frame(sink_mac, b"\xff" * 6, 64))
            sink.wait_tx()
        rx_areas = [sink.fe.ram.alloc(2048 * queue_size, 4096) for _, sink in ends]
        for size in frame_sizes:
            for i, (gen, sink) in enumerate(ends):
                hl = gen.hdr_size
                slot = -(-(hl + size) // 64) * 64
                tx_area = gen.fe.ram.alloc(slot * queue_size, 4096)
                frame = _udp_frame(gen_mac, sink_mac, size)
                for k in range(queue_size):
                    gen.fe.ram.write(tx_area + k * slot, bytes(hl) + frame)
                ends[i] = (gen, sink, tx_area, slot, rx_areas[i])
            per = [{"label": labels[i], "frame_size": size, "sent": 0, "received": 0,
                    "rx_bytes": 0, "elapsed_s": 0.0, "cpu_s": 0.0} for i in range(len(pairs))]
            for _ in range(rounds):
                for i, (gen, sink, tx_area, slot, rx_area) in enumerate(ends):
                    if pause_others:
                        _signal_others(pids, i, signal.SIGSTOP)
                    cpu0 = process_cpu_seconds(pids[i]) if pids[i] else 0.0
                    # Region 0 starts at GPA 0: a GPA in it is its offset in the area.
                    r = drive(gen.tx[0].ring, sink.rx[0].ring, hdr_len=gen.hdr_size,
                              frame_len=size, tx_offset=tx_area, tx_slot_size=slot,
                              tx_slots=queue_size, rx_offset=rx_area, rx_buf_len=2048,
                              rx_slots=queue_size, mergeable=sink.mergeable,
                              duration_s=runtime / rounds)
                    st = per[i]
                    st["cpu_s"] += (process_cpu_seconds(pids[i]) - cpu0) if pids[i] else 0.0
                    for k in ("sent", "received", "rx_bytes"):
                        st[k] += getattr(r, k)
                    st["elapsed_s"] += r.elapsed_s
                    # Let the switch drain what is still in flight before the next slice.
                    _drain(gen, sink)
                    if pause_others:
                        _signal_others(pids, i, signal.SIGCONT)
            for i, st in enumerate(per):
                st["pps"] = st["received"] / st["elapsed_s"]
                st["gbit_s"] = st["rx_bytes"] * 8 / st["elapsed_s"] / 1e9
                st["cpu_ns_per_frame"] = (st["cpu_s"] / st["received"] * 1e9
                                          if pids[i] and st["received"] else None)
                st["pps_per_cpu"] = (st["received"] / st["cpu_s"]
                                     if pids[i] and st["cpu_s"] else None)
                st["ratio_to_first"] = st["pps"] / per[0]["pps"] if per[0]["pps"] else None
            stats += per
            ends = [e[:2] for e in ends]
    finally:
        if pause_others:
            _signal_others(pids, -1, signal.SIGCONT)
        for e in ends:
            e[0].close()
            e[1].close()
    return stats


def _signal_others(pids, me: int, sig: int) -> None:
    for j, pid in enumerate(pids):
        if pid and j != me:
            os.kill(pid, sig)


def _udp_frame(src: bytes, dst: bytes, size: int) -> bytes:
    """An Ethernet/IPv4/UDP frame of `size` bytes (checksums left zero: IPv4 UDP allows it)."""
    import struct

    ip_len = size - 14
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, ip_len, 0, 0, 64, 17, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    udp = struct.pack("!HHHH", 9, 9, ip_len - 20, 0)
    return (dst + src + b"\x08\x00" + ip + udp).ljust(size, b"\0")


def _drain(gen, sink) -> None:
    """Take back tx chains the device finished after the run (rx buffers stay posted)."""
    deadline = time.monotonic() + 2.0
    while gen.tx[0].ring.in_flight and time.monotonic() < deadline:
        gen.tx[0].ring.reap()
        time.sleep(0.01)


def _net_main(args) -> int:
    pairs = []
    for spec in args.pair:
        tx, _, rx = spec.partition(",")
        if not rx:
            raise SystemExit("--pair needs TX_SOCK,RX_SOCK")
        pairs.append((tx, rx))
    stats = run_net_bench(pairs, frame_sizes=args.frame_size or (64, 1500), pids=args.pid,
                          labels=args.label, runtime=args.runtime, rounds=args.rounds,
                          queue_size=args.queue_size, pause_others=args.pause_others)
    for st in stats:
        if args.json:
            print(json.dumps(st))
            continue
        cpu = (f"  backend cpu {st['cpu_ns_per_frame']:.0f} ns/frame "
               f"({st['pps_per_cpu'] / 1e6:.2f} Mpps per CPU-second)"
               if st["cpu_ns_per_frame"] else "")
        ratio = f" x{st['ratio_to_first']:.2f}" if st["ratio_to_first"] is not None else ""
        print(f"{st['label']}: {st['frame_size']} B frames {st['pps'] / 1e6:.3f} Mpps "
              f"{st['gbit_s']:.2f} Gbit/s{ratio} (sent {st['sent']}, received "
              f"{st['received']}){cpu}")
    return 0 if all(st["received"] for st in stats) else 1


def run_gpu_bench(sockets: list[str], *, pids=None, labels=None, width: int = 1920,
                  height: int = 1080, runtime: float = 5.0, rounds: int = 5) -> list[dict]:
    """Cycles/s of full-frame TRANSFER_TO_HOST_2D + RESOURCE_FLUSH per back-end.

    Every back-end gets its own driver and display listener (QEMU's side, which
    receives each UPDATE); the back-ends take turns in `rounds` slices so that
    machine noise hits them alike.
    """
    GpuDriver = devices.driver("gpu")

    pids = list(pids or []) + [None] * len(sockets)
    labels = list(labels or []) + [f"backend{i}" for i in range(len(sockets))]
    ram = -(-(width * height * 4 + (32 << 20)) // (2 << 20)) * (2 << 20)
    drivers = []
    try:
        for path in sockets:
            drv = GpuDriver.connect(path, outputs=[(width, height)], ram_size=ram)
            drivers.append(drv)
            drv.setup_frame(1, width, height)
        stats = [{"label": labels[i], "cycles": 0, "errors": 0, "elapsed_s": 0.0, "cpu_s": 0.0}
                 for i in range(len(sockets))]
        for _ in range(rounds):
            for i, drv in enumerate(drivers):
                cpu0 = process_cpu_seconds(pids[i]) if pids[i] else 0.0
                t0 = time.monotonic()
                while time.monotonic() - t0 < runtime / rounds:
                    stats[i]["errors"] += drv.frame_cycles(1, width, height, 1)
                    stats[i]["cycles"] += 1
                stats[i]["elapsed_s"] += time.monotonic() - t0
                stats[i]["cpu_s"] += (process_cpu_seconds(pids[i]) - cpu0) if pids[i] else 0.0
    finally:
        for drv in drivers:
            drv.close()
    for i, st in enumerate(stats):
        st["cycles_per_s"] = st["cycles"] / st["elapsed_s"]
        st["mb_s"] = st["cycles_per_s"] * width * height * 4 / 1e6
        st["cpu_ms_per_cycle"] = (st["cpu_s"] / st["cycles"] * 1e3) if pids[i] and st["cycles"] else None
        st["ratio_to_first"] = st["cycles_per_s"] / stats[0]["cycles_per_s"]
    return stats


def _gpu_main(args) -> int:
    stats = run_gpu_bench(args.socket, pids=args.pid, labels=args.label, width=args.width,
                          height=args.height, runtime=args.runtime, rounds=args.rounds)
    for st in stats:
        if args.json:
            print(json.dumps(st))
            continue
        cpu = f"  backend cpu {st['cpu_ms_per_cycle']:.2f} ms/cycle" if st["cpu_ms_per_cycle"] else ""
        print(f"{st['label']}: {args.width}x{args.height} transfer+flush {st['cycles_per_s']:.1f} "
              f"cycles/s ({st['mb_s']:.0f} MB/s, x{st['ratio_to_first']:.2f}) errors "
              f"{st['errors']}{cpu}")
    return 0 if all(st["errors"] == 0 for st in stats) else 1


def main(argv: list[str] | None = None) -> int:
    """Run one benchmark; a back-end that is missing or misbehaves is one error line (exit 1)."""
    args = _parser().parse_args(argv)
    try:
        return _main(args)
    except (OSError, VhostUserError) as exc:
        if isinstance(exc, OSError) and exc.filename is None and isinstance(args.socket, str):
            exc = OSError(exc.errno, exc.strerror or str(exc), args.socket)
        elif not isinstance(exc, OSError) and isinstance(getattr(args, "socket", None), str):
            exc = f"{args.socket}: {exc}"
        return report_error("vhost-user-bench", exc)


def _main(args) -> int:
    if args.device == "gpu":
        return _gpu_main(args)
    if args.device == "net":
        return _net_main(args)
    if args.device == "vsock":
        return _vsock_main(args)
    spec = BlkBenchSpec(socket=args.socket, rw=args.rw, block_size=args.bs, iodepth=args.iodepth,
                        queues=args.queues, runtime=args.runtime, queue_size=args.queue_size,
                        pid=args.pid)
    report = run_blk_bench(spec)
    print(json.dumps(asdict(report)) if args.json else report.line())
    return 0 if report.errors == 0 else 1


def memcpy_mb_s(size: int = 64 << 20, rounds: int = 5) -> float:
    """The machine's memcpy bandwidth (best of `rounds` copies of `size` bytes), the ceiling
    for any copy-based data path."""
    import numpy as np

    src = np.ones(size, dtype=np.uint8)
    dst = np.empty_like(src)
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, size / (time.perf_counter() - t0) / 1e6)
    return best


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

    VsockDriver = devices.driver("vsock")

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


def _vsock_main(args) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
