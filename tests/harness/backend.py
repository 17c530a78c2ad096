"""Start, kill and restart a vhost-user back-end process listening on a Unix socket.

A back-end under test is just a program that creates a listening socket.
The harness starts it in its own session (so killing it, or its process
group, can never reach pytest or another test's processes), waits until the
socket accepts connections (the file appearing is not enough: bind()
precedes listen()) or, for tests that count connections, until the file
exists, keeps its output in a log that failure messages quote, and can
SIGKILL and restart it on the same socket, which is what crash-recovery
tests with ``reconnect-ms`` need. It is the one back-end process class of
every test; ``backends_proc`` builds its starters on it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["BackendError", "BackendProcess", "qsd_blk_argv", "wait_for_socket"]


class BackendError(AssertionError):
    """The back-end did not come up, or died; the message carries its log tail."""


def qsd_blk_argv(image: str | Path, socket_path: str | Path, num_queues: int = 1,
                 writable: bool = True, qsd: str = "qemu-storage-daemon") -> list[str]:
    """argv for qemu-storage-daemon exporting ``image`` as vhost-user-blk on ``socket_path``."""
    return [
        qsd,
        "--blockdev", f"driver=file,node-name=f,filename={image}",
        "--export", (f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,"
                     f"addr.path={socket_path},writable={'on' if writable else 'off'},"
                     f"num-queues={num_queues}"),
    ]


def _accepts(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _tail(log_path: str | Path, lines: int = 30) -> str:
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _explain(message: str, log_path: str | Path) -> str:
    return f"{message}\n--- back-end log ({log_path}) ---\n{_tail(log_path) if log_path else ''}"


def wait_for_socket(path: str | Path, proc: subprocess.Popen, timeout: float = 20.0,
                    log_path: str | Path = "", probe_connect: bool = False) -> None:
    """Return once ``path`` exists (with ``probe_connect``: once it accepts a connection).

    Raises :class:`BackendError`, quoting the tail of ``log_path``, if ``proc``
    exits first or ``timeout`` seconds pass; the caller stops the process.
    """
    path = os.fspath(path)
    deadline = time.monotonic() + timeout
    while True:
        if os.path.exists(path) and (not probe_connect or _accepts(path)):
            return
        if proc.poll() is not None:
            why = f"back-end exited ({proc.returncode}) before listening"
        elif time.monotonic() > deadline:
            why = f"no socket {path} after {timeout}s"
        else:
            time.sleep(0.02)
            continue
        raise BackendError(_explain(why, log_path))


class BackendProcess:
    """One back-end program; ``socket`` (a str) is where a front-end connects.

    ``BackendProcess(argv, socket, log).start()`` runs ``argv`` in a session of
    its own, with its output in ``log``; :meth:`adopt` wraps a process a test
    started itself (passed fds, a systemd environment). With ``probe_connect``
    the readiness probe connects once and hangs up, so back-ends that serve a
    single front-end must go back to accept() after a client leaves;
    qemu-storage-daemon does, and so must ours (QEMU reconnects the same way).
    Without it, the socket file appearing is enough (tests that count the
    back-end's connections or log lines use that).
    """

    def __init__(self, argv: list[str], socket_path: str | Path, log_path: str | Path,
                 probe_connect: bool = True, **popen_kw) -> None:
        self.argv = [str(a) for a in argv]
        self.socket = os.fspath(socket_path)
        self.log_path = Path(log_path)
        self.probe_connect = probe_connect
        self.popen_kw = {"stdin": subprocess.DEVNULL, "start_new_session": True, **popen_kw}
        self.extra: dict = {}
        self._proc: subprocess.Popen | None = None
        self._log = None
        self.starts = 0

    @classmethod
    def adopt(cls, proc: subprocess.Popen, socket_path: str | Path,
              log_path: str | Path) -> "BackendProcess":
        """Wrap ``proc``, already started by the test with its output in ``log_path``."""
        argv = list(proc.args) if isinstance(proc.args, (list, tuple)) else [proc.args]
        bp = cls(argv, socket_path, log_path, probe_connect=False, start_new_session=False)
        bp._proc = proc
        bp.starts = 1
        return bp

    def start(self, timeout: float = 15.0) -> "BackendProcess":
        """Start the program and return once its socket is ready (see the class).

        A restart (a second start) first removes the socket the killed one
        left behind and marks the log where the new run begins.
        """
        if self.running:
            raise ValueError("back-end already running")
        if self.starts and os.path.exists(self.socket):
            os.unlink(self.socket)
        self._log = open(self.log_path, "ab")
        if self.starts:
            self._log.write(f"--- start #{self.starts + 1}: {' '.join(self.argv)}\n".encode())
            self._log.flush()
        self._proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                      **self.popen_kw)
        self.starts += 1
        try:
            wait_for_socket(self.socket, self._proc, timeout, self.log_path, self.probe_connect)
        except BaseException:
            self.kill()
            raise
        return self

    @property
    def proc(self) -> subprocess.Popen:
        """The running (or last) process; ValueError before the first start."""
        if self._proc is None:
            raise ValueError("back-end not started")
        return self._proc

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (default SIGKILL: a crash) and reap the back-end.

        A back-end we started in its own session gets it as a process group;
        an adopted one, which may share pytest's group, only as a process.
        """
        if not self.running:
            return
        own_group = self.popen_kw.get("start_new_session", False)
        send = (lambda s: os.killpg(self._proc.pid, s)) if own_group else self._proc.send_signal
        try:
            send(sig)
        except ProcessLookupError:
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            self._proc.wait()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Send ``sig`` (default SIGTERM), SIGKILL after ``timeout``; return the exit status."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(sig)
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log:
            self._log.close()
            self._log = None
        return self._proc.returncode

    def restart(self, timeout: float = 15.0) -> "BackendProcess":
        """Kill (if alive) and start again on the same socket."""
        self.kill()
        if self._log:
            self._log.close()
            self._log = None
        return self.start(timeout)

    def log(self) -> str:
        """Everything the back-end printed so far ("" before it wrote anything)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_log(self, needle: str, timeout: float = 20.0, count: int = 1) -> str:
        """The whole log once ``needle`` is in it ``count`` times; AssertionError
        quoting the log's tail if that takes over ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            if text.count(needle) >= count:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} x{count} not in the back-end log:\n{text[-3000:]}")
            time.sleep(0.05)

    def log_stats(self, timeout: float = 10.0) -> dict:
        """Send SIGUSR1, on which every back-end logs one ``stats {...}`` line, and
        return that new line's JSON."""
        before = self.log().count(" stats {")
        self.proc.send_signal(signal.SIGUSR1)
        text = self.wait_log(" stats {", timeout, count=before + 1)
        lines = [line for line in text.splitlines() if " stats {" in line]
        return json.loads(lines[-1].split(" stats ", 1)[1])

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines the back-end printed."""
        return _tail(self.log_path, lines)

    def explain(self, message: str) -> str:
        """``message`` and the tail of the back-end's log, for a failure message."""
        return _explain(message, self.log_path)
