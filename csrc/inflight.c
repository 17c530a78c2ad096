/*
 * inflight.c - inflight I/O tracking for split rings (QEMU
 * docs/interop/vhost-user.rst, "Inflight I/O tracking",
 * VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD).
 *
 * The region is shared with the front-end and outlives this process.  At
 * pop a head gets a counter and inflight=1; at push the batch is linked
 * through desc[].next from last_batch_head, used->idx is published, the
 * flags are cleared, and finally region->used_idx records the new used
 * index.  A crash at any point leaves either the old state (the request is
 * resubmitted) or a used->idx ahead of region->used_idx, which
 * vr_inflight_recover() repairs by walking the last batch.
 */
#include <stdlib.h>
#include <string.h>

#include "vring.h"

_Static_assert(sizeof(struct vr_inflight_desc) == 16, "DescStateSplit is 16 bytes");
_Static_assert(sizeof(struct vr_inflight_region) == 16, "QueueRegionSplit header");

static int cmp_counter(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/*
 * vhost-user.rst, "Inflight I/O tracking", split ring, "When reconnecting":
 * finish a batch whose used->idx store landed but whose inflight clearing
 * did not, then resubmit the remaining inflight heads by counter order.
 */
int vr_inflight_recover(struct vr_queue *q)
{
    struct vr_inflight_region *r = q->inflight;
    uint32_t n = q->num;

    if (q->inflight_size < sizeof(*r) + (uint64_t)n * sizeof(r->desc[0]))
        return -VR_E_INFLIGHT;
    if (r->version == 0) {
        /* Fresh zeroed region from GET_INFLIGHT_FD: initialise it. */
        memset(r->desc, 0, (size_t)n * sizeof(r->desc[0]));
        r->features = 0;
        r->desc_num = (uint16_t)n;
        r->last_batch_head = 0;
        r->used_idx = q->used_idx;
        __atomic_thread_fence(__ATOMIC_RELEASE);
        r->version = 1;
        q->inflight_counter = 0;
        return VR_OK;
    }
    if (r->desc_num != (uint16_t)n || r->version != 1)
        return -VR_E_INFLIGHT;
    if (r->used_idx != q->used_idx) {
        uint16_t batch = (uint16_t)(q->used_idx - r->used_idx);
        uint16_t h = r->last_batch_head;
        for (uint32_t k = 0; k < batch && k < n && h < n; k++) {
            r->desc[h].inflight = 0;
            h = r->desc[h].next;
        }
        r->used_idx = q->used_idx;
    }
    /* Pairs (counter, head) sorted by counter; one allocation at set-up. */
    uint64_t *pairs = malloc((size_t)n * 2 * sizeof(uint64_t));
    if (!pairs)
        return -VR_E_NOMEM;
    uint32_t cnt = 0;
    uint64_t maxc = 0;
    for (uint32_t h = 0; h < n; h++) {
        if (r->desc[h].inflight == 1) {
            pairs[2 * cnt] = r->desc[h].counter;
            pairs[2 * cnt + 1] = h;
            if (r->desc[h].counter >= maxc)
                maxc = r->desc[h].counter + 1;
            cnt++;
        }
    }
    qsort(pairs, cnt, 2 * sizeof(uint64_t), cmp_counter);
    for (uint32_t k = 0; k < cnt; k++)
        q->resubmit[k] = (uint16_t)pairs[2 * k + 1];
    free(pairs);
    q->nresubmit = cnt;
    q->resubmit_pos = 0;
    q->inflight_counter = maxc;
    /* Every popped head is either used or inflight, so the avail ring
     * position to continue from is used_idx + inflight count. */
    q->last_avail_idx = (uint16_t)(q->used_idx + cnt);
    return VR_OK;
}

void vr_inflight_mark(struct vr_queue *q, uint16_t head)
{
    struct vr_inflight_region *r = q->inflight;
    if (!r)
        return;
    /* vhost-user.rst, inflight tracking, "When receiving available
     * buffers": counter first, then the inflight flag. */
    r->desc[head].counter = q->inflight_counter++;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    r->desc[head].inflight = 1;
}

/* vhost-user.rst, "When supplying used buffers", steps 2-3: link the
 * head into the list of the batch being pushed. */
void vr_inflight_link(struct vr_queue *q, uint16_t head)
{
    struct vr_inflight_region *r = q->inflight;
    r->desc[head].next = r->last_batch_head;
    r->last_batch_head = head;
}

/* After used->idx was published: clear the batch's inflight flags, then
 * record used_idx.  A crash between the two is repaired at recovery via
 * last_batch_head. */
void vr_inflight_done(struct vr_queue *q, const uint16_t *heads, uint32_t n)
{
    struct vr_inflight_region *r = q->inflight;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    for (uint32_t k = 0; k < n; k++)
        r->desc[heads[k]].inflight = 0;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    r->used_idx = q->used_idx;
}

/* Heads waiting for resubmission, in counter order. */
int vr_inflight_list(const struct vr_queue *q, uint16_t *heads, uint32_t cap)
{
    uint32_t n = 0;
    for (uint32_t k = q->resubmit_pos; k < q->nresubmit && n < cap; k++)
        heads[n++] = q->resubmit[k];
    return (int)n;
}
