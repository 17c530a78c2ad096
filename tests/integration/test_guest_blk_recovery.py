"""Crash recovery of our vhost-user-blk under a real Linux guest.

Three ways a running disk can lose a party, each checked against the
guest's own view and the image file:

* the back-end is SIGKILLed again and again while the guest's fio writes
  and verifies; QEMU (``reconnect-ms``) hands the inflight region
  (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) to each new back-end, which
  resubmits what was in flight, and fio sees neither an error nor a bad
  block;
* QEMU is SIGKILLed mid-I/O; the back-end keeps serving and a second QEMU
  attaches to the same process and reads what the first guest wrote;
* a write the guest saw complete after a flush is in the image even though
  the back-end is SIGKILLed right after.

How much was in flight at a kill is read from the back-end's log line
"queue N: K request(s) to resubmit from the inflight region" (one per queue
start), so the inflight path is shown to have carried real requests. The
single-kill case against qemu-storage-daemon lives in test_guest_blk.py.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from harness.backend import BackendProcess
from harness.guestblk import ours_argv, sparse_image
from harness.fixtures import require_tool

pytestmark = pytest.mark.guest

MiB = 1 << 20
KILLS_MIN = 3   # the issue asks for "several times in one run"
KILLS_MAX = 10  # bound on the loop that waits for a kill with requests in flight
RESUBMIT_RE = re.compile(r"queue (\d+): (\d+) request\(s\) to resubmit from the inflight region")


def image_sha(path: Path, offset: int, length: int) -> str:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return hashlib.sha256(handle.read(length)).hexdigest()


def require_o_direct(path: Path) -> None:
    try:
        os.close(os.open(path, os.O_RDWR | os.O_DIRECT))
    except OSError as exc:
        pytest.fail(f"{path}: O_DIRECT unsupported ({exc.strerror}); run pytest with "
                    "--basetemp on a disk file system", pytrace=False)


def io_bytes(pid: int) -> int:
    """Bytes the process has read plus written through syscalls (/proc/PID/io)."""
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["rchar"]) + int(fields["wchar"])


def resubmit_counts(backend: BackendProcess) -> list[int]:
    """Requests resubmitted at each queue start so far, in log order."""
    return [int(m.group(2)) for m in RESUBMIT_RE.finditer(backend.log_path.read_text())]


def console_has(vm, pattern: str) -> re.Match | None:
    return re.search(pattern, vm.console.read_text(errors="replace"))


def guest_marked(vm, name: str) -> bool:
    return console_has(vm, rf"@@VHU-MARK:\w+:{re.escape(name)}@@") is not None


def wait_until(predicate, timeout: float, what: str, explain=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{explain()}")
        time.sleep(0.02)


def no_kernel_errors(result, vm) -> None:
    console = vm.console.read_text(errors="replace")
    for bad in ("I/O error", "Call Trace", "BUG:", "Oops"):
        assert bad not in console, f"guest kernel logged {bad!r}:\n{vm.console_tail()}"
    assert "dmesg-errors 0" in result.lines, result.output


# The guest runs fio passes (randwrite, then crc32c verify of every block)
# until GUEST_SECONDS of uptime have passed since the first one, so the host
# has a bounded window for its kills whatever the TCG speed, or until the host,
# done with its kills, writes STOP into the 4 KiB block at STOP_AT (beyond
# fio's 64 MiB; read with O_DIRECT, so the guest's page cache cannot hide it).
GUEST_SECONDS = 14
STOP_AT = 64 * MiB
STOP = b"VHU-STOP"
FIO_LOOP = f"""
    vhu_wait_dev /dev/vda || exit 1
    end=$(( $(cut -d. -f1 /proc/uptime) + {GUEST_SECONDS} ))
    vhu_mark fio-start
    pass=0
    stopped() {{ dd if=/dev/vda bs=4096 skip={STOP_AT // 4096} count=1 iflag=direct 2>/dev/null | grep -q {STOP.decode()}; }}
    while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ] && ! stopped; do
        pass=$((pass + 1))
        fio --name=p$pass --filename=/dev/vda --ioengine=libaio --direct=1 \\
            --rw=randwrite --bs=4k --size=16m --offset=$(( (pass % 4) * 16 ))m \\
            --iodepth=32 --verify=crc32c --do_verify=1 --verify_fatal=1 \\
            --output-format=terse --terse-version=3 > /tmp/fio.out || echo "fio-fail $pass $?"
        echo "terse $pass $(grep '^3;' /tmp/fio.out | cut -d';' -f1-6)"
    done
    vhu_mark fio-done
    echo "passes $pass"
    echo "dmesg-errors $(dmesg | grep -ciE 'I/O error|blk_update_request|Buffer I/O')"
"""


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_guest_blk_fio_survives_repeated_backend_kills(guest_vm, short_tmp, tmp_path, ring):
    """At least three SIGKILLs during verified fio, one of them with requests in flight.

    On packed rings (``packed=on``) QEMU gives each new back-end the base of
    the previous start (it has no index in guest memory to restore from);
    the ring positions come from the inflight region (csrc/inflight_packed.c)."""
    sock = short_tmp / "blk.sock"
    image = sparse_image(tmp_path / "disk.img", STOP_AT + MiB)
    require_o_direct(image)
    # O_DIRECT makes each request take real time in the back-end, so a kill
    # finds one popped but not yet completed about every other time; from the
    # page cache the window is a few microseconds and kills almost never hit it.
    backend = BackendProcess(ours_argv(image, sock, "--direct"), sock,
                             tmp_path / "ours.log").start()
    try:
        vm = guest_vm()
        vm.add_vhost_user_blk(sock, num_queues=1, reconnect_ms=100,
                              packed="on" if ring == "packed" else "off")
        vm.start(FIO_LOOP)
        vm.wait_for_marker("fio-start", timeout=60)
        kills = 0
        while kills < KILLS_MAX and not guest_marked(vm, "fio-done"):
            counts = resubmit_counts(backend)
            if kills >= KILLS_MIN and any(counts[1:]):
                break
            # The restarted back-end has been reconnected and its queue runs...
            wait_until(lambda: len(resubmit_counts(backend)) > kills, 30,
                       f"queue start #{kills + 1}", backend.log_tail)
            # ...and the guest's requests flow through it: kill it mid-I/O.
            base = io_bytes(backend.pid)
            wait_until(lambda: io_bytes(backend.pid) - base >= MiB
                       or guest_marked(vm, "fio-done"), 30, "back-end I/O", backend.log_tail)
            if guest_marked(vm, "fio-done"):
                break
            backend.kill()
            kills += 1
            backend.start()
        with open(image, "r+b") as handle:  # enough kills: the guest ends after this pass
            os.pwrite(handle.fileno(), STOP, STOP_AT)
        result = vm.wait(timeout=120)
        wait_until(lambda: len(resubmit_counts(backend)) > kills, 5, "the last queue start",
                   backend.log_tail)
        counts = resubmit_counts(backend)
        starts = backend.log_path.read_text().count(f"started ({ring} ring")
    finally:
        backend.stop()
    assert starts == kills + 1, f"{starts} queue starts on {ring} rings, {kills} kills"
    assert kills >= KILLS_MIN, f"fio ended after {kills} kills:\n{result.output}"
    assert backend.starts == kills + 1
    # counts[0] is the first boot (a fresh region); each restart recovered one.
    assert counts[0] == 0 and len(counts) == kills + 1, counts
    assert any(n > 0 for n in counts[1:]), f"no kill found requests in flight: {counts}"
    assert not [line for line in result.lines if line.startswith("fio-fail")], result.output
    terse = [line.split(";") for line in result.lines if line.startswith("terse ")]
    passes = int(next(line for line in result.lines if line.startswith("passes ")).split()[1])
    assert len(terse) == passes >= 1, result.output
    for fields in terse:
        assert fields[4] == "0", f"fio error field in {fields}:\n{result.output}"
        assert int(fields[5]) == 16 * 1024, f"fio wrote {fields[5]} KiB:\n{result.output}"
    no_kernel_errors(result, vm)


def disconnects(backend: BackendProcess) -> int:
    return backend.log_path.read_text().count("front-end disconnected")


def test_guest_blk_backend_outlives_killed_qemu(guest_vm, short_tmp, tmp_path):
    """QEMU dies mid-I/O; the same back-end process serves a new QEMU the same data."""
    sock = short_tmp / "blk.sock"
    image = sparse_image(tmp_path / "disk.img", 64 * MiB)
    backend = BackendProcess(ours_argv(image, sock), sock, tmp_path / "ours.log").start()
    try:
        first = guest_vm()
        first.add_vhost_user_blk(sock, num_queues=1)
        # A 16 MiB ext4 at the start of the disk, then raw I/O beyond it.
        first.start("""
            set -e
            vhu_wait_dev /dev/vda
            mkfs.ext4 -q -F /dev/vda 16M
            mount -t ext4 /dev/vda /mnt
            dd if=/dev/urandom of=/mnt/f bs=64k count=16 2>/dev/null
            umount /mnt
            dd if=/dev/urandom of=/tmp/p bs=64k count=16 2>/dev/null
            dd if=/tmp/p of=/dev/vda bs=64k seek=512 conv=fsync 2>/dev/null
            echo "pattern $(sha256sum < /tmp/p | cut -d' ' -f1)" > /dev/console
            vhu_mark written
            fio --name=busy --filename=/dev/vda --ioengine=libaio --direct=1 \\
                --rw=randrw --bs=4k --offset=40m --size=16m --iodepth=32 \\
                --time_based --runtime=120 > /dev/null
        """)
        first.wait_for_marker("written", timeout=60)
        pattern = console_has(first, r"pattern ([0-9a-f]{64})").group(1)
        base, gone = io_bytes(backend.pid), disconnects(backend)
        wait_until(lambda: io_bytes(backend.pid) - base >= MiB, 30, "guest I/O",
                   backend.log_tail)
        first.kill()
        wait_until(lambda: disconnects(backend) > gone, 10, "the back-end to see QEMU go",
                   backend.log_tail)
        assert backend.running, backend.log_tail()
        assert image_sha(image, 32 * MiB, MiB) == pattern

        second = guest_vm()
        second.add_vhost_user_blk(sock, num_queues=1)
        result = second.run("""
            vhu_wait_dev /dev/vda || exit 1
            e2fsck -fn /dev/vda > /tmp/fsck.out 2>&1; echo "fsck-rc $?"
            mount -t ext4 -o ro /dev/vda /mnt || exit 1
            echo "file $(sha256sum < /mnt/f | cut -d' ' -f1)"
            umount /mnt
            echo "raw $(dd if=/dev/vda bs=64k skip=512 count=16 2>/dev/null | sha256sum | cut -d' ' -f1)"
        """, timeout=90)
        assert backend.running and backend.starts == 1, backend.log_tail()
    finally:
        backend.stop()
    assert "fsck-rc 0" in result.lines, result.output
    assert f"raw {pattern}" in result.lines, result.output
    # The file the first guest wrote, read back by the host from the image.
    debugfs = require_tool("debugfs")
    cat = subprocess.run([debugfs, "-R", "cat /f", str(image)], capture_output=True)
    assert cat.returncode == 0 and len(cat.stdout) == MiB, cat.stderr
    assert f"file {hashlib.sha256(cat.stdout).hexdigest()}" in result.lines, result.output


def test_guest_blk_flushed_write_survives_backend_kill(guest_vm, short_tmp, tmp_path):
    """Writes the guest saw complete (after fsync, or O_DIRECT) are in the image after kill -9."""
    sock = short_tmp / "blk.sock"
    image = sparse_image(tmp_path / "disk.img", 64 * MiB)
    backend = BackendProcess(ours_argv(image, sock), sock, tmp_path / "ours.log").start()
    try:
        vm = guest_vm()
        vm.add_vhost_user_blk(sock, num_queues=1)
        vm.start("""
            set -e
            vhu_wait_dev /dev/vda
            dd if=/dev/urandom of=/tmp/a bs=64k count=16 2>/dev/null
            dd if=/dev/urandom of=/tmp/b bs=64k count=16 2>/dev/null
            dd if=/tmp/a of=/dev/vda bs=64k seek=16 conv=fsync 2>/dev/null
            dd if=/tmp/b of=/dev/vda bs=64k seek=48 oflag=direct 2>/dev/null
            sync
            echo "a $(sha256sum < /tmp/a | cut -d' ' -f1)" > /dev/console
            echo "b $(sha256sum < /tmp/b | cut -d' ' -f1)" > /dev/console
            vhu_mark flushed
            # Keep writing elsewhere so the kill lands mid-I/O.
            while :; do dd if=/dev/urandom of=/dev/vda bs=64k seek=256 count=64 \\
                           oflag=direct 2>/dev/null; done
        """)
        vm.wait_for_marker("flushed", timeout=60)
        base = io_bytes(backend.pid)
        wait_until(lambda: io_bytes(backend.pid) - base >= MiB, 30, "guest I/O",
                   backend.log_tail)
        backend.kill()
        assert vm.running, vm.console_tail()
        want_a = console_has(vm, r"\ba ([0-9a-f]{64})").group(1)
        want_b = console_has(vm, r"\bb ([0-9a-f]{64})").group(1)
    finally:
        backend.stop()
    assert image_sha(image, 1 * MiB, MiB) == want_a
    assert image_sha(image, 3 * MiB, MiB) == want_b
