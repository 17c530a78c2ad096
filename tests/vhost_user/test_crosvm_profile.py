"""Every real back-end process driven the way crosvm drives it (issue 15).

The built-in front-end's CROSVM profile (`vhost_user.frontend.profiles`) follows
crosvm's vhost-user front-end: SET_OWNER first, its protocol features only,
config space read in 4-byte pieces before SET_FEATURES, SET_FEATURES at
activation, SET_MEM_TABLE with one memfd at several offsets, per queue NUM,
ADDR, BASE, CALL, KICK, ENABLE at 32768 entries, never NEED_REPLY. Each
back-end gets one end of a socket pair as `--fd N` (crosvm's `socket=` can be
an fd; `crosvm device ... --fd` serves one) and must exit 0 when the session
ends. Nothing needs a reply, so a refused message is silent: success is
proven by I/O completing with checked data and by a back-end log without a
warning or error line.

The profile itself is checked against crosvm's rules on the wire: a small
proxy decodes every message with the project's codec on its way to the
back-end, and `_crosvm_violations` lists what crosvm would never send. The
same check run over the QEMU profile must find violations, so it can fail.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from backends_proc import open_fds
from pngread import read_png
from vhost_user.backends.blk.config import CONFIG_SPACE_SIZE, BlkConfig
from vhost_user.backends.blk.request import RequestType
from vhost_user.backends.gpu.commands import CtrlType as T, Format, Rect
from vhost_user.channel import BlockingChannel, close_fds
from vhost_user.backends.blk.driver import BlkDriver, BlkRequest, DRIVER_FEATURES as BLK_FEATURES
from vhost_user.backends.gpu.driver import DRIVER_FEATURES as GPU_FEATURES, GpuDriver
from vhost_user.backends.net.driver import DRIVER_FEATURES as NET_FEATURES, NetDriver
from vhost_user.backends.vsock.driver import DRIVER_FEATURES as VSOCK_FEATURES, VsockDriver
from vhost_user.frontend import CROSVM, QEMU, Frontend, GuestRam
from vhost_user.devicestate import pack_state
from vhost_user.frontend.connection import FrontendError
from vhost_user.frontend.migration import load_device_state, save_device_state
from vhost_user.frontend.profiles import crosvm_ram_layout
from vhost_user.protocol import (
    DeviceStateTransfer, FrontendRequest as R, MessageDecoder, ProtocolFeature as PF, VirtioFeature as VF, spec_for,
)
from vhost_user.protocol.constants import HeaderFlag
from vsock_proc import host_connect, host_listener, read_line, recv_all

BIG = 32768
MB = 1 << 20
# crosvm's x86-64 layout with the 32-bit PCI window moved down to 32 MiB
# (`--pci mem=[start=...]`), so RAM also lies above 4 GiB, at mmap offset 32 MiB.
LAYOUT = crosvm_ram_layout(160 * MB, pci_start=32 * MB)
HIGH = 3  # [4 GiB, +128 MiB): rings and buffers go there


def _crosvm_ram() -> GuestRam:
    return GuestRam(LAYOUT, single_fd=True, alloc_region=HIGH)


# -- the back-end process on one end of a socket pair -----------------------------------------
class Connected:
    """A back-end started with `--fd N` for each of `pairs` socket pairs."""

    def __init__(self, sockdir: str, module: str, *args: str, pairs: int = 1, verbose: str = "-v"):
        ours, theirs = zip(*(socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(pairs)))
        self.log_path = os.path.join(sockdir, f"{module}.log")
        fds = [a for s in theirs for a in ("--fd", str(s.fileno()))]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", f"vhost_user.backends.{module}", *fds, verbose, *args],
                pass_fds=[s.fileno() for s in theirs], stdout=log, stderr=subprocess.STDOUT)
        for s in theirs:
            s.close()
        self.socks = list(ours)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def finish(self) -> str:
        """Wait for the exit after the last session ended; assert 0 and a clean log."""
        try:
            rc = self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("back-end kept running after crosvm hung up:\n" + self.log()[-3000:])
        text = self.log()
        bad = [line for line in text.splitlines()
               if " WARNING " in line or " ERROR " in line or "Traceback" in line or "error:" in line]
        assert rc == 0 and not bad, f"exit {rc}; log:\n{text[-3000:]}"
        return text

    def kill(self) -> None:
        """Clean-up: our socket ends (if no front-end took them) and the process."""
        for s in self.socks:
            s.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _crosvm(sock: socket.socket, features: int) -> Frontend:
    """crosvm's VhostUserFrontend::new on a connected socket, RAM as crosvm lays it out."""
    fe = Frontend(sock, _crosvm_ram(), profile=CROSVM)
    fe.negotiate(features)
    return fe


