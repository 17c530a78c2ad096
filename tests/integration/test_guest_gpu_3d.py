"""Real GL clients in a Linux guest on vhost-user-gpu with virgl (QEMU 10, TCG).

The guest's initramfs carries Mesa's virgl driver and two clients from
Debian (the ``gl`` layer): glmark2-es2-drm renders off-screen (fps per
scene, GL_RENDERER), then kmscube draws its spinning cube on card0 and the
host takes QMP screendumps while it runs. "virgl" in GL_RENDERER proves the
guest's Mesa rendered through the back-end, not with its own llvmpipe.

Both back-ends get one boot each with the same guest command line:
``drm.edid_firmware=edid/800x600.bin`` (a built-in EDID: one 800x600 mode;
glmark2 on DRM always renders at the largest mode, and QEMU's EDID offers
5120x2160) and ``drm_kms_helper.fbdev_emulation=0`` (no fbdev console, so
nothing sets a scanout before the clients do; see below).

QEMU's /usr/lib/qemu/vhost-user-gpu --virgl cannot serve this host fully,
and the tests pin down why (contrib/vhost-user-gpu in QEMU 10):

* it calls virgl_renderer_init with USE_EGL | THREAD_SYNC, never
  USE_SURFACELESS, so virglrenderer needs a GBM device on a DRM render
  node; this host has no /dev/dri at all. Without --render-node it exits at
  SET_FEATURES ("Failed to initialize virgl"; the guest then waits for
  cap sets). Given ``--render-node /dev/null``, Mesa's libgbm falls back to
  its software screen and virgl starts on llvmpipe: 3D then works, which
  the glmark2 run proves (GL_RENDERER "virgl (LLVMPIPE ...)") and times.
* every SET_SCANOUT is sent to QEMU as a dma-buf
  (virgl_renderer_get_fd_for_texture), and a software GBM device cannot
  export one: the back-end aborts ("virgl_cmd_set_scanout: Assertion
  `fd >= 0' failed") at the first scanout, be it fbdev's or kmscube's. (Even
  with a dma-buf, QEMU's -display none has no GL console to show it.) So
  only our back-end, which reads each flushed scanout back and sends pixels,
  can put kmscube's frame in a screendump; for QEMU's the test asserts the
  abort instead.

Frame rates are printed (pytest -s) as one ``gl-fps`` line per back-end;
BENCHMARKS.md ("a GL client in a guest") records a run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from harness.fixtures import require_tool
from harness.guestgpu import KMSCUBE_BACKGROUND, gl_script, read_ppm
from harness.qemu import GuestVM, short_tempdir

pytestmark = pytest.mark.guest

QEMU_GPU = "/usr/lib/qemu/vhost-user-gpu"
APPEND = "drm.edid_firmware=edid/800x600.bin drm_kms_helper.fbdev_emulation=0"
WIDTH, HEIGHT = 800, 600
FRAMES = 1500  # kmscube runs ~5 s on ours under TCG: long enough for screendumps
MEMORY_MB = 1024  # the gl layer unpacks to ~200 MB


def _backend_argv(which: str, sock: str) -> list[str]:
    if which == "ours":
        return [sys.executable, "-m", "vhost_user.backends.gpu", "--socket-path", sock,
                "--virgl", "--verbose"]
    # /dev/null as "render node": libgbm falls back to its software screen (see above).
    return [require_tool(QEMU_GPU), "--socket-path", sock, "--virgl", "--render-node", "/dev/null"]


def _start_backend(argv: list[str], sock: str, log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd="/",
                                start_new_session=True)
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        assert proc.poll() is None, log_path.read_text(errors="replace")
        assert time.monotonic() < deadline, "back-end did not create its socket"
        time.sleep(0.05)
    time.sleep(0.2)  # bind() comes just before listen()
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _gpu_vm(guest_kernel, guest_initramfs, qemu_binary, workdir: Path, sock: str) -> GuestVM:
    vm = GuestVM(guest_kernel, guest_initramfs, workdir, qemu=qemu_binary, memory_mb=MEMORY_MB,
                 cpus=1, append=APPEND)
    vm.add_args("-chardev", f"socket,id=g0,path={sock}",
                "-device", f"vhost-user-gpu-pci,id=gpu0,chardev=g0,xres={WIDTH},yres={HEIGHT}")
    return vm


def cube_stats(shot: np.ndarray) -> dict:
    """What a kmscube frame looks like: grey background, a many-coloured cube."""
    px = shot.reshape(-1, 3).astype(int)
    grey = np.all((px >= KMSCUBE_BACKGROUND[0]) & (px <= KMSCUBE_BACKGROUND[1]), axis=1)
    cube = px[~grey]
    h, w = shot.shape[:2]
    centre = shot[h // 3:2 * h // 3, w // 3:2 * w // 3].reshape(-1, 3).astype(int)
    centre_grey = np.all((centre >= KMSCUBE_BACKGROUND[0]) & (centre <= KMSCUBE_BACKGROUND[1]),
                         axis=1)
    dominant = {c for c, name in enumerate("rgb")
                if len(cube) and np.mean(cube.argmax(axis=1) == c) > 0.05}
    return {"background": float(grey.mean()), "cube": float(1 - grey.mean()),
            "centre_cube": float(1 - centre_grey.mean()),
            "colours": int(len(np.unique(cube, axis=0))), "dominant": dominant}


def _looks_like_cube(stats: dict) -> bool:
    return (stats["background"] > 0.5 and 0.03 < stats["cube"] < 0.5
            and stats["centre_cube"] > 0.3 and stats["colours"] > 1000)


def _glmark2(text: str) -> dict:
    renderers = re.findall(r"GL_RENDERER:\s*(.+)", text)
    fps = {m.group(1): int(m.group(2))
           for m in re.finditer(r"\[(\w+)\] duration=\d+: FPS: (\d+)", text)}
    return {"renderer": renderers[0].strip() if renderers else "", "fps": fps}


def _kmscube(text: str) -> dict:
    renderer = re.search(r'renderer: "([^"]*)"', text)
    runs = re.findall(r"Rendered (\d+) frames in ([\d.]+) sec \(([\d.]+) fps\)", text)
    return {"renderer": renderer.group(1) if renderer else "",
            "frames": int(runs[-1][0]) if runs else 0,
            "fps": float(runs[-1][2]) if runs else 0.0}


@pytest.fixture(scope="module")
def gl_runs(guest_kernel, guest_initramfs, qemu_binary, tmp_path_factory):
    """One boot per back-end; what each client printed, the screendumps, the back-end's log."""
    runs: dict[str, dict] = {}
    yield lambda which: runs[which] if which in runs else runs.setdefault(
        which, _run(which, guest_kernel, guest_initramfs, qemu_binary,
                    tmp_path_factory.mktemp(f"gl-{which}")))


