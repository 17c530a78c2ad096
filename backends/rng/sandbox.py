"""vhost-user-rng's seccomp additions: none. getrandom is in the core set and a
--rng-source file is opened before confinement (registered on import)."""
from vhost_user import sandbox

sandbox.register_profile("rng", ())
