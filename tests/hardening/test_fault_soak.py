"""Fault soak of vhost-user-blk under a real guest: kills, front-end restarts, a full disk.

Bounded for CI (about a minute and a half in all); VHOST_USER_SOAK_SECONDS makes the
kill phase longer (e.g. 1800 for half an hour). The back-end runs as users
run it, sandbox on. "No acknowledged write lost" is checked twice: fio's
own verification of every block it wrote while the back-end was being
killed, and a pattern written with O_DIRECT+fsync whose bytes the host
reads back from the image after QEMU itself was SIGKILLed, and a second
guest reads back through a fresh QEMU.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time

import pytest

from harness.backend import BackendProcess
from harness.fixtures import require_tool

pytestmark = pytest.mark.guest

MiB = 1 << 20
SOAK_SECONDS = float(os.environ.get("VHOST_USER_SOAK_SECONDS", "18"))
PATTERN_OFFSET_MB, PATTERN_MB = 20, 4
STOP_OFFSET = 31 * MiB  # the host tells the guest's fio loop to finish by writing here


def _pattern() -> bytes:
    line = b"vhost-user soak pattern: acknowledged means durable\n"
    return (line * (PATTERN_MB * MiB // len(line) + 1))[:PATTERN_MB * MiB]


@pytest.fixture
def small_fs(tmp_path):
    """A 48 MiB tmpfs only this test uses (root needed: fails in CI, skips elsewhere)."""
    require_tool("mount")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        msg = f"cannot mount a tmpfs: {proc.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _backend(image, sock, log) -> BackendProcess:
    argv = [sys.executable, "-m", "vhost_user.backends.blk", "--socket", str(sock), "--image", str(image), "-v"]
    return BackendProcess(argv, sock, log).start()


def _kill_until(vm, backend, marker: str, deadline: float) -> int:
    """SIGKILL and restart the back-end every 1-3 s until the guest prints `marker`."""
    done = threading.Event()
    failure: list[BaseException] = []

    def watch() -> None:
        try:
            vm.wait_for_marker(marker, timeout=deadline)
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)
        done.set()

    threading.Thread(target=watch, daemon=True).start()
    rng = random.Random(7)
    kills = 0
    while not done.wait(rng.uniform(1.0, 3.0)):
        backend.kill()
        backend.start()
        kills += 1
    if failure:
        raise failure[0]
    return kills


def _kill_for(backend, seconds: float, vm) -> int:
    rng = random.Random(11)
    kills = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(rng.uniform(1.0, 3.0))
        assert vm.running, vm.console_tail()
        backend.kill()
        backend.start()
        kills += 1
    return kills


def test_soak_backend_kills_and_frontend_restart_lose_no_acknowledged_write(guest_vm, short_tmp, tmp_path):
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
    sock = short_tmp / "soak.sock"
    backend = _backend(image, sock, tmp_path / "backend.log")
    try:
        vm = guest_vm()
        vm.add_vhost_user_blk(sock, num_queues=1, reconnect_ms=100)
        vm.start(f"""
            vhu_wait_dev /dev/vda || exit 1
            vhu_mark io-running
            i=0
            while ! dd if=/dev/vda bs=512 skip={STOP_OFFSET // 512} count=1 iflag=direct 2>/dev/null | grep -q STOP; do
                fio --name=soak$i --filename=/dev/vda --ioengine=libaio --direct=1 \\
                    --rw=randwrite --bs=4k --size=8m --iodepth=16 --randseed=$i \\
                    --verify=crc32c --do_verify=1 --verify_fatal=1 \\
                    --output-format=terse --terse-version=3 > /tmp/fio.out
                echo "fio-rc $i $?"
                i=$((i+1))
            done
            vhu_mark io-done
            yes "vhost-user soak pattern: acknowledged means durable" | head -c {PATTERN_MB * MiB} > /tmp/pat
            dd if=/tmp/pat of=/dev/vda bs=1M seek={PATTERN_OFFSET_MB} oflag=direct conv=fsync 2>/dev/null
            echo "pattern-rc $?"
            vhu_mark pattern-written
            sleep 600
        """)
        vm.wait_for_marker("io-running", timeout=90)
        kills = _kill_for(backend, SOAK_SECONDS, vm)
        fd = os.open(image, os.O_WRONLY)
        try:
            os.pwrite(fd, b"STOP".ljust(512, b"\0"), STOP_OFFSET)
        finally:
            os.close(fd)
        kills += _kill_until(vm, backend, "io-done", 300)
        vm.wait_for_marker("pattern-written", timeout=120)
        pattern_rc = vm.wait_for_line(r"pattern-rc (\d+)").group(1)
        console = vm.console.read_bytes().decode("utf-8", "replace").replace("\r", "")
        rcs = [line.split()[2] for line in console.splitlines() if line.startswith("fio-rc ")]
        rounds = len(rcs)
        assert rounds >= 1 and set(rcs) == {"0"}, vm.console_tail()
        assert pattern_rc == "0", vm.console_tail()
        vm.kill()  # the front-end dies hard; the back-end must not care
        assert backend.running, backend.log_tail()
        with open(image, "rb") as f:
            f.seek(PATTERN_OFFSET_MB * MiB)
            assert f.read(PATTERN_MB * MiB) == _pattern(), "an acknowledged write is missing from the image"

        vm2 = guest_vm()  # a new front-end on the same back-end process
        vm2.add_vhost_user_blk(sock, num_queues=1)
        result = vm2.run(f"""
            vhu_wait_dev /dev/vda || exit 1
            yes "vhost-user soak pattern: acknowledged means durable" | head -c {PATTERN_MB * MiB} > /tmp/pat
            dd if=/dev/vda of=/tmp/back bs=1M skip={PATTERN_OFFSET_MB} count={PATTERN_MB} iflag=direct 2>/dev/null
            cmp /tmp/pat /tmp/back && echo pattern-intact
            fio --name=after --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \\
                --size=4m --verify=crc32c --do_verify=1 --verify_fatal=1 > /dev/null
            echo "fio-after-rc $?"
        """, timeout=180)
        assert "pattern-intact" in result.lines and "fio-after-rc 0" in result.lines, result.output
        assert kills >= 1 and backend.starts == kills + 1
        assert backend.running
        log = (tmp_path / "backend.log").read_text(errors="replace")
        assert "Traceback" not in log, log[-3000:]
        print(f"soak: {rounds} verified fio rounds, {kills} back-end kills, 1 front-end kill, 0 writes lost")
    finally:
        backend.stop()


def test_soak_enospc_becomes_ioerr_and_backend_serves_after_space_returns(guest_vm, short_tmp, tmp_path, small_fs):
    filler = small_fs / "filler"
    with open(filler, "wb") as f:
        f.write(os.urandom(MiB) * 24)  # 24 of the 48 MiB: the 32 MiB image cannot fill up
    image = small_fs / "disk.img"
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
    sock = short_tmp / "enospc.sock"
    backend = _backend(image, sock, tmp_path / "backend.log")
    try:
        vm = guest_vm()
        vm.add_vhost_user_blk(sock, num_queues=1)
        vm.start("""
            vhu_wait_dev /dev/vda || exit 1
            dd if=/dev/zero of=/dev/vda bs=1M count=32 oflag=direct 2>/tmp/dd.err
            echo "dd-rc $?"
            grep -q "Input/output error" /tmp/dd.err && echo dd-saw-eio
            echo "ioerr-lines $(dmesg | grep -c 'I/O error')"
            vhu_mark enospc-seen
            yes soak | head -c 4096 > /tmp/blk
            ok=no
            n=0
            while [ $n -lt 600 ]; do
                if dd if=/tmp/blk of=/dev/vda bs=4k seek=8191 count=1 oflag=direct 2>/dev/null; then
                    ok=yes; break
                fi
                n=$((n+1)); sleep 0.2
            done
            echo "retry-$ok"
            fio --name=after --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \\
                --offset=24m --size=8m --verify=crc32c --do_verify=1 --verify_fatal=1 > /dev/null
            echo "fio-after-rc $?"
        """)
        vm.wait_for_marker("enospc-seen", timeout=120)
        assert backend.running, backend.log_tail()
        os.unlink(filler)  # space returns
        result = vm.wait(timeout=180)
        lines = result.lines
        assert "dd-rc 0" not in lines and "dd-saw-eio" in lines, result.output
        ioerr = next(int(line.split()[1]) for line in lines if line.startswith("ioerr-lines "))
        assert ioerr > 0, result.output
        assert "retry-yes" in lines and "fio-after-rc 0" in lines, result.output
        assert backend.running and backend.starts == 1, backend.log_tail()
    finally:
        backend.stop()
