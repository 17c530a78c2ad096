/* driver_vsock.c: see driver_vsock.h. */
#include "clock.h"
#include "driver_vsock.h"
#include "vsock_hdr.h" /* struct vs_hdr (5.10.6), shared with the device side */

#include <stdlib.h>
#include <string.h>
#include <time.h>

#define REAP 256
#define WAIT_NS 200000ull /* sleep at most 0.2 ms at a time, then look at both queues */

enum { OP_REQUEST = 1, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST };
#define TYPE_STREAM 1

_Static_assert(DRV_VSOCK_HDR_SIZE == VS_HDR_SIZE, "the driver and the device agree on the header size");

struct run {
    struct drv_queue *tx, *rx;
    struct drv_vsock_conn *c;
    struct drv_vsock_slot *tx_slots, *rx_slots;
    uint32_t n_tx, n_rx;
    const struct drv_vsock_bench_params *p;
    struct drv_vsock_bench_stats *s;
    uint32_t *tx_free; /* stack of free tx slot numbers */
    uint32_t nfree;
    int update_due;    /* a CREDIT_UPDATE waits for a free tx slot */
    uint64_t first_rx, last_rx;
};

/* Offset of [gpa, gpa + len) in the queue's area, or UINT64_MAX when outside. */
static uint64_t area_offset(const struct drv_queue *q, uint64_t gpa, uint64_t len)
{
    if (gpa < q->gpa_base)
        return UINT64_MAX;
    uint64_t off = gpa - q->gpa_base;
    if (off > q->area_size || len > q->area_size - off)
        return UINT64_MAX;
    return off;
}

/* 5.10.6.3.1: what we may still send: peer_buf_alloc - (tx_cnt - peer_fwd_cnt), never negative. */
static uint32_t peer_credit(const struct drv_vsock_conn *c)
{
    uint32_t in_flight = (uint32_t)c->tx_cnt - c->peer_fwd_cnt;
    return in_flight >= c->peer_buf_alloc ? 0 : c->peer_buf_alloc - in_flight;
}

/* Write a header for this connection into a free tx slot and publish it. */
static int send_packet(struct run *r, uint16_t op, uint32_t len)
{
    uint32_t slot = r->tx_free[--r->nfree];
    struct drv_vsock_slot *ts = &r->tx_slots[slot];
    struct drv_vsock_conn *c = r->c;
    struct vs_hdr h = {
        .src_cid = c->local_cid, .dst_cid = c->peer_cid,
        .src_port = c->local_port, .dst_port = c->peer_port,
        .len = len, .type = TYPE_STREAM, .op = op, .flags = 0,
        .buf_alloc = c->buf_alloc, .fwd_cnt = (uint32_t)c->fwd_cnt,
    };
    /* slot ranges were checked against the area before the loop */
    memcpy(r->tx->area + (ts->gpa - r->tx->gpa_base), &h, sizeof(h));
    struct drv_seg seg = {ts->gpa, DRV_VSOCK_HDR_SIZE + len, 0};
    int head = drv_add(r->tx, &seg, 1);
    if (head < 0) {
        r->tx_free[r->nfree++] = slot;
        return head;
    }
    r->tx->st[head].cookie = slot;
    ts->head = (uint32_t)head;
    ts->len = op == OP_RW ? len : 0;
    c->reported_fwd = c->fwd_cnt; /* every header carries fwd_cnt */
    if (op == OP_RW)
        c->tx_cnt += len;
    return DRV_OK;
}

static int reap_tx(struct run *r, uint64_t *last_done)
{
    struct drv_used_elem used[REAP];
    int n = drv_reap(r->tx, used, REAP);
    for (int i = 0; i < n; i++) {
        uint32_t slot = r->tx->st[used[i].id].cookie;
        if (slot >= r->n_tx || r->tx_slots[slot].head != used[i].id)
            return DRV_E_ARG; /* cannot happen: every tx head in flight is one of ours */
        struct drv_vsock_slot *ts = &r->tx_slots[slot];
        if (ts->len) {
            r->s->tx_bytes += ts->len;
            r->s->tx_packets++;
        }
        ts->head = DRV_VSOCK_NO_HEAD;
        ts->len = 0;
        r->tx_free[r->nfree++] = slot;
    }
    if (n > 0)
        *last_done = vr_clock_ns();
    return n;
}

