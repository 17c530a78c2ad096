/*
 * packed.c - packed virtqueue, device side (virtio 1.2, section 2.8
 * "Packed Virtqueues"): pop, push, notification suppression.
 *
 * One ring of 16-byte descriptors {addr, len, id, flags} is shared both
 * ways.  The driver makes a chain available by writing its descriptors in
 * consecutive slots and, last, the first descriptor's flags with AVAIL =
 * its wrap counter and USED = the inverse.  The device hands a buffer back
 * by writing ONE used descriptor (id, written length, AVAIL = USED = its
 * own wrap counter) at its next used slot and moving that slot on by the
 * number of descriptors the chain took.  Both counters flip each time a
 * position passes the end of the ring.
 *
 * Used descriptors land in slots that may still hold descriptors of chains
 * in flight (completion is out of order), so everything a chain needs
 * later is taken at pop: its segments (the caller's vr_chain), its
 * descriptor count (pk_ndesc[id]) and a copy of its descriptors (pk_rec,
 * for the dirty log at push).  A buffer id names a chain while it is in
 * flight: ids must be below the queue size and unique, which turns a
 * replayed or forged id into an error instead of a double completion.
 * The descriptors in flight are the slots between the used and the avail
 * position, so they never exceed the ring size; a driver that makes more
 * available has overwritten slots the device had not used yet, and the
 * queue breaks.  That bound sizes pk_rec: one entry per ring slot, handed
 * out from a free list linked through .next.
 *
 * The guest is hostile as in vring.c: every descriptor is copied before it
 * is checked and every violation breaks the queue with a message.
 *
 * Dirty log (dirtylog.c): a push marks each chain's device-writable bytes
 * from the copy in pk_rec (an indirect table is read again from guest
 * memory, which the device never writes), each used descriptor's 16 bytes
 * at the ring's guest-physical address, and the device event area.
 *
 * Not done for packed rings: the inflight region (a back-end restart loses
 * the requests in flight; Python does not attach one).
 */
#include <stdlib.h>
#include <string.h>

#include "vring.h"

/* Local copy of a packed descriptor (2.8 "Packed Virtqueue Layout"). */
struct vr_pdesc {
    uint64_t addr;
    uint32_t len;
    uint16_t id;
    uint16_t flags;
};
_Static_assert(sizeof(struct vr_pdesc) == 16, "packed descriptor is 16 bytes");

_Static_assert(sizeof(struct vr_pk_inflight_desc) == 32, "DescStatePacked is 32 bytes");

/* An indirect table is walked at most this far (its ids are 16 bits). */
#define PK_MAX_INDIRECT 65536u

#define PDESC VR_PDESC
#define PK_NONE VR_PK_NONE
/* the driver event suppression area is the "avail" address, the device's
 * the "used" address: {le16 off_wrap; le16 flags} */
#define DRIVER_OFF_WRAP(q) ((q)->avail)
#define DRIVER_FLAGS(q) ((q)->avail + 2)
#define DEVICE_FLAGS(q) ((q)->used + 2)

/* 2.8.1: a descriptor is available when AVAIL equals the device's avail
 * wrap counter and USED does not. */
static inline int is_avail(uint16_t flags, uint8_t wrap)
{
    return !!(flags & VR_PDESC_F_AVAIL) == wrap && !!(flags & VR_PDESC_F_USED) != wrap;
}

#define advance vr_pk_advance

/* ---- set-up (called by vring.c) ---- */

/* No chain in flight: every record free, in our own table (the
 * inflight region, if any, is read again at the next start). */
void vr_packed_forget(struct vr_queue *q)
{
    if (!q->pk_ndesc)
        return;
    memset(q->pk_ndesc, 0, q->num * sizeof(uint16_t));
    q->pk_rec = q->pk_rec_own;
    q->pk_region = NULL;
    for (uint32_t k = 0; k < q->num; k++)
        q->pk_rec[k].next = k + 1 < q->num ? (uint16_t)(k + 1) : PK_NONE;
    q->pk_free = 0;
    q->pk_inflight = 0;
    q->nresubmit = q->resubmit_pos = 0;
}

/* At start: the per-id table survives a stop/start with the same size
 * (chains popped before the stop are still pushed after it); with an
 * inflight region everything is taken from the region instead. */
