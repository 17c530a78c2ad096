"""vhost-user-net config space, MTU and the control queue, through the built-in front-end.

A driver that negotiates VIRTIO_NET_F_CTRL_VQ (as crosvm's guests do) gets
the control queue served by the back-end: queue pairs, receive filter, MAC
table. One that does not (QEMU, which keeps the control queue itself) sees
the switch behave as before: every pair, no filter.
"""

from __future__ import annotations

import os
import struct
import time

import pytest

from vhost_user.frontend.profiles import CROSVM, QEMU
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from backends_proc import wait_for_socket
from vhost_user.backends.net.ctrl import ERR, OK, parse_mac_table
from vhost_user.backends.net.device import default_mac
from vhost_user.backends.net.header import NetFeature
from vhost_user.backends.net.driver import CTRL_FEATURES, DRIVER_FEATURES, NetDriver
from vhost_user.frontend import FrontendError
from vhost_user.protocol import FrontendRequest as R, ProtocolFeature as PF, U64

CTRL = DRIVER_FEATURES | CTRL_FEATURES
SRC = "02:00:00:00:00:a0"
BCAST = "ff:ff:ff:ff:ff:ff"
PROMISC, ALLMULTI, ALLUNI, NOMULTI, NOUNI, NOBCAST = range(6)


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _frame(dst: str, payload: bytes = b"x", size: int = 0, sport: int = 1000) -> bytes:
    pkt = Ether(src=SRC, dst=dst) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=sport, dport=9)
    raw = bytes(pkt / payload)
    return raw + b"\0" * (size - len(raw)) if size else raw


def _ports(net_backend, specs: list[str], *args: str):
    """A back-end whose ports are given as --port specs; bp.socks in order."""
    bp = net_backend(0, *[a for s in specs for a in ("--port", s)], *args)
    bp.socks = [s.split("socket=", 1)[1].split(",", 1)[0] for s in specs]
    for s in bp.socks:
        wait_for_socket(s, bp.proc, log_path=bp.log_path)
    return bp


def _only(d: NetDriver, expected: list[bytes], pair: int = 0) -> None:
    """d receives exactly `expected` (the last one is a marker sent after the others)."""
    got = [f for _, f in d.recv(pair, count=len(expected))]
    time.sleep(0.1)
    got += [f for _, f in d.poll(pair)]
    assert got == expected


def test_get_config_carries_mac_status_max_pairs_and_mtu(net_backend, sockdir):
    p0 = os.path.join(sockdir, "c0.sock")
    bp = _ports(net_backend, [f"socket={p0},mac=02:11:22:33:44:55,mtu=9000"], "--num-queues", "4")
    with NetDriver.connect(p0, features=CTRL, num_pairs=4) as d:
        fe = d.fe
        for bit in (NetFeature.MAC, NetFeature.STATUS, NetFeature.MTU, NetFeature.CTRL_VQ,
                    NetFeature.CTRL_RX, NetFeature.MQ, NetFeature.CTRL_MAC_ADDR):
            assert fe.backend_features >> bit & 1, bit
        assert not fe.backend_features >> NetFeature.GUEST_ANNOUNCE & 1  # QEMU would stop RARPs
        assert fe.backend_protocol_features >> PF.MTU & 1
        assert fe.num_queues == 9                       # 4 pairs + the control queue
        cfg = fe.get_config(12)
        assert cfg == _mac("02:11:22:33:44:55") + struct.pack("<HHH", 1, 4, 9000)
        assert fe.get_config(2, offset=10) == struct.pack("<H", 9000)   # any slice
    assert bp.stats()[0]["mtu"] == 9000


def test_default_mac_is_stable_local_unicast_from_the_socket_path(net_backend, sockdir):
    macs = []
    for _ in range(2):
        bp = net_backend(1)
        with NetDriver.connect(bp.socks[0]) as d:
            macs.append(d.fe.get_config(6))
        bp.stop()
    assert macs[0] == macs[1] == default_mac(bp.socks[0])
    assert macs[0][0] & 0x03 == 0x02        # locally administered, unicast


