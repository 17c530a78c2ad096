"""The device server: listen, serve one front-end at a time, keep listening.

A back-end outlives its front-ends: when QEMU disconnects (or crashes), the
session's queues stop, every fd it received is closed, the device is reset,
and the next connection gets fresh device state (the disk contents remain).
A malformed message that leaves the framing intact gets a NACK and the
session goes on; one that breaks the framing ends that connection only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat

from vhost_user.channel import AsyncChannel
from vhost_user.device import VirtioDevice
from vhost_user.errors import LocalProtocolError, RemoteProtocolError
from vhost_user.protocol import (
    BackendRequest,
    FrontendRequest,
    HeaderFlag,
    MessageDecoder,
    ProtocolFeature,
    encode_failure_reply,
    spec_for,
)
from vhost_user.session import Session

__all__ = ["DeviceServer", "listen_unix"]

log = logging.getLogger(__name__)


def listen_unix(path: str, backlog: int = 4) -> socket.socket:
    """Listen on `path`, replacing a stale socket file only.

    The socket is bound under a temporary name and renamed into place once it
    listens, so a front-end that sees the path can always connect.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
    tmp = f"{path}.{os.getpid()}.tmp"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(tmp)
        sock.listen(backlog)
        os.rename(tmp, path)
    except OSError:
        sock.close()
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return sock


class DeviceServer:
    """Serves `device` on a listening socket until `stop()`."""

    def __init__(self, device: VirtioDevice, listener: socket.socket, *, path: str | None = None):
        self.device = device
        self.listener = listener
        self.path = path
        self.sessions_served = 0
        self._stop_requested = False
        self._stopping: asyncio.Event | None = None
        self._session: Session | None = None

    def stop(self) -> None:
        """Stop serving; safe to call before serve_forever has started."""
        self._stop_requested = True
        if self._stopping is not None:
            self._stopping.set()

    async def serve_forever(self) -> None:
        """Accept and serve front-ends one after another until stopped."""
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        if self._stop_requested:
            self._stopping.set()
        self.listener.setblocking(False)
        stop_task = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                accept = asyncio.ensure_future(loop.sock_accept(self.listener))
                done, _ = await asyncio.wait({accept, stop_task}, return_when=asyncio.FIRST_COMPLETED)
                if accept not in done:
                    accept.cancel()
                    break
                conn, _ = accept.result()
                log.info("front-end connected")
                serve = asyncio.ensure_future(self._serve_connection(conn))
                await asyncio.wait({serve, stop_task}, return_when=asyncio.FIRST_COMPLETED)
                if not serve.done():
                    serve.cancel()
                    try:
                        await serve
                    except asyncio.CancelledError:
                        pass
                self.sessions_served += 1
        finally:
            stop_task.cancel()
            self.close()

    async def _serve_connection(self, conn: socket.socket) -> None:
        decoder = MessageDecoder(incoming_requests=FrontendRequest, replies_to=BackendRequest)
        channel = AsyncChannel(conn, decoder)
        session = Session(self.device, channel)
        self._session = session
        try:
            while True:
                try:
                    msg = await channel.receive()
                except RemoteProtocolError as exc:
                    _close_error_fds(exc)
                    if not exc.recoverable:
                        log.error("front-end broke the protocol, dropping it: %s", exc)
                        return
                    log.warning("malformed message: %s", exc)
                    _nack_malformed(session, exc)
                    continue
                if msg is None:
                    log.info("front-end disconnected")
                    return
                log.debug("<- %s flags=%#x fds=%d", msg.request.name, msg.flags, len(msg.fds))
                try:
                    session.handle(msg)
                except OSError as exc:
                    log.info("front-end connection lost while replying: %s", exc)
                    return
                except LocalProtocolError as exc:
                    # A reply we could not build is our bug; the front-end would
                    # wait forever for it, so end this connection loudly.
                    log.error("cannot answer %s, dropping the front-end: %s", msg.request.name, exc)
                    return
        finally:
            session.close()
            channel.close()
            self._session = None

    def close(self) -> None:
        """Stop serving; remove the socket file we created."""
        try:
            self.listener.close()
        except OSError:
            pass
        if self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def _close_error_fds(exc: RemoteProtocolError) -> None:
    for fd in getattr(exc, "fds", ()) or ():
        try:
            os.close(fd)
        except OSError:
            pass


def _nack_malformed(session: Session, exc: RemoteProtocolError) -> None:
    """A malformed request still gets an answer when the front-end waits for one.

    Known requests with a reply body of their own, and any request that set
    NEED_REPLY under REPLY_ACK, get a failure value; the front-end must not
    hang on a reply we skip. Unknown request numbers are answered the same way.
    """
    request = getattr(exc, "request", None)
    if request is None:
        return
    need_reply = bool((getattr(exc, "flags", 0) or 0) & HeaderFlag.NEED_REPLY)
    has_reply = isinstance(request, FrontendRequest) and spec_for(request).reply is not None
    if not has_reply and not (need_reply and session.has_protocol_feature(ProtocolFeature.REPLY_ACK)):
        return
    try:
        session.channel.send_raw(encode_failure_reply(int(request)))
    except OSError:
        pass
