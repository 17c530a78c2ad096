"""The device server: listen, serve one front-end at a time, keep listening.

A back-end outlives its front-ends: when QEMU disconnects (or crashes), the
session's queues stop, every fd it received is closed, the device is reset,
and the next connection gets fresh device state (the disk contents remain).
A malformed message that leaves the framing intact gets a NACK and the
session goes on; one that breaks the framing ends that connection only.
"""

from __future__ import annotations

import asyncio
import errno
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
    MessageDecoder,
    ProtocolFeature,
    ReplyKind,
    encode_failure_reply,
    reply_kind,
)
from vhost_user.session import Session

__all__ = ["DeviceServer", "listen_unix", "unlink_if_ours"]

log = logging.getLogger(__name__)


# path -> (st_dev, st_ino, O_PATH fd of its directory) of the socket file this
# process bound there; a back-end unlinks a socket path on stop only while it
# is still that file. The directory fd reaches it from inside the file-system
# sandbox (vhost_user.sandbox_fs), where the path itself is gone.
_BOUND: dict[str, tuple[int, int, int]] = {}
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1: what a front-end can connect to


def _path_error(exc: OSError, path: str, reason: str | None = None) -> OSError:
    """`exc` again, naming `path` (bind/connect errors carry no file name)."""
    err = OSError(exc.errno, reason or exc.strerror or str(exc), path)
    err.__suppress_context__ = True
    return err


def _probe_live(path: str) -> bool:
    """True when something accepts connections on the socket file at `path`.

    A non-blocking connect: a live back-end whose backlog is full (it is busy
    with one front-end) answers EAGAIN, which counts as live too; only
    ECONNREFUSED (no listener bound to the file) means a stale file.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        probe.connect(path)
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return True


def listen_unix(path: str, backlog: int = 4) -> socket.socket:
    """Listen on `path`, replacing a stale socket file only.

    An existing socket file that something still accepts on is never taken
    over (FileExistsError "another back-end is serving PATH"); anything that
    is not a socket is left alone. The socket is bound under a temporary name
    and renamed into place once it listens, so a front-end that sees the path
    can always connect. Every error names `path`.
    """
    if len(os.fsencode(path)) > _SUN_PATH_MAX:  # binding under a short name and renaming would "work"
        raise OSError(errno.ENAMETOOLONG, f"socket path too long (at most {_SUN_PATH_MAX} bytes)", path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _path_error(exc, path) from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, "exists and is not a socket", path)
        if _probe_live(path):
            raise OSError(errno.EADDRINUSE, f"another back-end is serving {path}", path)
    tmp = os.path.join(os.path.dirname(path), f".vhu{os.getpid()}.tmp")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(tmp)
        sock.listen(backlog)
        st = os.lstat(tmp)
        os.rename(tmp, path)
    except OSError as exc:
        sock.close()
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if exc.errno is None:  # "AF_UNIX path too long" has no errno
            raise OSError(errno.ENAMETOOLONG, f"socket path too long (at most {_SUN_PATH_MAX} bytes)",
                          path) from None
        raise _path_error(exc, path) from None
    old = _BOUND.pop(path, None)
    if old is not None:
        os.close(old[2])
    try:
        dir_fd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        sock.close()
        raise _path_error(exc, path) from None
    _BOUND[path] = (st.st_dev, st.st_ino, dir_fd)
    return sock


def unlink_if_ours(path: str) -> bool:
    """Remove the socket file at `path` if it is still the one we bound.

    Another back-end may have replaced a file we left behind (after we were
    told to stop, or when ours went stale); its socket is not ours to remove.
    """
    ours = _BOUND.pop(path, None)
    if ours is None:
        return False
    dev, ino, dir_fd = ours
    name = os.path.basename(path)
    try:
        try:
            st = os.lstat(name, dir_fd=dir_fd)
        except OSError:
            return False
        if (st.st_dev, st.st_ino) != (dev, ino):
            log.info("%s: the socket file is no longer ours; left in place", path)
            return False
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            return False
        return True
    finally:
        os.close(dir_fd)


class DeviceServer:
    """Serves `device` on a listening socket until `stop()`.

    With `connected=True` the socket is one already connected front-end (a
    socket pair end that libvirt or crosvm hands over as `--fd`): that one
    session is served and serve_forever returns when the front-end hangs up.
    """

    def __init__(self, device: VirtioDevice, listener: socket.socket, *, path: str | None = None,
                 connected: bool = False):
        self.device = device
        self.listener = listener
        self.path = path
        self.connected = connected
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
            if self.connected:
                await self._serve_until_stopped(self.listener, stop_task)
                return
            while not self._stopping.is_set():
                accept = asyncio.ensure_future(loop.sock_accept(self.listener))
                done, _ = await asyncio.wait({accept, stop_task}, return_when=asyncio.FIRST_COMPLETED)
                if accept not in done:
                    accept.cancel()
                    break
                conn, _ = accept.result()
                log.info("front-end connected")
                await self._serve_until_stopped(conn, stop_task)
        finally:
            stop_task.cancel()
            self.close()

    async def _serve_until_stopped(self, conn: socket.socket, stop_task: asyncio.Future) -> None:
        serve = asyncio.ensure_future(self._serve_connection(conn))
        await asyncio.wait({serve, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if not serve.done():
            serve.cancel()
            try:
                await serve
            except asyncio.CancelledError:
                pass
        self.sessions_served += 1

    def counters(self) -> dict:
        """Sessions served so far and, per running queue, its counters (SIGUSR1)."""
        out: dict = {"sessions": self.sessions_served, "connected": self._session is not None}
        session = self._session
        if session is not None:
            out["queues"] = {str(q.index): q.stats for q in session.queues if q.started}
        return out

    async def _serve_connection(self, conn: socket.socket) -> None:
        decoder = MessageDecoder(incoming_requests=FrontendRequest, replies_to=BackendRequest)
        channel = AsyncChannel(conn, decoder)
        session = Session(self.device, channel)
        self._session = session
        disconnected = False
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
                    disconnected = True  # logged once the session's state is released
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
            if disconnected:
                # After the device reset: a host client that connects once this line is
                # out belongs to the next session, never to the one being torn down.
                log.info("front-end disconnected")

    def close(self) -> None:
        """Stop serving; remove the socket file we created if it is still ours."""
        try:
            self.listener.close()
        except OSError:
            pass
        if self.path:
            unlink_if_ours(self.path)


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
    flags = getattr(exc, "flags", 0) or 0
    if reply_kind(request, flags, reply_ack=session.has_protocol_feature(ProtocolFeature.REPLY_ACK)) \
            is ReplyKind.NONE:
        return
    try:
        session.channel.send_raw(encode_failure_reply(int(request)))
    except OSError:
        pass