def _close(fe: Frontend) -> None:
    fe.close()
    fe.ram.close()


# -- blk -----------------------------------------------------------------------------------
def test_blk_under_crosvm_writes_reads_and_survives_a_guest_reboot(sockdir):
    fds_before = open_fds()
    be = Connected(sockdir, "blk", "--size", "64M")
    try:
        fe = _crosvm(be.socks[0], BLK_FEATURES)
        try:
            assert not fe.has_feature(VF.VIRTIO_RING_F_INDIRECT_DESC)  # crosvm masks it
            drv = BlkDriver(fe, max_io=1 * MB, slots_per_queue=4)
            assert drv.config is not None and drv.config.capacity == 64 * MB // 512
            assert drv.queues[0].size == BIG and drv.queues[0].region == HIGH
            data = os.urandom(4 * MB)
            for i in range(4):
                drv.write(2048 * i, data[i * MB:(i + 1) * MB])
            drv.flush()
            assert b"".join(drv.read(2048 * i, MB) for i in range(4)) == data
            assert fe.suspend() == {0: 9}          # 4 writes, a flush, 4 reads
            # The guest reboots: probe again (config), activate again on the same session;
            # crosvm sends no SET_FEATURES when the acked set did not change.
            again = BlkDriver(fe, max_io=1 * MB, slots_per_queue=2)
            assert again.read(2048, MB) == data[MB:2 * MB]
        finally:
            _close(fe)
        be.finish()
    finally:
        be.kill()
    assert open_fds() == fds_before


def test_blk_under_crosvm_makes_as_many_queues_as_get_queue_num_says(sockdir):
    """With MQ crosvm creates GET_QUEUE_NUM queues, the guest reads num_queues from config
    and uses them all, each at 32768 entries."""
    be = Connected(sockdir, "blk", "--size", "16M", "--num-queues", "3")
    try:
        fe = _crosvm(be.socks[0], BLK_FEATURES)
        try:
            assert fe.num_queues == 3
            config = BlkConfig.unpack(fe.get_config(CONFIG_SPACE_SIZE))   # the guest's probe
            assert config.num_queues == 3
            drv = BlkDriver(fe, num_queues=config.num_queues, slots_per_queue=2, max_io=64 << 10)
            assert [q.size for q in drv.queues] == [BIG] * 3
            for q in range(3):
                drv.write(100 * q, bytes([q + 1]) * 4096, queue=q)
            for q in range(3):
                assert drv.read(100 * q, 4096, queue=(q + 1) % 3) == bytes([q + 1]) * 4096
        finally:
            _close(fe)
        be.finish()
    finally:
        be.kill()


