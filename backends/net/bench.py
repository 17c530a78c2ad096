"""`vhost-user-bench net`: frames between two ports of vhost-user-net back-ends.

The generator and the sink run in C (driver_ring); back-ends take turns in
slices so machine noise hits them alike, and their CPU per frame is read from /proc.
"""
from __future__ import annotations

import json
import os
import signal
import time

from vhost_user.cli import parse_size
from vhost_user.frontend.bench import process_cpu_seconds

from vhost_user.protocol import VirtioFeature

from .driver import DRIVER_FEATURES, NetDriver

__all__ = ["add_arguments", "run", "run_net_bench"]


def add_arguments(p) -> None:
    """The options of `vhost-user-bench net`."""
    p.add_argument("--pair", action="append", required=True, metavar="TX_SOCK,RX_SOCK",
                   help="two ports of one back-end: frames go in at the first and are "
                        "counted at the second (repeat to compare back-ends in the same run)")
    p.add_argument("--pid", type=int, action="append", help="back-end pid per --pair (CPU time)")
    p.add_argument("--label", action="append", help="name per --pair")
    p.add_argument("--frame-size", type=parse_size, action="append",
                   help="Ethernet frame bytes (repeatable; default 64 and 1500)")
    p.add_argument("--runtime", type=float, default=5.0, help="seconds per back-end and size")
    p.add_argument("--rounds", type=int, default=5, help="alternate the back-ends this often")
    p.add_argument("--queue-size", type=int, default=256)
    p.add_argument("--pause-others", action="store_true",
                   help="SIGSTOP the other back-ends (by --pid) during each one's slice, so a "
                        "busy-polling peer does not take the CPU from the one measured")
    p.add_argument("--packed", action="store_true",
                   help="packed virtqueues (VIRTIO_F_RING_PACKED) instead of split ones")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")


def run_net_bench(pairs: list[tuple[str, str]], *, frame_sizes=(64, 1500), pids=None,
                  labels=None, runtime: float = 5.0, rounds: int = 5,
                  queue_size: int = 256, pause_others: bool = False,
                  packed=None) -> list[dict]:
    """Frames/s and Gbit/s between two ports per back-end (generator and sink in C).

    The sink port first sends one broadcast so a learning switch knows its
    MAC; the generator then sends unicast UDP frames to it. Back-ends take
    turns in `rounds` slices so machine noise hits them alike. `packed` (one
    bool per pair) asks for packed virtqueues on that pair's two ports.
    """
    from .driver_load import run_net_bench as drive


    pids = list(pids or []) + [None] * len(pairs)
    labels = list(labels or []) + [f"backend{i}" for i in range(len(pairs))]
    gen_mac, sink_mac = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
    ends: list[tuple] = []
    stats = []
    try:
        layouts = list(packed or []) + [False] * len(pairs)
        for (tx_sock, rx_sock), pk in zip(pairs, layouts):
            features = DRIVER_FEATURES | ((1 << VirtioFeature.VIRTIO_F_RING_PACKED) if pk else 0)
            gen = NetDriver.connect(tx_sock, queue_size=queue_size, features=features)
            sink = NetDriver.connect(rx_sock, queue_size=queue_size, features=features)
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


def run(args) -> int:
    """Run `vhost-user-bench net` with its parsed options; the exit code."""
    pairs = []
    for spec in args.pair:
        tx, _, rx = spec.partition(",")
        if not rx:
            raise SystemExit("--pair needs TX_SOCK,RX_SOCK")
        pairs.append((tx, rx))
    stats = run_net_bench(pairs, frame_sizes=args.frame_size or (64, 1500), pids=args.pid,
                          labels=args.label, runtime=args.runtime, rounds=args.rounds,
                          queue_size=args.queue_size, pause_others=args.pause_others,
                          packed=[args.packed] * len(pairs))
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
