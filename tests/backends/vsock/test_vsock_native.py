"""The native pieces of the vsock data path that need no socket: the connection table
(open addressing with backward-shift deletion) and the credit formula."""

from __future__ import annotations

import socket
from contextlib import contextmanager

from hypothesis import given, settings, strategies as st

from ringlayout import SplitRing
from vhost_user.backends.vsock.fastpath import RX_NO_BUFFER, ConnCounters, ConnTable, credit, rx_fill, tx_burst
from vhost_user.backends.vsock.packet import pack_header_into
from vhost_user._native import ffi, lib
from vhost_user.virtqueue import Virtqueue

HDR = 44        # struct virtio_vsock_hdr
IOV_CAP = 1024  # backends/vsock/vsock.c: iovecs per readv/writev (IOV_MAX)

_keys = st.tuples(st.sampled_from([2, 4, 2**32 - 2]), st.integers(0, 40), st.integers(0, 40))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), _keys), max_size=300))
def test_vsock_conn_table_matches_a_dict_under_inserts_and_removals(ops):
    table, model = ConnTable(), {}
    for insert, key in ops:
        if insert and key not in model:
            rec = ConnCounters(*key, fd=-1, sock_type=1)
            assert table.add(rec)
            model[key] = rec
        elif not insert and key in model:
            table.remove(model.pop(key))
        assert len(table) == len(model)
    for cid in (2, 4, 2**32 - 2):
        for hp in range(41):
            for gp in range(41):
                found = lib.vs_table_lookup(table._t, cid, hp, gp)
                rec = model.get((cid, hp, gp))
                assert (found == rec) if rec is not None else found == ffi.NULL


def test_vsock_conn_table_refuses_a_duplicate_and_stops_at_its_limit():
    table = ConnTable()
    first = ConnCounters(2, 1, 1, -1, 1)
    assert table.add(first)
    assert not table.add(ConnCounters(2, 1, 1, -1, 1))  # the same key twice
    recs = [ConnCounters(2, 100 + i, 7, -1, 1) for i in range(lib.VS_TABLE_MAX - 1)]
    assert all(table.add(r) for r in recs)
    assert len(table) == lib.VS_TABLE_MAX
    assert not table.add(ConnCounters(2, 99999, 7, -1, 1))  # full: stays on the Python path
    table.remove(first)
    assert table.add(ConnCounters(2, 99999, 7, -1, 1))


def test_vsock_credit_follows_the_spec_formula_and_never_goes_negative():
    rec = ConnCounters(2, 1, 1, -1, 1)
    rec.peer_buf_alloc, rec.peer_fwd_cnt, rec.tx_cnt = 65536, 0, 4096
    assert credit(rec) == 65536 - 4096
    rec.tx_cnt = (1 << 32) + 10  # the counters wrap at 32 bits on the wire (5.10.6.3.1)
    rec.peer_fwd_cnt = 5
    assert credit(rec) == 65536 - 5
    rec.peer_buf_alloc = 2  # the guest shrank its buffer below what is in flight
    assert credit(rec) == 0


@contextmanager
def _started_ring(ram, index: int):
    """A started 16-entry split ring on queue `index` and a non-blocking socketpair
    (`host` is the connection's fd C reads or writes, `peer` the host program);
    everything is closed afterwards."""
    ring = SplitRing(ram, 16)
    vq = Virtqueue(index)
    ring.setup(vq)
    memory = ram.memory()
    vq.start(memory)
    host, peer = socket.socketpair()
    try:
        host.setblocking(False)
        yield ring, vq, host, peer
    finally:
        host.close()
        peer.close()
        vq.close()
        memory.close()


def test_vsock_rx_fill_never_writes_past_its_iovec_array(ram):
    """A second rx buffer split into IOV_CAP one-byte pieces after a first one: C
    builds no iovec beyond its array (under ASan, tests/hardening/test_sanitizers.py
    runs this file, an overflow is a report): the split buffer waits for the next
    readv, which it fills alone."""
    with _started_ring(ram, 0) as (ring, vq, host, peer):
        peer.sendall(bytes(range(256)) * 16)
        rec = ConnCounters(2, 1234, 5678, host.fileno(), 1)
        rec.peer_buf_alloc = 1 << 20
        first = ring.add_chain([], [(ram.alloc(HDR + 100), HDR + 100)])
        pieces = ram.alloc(2 * IOV_CAP)
        split = ring.add_chain([], [(ram.alloc(HDR), HDR)] + [(pieces + 2 * i, 1) for i in range(IOV_CAP)],
                               indirect=True)
        ring.publish(first, split)
        out = rx_fill(vq, rec, 3)
        assert (out.status, out.packets, out.bytes) == (RX_NO_BUFFER, 2, 100 + IOV_CAP)
        assert ring.reap() == [(first, HDR + 100), (split, HDR + IOV_CAP)]
        data = (bytes(range(256)) * 16)[100:100 + IOV_CAP]
        assert bytes(ram.read(pieces + 2 * i, 1)[0] for i in range(IOV_CAP)) == data


def test_vsock_tx_burst_never_writes_past_its_iovec_array(ram):
    """The tx twin: a packet whose payload is IOV_CAP one-byte pieces after another
    packet goes to the next writev, not past the iovec array, and every byte arrives."""
    with _started_ring(ram, 1) as (ring, vq, host, peer):
        rec = ConnCounters(2, 1234, 5678, host.fileno(), 1)
        rec.state, rec.buf_alloc = 1, 1 << 20          # VS_ESTABLISHED
        table = ConnTable()
        assert table.add(rec)
        payload = bytes(range(256)) * 5
        heads = []
        for n, split in ((100, False), (IOV_CAP, True)):
            hdr = ram.alloc(HDR)
            header = bytearray(HDR)
            pack_header_into(header, 3, 2, 5678, 1234, n, 1, 5, 0, 0, 0)   # RW, stream
            ram.write(hdr, bytes(header))
            if split:
                data = ram.alloc(2 * n)
                segs = [(data + 2 * i, 1) for i in range(n)]
                for i in range(n):
                    ram.write(data + 2 * i, payload[100 + i:101 + i])
            else:
                data = ram.alloc(n)
                ram.write(data, payload[:n])
                segs = [(data, n)]
            heads.append(ring.add_chain([(hdr, HDR)] + segs, indirect=split))
        ring.publish(*heads)
        out = tx_burst(vq, table, 3)
        assert (out.packets, out.bytes) == (2, 100 + IOV_CAP)
        assert peer.recv(1 << 16) == payload[:100 + IOV_CAP]
        assert [h for h, _ in ring.reap()] == heads
        table.remove(rec)
