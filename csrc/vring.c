/*
 * vring.c - split virtqueue, device side: set-up, pop, push, notification
 * suppression.  Inflight tracking is in inflight.c.  See vring.h for the theory of
 * operation.  Spec references are to virtio 1.2, section 2.7 ("Split
 * Virtqueues"), and to QEMU docs/interop/vhost-user.rst.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vring.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "virtio 1.x rings are little-endian; big-endian hosts are not supported"
#endif

/* Local copy of a descriptor (virtio 1.2, 2.7.5). */
struct vr_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};
_Static_assert(sizeof(struct vr_desc) == 16, "descriptor is 16 bytes");

#define AVAIL_FLAGS(q) ((q)->avail)
#define AVAIL_IDX(q) ((q)->avail + 2)
#define AVAIL_RING(q, i) ((q)->avail + 4 + 2u * (i))
#define USED_EVENT(q) ((q)->avail + 4 + 2u * (q)->num)
#define USED_FLAGS(q) ((q)->used)
#define USED_IDX(q) ((q)->used + 2)
#define USED_RING(q, i) ((q)->used + 4 + 8u * (i))
#define AVAIL_EVENT(q) ((q)->used + 4 + 8u * (q)->num)

int vr_queue_fail(struct vr_queue *q, int code, const char *fmt, ...)
{
    if (!q->broken) {
        va_list ap;
        q->broken = code;
        va_start(ap, fmt);
        vsnprintf(q->errmsg, sizeof(q->errmsg), fmt, ap);
        va_end(ap);
    }
    return -code;
}

/* ---- set-up ---- */

void vr_queue_init(struct vr_queue *q, uint32_t index)
{
    memset(q, 0, sizeof(*q));
    q->index = index;
    q->kick_fd = -1;
    q->call_fd = -1;
}

int vr_queue_set_num(struct vr_queue *q, uint32_t num)
{
    /* virtio 1.2, 2.7: split Queue Size is a power of 2, at most 32768;
     * 2.8: a packed one is any size up to 32768. */
    if (q->started || num == 0 || num > VR_MAX_QUEUE_SIZE || (!q->packed && (num & (num - 1))))
        return -VR_E_INVAL;
    if (num != q->num)
        vr_packed_release(q);
    q->num = num;
    return VR_OK;
}

int vr_queue_set_packed(struct vr_queue *q, int on)
{
    if (q->started)
        return -VR_E_STATE;
    if (q->packed != !!on)
        vr_packed_release(q);
    q->packed = !!on;
    return VR_OK;
}

int vr_queue_set_addr(struct vr_queue *q, uint64_t desc, uint64_t avail,
                      uint64_t used, int is_gpa)
{
    if (q->started)
        return -VR_E_STATE;
    q->desc_addr = desc;
    q->avail_addr = avail;
    q->used_addr = used;
    q->addr_is_gpa = is_gpa;
    return VR_OK;
}

/* Split: the avail index.  Packed (vhost-user.rst, SET_VRING_BASE): bits
 * 0-14 the next avail slot, 15 its wrap counter, 16-30 the next used slot,
 * 31 its wrap counter; the slots are checked against the size at start.
 * A new base forgets the chains in flight. */
int vr_queue_set_base(struct vr_queue *q, uint32_t base)
{
    if (q->started)
        return -VR_E_STATE;
    if (!q->packed) {
        if (base > 0xffff)
            return -VR_E_INVAL;
        q->last_avail_idx = (uint16_t)base;
        return VR_OK;
    }
    q->last_avail_idx = base & 0x7fff;
    q->avail_wrap = (base >> 15) & 1;
    q->used_idx = (base >> 16) & 0x7fff;
    q->used_wrap = base >> 31;
    vr_packed_forget(q);
    return VR_OK;
}

uint32_t vr_queue_get_base(const struct vr_queue *q)
{
    if (!q->packed)
        return q->last_avail_idx;
    return (uint32_t)q->last_avail_idx | (uint32_t)q->avail_wrap << 15
           | (uint32_t)q->used_idx << 16 | (uint32_t)q->used_wrap << 31;
}

void vr_queue_set_event_idx(struct vr_queue *q, int on)
{
    q->event_idx = !!on;
}

void vr_queue_set_fds(struct vr_queue *q, int kick_fd, int call_fd)
{
    q->kick_fd = kick_fd;
    q->call_fd = call_fd;
}

