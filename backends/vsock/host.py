"""The host side of one VM: Unix sockets and their readiness loop.

Theory of operation
-------------------
One thread per VM waits in a selector on: the `--uds-path` listener (host
programs that say `CONNECT <port>\\n`), clients still sending that line, and
the Unix sockets of live connections. The thread sleeps in C
(`fastpath.HostLoop`, vsock_host.c) on the sockets of established stream
connections and on this selector's epoll fd: a readable stream is moved
straight into guest rx buffers there, under the device lock (a C mutex,
also the rx queue's writer lock), with no Python and no GIL. C hands a
connection back for what it cannot finish (no buffer, no credit, EOF, an
error); the device then wakes the rx worker for it, and the connection
returns to C once drained. Connections C may not read (CONNECT leftovers,
SEQPACKET, Python's control packets queued first) stay in the selector,
where a readable one is filled from this thread by `device.host_readable`;
on a writable one the device flushes bytes the guest sent earlier. Other
threads never change the selector or the loop themselves: they call
`update(conn)` and this thread recomputes that connection's interest, so
each has one user.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading

from vhost_user.server import listen_unix, unlink_if_ours

from . import fastpath as fast
from .connection import Conn

__all__ = ["HostSide", "parse_connect", "MAX_CONNECT_LINE"]

log = logging.getLogger(__name__)

MAX_CONNECT_LINE = 64


def parse_connect(line: bytes) -> int | None:
    """`CONNECT <port>` (decimal, u32) -> port, or None when malformed."""
    parts = line.strip().split()
    if len(parts) != 2 or parts[0] != b"CONNECT" or not parts[1].isdigit():
        return None
    port = int(parts[1])
    return port if port <= 0xFFFFFFFF else None


class _Pending:
    """A host client that has not finished its CONNECT line."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.data = bytearray()


