"""The blk device as the device registry (backends/registry.py) sees it."""
from vhost_user.backends.registry import DeviceSpec

SPEC = DeviceSpec(
    name="blk",
    program="vhost-user-blk",
    driver="vhost_user.backends.blk.driver:BlkDriver",
    fuzz_targets={
        "blk": "vhost_user.backends.blk.fuzz",
        "blk-request": "vhost_user.backends.blk.fuzz_request",
        "session": "vhost_user.backends.blk.fuzz_session",
    },
)
