"""The test picture the gpu guest tests write to the guest's framebuffer, the
guest script that writes it, and the pixels a display of it must show."""

from __future__ import annotations

import time

import numpy as np

__all__ = ["BLOCK", "KMSCUBE_BACKGROUND", "expected_frame", "fb_script", "gl_script", "read_ppm",
           "screen_matches"]

BLOCK = bytes((i * 7 + 13) % 255 + 1 for i in range(1004))  # 251 pixels: rows do not repeat


def expected_frame(width: int, height: int, stride: int) -> np.ndarray:
    """The RGB image the XRGB8888 (little-endian: B, G, R, X) framebuffer bytes show
    when BLOCK is repeated over `stride` * `height` bytes."""
    size = stride * height
    frame = (BLOCK * (size // len(BLOCK) + 1))[:size]
    fb = np.frombuffer(frame, np.uint8).reshape(height, stride)
    return fb[:, :width * 4].reshape(height, width, 4)[:, :, [2, 1, 0]]


def fb_script(size: int) -> str:
    """Build `size` bytes of the BLOCK pattern in the guest and write them to fb0 at once."""
    octal = "".join(f"\\{b:03o}" for b in BLOCK)
    return f"""
n=0; while [ ! -e /dev/fb0 ]; do n=$((n+1)); [ $n -gt 200 ] && {{ echo no fb0; exit 1; }}; sleep 0.1; done
for v in /sys/class/vtconsole/vtcon*; do echo 0 > $v/bind 2>/dev/null; done
echo "geometry $(cat /sys/class/graphics/fb0/virtual_size) $(cat /sys/class/graphics/fb0/stride)"
printf '{octal}' > /tmp/img
while [ $(stat -c %s /tmp/img) -lt {size} ]; do cat /tmp/img /tmp/img > /tmp/t; mv /tmp/t /tmp/img; done
head -c {size} /tmp/img > /tmp/frame
dd if=/tmp/frame of=/dev/fb0 bs={size} count=1 2>/dev/null || exit 2
vhu_mark written
sleep 120
"""


def read_ppm(path: str) -> np.ndarray:
    data = open(path, "rb").read()
    parts = data.split(maxsplit=4)
    assert parts[0] == b"P6" and parts[3] == b"255"
    w, h = int(parts[1]), int(parts[2])
    return np.frombuffer(parts[4][:w * h * 3], np.uint8).reshape(h, w, 3)


def screen_matches(vm, path: str, expect: np.ndarray, head: int = 0, timeout: float = 30.0):
    """Take screendumps until one shows `expect` (fbdev flushes a little later)."""
    deadline = time.monotonic() + timeout
    shot = None
    while time.monotonic() < deadline:
        vm.qmp("screendump", filename=path, device="gpu0", head=head)
        shot = read_ppm(path)
        if shot.shape == expect.shape and np.array_equal(shot, expect):
            return shot
        time.sleep(0.5)
    return shot


#: kmscube's glClearColor(0.5, 0.5, 0.5, 1.0) as XRGB8888 reaches the screen.
KMSCUBE_BACKGROUND = (127, 128)


def gl_script(frames: int, glmark2_seconds: int = 2) -> str:
    """Run glmark2 off-screen (fps, GL_RENDERER), then kmscube on card0 for `frames`.

    Both clients read stdin for a key press; a FIFO opened read-write never
    becomes readable, /dev/null would stop them at once. ``vhu_mark kmscube``
    is printed just before kmscube starts drawing on the screen.
    """
    bench = " ".join(f"-b {scene}:duration={glmark2_seconds}" for scene in ("build", "shading"))
    return f"""
n=0; while [ ! -e /dev/dri/card0 ]; do n=$((n+1)); [ $n -gt 200 ] && {{ echo no card0; exit 1; }}; sleep 0.1; done
dmesg | grep -o '\\[drm\\] features: .*' | head -1
echo "modes $(cat /sys/class/drm/card0-Virtual-1/modes | tr '\\n' ' ')"
mkfifo /tmp/stdin; exec 3<>/tmp/stdin
# -s 320x240: glmark2 2023.01 on DRM fails when -s equals the mode; it renders at the mode.
glmark2-es2-drm --off-screen -s 320x240 {bench} <&3
echo "glmark2-rc $?"
vhu_mark kmscube
kmscube -D /dev/dri/card0 -c {frames} <&3 | grep -v extensions
echo "kmscube-rc $?"
"""
