"""The rng device as the device registry (backends/registry.py) sees it: declared once here."""
from vhost_user.backends.registry import DeviceSpec

SPEC = DeviceSpec(
    name="rng",
    program="vhost-user-rng",
    virtio_id=4,
    vhost_user_type="rng",
    description="vhost-user-rng back-end (vhost_user, Python)",
    features=(),
    driver="vhost_user.backends.rng.driver:RngDriver",
    bench=None,
    fuzz_targets={},
    sandbox="vhost_user.backends.rng.sandbox",
    summary="",
)