int vr_queue_set_inflight(struct vr_queue *q, void *region, uint64_t size)
{
    if (q->started)
        return -VR_E_STATE;
    q->inflight = region;
    q->inflight_size = region ? size : 0;
    return VR_OK;
}

static uint8_t *map_ring(const struct vr_queue *q, const struct vr_mem *m,
                         uint64_t addr, uint64_t len)
{
    return q->addr_is_gpa ? vr_mem_gpa_contig(m, addr, len)
                          : vr_mem_uva_contig(m, addr, len);
}

/* Translate and check the three ring parts against a memory table. */
static int map_rings(struct vr_queue *q, const struct vr_mem *m)
{
    uint32_t n = q->num;
    /* virtio 1.2, 2.7 (table "Virtqueue Part Alignment Size"): descriptor
     * table 16, available ring 2, used ring 4 bytes; 2.8: packed ring 16,
     * event suppression areas 4 bytes each. */
    uint64_t amask = q->packed ? 3 : 1;
    uint64_t asize = q->packed ? VR_EVENT_AREA_SIZE : vr_avail_size(n);
    uint64_t usize = q->packed ? VR_EVENT_AREA_SIZE : vr_used_size(n);
    if ((q->desc_addr & 15) || (q->avail_addr & amask) || (q->used_addr & 3))
        return -VR_E_ALIGN;
    /* Each part, including the event fields, must lie inside one region. */
    uint8_t *d = map_ring(q, m, q->desc_addr, vr_desc_size(n));
    uint8_t *a = map_ring(q, m, q->avail_addr, asize);
    uint8_t *u = map_ring(q, m, q->used_addr, usize);
    if (!d || !a || !u)
        return -VR_E_RING;
    if (((uintptr_t)d & 15) || ((uintptr_t)a & amask) || ((uintptr_t)u & 3))
        return -VR_E_ALIGN;
    /* the dirty log is in guest-physical pages; packed used descriptors
     * land in the descriptor ring, so log them at its address */
    uint64_t dgpa = q->desc_addr;
    if (!q->addr_is_gpa && vr_mem_uva_to_gpa(m, q->desc_addr, &dgpa) != VR_OK)
        return -VR_E_RING;
    q->desc = d;
    q->avail = a;
    q->used = u;
    q->desc_gpa = dgpa;
    q->mem = m;
    return VR_OK;
}

int vr_queue_start(struct vr_queue *q, const struct vr_mem *mem)
{
    int rc;

    if (q->started)
        return -VR_E_STATE;
    if (q->num == 0 || vr_mem_check(mem) != VR_OK)
        return -VR_E_INVAL;
    rc = map_rings(q, mem);
    if (rc < 0)
        return rc;
    if (q->packed) {
        /* packed.c; with an inflight region, inflight_packed.c */
        rc = vr_packed_prepare(q);
        if (rc < 0)
            return rc;
        q->signalled_used_valid = 0;
        q->started = 1;
        return VR_OK;
    }
    q->used_idx = vr_ld16(USED_IDX(q));
    q->signalled_used = q->used_idx;
    q->signalled_used_valid = 0;
    q->nresubmit = q->resubmit_pos = 0;
    if (q->inflight) {
        q->resubmit = malloc((size_t)q->num * sizeof(uint16_t));
        if (!q->resubmit)
            return -VR_E_NOMEM;
        rc = vr_inflight_recover(q);
        if (rc < 0) {
            free(q->resubmit);
            q->resubmit = NULL;
            return rc;
        }
    }
    q->shadow_avail = q->hinted = q->last_avail_idx;
    q->started = 1;
    return VR_OK;
}

int vr_queue_set_mem(struct vr_queue *q, const struct vr_mem *mem)
{
    if (vr_mem_check(mem) != VR_OK)
        return -VR_E_INVAL;
    if (!q->started) {
        q->mem = mem;
        return VR_OK;
    }
    return map_rings(q, mem);
}

void vr_queue_stop(struct vr_queue *q)
{
    q->started = 0;
    free(q->resubmit);
    q->resubmit = NULL;
    q->nresubmit = q->resubmit_pos = 0;
}

void vr_queue_reset(struct vr_queue *q)
{
    uint32_t index = q->index;
    vr_queue_stop(q);
    vr_packed_release(q);
    vr_queue_init(q, index);
}

