"""The switch through the built-in front-end: real back-end process, real sockets.

Frames are crafted with scapy and compared byte for byte.
"""

from __future__ import annotations

import os
import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from vhost_user.backends.net.header import OFFLOAD_FEATURES, NetFeature, NetHeader
from vhost_user.backends.net.driver import DRIVER_FEATURES, NetDriver

MACS = ["02:00:00:00:00:%02x" % (0xA0 + i) for i in range(4)]
BCAST = "ff:ff:ff:ff:ff:ff"
PLAIN = DRIVER_FEATURES & ~OFFLOAD_FEATURES  # no checksum/TSO offloads at all


def _udp(src: int, dst: str, payload: bytes = b"hello") -> bytes:
    return bytes(Ether(src=MACS[src], dst=dst) / IP(src=f"10.0.0.{src + 1}", dst="10.0.0.99")
                 / UDP(sport=1000, dport=2000) / payload)


def _connect(bp, n: int, **kw) -> list[NetDriver]:
    drivers = [NetDriver.connect(s, **kw) for s in bp.socks[:n]]
    for d in drivers:
        d.fill_rx()
    return drivers


def _quiet(d: NetDriver, wait: float = 0.3) -> list:
    time.sleep(wait)
    return d.poll()


def _announce(drivers: list[NetDriver]) -> None:
    """Each port broadcasts once so the switch learns every MAC; drain the floods."""
    for i, d in enumerate(drivers):
        d.send(_udp(i, BCAST, b"hi"))
        for j, other in enumerate(drivers):
            if j != i:
                other.recv()


def test_broadcast_floods_every_other_port_and_never_the_source(net_backend):
    bp = net_backend(3)
    a, b, c = _connect(bp, 3)
    frame = _udp(0, BCAST)
    a.send(frame)
    assert [f for _, f in b.recv()] == [frame]
    assert [f for _, f in c.recv()] == [frame]
    assert _quiet(a) == []
    stats = bp.stats()
    assert stats[0]["flooded"] == 1 and stats[0]["rx_frames"] == 0


def test_unicast_after_learning_reaches_only_its_destination(net_backend):
    bp = net_backend(3)
    drivers = _connect(bp, 3)
    _announce(drivers)
    a, b, c = drivers
    frame = _udp(0, MACS[1], b"only for b")
    a.send(frame)
    assert [f for _, f in b.recv()] == [frame]
    assert _quiet(c) == [] and _quiet(a, 0) == []
    assert bp.stats()[0]["flooded"] == 1  # only the announce


def test_unknown_unicast_is_flooded(net_backend):
    bp = net_backend(3)
    a, b, c = _connect(bp, 3)
    frame = _udp(0, "02:00:00:00:00:77")
    a.send(frame)
    assert [f for _, f in b.recv()] == [frame] and [f for _, f in c.recv()] == [frame]


def test_frame_to_a_mac_on_its_own_port_is_not_echoed(net_backend):
    bp = net_backend(2)
    a, b = _connect(bp, 2)
    _announce([a, b])
    a.send(_udp(0, MACS[0]))         # a's own MAC: filtered, never sent back
    assert _quiet(a) == [] and _quiet(b, 0) == []


