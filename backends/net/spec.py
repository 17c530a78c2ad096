"""The net device as the device registry (backends/registry.py) sees it: declared once here."""
from vhost_user.backends.registry import DeviceSpec

SPEC = DeviceSpec(
    name="net",
    program="vhost-user-net",
    virtio_id=1,
    vhost_user_type="net",
    description="vhost-user-net back-end with a built-in L2 switch (vhost_user, Python with a C data path)",
    features=(),
    driver="vhost_user.backends.net.driver:NetDriver",
    bench="vhost_user.backends.net.bench",
    fuzz_targets={"net-header": "vhost_user.backends.net.fuzz"},
    sandbox="vhost_user.backends.net.sandbox",
    summary="frames between two ports of vhost-user-net back-ends",
)
