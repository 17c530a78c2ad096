"""The file-system half of the sandbox: a private, nearly empty root after set-up.

Theory of operation
-------------------
Once set up, a back-end reaches its image, TAP devices, capture file and
PNG directory through file descriptors it already holds; what it may still
need by path is Python's own modules (imports can be lazy), the shared
libraries next to those already loaded, and whatever a back-end declares
with `need(path)` (vsock connects to `<uds-path>_<port>` at run time). So
after set-up the process switches to a root that holds only those, bound
read-only at their usual paths, on a read-only tmpfs: no /etc, /home, /proc,
no socket directory to unlink in.

`--sandbox-fs MODE` (cli), in two steps:

* `enter(mode)`, early, while the process is still single-threaded (before
  the devices start threads: vsock's host loop, the virgl renderer, TAP
  readers): `unshare(CLONE_NEWNS)` when we hold CAP_SYS_ADMIN, else
  `unshare(CLONE_NEWUSER | CLONE_NEWNS)` with our uid and gid mapped to
  themselves (a user namespace needs a single-threaded caller, and a mount
  namespace made later would hold only the calling thread). Mounts are made
  private; the process still sees the whole file system during set-up.
* `confine()`, after set-up, any number of threads: mount a tmpfs, bind the
  kept directories into it (through O_PATH fds opened first, so a directory
  the tmpfs covers is still reachable), `pivot_root(".", ".")`, detach the
  old root, remount the new one read-only. pivot_root moves every thread
  (they share one fs_struct); so does chroot.

`chroot` (the fallback when no namespace can be made, and only with
CAP_SYS_CHROOT): chroot into an empty directory that is then removed. No
binds are possible, so modules are imported beforehand and a back-end that
declared a path cannot use it. `namespace` falls back to `chroot`, then to
`none`, saying so in one log line; `none` keeps the host's file system.

Files the back-end must still remove at exit (its sockets, its pid file)
are reached through O_PATH directory fds (vhost_user.server, daemon).
"""
from __future__ import annotations

import ctypes
import errno
import importlib
import logging
import os
import platform
import sys
import sysconfig
import tempfile

__all__ = ["SandboxFsError", "MODES", "need", "enter", "confine", "kept_paths"]

log = logging.getLogger(__name__)

MODES = ("namespace", "chroot", "none")

CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
MNT_DETACH = 2
CAP_SYS_CHROOT, CAP_SYS_ADMIN, CAP_SETFCAP = 18, 21, 31
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
#: statvfs f_flag bit -> mount flag that a remount in a user namespace must keep
_LOCKED = {os.ST_RDONLY: MS_RDONLY, os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV,
           os.ST_NOEXEC: MS_NOEXEC, os.ST_NOATIME: MS_NOATIME, os.ST_NODIRATIME: MS_NODIRATIME,
           os.ST_RELATIME: MS_RELATIME}
#: imported before a chroot, which leaves nothing to import from
_WARM_MODULES = ("encodings.idna", "encodings.latin_1", "traceback", "linecache", "tokenize")

class SandboxFsError(OSError):
    """A half-made namespace the process cannot leave: set-up must stop (exit 1)."""


_needs: dict[str, bool] = {}  # path -> writable
_state = {"mode": None, "userns": False}
_libc = ctypes.CDLL(None, use_errno=True)


def need(path: str, *, writable: bool = False) -> None:
    """Declare a directory this back-end uses by path after set-up (kept at the same path)."""
    path = os.path.abspath(path)
    _needs[path] = _needs.get(path, False) or writable


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _has_cap(cap: int) -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _unshare() -> bool:
    """A private mount namespace (and a user namespace when unprivileged); returns userns."""
    if _threads() != 1:
        raise OSError(errno.EINVAL, f"{_threads()} threads already run (a namespace needs one)")
    userns = not _has_cap(CAP_SYS_ADMIN)
    uid, gid = os.geteuid(), os.getegid()
    if userns and uid == 0 and not _has_cap(CAP_SETFCAP):
        # the kernel lets only a holder of CAP_SETFCAP map uid 0 into a user namespace
        raise OSError(errno.EPERM, "uid 0 without CAP_SYS_ADMIN or CAP_SETFCAP cannot map itself")
    _check(_libc.unshare(CLONE_NEWNS | (CLONE_NEWUSER if userns else 0)), "unshare")
    if userns:
        try:
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", f"{uid} {uid} 1")
            _write("/proc/self/gid_map", f"{gid} {gid} 1")
        except OSError as exc:  # inside a user namespace without our ids: cannot go back
            raise SandboxFsError(exc.errno, f"user namespace id map: {exc.strerror}") from None
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    return userns


