/*
 * vring.h - guest memory table and split virtqueue, device side.
 *
 * Packed rings (virtio 1.2, 2.8) share the queue struct and the whole
 * data-path API (pop, push, notify); packed.c holds their ring code and
 * vr_pop & co. dispatch on q->packed, so engines do not care which it is.
 *
 * Theory of operation
 * -------------------
 * The control plane (Python, asyncio thread) fills a struct vr_mem and a
 * struct vr_queue while the queue is stopped.  A worker thread then calls
 * vr_run(), which sleeps in poll() on the kick eventfd and a control
 * eventfd, and calls a handler that pops descriptor chains, does the work
 * and pushes used elements.  Python only changes queue state after vr_run
 * returned (control fd readable), so the queue struct has one writer at a
 * time and needs no locks.
 *
 * The guest is hostile: every value read from guest memory is copied to a
 * local before it is checked, and every check names its virtio spec
 * section (virtio 1.2, 2.7 "Split Virtqueues").  A violation marks the
 * queue broken (error code + message); every later operation is a no-op
 * until vr_queue_reset().
 *
 * Segments handed to callers are (region index, offset, length) triples;
 * host pointers never leave C.
 */
#ifndef VR_VRING_H
#define VR_VRING_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

/* cdef-begin */
/* cdef: struct iovec { ...; }; */

#define VR_MAX_REGIONS 32
#define VR_MAX_QUEUE_SIZE 32768
#define VR_MAX_SEGS 1088 /* IOV_MAX data segments + header/status slack */

/* Split ring flag bits (virtio 1.2, 2.7.5 / 2.7.6 / 2.7.8). */
#define VR_DESC_F_NEXT 1
#define VR_DESC_F_WRITE 2
#define VR_DESC_F_INDIRECT 4
#define VR_AVAIL_F_NO_INTERRUPT 1
#define VR_USED_F_NO_NOTIFY 1

/* Packed ring flag bits and event suppression values (virtio 1.2, 2.8). */
#define VR_PDESC_F_AVAIL (1u << 7)
#define VR_PDESC_F_USED (1u << 15)
#define VR_EVENT_ENABLE 0
#define VR_EVENT_DISABLE 1
#define VR_EVENT_DESC 2

/* Error codes.  1..19 break the queue (driver at fault); 20+ are misuse
 * of the API by the caller and leave the queue as it was. */
enum vr_error {
    VR_OK = 0,
    VR_E_LOOP = 1,          /* hop budget exhausted */
    VR_E_INDEX = 2,         /* head or next >= table size */
    VR_E_NESTED = 3,        /* indirect inside indirect */
    VR_E_INDIRECT_LEN = 4,  /* indirect len 0 or not a multiple of 16 */
    VR_E_ADDRESS = 5,       /* address outside memory / overflow */
    VR_E_AVAIL_JUMP = 6,    /* avail->idx - last_avail_idx > num */
    VR_E_ORDER = 7,         /* readable descriptor after a writable one */
    VR_E_CHAIN = 8,         /* too many segments / total length overflow */
    VR_E_MALFORMED = 9,     /* device-specific: e.g. no status byte */
    VR_E_ID = 10,           /* packed: buffer id out of range or in flight */
    VR_E_INVAL = 20,        /* bad argument from the caller */
    VR_E_RING = 21,         /* ring addresses not in one region each */
    VR_E_ALIGN = 22,        /* ring addresses misaligned */
    VR_E_STATE = 23,        /* operation not valid in this state */
    VR_E_NOMEM = 24,
    VR_E_INFLIGHT = 25,     /* inflight region does not match the queue */
};

struct vr_region {
    uint64_t gpa;
    uint64_t size;
    uint64_t uaddr;      /* front-end virtual address of the region */
    uint8_t *host;       /* our mapping of byte 0 of the region */
};

struct vr_mem {
    uint32_t nregions;
    struct vr_region regions[VR_MAX_REGIONS];
};

/* One bounded piece of a guest buffer. */
struct vr_seg {
    uint64_t offset;     /* from the start of the region */
    uint32_t len;
    uint16_t region;
    uint16_t writable;
};

/* A popped descriptor chain: readable segments first, then writable. */
struct vr_chain {
    uint16_t head;
    uint16_t nread;      /* segments [0, nread) are device-readable */
    uint32_t nseg;       /* total segments */
    uint64_t read_len;   /* total readable bytes */
    uint64_t write_len;  /* total writable bytes */
    uint32_t cap;        /* capacity of segs, set by the caller */
    struct vr_seg *segs;
};

struct vr_stats {
    uint64_t requests;   /* chains popped */
    uint64_t kicks;      /* kick eventfd wake-ups */
    uint64_t notifies;   /* call eventfd writes */
    uint64_t bytes_read;     /* device-side, filled by engines */
    uint64_t bytes_written;
    uint64_t io_errors;
    uint64_t log_missed; /* dirty pages past the end of the log */
    uint64_t polled;     /* sleeps the busy-poll saved (work found by polling) */
};

