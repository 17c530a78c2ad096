/*
 * driver.c: driver side of a virtio split or packed virtqueue and the
 * latency histogram of the device loads. See driver.h for the theory of
 * operation.
 */
#define _GNU_SOURCE
#include "clock.h"
#include "driver.h"

#include <errno.h>
#include <poll.h>
#include <stddef.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "driver.c writes virtio 1.x little-endian rings with native stores"
#endif

_Static_assert(DRV_HIST_BUCKETS ==
                   (DRV_HIST_MAX_EXP - DRV_HIST_SUB_BITS + 1) << DRV_HIST_SUB_BITS,
               "DRV_HIST_BUCKETS does not match its formula");

/* 2.7.5 The Virtqueue Descriptor Table */
struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2

/* 2.7.6 The Virtqueue Available Ring; ring[size] is used_event */
struct vring_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];
};

/* 2.7.8 The Virtqueue Used Ring; ring[size] is followed by avail_event */
struct vring_used_elem {
    uint32_t id;
    uint32_t len;
};
struct vring_used {
    uint16_t flags;
    uint16_t idx;
    struct vring_used_elem ring[];
};
#define VRING_USED_F_NO_NOTIFY 1

/* 2.8.13 packed descriptor; the event suppression areas are {off_wrap, flags} */
struct pdesc {
    uint64_t addr;
    uint32_t len;
    uint16_t id;
    uint16_t flags;
};
#define PDESC_F_AVAIL (1u << 7)
#define PDESC_F_USED (1u << 15)
#define EVENT_ENABLE 0
#define EVENT_DISABLE 1
#define EVENT_DESC 2

enum { RING_DESC, RING_AVAIL, RING_USED };

/* ---- small helpers ---------------------------------------------------- */

static uint64_t align_up(uint64_t v, uint64_t a)
{
    return (v + a - 1) & ~(a - 1);
}

static int ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return a < b + blen && b < a + alen;
}

/* [off, off + len) lies inside [0, limit), without 64-bit overflow. */
static int range_ok(uint64_t off, uint64_t len, uint64_t limit)
{
    return off <= limit && len <= limit - off;
}

static int fail(struct drv_queue *q, int code, uint32_t value)
{
    q->broken = code;
    q->bad_value = value;
    return code;
}

static uint16_t *used_event(struct drv_queue *q)
{
    return &q->avail->ring[q->size]; /* 2.7.10 */
}

static uint16_t *avail_event(struct drv_queue *q)
{
    return (uint16_t *)&q->used->ring[q->size]; /* 2.7.10 */
}

/* 2.7.10: the "other side asked to be notified" test, as in Linux. */
static int need_event(uint16_t event, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old_idx);
}

/* ---- layout and init -------------------------------------------------- */

static uint64_t desc_bytes(uint32_t size) { return 16ull * size; }
static uint64_t avail_bytes(uint32_t size) { return 6 + 2ull * size; }
static uint64_t used_bytes(uint32_t size) { return 6 + 8ull * size; }

static int size_ok(uint32_t size)
{
    /* 2.7: Queue Size is a power of 2, at most 32768 */
    return size != 0 && size <= DRV_MAX_QUEUE_SIZE && (size & (size - 1)) == 0;
}

int drv_packed_layout(uint32_t size, struct drv_ring_layout *out)
{
    if (size == 0 || size > DRV_MAX_QUEUE_SIZE)
        return DRV_E_ARG;
    out->desc_offset = 0;
    out->avail_offset = desc_bytes(size); /* a multiple of 16: 4-aligned */
    out->used_offset = out->avail_offset + 4;
    out->total_bytes = align_up(out->used_offset + 4, 4096);
    return DRV_OK;
}

int drv_ring_layout(uint32_t size, struct drv_ring_layout *out)
{
    if (!size_ok(size))
        return DRV_E_ARG;
    out->desc_offset = 0;
    out->avail_offset = desc_bytes(size);
    /* 2.7: used ring needs 4-byte alignment; a page keeps it on its own page */
    out->used_offset = align_up(out->avail_offset + avail_bytes(size), 4096);
    out->total_bytes = align_up(out->used_offset + used_bytes(size), 4096);
    return DRV_OK;
}

