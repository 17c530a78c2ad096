"""The vsock data path in C (backends/vsock/vsock.c) for a device's Python handlers.

Theory of operation
-------------------
The vsock device keeps its connection state machine in Python; the bytes
of established stream connections move in C. `ConnCounters` is the native
record of one connection (credit counters, state, fd) that the Python
`Conn` reads and writes as its own attributes, so both sides see one copy.
`ConnTable` indexes the records for the tx side. `tx_burst` and `rx_fill`
run with the GIL released; the device calls them from its queue handlers
while holding its own lock, which serialises every access to a record.
They reach the queue through Virtqueue's public native API (native_queue,
chain_buffer, popped_chain).
`CaptureRing` is the bounded C ring (csrc/capture.c) both paths append
vsockmon frames to under `--pcap`, so capturing keeps the bytes in C.
"""

from __future__ import annotations

from dataclasses import dataclass

from vhost_user._native import ffi, lib
from vhost_user.chain import Chain, check_native
from vhost_user.engine import Engine
from vhost_user.virtqueue import Virtqueue

__all__ = ["ConnCounters", "ConnTable", "TxOutcome", "RxOutcome", "RxChain", "NativeLock", "HostLoop",
           "RxEngine", "TxEngine", "tx_burst", "rx_fill",
           "TX_EMPTY", "TX_MORE", "TX_SLOW", "TX_PARTIAL", "TX_ATTENTION",
           "RX_NO_BUFFER", "RX_MORE", "RX_DRAINED", "RX_NO_CREDIT", "RX_SLOW", "RX_EOF", "RX_ERROR",
           "credit", "credit_update_due", "BURST", "CaptureRing"]

TX_EMPTY, TX_MORE, TX_SLOW = lib.VS_TX_EMPTY, lib.VS_TX_MORE, lib.VS_TX_SLOW
TX_PARTIAL, TX_ATTENTION = lib.VS_TX_PARTIAL, lib.VS_TX_ATTENTION
RX_NO_BUFFER, RX_MORE, RX_DRAINED = lib.VS_RX_NO_BUFFER, lib.VS_RX_MORE, lib.VS_RX_DRAINED
RX_NO_CREDIT, RX_SLOW, RX_EOF, RX_ERROR = lib.VS_RX_NO_CREDIT, lib.VS_RX_SLOW, lib.VS_RX_EOF, lib.VS_RX_ERROR

#: packets per call: bounds how long the device lock is held
BURST = 64


def ConnCounters(peer_cid: int, host_port: int, guest_port: int, fd: int, sock_type: int):
    """A zeroed native connection record (struct vs_conn); freed with the object."""
    rec = ffi.new("struct vs_conn *")
    rec.peer_cid, rec.host_port, rec.guest_port = peer_cid, host_port, guest_port
    rec.fd, rec.type = fd, sock_type
    return rec


class ConnTable:
    """(peer CID, host port, guest port) -> record, for packets from the guest.

    Holds Python references to the records it indexes, so C never sees a
    freed one."""

    def __init__(self) -> None:
        self._t = ffi.new("struct vs_table *")
        self._held: dict[int, object] = {}

    def add(self, rec) -> bool:
        """Index `rec`; False when the table is full (the connection stays on the Python path)."""
        if lib.vs_table_insert(self._t, rec) != 0:
            return False
        self._held[id(rec)] = rec
        return True

    def remove(self, rec) -> None:
        lib.vs_table_remove(self._t, rec)
        self._held.pop(id(rec), None)

    def __len__(self) -> int:
        return self._t.count


@dataclass
class TxOutcome:
    status: int
    packets: int
    bytes: int
    sent: int = 0
    conn_key: tuple[int, int, int] | None = None   # (peer CID, host port, guest port)
    chain: Chain | None = None                      # TX_SLOW / TX_PARTIAL: popped, not pushed
    rx_pushed: int = 0                              # credit updates C wrote to the rx queue
    credit_in: int = 0                              # the guest's credit updates C took


@dataclass
class RxOutcome:
    status: int
    packets: int
    bytes: int
    err: int = 0


class CaptureRing:
    """A bounded ring of pcap records in C (csrc/capture.c): appending never waits for
    the reader; a frame the ring has no room for is dropped from the capture and counted."""

    def __init__(self, size: int, snaplen: int) -> None:
        ring = lib.vr_capture_new(size, snaplen)
        if ring == ffi.NULL:
            raise ValueError(f"capture ring of {size} bytes, snaplen {snaplen}: refused "
                             f"(snaplen must be 1..{lib.VR_CAPTURE_MAX_SNAPLEN})")
        self._ring = ffi.gc(ring, lib.vr_capture_free)
        self._buf = ffi.new("uint8_t[]", max(1 << 20, snaplen + lib.VR_CAPTURE_RECORD_HDR))
        self._dropped = ffi.new("uint64_t *")

    def append(self, frame: bytes) -> None:
        """One frame from the Python path (cut to the snap length in C)."""
        lib.vr_capture_put(self._ring, frame, len(frame))

    def read(self) -> memoryview:
        """Whole records waiting in the ring (up to 1 MiB; empty when none), as a view of
        this object's buffer: valid until the next read (the writer writes it at once,
        so the bytes are copied once out of the ring and once into the file)."""
        n = lib.vr_capture_read(self._ring, self._buf, len(self._buf), self._dropped)
        return memoryview(ffi.buffer(self._buf, n))

    def stats(self) -> dict[str, int]:
        """frames appended, frames dropped (no room), record bytes appended."""
        st = ffi.new("struct vr_capture_stats *")
        lib.vr_capture_get_stats(self._ring, st)
        return {"frames": st.frames, "frames_dropped": st.dropped, "bytes": st.bytes}