int vr_packed_prepare(struct vr_queue *q)
{
    if (q->last_avail_idx >= q->num || q->used_idx >= q->num)
        return -VR_E_INVAL;
    if (!q->pk_ndesc) {
        q->pk_ndesc = calloc(q->num, sizeof(uint16_t));
        q->pk_hist = calloc(q->num, sizeof(uint32_t));
        q->pk_rec_own = calloc(q->num, sizeof(struct vr_pk_inflight_desc));
        q->pk_first = calloc(q->num, sizeof(uint16_t));
        if (!q->pk_ndesc || !q->pk_hist || !q->pk_rec_own || !q->pk_first) {
            vr_packed_release(q);
            return -VR_E_NOMEM;
        }
        vr_packed_forget(q);
    }
    q->pk_hist_pos = q->pk_hist_len = 0;
    if (q->inflight) {
        int rc = vr_packed_inflight_recover(q);
        if (rc < 0) {
            vr_packed_forget(q);
            return rc;
        }
    } else if (q->pk_region) {
        vr_packed_forget(q);   /* the region went away with what it tracked */
    }
    q->signalled_used = q->used_idx;
    q->signalled_wrap = q->used_wrap;
    return VR_OK;
}

void vr_packed_release(struct vr_queue *q)
{
    free(q->pk_ndesc);
    free(q->pk_hist);
    free(q->pk_rec_own);
    free(q->pk_first);
    q->pk_ndesc = NULL;
    q->pk_hist = NULL;
    q->pk_rec = q->pk_rec_own = NULL;
    q->pk_region = NULL;
    q->pk_first = NULL;
}

static void set_free_head(struct vr_queue *q, uint16_t head)
{
    q->pk_free = head;
    if (q->pk_region)
        q->pk_region->free_head = q->pk_region->old_free_head = head;
}

/* Give the records of the chain `id` back to the free list. */
static void free_records(struct vr_queue *q, uint16_t id)
{
    struct vr_pk_inflight_desc *h = &q->pk_rec[q->pk_first[id]];
    h->inflight = 0;
    q->pk_rec[h->last].next = q->pk_free;
    set_free_head(q, q->pk_first[id]);
    q->pk_inflight -= q->pk_ndesc[id];
    q->pk_ndesc[id] = 0;
}

/* ---- pop ---- */

/* The descriptors of an indirect table (2.8 "Indirect Flag"): a plain
 * array of len / 16 packed descriptors, no NEXT links, no nesting. */
static int walk_indirect(struct vr_queue *q, struct vr_chain *c, const struct vr_pdesc *ind,
                         int *seen_write)
{
    if (ind->len == 0 || (ind->len & 15))
        return vr_queue_fail(q, VR_E_INDIRECT_LEN,
                             "indirect table length %u not a non-zero multiple of 16 on queue %u",
                             ind->len, q->index);
    if (ind->addr + (ind->len - 1) < ind->addr)
        return vr_queue_fail(q, VR_E_ADDRESS, "indirect table address overflow on queue %u",
                             q->index);
    /* zero-length entries add no segment: bound the walk itself */
    if (ind->len / 16 > PK_MAX_INDIRECT)
        return vr_queue_fail(q, VR_E_LOOP, "indirect table of %u descriptors on queue %u",
                             ind->len / 16, q->index);
    for (uint32_t k = 0; k < ind->len / 16; k++) {
        struct vr_pdesc d;
        if (vr_mem_read(q->mem, ind->addr + 16ull * k, &d, sizeof(d)) < 0)
            return vr_queue_fail(q, VR_E_ADDRESS,
                                 "indirect table outside guest memory on queue %u", q->index);
        if (d.flags & VR_DESC_F_INDIRECT)
            return vr_queue_fail(q, VR_E_NESTED, "nested indirect descriptor on queue %u",
                                 q->index);
        int rc = vr_chain_add(q, c, d.addr, d.len, d.flags & VR_DESC_F_WRITE, seen_write);
        if (rc < 0)
            return rc;
    }
    return VR_OK;
}

/* A chain recovered from the inflight region, rebuilt from its copy (its
 * ring slots may hold used descriptors by now). */
static int pop_resubmit(struct vr_queue *q, struct vr_chain *c)
{
    uint16_t id = q->resubmit[q->resubmit_pos++];
    uint16_t i = q->pk_first[id];
    int seen_write = 0, rc;

    c->head = id;
    c->nseg = c->nread = 0;
    c->read_len = c->write_len = 0;
    for (uint32_t k = 0; k < q->pk_ndesc[id]; k++, i = q->pk_rec[i].next) {
        const struct vr_pk_inflight_desc *r = &q->pk_rec[i];
        struct vr_pdesc d = {r->addr, r->len, r->id, r->flags};
        if (d.flags & VR_DESC_F_INDIRECT)
            rc = walk_indirect(q, c, &d, &seen_write);
        else
            rc = vr_chain_add(q, c, d.addr, d.len, d.flags & VR_DESC_F_WRITE, &seen_write);
        if (rc < 0)
            return rc;
    }
    q->pk_hist_len = 0;   /* vr_unpop_n cannot give a resubmitted chain back */
    q->stats.requests++;
    return 1;
}

