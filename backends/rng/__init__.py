"""virtio-rng (entropy device, virtio 1.2 section 5.4) as a vhost-user back-end: `vhost-user-rng`.

A Python-only device: one request queue whose writable buffers are filled
from the kernel's getrandom() (or a --rng-source file), with an optional
rate limit. It exists both for its own use (QEMU's vhost-user-rng-pci) and
as the smallest complete example of a back-end on the shared core.
"""
