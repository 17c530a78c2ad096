"""Self-confinement of a back-end after set-up: no_new_privs and a seccomp allow-list.

Theory of operation
-------------------
A back-end opens everything it needs (image, listening socket, event loop)
before it serves anyone; from then on a guest or a front-end can only reach
it through the socket and guest memory. `apply(profile)` is called at that
point (vhost_user.cli does it, `--sandbox`, on by default). It sets
PR_SET_NO_NEW_PRIVS and loads a seccomp filter (libseccomp through the
`pyseccomp` ctypes binding) synchronised to every thread:

* the syscalls of the profile are allowed; everything else fails with
  EPERM, so an unexpected but harmless call (a lazy import writing a .pyc)
  degrades instead of killing the device;
* a deny-kill list (execve, ptrace, module loading, bpf, ...) kills the
  whole process with SIGSYS: there is no legitimate use after set-up, and a
  dead back-end is a safer outcome than a running compromised one;
* clone is allowed only with CLONE_THREAD (queue workers), so fork fails;
  clone3 answers ENOSYS, which makes glibc fall back to clone;
* openat is allowed read-only (lazy imports, /proc reads), never for
  writing or creating; `unlink` stays allowed to remove the socket file at
  exit;
* io_uring is refused (its operations would bypass the filter). libuv sets
  up a ring when the event loop is created, before set-up ends, so
  `prepare()` runs first: it sets no_new_privs and loads a one-rule filter
  that answers io_uring_setup with ENOSYS, and libuv falls back to plain
  epoll. If a ring exists anyway, io_uring_enter stays allowed, with a log
  line that says so.

A profile is the core set plus a back-end's extras; a new back-end registers
its extras with `register_profile("net", {...})`.

The file-system half (a private read-only root, `--sandbox-fs`) is
vhost_user.sandbox_fs; cli applies it just before the seccomp filter.

`VHOST_USER_SANDBOX_PROBE=1` (tests only) installs a SIGUSR2 handler that
tries a few refused calls in the running, confined process (fork, an INET
socket, a writing open, reading /etc/passwd), logs what the kernel answered,
and finally tries execve, which must kill the process.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import socket
import sys
from typing import Iterable

from vhost_user import devices

__all__ = ["apply", "build", "prepare", "register_profile", "profile_syscalls", "allow_with_args", "SandboxError",
           "CORE_SYSCALLS", "KILL_SYSCALLS", "PROFILES", "CONDITIONAL"]

log = logging.getLogger(__name__)

PR_SET_NO_NEW_PRIVS = 38
CLONE_THREAD = 0x00010000
_O_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

#: what the core (asyncio/uvloop, the session, queue workers, logging) needs after set-up
CORE_SYSCALLS = frozenset("""
    read write readv writev pread64 pwrite64 lseek close close_range dup dup3 fcntl ioctl
    fstat newfstatat statx fstatfs statfs getdents64 readlink readlinkat access faccessat faccessat2
    getcwd unlink unlinkat
    mmap munmap mprotect mremap madvise brk memfd_create ftruncate
    futex set_robust_list get_robust_list rseq sched_yield sched_getaffinity membarrier
    nanosleep clock_nanosleep clock_gettime clock_getres gettimeofday time getrandom
    exit exit_group gettid getpid getppid getuid geteuid getgid getegid getgroups getpgrp
    uname sysinfo prlimit64 getrlimit getrusage times restart_syscall
    rt_sigaction rt_sigprocmask rt_sigreturn rt_sigtimedwait sigaltstack tgkill
    epoll_create1 epoll_ctl epoll_wait epoll_pwait epoll_pwait2 poll ppoll select pselect6
    eventfd2 pipe2 timerfd_create timerfd_settime timerfd_gettime
    accept4 recvmsg sendmsg recvfrom sendto shutdown getsockopt setsockopt getsockname getpeername
    socketpair
""".split())

#: never legitimate after set-up: the process dies with SIGSYS
KILL_SYSCALLS = frozenset("""
    execve execveat ptrace process_vm_readv process_vm_writev kexec_load kexec_file_load
    init_module finit_module delete_module bpf perf_event_open mount umount2 pivot_root
    swapon swapoff reboot
