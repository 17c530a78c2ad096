"""vhost-user-vsock's seccomp additions: a guest's connection to a host program
opens an AF_UNIX socket (only that family) and connects it at run time
(registered on import)."""
import socket

from vhost_user import sandbox

sandbox.register_profile("vsock", {"connect"})
sandbox.allow_with_args("vsock", "socket", (0, socket.AF_UNIX))