def _run(which, guest_kernel, guest_initramfs, qemu_binary, work: Path) -> dict:
    sockdir = short_tempdir()
    sock = str(sockdir / "gpu.sock")
    log_path = work / "backend.log"
    proc = _start_backend(_backend_argv(which, sock), sock, log_path)
    vm = _gpu_vm(guest_kernel, guest_initramfs, qemu_binary, work / "vm", sock)
    shots: list[np.ndarray] = []
    out: dict = {"work": work}
    try:
        vm.start(gl_script(FRAMES))
        vm.wait_for_marker("kmscube", timeout=180)
        if which == "ours":
            deadline = time.monotonic() + 30
            while len(shots) < 2 and time.monotonic() < deadline:
                path = work / f"shot{len(shots)}.ppm"
                vm.qmp("screendump", filename=str(path), device="gpu0")
                shot = read_ppm(str(path))
                if _looks_like_cube(cube_stats(shot)) and not any(
                        np.array_equal(shot, s) for s in shots):
                    shots.append(shot)
                time.sleep(0.3)
            result = vm.wait(timeout=120)
            out["output"] = result.output
        else:
            # The back-end aborts at kmscube's SET_SCANOUT; the guest then hangs on its queue.
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
            time.sleep(1)
            out["output"] = vm.console.read_text(errors="replace")
        out["backend_rc"] = proc.poll()
    finally:
        vm.close()
        _stop(proc)
        shutil.rmtree(sockdir, ignore_errors=True)
    text = out["output"]
    out["glmark2"] = _glmark2(text)
    out["kmscube"] = _kmscube(text)
    out["shots"] = shots
    out["log"] = log_path.read_text(errors="replace")
    glm, km = out["glmark2"], out["kmscube"]
    print(f"\ngl-fps {which}: glmark2 {glm['fps']} ({glm['renderer']}); "
          f"kmscube {km['fps']:.1f} fps over {km['frames']} frames")
    return out


