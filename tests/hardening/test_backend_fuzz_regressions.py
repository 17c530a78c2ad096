"""Findings of the back-end fuzz targets (net-header, vsock-packet, gpu-commands), pinned."""
from __future__ import annotations

import struct

from vhost_user.backends.gpu.commands import CtrlHeader, CtrlType as T, FLAG_FENCE
from vhost_user.backends.gpu.device import GpuDevice, GpuOptions
from vhost_user.fuzzing.guestram import FuzzRam


def test_gpu_fenced_command_refused_by_the_parser_still_echoes_its_fence():
    """gpu-commands: an ATTACH_BACKING announcing more entries than it carries was
    answered with a bare error header, so the guest's fence was never signalled."""
    ram = FuzzRam()
    memory = ram.memory()
    dev = GpuDevice(GpuOptions())
    try:
        hdr = CtrlHeader(T.CMD_RESOURCE_ATTACH_BACKING, FLAG_FENCE, 0xDEADBEEF12, 0, 0).pack()
        cmd = hdr + struct.pack("<II", 1, 5) + struct.pack("<QI4x", 0, 4096)  # 5 announced, 1 carried
        resp = CtrlHeader.unpack(dev.execute(cmd, memory))
        assert resp.type == T.RESP_ERR_UNSPEC
        assert resp.flags & FLAG_FENCE and resp.fence_id == 0xDEADBEEF12
        # unfenced and short commands keep a bare error header
        assert CtrlHeader.unpack(dev.execute(cmd[:10], memory)).fence_id == 0
    finally:
        dev.close()
        memory.close()
        ram.close()



def test_vsock_host_thread_survives_a_socket_closed_while_it_registers_it():
    """Found by vsock-packet (60 s mutation run, the thread died with EBADF): the tx
    worker closed a connection's socket between the host I/O thread's fileno check
    and its selector register(); the exception killed the thread and the VM's host
    side stopped for good. The close is placed at exactly that point here."""
    import selectors
    import socket
    import threading
    import time

    from vhost_user.backends.vsock.device import VmOptions, VsockDevice

    dev = VsockDevice(VmOptions(guest_cid=3, socket=None, uds_path=None))
    host = dev.host
    ours, peer = socket.socketpair()
    applied = threading.Event()

    class FakeConn:  # the fields the host thread reads
        sock, interest = ours, 0

        def describe(self):
            return "conn under test"

    conn = FakeConn()
    dev.host_interest = lambda c: selectors.EVENT_READ
    real_get_map = host._sel.get_map

    def get_map():
        if not applied.is_set():
            ours.close()  # what the tx worker did, at the worst moment
            applied.set()
        return real_get_map()

    host._sel.get_map = get_map
    try:
        host.update(conn)
        assert applied.wait(10), "the host thread never applied the update"
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and host._thread.is_alive():
            time.sleep(0.05)
        assert host._thread.is_alive(), "the vsock host I/O thread died"
    finally:
        peer.close()
        dev.close()