/* Layout of the split inflight region (vhost-user.rst, "Inflight I/O
 * tracking").  Shared with the front-end; survives our crash. */
struct vr_inflight_desc {
    uint8_t inflight;
    uint8_t padding[5];
    uint16_t next;
    uint64_t counter;
};

struct vr_inflight_region {
    uint64_t features;
    uint16_t version;
    uint16_t desc_num;
    uint16_t last_batch_head;
    uint16_t used_idx;
    struct vr_inflight_desc desc[];
};

/* Layout of the packed inflight region (vhost-user.rst, "Inflight I/O
 * tracking", packed virtqueue; see inflight_packed.c): one entry per ring
 * slot holds a descriptor of a chain in flight; a chain's first entry
 * (its head) also holds the chain's length, last entry and counter. */
struct vr_pk_inflight_desc {
    uint8_t inflight;    /* head: 1 in flight, 2 being completed */
    uint8_t padding;
    uint16_t next;       /* the chain's next entry, or the free list's */
    uint16_t last;       /* head: the chain's last entry */
    uint16_t num;        /* head: descriptors in the chain */
    uint64_t counter;    /* head: pop order */
    uint16_t id;
    uint16_t flags;
    uint32_t len;
    uint64_t addr;
};

struct vr_pk_inflight_region {
    uint64_t features;
    uint16_t version;
    uint16_t desc_num;
    uint16_t free_head;
    uint16_t old_free_head;
    uint16_t used_idx;           /* used slot once the batch being pushed is out */
    uint16_t old_used_idx;       /* used slot before it */
    uint8_t used_wrap_counter;
    uint8_t old_used_wrap_counter;
    uint8_t padding[7];
    struct vr_pk_inflight_desc desc[];
};

/* Dirty page log (vhost-user.rst, "Migration"; see dirtylog.c): bit
 * (page % 8) of byte (page / 8) per 4 KiB guest-physical page, shared with
 * the front-end.  Immutable once a queue points at it. */
#define VR_LOG_PAGE 4096
struct vr_log {
    uint8_t *base;
    uint64_t size;       /* bytes */
    int call_fd;         /* SET_LOG_FD eventfd, or -1 */
};

struct vr_queue;
typedef int (*vr_handler_fn)(void *ctx, struct vr_queue *q);

/* Opaque in Python; Python uses the accessor functions below. */
/* cdef: struct vr_queue { ...; }; */
/* cdef-end */
struct vr_queue {
    uint32_t index;
    uint32_t num;
    int event_idx;
    int started;
    int packed;                /* VIRTIO_F_RING_PACKED (packed.c) */
    /* ring addresses as given by the front-end */
    uint64_t desc_addr, avail_addr, used_addr;
    int addr_is_gpa;
    /* host views, valid while started */
    volatile uint8_t *desc;    /* struct vring_desc[num] */
    volatile uint8_t *avail;   /* flags, idx, ring[num], used_event */
    volatile uint8_t *used;    /* flags, idx, ring[num], avail_event */
    const struct vr_mem *mem;
    uint16_t last_avail_idx;   /* packed: next ring slot to read */
    uint16_t shadow_avail;     /* split: avail->idx as last read (set at start) */
    uint16_t hinted;           /* split: avail entries prefetched up to here (vr_prefetch_*) */
    uint16_t used_idx;         /* shadow of used->idx; packed: next slot to write */
    uint16_t signalled_used;
    int signalled_used_valid;
    /* packed only: wrap counters, and per buffer id the ring descriptors
     * its chain took (0 = not in flight); pop history for vr_unpop_n */
    uint8_t avail_wrap, used_wrap, signalled_wrap;
    uint16_t *pk_ndesc;
    uint32_t *pk_hist;
    uint32_t pk_hist_pos, pk_hist_len;
    /* packed only: a copy of every descriptor in flight (packed.c), per
     * id a list through pk_rec[].next from pk_first[id]; free list.
     * pk_rec is the inflight region's table when there is one
     * (pk_region), else pk_rec_own. */
    struct vr_pk_inflight_desc *pk_rec, *pk_rec_own;
    struct vr_pk_inflight_region *pk_region;
    uint16_t *pk_first;
    uint16_t pk_free;
    uint32_t pk_inflight;      /* descriptors in flight (<= num) */
    uint64_t desc_gpa;         /* guest-physical address of the ring */
    int kick_fd, call_fd;
    /* inflight tracking */
    struct vr_inflight_region *inflight;
    uint64_t inflight_size;
    uint64_t inflight_counter;
    uint16_t *resubmit;        /* heads to pop before the avail ring */
    uint32_t nresubmit, resubmit_pos;
    /* dirty logging (dirtylog.c); written by the control thread while
     * the worker runs, so only through atomics */
    const struct vr_log *log;  /* NULL unless VHOST_F_LOG_ALL and a log */
    uint64_t log_used_gpa;     /* log_guest_addr of SET_VRING_ADDR */
    int log_used;              /* VHOST_VRING_F_LOG */
    /* failure state */
    int broken;
    char errmsg[160];
    struct vr_stats stats;
};
/* cdef-begin */
/* memory.c */
int vr_mem_translate(const struct vr_mem *m, uint64_t gpa, uint64_t len,
                     struct vr_seg *segs, uint32_t cap, uint32_t *nseg);