# crosvm hands every queue to the back-end, the control queue included: MQ there depends on it.
@pytest.mark.parametrize("profile", [QEMU, CROSVM], ids=["qemu", "crosvm"])
def test_vq_pairs_set_spreads_frames_over_every_pair(net_backend, profile):
    bp = net_backend(2, "--num-queues", "4")
    a = NetDriver.connect(bp.socks[0], features=CTRL, num_pairs=4, profile=profile)
    b = NetDriver.connect(bp.socks[1], features=CTRL, num_pairs=4, profile=profile)
    assert b.ctrl is not None and b.ctrl.index == 8
    for p in range(4):
        b.fill_rx(p)
    # Until VQ_PAIRS_SET only the first pair is used (5.1.6.5.5): pair 2's frame lands on rx 0.
    first = _frame(BCAST, b"before")
    a.send(first, pair=2)
    assert [f for _, f in b.recv(0)] == [first]
    assert b.set_pairs(4) == OK
    assert b.set_pairs(5) == ERR and b.set_pairs(0) == ERR
    frames = [_frame(BCAST, b"pair%d" % p) for p in range(4)]
    for p in range(4):
        a.send(frames[p], pair=p)
    for p in range(4):
        assert [f for _, f in b.recv(p)] == [frames[p]]
    # Back to two pairs: pair 3's frame goes to rx 1 (3 mod 2).
    assert b.set_pairs(2) == OK
    late = _frame(BCAST, b"late")
    a.send(late, pair=3)
    assert [f for _, f in b.recv(1)] == [late]
    port_b = bp.stats()[1]
    assert all(port_b["queues"][str(2 * p)]["requests"] > 0 for p in range(4)), port_b["queues"]
    assert port_b["ctrl_commands"] == 4 and port_b["ctrl_errors"] == 2
    a.close()
    b.close()


def test_without_ctrl_vq_every_pair_is_used_as_under_qemu(net_backend):
    bp = net_backend(2, "--num-queues", "2")
    a = NetDriver.connect(bp.socks[0], num_pairs=2)
    b = NetDriver.connect(bp.socks[1], num_pairs=2)
    assert b.ctrl is None
    for p in (0, 1):
        b.fill_rx(p)
    frame = _frame(BCAST, b"pair1")
    a.send(frame, pair=1)
    assert [f for _, f in b.recv(1)] == [frame]
    a.close()
    b.close()


def test_mac_filter_promisc_allmulti_and_nobcast(net_backend):
    bp = net_backend(2)
    a = NetDriver.connect(bp.socks[0], features=CTRL)
    b = NetDriver.connect(bp.socks[1], features=CTRL)
    b.fill_rx()
    own = b.fe.get_config(6).hex(":")
    other, extra, group = "02:00:00:00:77:01", "02:00:00:00:77:02", "01:00:5e:00:00:fb"
    # Promiscuous until told otherwise (as QEMU's virtio-net starts)
    a.send(_frame(other, b"p"))
    _only(b, [_frame(other, b"p")])
    assert b.rx_mode(PROMISC, False) == OK and b.mac_table([], []) == OK
    for dst in (other, group):
        a.send(_frame(dst, b"refused"))
    a.send(_frame(own, b"own"))
    a.send(_frame(BCAST, b"bcast"))
    _only(b, [_frame(own, b"own"), _frame(BCAST, b"bcast")])
    filtered = bp.stats()[1]["rx_filtered"]
    assert filtered == 2
    # The MAC table admits its entries.
    assert b.mac_table([_mac(extra)], [_mac(group)]) == OK
    for dst in (other, extra, group):
        a.send(_frame(dst, b"t"))
    _only(b, [_frame(extra, b"t"), _frame(group, b"t")])
    # allmulti, alluni, nobcast, nomulti
    assert b.mac_table([], []) == OK and b.rx_mode(ALLMULTI, True) == OK
    a.send(_frame("01:00:5e:00:00:01", b"m"))
    a.send(_frame(other, b"u"))
    a.send(_frame(own, b"mark"))
    _only(b, [_frame("01:00:5e:00:00:01", b"m"), _frame(own, b"mark")])
    assert b.rx_mode(NOBCAST, True) == OK and b.rx_mode(ALLUNI, True) == OK
    a.send(_frame(BCAST, b"b"))
    a.send(_frame(other, b"u2"))
    _only(b, [_frame(other, b"u2")])
    assert b.rx_mode(NOMULTI, True) == OK
    a.send(_frame(group, b"g"))
    a.send(_frame(own, b"mark2"))
    _only(b, [_frame(own, b"mark2")])
    # Promiscuous again: everything.
    assert b.rx_mode(PROMISC, True) == OK
    a.send(_frame(BCAST, b"all"))
    _only(b, [_frame(BCAST, b"all")])
    assert bp.stats()[1]["rx_filtered"] == filtered + 1 + 1 + 1 + 1
    a.close()
    b.close()