static int place_rings(struct drv_queue *q, const struct drv_queue_config *c)
{
    static const uint64_t split_align[3] = {16, 2, 4}; /* 2.7 alignment table */
    static const uint64_t packed_align[3] = {16, 4, 4}; /* 2.8.10.1 */
    const uint64_t *align = c->packed ? packed_align : split_align;
    const uint64_t off[3] = {c->desc_offset, c->avail_offset, c->used_offset};
    uint64_t len[3] = {desc_bytes(c->size), avail_bytes(c->size), used_bytes(c->size)};
    if (c->packed)
        len[1] = len[2] = 4;

    for (int i = 0; i < 3; i++) {
        if (!range_ok(off[i], len[i], c->area_size))
            return DRV_E_RANGE;
        if ((c->gpa_base + off[i]) % align[i] || (uintptr_t)(q->area + off[i]) % align[i])
            return DRV_E_ALIGN;
        for (int j = 0; j < i; j++)
            if (ranges_overlap(off[i], len[i], off[j], len[j]))
                return DRV_E_RANGE;
        q->ring_off[i] = off[i];
        q->ring_len[i] = len[i];
    }
    q->desc = (struct vring_desc *)(q->area + off[RING_DESC]);
    q->avail = (struct vring_avail *)(q->area + off[RING_AVAIL]);
    q->used = (struct vring_used *)(q->area + off[RING_USED]);
    return DRV_OK;
}

int drv_queue_init(struct drv_queue *q, struct drv_desc_state *st, uint8_t *area,
                   const struct drv_queue_config *c)
{
    memset(q, 0, sizeof(*q));
    q->broken = DRV_E_ARG; /* stays broken unless init completes */
    int sized = c->packed ? c->size != 0 && c->size <= DRV_MAX_QUEUE_SIZE : size_ok(c->size);
    if (!area || !st || !sized || c->kick_fd < 0 || c->call_fd < 0)
        return DRV_E_ARG;
    if (c->gpa_base + c->area_size < c->gpa_base)
        return DRV_E_RANGE;
    q->area = area;
    q->area_size = c->area_size;
    q->gpa_base = c->gpa_base;
    q->size = c->size;
    int rc = place_rings(q, c);
    if (rc)
        return q->broken = rc;

    for (int i = 0; i < 3; i++)
        memset(q->area + q->ring_off[i], 0, q->ring_len[i]);
    for (uint32_t i = 0; i < c->size; i++) {
        st[i].next = (uint16_t)(i + 1 < c->size ? i + 1 : 0);
        st[i].chain_len = 0;
        st[i].cookie = 0;
        st[i].stamp = 0;
    }
    q->st = st;
    q->free_head = 0;
    q->num_free = c->size;
    q->kick_fd = c->kick_fd;
    q->call_fd = c->call_fd;
    q->event_idx = c->event_idx != 0;
    if (c->packed) {
        /* a fresh packed ring: both wrap counters 1, the device notifies
         * (driver event flags ENABLE, zeroed above) */
        q->packed = 1;
        q->avail_wrap = q->used_wrap = 1;
        q->broken = 0;
        return DRV_OK;
    }
    /* The back-end starts from base_index (SET_VRING_BASE); so do both rings. */
    q->avail_idx = q->kicked_idx = q->last_used = c->base_index;
    q->avail->idx = c->base_index;
    q->used->idx = c->base_index;
    *used_event(q) = c->base_index;
    *avail_event(q) = c->base_index; /* else the first kick after a base > 0 is lost */
    q->broken = 0;
    return DRV_OK;
}

/* ---- add, kick -------------------------------------------------------- */

static int check_segs(const struct drv_queue *q, const struct drv_seg *segs, uint32_t n)
{
    int seen_writable = 0;
    for (uint32_t i = 0; i < n; i++) {
        const struct drv_seg s = segs[i];
        if (s.len == 0)
            return DRV_E_ARG;
        if (s.gpa < q->gpa_base || !range_ok(s.gpa - q->gpa_base, s.len, q->area_size))
            return DRV_E_RANGE;
        /* 2.7.4.2: device-writable descriptors follow device-readable ones */
        if (seen_writable && !s.writable)
            return DRV_E_ORDER;
        seen_writable |= s.writable != 0;
    }
    return DRV_OK;
}