def test_blk_under_crosvm_sleep_and_wake_with_requests_in_flight_lose_none(sockdir):
    """crosvm's virtio_sleep / virtio_wake (suspend, snapshot): every queue disabled and its
    base fetched while requests are still queued, then the same rings handed back from
    those bases. Every request completes once, with its data."""
    be = Connected(sockdir, "blk", "--size", "32M")
    try:
        fe = _crosvm(be.socks[0], BLK_FEATURES)
        try:
            drv = BlkDriver(fe, max_io=256 << 10, slots_per_queue=16)
            chunks = [os.urandom(256 << 10) for _ in range(16)]
            heads = {drv.submit(BlkRequest(RequestType.OUT, 512 * i, data=c)): i
                     for i, c in enumerate(chunks)}
            bases = fe.suspend()              # no reply awaited for anything but the bases
            assert 0 <= bases[0] <= 16
            fe.resume(bases)
            done = {}
            while len(done) < len(heads):
                for head, status, _ in drv.complete():
                    assert head not in done
                    done[head] = status
            assert set(done.values()) == {0}
            for i, c in enumerate(chunks):
                assert drv.read(512 * i, len(c)) == c
            assert fe.suspend() == {0: 32}    # 16 writes and 16 reads, each taken once
        finally:
            _close(fe)
        be.finish()
    finally:
        be.kill()


def test_a_refusal_under_crosvm_is_silent_but_logged(sockdir):
    """The back-end refuses crosvm's 32768-entry queue (--queue-size 256): crosvm asked for
    no reply, so only the log tells, which is why every test here checks the log.
    crosvm's `max-queue-size=256` is the cure."""
    be = Connected(sockdir, "blk", "--size", "8M", "--queue-size", "256")
    try:
        fe = _crosvm(be.socks[0], BLK_FEATURES)
        try:
            BlkDriver(fe, slots_per_queue=2, max_io=4096)   # no error here: nothing replies
            fe.suspend()                                      # GET_VRING_BASE's reply orders the log
        finally:
            _close(fe)
        with pytest.raises(AssertionError, match="size 32768 is not a power of two in 1..256"):
            be.finish()
    finally:
        be.kill()
    be = Connected(sockdir, "blk", "--size", "8M", "--queue-size", "256")
    try:
        fe = Frontend(be.socks[0], _crosvm_ram(), profile=CROSVM.with_max_queue_size(256))
        try:
            fe.negotiate(BLK_FEATURES)
            drv = BlkDriver(fe, slots_per_queue=2, max_io=4096)
            assert drv.queues[0].size == 256
            drv.write(0, b"m" * 4096)
            assert drv.read(0, 4096) == b"m" * 4096
        finally:
            _close(fe)
        be.finish()
    finally:
        be.kill()


# -- net -----------------------------------------------------------------------------------
def test_net_under_crosvm_passes_frames_both_ways_between_two_ports(sockdir):
    from scapy.layers.l2 import Ether

    be = Connected(sockdir, "net", pairs=2)
    try:
        a, b = _crosvm(be.socks[0], NET_FEATURES), _crosvm(be.socks[1], NET_FEATURES)
        try:
            macs = []
            for fe in (a, b):   # the guest's probe reads the MAC before DRIVER_OK
                space = fe.get_config(12)
                assert len(space) == 12 and space[0] & 1 == 0, space.hex()
                macs.append(space[:6])
            assert macs[0] != macs[1]
            da, db = NetDriver(a, queue_size=BIG), NetDriver(b, queue_size=BIG)
            assert da.rx[0].ring is not None and a.queues[0].size == BIG
            da.fill_rx()
            db.fill_rx()
            frames = [bytes(Ether(src=":".join(f"{x:02x}" for x in macs[0]), dst="ff:ff:ff:ff:ff:ff")
                            / os.urandom(n)) for n in (60, 1500, 9000)]
            for f in frames:
                da.send(f)
            assert [f for _, f in db.recv(count=len(frames))] == frames
            back = bytes(Ether(src=":".join(f"{x:02x}" for x in macs[1]), dst="ff:ff:ff:ff:ff:ff")
                         / (b"reply" * 100))
            db.send(back)
            assert [f for _, f in da.recv()] == [back]
            # crosvm suspends the VM (virtio_sleep, virtio_wake): posted rx buffers stay posted
            a.resume(a.suspend())
            b.resume(b.suspend())
            for f in frames:
                db.send(f)
            assert [f for _, f in da.recv(count=len(frames))] == frames
        finally:
            _close(a)
            _close(b)
        be.finish()
    finally:
        be.kill()