def test_addr_set_moves_the_port_mac_and_config_space(net_backend):
    bp = net_backend(2)
    a = NetDriver.connect(bp.socks[0], features=CTRL)
    b = NetDriver.connect(bp.socks[1], features=CTRL)
    b.fill_rx()
    old = b.fe.get_config(6).hex(":")
    new = "02:00:00:00:99:01"
    assert b.rx_mode(PROMISC, False) == OK
    assert b.command(1, 1, _mac(new)) == OK                    # VIRTIO_NET_CTRL_MAC_ADDR_SET
    assert b.command(1, 1, _mac("01:00:00:00:00:01")) == ERR   # multicast is not an address
    assert b.fe.get_config(6) == _mac(new)
    a.send(_frame(old, b"old"))
    a.send(_frame(new, b"new"))
    _only(b, [_frame(new, b"new")])
    assert b.command(3, 0) == OK                     # ANNOUNCE_ACK
    assert b.command(2, 0, b"\0\0") == ERR           # VLAN filtering is not offered
    a.close()
    b.close()


def test_rx_extra_modes_need_their_feature(net_backend):
    bp = net_backend(1)
    with NetDriver.connect(bp.socks[0], features=CTRL & ~(1 << NetFeature.CTRL_RX_EXTRA)) as d:
        assert d.rx_mode(PROMISC, False) == OK
        assert d.rx_mode(NOBCAST, True) == ERR


def test_mtu_drops_longer_frames_and_counts_them(net_backend, sockdir):
    p0, p1 = (os.path.join(sockdir, f"m{i}.sock") for i in range(2))
    bp = _ports(net_backend, [f"socket={p0}", f"socket={p1},mtu=1500"])
    a = NetDriver.connect(p0)
    b = NetDriver.connect(p1)
    b.fill_rx()
    fits, too_long, tagged = _frame(BCAST, size=1514), _frame(BCAST, size=1515), None
    tagged = bytes(Ether(src=SRC, dst=BCAST, type=0x8100)) + b"\0\x01\x08\x00" + b"\0" * 1500
    a.send(too_long)
    a.send(fits)
    a.send(tagged)                       # an 802.1Q tag does not count against the MTU
    _only(b, [fits, tagged])
    assert bp.stats()[1]["rx_over_mtu"] == 1
    bp.wait_log("longer than the port's MTU dropped")     # the monitor logs the increase
    # The other way: port a has no MTU, a 9000-byte frame is delivered whole.
    a.fill_rx()
    jumbo = _frame(BCAST, size=9014)
    b.send(jumbo)
    assert [f for _, f in a.recv()] == [jumbo]
    a.close()
    b.close()


def test_negotiated_mtu_feature_enforces_1500_by_default(net_backend):
    bp = net_backend(2)
    a = NetDriver.connect(bp.socks[0])
    b = NetDriver.connect(bp.socks[1], features=DRIVER_FEATURES | (1 << NetFeature.MTU))
    b.fill_rx()
    assert b.fe.get_config(2, offset=10) == struct.pack("<H", 1500)
    a.send(_frame(BCAST, size=1600))
    a.send(_frame(BCAST, size=1514))
    _only(b, [_frame(BCAST, size=1514)])
    assert bp.stats()[1]["rx_over_mtu"] == 1
    a.close()
    b.close()