def test_mergeable_rx_spans_several_buffers_and_descriptors(net_backend):
    bp = net_backend(2)
    a = NetDriver.connect(bp.socks[0])
    b = NetDriver.connect(bp.socks[1], rx_buffer_size=256, rx_split=3)
    b.fill_rx()
    frame = _udp(0, BCAST, bytes(range(256)) * 8)
    a.send(frame)
    ((hdr, got),) = b.recv()
    assert got == frame
    assert hdr.num_buffers == -(-(12 + len(frame)) // 256) > 1


def test_frame_larger_than_posted_buffers_is_dropped_and_counted(net_backend):
    bp = net_backend(2)
    a = NetDriver.connect(bp.socks[0])
    features = DRIVER_FEATURES & ~(1 << NetFeature.MRG_RXBUF)
    b = NetDriver.connect(bp.socks[1], features=features, rx_buffer_size=12 + 600)
    b.fill_rx()
    a.send(_udp(0, BCAST, b"x" * 1000))          # does not fit one 612-byte buffer
    small = _udp(0, BCAST, b"fits")
    a.send(small)
    assert [f for _, f in b.recv()] == [small]   # the big one was not truncated into it
    assert bp.stats()[1]["rx_no_room"] == 1
    bp.wait_log("no (or too small) rx buffers posted")


def test_no_rx_buffers_posted_drops_and_counts(net_backend):
    bp = net_backend(2)
    a = NetDriver.connect(bp.socks[0])
    b = NetDriver.connect(bp.socks[1])
    a.send(_udp(0, BCAST))
    a.wait_tx()
    time.sleep(0.2)
    assert bp.stats()[1]["rx_no_room"] == 1
    b.fill_rx()
    a.send(_udp(0, BCAST, b"later"))
    assert [f for _, f in b.recv()] == [_udp(0, BCAST, b"later")]


def _partial_udp(src: int, payload: bytes) -> tuple[bytes, NetHeader, bytes]:
    """A UDP frame whose checksum field holds only the pseudo-header sum (NEEDS_CSUM)."""
    pkt = Ether(src=MACS[src], dst=BCAST) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=7, dport=9) / payload
    full = bytes(pkt)
    l4 = 14 + 20
    # pseudo-header sum, not complemented: what a guest with CSUM offload writes
    ip = full[14:34]
    words = [ip[12:14], ip[14:16], ip[16:18], ip[18:20], b"\x00\x11", (8 + len(payload)).to_bytes(2, "big")]
    s = sum(int.from_bytes(w, "big") for w in words)
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    partial = full[:l4 + 6] + s.to_bytes(2, "big") + full[l4 + 8:]
    return partial, NetHeader(flags=1, csum_start=l4, csum_offset=6), full


def test_partial_checksum_passes_to_a_peer_with_guest_csum(net_backend):
    bp = net_backend(2)
    a, b = _connect(bp, 2)
    partial, hdr, _ = _partial_udp(0, b"offload me")
    a.send(partial, hdr)
    ((got_hdr, got),) = b.recv()
    assert got == partial
    assert (got_hdr.flags, got_hdr.csum_start, got_hdr.csum_offset) == (1, 34, 6)


def test_partial_checksum_is_completed_for_a_peer_without_guest_csum(net_backend):
    bp = net_backend(2)
    a = NetDriver.connect(bp.socks[0])
    b = NetDriver.connect(bp.socks[1], features=PLAIN)
    b.fill_rx()
    partial, hdr, full = _partial_udp(0, b"offload me")
    a.send(partial, hdr)
    ((got_hdr, got),) = b.recv()
    assert got == full                      # scapy computed the same checksum
    assert got_hdr.flags == 0 and got_hdr.gso_type == 0
    assert bp.stats()[1]["csum_resolved"] == 1


def _tso_frame(v6: bool, payload: bytes, mss: int) -> tuple[bytes, NetHeader]:
    ip = (IPv6(src="fd00::1", dst="fd00::2") if v6 else IP(src="10.0.0.1", dst="10.0.0.2", id=100))
    pkt = Ether(src=MACS[0], dst=BCAST) / ip / TCP(sport=5000, dport=80, seq=1000, flags="PA") / payload
    raw = bytearray(bytes(pkt))
    l4 = 14 + (40 if v6 else 20)
    raw[l4 + 16:l4 + 18] = b"\0\0"         # partial checksum: value is irrelevant to the switch
    hdr = NetHeader(flags=1, gso_type=4 if v6 else 1, hdr_len=l4 + 20, gso_size=mss,
                    csum_start=l4, csum_offset=16)
    return bytes(raw), hdr


def test_tso_frame_passes_whole_to_a_peer_with_guest_tso(net_backend):
    bp = net_backend(2)
    a, b = _connect(bp, 2)
    frame, hdr = _tso_frame(False, bytes(range(256)) * 20, 1448)
    a.send(frame, hdr)
    ((got_hdr, got),) = b.recv()
    assert got == frame and (got_hdr.gso_type, got_hdr.gso_size) == (1, 1448)


