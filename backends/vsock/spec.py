"""The vsock device as the device registry (backends/registry.py) sees it: declared once here."""
from vhost_user.backends.registry import DeviceSpec

SPEC = DeviceSpec(
    name="vsock",
    program="vhost-user-vsock",
    virtio_id=19,
    vhost_user_type="vsock",
    description="vhost-user-vsock back-end (vhost_user, Python): host Unix sockets, sibling VMs, vsockmon capture",
    features=(),
    driver="vhost_user.backends.vsock.driver:VsockDriver",
    bench="vhost_user.backends.vsock.bench",
    fuzz_targets={"vsock-packet": "vhost_user.backends.vsock.fuzz"},
    sandbox="vhost_user.backends.vsock.sandbox",
    summary="stream throughput through a vhost-user-vsock back-end",
)
