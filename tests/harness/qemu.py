"""``GuestVM``: one QEMU process booting the harness kernel and initramfs.

Theory of operation
-------------------
vhost-user hands guest memory to the back-end as file descriptors, so the
guest's RAM must be a shareable file: ``memory-backend-memfd,share=on``
bound to the only NUMA node. The machine is q35 with ``-nodefaults``, no
NIC, no display; the first serial port writes to ``console.log`` (the only
channel the guest talks on) and a QMP socket lets a test inspect or stop the
machine. ``-no-reboot`` plus ``panic=-1`` turns a guest panic into a QEMU
exit instead of a reboot loop.

The kernel is booted directly (``-kernel``/``-initrd``). With qboot as the
BIOS (when the QEMU package ships it and it boots) the firmware does no disk
probing; SeaBIOS would first try every virtio disk, i.e. the device under
test, before Linux even starts.

Acceleration is TCG unless ``kvm_usable()`` has proven that a real boot
under KVM reaches the end of a script: /dev/kvm existing is not enough (on
some hosts KVM_RUN fails on an unmodified kernel). The answer is cached per
host kernel, QEMU version and guest kernel. $VHOST_USER_TEST_ACCEL=tcg|kvm
overrides it. The kernel runs ``quiet`` (warnings and errors still reach the
console log); $VHOST_USER_TEST_GUEST_APPEND adds kernel arguments, e.g.
``loglevel=7`` when debugging a driver.

The test script's lifecycle is ``start(script)`` → optional
``wait_for_marker(name)`` while the host acts (kill a back-end, restart it)
→ ``wait()``; ``run(script)`` does all three. Every failure message carries
the tail of the console log. QEMU runs in its own session, and only that
process group is ever signalled.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .cache import cache_root, short_hash
from .initramfs import Initramfs, boot_initrd
from .kernel import GuestKernel

__all__ = ["GuestError", "GuestResult", "GuestVM", "kvm_usable", "qemu_binary_path",
           "short_tempdir"]

ENV_ACCEL = "VHOST_USER_TEST_ACCEL"
ENV_QEMU = "VHOST_USER_TEST_QEMU"
ENV_APPEND = "VHOST_USER_TEST_GUEST_APPEND"  # e.g. "loglevel=7" to see every kernel line
QBOOT = Path("/usr/share/qemu/qboot.rom")
CONSOLE_TAIL_LINES = 40


class GuestError(AssertionError):
    """The guest did not complete its script (timeout, QEMU exit, bad status).

    An AssertionError so that pytest reports it as a test failure with the
    console tail, not as an error in the harness.
    """


@dataclass
class GuestResult:
    """What a script printed between the markers, and how it ended."""

    output: str
    status: int | None
    qemu_returncode: int | None
    elapsed: float
    console: Path
    boot_seconds: float | None = None
    marks: dict[str, float] = field(default_factory=dict)

    @property
    def lines(self) -> list[str]:
        return self.output.splitlines()


def qemu_binary_path() -> str | None:
    """``qemu-system-x86_64`` from $VHOST_USER_TEST_QEMU or PATH, or None."""
    return os.environ.get(ENV_QEMU) or shutil.which("qemu-system-x86_64")


def short_tempdir(prefix: str = "vhu-") -> Path:
    """A fresh directory under /tmp for Unix sockets.

    ``sun_path`` holds 107 bytes; pytest's tmp_path for a parametrized test
    easily exceeds that, and bind() then fails with a confusing error.
    """
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class _Qmp:
    """A blocking QMP client: one command at a time, events skipped."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(str(path))
        self._file = self._sock.makefile("rwb")
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        while True:
            line = self._file.readline()
            if not line:
                raise GuestError("QMP connection closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def execute(self, command: str, **arguments) -> object:
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._file.write(json.dumps(msg).encode() + b"\n")
        self._file.flush()
        reply = self._read()
        if "error" in reply:
            raise GuestError(f"QMP {command} failed: {reply['error']}")
        return reply.get("return")

    def close(self) -> None:
        self._file.close()
        self._sock.close()


class GuestVM:
    """A q35 guest running one shell script from the harness initramfs.

    Build it, add devices (``add_vhost_user_blk``, ``add_args``), then
    ``run(script)`` or ``start(script)``/``wait_for_marker``/``wait``.
    Always ``close()`` it (the ``guest_vm`` fixture does).
    """

    def __init__(self, kernel: GuestKernel, initramfs: Initramfs, workdir: Path, *,
                 qemu: str | None = None, memory_mb: int = 512, cpus: int = 1,
                 accel: str | None = None, append: str = "", firmware: str | None = "auto"
                 ) -> None:
        self.kernel = kernel
        self.initramfs = initramfs
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.qemu = qemu or qemu_binary_path()
        if not self.qemu:
            raise GuestError("qemu-system-x86_64 not found; run tools/install-test-deps.sh")
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.accel = accel
        self.append = append
        self.firmware = firmware
        self.console = self.workdir / "console.log"
        self._sockdir = short_tempdir("vhu-vm-")
        self.qmp_path = self._sockdir / "qmp.sock"
        self._extra: list[str] = []
        self._ndev = 0
        self._proc: subprocess.Popen | None = None
        self._argv: list[str] = []
        self._qmp: _Qmp | None = None
        self._token = ""
        self._started = 0.0
        self._seen = ""
        self._pos = 0
        self.marks: dict[str, float] = {}

    # -- configuration -------------------------------------------------
    def add_args(self, *args: str) -> None:
        """Append raw QEMU arguments (for devices the helpers do not cover)."""
        self._extra.extend(args)

    def add_vhost_user_blk(self, socket_path: str | Path, *, num_queues: int = 1,
                           reconnect_ms: int | None = None, **props: object) -> str:
        """Add a vhost-user-blk-pci device on ``socket_path``; return its device id.

        ``reconnect_ms`` makes QEMU reconnect to a restarted back-end (QEMU
        >= 9.2 spells it ``reconnect-ms``). Extra ``props`` become device
        properties (``queue_size=256``, ``config_wce="off"``...).
        """
        self._ndev += 1
        chardev, dev = f"vublk{self._ndev}", f"vublkdev{self._ndev}"
        spec = f"socket,id={chardev},path={socket_path}"
        if reconnect_ms is not None:
            spec += f",reconnect-ms={reconnect_ms}"
        device = f"vhost-user-blk-pci,id={dev},chardev={chardev},num-queues={num_queues}"
        device += "".join(f",{k.replace('_', '-')}={v}" for k, v in props.items())
        self._extra += ["-chardev", spec, "-device", device]
        return dev

    @property
    def command(self) -> list[str]:
        """QEMU's argv as this harness started it (empty before start)."""
        return self._argv

    def command_line(self, initrd: Path) -> list[str]:
        """The full QEMU argv for booting ``initrd`` (public for debugging)."""
        accel = self.accel or ("kvm" if kvm_usable(self.kernel, self.initramfs,
                                                    self.qemu) else "tcg")
        mem = f"{self.memory_mb}M"
        cmd = [
            self.qemu,
            "-machine", f"q35,accel={accel}",
            "-cpu", "max" if accel == "tcg" else "host",
            "-smp", str(self.cpus),
            "-m", mem,
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-numa", "node,memdev=mem",
            "-nodefaults", "-no-user-config", "-display", "none", "-nic", "none",
            "-no-reboot",
            "-chardev", f"file,id=con,path={self.console}",
            "-serial", "chardev:con",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-kernel", str(self.kernel.image),
            "-initrd", str(initrd),
            "-append", " ".join(["console=ttyS0 panic=-1 quiet", self.append,
                                 os.environ.get(ENV_APPEND, "")]).strip(),
        ]
        firmware = _pick_firmware(self.firmware)
        if firmware:
            cmd += ["-bios", firmware]
        return cmd + self._extra

    # -- lifecycle -----------------------------------------------------
    def start(self, script: str, layers: tuple[str, ...] | None = None) -> None:
        """Boot the guest to run ``script`` (busybox sh) and return at once.

        ``layers`` names optional initramfs layers (``("fio",)``); by default
        those whose tools the script mentions are added.
        """
        if self._proc is not None:
            raise ValueError("GuestVM.start() called twice; make a new GuestVM")
        self._token = secrets.token_hex(6)
        initrd = boot_initrd(self.initramfs, script, self._token,
                             self.workdir / "initrd.cpio", layers)
        cmd = self.command_line(initrd)
        self._argv = cmd
        (self.workdir / "qemu-cmdline.txt").write_text(" ".join(cmd) + "\n")
        self.console.write_bytes(b"")
        self._stderr = open(self.workdir / "qemu-stderr.log", "wb")
        self._started = time.monotonic()
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._stderr,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    def _poll_console(self) -> str:
        with open(self.console, "rb") as handle:
            handle.seek(self._pos)
            chunk = handle.read()
        self._pos += len(chunk)
        self._seen += chunk.decode("utf-8", "replace").replace("\r", "")
        return self._seen

    def _wait_for(self, pattern: re.Pattern, timeout: float, what: str) -> re.Match:
        if self._proc is None:
            raise ValueError("GuestVM not started")
        deadline = time.monotonic() + timeout
        while True:
            match = pattern.search(self._poll_console())
            if match:
                return match
            if self._proc.poll() is not None:
                match = pattern.search(self._poll_console())
                if match:
                    return match
                raise GuestError(self._explain(
                    f"QEMU exited ({self._proc.returncode}) before {what}"))
            if time.monotonic() > deadline:
                self.kill()
                raise GuestError(self._explain(f"timed out after {timeout:.0f}s waiting for {what}"))
            time.sleep(0.05)

    def wait_for_marker(self, name: str, timeout: float = 60.0) -> float:
        """Block until the script ran ``vhu_mark NAME``; return seconds since start."""
        self._wait_for(re.compile(re.escape(f"@@VHU-MARK:{self._token}:{name}@@")),
                       timeout, f"marker {name!r}")
        self.marks[name] = time.monotonic() - self._started
        return self.marks[name]

    def wait_for_line(self, regex: str, timeout: float = 30.0) -> re.Match:
        """Block until a console line matches ``regex``; return the match.

        The script's own output reaches the console through ``tee`` while
        ``vhu_mark`` writes to /dev/console directly, so a line echoed just
        before a marker may still be on its way when the marker is seen.
        """
        return self._wait_for(re.compile(rf"^{regex}$", re.M), timeout, f"a line {regex!r}")

    def wait(self, timeout: float = 120.0, check: bool = True) -> GuestResult:
        """Wait for the script to end; with ``check``, raise GuestError unless it exited 0."""
        end = re.compile(
            rf"@@VHU-BEGIN:{self._token}@@\n(.*?)@@VHU-END:{self._token}:(\d+)@@", re.S)
        match = self._wait_for(end, timeout, "the end of the script")
        elapsed = time.monotonic() - self._started
        try:
            self._proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()
        result = GuestResult(output=match.group(1), status=int(match.group(2)),
                             qemu_returncode=self._proc.returncode, elapsed=elapsed,
                             console=self.console, boot_seconds=_boot_seconds(self._seen),
                             marks=dict(self.marks))
        if check and result.status != 0:
            raise GuestError(self._explain(
                f"guest script exited {result.status}; its output:\n{result.output}"))
        return result

    def run(self, script: str, timeout: float = 120.0, check: bool = True,
            layers: tuple[str, ...] | None = None) -> GuestResult:
        """Boot, run ``script`` to completion, power off; see ``start`` and ``wait``."""
        self.start(script, layers)
        return self.wait(timeout=timeout, check=check)

    def qmp(self, command: str, **arguments) -> object:
        """Execute one QMP command on the running guest and return its result."""
        if self._qmp is None:
            self._qmp = _Qmp(self.qmp_path)
        return self._qmp.execute(command, **arguments)

    @property
    def pid(self) -> int | None:
        """QEMU's pid (also its process-group id), once started."""
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """SIGKILL QEMU's process group (only the one this object started)."""
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait()

    def close(self) -> None:
        """Stop QEMU if it still runs and release sockets and files."""
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "_stderr", None):
            self._stderr.close()
        shutil.rmtree(self._sockdir, ignore_errors=True)
        # Up to ~100 MB per boot; pytest keeps three sessions of tmp_path.
        (self.workdir / "initrd.cpio").unlink(missing_ok=True)

    def __enter__(self) -> "GuestVM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- diagnostics ---------------------------------------------------
    def console_tail(self, lines: int = CONSOLE_TAIL_LINES) -> str:
        """The last ``lines`` lines of the serial console (what a failure shows)."""
        text = self.console.read_bytes().decode("utf-8", "replace").replace("\r", "")
        return "\n".join(text.splitlines()[-lines:])

    def _explain(self, message: str) -> str:
        stderr = ""
        path = self.workdir / "qemu-stderr.log"
        if path.exists():
            stderr = path.read_text(errors="replace").strip()[-2000:]
        parts = [message, f"--- console tail ({self.console}) ---", self.console_tail()]
        if stderr:
            parts += ["--- qemu stderr ---", stderr]
        return "\n".join(parts)