def enter(mode: str) -> str:
    """The early step (single-threaded, before set-up). Returns the mode in effect.

    Idempotent: the gpu back-end calls it before its renderer starts threads,
    serve_devices calls it again. A mode that cannot be had falls back
    (namespace -> chroot -> none) with one log line; only SandboxFsError (a user
    namespace made whose id maps the kernel then refused) stops set-up.
    """
    if _state["mode"] is not None:
        return _state["mode"]
    if mode not in MODES:
        raise ValueError(f"--sandbox-fs: unknown mode {mode!r}")
    chosen = mode
    if mode == "namespace":
        try:
            _state["userns"] = _unshare()
        except SandboxFsError:
            raise
        except OSError as exc:
            chosen = "chroot" if _has_cap(CAP_SYS_CHROOT) else "none"
            log.warning("sandbox-fs: no namespace (%s); using %s", exc.strerror or exc, chosen)
    if chosen == "chroot" and not _has_cap(CAP_SYS_CHROOT):
        log.warning("sandbox-fs: chroot needs CAP_SYS_CHROOT; using none")
        chosen = "none"
    _state["mode"] = chosen
    return chosen


def _python_dirs() -> set[str]:
    """sys.path entries that loaded modules came from, and the standard library."""
    paths = sorted({os.path.abspath(p) for p in sys.path if p and os.path.isdir(p)}, key=len, reverse=True)
    used = {os.path.abspath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")}
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if not f:
            continue
        f = os.path.abspath(f)
        for p in paths:
            if f.startswith(p + os.sep):
                used.add(p)
                break
    return {p for p in used if p != "/" and os.path.isdir(p)}


def _library_dirs() -> set[str]:
    """Directories of the shared libraries mapped now (lazy dlopen of their siblings)."""
    out = set()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/") and ".so" in os.path.basename(parts[5]):
                d = os.path.dirname(parts[5].strip())
                if d != "/" and os.path.isdir(d):
                    out.add(d)
    return out


def kept_paths() -> dict[str, bool]:
    """What the new root holds: path -> writable (nested paths folded into their parent)."""
    wanted = {p: False for p in _python_dirs() | _library_dirs()}
    for p, w in _needs.items():
        wanted[p] = wanted.get(p, False) or w
    kept: dict[str, bool] = {}
    for p in sorted(wanted, key=len):
        parent = next((k for k in kept if p.startswith(k + os.sep)), None)
        if parent is None:
            kept[p] = wanted[p]
        elif wanted[p] and not kept[parent]:
            kept[p] = True  # a writable directory inside a read-only one: its own bind
    return kept


def _preload() -> None:
    """What glibc and Python may load lazily from a path: load it while paths work."""
    try:
        ctypes.CDLL("libgcc_s.so.1")  # pthread_exit/cancel unwinding dlopens it
    except OSError:
        pass
    for name in _WARM_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def _bind(fd: int, target: str, writable: bool) -> None:
    src = f"/proc/self/fd/{fd}".encode()
    _check(_libc.mount(src, target.encode(), None, MS_BIND | MS_REC, None), f"bind {target}")
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | (0 if writable else MS_RDONLY)
    st = os.statvfs(target)
    for bit, mflag in _LOCKED.items():  # a user namespace may not clear what the host set
        if st.f_flag & bit and (writable is False or mflag != MS_RDONLY):
            flags |= mflag
    if not st.f_flag & (os.ST_NOATIME | os.ST_RELATIME):
        flags |= MS_STRICTATIME
    _check(_libc.mount(None, target.encode(), None, flags, None), f"remount {target}")


def _pivot(kept: dict[str, bool]) -> None:
    fds = {p: os.open(p, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for p in kept}
    try:
        stage = next(d for d in ("/tmp", "/mnt", "/run", "/var/tmp") if os.path.isdir(d))
        _check(_libc.mount(b"tmpfs", stage.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755,size=1m"),
               "mount tmpfs")
        for path, writable in kept.items():
            target = stage + path
            os.makedirs(target, exist_ok=True)
            _bind(fds[path], target, writable)
    finally:
        for fd in fds.values():
            os.close(fd)
    os.chdir(stage)
    nr = _SYS_PIVOT_ROOT.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"pivot_root: unknown syscall number on {platform.machine()}")
    _check(_libc.syscall(nr, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "detach the old root")
    os.chdir("/")
    _check(_libc.mount(None, b"/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None),
           "remount / read-only")


def _chroot() -> None:
    if _needs:
        raise OSError(errno.EINVAL, f"chroot cannot keep {', '.join(sorted(_needs))}")
    parent = os.open(tempfile.gettempdir(), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        empty = tempfile.mkdtemp(prefix=".vhost-user-root-")
        os.chdir(empty)
        os.chroot(".")
        os.chdir("/")
        os.rmdir(os.path.basename(empty), dir_fd=parent)
    finally:
        os.close(parent)


def confine() -> str:
    """The late step (after set-up): switch to the private root. Returns what was done,
    for the one log line; raises OSError when the mode chosen at enter() fails now."""
    mode = _state["mode"] or "none"
    if mode == "none":
        return "none (the host's file system stays visible)"
    _preload()
    if mode == "chroot":
        _chroot()
        return "chroot (an empty, removed directory)"
    kept = kept_paths()
    _pivot(kept)
    kind = "user+mount" if _state["userns"] else "mount"
    return f"namespace ({kind} namespace, read-only tmpfs root with {len(kept)} kept directories)"
