"""virtio-blk back-end (`vhost-user-blk`): what lives here.

- `spec.py`: the device's one declaration (name, program, virtio id 2,
  capabilities, description, modules) that backends/registry.py collects;
- `device.py`: the VirtioDevice (config space, features, online resize,
  write-cache mode), `config.py` its config layout, `request.py` the request
  header and discard segment (protocol/layout.py);
- `engine.py`: the queue engine over the C in `blk.c` (requests), `blk_pool.c`
  (the I/O threads for large transfers), `blk.h`, `blk_hdr.h` (the request
  header both sides include); `native.json` names them for the build;
- `driver.py`, `driver_load.py` + `driver_blk.c`: the built-in front-end's
  driver model and its C request load; `bench.py`: `vhost-user-bench blk`;
- `fuzz.py`, `fuzz_request.py`, `fuzz_session.py`: fuzz targets (rings, request
  parser, whole sessions); `sandbox.py`: seccomp additions; `__main__.py`: the program.
"""