def _boot_seconds(console: str) -> float | None:
    """Guest uptime when /init started the script (from the kernel's own clock)."""
    match = re.search(r"@@VHU-UPTIME:([0-9.]+)@@", console)
    return float(match.group(1)) if match else None


@functools.cache
def _qboot_works(qemu: str) -> bool:
    # The file can be there with a QEMU that rejects it; ask QEMU itself.
    if not QBOOT.exists():
        return False
    probe = subprocess.run([qemu, "-machine", "q35,accel=tcg", "-bios", str(QBOOT),
                            "-nodefaults", "-display", "none", "-S", "-qmp", "stdio"],
                           input=b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
                           capture_output=True, timeout=30)
    return probe.returncode == 0


def _pick_firmware(choice: str | None) -> str | None:
    if choice in (None, "", "seabios"):
        return None
    if choice == "auto":
        qemu = qemu_binary_path()
        return str(QBOOT) if qemu and _qboot_works(qemu) else None
    return choice


_KVM_ANSWERS: dict[str, bool] = {}


def kvm_usable(kernel: GuestKernel, initramfs: Initramfs, qemu: str | None = None,
               timeout: float = 30.0) -> bool:
    """Whether a real guest boot under KVM reaches the end of a script.

    Boots once per (host kernel, QEMU, guest kernel) and caches the answer
    in memory and in the harness cache. $VHOST_USER_TEST_ACCEL forces it.
    """
    forced = os.environ.get(ENV_ACCEL, "").lower()
    if forced in ("tcg", "kvm"):
        return forced == "kvm"
    qemu = qemu or qemu_binary_path()
    if not qemu or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    version = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout
    key = short_hash(platform.release(), version, kernel.package, kernel.version)
    if key in _KVM_ANSWERS:
        return _KVM_ANSWERS[key]
    stamp = cache_root() / f"kvm-usable-{key}"
    if stamp.exists():
        answer = stamp.read_text().strip() == "yes"
    else:
        workdir = Path(tempfile.mkdtemp(prefix="vhu-kvm-probe-"))
        vm = GuestVM(kernel, initramfs, workdir, qemu=qemu, accel="kvm", memory_mb=256)
        try:
            answer = vm.run("echo kvm-ok", timeout=timeout, check=False).output.strip() == "kvm-ok"
        except GuestError:
            answer = False
        finally:
            vm.close()
        stamp.write_text("yes\n" if answer else "no\n")
        if answer:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            (cache_root() / f"kvm-probe-{key}.log").write_text(
                workdir.joinpath("console.log").read_text(errors="replace")[-4000:]
                + "\n--- qemu ---\n"
                + workdir.joinpath("qemu-stderr.log").read_text(errors="replace")[-4000:])
            shutil.rmtree(workdir, ignore_errors=True)
    _KVM_ANSWERS[key] = answer
    return answer
