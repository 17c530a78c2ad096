"""The gpu device as the device registry (backends/registry.py) sees it."""
from vhost_user.backends.registry import DeviceSpec

SPEC = DeviceSpec(
    name="gpu",
    program="vhost-user-gpu",
    driver="vhost_user.backends.gpu.driver:GpuDriver",
    fuzz_targets={"gpu-commands": "vhost_user.backends.gpu.fuzz", "gpu-3d": "vhost_user.backends.gpu.fuzz_3d"},
)