@pytest.mark.parametrize("v6", [False, True], ids=["tcpv4", "tcpv6"])
def test_tso_frame_is_segmented_for_a_peer_without_guest_tso(net_backend, v6):
    bp = net_backend(2)
    a = NetDriver.connect(bp.socks[0])
    b = NetDriver.connect(bp.socks[1], features=PLAIN)
    b.fill_rx()
    payload = bytes(range(256)) * 20
    mss = 1400
    frame, hdr = _tso_frame(v6, payload, mss)
    a.send(frame, hdr)
    n = -(-len(payload) // mss)
    got = b.recv(count=n)
    assert len(got) == n
    data = b""
    for i, (h, seg) in enumerate(got):
        assert h.flags == 0 and h.gso_type == 0
        pkt = Ether(seg)
        l3 = pkt[IPv6] if v6 else pkt[IP]
        tcp = pkt[TCP]
        chunk = bytes(tcp.payload)
        assert len(chunk) == min(mss, len(payload) - i * mss)
        assert tcp.seq == 1000 + i * mss
        assert ("P" in str(tcp.flags)) == (i == n - 1)
        # scapy recomputes checksums on rebuild: equal bytes means they were right
        fresh = Ether(seg)
        del fresh[TCP].chksum
        if not v6:
            del fresh[IP].chksum
            assert l3.len == len(seg) - 14 and l3.id == 100 + i
        assert bytes(fresh) == seg
        data += chunk
    assert data == payload
    assert bp.stats()[1]["segmented"] == 1


def test_mq_pairs_deliver_on_every_pair(net_backend):
    bp = net_backend(2, "--num-queues", "2")
    a = NetDriver.connect(bp.socks[0], num_pairs=2)
    b = NetDriver.connect(bp.socks[1], num_pairs=2)
    assert a.fe.num_queues == 5 and a.fe.has_feature(NetFeature.MQ)   # 2 pairs + control
    for p in (0, 1):
        b.fill_rx(p)
    frame0, frame1 = _udp(0, BCAST, b"pair0"), _udp(0, BCAST, b"pair1")
    a.send(frame0, pair=0)
    a.send(frame1, pair=1)
    got = {f for p in (0, 1) for _, f in b.recv(p)}
    assert got == {frame0, frame1}


def test_reconnected_front_end_gets_traffic_again(net_backend):
    bp = net_backend(2)
    a, b = _connect(bp, 2)
    _announce([a, b])
    b.close()
    b = NetDriver.connect(bp.socks[1])
    b.fill_rx()
    frame = _udp(0, MACS[1])
    a.send(frame)
    assert [f for _, f in b.recv()] == [frame]


def test_icmp_echo_round_trip_between_two_ports(net_backend):
    bp = net_backend(2)
    a, b = _connect(bp, 2)
    ping = bytes(Ether(src=MACS[0], dst=BCAST) / IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(id=1, seq=1))
    a.send(ping)
    ((_, got),) = b.recv()
    reply = Ether(got)
    pong = bytes(Ether(src=MACS[1], dst=reply.src) / IP(src="10.0.0.2", dst="10.0.0.1")
                 / ICMP(type=0, id=1, seq=1))
    b.send(pong)
    assert [f for _, f in a.recv()] == [pong]
    assert bp.stats()[1]["flooded"] == 0   # a was learnt from its ping


def test_learnt_mac_ages_out_and_unicast_floods_again(net_backend):
    bp = net_backend(3, "--mac-ageing", "0.5")
    drivers = _connect(bp, 3)
    _announce(drivers)
    a, b, c = drivers
    time.sleep(1.0)                       # b's entry is older than the ageing time now
    frame = _udp(0, MACS[1], b"after ageing")
    a.send(frame)
    assert [f for _, f in b.recv()] == [frame]
    assert [f for _, f in c.recv()] == [frame]   # flooded: the switch forgot b


@pytest.mark.parametrize("tx_split", [1, 3, 7])
def test_frame_tail_copied_straight_from_a_split_tx_chain_into_split_rx_buffers(net_backend, tx_split):
    """Past its checked head (HEAD_COPY bytes), a frame goes from the tx
    descriptors to the rx buffers directly: every split of both sides must
    give the same bytes, unicast and flooded, with and without capture."""
    bp = net_backend(3)
    a = NetDriver.connect(bp.socks[0])
    b = NetDriver.connect(bp.socks[1], rx_buffer_size=256, rx_split=3)
    c = NetDriver.connect(bp.socks[2])
    for d in (a, b, c):
        d.fill_rx()
    _announce([a, b, c])
    for size in (60, 140, 141, 700, 1500):
        payload = bytes((k * 7 + size) & 0xFF for k in range(size))
        uni = _udp(0, MACS[1], payload)
        a.send(uni, split=tx_split)
        ((hdr, got),) = b.recv()
        assert got == uni, size
        flood = _udp(0, BCAST, payload[::-1])
        a.send(flood, split=tx_split)
        assert [f for _, f in b.recv()] == [flood] and [f for _, f in c.recv()] == [flood], size
    assert _quiet(c, 0.1) == []


def test_cached_destination_follows_a_mac_that_moves_port(net_backend):
    """A's tx worker caches where b's MAC is; once that MAC speaks from c, the
    next frame from a must go to c, never to the old port."""
    bp = net_backend(3)
    drivers = _connect(bp, 3)
    _announce(drivers)
    a, b, c = drivers
    for k in range(3):
        frame = _udp(0, MACS[1], b"to b %d" % k)
        a.send(frame)
        assert [f for _, f in b.recv()] == [frame]
    moved = bytes(Ether(src=MACS[1], dst=BCAST) / IP(src="10.0.0.2", dst="10.0.0.99")
                  / UDP(sport=1, dport=2) / b"moved")
    c.send(moved)
    assert [f for _, f in a.recv()] == [moved] and [f for _, f in b.recv()] == [moved]
    after = _udp(0, MACS[1], b"to the new port")
    a.send(after)
    assert [f for _, f in c.recv()] == [after]
    assert _quiet(b) == []


def test_cached_destination_still_ages_out(net_backend):
    """A lookup a's worker cached while b was fresh does not outlive b's entry."""
    bp = net_backend(3, "--mac-ageing", "0.5")
    drivers = _connect(bp, 3)
    _announce(drivers)
    a, b, c = drivers
    first = _udp(0, MACS[1], b"while fresh")
    a.send(first)
    assert [f for _, f in b.recv()] == [first] and _quiet(c, 0.1) == []
    time.sleep(0.8)                       # a keeps talking, b stays silent
    late = _udp(0, MACS[1], b"after ageing")
    a.send(late)
    assert [f for _, f in b.recv()] == [late]
    assert [f for _, f in c.recv()] == [late]   # flooded: b's entry aged out


def test_burst_into_a_short_rx_ring_delivers_what_fits_in_order_and_counts_the_rest(net_backend):
    """Frames of one burst share an rx session (one push); the frames that do
    not fit are counted, and the chains they could not use stay the guest's."""
    bp = net_backend(2)
    a = NetDriver.connect(bp.socks[0])
    b = NetDriver.connect(bp.socks[1])
    a.fill_rx()
    assert b.fill_rx(count=10) == 10
    b.send(_udp(1, BCAST, b"hi"))         # the switch learns b
    a.recv()
    frames = [_udp(0, MACS[1], b"frame %03d" % k) for k in range(40)]
    for f in frames:
        a.send(f)
    a.wait_tx()
    got = [f for _, f in b.recv(count=10, refill=False)]
    assert got == frames[:10]
    assert _quiet(b, 0.2) == []
    assert bp.stats()[1]["rx_no_room"] == 30
    b.fill_rx()
    tail = _udp(0, MACS[1], b"after refill")
    a.send(tail)
    assert [f for _, f in b.recv()] == [tail]


def test_backend_keeps_no_fds_of_closed_front_ends(net_backend):
    bp = net_backend(2)
    fds = lambda: len(os.listdir(f"/proc/{bp.pid}/fd"))  # noqa: E731
    a, b = _connect(bp, 2)
    a.close()
    b.close()
    time.sleep(0.3)
    before = fds()
    for _ in range(3):
        a, b = _connect(bp, 2)
        _announce([a, b])
        a.close()
        b.close()
    time.sleep(0.3)
    assert fds() == before


def test_port_reconnecting_under_flood_does_not_disturb_the_others(net_backend):
    """rx queues are attached/detached (and their memory swapped) while another
    port's tx worker is writing into them; the switch must stay consistent."""
    import threading

    bp = net_backend(3)
    a, b = _connect(bp, 2)
    stop = threading.Event()
    sent = [0]

    def flood() -> None:
        while not stop.is_set():
            a.send(_udp(0, BCAST, b"flood"))
            sent[0] += 1

    t = threading.Thread(target=flood)
    t.start()
    try:
        for _ in range(5):
            c = NetDriver.connect(bp.socks[2])
            c.fill_rx()
            c.recv(timeout=5)            # it is receiving the flood
            c.close()
    finally:
        stop.set()
        t.join()
    a.wait_tx()                          # every flood frame went through the switch
    assert bp.running and sent[0] > 0
    flood = _udp(0, BCAST, b"flood")
    backlog = b.poll()
    assert backlog and all(f == flood for _, f in backlog)   # b received intact frames
    b.fill_rx()
    final = _udp(0, BCAST, b"final")
    a.send(final)
    assert [f for _, f in b.recv()] == [final]
