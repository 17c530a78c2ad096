#!/usr/bin/env python3
"""What the system calls a 4k virtio-blk request needs cost on this machine (the floor).

A back-end that serves a 4 KiB read from the page cache makes at least one
preadv per request, and per batch of requests one kick read (eventfd), one
poll and one call notification (eventfd write). This compiles a tiny C
program with `cc`, times each of those calls in a loop on one thread (a
4 KiB preadv at random offsets of a resident file in /dev/shm), and prints
CPU nanoseconds per call (thread CPU time, so a busy machine inflates it
less than wall time): the floor under "back-end CPU µs per request".

    python3 tools/syscall_floor.py [--iterations 200000] [--batch 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

C_SOURCE = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(int argc, char **argv) {
    long n = atol(argv[2]);
    int fd = open(argv[1], O_RDONLY);
    off_t size = lseek(fd, 0, SEEK_END);
    static char buf[4096] __attribute__((aligned(4096)));
    struct iovec iov = {buf, sizeof(buf)};
    uint64_t pages = (uint64_t)size / 4096, x = 88172645463325252ull, v = 1;
    int ev = eventfd(0, EFD_NONBLOCK);
    struct pollfd p = {ev, POLLIN, 0};
    double t0, t1;

    for (uint64_t k = 0; k < pages; k++)   /* make every page resident */
        pread(fd, buf, 4096, (off_t)(k * 4096));
    t0 = now();
    for (long i = 0; i < n; i++) syscall(SYS_getppid);
    t1 = now(); printf("empty syscall (getppid) %.0f\n", (t1 - t0) / n);
    t0 = now();
    for (long i = 0; i < n; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        if (preadv(fd, &iov, 1, (off_t)(x % pages * 4096)) != 4096) return 1;
    }
    t1 = now(); printf("preadv 4 KiB, page cache %.0f\n", (t1 - t0) / n);
    t0 = now();
    for (long i = 0; i < n; i++) {
        if (write(ev, &v, 8) != 8 || poll(&p, 1, 0) != 1 || read(ev, &v, 8) != 8) return 1;
        v = 1;
    }
    t1 = now(); printf("eventfd write + poll + read %.0f\n", (t1 - t0) / n);
    return 0;
}
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=200_000, help="calls per measurement")
    ap.add_argument("--batch", type=int, default=8,
                    help="requests per kick, to amortise the eventfd cost in the floor (default 8)")
    ap.add_argument("--size", type=int, default=64 << 20, help="size of the file read (bytes)")
    args = ap.parse_args()
    if args.iterations < 1 or args.batch < 1 or args.size < 4096:
        ap.error("--iterations and --batch must be positive, --size at least 4096")
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        print("syscall_floor.py: error: cc: no C compiler found", file=sys.stderr)
        return 1
    d = tempfile.mkdtemp(prefix="vu-floor-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        src, exe, data = (os.path.join(d, n) for n in ("floor.c", "floor", "data"))
        with open(src, "w") as f:
            f.write(C_SOURCE)
        subprocess.run([cc, "-O2", "-o", exe, src], check=True)
        with open(data, "wb") as f:
            f.write(os.urandom(1 << 20) * (args.size >> 20) or os.urandom(args.size))
        out = subprocess.run([exe, data, str(args.iterations)], check=True, capture_output=True,
                             text=True).stdout
    finally:
        shutil.rmtree(d, ignore_errors=True)
    ns = {}
    for line in out.splitlines():
        name, value = line.rsplit(" ", 1)
        ns[name] = float(value)
        print(f"{name}: {float(value):.0f} ns")
    floor = ns["preadv 4 KiB, page cache"] + ns["eventfd write + poll + read"] / args.batch
    print(f"floor per 4k read request ({args.batch} per kick): {floor / 1000:.2f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