/* Writes the chain into free descriptors and publishes it; returns the head. */
static uint16_t publish_chain(struct drv_queue *q, const struct drv_seg *segs, uint32_t n)
{
    uint16_t head = q->free_head, i = head;
    for (uint32_t k = 0; k < n; k++) {
        struct vring_desc d = {
            .addr = segs[k].gpa,
            .len = segs[k].len,
            .flags = (uint16_t)((k + 1 < n ? VRING_DESC_F_NEXT : 0) |
                                (segs[k].writable ? VRING_DESC_F_WRITE : 0)),
            .next = k + 1 < n ? q->st[i].next : 0,
        };
        q->desc[i] = d;
        i = q->st[i].next;
    }
    q->free_head = i;
    q->num_free -= n;
    q->st[head].chain_len = (uint16_t)n;
    q->inflight++;
    /* 2.7.13: ring entry first, then a release store of avail->idx */
    q->avail->ring[q->avail_idx & (q->size - 1)] = head;
    q->avail_idx++;
    __atomic_store_n(&q->avail->idx, q->avail_idx, __ATOMIC_RELEASE);
    return head;
}

/* Packed (2.8.6, 2.8.21): the chain in the next n ring slots, under one
 * buffer id from the free list; the first descriptor's flags are stored
 * last, released, and make the whole chain available. */
static uint16_t publish_packed(struct drv_queue *q, const struct drv_seg *segs, uint32_t n)
{
    uint16_t id = q->free_head, first_slot = q->avail_slot, first_flags = 0;
    q->free_head = q->st[id].next;
    for (uint32_t k = 0; k < n; k++) {
        uint16_t flags = (uint16_t)((k + 1 < n ? VRING_DESC_F_NEXT : 0) |
                                    (segs[k].writable ? VRING_DESC_F_WRITE : 0) |
                                    (q->avail_wrap ? PDESC_F_AVAIL : PDESC_F_USED));
        struct pdesc *d = (struct pdesc *)q->desc + q->avail_slot;
        d->addr = segs[k].gpa;
        d->len = segs[k].len;
        d->id = id;
        if (k == 0)
            first_flags = flags;
        else
            d->flags = flags;
        if (++q->avail_slot == q->size) {
            q->avail_slot = 0;
            q->avail_wrap ^= 1;
        }
    }
    q->num_free -= n;
    q->st[id].chain_len = (uint16_t)n;
    q->inflight++;
    q->avail_idx++;
    __atomic_store_n(&((struct pdesc *)q->desc + first_slot)->flags, first_flags, __ATOMIC_RELEASE);
    return id;
}

int drv_add(struct drv_queue *q, const struct drv_seg *segs, uint32_t n)
{
    if (q->broken)
        return DRV_E_BROKEN;
    if (n == 0)
        return DRV_E_ARG;
    if (n > q->num_free)
        return DRV_E_NOSPACE;
    int rc = check_segs(q, segs, n);
    if (rc)
        return rc;
    return q->packed ? publish_packed(q, segs, n) : publish_chain(q, segs, n);
}

static uint16_t *device_event(struct drv_queue *q, int field) /* 0 off_wrap, 1 flags */
{
    return (uint16_t *)(q->area + q->ring_off[RING_USED]) + field;
}

static uint16_t *driver_event(struct drv_queue *q, int field)
{
    return (uint16_t *)(q->area + q->ring_off[RING_AVAIL]) + field;
}

/* Packed kick suppression (2.8.10): only DISABLE stops a kick. A DESC
 * request (which this back-end never makes) is honoured by kicking anyway:
 * a kick too many is harmless. */
static int packed_kick_needed(struct drv_queue *q)
{
    return __atomic_load_n(device_event(q, 1), __ATOMIC_RELAXED) != EVENT_DISABLE;
}

