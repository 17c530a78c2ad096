"""virtio-rng (entropy device, virtio 1.2 section 5.4) as a vhost-user back-end: `vhost-user-rng`.

A Python-only device: one request queue whose writable buffers are filled
from the kernel's getrandom() (or a --rng-source file), with an optional
rate limit. It exists both for its own use (QEMU's vhost-user-rng-pci) and
as the smallest complete example of a back-end on the shared core: `spec.py`
(the registry's declaration), `device.py` (the device), `driver.py` (its
model for the built-in front-end), `sandbox.py` (no seccomp additions) and
`__main__.py` (the program) are all of it.
"""