def test_guest_kmscube_frame_rendered_by_virgl_reaches_the_screendump_on_our_backend(gl_runs):
    run = gl_runs("ours")
    km = run["kmscube"]
    assert "virgl" in km["renderer"].lower(), run["output"][-3000:]
    assert km["frames"] >= FRAMES - 1 and km["fps"] > 0, run["output"][-3000:]
    assert "kmscube-rc 0" in run["output"]
    assert len(run["shots"]) == 2, "no two different cube frames in the screendumps"
    for shot in run["shots"]:
        assert shot.shape == (HEIGHT, WIDTH, 3)
        stats = cube_stats(shot)
        assert _looks_like_cube(stats), stats   # > 1000 colours: smooth-shaded, not flat
    # The cube turns: the frames differ, their statistics stay alike, and between them
    # its faces show more than one primary (one frame alone may turn only red faces to
    # the camera).
    a, b = (cube_stats(s) for s in run["shots"])
    assert len(a["dominant"] | b["dominant"]) >= 2, (a, b)
    assert not np.array_equal(*run["shots"])
    assert abs(a["cube"] - b["cube"]) < 0.15, (a, b)


def test_guest_glmark2_renders_through_virgl_on_our_backend(gl_runs):
    glm = gl_runs("ours")["glmark2"]
    assert "virgl" in glm["renderer"].lower(), glm
    assert set(glm["fps"]) == {"build", "shading"} and min(glm["fps"].values()) > 0, glm


def test_guest_glmark2_renders_through_virgl_on_qemus_backend_which_aborts_at_a_3d_scanout(
        gl_runs):
    run = gl_runs("qemu")
    glm = run["glmark2"]
    assert "virgl" in glm["renderer"].lower(), run["output"][-3000:]
    assert set(glm["fps"]) == {"build", "shading"} and min(glm["fps"].values()) > 0, glm
    # kmscube's first SET_SCANOUT needs a dma-buf that a software GBM device cannot export.
    assert run["backend_rc"] is not None and run["backend_rc"] != 0, run["log"][-2000:]
    assert "virgl_cmd_set_scanout" in run["log"] and "fd >= 0" in run["log"], run["log"][-2000:]


def test_guest_glmark2_fps_of_ours_and_qemus_backend_are_comparable(gl_runs):
    ours, qemu = gl_runs("ours")["glmark2"]["fps"], gl_runs("qemu")["glmark2"]["fps"]
    ratios = {scene: ours[scene] / qemu[scene] for scene in ours if qemu.get(scene)}
    print(f"\ngl-fps ratio ours/qemu: {ratios}")
    assert set(ratios) == {"build", "shading"}
    # Same virglrenderer and llvmpipe underneath: neither back-end should be far behind.
    assert all(0.2 < r < 5 for r in ratios.values()), (ours, qemu)


def test_guest_qemus_backend_without_render_node_cannot_start_virgl(
        guest_kernel, guest_initramfs, qemu_binary, tmp_path):
    if any(Path("/dev/dri").glob("renderD*")):
        pytest.skip("this host has a DRM render node, which QEMU's back-end opens by itself")
    sockdir = short_tempdir()
    sock = str(sockdir / "gpu.sock")
    log_path = tmp_path / "backend.log"
    proc = _start_backend([require_tool(QEMU_GPU), "--socket-path", sock, "--virgl"], sock,
                          log_path)
    vm = _gpu_vm(guest_kernel, guest_initramfs, qemu_binary, tmp_path / "vm", sock)
    try:
        vm.start("sleep 60\n", layers=())
        rc = proc.wait(90)  # virgl_renderer_init runs at SET_FEATURES, while the guest probes
    finally:
        vm.close()
        _stop(proc)
        shutil.rmtree(sockdir, ignore_errors=True)
    log = log_path.read_text(errors="replace")
    assert rc != 0 and "Failed to initialize virgl" in log, log