# -- vsock ---------------------------------------------------------------------------------
def test_vsock_under_crosvm_streams_to_a_host_listener_with_intact_data(sockdir):
    uds = os.path.join(sockdir, "vm.vsock")
    be = Connected(sockdir, "vsock", "--guest-cid", "7", "--uds-path", uds)
    listener = host_listener(uds + "_5000")
    try:
        fe = _crosvm(be.socks[0], VSOCK_FEATURES)
        try:
            drv = VsockDriver(fe, queue_size=BIG)
            assert drv.cid == 7 and drv.rxq.size == drv.txq.size == drv.evq.size == BIG
            g = drv.connect(5000)
            h, _ = listener.accept()
            payload = os.urandom(2 * MB)
            got = bytearray()

            def reader():
                while len(got) < len(payload):
                    chunk = h.recv(1 << 16)
                    if not chunk:
                        break
                    got.extend(chunk)

            t = threading.Thread(target=reader)
            t.start()
            g.send(payload, timeout=30)
            t.join(30)
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
            back = os.urandom(256 << 10)
            h.sendall(back)
            assert hashlib.sha256(g.recv_exact(len(back), timeout=30)).digest() == \
                hashlib.sha256(back).digest()
            # crosvm suspends the VM (virtio_sleep) and resumes it: the connection lives on
            fe.resume(fe.suspend())
            more = os.urandom(300 << 10)
            g.send(more, timeout=30)
            assert hashlib.sha256(recv_all(h, len(more))).digest() == hashlib.sha256(more).digest()
            h.close()
            # and a host-initiated connection the other way
            drv.listen(1234)
            hc, _ = host_connect(uds, 1234, extra=b"hello crosvm guest")
            gc = drv.accept(1234)
            assert read_line(hc).startswith(b"OK ")
            assert gc.recv_exact(18) == b"hello crosvm guest"
            hc.close()
        finally:
            _close(fe)
        be.finish()
    finally:
        listener.close()
        be.kill()


def test_vsock_gives_credit_back_for_what_a_full_host_socket_took(sockdir):
    """The guest sends its whole credit to a host program that does not read yet: the
    host socket fills and the rest waits in the back-end. What the socket took is free
    again, so a CREDIT_UPDATE must reach the guest without it asking (a host that reads
    only after the guest's write finished would otherwise wait for ever: it did, until
    the driver's CREDIT_REQUEST, before _flush reported credit with bytes pending)."""
    uds = os.path.join(sockdir, "vm.vsock")
    # 4 MiB of credit: more than a Unix socket can hold (wmem_max), so the socket fills
    be = Connected(sockdir, "vsock", "--guest-cid", "9", "--uds-path", uds, "--tx-buffer-size", "4M")
    listener = host_listener(uds + "_6000")
    try:
        fe = _crosvm(be.socks[0], VSOCK_FEATURES)
        try:
            drv = VsockDriver(fe)
            g = drv.connect(6000)
            h, _ = listener.accept()
            first = os.urandom(g.credit())
            assert len(first) == 4 * MB
            g.send(first)                         # within credit: never waits, never asks
            drv.wait_for(lambda: g.credit() > 0, 10, "a CREDIT_UPDATE while the host socket is full")
            second = os.urandom(g.credit())
            g.send(second)
            assert recv_all(h, len(first) + len(second)) == first + second
            h.close()
        finally:
            _close(fe)
        text = be.finish()
        short = [int(x.split(" short writes")[0].rsplit(" ", 1)[1]) for x in text.splitlines()
                 if "short writes" in x]
        assert short and short[0] > 0, "the host socket never filled: this test proved nothing"
    finally:
        listener.close()
        be.kill()


