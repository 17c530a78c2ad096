"""The generic queue core names no device (issue 16): Virtqueue drives every queue
handler through the engine protocol (vhost_user/engine.py), and the device engines
live in backends/<dev>/.  Checked on the source files by AST scan, and by running a
device-less engine through a real Virtqueue."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ringlayout import SplitRing
from vhost_user.engine import Engine
from vhost_user.virtqueue import Virtqueue

REPO = Path(__file__).resolve().parents[2]
CORE = [REPO / "vhost_user" / "virtqueue.py", REPO / "vhost_user" / "engine.py"]
DEVICE_C_PREFIXES = ("vr_blk_", "vr_net_", "vs_")   # csrc/blk.c, net.c, vsock.c


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
