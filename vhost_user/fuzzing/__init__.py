"""`vhost-user-fuzz`: coverage-guided fuzzing of the core and the back-ends.

Theory of operation
-------------------
A target is a function `run_one(data: bytes)` that interprets arbitrary
bytes (through `ByteReader`, so the same bytes always replay the same case)
and raises on a finding (AssertionError for a broken invariant, anything
else for an unexpected exception), plus `seeds()` for a starting corpus.
The core's own targets (codec, ring) live in this package; a device's
targets live in its folder (backends/<dev>/fuzz*.py) and are found through
the device registry (its spec.py names them), so a new back-end joins
without a line here. `TARGET_MODULES` is the union, looked up when first
used: under atheris that is inside the instrumentation, as the targets'
own imports must be.

The runner feeds a target with atheris (libFuzzer, Python coverage) for a
bounded time, or with a seeded mutation loop when atheris is not installed
(`--engine random`, clearly reported as not coverage-guided). Either way it
prints one summary line with the number of executions, which RELIABILITY.md
records. A finding is written to `crash-<sha1>` in the artifact directory
and replays with `vhost-user-fuzz TARGET --replay FILE`.

The C extension is not compiled with coverage instrumentation here (that
needs clang's -fsanitize=fuzzer-no-link); its code is exercised through the
Python API, and the sanitizer build (tools/build-sanitized.sh) catches its
memory errors.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import logging
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Callable

__all__ = ["Target", "TARGET_MODULES", "CORE_TARGETS", "target_modules", "load_targets", "main", "run_for"]

#: the core's targets; the devices' come from the registry (target_modules)
CORE_TARGETS = {
    "codec": "vhost_user.fuzzing.codec",
    "ring": "vhost_user.fuzzing.ring",
}
_targets: dict[str, str] = {}


def target_modules() -> dict[str, str]:
    """Every target: the core's, then each device's (by device name), name -> module."""
    if not _targets:
        from vhost_user import devices

        _targets.update(CORE_TARGETS)
        for name, module in devices.fuzz_targets().items():
            if name in _targets:
                raise ValueError(f"fuzz target {name!r} declared twice ({_targets[name]}, {module})")
            _targets[name] = module
    return _targets


def __getattr__(name: str):
    if name == "TARGET_MODULES":  # computed on first use, not at import (see the docstring)
        return target_modules()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Target:
    name: str
    run_one: Callable[[bytes], None]
    seeds: Callable[[], list[bytes]]
    summary: str


def load_targets(names=None) -> dict[str, Target]:
    """Import the target modules (inside atheris' instrumentation when active)."""
    out = {}
    modules = target_modules()
    for name in names or modules:
        mod = importlib.import_module(modules[name])
        summary = (mod.__doc__ or "").strip().splitlines()[0]
        out[name] = Target(name, mod.run_one, mod.seeds, summary)
    return out


def _corpus_inputs(dirs: list[str]) -> list[bytes]:
    found = []
    for d in dirs:
        if not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            path = os.path.join(d, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    found.append(f.read())
    return found


def _save_crash(artifacts: str, data: bytes) -> str:
    os.makedirs(artifacts, exist_ok=True)
    path = os.path.join(artifacts, "crash-" + hashlib.sha1(data).hexdigest())
    with open(path, "wb") as f:
        f.write(data)
    return path


def _mutate(rng: random.Random, data: bytes) -> bytes:
    """Byte flips, inserts, deletes, splices of interesting values (fallback engine)."""
    buf = bytearray(data or b"\0")
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(5)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[pos % len(buf)] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos:pos] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 16)))
        elif op == 2 and len(buf) > 1:
            del buf[pos:pos + rng.randint(1, 16)]
        elif op == 3:
            v = rng.choice((0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0xFFFFFFFF, 1 << 63))
            buf[pos:pos + 8] = v.to_bytes(8, "little")
        elif buf:
            buf[pos % len(buf)] = rng.getrandbits(8)
    return bytes(buf[:8192])


def run_for(target: Target, seconds: float, corpus: list[bytes], seed: int = 0) -> int:
    """Fallback engine: mutate corpus entries for `seconds`; returns executions.

    Raises the first finding (the input is attached as `exc.fuzz_input`).
    """
    rng = random.Random(seed)
    pool = list(corpus) or [b""]
    runs = 0
    deadline = time.monotonic() + seconds
    for data in pool:  # every corpus entry first, as libFuzzer does
        _run_checked(target, data)
        runs += 1
    while time.monotonic() < deadline:
        data = _mutate(rng, rng.choice(pool))
        _run_checked(target, data)
        runs += 1
        if rng.random() < 0.01 and len(pool) < 256:
            pool.append(data)
    return runs


def _run_checked(target: Target, data: bytes) -> None:
    try:
        target.run_one(data)
    except BaseException as exc:
        exc.fuzz_input = data
        raise


def _atheris_child(target_name: str, args, corpus_dirs: list[str]) -> None:
    """Runs in the child: libFuzzer owns the process and exits it."""
    import atheris

    with atheris.instrument_imports(include=["vhost_user"]):
        target = load_targets([target_name])[target_name]
    work = args.new_inputs  # new finds go here, not into the committed corpus
    argv = [sys.argv[0], f"-max_total_time={max(1, int(args.seconds))}",
            f"-artifact_prefix={os.path.abspath(args.artifacts)}/", "-print_final_stats=1",
            f"-max_len={args.max_len}", "-rss_limit_mb=1024", f"-seed={args.seed or 1}",
            work] + corpus_dirs
    atheris.Setup(argv, target.run_one)
    atheris.Fuzz()


