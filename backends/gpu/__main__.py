"""`vhost-user-gpu`: a drop-in for QEMU's vhost-user-gpu (same flags, same JSON)."""

from __future__ import annotations

import argparse
import sys

from vhost_user.cli import CliError, UsageError, base_parser, parse_size, print_info, run_backend, run_main
from vhost_user.errors import VhostUserError

from .device import CAPABILITIES, GpuDevice, GpuOptions
from .virgl import VirglError, virgl_capability_features


def _resolution(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not WIDTHxHEIGHT: {text!r}") from None
    if not (0 < w <= 16384 and 0 < h <= 16384):
        raise argparse.ArgumentTypeError(f"resolution out of range: {text!r}")
    return w, h


def build_parser() -> argparse.ArgumentParser:
    p = base_parser("vhost-user-gpu", "vhost-user virtio-gpu back-end", verbose_flag=False)
    p.add_argument("-v", "--virgl", action="store_true", help="turn virgl (3D) rendering on")
    p.add_argument("-r", "--render-node", metavar="PATH", help="DRM render node (3D only)")
    p.add_argument("--display", metavar="png:DIR|none",
                   help="headless output when the VMM sends no display socket "
                        "(png:DIR writes DIR/scanout-N.png on every flush)")
    p.add_argument("--outputs", type=int, default=1, help="scanouts announced to the guest (1-16)")
    p.add_argument("--resolution", type=_resolution, default=(1280, 800),
                   help="headless preferred mode (default 1280x800)")
    p.add_argument("--max-hostmem", type=parse_size, default=256 << 20,
                   help="host memory the guest's resources may use (default 256M)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main(build_parser(), _main, argv)


def _main(args) -> int:
    if args.render_node and not args.print_capabilities:
        print("warning: --render-node is not used (3D renders on Mesa's surfaceless EGL); "
              "ignored", file=sys.stderr)
    width, height = args.resolution
    opts = GpuOptions(display=args.display, outputs=args.outputs, width=width, height=height,
                      max_hostmem=args.max_hostmem)
    capabilities = dict(CAPABILITIES)
    if args.print_capabilities:
        capabilities["features"] = list(CAPABILITIES["features"]) + virgl_capability_features()
    done = print_info(args, capabilities, "vhost-user-gpu")
    if done is not None:
        return done
    if args.sandbox:
        _sandbox_early(args)
    try:
        if args.virgl:
            from .device3d import VirglGpuDevice
            device = VirglGpuDevice(opts)
        else:
            device = GpuDevice(opts)
    except VirglError as exc:
        raise CliError("--virgl", str(exc)) from None
    except OSError as exc:  # --display png:DIR that cannot be made or opened
        raise CliError(exc.filename or str(args.display), exc.strerror or str(exc)) from None
    except VhostUserError as exc:  # DeviceError: an option value the device rejects
        if str(exc).startswith("--"):
            raise UsageError(str(exc)) from None
        raise
    _sandbox_setup(args, device)
    return run_backend(args, lambda: device, capabilities, "vhost-user-gpu",
                       sandbox_profile="gpu-virgl" if args.virgl else "gpu")


def _sandbox_early(args) -> None:
    """The file-system sandbox is entered before the device exists (the virgl renderer
    starts threads); for --virgl, Mesa's shader cache (it opens files for writing at
    each new context) is turned off."""
    import os

    from vhost_user.cli import enter_fs_sandbox

    if args.virgl:
        os.environ.setdefault("MESA_SHADER_CACHE_DISABLE", "true")
    enter_fs_sandbox(args)


def _sandbox_setup(args, device) -> None:
    """png:DIR may create and rename files under its directory fd only (both profiles)."""
    if not args.sandbox:
        return
    from vhost_user import sandbox

    profile = "gpu-virgl" if args.virgl else "gpu"
    dir_fd = getattr(device.fallback, "dir_fd", None)
    if dir_fd is not None:
        sandbox.allow_with_args(profile, "openat", (0, dir_fd))
        sandbox.allow_with_args(profile, "renameat", (0, dir_fd), (2, dir_fd))
        sandbox.allow_with_args(profile, "renameat2", (0, dir_fd), (2, dir_fd))


if __name__ == "__main__":
    sys.exit(main())
