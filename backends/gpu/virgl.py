"""3D (virgl) status: not available in this back-end, and why.

Probed on Debian bookworm with libvirglrenderer1 0.10.4 and Mesa 25.0
(no /dev/dri): EGL falls back to surfaceless swrast and initialises, but
virgl_renderer_init(EGL | SURFACELESS [| GLES]) returns -1, so no 3D context
can be created. The back-end also implements only the 2D command set, so
`--virgl` refuses to start with this message and --print-capabilities does
not list "virgl" or "render-node".
"""

from __future__ import annotations

__all__ = ["virgl_unavailable_reason"]


def virgl_unavailable_reason() -> str:
    return ("3D rendering (virgl) is not available in this back-end: only the 2D "
            "virtio-gpu command set is implemented, and libvirglrenderer 0.10.4 fails to "
            "initialise on Mesa's software rasterizer here; run without --virgl "
            "(or use QEMU's own vhost-user-gpu for 3D)")
