"""Start, kill and restart a vhost-user back-end process listening on a Unix socket.

A back-end under test is just a program that creates a listening socket.
The harness starts it in its own session (so killing it, or its process
group, can never reach pytest or another test's processes), waits until the
socket accepts connections (the file appearing is not enough: bind()
precedes listen()), keeps its output in a log that failure messages quote,
and can SIGKILL and restart it on the same socket, which is what
crash-recovery tests with ``reconnect-ms`` need.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["BackendError", "BackendProcess", "qsd_blk_argv"]


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


def _accepts(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


class BackendProcess:
    """One back-end program; ``socket`` is where a front-end connects.

    The readiness probe connects once and hangs up. Back-ends that serve a
    single front-end must therefore go back to accept() after a client
    leaves; qemu-storage-daemon does, and so must ours (QEMU reconnects the
    same way).
    """

    def __init__(self, argv: list[str], socket_path: str | Path, log_path: str | Path,
                 probe_connect: bool = True) -> None:
        self.argv = [str(a) for a in argv]
        self.socket = Path(socket_path)
        self.log_path = Path(log_path)
        self.probe_connect = probe_connect
        self._proc: subprocess.Popen | None = None
        self._log = None
        self.starts = 0

    def start(self, timeout: float = 15.0) -> "BackendProcess":
        """Start the program and return once its socket accepts connections."""
        if self.running:
            raise ValueError("back-end already running")
        if self.socket.exists():
            self.socket.unlink()
        self._log = open(self.log_path, "ab")
        self._log.write(f"--- start #{self.starts + 1}: {' '.join(self.argv)}\n".encode())
        self._log.flush()
        self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:
            if self.socket.exists() and (not self.probe_connect or _accepts(self.socket)):
                return self
            if self._proc.poll() is not None:
                raise BackendError(self.explain(f"back-end exited ({self._proc.returncode}) "
                                                "before listening"))
            if time.monotonic() > deadline:
                self.kill()
                raise BackendError(self.explain(f"no socket {self.socket} after {timeout}s"))
            time.sleep(0.02)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the back-end's process group (default SIGKILL: a crash) and reap it."""
        if self.running:
            try:
                os.killpg(self._proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; return the exit status."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.terminate()
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

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines the back-end printed."""
        if not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def explain(self, message: str) -> str:
        return f"{message}\n--- back-end log ({self.log_path}) ---\n{self.log_tail()}"
