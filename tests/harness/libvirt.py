"""A private libvirtd for tests, and guests that it boots from the harness kernel.

Theory of operation
-------------------
The back-ends claim to work under libvirt, so a test must have the real
daemon start QEMU (and, for gpu, start the back-end itself from a
description file). A system-wide libvirtd would read and write the host's
configuration, state and description files, so :class:`LibvirtDaemon` runs
Debian's ``libvirtd`` as root inside a private mount namespace
(``unshare --mount``) where the directories it uses are bind mounts of
directories under one test-owned root:

=========================  ====================================================
/etc/libvirt               libvirtd.conf and qemu.conf written here (below)
/run/libvirt               its sockets and pid files (so ``libvirt-sock`` is
                           reachable from outside at ``ROOT/run/libvirt-sock``)
/var/lib/libvirt, /var/log/libvirt   its state, QEMU's logs
/var/cache/libvirt         the QEMU capabilities cache, kept in the harness
                           cache (libvirt re-probes when QEMU or itself
                           changed; probing costs ~8 s under TCG)
/usr/share/qemu/vhost-user, /etc/qemu/vhost-user   the description files
                           libvirt reads for ``<driver name='vhostuser'/>``
/etc/passwd, /etc/group    copies with the ``libvirt-qemu`` user added when the
                           host lacks it (libvirtd 9 resolves its compiled-in
                           default user before it reads qemu.conf; only
                           ``libvirt-daemon-system`` would create it)
=========================  ====================================================

qemu.conf runs QEMU as root with no security driver, no cgroups, no
per-domain /dev namespace and plain log files (no virtlogd): the test
machine has no systemd, no AppArmor, no libvirt user. Clients connect with
``qemu+unix:///system?socket=ROOT/run/libvirt-sock`` (:attr:`uri`).

:class:`LibvirtGuest` is a :class:`GuestVM` whose QEMU libvirt starts from a
domain XML (direct kernel boot of the harness kernel and initramfs, serial
console to a file); the console protocol (markers, script output, status)
is GuestVM's. ``stop()`` destroys every domain the daemon still runs, stops
the daemon, and kills any QEMU or back-end pid left in its pid files (all
started by this daemon, nothing else).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from .cache import cache_root
from .initramfs import Initramfs, boot_initrd
from .kernel import GuestKernel
from .qemu import GuestVM, _pick_firmware, kvm_usable

__all__ = ["LibvirtDaemon", "LibvirtError", "LibvirtGuest", "domain_xml", "process_cmdline"]

#: Host directory -> sub-directory of the daemon's root bound over it.
BINDS = {
    "/etc/libvirt": "etc",
    "/run/libvirt": "run",
    "/var/lib/libvirt": "lib",
    "/var/log/libvirt": "log",
    "/var/cache/libvirt": "cache",
    "/usr/share/qemu/vhost-user": "vhost-user",
    "/etc/qemu/vhost-user": "vhost-user-etc",
}

#: Hidden only where the host has them (never created on the host).
OPTIONAL_BINDS = {"/etc/qemu/vhost-user"}

LIBVIRTD_CONF = """\
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""

QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""

QEMU_USER = "libvirt-qemu:x:64055:64055:Libvirt Qemu:/var/lib/libvirt:/usr/sbin/nologin\n"
QEMU_GROUP = "libvirt-qemu:x:64055:\n"


class LibvirtError(AssertionError):
    """libvirtd did not start, or a virsh command failed; carries the daemon log tail."""


