"""The gpu device as the device registry (backends/registry.py) sees it: declared once here."""
from vhost_user.backends.registry import DeviceSpec

SPEC = DeviceSpec(
    name="gpu",
    program="vhost-user-gpu",
    virtio_id=16,
    vhost_user_type="gpu",
    description="vhost-user-gpu back-end (vhost_user, Python with numpy pixel copies)",
    features=(),
    driver="vhost_user.backends.gpu.driver:GpuDriver",
    bench="vhost_user.backends.gpu.bench",
    fuzz_targets={"gpu-commands": "vhost_user.backends.gpu.fuzz", "gpu-3d": "vhost_user.backends.gpu.fuzz_3d"},
    sandbox="vhost_user.backends.gpu.sandbox",
    summary="full-frame transfer+flush cycles of vhost-user-gpu back-ends",
)
