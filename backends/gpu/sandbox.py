"""vhost-user-gpu's seccomp profiles (registered on import).

"gpu": nothing beyond the core set; png:DIR writes under a directory fd opened
before confinement, allowed at run time by the back-end (allow_with_args).

"gpu-virgl" (--virgl), confined once the renderer is up. Measured with strace -f
from "ready" through a context, a 3D resource, a clear and a flush, twice:
virglrenderer with Mesa's llvmpipe needs nothing beyond the core set once Mesa's
shader cache is off (it locks and opens files for writing per context; the
back-end sets MESA_SHADER_CACHE_DISABLE). Their threads are created with clone3
(ENOSYS here, glibc falls back to clone) and llvmpipe reads /proc/meminfo per
context (absent in the private root: it copes).
"""
from vhost_user import sandbox

sandbox.register_profile("gpu", ())
sandbox.register_profile("gpu-virgl", ())
