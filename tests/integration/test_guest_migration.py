"""Live migration of running Linux guests whose devices are our back-ends.

blk: 
Two QEMU 10 processes on this machine, each with its own back-end process
on the same image (QEMU serves one front-end per socket; the destination's
connects while the source still runs). Once QEMU's first pass has sent
every page, and while a 1 ms downtime limit and a guest that keeps
rewriting 4 MiB hold the copy open, the guest reads the disk into its page
cache: QEMU sends those pages again only if our back-end marked them in the
dirty log (LOG_SHMFD, VHOST_F_LOG_ALL). After the switch the guest hashes
the same pages from its page cache on the destination, then writes through
the destination's back-end. The host talks to the guest through the disk
itself (flag words the guest polls with O_DIRECT).

With the chain logging in csrc/dirtylog.c switched off this test fails
(the destination's page cache hash differs); that was checked by hand. It
runs on split and on packed rings (``packed=on``), whose used descriptors
and chain copies csrc/packed.c logs.
"""

from __future__ import annotations

import hashlib
import os
import sys

import pytest

from harness import migration
from harness.backend import BackendProcess
from harness.qemu import GuestError
from vsock_proc import WAIT_VSOCK, add_guest_vsock, guest_vsock_backend, hash_one_connection
from harness.guestnet import add_net, guest_ip, line_value, ping_until

pytestmark = pytest.mark.guest

MiB = 1 << 20
DATA = 64 * MiB
START, END = b"STARTING", b"MIGRATED"  # flag words the host writes into the disk


def _flag(image, word: bytes) -> None:
    with open(image, "r+b") as f:
        f.seek(DATA)
        f.write(word.ljust(4096, b"\0"))


def _value(lines, label: str) -> str:
    for line in lines:
        if line.startswith(label + " "):
            return line.split(None, 1)[1]
    raise AssertionError(f"guest printed no {label!r} line:\n" + "\n".join(lines))


