"""Every command README.md and BENCHMARKS.md give works as written from the repository root.

The commands are read from the documents themselves (the fenced `sh`
blocks), so a command added there is checked here without editing this
file. Each runs with the repository root as its working directory and no
PYTHONPATH, which is where a reader pastes them: the checkout's own
`vhost_user/` folder is then first on the import path and must resolve to
the installed package (issue 15, item 6).

- every `python3 tools/NAME.py` answers --help, and the blk side-by-side
  benchmark runs for real (short) and prints its table;
- every option a document passes to one of our programs is one that
  program's --help lists, so a renamed option cannot leave the docs stale;
- `python3 -m vhost_user.backends.DEV --help` works from the root.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from backends_proc import require_tool

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "BENCHMARKS.md"]
PROGRAMS = {"vhost-user-blk", "vhost-user-net", "vhost-user-vsock", "vhost-user-gpu", "vhost-user-bench"}


def _sh_lines(doc: str) -> list[str]:
    """The command lines of the document's ```sh blocks, continuations joined."""
    text = (REPO / doc).read_text()
    lines: list[str] = []
    for block in re.findall(r"```(?:sh|bash|console)\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _commands() -> list[tuple[str, list[str]]]:
    """(document, argv) for every simple command in the documents' shell lines."""
    found = []
    for doc in DOCS:
        for line in _sh_lines(doc):
            for part in re.split(r"&&|\|\||;|\||&(?!\d)", line):
                part = part.strip()
                if not part:
                    continue
                try:
                    argv = shlex.split(part)
                except ValueError:
                    continue
                while argv and "=" in argv[0] and not argv[0].startswith("-"):
                    argv = argv[1:]  # VAR=value prefixes
                if argv:
                    found.append((doc, argv))
    return found


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def _run(argv: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


TOOLS = sorted({argv[1] for _, argv in _commands()
                if argv[0] in ("python3", "python") and len(argv) > 1 and argv[1].startswith("tools/")})


def test_the_documents_give_tool_and_program_commands():
    """The extraction itself finds what the documents are known to contain."""
    assert "tools/bench_blk_vs_qsd.py" in TOOLS
    used = {argv[0] for _, argv in _commands()}
    assert {"vhost-user-blk", "vhost-user-bench", "vhost-user-gpu"} <= used


@pytest.mark.parametrize("tool", TOOLS)
def test_every_documented_tool_runs_from_the_repository_root(tool):
    assert (REPO / tool).is_file(), f"{tool} is named in the docs but does not exist"
    out = _run([sys.executable, tool, "--help"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout and "Traceback" not in out.stderr


def _help_options(prog: str, sub: str | None) -> set[str]:
    exe = shutil.which(prog)
    assert exe, f"{prog} is named in the docs but is not installed"
    argv = [exe] + ([sub] if sub else []) + ["--help"]
    out = _run(argv, timeout=60)
    assert out.returncode == 0, out.stderr
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", out.stdout))


def _documented_program_uses() -> list[tuple[str, str, str | None, list[str]]]:
    uses = []
    for doc, argv in _commands():
        if argv[0] not in PROGRAMS:
            continue
        sub = argv[1] if argv[0] == "vhost-user-bench" and len(argv) > 1 else None
        opts = [a.split("=")[0] for a in argv[1:] if a.startswith("-") and not re.match(r"^-\d", a)]
        uses.append((doc, argv[0], sub, opts))
    return uses


@pytest.mark.parametrize("use", _documented_program_uses(),
                         ids=lambda u: f"{u[0]}:{u[1]}{'-' + u[2] if u[2] else ''}")
def test_every_option_the_documents_pass_is_one_the_program_has(use):
    doc, prog, sub, opts = use
    known = _help_options(prog, sub)
    missing = [o for o in opts if o not in known]
    assert not missing, f"{doc} passes {missing} to {prog} {sub or ''}, which its --help does not list"


@pytest.mark.parametrize("dev", ["blk", "net", "vsock", "gpu"])
def test_module_entry_points_work_from_the_repository_root(dev):
    out = _run([sys.executable, "-m", f"vhost_user.backends.{dev}", "--help"], timeout=60)
    assert out.returncode == 0 and "usage:" in out.stdout, out.stderr[-2000:]


def test_the_blk_benchmark_runs_as_benchmarks_md_gives_it():
    """BENCHMARKS.md's first command, shortened (1 s, one round, 64 MiB), from the root."""
    require_tool("qemu-storage-daemon")
    (line,) = [argv for doc, argv in _commands() if doc == "BENCHMARKS.md"
               and argv[1:2] == ["tools/bench_blk_vs_qsd.py"] and "--qsd-aio" not in argv
               and "--dir" not in argv]
    argv = [sys.executable, line[1], "--runtime", "1", "--rounds", "1", "--size", str(64 << 20), "--markdown"]
    out = _run(argv, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [r for r in out.stdout.splitlines() if r.startswith("| 4k randread QD32 |")]
    assert rows, out.stdout[-2000:]
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert int(cells[1].replace(",", "")) > 0 and int(cells[2].replace(",", "")) > 0, rows[0]


def test_bench_all_runs_a_section_with_its_load_and_refuses_an_unknown_one():
    """tools/bench_all.py (BENCHMARKS.md's one command): a real section runs and reports
    the load around it; every section says what it needs; a wrong name is a usage error."""
    run = lambda *a: subprocess.run([sys.executable, "tools/bench_all.py", *a], cwd=REPO,
                                    capture_output=True, text=True, timeout=120)
    out = run("--quick", "--only", "syscall-floor")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "## syscall-floor" in out.stdout and out.stdout.count("load average") == 2
    assert "floor per 4k read request" in out.stdout, out.stdout
    listed = run("--list")
    assert listed.returncode == 0 and "net-testpmd: needs dpdk-testpmd" in listed.stdout
    bad = run("--only", "nonsense")
    assert bad.returncode == 2 and "no section 'nonsense'" in bad.stderr


def test_the_vsock_benchmark_runs_as_benchmarks_md_gives_it():
    """BENCHMARKS.md's vsock side-by-side command, shortened (one back-end, 0.3 s, one
    round, 4 KiB): both directions move bytes, and the ceilings and load of the run print."""
    lines = [argv for doc, argv in _commands() if doc == "BENCHMARKS.md"
             and argv[1:2] == ["tools/bench_vsock_backends.py"]]
    assert lines, "BENCHMARKS.md gives no tools/bench_vsock_backends.py command"
    argv = [sys.executable, lines[0][1], "--backend", "new=vhost-user-vsock", "--runtime", "0.3",
            "--rounds", "1", "--write-size", "4096", "--markdown"]
    out = _run(argv, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    (ceil,) = [line for line in out.stdout.splitlines() if line.startswith("ceilings: ")]
    assert "unix socket pair at 4 KiB" in ceil and "load average" in ceil, ceil
    for direction in ("guest-to-host", "host-to-guest"):
        (row,) = [r for r in out.stdout.splitlines() if r.startswith(f"| {direction} | 4 KiB | new |")]
        assert float(row.split("|")[4]) > 0, row


def test_the_net_virtio_user_benchmark_runs_as_benchmarks_md_gives_it():
    """BENCHMARKS.md's net command with DPDK's own virtio-user front-end, shortened
    (one round, 1 s, 64 B): testpmd's virtio-user ports get frames round through our
    switch and through DPDK's vhost PMD, and the table gives both and their ratio."""
    require_tool("dpdk-testpmd")
    lines = [argv for doc, argv in _commands() if doc == "BENCHMARKS.md"
             and argv[1:2] == ["tools/bench_net_virtio_user.py"]]
    assert lines, "BENCHMARKS.md gives no tools/bench_net_virtio_user.py command"
    argv = [sys.executable, lines[0][1], "--runtime", "1", "--rounds", "1", "--frame-size", "64"]
    out = _run(argv, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    (row,) = [r for r in out.stdout.splitlines() if r.startswith("| 64 B |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    ours, dpdk, ratio = cells[1], cells[2], cells[3]
    assert float(ours.split(" Mpps")[0]) > 0 and float(dpdk.split(" Mpps")[0]) > 0, row
    assert float(ratio) > 0, row
    assert out.stdout.count("load average") == 2, out.stdout
    (cl,) = [line for line in out.stdout.splitlines() if line.startswith("cache line per round: ")]
    assert float(cl.split(": ")[1].split(" ns")[0]) > 0, cl   # the machine's state, measured
