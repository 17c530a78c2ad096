"""cffi (API mode) builder for the private extension `vhost_user._native`.

vhost_user/virtqueue.py (the generic ring) and the device engines beside
their devices (backends/blk/engine.py, backends/net/engine.py,
backends/vsock/fastpath.py) import the result.  Sources are listed
relative to the repository root, where setuptools runs the build.
cffi releases the GIL around every call into C; the worker loop (vr_run)
relies on that.
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["csrc/memory.c", "csrc/vring.c", "csrc/inflight.c", "csrc/run.c", "csrc/blk.c", "csrc/net.c", "csrc/net_offload.c", "csrc/net_filter.c", "csrc/vsock.c", "csrc/capture.c"]

CDEF = """
#define VR_MAX_REGIONS 32
#define VR_MAX_QUEUE_SIZE 32768
#define VR_MAX_SEGS 1088
#define VR_RUN_CONTROL 0
#define VR_RUN_BROKEN 1
#define VR_RUN_ERROR 2

struct vr_region { uint64_t gpa; uint64_t size; uint64_t uaddr; uint8_t *host; };
struct vr_mem { uint32_t nregions; struct vr_region regions[32]; };
struct vr_seg { uint64_t offset; uint32_t len; uint16_t region; uint16_t writable; };
struct vr_chain {
    uint16_t head; uint16_t nread; uint32_t nseg;
    uint64_t read_len; uint64_t write_len;
    uint32_t cap; struct vr_seg *segs;
};
struct vr_stats {
    uint64_t requests; uint64_t kicks; uint64_t notifies;
    uint64_t bytes_read; uint64_t bytes_written; uint64_t io_errors;
};
struct vr_queue { ...; };
typedef int (*vr_handler_fn)(void *ctx, struct vr_queue *q);

void vr_queue_init(struct vr_queue *q, uint32_t index);
int vr_queue_set_num(struct vr_queue *q, uint32_t num);
int vr_queue_set_addr(struct vr_queue *q, uint64_t desc, uint64_t avail,
                      uint64_t used, int is_gpa);
int vr_queue_set_base(struct vr_queue *q, uint16_t last_avail_idx);
uint16_t vr_queue_get_base(const struct vr_queue *q);
void vr_queue_set_event_idx(struct vr_queue *q, int on);
void vr_queue_set_fds(struct vr_queue *q, int kick_fd, int call_fd);
int vr_queue_set_inflight(struct vr_queue *q, void *region, uint64_t size);
int vr_queue_start(struct vr_queue *q, const struct vr_mem *mem);
int vr_queue_set_mem(struct vr_queue *q, const struct vr_mem *mem);
void vr_queue_stop(struct vr_queue *q);
void vr_queue_reset(struct vr_queue *q);
void vr_queue_fini(struct vr_queue *q);
int vr_queue_broken(const struct vr_queue *q);
const char *vr_queue_error(const struct vr_queue *q);
void vr_queue_get_stats(const struct vr_queue *q, struct vr_stats *out);

int vr_pop(struct vr_queue *q, struct vr_chain *c);
int vr_pop_batch(struct vr_queue *q, struct vr_chain *chains, uint32_t n);
int vr_push(struct vr_queue *q, uint16_t head, uint32_t len);
int vr_push_batch(struct vr_queue *q, const uint16_t *heads,
                  const uint32_t *lens, uint32_t n);
int vr_notify(struct vr_queue *q);
int vr_inflight_list(const struct vr_queue *q, uint16_t *heads, uint32_t cap);
int vr_run(struct vr_queue *q, int ctl_fd, vr_handler_fn fn, void *ctx,
           uint32_t poll_us);

struct vr_blk_config {
    int fd; int read_only; int direct;
    uint64_t capacity;
    uint32_t logical_block_size;
    uint32_t max_discard_sectors; uint32_t max_discard_seg;
    uint32_t max_write_zeroes_sectors; uint32_t max_write_zeroes_seg;
    uint8_t serial[20];
};
struct vr_blk_stats {
    uint64_t reads, writes, flushes, discards, write_zeroes, get_ids;
    uint64_t unsupported, io_errors;
    uint64_t bytes_read, bytes_written;
};
struct vr_blk;
struct vr_blk *vr_blk_new(const struct vr_blk_config *cfg);
void vr_blk_free(struct vr_blk *b);
int vr_blk_handle(void *ctx, struct vr_queue *q);
void vr_blk_get_stats(const struct vr_blk *b, struct vr_blk_stats *out);

struct vr_net_stats {
    uint64_t tx_frames, tx_bytes, rx_frames, rx_bytes;
    uint64_t tx_runt, tx_oversize, tx_bad_header, tx_malformed;
    uint64_t rx_no_room, rx_not_ready;
    uint64_t csum_resolved, segmented, flooded;
    uint64_t rx_filtered, rx_over_mtu;
};
struct vr_net_switch;
struct vr_net_tx;
struct vr_net_switch *vr_net_switch_new(uint32_t capture_bytes, uint64_t ageing_ns);
void vr_net_switch_free(struct vr_net_switch *sw);
int vr_net_port_add(struct vr_net_switch *sw, int tap_fd, uint64_t tap_features);
void vr_net_port_set_features(struct vr_net_switch *sw, int port, uint64_t features);
void vr_net_port_get_stats(struct vr_net_switch *sw, int port, struct vr_net_stats *out);
void vr_net_port_forget(struct vr_net_switch *sw, int port);
void vr_net_port_set_mtu(struct vr_net_switch *sw, int port, uint32_t mtu);
void vr_net_port_set_pairs(struct vr_net_switch *sw, int port, uint32_t pairs);
int vr_net_port_set_filter(struct vr_net_switch *sw, int port, uint32_t flags,
                           const uint8_t *own_mac, const uint8_t *macs, uint32_t n_uni,
                           uint32_t n_multi);