def process_cmdline(pid: int) -> list[str]:
    """The argv of a running process (``[]`` once it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaps counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


class LibvirtDaemon:
    """libvirtd in a private mount namespace, all its files under ``root``.

    ``root`` must be short (a Unix socket lives under it): use
    :func:`harness.short_tempdir`.
    """

    def __init__(self, root: str | Path, libvirtd: str = "libvirtd", virsh: str = "virsh",
                 unshare: str = "unshare", cache: str | Path | None = None) -> None:
        self.root = Path(root)
        self.cache = Path(cache) if cache else cache_root() / "libvirt-cache"
        self.libvirtd, self.virsh_path, self.unshare = libvirtd, virsh, unshare
        self._proc: subprocess.Popen | None = None
        self._out = None

    @property
    def socket(self) -> Path:
        return self.root / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def log(self) -> Path:
        return self.root / "log" / "libvirtd.log"

    @property
    def description_dir(self) -> Path:
        """Seen by libvirtd as /usr/share/qemu/vhost-user."""
        return self.root / "vhost-user"

    def domain_log(self, name: str) -> Path:
        """QEMU's command line and stderr for domain ``name`` (libvirt's per-domain log)."""
        return self.root / "log" / "qemu" / f"{name}.log"

    def run_dir(self) -> Path:
        """Seen by libvirtd as /run/libvirt/qemu: pid files of QEMU and helper processes."""
        return self.root / "run" / "qemu"

    def _prepare(self) -> str:
        for sub in BINDS.values():
            if sub != "cache":
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "etc" / "libvirtd.conf").write_text(LIBVIRTD_CONF)
        (self.root / "etc" / "qemu.conf").write_text(QEMU_CONF)
        # The host's own description files stay visible (as on a real host),
        # so a test proves that ours is chosen over QEMU's.
        host_vu = Path("/usr/share/qemu/vhost-user")
        for src in sorted(host_vu.glob("*.json")) if host_vu.is_dir() else []:
            shutil.copy(src, self.description_dir / src.name)
        passwd, group = Path("/etc/passwd").read_text(), Path("/etc/group").read_text()
        if not any(line.startswith("libvirt-qemu:") for line in passwd.splitlines()):
            passwd += QEMU_USER
        if not any(line.startswith("libvirt-qemu:") for line in group.splitlines()):
            group += QEMU_GROUP
        (self.root / "passwd").write_text(passwd)
        (self.root / "group").write_text(group)
        # The other mount points are libvirt's and QEMU's own directories
        # (empty or absent where no libvirtd ever ran): created if missing.
        lines = ["set -e", "mount --make-rprivate /"]
        self.cache.mkdir(parents=True, exist_ok=True)
        for target, sub in BINDS.items():
            source = self.cache if sub == "cache" else self.root / sub
            bind = f"mount --bind {source} {target}"
            if target in OPTIONAL_BINDS:
                lines.append(f"if [ -d {target} ]; then {bind}; fi")
            else:
                lines += [f"mkdir -p {target}", bind]
        lines.append(f"mount --bind {self.root / 'passwd'} /etc/passwd")
        lines.append(f"mount --bind {self.root / 'group'} /etc/group")
        lines.append(f'exec {self.libvirtd} -f {self.root / "etc" / "libvirtd.conf"}')
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 90.0) -> "LibvirtDaemon":
        """Start libvirtd and return once ``virsh version`` answers (it probes QEMU first)."""
        script = self._prepare()
        self._out = open(self.root / "libvirtd.out", "wb")
        # unshare and sh exec: the Popen pid is libvirtd's own.
        self._proc = subprocess.Popen([self.unshare, "--mount", "sh", "-c", script],
                                      stdin=subprocess.DEVNULL, stdout=self._out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self._proc.poll() is not None:
                raise LibvirtError(self.explain(f"libvirtd exited ({self._proc.returncode})"))
            if time.monotonic() > deadline:
                raise LibvirtError(self.explain(f"no {self.socket} after {timeout:.0f}s"))
            time.sleep(0.1)
        self.virsh("version", timeout=max(deadline - time.monotonic(), 10))
        return self

    def virsh(self, *args: str, check: bool = True, timeout: float = 60.0
              ) -> subprocess.CompletedProcess:
        """Run ``virsh -c URI ARGS``; with ``check`` a failure raises :class:`LibvirtError`."""
        cmd = [self.virsh_path, "-q", "-c", self.uri, *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise LibvirtError(self.explain(
                f"virsh {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}"))
        return done

    def pids(self) -> dict[str, int]:
        """Pid file name -> pid for everything libvirt started that still runs."""
        found = {}
        for path in sorted(self.run_dir().glob("*.pid")) if self.run_dir().is_dir() else []:
            try:
                pid = int(path.read_text().strip())
            except (OSError, ValueError):
                continue
            if path.name != "driver.pid" and _alive(pid):
                found[path.name] = pid
        return found

    def stop(self) -> None:
        """Destroy the remaining domains, stop libvirtd, kill what it left behind."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            listed = self.virsh("list", "--name", check=False, timeout=30)
            for name in listed.stdout.split():
                self.virsh("destroy", name, check=False, timeout=30)
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for pid in self.pids().values():  # QEMU or a back-end this daemon started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._out:
            self._out.close()
            self._out = None
        self._proc = None

    def log_tail(self, lines: int = 30) -> str:
        text = ""
        for path in (self.root / "libvirtd.out", self.log):
            if path.exists():
                text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def explain(self, message: str) -> str:
        return f"{message}\n--- libvirtd log ({self.log}) ---\n{self.log_tail()}"


