/*
 * driver.h: the driver (guest) side of a virtio split virtqueue (virtio 1.2
 * section 2.7) or packed one (2.8, `packed` in the config), for the built-in front-end, and the latency histogram its
 * device loads share.  The loads themselves (blk, net, vsock) live beside
 * their devices (backends/<dev>/driver_<dev>.c) and use only the verbs
 * declared here: add, kick, reap, wait, used_pending.
 *
 * Theory of operation
 * -------------------
 * The caller maps one region of guest RAM (a memfd) and hands C its host
 * address, its guest-physical base and its size. The descriptor table, the
 * avail ring and the used ring live at caller-chosen offsets in that area;
 * every address C writes into a descriptor is guest-physical
 * (gpa_base + offset) and every offset is checked against the area size.
 *
 * Driver-private state (free list, chain lengths, per-head cookie and time
 * stamp) lives in a `struct drv_desc_state` array the caller allocates once,
 * never in shared memory: a buggy or hostile back-end can scribble over the
 * rings but cannot make the driver follow a bad pointer. Every used element
 * is copied to a local and checked (id < size, id is an in-flight head,
 * used->idx moved no further than the number of chains in flight); the first
 * violation marks the queue broken and every later call returns
 * DRV_E_BROKEN.
 *
 * A queue is used by one thread at a time. No function allocates memory.
 * Rings are little-endian (virtio 1.x); this file assumes a little-endian
 * host and refuses to build otherwise.
 */
#ifndef DRV_DRIVER_H
#define DRV_DRIVER_H

#include <stdint.h>

/* cdef-begin */
#define DRV_MAX_QUEUE_SIZE 32768 /* 2.7: split queue size is a power of 2 <= 32768 */

/* Latency histogram: values below 2^DRV_HIST_SUB_BITS ns get one bucket each;
 * each power of two above that is split into 2^DRV_HIST_SUB_BITS buckets
 * (relative bucket width <= 1/64, ~1.6%). Values >= 2^DRV_HIST_MAX_EXP ns
 * (~68.7 s) land in the last bucket. */
#define DRV_HIST_SUB_BITS 6
#define DRV_HIST_MAX_EXP 36
#define DRV_HIST_BUCKETS 1984 /* (DRV_HIST_MAX_EXP - DRV_HIST_SUB_BITS + 1) << DRV_HIST_SUB_BITS */

enum drv_status {
    DRV_OK = 0,
    DRV_E_ARG = -1,          /* caller passed a bad argument */
    DRV_E_RANGE = -2,        /* offset/address outside the area or overflowing */
    DRV_E_ALIGN = -3,        /* ring not aligned as 2.7 requires */
    DRV_E_NOSPACE = -4,      /* not enough free descriptors for the chain */
    DRV_E_ORDER = -5,        /* device-writable segment before a readable one */
    DRV_E_USED_ID = -6,      /* back-end: used id >= queue size */
    DRV_E_NOT_INFLIGHT = -7, /* back-end: used id is not an in-flight head */
    DRV_E_USED_JUMP = -8,    /* back-end: used->idx ran past the chains in flight */
    DRV_E_BROKEN = -9,       /* queue was marked broken earlier */
    DRV_E_SYS = -10,         /* a syscall failed; errno in q->sys_errno */
    DRV_E_TIMEOUT = -11,     /* a load: no completion within the stall timeout */
};

/* One buffer of a chain: guest-physical address, length, device-writable. */
struct drv_seg {
    uint64_t gpa;
    uint32_t len;
    uint32_t writable;
};

/* One reaped used element: the chain's head and the length the device wrote. */
struct drv_used_elem {
    uint32_t id;
    uint32_t len;
};

/* Driver-private per-descriptor state; the caller allocates `size` of them. */
struct drv_desc_state {
    uint16_t next;      /* free list link, and the chain link we wrote */
    uint16_t chain_len; /* on a head: descriptors in the chain; 0 = not in flight */
    uint32_t cookie;    /* on a head: caller's token (bench: slot number) */
    uint64_t stamp;     /* on a head: submit time in ns (bench) */
};

struct drv_ring_layout {
    uint64_t desc_offset;
    uint64_t avail_offset;
    uint64_t used_offset;
    uint64_t total_bytes;
};

struct drv_queue_config {
    uint64_t area_size;
    uint64_t gpa_base;
    uint32_t size;
    uint64_t desc_offset;
    uint64_t avail_offset;
    uint64_t used_offset;
    int kick_fd;
    int call_fd;
    int event_idx;       /* VIRTIO_RING_F_EVENT_IDX negotiated */
    uint16_t base_index; /* first avail/used index (as sent in SET_VRING_BASE); split only */
    int packed;          /* VIRTIO_F_RING_PACKED: desc ring, driver and device event areas
                            at desc/avail/used_offset; starts at 0x80008000 */
};

struct vring_desc;
struct vring_avail;
struct vring_used;

struct drv_queue {
    uint8_t *area;
    uint64_t area_size;
    uint64_t gpa_base;
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    struct drv_desc_state *st;
    uint64_t ring_off[3];  /* desc, avail, used offsets in the area */
    uint64_t ring_len[3];  /* their lengths */
    int kick_fd;
    int call_fd;
    int event_idx;
    uint32_t size;
    uint16_t free_head;
    uint32_t num_free;
    uint32_t inflight;     /* chains published and not yet reaped */
    uint16_t avail_idx;    /* our copy of avail->idx */
    uint16_t kicked_idx;   /* avail_idx at the last kick decision */
    uint16_t last_used;    /* next used index to reap */
    int broken;            /* 0, or the DRV_E_* code that broke the queue */
    uint32_t bad_value;    /* the offending id / index delta */
    int sys_errno;
    uint64_t kicks;
    uint64_t wakeups;
    /* packed only: next slots and wrap counters (2.8.1) */
    int packed;
    uint16_t avail_slot, used_slot;
    uint8_t avail_wrap, used_wrap;
};

int drv_ring_layout(uint32_t size, struct drv_ring_layout *out);
/* Packed: descriptor ring at 0, the two 4-byte event areas after it; any size. */
int drv_packed_layout(uint32_t size, struct drv_ring_layout *out);
int drv_queue_init(struct drv_queue *q, struct drv_desc_state *st, uint8_t *area,
                   const struct drv_queue_config *cfg);
int drv_add(struct drv_queue *q, const struct drv_seg *segs, uint32_t nsegs);
int drv_kick(struct drv_queue *q);
int drv_reap(struct drv_queue *q, struct drv_used_elem *out, uint32_t max);
int drv_wait(struct drv_queue *q, int64_t timeout_ns);
/* 1 when the device has used a chain the driver has not reaped yet (2.7.14). */
int drv_used_pending(struct drv_queue *q);

/* The histogram bucket of a latency of `ns` nanoseconds. */
unsigned drv_hist_bucket(uint64_t ns);
/* The latency at `fraction` (0..1) of the DRV_HIST_BUCKETS counts in `hist`:
 * a bucket's midpoint, or max_ns for the last bucket; 0 for no counts. */
uint64_t drv_hist_percentile(const uint64_t *hist, uint64_t max_ns, double fraction);

/* cdef-end */

#endif