static int post_rx(struct run *r, uint32_t slot)
{
    struct drv_vsock_slot *rs = &r->rx_slots[slot];
    struct drv_seg segs[2] = {{rs->gpa, r->p->rx_buf_len, 1}, {0, 0, 1}};
    uint32_t nsegs = 1;
    if (r->p->rx_split) {
        segs[0].len = DRV_VSOCK_HDR_SIZE;
        segs[1].gpa = rs->gpa + DRV_VSOCK_HDR_SIZE;
        segs[1].len = r->p->rx_buf_len - DRV_VSOCK_HDR_SIZE;
        nsegs = 2;
    }
    int head = drv_add(r->rx, segs, nsegs);
    if (head < 0)
        return head;
    r->rx->st[head].cookie = slot;
    rs->head = (uint32_t)head;
    return DRV_OK;
}

static int is_ours(const struct drv_vsock_conn *c, const struct vs_hdr *h)
{
    return h->dst_cid == c->local_cid && h->src_cid == c->peer_cid && h->dst_port == c->local_port &&
           h->src_port == c->peer_port && h->type == TYPE_STREAM;
}

/* One received packet: update credit and counters; 1 when it ends the run. */
static int on_packet(struct run *r, const struct vs_hdr *h, uint32_t used_len)
{
    struct drv_vsock_conn *c = r->c;
    struct drv_vsock_bench_stats *s = r->s;
    if (h->len > used_len - DRV_VSOCK_HDR_SIZE || h->len > DRV_VSOCK_MAX_PAYLOAD) {
        s->errors++; /* the header claims more payload than the device wrote */
        return 0;
    }
    if (!is_ours(c, h)) {
        s->other++;
        return 0;
    }
    s->rx_packets++;
    c->peer_buf_alloc = h->buf_alloc; /* 5.10.6.3: every header carries the sender's credit */
    c->peer_fwd_cnt = h->fwd_cnt;
    switch (h->op) {
    case OP_RW:
        if (c->rx_cnt + h->len - c->reported_fwd > c->buf_alloc)
            s->peer_credit_violations++;
        c->rx_cnt += h->len;
        c->fwd_cnt += h->len; /* consumed at once */
        s->rx_bytes += h->len;
        if (h->len) {
            uint64_t now = vr_clock_ns();
            if (!r->first_rx)
                r->first_rx = now;
            r->last_rx = now;
        }
        /* the peer's view of our free space fell below half of buf_alloc */
        if (c->rx_cnt - c->reported_fwd + c->buf_alloc / 2 > c->buf_alloc)
            r->update_due = 1;
        return 0;
    case OP_CREDIT_REQUEST:
        r->update_due = 1;
        return 0;
    case OP_SHUTDOWN:
    case OP_RST:
        s->end_op = h->op;
        s->end_flags = h->flags;
        return 1;
    default: /* CREDIT_UPDATE (credit taken above), a stray REQUEST/RESPONSE */
        return 0;
    }
}

/* Reap rx, handle every packet, post every buffer again. Returns packets, or < 0. */
static int reap_rx(struct run *r, int *ended)
{
    struct drv_used_elem used[REAP];
    uint32_t slots[REAP];
    int n = drv_reap(r->rx, used, REAP);
    if (n <= 0)
        return n;
    for (int i = 0; i < n; i++) { /* read every cookie before a head is reused */
        slots[i] = r->rx->st[used[i].id].cookie;
        if (slots[i] >= r->n_rx || r->rx_slots[slots[i]].head != used[i].id)
            return DRV_E_ARG; /* cannot happen: every rx head in flight is one of ours */
        r->rx_slots[slots[i]].head = DRV_VSOCK_NO_HEAD;
    }
    for (int i = 0; i < n; i++) {
        if (used[i].len < DRV_VSOCK_HDR_SIZE || used[i].len > r->p->rx_buf_len) {
            r->s->errors++;
            continue;
        }
        struct vs_hdr h;
        memcpy(&h, r->rx->area + (r->rx_slots[slots[i]].gpa - r->rx->gpa_base), sizeof(h));
        if (!*ended && on_packet(r, &h, used[i].len))
            *ended = 1;
    }
    for (int i = 0; i < n; i++) {
        int rc = post_rx(r, slots[i]);
        if (rc < 0)
            return rc;
    }
    int rc = drv_kick(r->rx);
    return rc < 0 ? rc : n;
}

