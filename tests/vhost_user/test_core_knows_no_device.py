"""The generic queue core names no device (issue 16): Virtqueue drives every queue
handler through the engine protocol (vhost_user/engine.py), and the device engines
live in backends/<dev>/.  Checked on the source files by AST scan, and by running a
device-less engine through a real Virtqueue.  On the C side: the builders compile
from csrc/ only the core, every C file that defines a device's symbols sits in that
device's folder, and the builders find it there (backends/<dev>/native.json)."""
from __future__ import annotations

import ast
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from ringlayout import SplitRing
from vhost_user.engine import Engine
from vhost_user.virtqueue import Virtqueue

REPO = Path(__file__).resolve().parents[2]
CORE = [REPO / "vhost_user" / "virtqueue.py", REPO / "vhost_user" / "engine.py",
        REPO / "vhost_user" / "chain.py", REPO / "vhost_user" / "frontend" / "driver_ring.py"]
#: device C symbols, device side and driver side (backends/<dev>/*.c)
DEVICE_C_PREFIXES = ("vr_blk_", "vr_net_", "vs_", "drv_blk_", "drv_net_", "drv_vsock_", "drv_bench_",
                     "DRV_VSOCK_")
#: the C names each device owns, device side and driver side (backends/<dev>/*.c, *.h)
DEVICE_C_NAMES = {
    "blk": ("vr_blk_", "drv_blk_", "drv_bench_", "virtio_blk_"),
    "net": ("vr_net_", "drv_net_"),
    "vsock": ("vs_", "drv_vsock_"),
}