int vr_packed_avail_pending(struct vr_queue *q)
{
    return is_avail(vr_ld16_acquire(PDESC(q, q->last_avail_idx) + 14), q->avail_wrap);
}

int vr_packed_pop(struct vr_queue *q, struct vr_chain *c)
{
    uint16_t slot = q->last_avail_idx;
    uint8_t wrap = q->avail_wrap;
    uint32_t ndesc = 0;
    uint16_t first_rec = q->pk_free, rec = PK_NONE;
    int seen_write = 0, rc;
    struct vr_pdesc d;

    if (q->resubmit_pos < q->nresubmit)
        return pop_resubmit(q, c);
    /* 2.8.2: the first descriptor's flags publish the chain; acquire so
     * the rest of it (written before) is visible. */
    if (!is_avail(vr_ld16_acquire(PDESC(q, slot) + 14), wrap))
        return 0;
    c->head = 0;
    c->nseg = c->nread = 0;
    c->read_len = c->write_len = 0;
    for (;;) {
        /* 2.8 "Next Flag": a chain is at most Queue Size descriptors; one
         * with NEXT in every slot would run round the ring forever. */
        if (++ndesc > q->num)
            return vr_queue_fail(q, VR_E_LOOP, "descriptor chain longer than the ring on queue %u",
                                 q->index);
        /* The slots from used to avail position hold the descriptors in
         * flight: no more than the ring has.  This also keeps a record
         * free for each one. */
        if (q->pk_inflight + ndesc > q->num)
            return vr_queue_fail(q, VR_E_AVAIL_JUMP,
                                 "more descriptors in flight than the ring holds on queue %u",
                                 q->index);
        memcpy(&d, (const uint8_t *)PDESC(q, slot), sizeof(d));
        advance(q, &slot, &wrap, 1);
        rec = rec == PK_NONE ? q->pk_free : q->pk_rec[rec].next;
        q->pk_rec[rec].addr = d.addr;
        q->pk_rec[rec].len = d.len;
        q->pk_rec[rec].flags = d.flags;
        q->pk_rec[rec].id = d.id;
        if (d.flags & VR_DESC_F_INDIRECT) {
            /* 2.8 "Indirect Flag": an indirect descriptor is the whole
             * chain: neither NEXT on it nor one before it. */
            if ((d.flags & VR_DESC_F_NEXT) || ndesc > 1)
                return vr_queue_fail(q, VR_E_CHAIN,
                                     "indirect descriptor chained to others on queue %u", q->index);
            rc = walk_indirect(q, c, &d, &seen_write);
        } else {
            rc = vr_chain_add(q, c, d.addr, d.len, d.flags & VR_DESC_F_WRITE, &seen_write);
        }
        if (rc < 0)
            return rc;
        if (!(d.flags & VR_DESC_F_NEXT))
            break;
    }
    /* 2.8 "Next Flag": the buffer id is in the last descriptor.  We track
     * chains by id, so it must name a slot of our table and not be in
     * flight already. */
    if (d.id >= q->num)
        return vr_queue_fail(q, VR_E_ID, "buffer id %u out of range on queue %u", d.id, q->index);
    if (q->pk_ndesc[d.id])
        return vr_queue_fail(q, VR_E_ID, "buffer id %u is already in flight on queue %u",
                             d.id, q->index);
    /* vhost-user.rst, inflight tracking, packed: the head holds the
     * chain's length, last entry and counter, and its inflight flag is
     * set last; a crash before that re-reads the chain from the ring. */
    struct vr_pk_inflight_desc *h = &q->pk_rec[first_rec];
    h->num = (uint16_t)ndesc;
    h->last = rec;
    h->counter = q->inflight_counter++;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    h->inflight = 1;
    q->pk_ndesc[d.id] = (uint16_t)ndesc;
    q->pk_first[d.id] = first_rec;
    set_free_head(q, q->pk_rec[rec].next);
    q->pk_inflight += ndesc;
    q->pk_hist[q->pk_hist_pos] = (uint32_t)q->last_avail_idx | (uint32_t)q->avail_wrap << 15
                                 | (uint32_t)d.id << 16;
    q->pk_hist_pos = (q->pk_hist_pos + 1) % q->num;
    if (q->pk_hist_len < q->num)
        q->pk_hist_len++;
    q->last_avail_idx = slot;
    q->avail_wrap = wrap;
    c->head = d.id;
    q->stats.requests++;
    return 1;
}