def _ring(capture: CaptureRing | None):
    return ffi.NULL if capture is None else capture._ring


class RxChain:
    """A chain buffer of the tx path's own for the rx queue: the rx worker's
    (Virtqueue.chain_buffer) may hold a chain Python is filling."""

    def __init__(self) -> None:
        self._segs = ffi.new("struct vr_seg[]", lib.VR_MAX_SEGS)
        self.chain = ffi.new("struct vr_chain *")
        self.chain.cap = lib.VR_MAX_SEGS
        self.chain.segs = self._segs


def tx_burst(vq: Virtqueue, table: ConnTable, guest_cid: int, max_packets: int = BURST,
             capture: CaptureRing | None = None, rx: Virtqueue | None = None,
             rx_chain: RxChain | None = None) -> TxOutcome:
    """Finish up to `max_packets` RW packets (and CREDIT_UPDATEs) from the guest in C;
    stop at the first one Python must see (its chain comes back popped) or that needs
    Python afterwards.
    With `capture`, C appends each packet it finishes to that ring.  With `rx` (a
    started rx queue whose `writer_lock` the caller holds) and `rx_chain`, a credit
    update due is written there by C (`rx_pushed` counts them)."""
    res = ffi.new("struct vs_tx_result *")
    rxq, rxc = ffi.NULL, ffi.NULL
    if rx is not None and rx_chain is not None and rx.started:
        rxq, rxc = rx.native_queue, rx_chain.chain
    check_native(lib.vs_tx_burst(vq.native_queue, table._t, guest_cid, vq.chain_buffer, max_packets,
                                 _ring(capture), rxq, rxc, res), "vsock tx")
    return _outcome(res, vq)


def _outcome(res, vq: Virtqueue) -> TxOutcome:
    out = TxOutcome(res.status, res.packets, res.bytes, res.sent, rx_pushed=res.rx_pushed,
                    credit_in=res.credit_in)
    if res.conn != ffi.NULL:
        out.conn_key = (res.conn.peer_cid, res.conn.host_port, res.conn.guest_port)
    if res.status in (TX_SLOW, TX_PARTIAL):
        out.chain = vq.popped_chain()
    return out


def rx_fill(vq: Virtqueue, rec, guest_cid: int, max_packets: int = BURST,
            capture: CaptureRing | None = None) -> RxOutcome:
    """Read the host socket of `rec` straight into up to `max_packets` rx buffers
    (each filled one appended to `capture`, when given)."""
    res = ffi.new("struct vs_rx_result *")
    check_native(lib.vs_rx_fill(vq.native_queue, rec, guest_cid, vq.chain_buffer, max_packets,
                                _ring(capture), res), "vsock rx")
    return RxOutcome(res.status, res.packets, res.bytes, res.err)


def credit(rec) -> int:
    """Bytes the guest can still take on this connection (virtio 1.2, 5.10.6.3.1)."""
    return lib.vs_credit(rec)


def credit_update_due(rec) -> bool:
    """Whether the guest must be told how much of our buffer is free again (the rule
    C applies after every packet it finishes)."""
    return bool(lib.vs_credit_update_due(rec))


class NativeLock:
    """The device lock: a recursive mutex (struct vs_lock) that Python takes with `with`
    and the host loop takes in C, so the loop needs no GIL to exclude the workers.
    Blocking happens in C with the GIL released (cffi), so a thread holding the lock
    and waiting for the GIL never waits on one that holds the GIL and wants the lock."""

    __slots__ = ("native",)

    def __init__(self) -> None:
        lock = lib.vs_lock_new()
        if lock == ffi.NULL:
            raise MemoryError("vsock: no memory for the device lock")
        self.native = ffi.gc(lock, lib.vs_lock_free)

    def acquire(self) -> bool:
        lib.vs_lock_acquire(self.native)
        return True

    def release(self) -> None:
        lib.vs_lock_release(self.native)

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        lib.vs_lock_release(self.native)


