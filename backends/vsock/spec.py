"""The vsock device as the device registry (backends/registry.py) sees it."""
from vhost_user.backends.registry import DeviceSpec

SPEC = DeviceSpec(
    name="vsock",
    program="vhost-user-vsock",
    driver="vhost_user.backends.vsock.driver:VsockDriver",
    fuzz_targets={"vsock-packet": "vhost_user.backends.vsock.fuzz"},
)