/* Undo the last n pops, none of them pushed (earlier ones may be: their
 * used descriptors lie before the slots of the chains given back). */
int vr_packed_unpop_n(struct vr_queue *q, uint32_t n)
{
    if (n > q->pk_hist_len)
        return -VR_E_STATE;
    for (uint32_t k = 1; k <= n; k++)
        if (!q->pk_ndesc[q->pk_hist[(q->pk_hist_pos + q->num - k) % q->num] >> 16])
            return -VR_E_STATE;
    for (uint32_t k = 0; k < n; k++) {
        q->pk_hist_pos = (q->pk_hist_pos + q->num - 1) % q->num;
        uint32_t h = q->pk_hist[q->pk_hist_pos];
        free_records(q, (uint16_t)(h >> 16));
        q->last_avail_idx = h & 0x7fff;
        q->avail_wrap = (h >> 15) & 1;
    }
    q->pk_hist_len -= n;
    q->stats.requests -= n;
    return VR_OK;
}

/* ---- push ---- */

/* Mark the first `left` device-writable bytes of an indirect table's
 * entries, read again from guest memory, walked as at pop. */
static void log_indirect(struct vr_queue *q, const struct vr_log *lg,
                         const struct vr_pk_inflight_desc *r,
                         uint32_t *left)
{
    uint32_t n = r->len / 16;
    for (uint32_t k = 0; k < n && k < PK_MAX_INDIRECT && *left > 0; k++) {
        struct vr_pdesc d;
        if (vr_mem_read(q->mem, r->addr + 16ull * k, &d, sizeof(d)) < 0)
            return;
        if (d.flags & VR_DESC_F_WRITE) {
            uint32_t m = d.len < *left ? d.len : *left;
            q->stats.log_missed += vr_log_write(lg, d.addr, m);
            *left -= m;
        }
    }
}

/* Mark what the device wrote for chain `id`: its first `len` writable
 * bytes (virtio 1.2, 2.8 "Write Flag": the used length). */
static void log_chain(struct vr_queue *q, const struct vr_log *lg, uint16_t id, uint32_t len)
{
    uint16_t i = q->pk_first[id];
    for (uint32_t k = 0; k < q->pk_ndesc[id] && len > 0; k++, i = q->pk_rec[i].next) {
        const struct vr_pk_inflight_desc *r = &q->pk_rec[i];
        if (r->flags & VR_DESC_F_INDIRECT) {
            log_indirect(q, lg, r, &len);
        } else if (r->flags & VR_DESC_F_WRITE) {
            uint32_t m = r->len < len ? r->len : len;
            q->stats.log_missed += vr_log_write(lg, r->addr, m);
            len -= m;
        }
    }
}

/*
 * A batch goes out in three steps, so that the inflight region tells a
 * restarted back-end exactly which chains the driver got (inflight_packed.c):
 *   1. each chain's head is marked "being completed" (inflight = 2) and
 *      region->used_idx set to where the batch ends;
 *   2. the used descriptors are written, the first one's flags last;
 *   3. the heads are freed and region->old_used_idx catches up.
 */
