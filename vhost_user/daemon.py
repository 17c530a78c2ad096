"""Daemon hygiene: systemd socket activation and readiness, pid files.

Theory of operation. systemd (or any supervisor that speaks its protocol)
starts a back-end with listening sockets on fds 3, 4, ... and says so in
LISTEN_PID (our pid, so a child that inherits the environment ignores it),
LISTEN_FDS (how many) and LISTEN_FDNAMES (their FileDescriptorName=s,
colon-separated). `listen_fds()` reads that once and clears the variables.
Once every socket listens the back-end sends READY=1 to NOTIFY_SOCKET (a
datagram socket path; a leading '@' names an abstract socket), so a
Type=notify service is "started" exactly when a VMM can connect. A pid file
is created and locked (POSIX fcntl lock) before anything else, written once
ready and removed on stop, so a second instance fails before it touches a
socket and `kill $(cat PIDFILE)` never hits a stranger.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct

__all__ = ["listen_fds", "notify", "PidFile", "SD_LISTEN_FDS_START"]

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
_activation: list[tuple[int, str]] | None = None


def listen_fds() -> list[tuple[int, str]]:
    """The sockets systemd handed us, as (fd, name), in fd order; [] when none.

    Read once and remembered: the variables are removed from the environment
    (as sd_listen_fds(1) does) so that nothing we start inherits them. A name
    systemd did not give is "unknown", like sd_listen_fds_with_names().
    """
    global _activation
    if _activation is not None:
        return _activation
    _activation = []
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    names = os.environ.get("LISTEN_FDNAMES")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    if pid != str(os.getpid()) or not count or not count.isdigit():
        return _activation
    n = int(count)
    labels = names.split(":") if names else []
    labels += ["unknown"] * (n - len(labels))
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
        except OSError:
            continue  # LISTEN_FDS promised more than we got: skip the missing ones
        _activation.append((fd, labels[i]))
    return _activation


def _notify_address(value: str) -> str | bytes:
    return b"\0" + value[1:].encode() if value.startswith("@") else value


class _Notifier:
    """One datagram socket connected to NOTIFY_SOCKET, made before the sandbox closes
    socket() and hides the socket's path."""

    def __init__(self) -> None:
        self.address = None
        self.sock: socket.socket | None = None
        value = os.environ.get("NOTIFY_SOCKET")
        if not value or value[0] not in "/@":
            return
        self.address = _notify_address(value)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # connected now: a path NOTIFY_SOCKET is out of reach inside the file-system sandbox
        try:
            self.sock.connect(self.address)
        except OSError:
            self.sock.close()
            raise

    def send(self, state: str) -> bool:
        if self.sock is None:
            return False
        try:
            self.sock.send(state.encode())
        except OSError as exc:
            log.warning("NOTIFY_SOCKET: cannot send %s: %s", state.split("\n")[0], exc.strerror)
            return False
        return True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


_notifier: _Notifier | None = None


def notify(state: str) -> bool:
    """sd_notify(): send `state` ("READY=1", "STOPPING=1") to $NOTIFY_SOCKET if set.

    The socket is opened on the first call and kept, so that STOPPING=1 can
    still be sent once the sandbox forbids creating sockets.
    """
    global _notifier
    if _notifier is None:
        try:
            _notifier = _Notifier()
        except OSError as exc:
            log.warning("NOTIFY_SOCKET: %s", exc.strerror)
            return False
    return _notifier.send(state)


class PidFile:
    """`--pidfile PATH`: created and locked at start, written when ready, removed on stop."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, path) from None
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = self._holder()
            os.close(self.fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                who = f"process {holder}" if holder else "another process"
                raise OSError(errno.EEXIST, f"locked by running {who}", path) from None
            raise OSError(exc.errno, exc.strerror, path) from None
        st = os.fstat(self.fd)
        self._identity = (st.st_dev, st.st_ino)
        # removed through its directory: the path is gone inside the file-system sandbox
        self._dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def _holder(self) -> int | None:
        """The pid holding the lock (F_GETLK), else the one written in the file."""
        lock = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        try:
            pid = struct.unpack("hhqqi", fcntl.fcntl(self.fd, fcntl.F_GETLK, lock))[4]
            if pid > 0:
                return pid
            text = os.pread(self.fd, 32, 0).decode(errors="replace").strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def write(self) -> None:
        """Write our pid: the back-end is ready."""
        data = f"{os.getpid()}\n".encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def remove(self) -> None:
        """Unlink the file (if it is still the one we locked) and drop the lock."""
        if self.fd < 0:
            return
        name = os.path.basename(self.path)
        try:
            st = os.lstat(name, dir_fd=self._dir_fd)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(name, dir_fd=self._dir_fd)
        except OSError:
            pass
        os.close(self._dir_fd)
        os.close(self.fd)
        self.fd = -1