int drv_kick(struct drv_queue *q)
{
    if (q->broken)
        return DRV_E_BROKEN;
    uint16_t old = q->kicked_idx, new_idx = q->avail_idx;
    if (old == new_idx)
        return 0;
    q->kicked_idx = new_idx;
    /* 2.7.13.4: full fence between publishing avail->idx and reading the
     * device's suppression state */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    int needed;
    if (q->packed)
        needed = packed_kick_needed(q);
    else if (q->event_idx)
        needed = need_event(__atomic_load_n(avail_event(q), __ATOMIC_RELAXED), new_idx, old);
    else
        needed = !(__atomic_load_n(&q->used->flags, __ATOMIC_RELAXED) & VRING_USED_F_NO_NOTIFY);
    if (!needed)
        return 0;
    uint64_t one = 1;
    if (write(q->kick_fd, &one, sizeof(one)) != sizeof(one) && errno != EAGAIN) {
        q->sys_errno = errno;
        return DRV_E_SYS;
    }
    q->kicks++;
    return 1;
}

/* ---- reap, wait ------------------------------------------------------- */

static void free_chain(struct drv_queue *q, uint16_t head)
{
    uint16_t n = q->st[head].chain_len, last = head;
    for (uint16_t k = 1; k < n; k++) /* n <= size: bounded walk of our own links */
        last = q->st[last].next;
    q->st[last].next = q->free_head;
    q->free_head = head;
    q->num_free += n;
    q->st[head].chain_len = 0;
    q->inflight--;
}

static uint16_t used_idx_acquire(struct drv_queue *q)
{
    return __atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE); /* 2.7.14 */
}

static struct pdesc *used_slot(struct drv_queue *q)
{
    return (struct pdesc *)q->desc + q->used_slot;
}

/* 2.8.1: the descriptor at the driver's used position is used when AVAIL
 * and USED both equal the used wrap counter. */
static int packed_used_ready(struct drv_queue *q)
{
    uint16_t f = __atomic_load_n(&used_slot(q)->flags, __ATOMIC_ACQUIRE);
    return !!(f & PDESC_F_AVAIL) == q->used_wrap && !!(f & PDESC_F_USED) == q->used_wrap;
}

int drv_used_pending(struct drv_queue *q)
{
    if (q->packed)
        return packed_used_ready(q);
    return used_idx_acquire(q) != q->last_used;
}

static int reap_packed(struct drv_queue *q, struct drv_used_elem *out, uint32_t max)
{
    uint32_t n = 0;
    while (n < max && q->inflight && packed_used_ready(q)) {
        struct pdesc d = *used_slot(q); /* a local copy, checked */
        if (d.id >= q->size)
            return fail(q, DRV_E_USED_ID, d.id);
        uint16_t len = q->st[d.id].chain_len;
        if (len == 0)
            return fail(q, DRV_E_NOT_INFLIGHT, d.id);
        /* our own count of the chain's slots, never the device's word */
        uint32_t slot = q->used_slot + len;
        if (slot >= q->size) {
            slot -= q->size;
            q->used_wrap ^= 1;
        }
        q->used_slot = (uint16_t)slot;
        q->st[d.id].chain_len = 0;
        q->st[d.id].next = q->free_head;
        q->free_head = d.id;
        q->num_free += len;
        q->inflight--;
        out[n].id = d.id;
        out[n].len = d.len;
        n++;
    }
    return (int)n;
}

int drv_reap(struct drv_queue *q, struct drv_used_elem *out, uint32_t max)
{
    if (q->broken)
        return DRV_E_BROKEN;
    if (q->packed)
        return reap_packed(q, out, max);
    uint16_t idx = used_idx_acquire(q);
    uint16_t pending = (uint16_t)(idx - q->last_used);
    /* 2.7.8: the device cannot return more chains than are in flight */
    if (pending > q->inflight)
        return fail(q, DRV_E_USED_JUMP, pending);
    uint32_t n = 0;
    for (; n < pending && n < max; n++) {
        struct vring_used_elem e = q->used->ring[q->last_used & (q->size - 1)];
        if (e.id >= q->size) /* 2.7.8: id is a descriptor chain head */
            return fail(q, DRV_E_USED_ID, e.id);
        if (q->st[e.id].chain_len == 0) /* not a head we published */
            return fail(q, DRV_E_NOT_INFLIGHT, e.id);
        free_chain(q, (uint16_t)e.id);
        q->last_used++;
        out[n].id = e.id;
        out[n].len = e.len;
    }
    return (int)n;
}

