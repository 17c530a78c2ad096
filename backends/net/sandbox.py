"""vhost-user-net's seccomp additions: none. TAP fds and the pcap file are opened
before confinement; the TAP reader and the capture writer only read, write, poll
and ioctl them, all in the core set (registered on import)."""
from vhost_user import sandbox

sandbox.register_profile("net", ())