def _blk(sock, image, log) -> BackendProcess:
    return BackendProcess([sys.executable, "-m", "vhost_user.backends.blk", "--socket", str(sock),
                           "--image", str(image), "-v"], sock, log).start()


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_guest_blk_migrates_between_qemu_processes_without_losing_a_page(
        guest_vm, short_tmp, tmp_path, ring):
    image = tmp_path / "disk.img"
    data = os.urandom(DATA)
    with open(image, "wb") as f:
        f.write(data)
        f.truncate(DATA + 2 * MiB)
    src_sock, dst_sock = short_tmp / "src.sock", short_tmp / "dst.sock"
    src_be = _blk(src_sock, image, tmp_path / "src-backend.log")
    dst_be = _blk(dst_sock, image, tmp_path / "dst-backend.log")
    dest = None
    try:
        # init_on_alloc=0: Debian's kernel zeroes each new page by default, a
        # CPU write that makes QEMU resend the page anyway and would hide a
        # page our back-end failed to log.
        vm = guest_vm(append="init_on_alloc=0")
        vm.add_vhost_user_blk(src_sock, num_queues=1, packed="on" if ring == "packed" else "off")
        vm.start(f"""
            vhu_wait_dev /dev/vda || exit 1
            wait_flag() {{
                n=0
                until [ "$(dd if=/dev/vda bs=4096 skip={DATA // 4096} count=1 iflag=direct \\
                          2>/dev/null | head -c 8)" = "$1" ]; do
                    n=$((n + 1)); [ $n -lt 3000 ] || return 1; sleep 0.1
                done
            }}
            # Keep the copy from converging: rewrite 4 MiB of RAM in place
            # (no page freed or allocated) until the disk has been read.
            head -c 4194304 /dev/urandom > /tmp/rand
            cp /tmp/rand /tmp/spin
            ( while [ ! -e /tmp/stop ]; do
                dd if=/tmp/rand of=/tmp/spin bs=64k conv=notrunc 2>/dev/null
              done ) &
            # Linux drops a block device's page cache at its last close: hold it open.
            exec 3</dev/vda
            vhu_mark booted
            wait_flag {START.decode()} || echo "no-start-flag"
            # Fill the page cache after QEMU's first pass sent every page:
            # only our dirty log makes it send these pages again.
            dd if=/dev/vda of=/dev/null bs=1M count={DATA // MiB} 2>/dev/null
            touch /tmp/stop
            wait
            vhu_mark read-done
            wait_flag {END.decode()} || echo "no-end-flag"
            # On the destination, from the page cache the copy carried over.
            echo "sum2 $(dd if=/dev/vda bs=1M count={DATA // MiB} 2>/dev/null | sha256sum | cut -d' ' -f1)"
            dd if=/dev/urandom of=/tmp/p bs=1M count=1 2>/dev/null
            dd if=/tmp/p of=/dev/vda bs=1M seek={DATA // MiB + 1} oflag=direct 2>/dev/null
            echo "write-rc $?"
            echo "want-tail $(sha256sum /tmp/p | cut -d' ' -f1)"
            echo "dmesg-bad $(dmesg | grep -cE 'Call Trace|BUG:|Oops|I/O error')"
        """)
        vm.wait_for_marker("booted", timeout=120)
        dest = migration.incoming(vm, tmp_path / "dest", {str(src_sock): str(dst_sock)})
        # A 1 ms downtime limit and the guest's rewriting keep the copy
        # iterating until the guest has read the disk; then it converges.
        migration.begin(vm, dest, **{"max-bandwidth": 64 << 20, "downtime-limit": 1})
        info = migration.wait(vm, dest, lambda i: i.get("ram", {}).get("dirty-sync-count", 0) >= 2)
        assert info["status"] == "active", info  # still copying: the read comes next
        _flag(image, START)
        vm.wait_for_marker("read-done", timeout=120)
        vm.qmp("migrate-set-parameters", **{"downtime-limit": 2000})
        info = migration.wait(vm, dest)
        assert info["status"] == "completed"
        _flag(image, END)
        result = dest.wait(timeout=240)
        lines = result.lines
        assert _value(lines, "sum2") == hashlib.sha256(data).hexdigest(), result.output
        assert "no-start-flag" not in lines and "no-end-flag" not in lines, result.output
        # sum2 ran on the destination: its own console has it.
        assert "sum2 " in dest.console.read_text(errors="replace")
        assert _value(lines, "write-rc") == "0", result.output
        with open(image, "rb") as f:
            f.seek(DATA + MiB)
            assert hashlib.sha256(f.read(MiB)).hexdigest() == _value(lines, "want-tail")
        assert _value(lines, "dmesg-bad") == "0", result.output
        src_log = src_be.log_tail(300)
        assert "dirty log:" in src_log, src_log
        for log in (src_log, dst_be.log_tail(300)):
            assert f"started ({ring} ring" in log, log
        assert src_be.running and dst_be.running
    finally:
        if dest is not None:
            dest.close()
        src_be.stop()
        dst_be.stop()


NET = [sys.executable, "-m", "vhost_user.backends.net"]
MACS = ("52:54:00:12:34:01", "52:54:00:12:34:02")