int vr_packed_push_batch(struct vr_queue *q, const uint16_t *ids, const uint32_t *lens,
                         uint32_t n)
{
    struct vr_pk_inflight_region *r = q->pk_region;
    const struct vr_log *lg = vr_log_active(q);
    uint16_t start = q->used_idx, end = start;
    uint8_t start_wrap = q->used_wrap, end_wrap = start_wrap;
    int bad = 0;

    for (uint32_t k = 0; k < n; k++) {
        uint16_t id = ids[k];
        if (id >= q->num || !q->pk_ndesc[id] || q->pk_rec[q->pk_first[id]].inflight != 1) {
            n = k; /* caller misuse (or an id twice): publish what came before, refuse the rest */
            bad = 1;
            break;
        }
        q->pk_rec[q->pk_first[id]].inflight = 2;
        advance(q, &end, &end_wrap, q->pk_ndesc[id]);
    }
    if (n == 0)
        return bad ? -VR_E_INVAL : VR_OK;
    if (r) {
        r->used_idx = end;
        r->used_wrap_counter = end_wrap;
        __atomic_thread_fence(__ATOMIC_RELEASE);
    }
    volatile uint8_t *first = NULL;
    uint16_t first_flags = 0;
    for (uint32_t k = 0; k < n; k++) {
        uint16_t id = ids[k];
        volatile uint8_t *e = PDESC(q, q->used_idx);
        /* 2.8 "Write Flag": in a used descriptor WRITE says data was written */
        uint16_t flags = (q->used_wrap ? (VR_PDESC_F_AVAIL | VR_PDESC_F_USED) : 0)
                         | (lens[k] ? VR_DESC_F_WRITE : 0);
        vr_st32(e + 8, lens[k]);
        vr_st16(e + 12, id);
        /* 2.8.2: the driver reads used descriptors in ring order, so the
         * later ones may show first; the first one's flags go last,
         * released, and publish them all. */
        if (k == 0) {
            first = e + 14;
            first_flags = flags;
        } else {
            vr_st16(e + 14, flags);
        }
        if (lg)
            log_chain(q, lg, id, lens[k]);
        advance(q, &q->used_idx, &q->used_wrap, q->pk_ndesc[id]);
    }
    vr_st16_release(first, first_flags);
    if (r)
        __atomic_thread_fence(__ATOMIC_RELEASE);
    for (uint32_t k = 0; k < n; k++)
        free_records(q, ids[k]);
    if (r) {
        __atomic_thread_fence(__ATOMIC_RELEASE);
        r->old_used_idx = end;
        r->old_used_wrap_counter = end_wrap;
    }
    /* The used descriptors lie in the slots from start on: mark them
     * (and the chains' other slots between, which costs nothing) after
     * the release store, as bits must follow the stores they announce. */
    if (lg) {
        if (q->used_wrap == start_wrap && q->used_idx > start) {
            vr_log_ring(q, lg, q->desc_gpa + 16ull * start, 16ull * (q->used_idx - start));
        } else {
            vr_log_ring(q, lg, q->desc_gpa + 16ull * start, 16ull * (q->num - start));
            vr_log_ring(q, lg, q->desc_gpa, 16ull * q->used_idx);
        }
        vr_log_kick(lg);
    }
    return bad ? -VR_E_INVAL : VR_OK;
}

/* ---- notification (2.8.10 "Driver and Device Event Suppression") ---- */

int vr_packed_should_notify(struct vr_queue *q)
{
    uint16_t new = q->used_idx, old = q->signalled_used;
    uint8_t wrap = q->used_wrap;
    int valid = q->signalled_used_valid;
    if (new == old && wrap == q->signalled_wrap)
        return 0;
    q->signalled_used = new;
    q->signalled_wrap = wrap;
    q->signalled_used_valid = 1;
    /* the used descriptors must be visible before we read the driver's
     * event suppression area, or a request to notify may be missed */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t flags = vr_ld16(DRIVER_FLAGS(q));
    if (flags == VR_EVENT_DISABLE)
        return 0;
    if (flags != VR_EVENT_DESC || !q->event_idx || !valid)
        return 1;
    /* Notify when the used descriptor at off_wrap was written by this
     * batch: the positions old..new (same wrap as new) against the event
     * position, all taken on one line that ends at new. */
    uint16_t off_wrap = vr_ld16(DRIVER_OFF_WRAP(q));
    int32_t ev = off_wrap & 0x7fff, o = old, nw = new;
    if (o >= nw)
        o -= (int32_t)q->num;
    if ((off_wrap >> 15) != wrap)
        ev -= (int32_t)q->num;
    return (uint16_t)(nw - ev - 1) < (uint16_t)(nw - o);
}

/* The device event area is the ring's log_guest_addr. */
static void log_device_flags(struct vr_queue *q)
{
    const struct vr_log *lg = vr_log_active(q);
    if (lg)
        vr_log_used(q, lg, 2, 2);
}

void vr_packed_disable_notify(struct vr_queue *q)
{
    vr_st16(DEVICE_FLAGS(q), VR_EVENT_DISABLE);
    log_device_flags(q);
}

int vr_packed_enable_notify(struct vr_queue *q)
{
    vr_st16(DEVICE_FLAGS(q), VR_EVENT_ENABLE);
    log_device_flags(q);
    /* full barrier between enabling kicks and re-reading the ring */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return vr_packed_avail_pending(q);
}