class HostSide:
    """Selector thread for one VM; `device` provides the callbacks."""

    def __init__(self, device, uds_path: str | None):
        self.device = device
        self.uds_path = uds_path
        self._sel = selectors.DefaultSelector()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._sel.register(self._wake, selectors.EVENT_READ, ("wake", None))
        self._dirty: set[Conn] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._stop = False
        self.loop = fast.HostLoop(device._lock, self._sel.fileno(), device.guest_cid)
        if uds_path is not None:
            self._listener = _listen(uds_path)
            self._sel.register(self._listener, selectors.EVENT_READ, ("listen", None))
        self._thread = threading.Thread(target=self._run, name=f"vsock-host-{device.guest_cid}",
                                        daemon=True)
        self._thread.start()

    # -- called from any thread ---------------------------------------------
    def update(self, conn: Conn) -> None:
        """Recompute `conn`'s interest (read, write, or gone) in the loop thread."""
        with self._lock:
            self._dirty.add(conn)
        os.eventfd_write(self._wake, 1)

    def connect_path(self, port: int) -> str:
        return f"{self.uds_path}_{port}"

    def close(self) -> None:
        if self._stop:
            return
        self._stop = True
        os.eventfd_write(self._wake, 1)
        self._thread.join(5)
        for key in list(self._sel.get_map().values()):
            kind, obj = key.data
            if kind == "pending":
                obj.sock.close()
        self._sel.close()
        os.close(self._wake)
        if self._listener is not None:
            self._listener.close()
            unlink_if_ours(self.uds_path)

    # -- loop ------------------------------------------------------------------
    def forget(self, conn: Conn) -> None:
        """Take `conn` out of the C loop (device lock held): before its socket closes,
        and before its record can be freed."""
        self.loop.remove(conn.rec)

    def _run(self) -> None:
        while not self._stop:
            self._apply_dirty()
            try:
                if not self.device.host_loop_wait(self.loop, 1000):
                    continue  # only C's work, or connections handed back (now dirty)
            except Exception:
                log.exception("vsock host loop: the C loop failed")
                return
            try:
                events = self._sel.select(0)
            except OSError as exc:
                log.error("vsock host loop: select failed: %s", exc)
                return
            for key, mask in events:
                kind, obj = key.data
                try:
                    self._dispatch(kind, obj, key, mask)
                except Exception:
                    log.exception("vsock host loop: %s event failed", kind)

    def _dispatch(self, kind, obj, key, mask) -> None:
        if kind == "wake":
            try:
                os.eventfd_read(self._wake)
            except BlockingIOError:
                pass
        elif kind == "listen":
            self._accept()
        elif kind == "pending":
            self._read_connect_line(obj)
        elif kind == "conn":
            if mask & selectors.EVENT_WRITE:
                self.device.host_writable(obj)
            if mask & selectors.EVENT_READ:
                self.device.host_readable(obj)
            with self._lock:
                self._dirty.add(obj)  # applied before the next select

    def _apply_dirty(self) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        for conn in dirty:
            # Under the device lock: the tx worker closes a connection's socket under it, and
            # a close between the fileno check and register() killed this thread (EBADF).
            with self.device._lock:
                try:
                    self._apply_one(conn)
                except (OSError, ValueError, KeyError) as exc:
                    log.warning("vsock host loop: %s: %s; forgotten", conn.describe(), exc)
                    self._forget(conn.sock)

    def mark(self, conn: Conn) -> None:
        """`update(conn)` from this thread itself: no wake-up needed."""
        with self._lock:
            self._dirty.add(conn)

    def _apply_one(self, conn: Conn) -> None:
        mask = self.device.host_interest(conn)
        conn.interest = mask
        sock = conn.sock
        if sock.fileno() < 0:
            self.loop.remove(conn.rec)
            self._forget(sock)
            return
        if mask & selectors.EVENT_READ and self.device.host_loop_ok(conn):
            if conn.rec.host_slot or self.loop.add(conn.rec):
                mask &= ~selectors.EVENT_READ  # C reads it
        elif conn.rec.host_slot:
            self.loop.remove(conn.rec)
        registered = self._sel.get_map().get(sock.fileno())
        if registered is not None and registered.data[1] is not conn:
            self._sel.unregister(sock.fileno())  # fd number reused by a new connection
            registered = None
        if mask == 0:
            if registered is not None:
                self._sel.unregister(sock.fileno())
        elif registered is None:
            self._sel.register(sock, mask, ("conn", conn))
        elif registered.events != mask:
            self._sel.modify(sock, mask, ("conn", conn))

    def _forget(self, sock) -> None:
        for fd, key in list(self._sel.get_map().items()):
            if key.fileobj is sock:
                self._sel.unregister(fd)

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        if self._sel.get_map().get(sock.fileno()) is not None:
            self._sel.unregister(sock.fileno())  # a closed connection's fd, not forgotten yet
        self._sel.register(sock, selectors.EVENT_READ, ("pending", _Pending(sock)))

    def _read_connect_line(self, pending: _Pending) -> None:
        """Collect `CONNECT <port>\\n`; bytes after it in the same read are kept."""
        sock = pending.sock
        try:
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        pending.data += data
        newline = pending.data.find(b"\n")
        if newline < 0 and data and len(pending.data) <= MAX_CONNECT_LINE:
            return
        self._sel.unregister(sock)
        port = parse_connect(bytes(pending.data[:newline])) if 0 <= newline <= MAX_CONNECT_LINE else None
        if port is None:
            log.warning("host client sent no valid CONNECT line (%r); closing it",
                        bytes(pending.data[:MAX_CONNECT_LINE]))
            sock.close()
            return
        self.device.host_connect(sock, port, bytes(pending.data[newline + 1:]))


def _listen(path: str) -> socket.socket:
    """The --uds-path listener: like the vhost-user socket, a live one is never taken
    over, only a stale socket file is replaced, and errors name the path."""
    sock = listen_unix(path, 64)
    sock.setblocking(False)
    return sock