void vr_queue_fini(struct vr_queue *q)
{
    vr_queue_stop(q);
    vr_packed_release(q);
}

int vr_queue_broken(const struct vr_queue *q) { return q->broken; }
const char *vr_queue_error(const struct vr_queue *q) { return q->errmsg; }

void vr_queue_get_stats(const struct vr_queue *q, struct vr_stats *out)
{
    *out = q->stats;
}

/* ---- pop ---- */

static int read_desc(struct vr_queue *q, int indirect, uint64_t table,
                     uint32_t i, struct vr_desc *d)
{
    if (!indirect) {
        /* Copy to a local before any check: the guest may change it. */
        memcpy(d, (const uint8_t *)q->desc + 16u * i, sizeof(*d));
        return VR_OK;
    }
    return vr_mem_read(q->mem, table + 16ull * i, d, sizeof(*d));
}

/* Append one guest buffer to a chain being popped (split and packed):
 * translate it into segments, keep readable before writable, bound the
 * totals.  Breaks the queue on a violation. */
int vr_chain_add(struct vr_queue *q, struct vr_chain *c, uint64_t addr, uint32_t len,
                 int writable, int *seen_write)
{
    uint16_t head = c->head;
    /* 2.7.4.2 (split) and 2.8 "Write Flag" (packed): device-readable
     * descriptors precede device-writable ones. */
    if (writable)
        *seen_write = 1;
    else if (*seen_write)
        return vr_queue_fail(q, VR_E_ORDER,
                             "readable descriptor after a writable one on queue %u at head %u",
                             q->index, head);
    uint32_t first = c->nseg;
    int rc = vr_mem_translate(q->mem, addr, len, c->segs, c->cap, &c->nseg);
    if (rc == VR_E_CHAIN)
        return vr_queue_fail(q, VR_E_CHAIN, "descriptor chain too long on queue %u at head %u",
                             q->index, head);
    if (rc != VR_OK)
        return vr_queue_fail(q, VR_E_ADDRESS,
                             "buffer 0x%llx+%u outside guest memory on queue %u at head %u",
                             (unsigned long long)addr, len, q->index, head);
    if (writable) {
        for (uint32_t k = first; k < c->nseg; k++)
            c->segs[k].writable = 1;
        c->write_len += len;
    } else {
        c->read_len += len;
        c->nread = (uint16_t)c->nseg;
    }
    /* The used element's len is 32 bits: a chain whose writable (or
     * readable) total exceeds that cannot be completed correctly. */
    if (c->write_len > UINT32_MAX || c->read_len > UINT32_MAX)
        return vr_queue_fail(q, VR_E_CHAIN, "descriptor chain length overflow on queue %u at head %u",
                             q->index, head);
    return VR_OK;
}