def test_net_set_mtu_is_acked_and_enforced(net_backend):
    bp = net_backend(2)
    a = NetDriver.connect(bp.socks[0])
    b = NetDriver.connect(bp.socks[1], features=DRIVER_FEATURES | (1 << NetFeature.MTU),
                          extra_protocol_features=1 << PF.MTU)
    assert b.fe.has_protocol_feature(PF.MTU) and b.fe.has_protocol_feature(PF.REPLY_ACK)
    b.fe.call(R.NET_SET_MTU, U64(9000))              # REPLY_ACK: an error would raise here
    with pytest.raises(FrontendError):
        b.fe.call(R.NET_SET_MTU, U64(67))            # below the 68 the spec allows
    b.fill_rx()
    a.send(_frame(BCAST, size=9015))
    a.send(_frame(BCAST, size=9014))
    _only(b, [_frame(BCAST, size=9014)])
    stats = bp.stats()[1]
    assert stats["rx_over_mtu"] == 1 and stats["mtu"] == 9000
    bp.wait_log("MTU 9000 (NET_SET_MTU)")
    a.close()
    b.close()


def test_net_set_mtu_without_the_protocol_feature_is_refused(net_backend):
    bp = net_backend(1)
    with NetDriver.connect(bp.socks[0]) as d:
        assert not d.fe.has_protocol_feature(PF.MTU)
        with pytest.raises(FrontendError):
            d.fe.call(R.NET_SET_MTU, U64(9000))


def test_malformed_control_commands_get_err_and_the_port_keeps_serving(net_backend):
    bp = net_backend(2, "--num-queues", "2")
    a = NetDriver.connect(bp.socks[0], features=CTRL, num_pairs=2)
    b = NetDriver.connect(bp.socks[1], features=CTRL, num_pairs=2)
    assert b.command(1, 0, struct.pack("<I", 5) + b"\0" * 6) == ERR   # 5 entries, room for 1
    assert b.command(1, 0, struct.pack("<II", 0, 0) + b"!") == ERR    # trailing bytes
    assert b.command(1, 0, struct.pack("<I", 1) + _mac("01:00:00:00:00:01")
                     + struct.pack("<I", 0)) == ERR                    # multicast in the unicast table
    assert b.command(4, 0, b"\x02") == ERR                             # short VQ_PAIRS_SET
    assert b.command(0, 9, b"\x01") == ERR                             # no such RX command
    assert b.command(0xEE, 0) == ERR
    b.fill_rx()
    frame = _frame(BCAST, b"still")
    a.send(frame)
    assert [f for _, f in b.recv()] == [frame]
    a.close()
    b.close()


def test_parse_mac_table_splits_unicast_and_multicast():
    u, m = _mac("02:00:00:00:00:01"), _mac("01:00:5e:00:00:01")
    data = struct.pack("<I", 1) + u + struct.pack("<I", 1) + m
    assert parse_mac_table(data) == ([u], [m])
    for bad in (b"", data[:-1], data + b"\0", struct.pack("<I", 2) + u):
        with pytest.raises(ValueError):
            parse_mac_table(bad)


def test_control_queue_started_without_ctrl_vq_stays_idle(net_backend):
    """A front-end that starts every queue (crosvm) for a driver that did not take
    CTRL_VQ: the last queue is accepted and left alone."""
    bp = net_backend(2, "--num-queues", "2")
    a = NetDriver.connect(bp.socks[0], num_pairs=2)
    b = NetDriver.connect(bp.socks[1], num_pairs=2)
    b.fe.setup_queue(4, 64)                       # REPLY_ACK: a refusal would raise here
    b.fill_rx()
    frame = _frame(BCAST, b"idle ctrl")
    a.send(frame)
    assert [f for _, f in b.recv()] == [frame]
    bp.wait_log("queue 4 idle (VIRTIO_NET_F_CTRL_VQ not negotiated)")
    a.close()
    b.close()


def test_without_mq_the_control_queue_is_queue_2(net_backend):
    bp = net_backend(2, "--num-queues", "4")
    a = NetDriver.connect(bp.socks[0])
    b = NetDriver.connect(bp.socks[1], features=CTRL & ~(1 << NetFeature.MQ))
    assert b.ctrl is not None and b.ctrl.index == 2     # 5.1.2: N = 1 without MQ
    assert b.set_pairs(2) == ERR                        # VQ_PAIRS_SET needs MQ
    assert b.rx_mode(PROMISC, False) == OK
    b.fill_rx()
    a.send(_frame("02:00:00:00:77:01", b"no"))
    a.send(_frame(BCAST, b"yes"))
    _only(b, [_frame(BCAST, b"yes")])
    a.close()
    b.close()