""".split())

#: per back-end extras on top of CORE_SYSCALLS, filled by register_profile: each
#: back-end states its own in backends/<dev>/sandbox.py, imported by its device
PROFILES: dict[str, frozenset[str]] = {}

#: per back-end syscalls allowed only when their arguments match: profile ->
#: [(syscall, ((arg index, value), ...))], every (arg, value) pair must hold (EQ)
CONDITIONAL: dict[str, list[tuple[str, tuple[tuple[int, int], ...]]]] = {}


class SandboxError(OSError):
    """The sandbox could not be set up (no libseccomp, kernel refused)."""


def register_profile(name: str, extra: Iterable[str]) -> None:
    """Add a back-end profile: the core allow-list plus `extra` syscall names."""
    extra = frozenset(extra)
    bad = extra & KILL_SYSCALLS
    if bad:
        raise ValueError(f"profile {name} cannot allow {sorted(bad)}")
    PROFILES[name] = extra


def allow_with_args(profile: str, syscall: str, *conditions: tuple[int, int]) -> None:
    """Allow `syscall` in `profile` when every (arg index, value) matches, e.g. an openat
    under one directory fd opened before confinement."""
    if syscall in KILL_SYSCALLS:
        raise ValueError(f"profile {profile} cannot allow {syscall}")
    CONDITIONAL.setdefault(profile, []).append((syscall, tuple(conditions)))


def profile_syscalls(name: str) -> frozenset[str]:
    """The full allow-list of a profile (KeyError for an unknown one)."""
    return CORE_SYSCALLS | PROFILES[name]


def prepare(profile: str) -> None:
    """Before the event loop exists: keep libuv off io_uring (it would bypass seccomp).

    Raises SandboxError when there is no such profile or seccomp is
    unavailable, before changing anything: apply() would fail too.
    """
    _check_profile(profile)
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as exc:
        raise SandboxError(errno.ENOSYS, f"libseccomp is not available ({exc})") from None
    f = sc.SyscallFilter(sc.ALLOW)
    _add(f, sc.ERRNO(errno.ENOSYS), "io_uring_setup")
    _set_no_new_privs()
    try:
        f.load()
    except OSError as exc:
        raise SandboxError(exc.errno or errno.EPERM, f"seccomp filter refused: {exc}") from None


def _check_profile(profile: str) -> None:
    if profile not in PROFILES:
        devices.load_sandbox(profile)  # the device that declares it registers it on import
    if profile not in PROFILES:
        raise SandboxError(errno.EINVAL, f"no sandbox profile for {profile!r}")


def _io_uring_in_use() -> bool:
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[io_uring]":
                return True
        except OSError:
            continue
    return False


def _set_no_new_privs() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise SandboxError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")


def _build_filter(allowed: frozenset[str], conditional=()):
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as exc:  # the binding, or libseccomp.so.2 itself
        raise SandboxError(errno.ENOSYS, f"libseccomp is not available ({exc})") from None
    f = sc.SyscallFilter(sc.ERRNO(errno.EPERM))
    f.set_attr(sc.Attr.CTL_TSYNC, 1)
    f.set_attr(sc.Attr.CTL_NNP, 1)
    for name in sorted(allowed - {"openat", "clone"}):
        _add(f, sc.ALLOW, name)
    for name in sorted(KILL_SYSCALLS):
        _add(f, sc.KILL_PROCESS, name)
    _add(f, sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, CLONE_THREAD))
    _add(f, sc.ERRNO(errno.ENOSYS), "clone3")
    _add(f, sc.ALLOW, "openat", sc.Arg(2, sc.MASKED_EQ, _O_WRITE_FLAGS, 0))
    _add(f, sc.ALLOW, "kill", sc.Arg(0, sc.EQ, os.getpid()))
    _add(f, sc.ALLOW, "prctl", sc.Arg(0, sc.EQ, 15))  # PR_SET_NAME (thread names)
    for name, conds in conditional:
        _add(f, sc.ALLOW, name, *(sc.Arg(i, sc.EQ, v) for i, v in conds))
    if _io_uring_in_use():
        log.warning("sandbox: the event loop already uses io_uring; io_uring_enter stays allowed "
                    "(its operations are not filtered)")
        _add(f, sc.ALLOW, "io_uring_enter")
    else:
        for name in ("io_uring_setup", "io_uring_enter", "io_uring_register"):
            _add(f, sc.ERRNO(errno.ENOSYS), name)
    return f


def _add(f, action, name: str, *args) -> None:
    try:
        f.add_rule(action, name, *args)
    except (ValueError, OSError) as exc:  # a name this kernel/libseccomp does not know
        log.debug("sandbox: no rule for %s (%s)", name, exc)


def build(profile: str):
    """The seccomp filter of `profile`, not loaded yet (it looks at /proc/self/fd, so
    it is built before the file-system sandbox takes /proc away)."""
    _check_profile(profile)
    return _build_filter(profile_syscalls(profile), CONDITIONAL.get(profile, ()))


def apply(profile: str, loop=None, f=None) -> None:
    """Confine this process (all threads) with `profile` (or the filter `build` made);
    raises SandboxError if impossible."""
    _check_profile(profile)
    if f is None:
        f = build(profile)
    _set_no_new_privs()
    try:
        f.load()
    except OSError as exc:
        raise SandboxError(exc.errno or errno.EPERM, f"seccomp filter refused: {exc}") from None
    log.info("sandbox: %s profile active (no_new_privs, seccomp allow-list of %d syscalls)",
             profile, len(profile_syscalls(profile)))
    if loop is not None and os.environ.get("VHOST_USER_SANDBOX_PROBE") == "1":
        loop.add_signal_handler(signal.SIGUSR2, _probe)


def _try(what: str, fn) -> None:
    try:
        fn()
    except OSError as exc:
        log.warning("sandbox probe: %s refused: %s", what, errno.errorcode.get(exc.errno, exc.errno))
    else:
        log.error("sandbox probe: %s ALLOWED", what)


def _fork() -> None:
    if os.fork() == 0:
        os._exit(0)


def _probe() -> None:
    """Test hook: show what the kernel answers the confined process (see module doc)."""
    _try("fork", _fork)
    _try("socket(AF_INET)", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close())
    _try("open for writing", lambda: os.close(os.open("/tmp/.vhost-user-sandbox-probe", os.O_WRONLY | os.O_CREAT)))
    # allowed by seccomp (read-only); the file-system sandbox leaves nothing to read
    _try("read /etc/passwd", lambda: os.close(os.open("/etc/passwd", os.O_RDONLY)))
    log.warning("sandbox probe: / holds %s", sorted(os.listdir("/")))
    log.warning("sandbox probe: trying execve, which must kill this process")
    for h in logging.getLogger().handlers:
        h.flush()
    os.execv(sys.executable, [sys.executable, "-c", "print('sandbox probe: execve ran')"])