# -- gpu -----------------------------------------------------------------------------------
def test_gpu_under_crosvm_shows_the_guest_frame_in_the_png_display(sockdir):
    out = os.path.join(sockdir, "png")
    be = Connected(sockdir, "gpu", "--display", f"png:{out}", verbose="--verbose")
    try:
        fe = _crosvm(be.socks[0], GPU_FEATURES)
        try:
            drv = GpuDriver(fe, None)      # crosvm sends no GPU_SET_SOCKET
            assert drv.config is not None and drv.config.num_scanouts >= 1
            w, h = 64, 48
            img = np.random.default_rng(15).integers(0, 256, (h, w * 4), dtype=np.uint8)
            assert drv.create_2d(1, w, h, Format.B8G8R8X8_UNORM) == T.RESP_OK_NODATA
            backing = drv.alloc_backing(w * h * 4)
            drv.write_backing(backing, img.tobytes())
            assert drv.attach_backing(1, backing) == T.RESP_OK_NODATA
            assert drv.set_scanout(0, 1, Rect(0, 0, w, h)) == T.RESP_OK_NODATA
            assert drv.transfer(1, Rect(0, 0, w, h)) == T.RESP_OK_NODATA
            assert drv.flush(1, Rect(0, 0, w, h)) == T.RESP_OK_NODATA
            path = os.path.join(out, "scanout-0.png")
            deadline = time.monotonic() + 10
            while not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert np.array_equal(read_png(path), img.reshape(h, w, 4)[:, :, [2, 1, 0]])
            # the guest's config-changed handler clears events_read (offset 4) by a write
            assert fe.get_config(4) == bytes(4)
            fe.set_config(4, (1).to_bytes(4, "little"))   # refused, it would be a log line
            assert drv.display_info().pmodes[0].enabled == 1
        finally:
            _close(fe)
        be.finish()
    finally:
        be.kill()