/* Asks for a call on the next used entry; true if one is already there. */
static int arm_and_check(struct drv_queue *q)
{
    if (q->packed) {
        if (q->event_idx) {
            /* 2.8.10: a call when the used descriptor at our position lands */
            __atomic_store_n(driver_event(q, 0), (uint16_t)(q->used_slot | q->used_wrap << 15),
                             __ATOMIC_RELAXED);
            __atomic_store_n(driver_event(q, 1), EVENT_DESC, __ATOMIC_RELEASE);
        }
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        return packed_used_ready(q);
    }
    if (q->event_idx)
        __atomic_store_n(used_event(q), q->last_used, __ATOMIC_RELAXED);
    /* 2.7.10: fence between writing used_event and re-reading used->idx */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return used_idx_acquire(q) != q->last_used;
}

int drv_wait(struct drv_queue *q, int64_t timeout_ns)
{
    if (q->broken)
        return DRV_E_BROKEN;
    if (arm_and_check(q))
        return 1;
    struct pollfd pfd = {.fd = q->call_fd, .events = POLLIN};
    struct timespec ts = {.tv_sec = timeout_ns / 1000000000, .tv_nsec = timeout_ns % 1000000000};
    int rc = ppoll(&pfd, 1, timeout_ns < 0 ? NULL : &ts, NULL);
    if (rc < 0 && errno == EINTR)
        return 0;
    if (rc < 0) {
        q->sys_errno = errno;
        return DRV_E_SYS;
    }
    if (rc == 0)
        return 0;
    uint64_t count;
    if (read(q->call_fd, &count, sizeof(count)) < 0 && errno != EAGAIN) {
        q->sys_errno = errno;
        return DRV_E_SYS;
    }
    q->wakeups++;
    return 1;
}

/* ---- latency histogram ------------------------------------------------ */

unsigned drv_hist_bucket(uint64_t v)
{
    if (v < (1u << DRV_HIST_SUB_BITS))
        return (unsigned)v;
    unsigned msb = 63u - (unsigned)__builtin_clzll(v);
    if (msb >= DRV_HIST_MAX_EXP)
        return DRV_HIST_BUCKETS - 1;
    unsigned shift = msb - DRV_HIST_SUB_BITS;
    unsigned sub = (unsigned)(v >> shift) & ((1u << DRV_HIST_SUB_BITS) - 1);
    return ((shift + 1) << DRV_HIST_SUB_BITS) + sub;
}

/* Lowest value that falls into bucket b. */
static uint64_t hist_floor(unsigned b)
{
    if (b < (1u << DRV_HIST_SUB_BITS))
        return b;
    unsigned shift = (b >> DRV_HIST_SUB_BITS) - 1;
    uint64_t sub = b & ((1u << DRV_HIST_SUB_BITS) - 1);
    return ((1ull << DRV_HIST_SUB_BITS) + sub) << shift;
}

uint64_t drv_hist_percentile(const uint64_t *hist, uint64_t max_ns, double fraction)
{
    uint64_t total = 0;
    for (unsigned b = 0; b < DRV_HIST_BUCKETS; b++)
        total += hist[b];
    if (total == 0)
        return 0;
    if (fraction < 0.0)
        fraction = 0.0;
    uint64_t rank = (uint64_t)(fraction * (double)total); /* 0-based */
    if (rank >= total)
        rank = total - 1;
    uint64_t seen = 0;
    for (unsigned b = 0; b < DRV_HIST_BUCKETS; b++) {
        seen += hist[b];
        if (seen > rank) {
            if (b == DRV_HIST_BUCKETS - 1)
                return max_ns;
            uint64_t lo = hist_floor(b), hi = hist_floor(b + 1);
            return lo + (hi - lo) / 2; /* midpoint: error <= half a bucket */
        }
    }
    return max_ns;
}
