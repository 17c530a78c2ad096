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
 * later is taken at pop: its segments (the caller's vr_chain) and its
 * descriptor count (pk_ndesc[id]).  A buffer id names a chain while it is
 * in flight: ids must be below the queue size and unique, which turns a
 * replayed or forged id into an error instead of a double completion.
 *
 * The guest is hostile as in vring.c: every descriptor is copied before it
 * is checked and every violation breaks the queue with a message.
 *
 * Not done for packed rings: the inflight region (a back-end restart loses
 * the requests in flight; Python does not attach one) and the dirty log
 * (Python refuses VHOST_F_LOG_ALL with packed rings; a push while a log is
 * set counts log_missed).
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

#define PDESC(q, slot) ((q)->desc + 16u * (slot))
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

static inline void advance(const struct vr_queue *q, uint16_t *slot, uint8_t *wrap, uint32_t n)
{
    uint32_t s = *slot + n;
    if (s >= q->num) {
        s -= q->num;
        *wrap ^= 1;
    }
    *slot = (uint16_t)s;
}

/* ---- set-up (called by vring.c) ---- */

/* At start: the per-id table survives a stop/start with the same size
 * (chains popped before the stop are still pushed after it). */
int vr_packed_prepare(struct vr_queue *q)
{
    if (q->last_avail_idx >= q->num || q->used_idx >= q->num)
        return -VR_E_INVAL;
    if (!q->pk_ndesc) {
        q->pk_ndesc = calloc(q->num, sizeof(uint16_t));
        q->pk_hist = calloc(q->num, sizeof(uint32_t));
        if (!q->pk_ndesc || !q->pk_hist) {
            vr_packed_release(q);
            return -VR_E_NOMEM;
        }
    }
    q->pk_hist_pos = q->pk_hist_len = 0;
    q->signalled_used = q->used_idx;
    q->signalled_wrap = q->used_wrap;
    return VR_OK;
}

void vr_packed_release(struct vr_queue *q)
{
    free(q->pk_ndesc);
    free(q->pk_hist);
    q->pk_ndesc = NULL;
    q->pk_hist = NULL;
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

int vr_packed_avail_pending(struct vr_queue *q)
{
    return is_avail(vr_ld16_acquire(PDESC(q, q->last_avail_idx) + 14), q->avail_wrap);
}

int vr_packed_pop(struct vr_queue *q, struct vr_chain *c)
{
    uint16_t slot = q->last_avail_idx;
    uint8_t wrap = q->avail_wrap;
    uint32_t ndesc = 0;
    int seen_write = 0, rc;
    struct vr_pdesc d;

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
        memcpy(&d, (const uint8_t *)PDESC(q, slot), sizeof(d));
        advance(q, &slot, &wrap, 1);
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
    q->pk_ndesc[d.id] = (uint16_t)ndesc;
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
        q->pk_ndesc[h >> 16] = 0;
        q->last_avail_idx = h & 0x7fff;
        q->avail_wrap = (h >> 15) & 1;
    }
    q->pk_hist_len -= n;
    q->stats.requests -= n;
    return VR_OK;
}

/* ---- push ---- */

int vr_packed_push_batch(struct vr_queue *q, const uint16_t *ids, const uint32_t *lens,
                         uint32_t n)
{
    if (n == 0)
        return VR_OK;
    volatile uint8_t *first = NULL;
    uint16_t first_flags = 0;
    int bad = 0;
    for (uint32_t k = 0; k < n; k++) {
        uint16_t id = ids[k];
        if (id >= q->num || !q->pk_ndesc[id]) {
            n = k; /* caller misuse: publish what came before, refuse the rest */
            bad = 1;
            break;
        }
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
        advance(q, &q->used_idx, &q->used_wrap, q->pk_ndesc[id]);
        q->pk_ndesc[id] = 0;
    }
    if (first)
        vr_st16_release(first, first_flags);
    if (first && vr_log_active(q))
        q->stats.log_missed += n;
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

void vr_packed_disable_notify(struct vr_queue *q)
{
    vr_st16(DEVICE_FLAGS(q), VR_EVENT_DISABLE);
}

int vr_packed_enable_notify(struct vr_queue *q)
{
    vr_st16(DEVICE_FLAGS(q), VR_EVENT_ENABLE);
    /* full barrier between enabling kicks and re-reading the ring */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return vr_packed_avail_pending(q);
}
