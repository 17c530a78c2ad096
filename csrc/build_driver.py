"""cffi API-mode build of `vhost_user._driver`, the driver-side virtqueue hot loop.

Used by setup.py (`cffi_modules=["csrc/build_driver.py:ffibuilder"]`); paths are
relative to the repository root, where setup.py runs. The C lives in
csrc/driver.c and csrc/driver.h; this file only declares what Python may call.
Structs are declared with `...;` so the compiler, not this file, fixes their
layout, and a signature that drifts from driver.h fails the build.
"""
from cffi import FFI

CDEF = """
#define DRV_MAX_QUEUE_SIZE ...
#define DRV_HIST_BUCKETS ...

#define DRV_OK ...
#define DRV_E_ARG ...
#define DRV_E_RANGE ...
#define DRV_E_ALIGN ...
#define DRV_E_NOSPACE ...
#define DRV_E_ORDER ...
#define DRV_E_USED_ID ...
#define DRV_E_NOT_INFLIGHT ...
#define DRV_E_USED_JUMP ...
#define DRV_E_BROKEN ...
#define DRV_E_SYS ...
#define DRV_E_TIMEOUT ...

struct drv_seg { uint64_t gpa; uint32_t len; uint32_t writable; };
struct drv_used_elem { uint32_t id; uint32_t len; };
struct drv_desc_state { ...; };
struct drv_ring_layout {
    uint64_t desc_offset; uint64_t avail_offset; uint64_t used_offset; uint64_t total_bytes;
};
struct drv_queue_config {
    uint64_t area_size; uint64_t gpa_base; uint32_t size;
    uint64_t desc_offset; uint64_t avail_offset; uint64_t used_offset;
    int kick_fd; int call_fd; int event_idx; uint16_t base_index;
    ...;
};
struct drv_queue {
    uint32_t size; uint32_t num_free; uint32_t inflight;
    int broken; uint32_t bad_value; int sys_errno;
    uint64_t kicks; uint64_t wakeups;
    ...;
};
struct drv_bench_params {
    int write; uint32_t block_size; uint32_t queue_depth; int random;
    uint64_t capacity_sectors; uint64_t data_offset; uint64_t duration_ns;
    uint64_t requests; uint64_t seed; uint64_t spin_ns; uint64_t stall_timeout_ns;
    ...;
};
struct drv_bench_stats {
    uint64_t requests; uint64_t bytes; uint64_t errors; uint64_t kicks; uint64_t wakeups;
    uint64_t elapsed_ns; uint64_t lat_min_ns; uint64_t lat_max_ns; uint64_t lat_sum_ns;
    ...;
};

int drv_ring_layout(uint32_t size, struct drv_ring_layout *out);
int drv_queue_init(struct drv_queue *q, struct drv_desc_state *st, uint8_t *area,
                   const struct drv_queue_config *cfg);
int drv_add(struct drv_queue *q, const struct drv_seg *segs, uint32_t nsegs);
int drv_kick(struct drv_queue *q);
int drv_reap(struct drv_queue *q, struct drv_used_elem *out, uint32_t max);
int drv_wait(struct drv_queue *q, int64_t timeout_ns);
uint64_t drv_bench_area_size(uint32_t block_size, uint32_t queue_depth);
int drv_blk_bench(struct drv_queue *q, const struct drv_bench_params *p,
                  struct drv_bench_stats *s);
uint64_t drv_hist_percentile(const struct drv_bench_stats *s, double fraction);

struct drv_net_bench_params {
    uint32_t hdr_len; uint32_t frame_len;
    uint64_t tx_offset; uint32_t tx_slot_size; uint32_t tx_slots;
    uint64_t rx_offset; uint32_t rx_buf_len; uint32_t rx_slots;
    int mergeable; uint64_t duration_ns; uint64_t stall_timeout_ns;
};
struct drv_net_bench_stats { uint64_t sent; uint64_t received; uint64_t rx_bytes; uint64_t elapsed_ns; };
int drv_net_bench(struct drv_queue *tx, struct drv_queue *rx,
                  const struct drv_net_bench_params *p, struct drv_net_bench_stats *s);
#define DRV_VSOCK_HDR_SIZE ...
#define DRV_VSOCK_NO_HEAD ...
#define DRV_VSOCK_G2H ...
#define DRV_VSOCK_H2G ...
struct drv_vsock_slot { uint64_t gpa; uint32_t head; uint32_t len; };
struct drv_vsock_conn {
    uint64_t local_cid; uint64_t peer_cid; uint32_t local_port; uint32_t peer_port;
    uint32_t buf_alloc; uint32_t peer_buf_alloc; uint32_t peer_fwd_cnt;
    uint64_t tx_cnt; uint64_t rx_cnt; uint64_t fwd_cnt; uint64_t reported_fwd;
};
struct drv_vsock_bench_params {
    int direction; uint32_t write_size; uint32_t tx_slot_size; uint32_t rx_buf_len; int rx_split;
    uint64_t duration_ns; uint64_t stall_timeout_ns;
};
struct drv_vsock_bench_stats {
    uint64_t tx_bytes; uint64_t tx_packets; uint64_t rx_bytes; uint64_t rx_packets;
    uint64_t credit_updates; uint64_t credit_requests; uint64_t other; uint64_t errors;
    uint64_t peer_credit_violations; uint64_t elapsed_ns; uint32_t end_op; uint32_t end_flags;
};
int drv_vsock_bench(struct drv_queue *tx, struct drv_queue *rx, struct drv_vsock_conn *c,
                    struct drv_vsock_slot *tx_slots, uint32_t n_tx,
                    struct drv_vsock_slot *rx_slots, uint32_t n_rx,
                    const struct drv_vsock_bench_params *p, struct drv_vsock_bench_stats *s);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "vhost_user._driver",
    '#include "driver.h"\n#include "drvnet.h"\n#include "drvvsock.h"',
    sources=["csrc/driver.c", "csrc/drvnet.c", "csrc/drvvsock.c"],
    include_dirs=["csrc"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
