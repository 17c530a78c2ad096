/*
 * inflight_packed.c - inflight I/O tracking for packed rings (QEMU
 * docs/interop/vhost-user.rst, "Inflight I/O tracking", packed virtqueue;
 * VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD).
 *
 * Theory of operation
 * -------------------
 * The region outlives the back-end process: the front-end keeps it and
 * hands it to the next one.  packed.c keeps its copy of every descriptor in
 * flight in the region's desc[] table (one entry per ring slot, chains
 * linked through .next, a chain's head holding its length, last entry,
 * counter and inflight flag), so a restarted back-end finds there what the
 * guest is still waiting for.
 *
 * A packed ring keeps no index in guest memory the way a split ring's
 * used->idx does, and QEMU gives a restarted back-end the base of the
 * previous start (it cannot ask a dead one), so the positions come from the
 * region: region->old_used_idx / old_used_wrap_counter is the used position
 * after the last batch that was completely pushed; the avail position is
 * that plus every descriptor still in flight (each popped descriptor is
 * either used or in flight).
 *
 * A push marks its heads inflight = 2 and sets region->used_idx to the
 * batch's end before it writes the used descriptors, and catches
 * old_used_idx up after freeing them.  Recovering from a crash in between,
 * the first used slot of the batch tells whether the batch reached the
 * driver: the device publishes a batch with that slot's flags, whose USED
 * bit flips from the inverse of the wrap counter (the driver's available
 * descriptor) to the wrap counter itself; a driver that already took it
 * and made the slot available again leaves USED at the same value.  Either
 * the whole batch is done or none of it is.
 *
 * The region comes from the front-end and is checked like a ring: every
 * head's id, length and entry links must be in range, no entry may belong
 * to two chains and no id may be in flight twice, or the queue does not
 * start.
 */
#include <stdlib.h>
#include <string.h>

#include "vring.h"

/* region->features of a packed region (it tells us from a split one) */
#define PK_REGION_MARK (1ull << 34) /* VIRTIO_F_RING_PACKED */

static int cmp_counter(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void fresh(struct vr_queue *q, struct vr_pk_inflight_region *r)
{
    uint32_t n = q->num;
    memset(r->desc, 0, (size_t)n * sizeof(r->desc[0]));
    for (uint32_t k = 0; k < n; k++)
        r->desc[k].next = k + 1 < n ? (uint16_t)(k + 1) : VR_PK_NONE;
    r->features = PK_REGION_MARK;
    r->desc_num = (uint16_t)n;
    r->free_head = r->old_free_head = 0;
    r->used_idx = r->old_used_idx = q->used_idx;
    r->used_wrap_counter = r->old_used_wrap_counter = q->used_wrap;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    r->version = 1;
    q->pk_free = 0;
    q->inflight_counter = 0;
}

/* Settle a batch that was being pushed: 1 if it reached the driver. */
static int settle_batch(struct vr_queue *q, struct vr_pk_inflight_region *r)
{
    if (r->used_idx == r->old_used_idx && r->used_wrap_counter == r->old_used_wrap_counter)
        return 0;
    uint16_t flags = vr_ld16(VR_PDESC(q, r->old_used_idx) + 14);
    if (!!(flags & VR_PDESC_F_USED) != r->old_used_wrap_counter) {
        r->used_idx = r->old_used_idx;
        r->used_wrap_counter = r->old_used_wrap_counter;
        return 0;
    }
    r->old_used_idx = r->used_idx;
    r->old_used_wrap_counter = r->used_wrap_counter;
    return 1;
}

/* Claim the entries of the chain at `head`; -1 if they are not a chain. */
static int claim(struct vr_queue *q, uint8_t *owned, uint16_t head)
{
    const struct vr_pk_inflight_desc *h = &q->pk_rec[head];
    uint32_t i = head;
    if (h->num == 0 || h->num > q->num || h->id >= q->num || q->pk_ndesc[h->id])
        return -1;
    for (uint32_t k = 0; k < h->num; k++) {
        if (i >= q->num || owned[i])
            return -1;
        owned[i] = 1;
        if (k + 1 == h->num)
            break;
        i = q->pk_rec[i].next;
    }
    if (i != h->last)
        return -1;
    q->pk_ndesc[h->id] = h->num;
    q->pk_first[h->id] = head;
    q->pk_inflight += h->num;
    return 0;
}

int vr_packed_inflight_recover(struct vr_queue *q)
{
    struct vr_pk_inflight_region *r = (struct vr_pk_inflight_region *)(void *)q->inflight;
    uint32_t n = q->num;

    if (q->inflight_size < sizeof(*r) + (uint64_t)n * sizeof(r->desc[0]))
        return -VR_E_INFLIGHT;
    memset(q->pk_ndesc, 0, n * sizeof(uint16_t));
    q->pk_inflight = 0;
    q->nresubmit = q->resubmit_pos = 0;
    q->pk_region = r;
    q->pk_rec = r->desc;
    if (r->version == 0) {       /* a fresh zeroed region from GET_INFLIGHT_FD */
        fresh(q, r);
        return VR_OK;
    }
    if (r->version != 1 || r->desc_num != (uint16_t)n || r->features != PK_REGION_MARK
        || r->used_idx >= n || r->old_used_idx >= n
        || r->used_wrap_counter > 1 || r->old_used_wrap_counter > 1)
        return -VR_E_INFLIGHT;
    if (!q->resubmit && !(q->resubmit = malloc((size_t)n * sizeof(uint16_t))))
        return -VR_E_NOMEM;
    uint8_t *owned = calloc(n, 1);
    uint64_t *pairs = malloc((size_t)n * 2 * sizeof(uint64_t));
    if (!owned || !pairs) {
        free(owned);
        free(pairs);
        return -VR_E_NOMEM;
    }
    int done = settle_batch(q, r), rc = VR_OK;
    uint32_t cnt = 0;
    uint64_t maxc = 0;
    for (uint32_t k = 0; k < n && rc == VR_OK; k++) {
        struct vr_pk_inflight_desc *h = &r->desc[k];
        if (h->inflight == 2)
            h->inflight = done ? 0 : 1;
        if (h->inflight == 0)
            continue;
        if (h->inflight != 1 || claim(q, owned, (uint16_t)k) < 0) {
            rc = -VR_E_INFLIGHT;
            break;
        }
        pairs[2 * cnt] = h->counter;
        pairs[2 * cnt + 1] = h->id;
        if (h->counter >= maxc)
            maxc = h->counter + 1;
        cnt++;
    }
    if (rc == VR_OK) {
        /* every entry no chain owns is free */
        uint16_t head = VR_PK_NONE;
        for (uint32_t k = n; k-- > 0;)
            if (!owned[k]) {
                r->desc[k].next = head;
                head = (uint16_t)k;
            }
        q->pk_free = head;
        r->free_head = r->old_free_head = head;
        qsort(pairs, cnt, 2 * sizeof(uint64_t), cmp_counter);
        for (uint32_t k = 0; k < cnt; k++)
            q->resubmit[k] = (uint16_t)pairs[2 * k + 1];
        q->nresubmit = cnt;
        q->inflight_counter = maxc;
        q->used_idx = r->old_used_idx;
        q->used_wrap = r->old_used_wrap_counter;
        q->last_avail_idx = q->used_idx;
        q->avail_wrap = q->used_wrap;
        vr_pk_advance(q, &q->last_avail_idx, &q->avail_wrap, q->pk_inflight);
    } else {
        memset(q->pk_ndesc, 0, n * sizeof(uint16_t));
        q->pk_inflight = 0;
    }
    free(owned);
    free(pairs);
    return rc;
}