static int walk_chain(struct vr_queue *q, uint16_t head, struct vr_chain *c)
{
    uint32_t size = q->num, i = head, hops = 0;
    uint64_t table = 0;
    int indirect = 0, seen_write = 0, rc;
    struct vr_desc d;

    c->head = head;
    c->nseg = c->nread = 0;
    c->read_len = c->write_len = 0;
    /* The common shape (a net frame, a vsock packet): one direct descriptor
     * whose buffer lies in one region.  Anything else takes the general walk
     * below, which reads the descriptor afresh. */
    read_desc(q, 0, 0, head, &d);
    if (!(d.flags & (VR_DESC_F_NEXT | VR_DESC_F_INDIRECT)) && d.len && c->cap) {
        const struct vr_region *r = vr_mem_find(q->mem, d.addr);
        if (r && d.len <= r->size - (d.addr - r->gpa)) {
            int w = (d.flags & VR_DESC_F_WRITE) != 0;
            c->segs[0] = (struct vr_seg){.offset = d.addr - r->gpa, .len = d.len,
                                         .region = (uint16_t)(r - q->mem->regions), .writable = w};
            c->nseg = 1;
            if (w) {
                c->write_len = d.len;
            } else {
                c->read_len = d.len;
                c->nread = 1;
            }
            return VR_OK;
        }
    }
    for (;;) {
        /* virtio 1.2, 2.7.5.2: a chain is at most Queue Size long (an
         * indirect table at most its entry count): the hop budget turns
         * a descriptor loop into an error. */
        if (++hops > size)
            return vr_queue_fail(q, VR_E_LOOP, "descriptor loop on queue %u at head %u",
                                 q->index, head);
        if (read_desc(q, indirect, table, i, &d) < 0)
            return vr_queue_fail(q, VR_E_ADDRESS,
                                 "indirect table outside guest memory on queue %u at head %u",
                                 q->index, head);
        if (d.flags & VR_DESC_F_INDIRECT) {
            /* virtio 1.2, 2.7.5.3.1: no indirect inside an indirect table. */
            if (indirect)
                return vr_queue_fail(q, VR_E_NESTED, "nested indirect descriptor on queue %u at head %u",
                                     q->index, head);
            /* 2.7.5.3.1: the table is a whole number of 16-byte entries. */
            if (d.len == 0 || (d.len & 15))
                return vr_queue_fail(q, VR_E_INDIRECT_LEN,
                                     "indirect table length %u not a non-zero multiple of 16 on queue %u at head %u",
                                     d.len, q->index, head);
            /* 2.7.5: addr + len must not wrap. */
            if (d.addr + (d.len - 1) < d.addr)
                return vr_queue_fail(q, VR_E_ADDRESS, "indirect table address overflow on queue %u at head %u",
                                     q->index, head);
            /* 2.7.5.3.2: the device ignores NEXT on the indirect
             * descriptor; the chain continues inside the table only. */
            table = d.addr;
            size = d.len / 16;
            if (size > 65536)
                size = 65536; /* next is 16 bits: larger is unreachable */
            i = 0;
            hops = 0;
            indirect = 1;
            continue;
        }
        rc = vr_chain_add(q, c, d.addr, d.len, d.flags & VR_DESC_F_WRITE, &seen_write);
        if (rc < 0)
            return rc;
        if (!(d.flags & VR_DESC_F_NEXT))
            return VR_OK;
        /* 2.7.5: next must index the same table. */
        if (d.next >= size)
            return vr_queue_fail(q, VR_E_INDEX, "next index %u out of range on queue %u at head %u",
                                 d.next, q->index, head);
        i = d.next;
    }
}

/* Hints for the pops to come (split rings, read-only): the descriptors of
 * the next n chains pending in the avail ring, then the lines of the first
 * `bytes` (at most 256) of each one's first buffer, for writing when
 * `write`.  Issued together, the misses on lines the driver wrote on another
 * CPU overlap instead of coming one per pop.  Entries hinted before
 * (q->hinted) are not fetched again.  A stale or bogus entry costs a useless
 * prefetch. */
void vr_prefetch_avail(struct vr_queue *q, uint32_t n, int write, uint32_t bytes)
{
    if (!q->started || q->packed || q->broken || q->resubmit_pos < q->nresubmit)
        return;
    uint16_t pending = (uint16_t)(q->shadow_avail - q->last_avail_idx);
    if (pending < n || pending > q->num)
        pending = (uint16_t)(vr_ld16(AVAIL_IDX(q)) - q->last_avail_idx);
    if (pending > q->num)
        return;
    if (n > pending)
        n = pending;
    if (bytes > 256)
        bytes = 256;
    uint16_t done = (uint16_t)(q->hinted - q->last_avail_idx);
    if (done > pending)   /* a cursor left from before the pops caught up */
        done = 0;
    if (done >= n)
        return;
    uint16_t base = q->last_avail_idx, mask = (uint16_t)(q->num - 1);
    q->hinted = (uint16_t)(base + n);
    for (uint32_t k = done; k < n; k++) {
        uint16_t h = vr_ld16(AVAIL_RING(q, (uint16_t)(base + k) & mask));
        if (h < q->num)
            __builtin_prefetch((const uint8_t *)q->desc + 16u * h);
    }
    for (uint32_t k = done; k < n && bytes; k++) {
        uint16_t h = vr_ld16(AVAIL_RING(q, (uint16_t)(base + k) & mask));
        if (h >= q->num)
            continue;
        struct vr_desc d;
        memcpy(&d, (const uint8_t *)q->desc + 16u * h, sizeof(d));
        uint32_t len = d.len < bytes ? d.len : bytes;
        if ((d.flags & VR_DESC_F_INDIRECT) || len == 0)
            continue;
        const uint8_t *p = vr_mem_gpa_contig(q->mem, d.addr, len);
        if (!p)
            continue;
        const uint8_t *line = (const uint8_t *)((uintptr_t)p & ~(uintptr_t)63);
        for (; line < p + len; line += 64) {
            if (write)
                vr_prefetch_write(line);
            else
                __builtin_prefetch(line);
        }
    }
}