# -- the profile on the wire -----------------------------------------------------------------
class Recorder:
    """A proxy between the front-end and a back-end's `--fd` socket that decodes and keeps
    every front-end message (the codec's view of the wire) and forwards it unchanged."""

    def __init__(self, backend: socket.socket):
        self.frontend_end, mine = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._front = BlockingChannel(mine, MessageDecoder.for_backend(), None)
        self._back = BlockingChannel(backend, MessageDecoder.for_frontend(), None)
        self.messages: list[tuple[R, int, object, list[tuple[int, int]]]] = []
        self.replies: list[R] = []
        self._threads = [threading.Thread(target=self._forward, daemon=True),
                         threading.Thread(target=self._return, daemon=True)]
        for t in self._threads:
            t.start()

    def _forward(self) -> None:
        while (msg := self._front.receive()) is not None:
            ids = [(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in msg.fds]
            self.messages.append((msg.request, msg.flags, msg.payload, ids))
            try:
                self._back.send(msg)
            finally:
                close_fds(msg.fds)
        self._back.sock.shutdown(socket.SHUT_RDWR)

    def _return(self) -> None:
        try:
            while (msg := self._back.receive()) is not None:
                self.replies.append(msg.request)
                self._front.send(msg)
                close_fds(msg.fds)
        except OSError:
            pass

    def close(self) -> None:
        for t in self._threads:
            t.join(10)
        self._front.close()
        self._back.close()


def _crosvm_violations(messages, num_queues_used: int) -> list[str]:
    """What in `messages` crosvm's front-end would never send (empty: faithful)."""
    out = []
    names = [m[0] for m in messages]
    first = {}
    for i, n in enumerate(names):
        first.setdefault(n, i)
    if names[:2] != [R.SET_OWNER, R.GET_FEATURES]:
        out.append(f"opening is {[n.name for n in names[:2]]}, not SET_OWNER, GET_FEATURES")
    for req, flags, payload, _ in messages:
        if flags & HeaderFlag.NEED_REPLY:
            out.append(f"{req.name} sets NEED_REPLY")
        if req not in CROSVM.sends:
            out.append(f"{req.name} is never sent by crosvm")
        if req == R.SET_PROTOCOL_FEATURES and payload.value & ~CROSVM.protocol_features:
            out.append(f"asks protocol features {payload.value:#x}")
        if req == R.GET_CONFIG and (payload.size > 4 or payload.flags != 1):
            out.append(f"GET_CONFIG of {payload.size} bytes, flags {payload.flags}")
        if req == R.SET_FEATURES and payload.value & (1 << VF.VIRTIO_RING_F_INDIRECT_DESC):
            out.append("SET_FEATURES acks INDIRECT_DESC, which crosvm never offers")
        if req == R.SET_VRING_NUM and payload.num != BIG:
            out.append(f"queue {payload.index} of {payload.num} entries, not {BIG}")
    if names.count(R.SET_FEATURES) != 1:
        out.append(f"{names.count(R.SET_FEATURES)} SET_FEATURES, not one")
    configs = [i for i, n in enumerate(names) if n == R.GET_CONFIG]
    for late in (R.SET_FEATURES, R.SET_MEM_TABLE):
        if late in first and configs and configs[0] > first[late]:
            out.append(f"first GET_CONFIG after {late.name}")
    if first.get(R.SET_FEATURES, 1 << 30) > first.get(R.SET_MEM_TABLE, -1):
        out.append("SET_FEATURES not before SET_MEM_TABLE")
    tables = [m for m in messages if m[0] == R.SET_MEM_TABLE]
    for _, _, payload, ids in tables:
        offsets = [r.mmap_offset for r in payload.regions]
        sizes = [r.memory_size for r in payload.regions]
        if len(set(ids)) != 1 or offsets != [sum(sizes[:i]) for i in range(len(sizes))]:
            out.append(f"memory table is not one memfd at growing offsets ({len(set(ids))} files)")
    order = [R.SET_VRING_NUM, R.SET_VRING_ADDR, R.SET_VRING_BASE, R.SET_VRING_CALL,
             R.SET_VRING_KICK, R.SET_VRING_ENABLE]
    start = first.get(R.SET_MEM_TABLE, len(names))
    setup = [(n, p) for n, _, p, _ in messages[start:] if n in order]
    for q in range(num_queues_used):
        mine = [n for n, p in setup if (p.index if hasattr(p, "index") else p.value & 0xFF) == q]
        if mine[:len(order)] != order:
            out.append(f"queue {q} set up as {[n.name for n in mine[:len(order)]]}")
    return out


@pytest.mark.parametrize("device", ["blk", "vsock", "gpu", "net"])
def test_the_crosvm_profile_sends_what_crosvm_sends_in_its_order(sockdir, device):
    fds_before = open_fds()
    args = {"blk": ("--size", "8M"), "vsock": ("--guest-cid", "3"), "gpu": (), "net": ()}[device]
    be = Connected(sockdir, device, *args, verbose="--verbose" if device == "gpu" else "-v")
    rec = Recorder(be.socks[0])
    try:
        fe = Frontend(rec.frontend_end, _crosvm_ram(), profile=CROSVM)
        try:
            if device == "blk":
                fe.negotiate(BLK_FEATURES)
                drv = BlkDriver(fe, slots_per_queue=2, max_io=64 << 10)
                drv.write(0, b"r" * 4096)
                fe.suspend()    # a guest reboot: stop, probe and activate again
                assert BlkDriver(fe, slots_per_queue=2, max_io=64 << 10).read(0, 4096) == b"r" * 4096
                used = 1
            elif device == "vsock":
                fe.negotiate(VSOCK_FEATURES)
                VsockDriver(fe, rx_buffers=8, tx_slots=4)
                used = 3
            elif device == "gpu":
                fe.negotiate(GPU_FEATURES)
                assert GpuDriver(fe, None, slots=2).create_2d(1, 4, 4) == T.RESP_OK_NODATA
                used = 2
            else:
                fe.negotiate(NET_FEATURES)
                fe.get_config(8)
                NetDriver(fe).fill_rx()
                used = 2
            fe.suspend()
        finally:
            _close(fe)
        rec.close()
        be.finish()
    finally:
        be.kill()
    assert open_fds() == fds_before
    msgs = rec.messages
    assert _crosvm_violations(msgs, used) == []
    # crosvm reads a reply only where one is due: an unasked ack would be misread
    assert rec.replies == [m[0] for m in msgs if spec_for(m[0]).reply is not None]
    agreed = next(m[2].value for m in msgs if m[0] == R.SET_PROTOCOL_FEATURES)
    assert agreed & (1 << PF.REPLY_ACK), "REPLY_ACK is agreed, and still nothing asks for a reply"
    assert (R.SET_BACKEND_REQ_FD in [m[0] for m in msgs]) == bool(agreed & (1 << PF.BACKEND_REQ))
    if device != "net":
        assert R.GET_CONFIG in [m[0] for m in msgs]
    if device == "blk":   # activated twice, SET_FEATURES once (the acked set did not change)
        assert [m[0] for m in msgs].count(R.SET_MEM_TABLE) == 2
    # crosvm's reset: per queue SET_VRING_ENABLE(0) then GET_VRING_BASE, the last messages
    assert [(m[0], m[2].num) for m in msgs[-2 * used:]] == \
        [(R.SET_VRING_ENABLE, 0), (R.GET_VRING_BASE, 0)] * used


def test_the_wire_check_finds_qemus_opening_unfaithful(sockdir):
    """The same rules over the QEMU profile must fail: the check can tell them apart."""
    be = Connected(sockdir, "blk", "--size", "8M")
    rec = Recorder(be.socks[0])
    try:
        ram = GuestRam([(0, 32 * MB), (1 << 32, 32 * MB)])
        fe = Frontend(rec.frontend_end, ram, profile=QEMU)
        try:
            fe.negotiate(BLK_FEATURES, use_mem_slots=False)
            BlkDriver(fe, slots_per_queue=2, max_io=64 << 10).write(0, b"q" * 512)
        finally:
            fe.close()
            ram.close()
        rec.close()
        be.finish()
    finally:
        be.kill()
    found = _crosvm_violations(rec.messages, 1)
    for needle in ("opening is", "sets NEED_REPLY", "SET_VRING_ERR is never sent", "GET_CONFIG of",
                   "not one memfd", "queue 0 set up as", "INDIRECT_DESC", "of 128 entries"):
        assert any(needle in v for v in found), (needle, found)


def test_a_request_crosvm_never_sends_is_refused_by_the_profile_itself(sockdir):
    """A driver model asking for something crosvm never does fails loudly, not silently."""
    from vhost_user.errors import LocalProtocolError

    be = Connected(sockdir, "gpu", verbose="--verbose")
    try:
        fe = _crosvm(be.socks[0], GPU_FEATURES)
        try:
            for req in (R.GPU_SET_SOCKET, R.SET_VRING_ERR, R.SET_STATUS, R.RESET_DEVICE, R.ADD_MEM_REG):
                with pytest.raises(LocalProtocolError, match="crosvm never sends"):
                    fe.call(req)
        finally:
            _close(fe)
        be.finish()
    finally:
        be.kill()


def test_crosvm_ram_layout_matches_its_x86_64_regions():
    assert crosvm_ram_layout(2 << 30) == [(0, 640 << 10), (640 << 10, 384 << 10), (MB, (2 << 30) - MB)]
    assert crosvm_ram_layout(4 << 30) == [(0, 640 << 10), (640 << 10, 384 << 10),
                                          (MB, 0xD000_0000 - MB), (1 << 32, (4 << 30) - 0xD000_0000)]
    assert CROSVM.with_max_queue_size(1000).queue_size == 512


# -- snapshot / restore (DEVICE_STATE) ---------------------------------------------------------
def _wait_png(path: str, want: np.ndarray) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if os.path.exists(path):
            try:
                if np.array_equal(read_png(path), want):
                    return
            except (OSError, ValueError):
                pass  # being written
        time.sleep(0.05)
    raise AssertionError(f"{path} never showed the expected frame")


def test_gpu_snapshot_restores_resources_into_a_new_backend_process(sockdir):
    """crosvm's snapshot: suspend, SET_DEVICE_STATE_FD (SAVE) and CHECK; a new back-end
    process gets the state (LOAD) before it is woken, shows the frame at once, and
    the restored resource keeps its backing: the guest's next transfer and flush work."""
    w, h = 64, 48
    rgb = lambda img: img.reshape(h, w, 4)[:, :, [2, 1, 0]]  # noqa: E731
    first = np.random.default_rng(3).integers(0, 256, (h, w * 4), dtype=np.uint8)
    second = np.random.default_rng(4).integers(0, 256, (h, w * 4), dtype=np.uint8)
    ram = _crosvm_ram()
    try:
        out_a, out_b = os.path.join(sockdir, "png-a"), os.path.join(sockdir, "png-b")
        a = Connected(sockdir, "gpu", "--display", f"png:{out_a}", verbose="--verbose")
        try:
            fe = Frontend(a.socks[0], ram, profile=CROSVM)
            fe.negotiate(GPU_FEATURES)
            drv = GpuDriver(fe, None)
            assert drv.create_2d(1, w, h, Format.B8G8R8X8_UNORM) == T.RESP_OK_NODATA
            backing = drv.alloc_backing(w * h * 4)
            drv.write_backing(backing, first.tobytes())
            for status in (drv.attach_backing(1, backing), drv.set_scanout(0, 1, Rect(0, 0, w, h)),
                           drv.transfer(1, Rect(0, 0, w, h)), drv.flush(1, Rect(0, 0, w, h))):
                assert status == T.RESP_OK_NODATA
            fe.suspend()
            state = save_device_state(fe)
            fe.close()
            a.finish()
        finally:
            a.kill()
        assert b"VHUSTATE" in state[:8]

        b = Connected(sockdir, "gpu", "--display", f"png:{out_b}", verbose="--verbose")
        try:
            fe = Frontend(b.socks[0], ram, profile=CROSVM)
            fe.negotiate(GPU_FEATURES)
            load_device_state(fe, state)
            _wait_png(os.path.join(out_b, "scanout-0.png"), rgb(first))   # shown at once
            drv = GpuDriver(fe, None)
            drv.write_backing(backing, second.tobytes())
            assert drv.transfer(1, Rect(0, 0, w, h)) == T.RESP_OK_NODATA
            assert drv.flush(1, Rect(0, 0, w, h)) == T.RESP_OK_NODATA
            _wait_png(os.path.join(out_b, "scanout-0.png"), rgb(second))
            fe.close()
            log = b.finish()
            assert "restored 1 resource(s), 1 scanout(s)" in log, log
        finally:
            b.kill()
    finally:
        ram.close()


def test_device_state_refuses_damage_other_devices_and_running_queues(sockdir):
    """A damaged state, a blk state into a gpu, a running queue and a non-pipe fd are
    refused with a reason; the back-end goes on serving."""
    be = Connected(sockdir, "blk")
    try:
        fe = _crosvm(be.socks[0], BLK_FEATURES)
        try:
            state = save_device_state(fe)            # blk keeps none of its own: framing only
            bad = bytearray(state)
            bad[-1] ^= 1
            with pytest.raises(FrontendError):
                load_device_state(fe, bytes(bad))
            with pytest.raises(FrontendError):
                load_device_state(fe, pack_state("gpu", b""))
            load_device_state(fe, state)
            with open(os.devnull, "rb") as f:
                reply = fe.call(R.SET_DEVICE_STATE_FD, DeviceStateTransfer(0, 0), fds=(f.fileno(),))
            assert reply.payload.value & 0xFF
            drv = BlkDriver(fe)                     # queues run now
            with pytest.raises(FrontendError):
                save_device_state(fe)
            drv.write(0, b"x" * 512)
            assert drv.read(0, 512) == b"x" * 512
        finally:
            _close(fe)
        log = be.log()
        for reason in ("checksum mismatch", "state of a 'gpu' device", "while queues", "not a pipe"):
            assert reason in log, log
    finally:
        be.kill()
