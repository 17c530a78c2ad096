"""Bad input to the real programs: one line `PROGRAM: error: WHAT: reason`, never a traceback.

Exit status 1 for bad input found while setting up (a path, an fd, a file);
2 for a usage error (argparse's own, and option values a device rejects),
whose last line has the same `PROGRAM: error: ...` shape after the usage.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

MOD = {
    "vhost-user-blk": "vhost_user.backends.blk",
    "vhost-user-net": "vhost_user.backends.net",
    "vhost-user-vsock": "vhost_user.backends.vsock",
    "vhost-user-gpu": "vhost_user.backends.gpu",
    "vhost-user-bench": "vhost_user.frontend.bench",
}
# The /proc/version reason: root may open it for writing and then fails to write.
PROC_VERSION = r"/proc/version: (Input/output error|Permission denied)"

# (program, argv with {d} = a fresh directory, exit status, expected last stderr line as a regex)
CASES = {
    "vsock_pcap_missing_dir": ("vhost-user-vsock", "--guest-cid 3 --socket {d}/s --pcap {d}/no/x.pcap", 1,
                               "{d}/no/x.pcap: No such file or directory"),
    "vsock_pcap_proc_version": ("vhost-user-vsock", "--guest-cid 3 --socket {d}/s --pcap /proc/version", 1,
                                PROC_VERSION),
    "net_pcap_missing_dir": ("vhost-user-net", "--socket {d}/s --pcap {d}/no/x.pcap", 1,
                             "{d}/no/x.pcap: No such file or directory"),
    "net_pcap_proc_version": ("vhost-user-net", "--socket {d}/s --pcap /proc/version", 1, PROC_VERSION),
    "net_mac_ageing_negative": ("vhost-user-net", "--socket {d}/s --mac-ageing -5", 2,
                                "argument --mac-ageing: -5: must be 0..315360000 seconds"),
    "net_mac_ageing_inf": ("vhost-user-net", "--socket {d}/s --mac-ageing inf", 2,
                           "argument --mac-ageing: inf: must be 0..315360000 seconds"),
    "net_tap_name_too_long": ("vhost-user-net", "--socket {d}/s --tap abcdefghijklmnopq", 2,
                              "--tap 'abcdefghijklmnopq': a TAP name is 1..15 bytes"),
    "net_poll_us_too_long": ("vhost-user-net", "--socket {d}/s --poll-us 100001", 2,
                             "argument --poll-us: 100001: must be 0..100000 microseconds"),
    "blk_poll_us_not_a_number": ("vhost-user-blk", "--socket {d}/s --poll-us 1.5", 2,
                                 "argument --poll-us: 1.5: must be 0..100000 microseconds"),
    "net_no_endpoint": ("vhost-user-net", "", 2, "give --socket PATH or --fd N \\(repeatable\\)"),
    "bench_blk_missing_socket": ("vhost-user-bench", "blk --socket {d}/MISSING --runtime 1", 1,
                                 "{d}/MISSING: No such file or directory"),
    "bench_vsock_missing_socket": ("vhost-user-bench", "vsock --socket {d}/MISSING --uds-path {d}/u", 1,
                                   "{d}/MISSING: No such file or directory"),
    "vsock_vm_cid_not_a_number": ("vhost-user-vsock", "--vm guest-cid=abc,socket={d}/s", 2,
                                  "argument --vm: guest CID 'abc' is not a number"),
    "vsock_cid_reserved": ("vhost-user-vsock", "--guest-cid 2 --socket {d}/s", 2,
                           "argument --guest-cid: guest CID 2 must be 3..4294967294"),
    "vsock_vm_without_socket": ("vhost-user-vsock", "--vm guest-cid=3", 2,
                                "argument --vm: --vm needs one of socket= or fd="),
    "vsock_socket_without_cid": ("vhost-user-vsock", "--socket {d}/s", 2, "--socket/--fd need --guest-cid"),
    "vsock_uds_missing_dir": ("vhost-user-vsock", "--guest-cid 3 --socket {d}/s --uds-path {d}/no/u", 1,
                              "{d}/no/u: No such file or directory"),
    "blk_size_below_a_sector": ("vhost-user-blk", "--socket {d}/s --size 100", 2,
                                "--size 100: not a whole number of 512-byte sectors"),
    "blk_size_beside_image": ("vhost-user-blk", "--socket {d}/s --size 1M --image {d}/img", 2,
                              "--size sets the in-memory disk's size; with --image the image's size is used"),
    "blk_image_missing": ("vhost-user-blk", "--socket {d}/s --image {d}/no.img", 1,
                          "{d}/no.img: cannot open image: No such file or directory"),
    "blk_image_is_a_directory": ("vhost-user-blk", "--socket {d}/s --image {d}", 1,
                                 "{d}: cannot open image: Is a directory"),
    "blk_image_empty": ("vhost-user-blk", "--socket {d}/s --image /proc/version", 1,
                        "/proc/version: smaller than one sector \\(0 bytes\\)"),
    "blk_fd_not_open": ("vhost-user-blk", "--fd 99", 1,
                        "--fd 99: not an open file descriptor \\(Bad file descriptor\\)"),
    "blk_fd_negative": ("vhost-user-blk", "--fd -1", 2,
                        "argument -f/--fd: not a file descriptor or socket name: '-1'"),
    "blk_fd_not_a_socket": ("vhost-user-blk", "--fd 0", 1, "--fd 0: not a socket"),
    "blk_fd_unknown_name": ("vhost-user-blk", "--fd vm1", 2, "--fd vm1: no socket of that name in LISTEN_FDNAMES"),
    "gpu_fd_not_open": ("vhost-user-gpu", "--fd 99", 1,
                        "--fd 99: not an open file descriptor \\(Bad file descriptor\\)"),
    "gpu_display_under_a_file": ("vhost-user-gpu", "--socket {d}/s --display png:/proc/version/x", 1,
                                 "/proc/version/x: Not a directory"),
    "blk_pidfile_missing_dir": ("vhost-user-blk", "--socket {d}/s --pidfile {d}/no/pid", 1,
                                "{d}/no/pid: No such file or directory"),
    "blk_socket_is_a_file": ("vhost-user-blk", "--socket {d}/img", 1, "{d}/img: exists and is not a socket"),
    "blk_socket_path_too_long": ("vhost-user-blk", "--socket {d}/" + "x" * 110, 1,
                                 "{d}/x+: socket path too long \\(at most 107 bytes\\)"),
}
for _prog in ("vhost-user-blk", "vhost-user-net", "vhost-user-vsock", "vhost-user-gpu"):
    _extra = {"vhost-user-vsock": "--guest-cid 3 "}.get(_prog, "")
    CASES[f"{_prog}_socket_in_missing_dir"] = (_prog, _extra + "--socket {d}/no/s.sock", 1,
                                               "{d}/no/s.sock: No such file or directory")


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_error_line(case, sockdir):
    prog, args, status, reason = CASES[case]
    with open(os.path.join(sockdir, "img"), "wb") as f:
        f.truncate(1 << 20)
    argv = [sys.executable, "-m", MOD[prog]] + args.format(d=sockdir).split()
    out = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == status, out.stderr
    lines = out.stderr.splitlines()
    if status == 1:
        assert len(lines) == 1, out.stderr
    pattern = f"{re.escape(prog)}: error: {reason.format(d=re.escape(sockdir))}"
    assert re.fullmatch(pattern, lines[-1]), (lines[-1], pattern)
    assert not os.path.exists(os.path.join(sockdir, "s")), "a failed start left its socket file"