/* Keep the hints ahead of the pops (for writing `bytes` of each buffer):
 * when fewer than 4 pending chains are hinted, hint up to 16. */
void vr_prefetch_next(struct vr_queue *q, uint32_t bytes)
{
    if ((uint16_t)(q->hinted - q->last_avail_idx) < 4 ||
        (uint16_t)(q->hinted - q->last_avail_idx) > q->num)
        vr_prefetch_avail(q, 16, 1, bytes);
}

int vr_avail_pending(struct vr_queue *q)
{
    if (!q->started || q->broken)
        return 0;
    if (q->resubmit_pos < q->nresubmit)
        return 1;
    if (q->packed)
        return vr_packed_avail_pending(q);
    return vr_ld16_acquire(AVAIL_IDX(q)) != q->last_avail_idx;
}

/* 1 = popped into c, 0 = nothing (or queue broken earlier), <0 = -error. */
int vr_pop(struct vr_queue *q, struct vr_chain *c)
{
    if (q->broken)
        return 0;
    if (!q->started)
        return -VR_E_STATE;
    if (q->packed)
        return vr_packed_pop(q, c);
    if (q->resubmit_pos < q->nresubmit) {
        /* Inflight heads from before a reconnect go first. */
        uint16_t head = q->resubmit[q->resubmit_pos++];
        int rc = walk_chain(q, head, c);
        if (rc < 0)
            return rc;
        q->stats.requests++;
        return 1;
    }
    /* virtio 1.2, 2.7.13.4 (driver) / 2.7.6: read idx with acquire so the
     * ring entries and descriptors it publishes are visible.  The index
     * read last still covers the entries up to it (the driver's cache line
     * stays put while it keeps publishing): read it again only when those
     * are taken. */
    uint16_t pending = (uint16_t)(q->shadow_avail - q->last_avail_idx);
    if (pending == 0 || pending > q->num) {
        uint16_t avail_idx = vr_ld16_acquire(AVAIL_IDX(q));
        q->shadow_avail = avail_idx;
        pending = (uint16_t)(avail_idx - q->last_avail_idx);
    }
    /* 2.7.6: the driver never has more than Queue Size entries pending. */
    if (pending > q->num)
        return vr_queue_fail(q, VR_E_AVAIL_JUMP,
                             "avail index jumped from %u to %u (size %u) on queue %u",
                             q->last_avail_idx, q->shadow_avail, q->num, q->index);
    if (pending == 0)
        return 0;
    uint16_t head = vr_ld16(AVAIL_RING(q, q->last_avail_idx & (q->num - 1)));
    /* 2.7.6: ring entries index the descriptor table. */
    if (head >= q->num)
        return vr_queue_fail(q, VR_E_INDEX, "head index %u out of range on queue %u",
                             head, q->index);
    int rc = walk_chain(q, head, c);
    if (rc < 0)
        return rc;
    q->last_avail_idx++;
    vr_inflight_mark(q, head);
    q->stats.requests++;
    return 1;
}

/* Give back the chain(s) popped last, untouched, so the next pops return
 * them again (vsock rx: a buffer taken before knowing whether the host socket
 * had data).  Only without inflight tracking, where a pop leaves no trace
 * but last_avail_idx. */
int vr_unpop_n(struct vr_queue *q, uint32_t n)
{
    if (q->started && q->packed)
        return vr_packed_unpop_n(q, n);
    if (!q->started || q->inflight || q->resubmit_pos < q->nresubmit || n > q->num)
        return -VR_E_STATE;
    q->last_avail_idx = (uint16_t)(q->last_avail_idx - n);
    q->stats.requests -= n;
    return 0;
}

int vr_unpop(struct vr_queue *q)
{
    return vr_unpop_n(q, 1);
}