def _atheris_main(target_name: str, args, corpus_dirs: list[str]) -> int:
    """Run libFuzzer in a child (it exits the process) and report its execution count."""
    import subprocess

    os.makedirs(args.artifacts, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f"fuzz-{target_name}-")  # removed below, whatever happens
    work = args.new_inputs or os.path.join(scratch, "new-inputs")
    os.makedirs(work, exist_ok=True)
    argv = [sys.executable, "-m", "vhost_user.fuzzing", target_name, "--child", "--new-inputs", work,
            "--seconds", str(args.seconds), "--artifacts", args.artifacts,
            "--max-len", str(args.max_len), "--seed", str(args.seed)]
    for d in corpus_dirs:
        argv += ["--corpus", d]
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, stderr=subprocess.PIPE, text=True, errors="replace",
                              env=dict(os.environ, VHOST_USER_FUZZ_TMP=scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    runs = None
    for line in proc.stderr.splitlines():
        if line.startswith("stat::number_of_executed_units:"):
            runs = int(line.split(":")[-1])
    sys.stderr.write(proc.stderr[-20000:] if args.verbose or proc.returncode else "")
    if proc.returncode != 0:
        print(f"vhost-user-fuzz: target {target_name}: FINDING (libFuzzer exit {proc.returncode}); "
              f"see crash-* in {args.artifacts}", file=sys.stderr)
        return 1
    print(f"vhost-user-fuzz: target {target_name}: {runs} executions in {time.monotonic() - start:.1f} s "
          f"(engine atheris, coverage-guided)", file=sys.stderr)
    return 0


def _default_corpus(name: str) -> list[str]:
    """fuzz/corpus/<target> of a source checkout (the committed seed corpus)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for root in (os.getcwd(), os.path.join(here, "..", "..")):
        d = os.path.join(root, "fuzz", "corpus", name)
        if os.path.isdir(d):
            return [os.path.abspath(d)]
    return []


def _parser(targets: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhost-user-fuzz", description=__doc__.splitlines()[0])
    p.add_argument("target", nargs="?", help=f"one of: {', '.join(targets)}")
    p.add_argument("--seconds", type=float, default=10.0, help="how long to fuzz (default 10)")
    p.add_argument("--corpus", action="append", default=[], metavar="DIR",
                   help="seed corpus directory (default fuzz/corpus/TARGET of the checkout)")
    p.add_argument("--engine", choices=["auto", "atheris", "random"], default="auto",
                   help="atheris when installed (auto), or the seeded mutation loop")
    p.add_argument("--artifacts", default=".", help="where crash-* files go (default .)")
    p.add_argument("--replay", nargs="+", metavar="FILE", help="run these inputs once and exit")
    p.add_argument("--write-seeds", metavar="DIR", help="write the target's built-in seeds to DIR")
    p.add_argument("--list", action="store_true", help="list the targets")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--max-len", type=int, default=8192, help="largest input (atheris)")
    p.add_argument("-v", "--verbose", action="store_true", help="show libFuzzer's output")
    p.add_argument("--new-inputs", metavar="DIR",
                   help="keep the inputs libFuzzer adds here (default: a temporary directory, removed)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    child = "--child" in argv  # libFuzzer's child: no target import before the instrumentation
    args = _parser([] if child else list(target_modules())).parse_args(argv)
    logging.disable(logging.CRITICAL)  # hostile inputs log one line each; keep the output readable
    if args.child:
        _atheris_child(args.target, args, args.corpus or _default_corpus(args.target))
        return 0
    if args.list:
        for t in load_targets().values():
            print(f"{t.name:12} {t.summary}")
        return 0
    if args.target not in target_modules():
        print(f"error: unknown target {args.target!r}; try --list", file=sys.stderr)
        return 2
    if args.write_seeds:
        target = load_targets([args.target])[args.target]
        os.makedirs(args.write_seeds, exist_ok=True)
        for data in target.seeds():
            with open(os.path.join(args.write_seeds, hashlib.sha1(data).hexdigest()[:16]), "wb") as f:
                f.write(data)
        return 0
    corpus_dirs = args.corpus or _default_corpus(args.target)
    if args.replay:
        target = load_targets([args.target])[args.target]
        for path in args.replay:
            with open(path, "rb") as f:
                target.run_one(f.read())
            print(f"vhost-user-fuzz: {path}: no finding", file=sys.stderr)
        return 0
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "random"
    if engine == "atheris":
        return _atheris_main(args.target, args, corpus_dirs)
    target = load_targets([args.target])[args.target]
    corpus = _corpus_inputs(corpus_dirs) or target.seeds()
    start = time.monotonic()
    try:
        runs = run_for(target, args.seconds, corpus, args.seed)
    except Exception as exc:
        path = _save_crash(args.artifacts, getattr(exc, "fuzz_input", b""))
        traceback.print_exc()
        print(f"vhost-user-fuzz: target {args.target}: finding saved to {path}", file=sys.stderr)
        return 1
    print(f"vhost-user-fuzz: target {args.target}: {runs} executions in {time.monotonic() - start:.1f} s "
          f"(engine random, NOT coverage-guided)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
