"""3D (virgl) status: why `--virgl` refuses to start.

Probed here (Debian bookworm, libvirglrenderer1 0.10.4, Mesa 25.0, no
/dev/dri): virgl_renderer_init(EGL | SURFACELESS) succeeds on Mesa's
llvmpipe (GL 4.5 core; with GLES, ES 3.2) and reports capsets 1 (virgl,
v1, 308 bytes) and 2 (virgl2, v2, 1376 bytes). So the library can render
in software; what is missing is this back-end's 3D command set (contexts,
3D resources, SUBMIT_3D, capsets, fences through virglrenderer). Until it
exists, `--virgl` exits with this message and --print-capabilities lists
neither "virgl" nor "render-node".
"""

from __future__ import annotations

__all__ = ["virgl_unavailable_reason"]


def virgl_unavailable_reason() -> str:
    return ("3D rendering (virgl) is not implemented by this back-end yet: it serves the 2D "
            "virtio-gpu command set only (libvirglrenderer itself initialises on Mesa's "
            "software rasterizer here); run without --virgl, or use QEMU's own "
            "vhost-user-gpu for 3D")
