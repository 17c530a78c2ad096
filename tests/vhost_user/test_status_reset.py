"""SET_STATUS and RESET_DEVICE as QEMU 10 sends them, against our blk back-end.

QEMU sends SET_STATUS 0 on every vhost stop (guest reset, VM pause,
migration): the queues stop there, and start again from where they were
when the front-end sets them up again.
"""

from __future__ import annotations

import time

from backends_proc import start_blk
from vhost_user.backends.blk.driver import BlkDriver, BlkRequest
from vhost_user.backends.blk.request import RequestType, Status
from vhost_user.protocol import FrontendRequest as R, U64

MiB = 1 << 20
RUNNING = 0x0F  # ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK


def test_set_status_zero_stops_the_queues_and_a_new_setup_resumes(sockdir, shm_image):
    bp = start_blk(sockdir, image=shm_image(16 * MiB))
    try:
        with BlkDriver.connect(bp.socket) as drv:
            fe = drv.fe
            fe.call(R.SET_STATUS, U64(RUNNING))
            data = drv.read(0, 4096)
            fe.call(R.SET_STATUS, U64(0))
            assert fe.call(R.GET_STATUS).payload.value == 0
            ring = drv.queues[0].ring
            head = drv.submit(BlkRequest(RequestType.IN, 0, read_len=4096))
            time.sleep(0.5)
            assert ring.reap() == []          # stopped: nobody took the request
            base = fe.stop_queue(0)
            assert base == 1                  # only the first read was consumed
            fe.resume({0: base}, mem_table=False)
            fe.call(R.SET_STATUS, U64(RUNNING))
            done = drv.complete(0)
            assert [(h, s, d) for h, s, d in done] == [(head, Status.OK, data)]
        assert "SET_STATUS 0: every queue stopped" in bp.log_tail(50)
        assert bp.running
    finally:
        bp.stop()