int vr_segs_iov(const struct vr_mem *m, const struct vr_seg *segs, uint32_t n,
                uint64_t skip, uint64_t limit, struct iovec *iov, uint32_t cap)
{
    uint32_t cnt = 0;
    for (uint32_t k = 0; k < n && limit > 0; k++) {
        uint64_t l = segs[k].len;
        if (skip >= l) {
            skip -= l;
            continue;
        }
        uint64_t take = l - skip;
        if (take > limit)
            take = limit;
        if (cnt == cap)
            return -1;
        iov[cnt].iov_base = vr_seg_host(m, &segs[k]) + skip;
        iov[cnt].iov_len = (size_t)take;
        cnt++;
        limit -= take;
        skip = 0;
    }
    return (int)cnt;
}

/* Walk segs[0, n) from byte `skip` for `len` bytes, copying to or from `buf`. */
static uint64_t segs_copy(const struct vr_mem *m, const struct vr_seg *segs, uint32_t n,
                          uint64_t skip, uint8_t *buf, uint64_t len, int to_guest)
{
    uint64_t done = 0;
    for (uint32_t k = 0; k < n && done < len; k++) {
        uint64_t l = segs[k].len;
        if (skip >= l) {
            skip -= l;
            continue;
        }
        uint64_t take = l - skip < len - done ? l - skip : len - done;
        uint8_t *g = vr_seg_host(m, &segs[k]) + skip;
        if (to_guest)
            memcpy(g, buf + done, take);
        else
            memcpy(buf + done, g, take);
        done += take;
        skip = 0;
    }
    return done;
}

uint64_t vr_segs_gather(const struct vr_mem *m, const struct vr_seg *segs, uint32_t n,
                        uint64_t skip, void *dst, uint64_t len)
{
    return segs_copy(m, segs, n, skip, dst, len, 0);
}

uint64_t vr_segs_scatter(const struct vr_mem *m, const struct vr_seg *segs, uint32_t n,
                         uint64_t skip, const void *src, uint64_t len)
{
    return segs_copy(m, segs, n, skip, (uint8_t *)src, len, 1);
}

/* Pop up to n chains (each with its own segs/cap); returns the count. */
int vr_pop_batch(struct vr_queue *q, struct vr_chain *chains, uint32_t n)
{
    uint32_t k;
    for (k = 0; k < n; k++) {
        int rc = vr_pop(q, &chains[k]);
        if (rc < 0)
            return k ? (int)k : rc;
        if (rc == 0)
            break;
    }
    return (int)k;
}

/* ---- push ---- */

/* Migration: mark what a push wrote (dirtylog.c): each chain's buffers,
 * the used elements (which may wrap the ring) and used->idx. */
static void log_push(struct vr_queue *q, const struct vr_log *lg, const uint16_t *heads,
                     const uint32_t *lens, uint32_t n, uint16_t first)
{
    for (uint32_t k = 0; k < n; k++)
        vr_log_chain(q, lg, heads[k], lens[k]);
    uint32_t slot = first & (q->num - 1);
    uint32_t run = n < q->num - slot ? n : q->num - slot;
    vr_log_used(q, lg, 4 + 8ull * slot, 8ull * run);
    if (run < n)
        vr_log_used(q, lg, 4, 8ull * (n - run));
    vr_log_used(q, lg, 2, 2);
    vr_log_kick(lg);
}

int vr_push_batch(struct vr_queue *q, const uint16_t *heads,
                  const uint32_t *lens, uint32_t n)
{
    struct vr_inflight_region *r = q->inflight;

    if (q->broken)
        return 0;
    if (!q->started)
        return -VR_E_STATE;
    if (n > q->num)
        return -VR_E_INVAL;
    if (q->packed)
        return vr_packed_push_batch(q, heads, lens, n);
    for (uint32_t k = 0; k < n; k++)
        if (heads[k] >= q->num)
            return -VR_E_INVAL;
    uint16_t idx = q->used_idx;
    for (uint32_t k = 0; k < n; k++) {
        volatile uint8_t *e = USED_RING(q, (uint16_t)(idx + k) & (q->num - 1));
        vr_st32(e, heads[k]);
        vr_st32(e + 4, lens[k]);
        if (r)
            vr_inflight_link(q, heads[k]);
    }
    uint16_t first = idx;
    idx = (uint16_t)(idx + n);
    /* virtio 1.2, 2.7.8 / 2.7.13 (device side): the elements must be
     * visible before the new idx: release store. */
    vr_st16_release(USED_IDX(q), idx);
    q->used_idx = idx;
    if (r)
        vr_inflight_done(q, heads, n);
    const struct vr_log *lg = vr_log_active(q);
    if (lg)
        log_push(q, lg, heads, lens, n, first);
    return VR_OK;
}

