"""Helpers for vsock tests: start the real `vhost-user-vsock` process; host-side socket helpers."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time

from backends_proc import spawn
from harness.backend import BackendProcess

__all__ = ["start_vsock", "guest_vsock_backend", "add_guest_vsock", "host_listener", "host_connect", "connect_when_listening", "read_line", "recv_all",
           "sha", "hash_one_connection", "WAIT_VSOCK"]

# Guest shell: the guest's vsock device appears once the modules are loaded; socat needs
# /dev/vsock only for ioctls, so wait for the transport (the harness loads the modules).
WAIT_VSOCK = """
n=0; while ! grep -q vmw_vsock_virtio_transport /proc/modules; do
    n=$((n + 1)); [ "$n" -gt 100 ] && { echo "no virtio vsock transport"; exit 1; }; sleep 0.1
done
"""


def start_vsock(workdir: str, *args: str, wait_for: str, name: str = "vsock") -> BackendProcess:
    """Our vhost-user-vsock as a user runs it; returns once `wait_for` (a socket) exists."""
    argv = [sys.executable, "-m", "vhost_user.backends.vsock", "-v", *args]
    return spawn(argv, wait_for, os.path.join(workdir, f"{name}.log"))


def guest_vsock_backend(listens_on, log, *args: str) -> BackendProcess:
    """`vhost-user-vsock -v ARGS` for QEMU guests; returns once socket LISTENS_ON accepts."""
    argv = [sys.executable, "-m", "vhost_user.backends.vsock", "-v", *args]
    return BackendProcess(argv, listens_on, log).start()


def add_guest_vsock(vm, sock, options: str = "") -> None:
    """Attach `vhost-user-vsock-pci` on SOCK to a GuestVM (OPTIONS: ",packed=on" and such)."""
    vm.add_args("-chardev", f"socket,id=vs0,path={sock}",
                "-device", f"vhost-user-vsock-pci,chardev=vs0{options}")


def hash_one_connection(path: str, out: dict) -> threading.Thread:
    """A host program on `<uds-path>_<port>`: sets out["sha"], out["bytes"] to the sha256
    and size of what one guest connection sends (a thread; join it)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(120)

    def run():
        with listener:
            conn, _ = listener.accept()
            digest, total = hashlib.sha256(), 0
            with conn:
                while chunk := conn.recv(1 << 20):
                    digest.update(chunk)
                    total += len(chunk)
            out["sha"], out["bytes"] = digest.hexdigest(), total

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def host_listener(path: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A host program's listening socket at `<uds-path>_<port>`."""
    s = socket.socket(socket.AF_UNIX, kind)
    s.bind(path)
    s.listen(8)
    s.settimeout(10)
    return s


def host_connect(uds: str, port: int, extra: bytes = b"") -> tuple[socket.socket, bytes]:
    """Connect to the VM's uds path with `CONNECT <port>\\n` (+extra in the same write)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(uds)
    s.sendall(b"CONNECT %d\n" % port + extra)
    return s, b""


def connect_when_listening(uds: str, port: int, *, timeout: float = 120,
                           sock_timeout: float = 30) -> tuple[socket.socket, bytes]:
    """A host program's connection to guest `port` and the back-end's `OK <host port>`
    line: CONNECT until the answer is OK (a try before the guest listens is refused);
    TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(sock_timeout)
        s.connect(uds)
        s.sendall(b"CONNECT %d\n" % port)
        line = read_line(s)
        if line.startswith(b"OK "):
            return s, line
        s.close()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the guest never listened on vsock port {port}: {line!r}")
        time.sleep(0.3)


def read_line(s: socket.socket) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        out += chunk
    return out


def recv_all(s: socket.socket, n: int, delay: float = 0.0) -> bytes:
    """Up to `n` bytes (fewer at EOF), after waiting `delay` s (a host reader that starts late)."""
    time.sleep(delay)
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(min(1 << 20, n - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def guest_stream_to_host(drv, listener: socket.socket, port: int, data: bytes,
                         timeout: float = 60) -> tuple[object, socket.socket, bytes]:
    """Built-in front-end guest `drv` connects to `port`, the host side accepts on
    `listener` and reads while the guest sends `data`: (guest stream, host socket,
    the bytes the host read)."""
    g = drv.connect(port)
    h, _ = listener.accept()
    h.settimeout(timeout / 2)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(recv_all(h, len(data))))
    reader.start()
    g.send(data, timeout=timeout)
    reader.join(timeout)
    return g, h, got[0] if got else b""


def host_stream_to_guest(drv, uds: str, port: int, data: bytes,
                         timeout: float = 60) -> tuple[object, socket.socket, bytes]:
    """A host program connects to guest `port` (where `drv` listens) and sends `data`
    while the guest reads it: (guest stream, host socket, the bytes the guest read)."""
    drv.listen(port)
    h, _ = host_connect(uds, port)
    g = drv.accept(port)
    assert read_line(h).startswith(b"OK")
    writer = threading.Thread(target=h.sendall, args=(data,))
    writer.start()
    got = g.recv_exact(len(data), timeout=timeout)
    writer.join(timeout)
    return g, h, got


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