def device_engine_classes() -> set[str]:
    """Every class defined in a device's engine or fast-path module, plus the historic names."""
    names = {"BlkEngine", "NetSwitch", "NetTxEngine", "NetRxQueue"}
    for path in (REPO / "backends").glob("*/*.py"):
        if path.stem in ("engine", "fastpath"):
            tree = ast.parse(path.read_text(), str(path))
            names |= {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    return names


def violations(source: str, engines: set[str]) -> list[str]:
    """What in `source` names a device: backends imports, engine classes, device C symbols."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if mod.split(".")[:2] == ["vhost_user", "backends"] or mod.split(".")[0] == "backends":
                found.append(f"line {node.lineno}: from {mod} import")
            for a in node.names:
                if a.name in engines or a.name == "backends":
                    found.append(f"line {node.lineno}: imports {a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[:2] == ["vhost_user", "backends"] or a.name.split(".")[0] == "backends":
                    found.append(f"line {node.lineno}: import {a.name}")
        elif isinstance(node, ast.Name) and node.id in engines:
            found.append(f"line {node.lineno}: names {node.id}")
        elif isinstance(node, ast.Attribute) and (node.attr in engines
                                                  or node.attr.startswith(DEVICE_C_PREFIXES)):
            found.append(f"line {node.lineno}: names .{node.attr}")
        elif isinstance(node, ast.ClassDef) and node.name in engines:
            found.append(f"line {node.lineno}: defines {node.name}")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and node.value.startswith(DEVICE_C_PREFIXES)):
            found.append(f"line {node.lineno}: names C symbol {node.value!r}")
    return found


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_core_module_names_no_device_engine_and_imports_no_backend(path):
    engines = device_engine_classes()
    assert {"BlkEngine", "NetTxEngine", "NetRxQueue", "NetSwitch", "ConnTable"} <= engines
    assert violations(path.read_text(), engines) == []


def test_the_scan_finds_what_the_core_used_to_hold():
    old = (
        "from vhost_user.backends.blk.engine import BlkEngine\n"
        "import backends.net\n"
        "class NetSwitch: pass\n"
        "def start(h):\n"
        "    if isinstance(h, NetRxQueue): h._attach(None)\n"
        "    fn = ffi.addressof(lib, 'vr_blk_handle')\n"
        "    lib.vs_tx_burst(None)\n"
    )
    found = violations(old, device_engine_classes())
    assert len(found) == 7, found


class RecordingEngine(Engine):
    """A device-less, worker-less engine: records what the queue asks of it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.seen: Virtqueue | None = None

    def bind(self, vq):
        self.calls.append("bind")
        self.seen = vq
        return None

    def detach(self):
        self.calls.append("detach")

    def unbind(self):
        self.calls.append("unbind")

    def lock(self):
        self.calls.append("lock")

    def unlock(self):
        self.calls.append("unlock")

    @property
    def stats(self):
        return {"recorded": len(self.calls)}


def test_a_new_engine_plugs_in_without_touching_the_core(ram, eventfd):
    ring = SplitRing(ram, 16)
    vq = Virtqueue(0)
    ring.setup(vq)
    memory = ram.memory()
    engine = RecordingEngine()
    vq.start(memory, engine)
    try:
        assert engine.seen is vq and vq.started
        assert vq.chain_buffer is not None and vq.native_queue is not None
        vq.set_call(eventfd())          # a control-plane change on a worker-less queue
        assert engine.calls == ["bind", "lock", "unlock"]
        assert vq.stats["recorded"] == 3
        vq.stop()
        assert engine.calls == ["bind", "lock", "unlock", "detach", "unbind"]
        assert vq.chain_buffer is None
        vq.set_call(eventfd())          # stopped: no lock needed
        assert engine.calls[-1] == "unbind"
    finally:
        vq.close()
        memory.close()


def test_popped_chain_is_the_chain_the_last_pop_filled(ram):
    ring = SplitRing(ram, 8)
    rd, wr = ram.alloc(24), ram.alloc(40)
    vq = Virtqueue(0)
    ring.setup(vq)
    memory = ram.memory()
    vq.start(memory)
    try:
        ring.publish(ring.add_chain([(rd, 24)], [(wr, 40)]))
        chain = vq.pop()
        again = vq.popped_chain()
        assert (again.head, again.readable, again.writable) == (chain.head, chain.readable,
                                                               chain.writable)
        assert again.read_len == 24 and again.write_len == 40
    finally:
        vq.close()
        memory.close()


# ---- the C side ---------------------------------------------------------------------

_C_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_C_FUNC_DEF = re.compile(r"\b([A-Za-z_]\w*)\s*\([^;{}]*\)\s*\{")
_C_STRUCT_DEF = re.compile(r"\bstruct\s+([A-Za-z_]\w*)\s*\{")


def c_definitions(text: str) -> set[str]:
    """The functions and structs a C file defines (not those it only declares or calls)."""
    text = _C_COMMENT.sub(" ", text)
    return {m.group(1) for m in _C_FUNC_DEF.finditer(text)} | {m.group(1) for m in _C_STRUCT_DEF.finditer(text)}


def owner(name: str) -> str | None:
    """The device whose C `name` belongs to, or None for a core name."""
    return next((dev for dev, prefixes in DEVICE_C_NAMES.items()
                 if name.startswith(prefixes) or name + "_" in prefixes), None)


def device_names_in(path: Path) -> dict[str, set[str]]:
    """device -> the names of that device `path` defines."""
    found: dict[str, set[str]] = {}
    for name in c_definitions(path.read_text()):
        if (dev := owner(name)) is not None:
            found.setdefault(dev, set()).add(name)
    return found


def load_builder(name: str):
    """csrc/<name>.py as the build runs it (it imports its helpers from csrc/)."""
    spec = importlib.util.spec_from_file_location(f"_test_{name}", REPO / "csrc" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BUILDERS = ["build_native", "build_driver"]
C_FILES = sorted(p for p in REPO.glob("**/*.[ch]")
                 if not {".git", "build"} & set(p.relative_to(REPO).parts)
                 and p.relative_to(REPO).parts[:2] != ("csrc", "fuzz"))  # harnesses: core + device, like tests


def test_the_c_scan_finds_device_definitions_and_ignores_declarations_and_calls():
    text = """/* struct vr_blk { in a comment } */
struct vr_blk { int fd; };
int vr_blk_handle(void *ctx, struct vr_queue *q);
static int blk_one(struct vr_blk *b) { return vr_blk_handle(b, 0); }
uint64_t drv_bench_area_size(uint32_t a, uint32_t b)
{
    if (a) { return vs_helper(a); }
    return 0;
}
"""
    assert {n for n in c_definitions(text) if owner(n)} == {"vr_blk", "drv_bench_area_size"}


@pytest.mark.parametrize("builder", BUILDERS)
def test_the_builders_compile_from_csrc_no_device_c(builder):
    """On main before issue 16 this failed: csrc/blk.c, net.c, vsock.c, drvnet.c, ... were core sources."""
    mod = load_builder(builder)
    core = [REPO / s for s in mod.SOURCES if s.startswith("csrc/")]
    core += [Path(h) for h in mod.HEADERS if Path(h).parent == REPO / "csrc"]
    assert core, f"{builder} compiles nothing from csrc/"
    held = {p.name: device_names_in(p) for p in core}
    assert {name: names for name, names in held.items() if names} == {}


@pytest.mark.parametrize("path", C_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_c_file_that_defines_a_device_name_sits_in_that_device_folder(path):
    devices = set(device_names_in(path))
    rel = path.relative_to(REPO)
    if rel.parts[0] == "backends":
        assert devices <= {rel.parts[1]}, f"{rel} defines C of {sorted(devices - {rel.parts[1]})}"
    else:
        assert devices == set(), f"{rel} is outside backends/ but defines C of {sorted(devices)}"


def test_some_c_file_defines_each_device_name_family():
    """The scan above is not vacuous: every device's names are defined somewhere."""
    seen: set[str] = set()
    for path in C_FILES:
        seen |= set(device_names_in(path))
    assert seen == set(DEVICE_C_NAMES)


def test_every_device_c_file_is_built_from_its_native_json_and_nothing_is_left_out():
    """The builders compile the core plus exactly what backends/*/native.json names."""
    built = set()
    for builder in BUILDERS:
        mod = load_builder(builder)
        built |= set(mod.SOURCES)
        for h in mod.HEADERS:
            assert Path(h).is_file(), h
    listed = set()
    for spec in REPO.glob("backends/*/native.json"):
        folder = spec.parent.relative_to(REPO)
        for part in json.loads(spec.read_text()).values():
            listed |= {str(folder / s) for s in part["sources"]}
    on_disk = {str(p.relative_to(REPO)) for p in REPO.glob("backends/*/*.c")}
    assert on_disk and on_disk == listed
    assert {s for s in built if s.startswith("backends/")} == listed


def _native_parts():
    if "native_parts" not in sys.modules:
        load_builder("build_native")   # puts csrc/ on sys.path and imports it as the build does
    return sys.modules["native_parts"]


def test_a_new_device_folder_with_native_json_is_found_without_touching_csrc(tmp_path):
    parts = _native_parts()
    dev = tmp_path / "backends" / "demo"
    dev.mkdir(parents=True)
    (dev / "demo.c").write_text("int vr_demo(void) { return 0; }\n")
    (dev / "demo.h").write_text("/* cdef-begin */\nint vr_demo(void);\n/* cdef-end */\n")
    (tmp_path / "backends" / "plain").mkdir()        # a device without C
    (dev / "native.json").write_text(json.dumps({"engine": {"sources": ["demo.c"], "headers": ["demo.h"]}}))
    (found,) = parts.device_parts("engine", str(tmp_path / "backends"))
    assert found.device == "demo" and found.sources[0].endswith("demo/demo.c")
    assert parts.device_parts("driver", str(tmp_path / "backends")) == []


@pytest.mark.parametrize("spec, reason", [
    ({"engine": {"sources": ["gone.c"]}}, "engine.sources: gone.c does not exist"),
    ({"engine": {"sources": ["../x.c"]}}, "is not a file name"),
    ({"engine": {"sources": []}}, "engine.sources: empty"),
    ({"engine": {"sources": ["demo.c"], "flags": []}}, "unknown key 'flags'"),
    ({"python": {}}, "unknown part 'python'"),
    ({"engine": {"sources": "demo.c"}}, "not a list of file names"),
])
def test_a_bad_native_json_is_one_error_naming_the_file(tmp_path, spec, reason):
    parts = _native_parts()
    dev = tmp_path / "backends" / "demo"
    dev.mkdir(parents=True)
    (dev / "demo.c").write_text("\n")
    (dev / "native.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError) as e:
        parts.device_parts("engine", str(tmp_path / "backends"))
    assert str(e.value).startswith(f"{dev / 'native.json'}: ") and reason in str(e.value)