class HostLoop:
    """The host thread's C loop (vsock_host.c) over the sockets of established stream
    connections, beside the Python selector whose epoll fd is `py_fd`. Every method but
    `run` is called with the device lock held."""

    def __init__(self, lock: NativeLock, py_fd: int, guest_cid: int) -> None:
        loop = lib.vs_host_new(lock.native, py_fd, guest_cid)
        if loop == ffi.NULL:
            raise OSError("vsock: the host loop's epoll set could not be made")
        self._lock = lock  # the loop holds its address
        self._h = ffi.gc(loop, lib.vs_host_free)
        self._res = ffi.new("struct vs_host_result *")
        self._chain = RxChain()
        self._counters = ffi.new("struct vs_host_counters *")

    def set_rx(self, vq: Virtqueue | None, capture: CaptureRing | None = None) -> None:
        """The started rx queue the loop fills (None: none)."""
        if vq is None:
            lib.vs_host_set_rx(self._h, ffi.NULL, ffi.NULL, ffi.NULL)
        else:
            lib.vs_host_set_rx(self._h, vq.native_queue, self._chain.chain, _ring(capture))

    def set_flags(self, *, hold: bool, worker_waits: bool) -> None:
        lib.vs_host_set_flags(self._h, int(hold), int(worker_waits))

    def add(self, rec) -> bool:
        """Read `rec`'s socket in C from now on; False when the loop cannot take it."""
        return lib.vs_host_add(self._h, rec) == 0

    def remove(self, rec) -> None:
        lib.vs_host_del(self._h, rec)

    def py_work(self) -> None:
        """Python's rx handler has work: the rx worker calls it first (any thread)."""
        lib.vs_host_py_work(self._h)

    def set_ctrl(self, queued: bool) -> None:
        """Python has control packets queued: no credit update from C before them."""
        lib.vs_host_set_ctrl(self._h, int(queued))

    def run(self, timeout_ms: int):
        """Sleep in C until Python has work (GIL released): returns the struct
        vs_host_result, valid until the next call."""
        check_native(lib.vs_host_run(self._h, timeout_ms, self._res), "vsock host loop")
        return self._res

    def counters(self) -> dict[str, int]:
        lib.vs_host_counters(self._h, self._counters)
        c = self._counters
        return {"packets": c.packets, "bytes": c.bytes, "wakeups": c.wakeups}


class RxEngine(Engine):
    """The rx queue's worker runs C (vs_rx_handler): Python's handler `handler` first
    whenever Python has work for the ring (`HostLoop.py_work`), then the connections
    of the host loop that wait for rx buffers, so a guest kick that only brings buffers
    costs no Python."""

    def __init__(self, loop: HostLoop, handler) -> None:
        self._loop = loop
        self._py = handler
        self._handle = None

    def bind(self, vq: Virtqueue):
        self._handle = ffi.new_handle(vq)  # the trampoline's way back to vq._handler (us)
        lib.vs_host_set_py(self._loop._h, ffi.addressof(lib, "vr_py_handler"), self._handle)
        return ffi.addressof(lib, "vs_rx_handler"), self._loop._h

    def __call__(self, vq: Virtqueue):
        return self._py(vq)


class TxEngine(Engine):
    """The tx queue's worker runs C (vs_tx_handler): bursts of RW packets and credit
    updates under the device lock, with no Python. What C hands back goes to Python:
    `locked(vq, outcome)` with the lock still held by C, for a short write or a
    connection that needs attention; `handler(vq)` for everything else (a packet C
    does not take, whose chain `take_slow` returns; a wake; a session's first run)."""

    def __init__(self, loop: HostLoop, table: ConnTable, rx_chain: RxChain, handler, locked) -> None:
        self.x = ffi.new("struct vs_tx *")
        self.x.h = loop._h
        self.x.t = table._t
        self.x.rxc = rx_chain.chain
        self._keep = (loop, table, rx_chain)
        self._py = handler
        self._locked = locked
        self._handle = None

    def bind(self, vq: Virtqueue):
        self._handle = ffi.new_handle(vq)
        x = self.x
        x.c = vq.chain_buffer
        x.txq = ffi.NULL       # Python's handler runs the session's first burst
        x.stash_kind = lib.VS_STASH_NONE
        x.py_fn = ffi.addressof(lib, "vr_py_handler")
        x.py_ctx = self._handle
        return ffi.addressof(lib, "vs_tx_handler"), x

    def __call__(self, vq: Virtqueue):
        if self.x.stash_kind == lib.VS_STASH_LOCKED:
            return self._locked(vq, self._stashed(vq))
        return self._py(vq)

    def _stashed(self, vq: Virtqueue) -> TxOutcome:
        out = _outcome(self.x.stash, vq)
        out.packets = out.bytes = out.credit_in = out.rx_pushed = 0  # C counted them
        return out

    def set_queue(self, vq: Virtqueue | None) -> None:
        """The tx queue C may burst on (lock held); None: Python's handler first."""
        self.x.txq = vq.native_queue if vq is not None else ffi.NULL

    def py_work(self, on: bool = True) -> None:
        """Python's handler runs on the next kick or wake (any thread)."""
        self.x.py_work = int(on)

    def take_slow(self, vq: Virtqueue) -> TxOutcome | None:
        """The packet C handed back (lock held): its chain, popped; None if none."""
        if self.x.stash_kind != lib.VS_STASH_SLOW:
            return None
        self.x.stash_kind = lib.VS_STASH_NONE
        return self._stashed(vq)

    def counters(self) -> dict[str, int]:
        c = self.x.counters
        return {"packets": c.packets, "bytes": c.bytes, "credit_in": c.credit_in,
                "rx_pushed": c.rx_pushed}
