/* driver_net.c: see driver_net.h. */
#include "clock.h"
#include "driver_net.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#define REAP 256

/* The slot of a chain is kept in the driver-private cookie of its head, so
 * rx buffers left posted by one run are recognised by the next. */
static int post_rx(struct drv_queue *rx, const struct drv_net_bench_params *p, uint32_t slot)
{
    struct drv_seg seg = {rx->gpa_base + p->rx_offset + (uint64_t)slot * p->rx_buf_len,
                          p->rx_buf_len, 1};
    int head = drv_add(rx, &seg, 1);
    if (head >= 0)
        rx->st[head].cookie = slot;
    return head;
}

int drv_net_bench(struct drv_queue *tx, struct drv_queue *rx,
                  const struct drv_net_bench_params *p, struct drv_net_bench_stats *s)
{
    if (p->tx_slots == 0 || p->rx_slots == 0 || p->hdr_len > p->rx_buf_len ||
        p->tx_offset + (uint64_t)p->tx_slots * p->tx_slot_size > tx->area_size ||
        p->rx_offset + (uint64_t)p->rx_slots * p->rx_buf_len > rx->area_size)
        return DRV_E_ARG;
    if (tx->inflight)
        return DRV_E_ARG;
    uint32_t *tx_free = calloc(p->tx_slots, sizeof(uint32_t));
    struct drv_used_elem used[REAP];
    int rc = DRV_OK;
    if (!tx_free) {
        rc = DRV_E_ARG;
        goto out;
    }
    memset(s, 0, sizeof(*s));
    uint32_t nfree = p->tx_slots, remaining = 0;
    for (uint32_t i = 0; i < p->tx_slots; i++)
        tx_free[i] = i;
    if (rx->inflight == 0)      /* else the buffers of an earlier run are still posted */
        for (uint32_t i = 0; i < p->rx_slots && rx->num_free > 0; i++)
            if ((rc = post_rx(rx, p, i)) < 0)
                goto out;
    rc = DRV_OK;
    drv_kick(rx);
    uint64_t start = vr_clock_ns(), last_progress = start, now = start, end = 0;
    /* Send for duration_ns, then only reap until every tx chain is back and
     * 2 ms pass without a frame (at most 1 s), so each run accounts for what
     * it sent. */
    for (;;) {
        int progress = 0;
        if (!end && now - start >= p->duration_ns)
            end = now;
        if (end && ((tx->inflight == 0 && now - last_progress > 2000000) ||
                    now - end > 1000000000))
            break;
        while (!end && nfree && tx->num_free > 0) {
            uint32_t slot = tx_free[--nfree];
            struct drv_seg seg = {tx->gpa_base + p->tx_offset + (uint64_t)slot * p->tx_slot_size,
                                  p->hdr_len + p->frame_len, 0};
            int head = drv_add(tx, &seg, 1);
            if (head < 0) {
                rc = head;
                goto out;
            }
            tx->st[head].cookie = slot;
        }
        if ((rc = drv_kick(tx)) < 0)
            goto out;
        int n = drv_reap(tx, used, REAP);
        if (n < 0) {
            rc = n;
            goto out;
        }
        for (int i = 0; i < n; i++)
            tx_free[nfree++] = tx->st[used[i].id].cookie;
        s->sent += (uint64_t)n;
        progress |= n > 0;
        n = drv_reap(rx, used, REAP);
        if (n < 0) {
            rc = n;
            goto out;
        }
        uint32_t slots[REAP];
        for (int i = 0; i < n; i++) {   /* read every cookie before a head is reused */
            slots[i] = rx->st[used[i].id].cookie;
            if (slots[i] >= p->rx_slots) {
                rc = DRV_E_ARG;
                goto out;
            }
        }
        for (int i = 0; i < n; i++) {
            const uint8_t *buf = rx->area + p->rx_offset + (uint64_t)slots[i] * p->rx_buf_len;
            uint32_t len = used[i].len < p->rx_buf_len ? used[i].len : p->rx_buf_len;
            if (remaining == 0) {
                uint32_t nb = p->mergeable && len >= 12 ? (uint32_t)(buf[10] | buf[11] << 8) : 1;
                s->received++;
                s->rx_bytes += len > p->hdr_len ? len - p->hdr_len : 0;
                remaining = nb ? nb - 1 : 0;
            } else {
                s->rx_bytes += len;
                remaining--;
            }
        }
        for (int i = 0; i < n; i++)
            if ((rc = post_rx(rx, p, slots[i])) < 0)
                goto out;
        rc = DRV_OK;
        if (n > 0) {
            drv_kick(rx);
            progress = 1;
        }
        now = vr_clock_ns();
        if (progress) {
            last_progress = now;
        } else if (now - last_progress > p->stall_timeout_ns) {
            rc = DRV_E_TIMEOUT;
            goto out;
        } else if (end || nfree == 0 || tx->num_free == 0) {
            drv_wait(rx, 200000);   /* nothing to send: sleep until rx or 0.2 ms */
            now = vr_clock_ns();
        }
    }
    s->elapsed_ns = end - start;
out:
    free(tx_free);
    return rc;
}
