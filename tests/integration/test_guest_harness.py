"""The guest harness itself: status, markers, timeouts and failure messages.

Two boots; each pins a behaviour the device tests rely on when they fail,
which is exactly when nobody wants to debug the harness.
"""

from __future__ import annotations

import os

import pytest

from harness.qemu import GuestError

pytestmark = pytest.mark.guest


def test_guest_harness_failed_script_reports_status_output_and_console(guest_vm):
    vm = guest_vm()
    with pytest.raises(GuestError) as failure:
        vm.run("""
            echo "to stdout"
            echo "to stderr" >&2
            uname -r
            exit 3
        """, timeout=60)
    message = str(failure.value)
    assert "guest script exited 3" in message
    assert "to stdout\nto stderr\n" in message
    assert "console tail" in message
    assert vm.kernel.release in message  # the script's output, via the console tail
    assert not vm.running


def test_guest_harness_marker_then_timeout_kills_only_its_qemu(guest_vm):
    vm = guest_vm()
    vm.start("""
        echo "uptime $(cut -d' ' -f1 /proc/uptime)"
        vhu_mark ready
        sleep 600
    """)
    at = vm.wait_for_marker("ready", timeout=60)
    assert 0 < at < 60
    pid = vm.pid
    with pytest.raises(GuestError, match="timed out after 1s"):
        vm.wait(timeout=1)
    assert not vm.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