static int check_args(const struct run *r)
{
    const struct drv_vsock_bench_params *p = r->p;
    if (p->direction != DRV_VSOCK_G2H && p->direction != DRV_VSOCK_H2G)
        return DRV_E_ARG;
    if (r->n_tx == 0 || r->n_rx == 0 || r->tx->inflight || r->rx->inflight != r->n_rx)
        return DRV_E_ARG;
    if (p->tx_slot_size < DRV_VSOCK_HDR_SIZE || p->rx_buf_len <= DRV_VSOCK_HDR_SIZE)
        return DRV_E_ARG;
    if (p->direction == DRV_VSOCK_G2H &&
        (p->write_size == 0 || p->write_size > DRV_VSOCK_MAX_PAYLOAD ||
         p->tx_slot_size < DRV_VSOCK_HDR_SIZE + p->write_size))
        return DRV_E_ARG;
    for (uint32_t i = 0; i < r->n_tx; i++)
        if (area_offset(r->tx, r->tx_slots[i].gpa, p->tx_slot_size) == UINT64_MAX)
            return DRV_E_RANGE;
    for (uint32_t i = 0; i < r->n_rx; i++) {
        uint32_t h = r->rx_slots[i].head;
        if (area_offset(r->rx, r->rx_slots[i].gpa, p->rx_buf_len) == UINT64_MAX)
            return DRV_E_RANGE;
        if (h >= r->rx->size || r->rx->st[h].chain_len == 0)
            return DRV_E_ARG; /* not a head in flight */
        r->rx->st[h].cookie = i;
    }
    for (uint32_t i = 0; i < r->n_rx; i++) /* a head given twice keeps only the later cookie */
        if (r->rx->st[r->rx_slots[i].head].cookie != i)
            return DRV_E_ARG;
    return DRV_OK;
}

int drv_vsock_bench(struct drv_queue *tx, struct drv_queue *rx, struct drv_vsock_conn *c,
                    struct drv_vsock_slot *tx_slots, uint32_t n_tx,
                    struct drv_vsock_slot *rx_slots, uint32_t n_rx,
                    const struct drv_vsock_bench_params *p, struct drv_vsock_bench_stats *s)
{
    struct run r = {tx, rx, c, tx_slots, rx_slots, n_tx, n_rx, p, s, NULL, 0, 0, 0, 0};
    memset(s, 0, sizeof(*s));
    if (tx->broken || rx->broken)
        return DRV_E_BROKEN;
    int rc = check_args(&r);
    if (rc < 0)
        return rc;
    r.tx_free = calloc(n_tx, sizeof(uint32_t));
    if (!r.tx_free)
        return DRV_E_ARG;
    for (uint32_t i = n_tx; i-- > 0;) {
        tx_slots[i].head = DRV_VSOCK_NO_HEAD;
        tx_slots[i].len = 0;
        r.tx_free[r.nfree++] = i;
    }
    int g2h = p->direction == DRV_VSOCK_G2H, ended = 0, asked = 0;
    uint64_t start = vr_clock_ns(), now = start, last_progress = start, last_tx = start, stop = 0;
    for (;;) {
        int progress = 0;
        if ((rc = reap_tx(&r, &last_tx)) < 0)
            break;
        progress |= rc > 0;
        if ((rc = reap_rx(&r, &ended)) < 0)
            break;
        progress |= rc > 0;
        rc = DRV_OK;
        if (r.update_due && !ended && r.nfree && tx->num_free) {
            if ((rc = send_packet(&r, OP_CREDIT_UPDATE, 0)) < 0)
                break;
            r.update_due = 0;
            s->credit_updates++;
        }
        now = vr_clock_ns();
        if (!stop && (ended || (p->duration_ns && now - start >= p->duration_ns)))
            stop = now;
        uint32_t pkt = p->write_size;
        if (g2h && pkt > c->peer_buf_alloc)
            pkt = c->peer_buf_alloc; /* a window smaller than a write: send what fits */
        int credit_short = g2h && !stop && (pkt == 0 || peer_credit(c) < pkt);
        while (g2h && !stop && pkt && r.nfree && tx->num_free && peer_credit(c) >= pkt) {
            if ((rc = send_packet(&r, OP_RW, pkt)) < 0)
                goto out;
        }
        if ((rc = drv_kick(tx)) < 0)
            break;
        if (stop && (!g2h || ended || tx->inflight == 0))
            break;
        if (progress) {
            last_progress = now;
            asked = 0;
            continue;
        }
        if (now - last_progress > p->stall_timeout_ns) {
            rc = DRV_E_TIMEOUT;
            break;
        }
        /* stalled on credit for half the timeout: ask once, as 5.10.6.3 allows */
        if (credit_short && !asked && r.nfree && tx->num_free && now - last_progress > p->stall_timeout_ns / 2) {
            if ((rc = send_packet(&r, OP_CREDIT_REQUEST, 0)) < 0)
                break;
            drv_kick(tx);
            s->credit_requests++;
            asked = 1;
        }
        /* nothing moved: sleep on the queue whose completion unblocks us */
        struct drv_queue *q = g2h && !credit_short && (r.nfree == 0 || stop) ? tx : rx;
        if ((rc = drv_wait(q, WAIT_NS)) < 0)
            break;
        rc = DRV_OK;
    }
out:
    if (g2h)
        s->elapsed_ns = last_tx - start;
    else
        s->elapsed_ns = r.last_rx - r.first_rx;
    free(r.tx_free);
    return rc;
}