#define VR_NET_RX_FILTER 1
#define VR_NET_RX_PROMISC 2
#define VR_NET_RX_ALLMULTI 4
#define VR_NET_RX_ALLUNI 8
#define VR_NET_RX_NOMULTI 16
#define VR_NET_RX_NOUNI 32
#define VR_NET_RX_NOBCAST 64
#define VR_NET_MAX_MACS 64
int vr_net_mac_lookup(struct vr_net_switch *sw, const uint8_t *mac);
int vr_net_rx_attach(struct vr_net_switch *sw, int port, uint32_t qp, struct vr_queue *q);
void vr_net_rx_detach(struct vr_net_switch *sw, int port, uint32_t qp);
void vr_net_rx_lock(struct vr_net_switch *sw, int port, uint32_t qp);
void vr_net_rx_unlock(struct vr_net_switch *sw, int port, uint32_t qp);
struct vr_net_tx *vr_net_tx_new(struct vr_net_switch *sw, int port, uint32_t qp);
void vr_net_tx_free(struct vr_net_tx *t);
int vr_net_tx_handle(void *ctx, struct vr_queue *q);
int vr_net_inject(struct vr_net_switch *sw, int port, const uint8_t *frame, uint32_t len);
int vr_net_tap_run(struct vr_net_switch *sw, int port, int ctl_fd);
uint32_t vr_net_capture_read(struct vr_net_switch *sw, uint8_t *buf, uint32_t cap,
                             uint64_t *dropped);

int vr_unpop(struct vr_queue *q);

#define VR_CAPTURE_RECORD_HDR ...
#define VR_CAPTURE_MAX_SNAPLEN ...
struct vr_capture;
struct vr_capture_stats { uint64_t frames; uint64_t dropped; uint64_t bytes; };
struct vr_capture *vr_capture_new(uint32_t bytes, uint32_t snaplen);
void vr_capture_free(struct vr_capture *cap);
void vr_capture_put(struct vr_capture *cap, const uint8_t *frame, uint32_t len);
uint32_t vr_capture_read(struct vr_capture *cap, uint8_t *buf, uint32_t bufcap,
                         uint64_t *dropped);
void vr_capture_get_stats(struct vr_capture *cap, struct vr_capture_stats *out);

#define VS_TX_EMPTY ...
#define VS_TX_MORE ...
#define VS_TX_SLOW ...
#define VS_TX_PARTIAL ...
#define VS_TX_ATTENTION ...
#define VS_RX_NO_BUFFER ...
#define VS_RX_MORE ...
#define VS_RX_DRAINED ...
#define VS_RX_NO_CREDIT ...
#define VS_RX_SLOW ...
#define VS_RX_EOF ...
#define VS_RX_ERROR ...
#define VS_TABLE_MAX ...
struct vs_conn {
    uint64_t peer_cid;
    uint32_t host_port, guest_port;
    int32_t fd;
    uint16_t type;
    uint16_t state;
    uint32_t buf_alloc;
    uint32_t guest_shut_send;
    uint64_t fwd_cnt, rx_total, reported_fwd, pending_bytes;
    uint32_t peer_buf_alloc, peer_fwd_cnt;
    uint64_t tx_cnt;
    uint32_t readable;
    uint32_t in_table;
    uint64_t c_bytes_out, c_bytes_in;
};
struct vs_table { uint32_t count; ...; };
struct vs_tx_result { uint32_t status; uint32_t packets; uint64_t bytes; uint64_t sent; struct vs_conn *conn; };
struct vs_rx_result { uint32_t status; uint32_t packets; uint64_t bytes; int32_t err; };
int vs_table_insert(struct vs_table *t, struct vs_conn *c);
void vs_table_remove(struct vs_table *t, struct vs_conn *c);
struct vs_conn *vs_table_lookup(const struct vs_table *t, uint64_t peer_cid,
                                uint32_t host_port, uint32_t guest_port);
uint32_t vs_credit(const struct vs_conn *c);
int vs_credit_update_due(const struct vs_conn *c);
int vs_tx_burst(struct vr_queue *q, const struct vs_table *t, uint64_t guest_cid,
                struct vr_chain *c, uint32_t max, struct vr_capture *cap,
                struct vs_tx_result *res);
int vs_rx_fill(struct vr_queue *q, struct vs_conn *conn, uint64_t guest_cid,
               struct vr_chain *c, uint32_t max, struct vr_capture *cap,
               struct vs_rx_result *res);

extern "Python" int vr_py_handler(void *ctx, struct vr_queue *q);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "vhost_user._native",
    '#include "vring.h"\n#include "blk.h"\n#include "net.h"\n#include "vsock.h"\n#include "capture.h"\n',
    sources=SOURCES,
    include_dirs=[HERE],
    depends=[os.path.join("csrc", f) for f in ("clock.h", "vring.h", "blk.h", "net.h", "net_offload.h", "net_filter.h", "vsock.h", "capture.h")],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