def test_guest_net_tcp_stream_survives_migration_of_its_receiver(guest_vm, short_tmp, tmp_path):
    """Guest A receives 32 MiB over TCP from guest B through our switch while A
    migrates to a second QEMU on a third port of the same back-end; every byte
    arrives (sha256 at both ends) and the switch learns A's MAC on the new port."""
    socks = [short_tmp / f"vm{i}.sock" for i in range(3)]
    argv = NET + [a for s in socks for a in ("--socket", str(s))] + ["-v"]
    backend = BackendProcess(argv, socks[2], tmp_path / "net.log").start()
    dest = None
    try:
        server, client = guest_vm(), guest_vm()
        add_net(server, socks[0], MACS[0])
        add_net(client, socks[1], MACS[1])
        server.start(guest_ip("10.0.0.1") + ping_until("10.0.0.2", confirm=False) + """
            mkfifo /tmp/f; exec 3<>/tmp/f
            vhu_mark listening
            nc -l -p 5000 <&3 > /tmp/r
            digest=$(sha256sum < /tmp/r | cut -d' ' -f1)
            echo "recv $digest $(wc -c < /tmp/r)"
            echo "$digest" | nc 10.0.0.2 5001
            sleep 2
        """)
        client.start(guest_ip("10.0.0.2") + """
            dd if=/dev/urandom of=/tmp/d bs=1M count=32 2>/dev/null
            echo "sent $(sha256sum < /tmp/d | cut -d' ' -f1)"
        """ + ping_until("10.0.0.1", confirm=False) + """
            mkfifo /tmp/f; exec 3<>/tmp/f
            nc -l -p 5001 <&3 > /tmp/ack &
            vhu_mark sending
            # 1 MiB every 0.2 s at least: the stream outlasts the migration.
            i=0
            while [ $i -lt 32 ]; do
                dd if=/tmp/d bs=1M skip=$i count=1 2>/dev/null; i=$((i + 1)); sleep 0.2
            done | nc 10.0.0.1 5000
            echo "nc-rc $?"
            for i in $(seq 1 300); do [ -s /tmp/ack ] && break; sleep 1; done
            echo "ack $(cat /tmp/ack)"
        """)
        server.wait_for_marker("listening", timeout=180)
        dest = migration.incoming(server, tmp_path / "dest", {str(socks[0]): str(socks[2])})
        client.wait_for_marker("sending", timeout=180)
        info = migration.migrate(server, dest, **{"max-bandwidth": 1 << 30})
        assert info["status"] == "completed"
        sent = client.wait(timeout=400)
        got = dest.wait(timeout=400)
        digest, size = line_value(got, "recv")
        assert int(size) == 32 * MiB, got.output
        assert digest == line_value(sent, "sent")[0] == line_value(sent, "ack")[0], sent.output
        # The stream was still running when the receiver moved.
        assert "recv " not in server.console.read_text(errors="replace")
        log = backend.log_tail(400)
        assert "dirty log:" in log, log
        assert backend.running, log
    finally:
        if dest is not None:
            dest.close()
        backend.stop()


def test_guest_vsock_stream_is_intact_after_qemu_refuses_to_migrate_vhost_user_vsock(
        guest_vm, short_tmp, tmp_path):
    """QEMU 10 marks vhost-user-vsock unmigratable (so is vhost-user-gpu): a migration
    of such a guest cannot be a test of ours. What is ours: the refused `migrate`, issued
    while the guest streams 16 MiB to a host program, costs the stream nothing, and the
    back-end goes on serving."""
    uds = str(short_tmp / "vm3.vsock")
    sock = short_tmp / "vsock.sock"
    backend = guest_vsock_backend(sock, tmp_path / "vsock.log", "--guest-cid", "3",
                                  "--socket", str(sock), "--uds-path", uds)
    try:
        received: dict = {}
        listener = hash_one_connection(uds + "_5000", received)
        vm = guest_vm(cpus=1, memory_mb=512)
        add_guest_vsock(vm, sock)
        vm.start(WAIT_VSOCK + """
            set -e
            dd if=/dev/urandom of=/tmp/p bs=1M count=16 2>/dev/null
            echo "up $(sha256sum < /tmp/p | cut -d' ' -f1)"
            vhu_mark sending
            socat -u FILE:/tmp/p,readbytes=16777216 VSOCK-CONNECT:2:5000
            echo "socat-rc $?"
        """)
        vm.wait_for_marker("sending", timeout=240)
        with pytest.raises(GuestError, match="non-migratable device"):
            vm.qmp("migrate", uri=f"unix:{short_tmp / 'nowhere.sock'}")
        result = vm.wait(timeout=240)
        listener.join(60)
        assert not listener.is_alive()
        assert received.get("bytes") == 16 * MiB, backend.log_tail()
        assert [received["sha"]] == line_value(result, "up"), result.output
        assert line_value(result, "socat-rc") == ["0"], result.output
        assert backend.running
    finally:
        backend.stop()
