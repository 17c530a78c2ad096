"""Hostile guests on a switch port: logged, counted, dropped; other ports keep working."""

from __future__ import annotations

import os
import select
import struct

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from vhost_user.backends.net.header import OFFLOAD_FEATURES, NetHeader
from vhost_user.backends.net.driver import DRIVER_FEATURES, NetDriver
from vhost_user.frontend.splitring import DESC_F_WRITE, append_avail, write_desc

MAC = ["02:00:00:00:00:b%d" % i for i in range(3)]
BCAST = "ff:ff:ff:ff:ff:ff"


def _frame(src: int, payload: bytes = b"ok") -> bytes:
    return bytes(Ether(src=MAC[src], dst=BCAST) / IP() / UDP() / payload)


def _still_switching(a: NetDriver, b: NetDriver, c: NetDriver) -> None:
    """b (a good neighbour) still reaches a and c."""
    frame = _frame(1, b"still alive")
    b.send(frame)
    assert [f for _, f in a.recv()] == [frame]
    assert [f for _, f in c.recv()] == [frame]


HOSTILE = {
    # name: (raw chain bytes, counter, log text)
    "zero_length_frame": (bytes(12), "tx_runt", "runt frame"),   # a header, no frame
    "truncated_header": (bytes(5), "tx_runt", "runt frame"),
    "oversize_frame": (bytes(12) + bytes(65551), "tx_oversize", "larger than 64 KiB"),
    "data_valid_from_a_guest": (NetHeader(flags=2).pack() + _frame(0), "tx_bad_header", "broken"),
    "unknown_header_flags": (NetHeader(flags=0x80).pack() + _frame(0), "tx_bad_header", "broken"),
    "csum_offset_outside_frame": (NetHeader(flags=1, csum_start=40, csum_offset=4000).pack() + _frame(0),
                                  "tx_bad_header", "broken"),
    "udp_gso_not_offered": (NetHeader(flags=1, gso_type=3, gso_size=100, csum_start=34, csum_offset=6).pack()
                            + _frame(0), "tx_bad_header", "broken"),
    "gso_without_needs_csum": (NetHeader(gso_type=1, gso_size=100).pack() + _frame(0),
                               "tx_bad_header", "broken"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_frame_is_dropped_counted_logged(net_backend, case):
    raw, counter, text = HOSTILE[case]
    bp = net_backend(3)
    a, b, c = (NetDriver.connect(s) for s in bp.socks)
    for d in (a, b, c):
        d.fill_rx()
    a.send(b"", raw=raw)
    a.wait_tx()
    assert bp.stats()[0][counter] == 1
    bp.wait_log(text)
    assert b.poll() == [] and c.poll() == []
    _still_switching(a, b, c)
    good = _frame(0, b"a is fine again")
    a.send(good)
    assert [f for _, f in b.recv()] == [good]


def test_needs_csum_from_a_port_without_csum_is_dropped(net_backend):
    bp = net_backend(2)
    a = NetDriver.connect(bp.socks[0], features=DRIVER_FEATURES & ~OFFLOAD_FEATURES)
    b = NetDriver.connect(bp.socks[1])
    b.fill_rx()
    a.send(_frame(0), NetHeader(flags=1, csum_start=34, csum_offset=6))
    a.wait_tx()
    assert bp.stats()[0]["tx_bad_header"] == 1
    assert b.poll() == []


def test_tx_descriptor_out_of_bounds_breaks_only_that_queue(net_backend):
    bp = net_backend(3)
    a, b, c = (NetDriver.connect(s) for s in bp.socks)
    for d in (a, b, c):
        d.fill_rx()
    tx = a.tx[0]
    ram = a.fe.ram
    write_desc(ram, tx.ring.desc_gpa, 0, 1 << 40, 64)   # outside guest memory
    append_avail(ram, tx.ring.avail_gpa, tx.size, 0)
    os.eventfd_write(tx.kick_fd, 1)
    assert select.select([tx.err_fd], [], [], 5)[0], "tx queue did not signal its err eventfd"
    bp.wait_log("outside guest memory on queue 1")
    assert b.poll() == [] and c.poll() == []
    _still_switching(a, b, c)   # a's rx queue still receives
    assert bp.running


def test_rx_descriptor_out_of_bounds_breaks_only_that_rx_queue(net_backend):
    bp = net_backend(3)
    a, b, c = (NetDriver.connect(s) for s in bp.socks)
    a.fill_rx()
    c.fill_rx()
    rx = b.rx[0]
    ram = b.fe.ram
    write_desc(ram, rx.ring.desc_gpa, 0, 1 << 40, 2048, DESC_F_WRITE)   # writable, outside memory
    avail = rx.ring.avail_gpa
    ram.write(avail + 4, struct.pack("<H", 0))
    ram.write(avail + 2, struct.pack("<H", 1))
    frame = _frame(0, b"to everyone")
    a.send(frame)                        # the switch meets b's broken ring while flooding
    assert [f for _, f in c.recv()] == [frame]
    assert select.select([rx.err_fd], [], [], 5)[0], "rx queue did not signal its err eventfd"
    bp.wait_log("outside guest memory on queue 0")
    _still_switching_from(c, a)
    assert bp.running


def _still_switching_from(src: NetDriver, dst: NetDriver) -> None:
    frame = bytes(Ether(src=MAC[2], dst=BCAST) / IP() / UDP() / b"c to a")
    src.send(frame)
    assert [f for _, f in dst.recv()] == [frame]