int vr_push(struct vr_queue *q, uint16_t head, uint32_t len)
{
    return vr_push_batch(q, &head, &len, 1);
}

/* ---- notification ---- */

int vr_should_notify(struct vr_queue *q)
{
    if (!q->started || q->broken)
        return 0;
    if (q->packed)
        return vr_packed_should_notify(q);
    uint16_t new = q->used_idx, old = q->signalled_used;
    int valid = q->signalled_used_valid;
    if (new == old)
        return 0; /* nothing used since the last notification (or start) */
    q->signalled_used = new;
    q->signalled_used_valid = 1;
    /* virtio 1.2, 2.7.10: full barrier between the used->idx store and
     * reading used_event / flags, or we may miss a request to notify. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (q->event_idx) {
        if (!valid)
            return 1;
        /* 2.7.10: vring_need_event(used_event, new, old). */
        uint16_t ev = vr_ld16(USED_EVENT(q));
        return (uint16_t)(new - ev - 1) < (uint16_t)(new - old);
    }
    /* 2.7.7: VRING_AVAIL_F_NO_INTERRUPT asks us not to notify. */
    return !(vr_ld16(AVAIL_FLAGS(q)) & VR_AVAIL_F_NO_INTERRUPT);
}

int vr_notify_force(struct vr_queue *q)
{
    uint64_t one = 1;
    if (q->call_fd < 0)
        return 0;
    for (;;) {
        ssize_t w = write(q->call_fd, &one, sizeof(one));
        if (w == sizeof(one))
            break;
        if (w < 0 && errno == EINTR)
            continue;
        return 0; /* EAGAIN: counter saturated, the guest is notified anyway */
    }
    q->stats.notifies++;
    return 1;
}

int vr_notify(struct vr_queue *q)
{
    if (!vr_should_notify(q))
        return 0;
    return vr_notify_force(q);
}

/* A 16-bit used-ring field (flags, avail_event) changed: log it. */
static void log_used_field(struct vr_queue *q, uint64_t off)
{
    const struct vr_log *lg = vr_log_active(q);
    if (lg)
        vr_log_used(q, lg, off, 2);
}

void vr_disable_notify(struct vr_queue *q)
{
    if (!q->started || q->broken)
        return;
    if (q->packed) {
        vr_packed_disable_notify(q);
        return;
    }
    /* With EVENT_IDX, a stale avail_event already suppresses kicks. */
    if (!q->event_idx) {
        /* Only this side writes the flags: store only a change, so the
         * line stays in the driver's cache while kicks are already off. */
        uint16_t f = vr_ld16(USED_FLAGS(q));
        if (!(f & VR_USED_F_NO_NOTIFY)) {
            vr_st16(USED_FLAGS(q), f | VR_USED_F_NO_NOTIFY);
            log_used_field(q, 0);
        }
    }
}

/* Re-enable kicks; returns 1 if work arrived meanwhile (the standard race). */
int vr_enable_notify(struct vr_queue *q)
{
    if (!q->started || q->broken)
        return 0;
    if (q->packed)
        return vr_packed_enable_notify(q);
    if (q->event_idx) {
        /* 2.7.10: ask for a kick once avail->idx moves past last_avail.
         * Another thread may pop under the device's lock while the worker
         * is here (vsock's tx and host threads fill its rx queue) and then
         * call this itself: rewrite until the index read before the store
         * is still current after it, so a stale avail_event (no kick ever
         * again) is never the last one written. */
        uint16_t seen;
        do {
            seen = __atomic_load_n(&q->last_avail_idx, __ATOMIC_RELAXED);
            vr_st16(AVAIL_EVENT(q), seen);
            log_used_field(q, 4 + 8ull * q->num);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
        } while (seen != __atomic_load_n(&q->last_avail_idx, __ATOMIC_RELAXED));
    } else {
        vr_st16(USED_FLAGS(q), vr_ld16(USED_FLAGS(q)) & ~VR_USED_F_NO_NOTIFY);
        log_used_field(q, 0);
    }
    /* 2.7.10: full barrier after writing avail_event / flags before
     * re-reading avail->idx. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return vr_avail_pending(q);
}