def domain_xml(name: str, kernel: Path, initrd: Path, console: Path, devices: str = "", *,
               kvm: bool = False, memory_mb: int = 512, cpus: int = 1, append: str = "",
               firmware: str | None = None, emulator: str | None = None) -> str:
    """A domain booting ``kernel``/``initrd`` directly, serial 0 written to ``console``.

    Guest RAM is a shared memfd (what vhost-user needs). ``<acpi/>`` must be
    explicit: without it libvirt 9 passes ``-no-acpi``, which QEMU 10 removed.
    USB and the balloon are off (-nodefaults as in GuestVM). ``devices`` is
    raw XML for the devices under test.
    """
    loader = f"<loader type='rom'>{escape(firmware)}</loader>" if firmware else ""
    cpu = "<cpu mode='host-passthrough'/>" if kvm else "<cpu mode='maximum'/>"
    emu = f"<emulator>{escape(emulator)}</emulator>" if emulator else ""
    cmdline = " ".join(["console=ttyS0 panic=-1 quiet", append]).strip()
    return f"""<domain type='{"kvm" if kvm else "qemu"}'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mb}</memory>
  <vcpu>{cpus}</vcpu>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    {loader}
    <kernel>{escape(str(kernel))}</kernel>
    <initrd>{escape(str(initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  {cpu}
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    {emu}
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
    <serial type='file'><source path={quoteattr(str(console))}/><target port='0'/></serial>
    {devices}
  </devices>
</domain>
"""


class _DomainProcess:
    """The Popen calls GuestVM makes, answered for a QEMU that libvirt started."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not _alive(self.pid):
            self.returncode = 0  # libvirt reaped it; its status is not ours to read
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"domain pid {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode


class LibvirtGuest(GuestVM):
    """A harness guest whose QEMU libvirt starts: ``start``/``wait_for_marker``/``wait``.

    ``devices`` is the domain XML for the devices under test. The guest
    powers off at the end of its script; libvirt then stops QEMU (and any
    back-end it started for the domain).
    """

    def __init__(self, daemon: LibvirtDaemon, name: str, kernel: GuestKernel,
                 initramfs: Initramfs, workdir: Path, devices: str = "", *,
                 emulator: str | None = None, **kwargs) -> None:
        super().__init__(kernel, initramfs, workdir, qemu=emulator, **kwargs)
        self.daemon = daemon
        self.name = name
        self.devices = devices
        self.xml_path = self.workdir / "domain.xml"

    def start(self, script: str, layers: tuple[str, ...] | None = None) -> None:
        if self._proc is not None:
            raise ValueError("LibvirtGuest.start() called twice; make a new one")
        self._token = secrets.token_hex(6)
        initrd = boot_initrd(self.initramfs, script, self._token,
                             self.workdir / "initrd.cpio", layers)
        kvm = (self.accel == "kvm" if self.accel else
               kvm_usable(self.kernel, self.initramfs, self.qemu))
        self.xml_path.write_text(domain_xml(
            self.name, self.kernel.image, initrd, self.console, self.devices, kvm=kvm,
            memory_mb=self.memory_mb, cpus=self.cpus,
            append=" ".join([self.append, os.environ.get("VHOST_USER_TEST_GUEST_APPEND", "")]),
            firmware=_pick_firmware(self.firmware), emulator=self.qemu))
        self.console.write_bytes(b"")
        self._started = time.monotonic()
        self.daemon.virsh("create", str(self.xml_path))
        pidfile = self.daemon.run_dir() / f"{self.name}.pid"
        self._proc = _DomainProcess(int(pidfile.read_text().strip()))

    @property
    def command(self) -> list[str]:
        """QEMU's argv as libvirt built it (from /proc while it runs)."""
        return process_cmdline(self._proc.pid) if self._proc else []

    def qmp(self, command: str, **arguments) -> object:
        raise NotImplementedError("use daemon.virsh('qemu-monitor-command', ...)")

    def kill(self) -> None:
        if self.running:
            self.daemon.virsh("destroy", self.name, check=False)
            self._proc.wait(timeout=30)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self._sockdir, ignore_errors=True)
        (self.workdir / "initrd.cpio").unlink(missing_ok=True)

    def _explain(self, message: str) -> str:
        log = self.daemon.domain_log(self.name)
        qemu_log = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        return "\n".join([message, f"--- console tail ({self.console}) ---", self.console_tail(),
                          f"--- libvirt's QEMU log ({log}) ---", qemu_log,
                          "--- libvirtd log ---", self.daemon.log_tail(15)])

