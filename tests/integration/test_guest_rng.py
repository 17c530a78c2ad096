"""vhost-user-rng under a real Linux guest: QEMU 10's vhost-user-rng-pci, the guest reads /dev/hwrng.

The guest's virtio_rng driver registers with the hw_random core, which
makes it the current source; the test reads 64 KiB through /dev/hwrng, the
way rngd does, and checks that the bytes are not trivial (every byte value
occurs, two halves differ) and that the back-end counted at least as many
bytes as the guest read (its SIGUSR1 stats line). A second read with a rate
limit shows the guest is slowed, not starved or fed garbage.
"""

from __future__ import annotations

import sys

import pytest

from harness.backend import BackendProcess

pytestmark = pytest.mark.guest

READ = """
n=0; while [ ! -e /dev/hwrng ] || ! grep -q virtio_rng /sys/class/misc/hw_random/rng_current 2>/dev/null; do
    n=$((n + 1)); [ "$n" -gt 100 ] && { echo "no virtio rng"; cat /sys/class/misc/hw_random/rng_available; exit 1; }
    sleep 0.1
done
echo "current $(cat /sys/class/misc/hw_random/rng_current)"
dd if=/dev/hwrng of=/tmp/r bs=64 count=1024 2>/dev/null
echo "bytes $(wc -c < /tmp/r)"
echo "values $(od -An -v -tu1 /tmp/r | tr -s ' ' '\\n' | grep -v '^$' | sort -u | wc -l)"
head -c 32768 /tmp/r | md5sum | cut -d' ' -f1 > /tmp/a
tail -c 32768 /tmp/r | md5sum | cut -d' ' -f1 > /tmp/b
cmp -s /tmp/a /tmp/b && echo "halves same" || echo "halves differ"
"""


def _value(result, label: str) -> str:
    for line in result.lines:
        if line.startswith(label + " "):
            return line.split(None, 1)[1]
    raise AssertionError(f"guest printed no {label!r} line:\n{result.output}")


@pytest.mark.parametrize("limit", [None, 16384])
def test_guest_reads_hwrng_from_our_backend(guest_vm, short_tmp, tmp_path, limit):
    extra = ["--max-bytes", str(limit), "--period", "200"] if limit else []
    argv = [sys.executable, "-m", "vhost_user.backends.rng", "-v", "--socket", str(short_tmp / "rng.sock"), *extra]
    backend = BackendProcess(argv, short_tmp / "rng.sock", tmp_path / "rng.log").start()
    try:
        vm = guest_vm(cpus=1, memory_mb=256)
        vm.add_args("-chardev", f"socket,id=rng0,path={backend.socket}",
                    "-device", "vhost-user-rng-pci,chardev=rng0")
        vm.start(READ)
        result = vm.wait(timeout=240)
        assert _value(result, "current") == "virtio_rng.0", result.output
        assert _value(result, "bytes") == "65536", result.output
        assert int(_value(result, "values")) == 256, result.output
        assert "halves differ" in result.lines, result.output
        stats = next(iter(backend.log_stats().values()))
        assert stats["bytes"] >= 65536 and stats["source_errors"] == 0, stats
        if limit:
            assert stats["rate_limited"] > 0, stats
        assert "Traceback" not in backend.log_path.read_text()
    finally:
        backend.stop()