uint8_t *vr_mem_gpa_contig(const struct vr_mem *m, uint64_t gpa, uint64_t len);
uint8_t *vr_mem_uva_contig(const struct vr_mem *m, uint64_t uva, uint64_t len);
int vr_mem_uva_to_gpa(const struct vr_mem *m, uint64_t uva, uint64_t *gpa);
int vr_mem_read(const struct vr_mem *m, uint64_t gpa, void *dst, uint64_t len);
uint8_t *vr_seg_host(const struct vr_mem *m, const struct vr_seg *s);
int vr_mem_check(const struct vr_mem *m);

/* vring.c: set-up */
void vr_queue_init(struct vr_queue *q, uint32_t index);
int vr_queue_set_num(struct vr_queue *q, uint32_t num);
int vr_queue_set_addr(struct vr_queue *q, uint64_t desc, uint64_t avail,
                      uint64_t used, int is_gpa);
int vr_queue_set_base(struct vr_queue *q, uint32_t base);
uint32_t vr_queue_get_base(const struct vr_queue *q);
int vr_queue_set_packed(struct vr_queue *q, int on);
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
/* cdef-end */
int vr_queue_fail(struct vr_queue *q, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
int vr_chain_add(struct vr_queue *q, struct vr_chain *c, uint64_t addr, uint32_t len,
                 int writable, int *seen_write);
/* packed.c (called by vring.c when q->packed) */
int vr_packed_prepare(struct vr_queue *q);
void vr_packed_release(struct vr_queue *q);
void vr_packed_forget(struct vr_queue *q);
/* inflight_packed.c (called by packed.c) */
int vr_packed_inflight_recover(struct vr_queue *q);
int vr_packed_pop(struct vr_queue *q, struct vr_chain *c);
int vr_packed_unpop_n(struct vr_queue *q, uint32_t n);
int vr_packed_push_batch(struct vr_queue *q, const uint16_t *ids, const uint32_t *lens,
                         uint32_t n);
int vr_packed_should_notify(struct vr_queue *q);
void vr_packed_disable_notify(struct vr_queue *q);
int vr_packed_enable_notify(struct vr_queue *q);
int vr_packed_avail_pending(struct vr_queue *q);
/* cdef-begin */
/* vring.c: data path */
int vr_pop(struct vr_queue *q, struct vr_chain *c);
int vr_pop_batch(struct vr_queue *q, struct vr_chain *chains, uint32_t n);
int vr_unpop(struct vr_queue *q);
int vr_unpop_n(struct vr_queue *q, uint32_t n);
int vr_push(struct vr_queue *q, uint16_t head, uint32_t len);
int vr_push_batch(struct vr_queue *q, const uint16_t *heads,
                  const uint32_t *lens, uint32_t n);
int vr_should_notify(struct vr_queue *q);
int vr_notify(struct vr_queue *q);
int vr_notify_force(struct vr_queue *q);
void vr_disable_notify(struct vr_queue *q);
int vr_enable_notify(struct vr_queue *q);
int vr_avail_pending(struct vr_queue *q);
void vr_prefetch_next(struct vr_queue *q, uint32_t bytes);
void vr_prefetch_avail(struct vr_queue *q, uint32_t n, int write, uint32_t bytes);

/* vring.c: chain helpers for engines.  iovecs over segs[0, n) from byte
 * `skip` on, at most `limit` bytes, into iov[0, cap); returns the count,
 * or -1 when more than `cap` iovecs would be needed (nothing beyond
 * iov[cap - 1] is written). */
int vr_segs_iov(const struct vr_mem *m, const struct vr_seg *segs, uint32_t n,
                uint64_t skip, uint64_t limit, struct iovec *iov, uint32_t cap);
/* Copy `len` bytes out of segs[0, n) from byte `skip` on into dst (gather),
 * or from src into them (scatter); stops at the chain's end and returns the
 * bytes copied.  The segments were checked against guest memory by vr_pop. */
uint64_t vr_segs_gather(const struct vr_mem *m, const struct vr_seg *segs, uint32_t n,
                        uint64_t skip, void *dst, uint64_t len);
uint64_t vr_segs_scatter(const struct vr_mem *m, const struct vr_seg *segs, uint32_t n,
                         uint64_t skip, const void *src, uint64_t len);

/* dirtylog.c: set from the control thread at any time */
void vr_queue_set_log(struct vr_queue *q, const struct vr_log *log);
void vr_queue_set_log_used(struct vr_queue *q, int on, uint64_t used_gpa);
uint64_t vr_log_write(const struct vr_log *log, uint64_t gpa, uint64_t len);
/* cdef-end */
/* dirtylog.c (called by vring.c) */
const struct vr_log *vr_log_active(struct vr_queue *q);
void vr_log_kick(const struct vr_log *log);
void vr_log_used(struct vr_queue *q, const struct vr_log *log, uint64_t off, uint64_t len);
void vr_log_chain(struct vr_queue *q, const struct vr_log *log, uint16_t head, uint32_t len);
void vr_log_ring(struct vr_queue *q, const struct vr_log *log, uint64_t gpa, uint64_t len);
/* cdef-begin */

/* inflight.c (called by vring.c) */
int vr_inflight_recover(struct vr_queue *q);
void vr_inflight_mark(struct vr_queue *q, uint16_t head);
void vr_inflight_link(struct vr_queue *q, uint16_t head);
void vr_inflight_done(struct vr_queue *q, const uint16_t *heads, uint32_t n);
int vr_inflight_list(const struct vr_queue *q, uint16_t *heads, uint32_t cap);

/* run.c: worker loop.  Returns VR_RUN_CONTROL or VR_RUN_BROKEN. */
#define VR_RUN_CONTROL 0
#define VR_RUN_BROKEN 1
#define VR_RUN_ERROR 2
/* A handler's return: nothing to send, leave kicks off (run.c). */
#define VR_HANDLER_IDLE 1
int vr_run(struct vr_queue *q, int ctl_fd, vr_handler_fn fn, void *ctx,
           uint32_t poll_us);

/* cdef-end */

/* ring geometry (virtio 1.2, 2.7 table of queue part sizes) */
static inline uint64_t vr_desc_size(uint32_t num) { return 16ull * num; }
static inline uint64_t vr_avail_size(uint32_t num) { return 6ull + 2ull * num; }
static inline uint64_t vr_used_size(uint32_t num) { return 6ull + 8ull * num; }
/* packed (2.8): the driver and device event suppression areas are 4 bytes */
#define VR_EVENT_AREA_SIZE 4

/* The region holding gpa, or NULL (memory.c's translations, and the
 * one-descriptor pop in vring.c).  Linear scan: at most 32 regions. */
static inline const struct vr_region *vr_mem_find(const struct vr_mem *m, uint64_t gpa)
{
    for (uint32_t i = 0; i < m->nregions; i++) {
        const struct vr_region *r = &m->regions[i];
        if (gpa >= r->gpa && gpa - r->gpa < r->size)
            return r;
    }
    return NULL;
}

/* Fetch the line at p for writing (in the exclusive state, so the store
 * that follows need not wait for the other CPU to give it up).  Like every
 * prefetch it never faults; x86-64 CPUs without PREFETCHW run it as a NOP. */
static inline void vr_prefetch_write(const void *p)
{
#if defined(__x86_64__)
    __asm__ volatile("prefetchw %0" : : "m"(*(const char *)p));
#else
    __builtin_prefetch(p, 1);
#endif
}

/* Single-copy accessors for ring fields shared with the guest (vring.c,
 * packed.c): one load or store each, never torn or merged. */
static inline uint16_t vr_ld16(volatile uint8_t *p)
{
    return __atomic_load_n((uint16_t *)p, __ATOMIC_RELAXED);
}

static inline uint16_t vr_ld16_acquire(volatile uint8_t *p)
{
    return __atomic_load_n((uint16_t *)p, __ATOMIC_ACQUIRE);
}

static inline void vr_st16(volatile uint8_t *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELAXED);
}

static inline void vr_st16_release(volatile uint8_t *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
}

/* Packed rings: slot `slot` of the descriptor ring; move a position
 * (slot and wrap counter) on by n slots. */
#define VR_PDESC(q, slot) ((q)->desc + 16u * (slot))
#define VR_PK_NONE 0xffff
static inline void vr_pk_advance(const struct vr_queue *q, uint16_t *slot, uint8_t *wrap,
                                 uint32_t n)
{
    uint32_t s = *slot + n;
    if (s >= q->num) {
        s -= q->num;
        *wrap ^= 1;
    }
    *slot = (uint16_t)s;
}

static inline void vr_st32(volatile uint8_t *p, uint32_t v)
{
    __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELAXED);
}

#endif
