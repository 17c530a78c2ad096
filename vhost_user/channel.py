"""Message transport over a Unix stream socket with fd passing.

Theory of operation: vhost-user attaches file descriptors (SCM_RIGHTS) to the
bytes of the message that carries them. asyncio streams drop ancillary data, so
we own the raw socket and call recvmsg ourselves, reading one header first and
then its payload, so every fd arrives with the chunk that starts its message.
The codec (`vhost_user.protocol`) does the framing; this module only moves
bytes and fds. `read_chunk` is shared by the asyncio server side
(`AsyncChannel`) and the blocking front-end side (`BlockingChannel`).
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
import threading
from typing import Sequence

from vhost_user.errors import RemoteProtocolError
from vhost_user.protocol import HEADER_SIZE, Message, MessageDecoder, encode

__all__ = ["AsyncChannel", "BackendChannel", "BlockingChannel", "close_fds", "read_chunk", "send_message"]

log = logging.getLogger(__name__)

# More than any message may carry (SET_MEM_TABLE: 8), so a peer sending too
# many is detected by the codec instead of being truncated silently.
_MAX_FDS_PER_READ = 32
_ANC_SIZE = socket.CMSG_SPACE(_MAX_FDS_PER_READ * array.array("i").itemsize)


def close_fds(fds: Sequence[int]) -> None:
    """Close fds we own, ignoring ones already gone."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def read_chunk(sock: socket.socket, size: int) -> tuple[bytes, list[int]]:
    """One recvmsg of at most `size` bytes; returns (data, fds).

    Rejects truncated or foreign control data, closing any fds it got, because
    a message whose fds were cut off can never be interpreted correctly.
    """
    data, ancdata, msg_flags, _ = sock.recvmsg(size, _ANC_SIZE, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    foreign = False
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
        else:
            foreign = True
    if msg_flags & socket.MSG_CTRUNC or foreign:
        close_fds(fds)
        raise RemoteProtocolError(
            "control data truncated or not SCM_RIGHTS", recoverable=False
        )
    return data, fds


def send_message(sock: socket.socket, msg: Message) -> None:
    """Encode and send one message with its fds (blocking until all is sent)."""
    data, fds = encode(msg)
    anc = []
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(data[sent:])


class _ChannelBase:
    def __init__(self, sock: socket.socket, decoder: MessageDecoder):
        self.sock = sock
        self.decoder = decoder
        self.closed = False

    def _want(self) -> int:
        need = self.decoder.bytes_needed()
        return need if need > 0 else HEADER_SIZE

    def close(self) -> None:
        """Close the socket and any fds the decoder still holds."""
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass
        close_fds(self.decoder.drain_fds())


class AsyncChannel(_ChannelBase):
    """Server side: waits for readability with `loop.add_reader` futures."""

    def __init__(self, sock: socket.socket, decoder: MessageDecoder):
        super().__init__(sock, decoder)
        sock.setblocking(False)

    async def _readable(self) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        fd = self.sock.fileno()
        loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            loop.remove_reader(fd)

    async def receive(self) -> Message | None:
        """Next complete message, or None when the peer closed the socket.

        Raises RemoteProtocolError for malformed input; when its
        `recoverable` is False the caller must drop the connection.
        """
        while True:
            msg = self.decoder.next_message()
            if msg is not None:
                return msg
            try:
                data, fds = read_chunk(self.sock, self._want())
            except BlockingIOError:
                await self._readable()
                continue
            except (ConnectionResetError, OSError) as exc:
                if isinstance(exc, RemoteProtocolError):
                    raise
                log.debug("receive failed: %s", exc)
                return None
            if not data:
                close_fds(fds)
                return None
            self.decoder.feed(data, fds)

    def send(self, msg: Message) -> None:
        """Replies are small; a non-blocking send only fails if the peer is stuck."""
        self.sock.setblocking(True)
        try:
            send_message(self.sock, msg)
        finally:
            self.sock.setblocking(False)

    def send_raw(self, data: bytes) -> None:
        """Bytes the codec built without a typed Message (failure replies)."""
        self.sock.setblocking(True)
        try:
            self.sock.sendall(data)
        finally:
            self.sock.setblocking(False)


class BlockingChannel(_ChannelBase):
    """Front-end side: plain blocking reads with an optional timeout."""

    def __init__(self, sock: socket.socket, decoder: MessageDecoder, timeout: float | None = 30.0):
        super().__init__(sock, decoder)
        sock.settimeout(timeout)

    def receive(self) -> Message | None:
        while True:
            msg = self.decoder.next_message()
            if msg is not None:
                return msg
            data, fds = read_chunk(self.sock, self._want())
            if not data:
                close_fds(fds)
                return None
            self.decoder.feed(data, fds)

    def send(self, msg: Message) -> None:
        send_message(self.sock, msg)


class BackendChannel:
    """The back-end's side of the SET_BACKEND_REQ_FD socket: requests to the front-end.

    Used from any thread (a device may notify from a worker), so sends are
    serialised. Replies are not awaited: devices send notifications only.
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._lock = threading.Lock()

    def send(self, msg: Message) -> None:
        with self._lock:
            self.sock.setblocking(True)
            send_message(self.sock, msg)
