/*
 * net_rx.c - delivery of a switched frame into a port's rx ring
 * (mergeable buffers, offload checks, per-port filters) or its TAP.
 * virtio-net header and offloads: virtio 1.2, 5.1.6.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "capture.h"
#include "net.h"
#include "net_switch.h"
#include "net_filter.h"
#include "net_offload.h"

/* ---- delivery ---- */

static void mark_dirty(struct vr_net_tx *t, struct rxq *r)
{
    for (uint32_t i = 0; i < t->ndirty; i++)
        if (t->dirty[i] == r)
            return;
    if (t->ndirty < sizeof(t->dirty) / sizeof(t->dirty[0]))
        t->dirty[t->ndirty++] = r;
}

/* Make the pending chains used: one used-index store (per q->num). */
static void push_pending(struct vr_net_tx *t)
{
    struct rxq *r = t->open;
    uint32_t done = 0;
    while (done < t->npend) {
        uint32_t n = t->npend - done;
        if (n > r->q->num)
            n = r->q->num;
        vr_push_batch(r->q, t->pheads + done, t->plens + done, n);
        done += n;
    }
    if (t->npend)
        mark_dirty(t, r);
    t->npend = 0;
}

void net_rx_close(struct vr_net_tx *t)
{
    if (!t->open)
        return;
    push_pending(t);
    pthread_mutex_unlock(&t->open->lock);
    t->open = NULL;
}

/* Lock r for this and following frames (closing another open queue first);
 * returns its queue when it takes frames, else NULL with nothing held. */
static struct vr_queue *net_rx_open(struct vr_net_tx *t, struct rxq *r)
{
    if (t->open != r) {
        net_rx_close(t);
        pthread_mutex_lock(&r->lock);
        t->open = r;
        if (r->q)   /* the next frames are likely as long as this one */
            vr_prefetch_avail(r->q, BATCH, 1, t->total);
    }
    struct vr_queue *q = r->q;
    if (!q || !q->started || q->broken) {
        net_rx_close(t);
        return NULL;
    }
    if (t->npend + MAX_MERGE > PEND)
        push_pending(t);
    return q;
}

void net_flush_notify(struct vr_net_tx *t)
{
    net_rx_close(t);
    for (uint32_t i = 0; i < t->ndirty; i++) {
        struct rxq *r = t->dirty[i];
        pthread_mutex_lock(&r->lock);
        if (r->q && r->q->started)
            vr_notify(r->q);
        pthread_mutex_unlock(&r->lock);
    }
    t->ndirty = 0;
}

/* Walk frame bytes [off, off + len) of the tx chain (offsets from the start
 * of t->frame, header included): fn(ctx, piece, n) for each host piece. */
static void src_each(const struct vr_net_tx *t, uint32_t off, uint32_t len,
                     void (*fn)(void *ctx, const uint8_t *p, uint32_t n), void *ctx)
{
    for (uint32_t k = 0; k < t->src_nseg && len; k++) {
        uint32_t l = t->src_segs[k].len;
        if (off >= l) {
            off -= l;
            continue;
        }
        uint32_t take = l - off < len ? l - off : len;
        fn(ctx, vr_seg_host(t->src_mem, &t->src_segs[k]) + off, take);
        len -= take;
        off = 0;
    }
}

static void append(void *ctx, const uint8_t *p, uint32_t n)
{
    uint8_t **dst = ctx;
    memcpy(*dst, p, n);
    *dst += n;
}

void net_frame_fill(struct vr_net_tx *t, uint32_t upto)
{
    if (t->have < upto) {
        uint8_t *dst = t->frame + t->have;
        src_each(t, t->have, upto - t->have, append, &dst);
        t->have = upto;
    }
}

uint8_t *net_frame_all(struct vr_net_tx *t)
{
    net_frame_fill(t, t->total);
    return t->frame;
}

struct scatter_ctx {
    const struct vr_mem *m;
    const struct vr_seg *segs;
    uint32_t n, skip;
};

static void scatter(void *ctx, const uint8_t *p, uint32_t n)
{
    struct scatter_ctx *sc = ctx;
    vr_segs_scatter(sc->m, sc->segs, sc->n, sc->skip, p, n);
    sc->skip += n;
}

/* Frame bytes [foff, foff + len) of f into rx segments from byte skip on.
 * When f is the frame being switched and its tail is still in the tx
 * chain, that part is copied straight from the tx buffers. */
static void put_frame(struct vr_net_tx *t, const struct vr_mem *m, const struct vr_seg *segs,
                      uint32_t n, uint32_t skip, const uint8_t *f, uint32_t foff, uint32_t len)
{
    if (f != t->frame + t->fhl || t->have >= t->total) {
        vr_segs_scatter(m, segs, n, skip, f + foff, len);
        return;
    }
    struct scatter_ctx sc = {m, segs, n, skip};
    uint32_t off = t->fhl + foff;        /* from the start of t->frame */
    if (off < t->have) {
        uint32_t l = t->have - off < len ? t->have - off : len;
        scatter(&sc, t->frame + off, l);
        off += l;
        len -= l;
    }
    src_each(t, off, len, scatter, &sc);
}

/* Copy one frame (with header h) into the rx buffers of a virtio port; the
 * chains it fills join the session's pending ones. */
static int copy_to_rx(struct vr_net_tx *t, struct port *dst, struct rxq *r,
                      const uint8_t *hdr, uint32_t hl, const uint8_t *f, uint32_t len)
{
    struct vr_queue *q = r->q;
    uint64_t feat = __atomic_load_n(&dst->features, __ATOMIC_ACQUIRE);
    int mrg = has(feat, VR_NET_F_MRG_RXBUF);
    uint32_t need = hl + len, done = 0, n = 0;
    struct vr_chain c0 = {.cap = VR_MAX_SEGS, .segs = t->segs0};
    struct vr_chain c = {.cap = VR_MAX_SEGS, .segs = t->segs};
    uint16_t *heads = t->pheads + t->npend;   /* room for MAX_MERGE (net_rx_open) */
    uint32_t *lens = t->plens + t->npend;
    while (done < need) {
        struct vr_chain *ch = n == 0 ? &c0 : &c;
        int rc = (n < MAX_MERGE) ? vr_pop(q, ch) : 0;
        /* 5.1.6.3.1: the header must fit in the first buffer. */
        if (rc <= 0 || (!mrg && ch->write_len < need) || ch->write_len == 0 ||
            (n == 0 && ch->write_len < hl)) {
            if (rc > 0)
                heads[n++] = ch->head;
            if (q->broken)
                return -1;
            if (q->inflight) {   /* cannot rewind: hand them back empty, after the
                                  * session's earlier chains (in the order popped) */
                for (uint32_t i = 0; i < n; i++)
                    lens[i] = 0;
                t->npend += n;
            } else {   /* undo this frame's pops: the chains stay available to the driver */
                vr_unpop_n(q, n);
            }
            r->st.rx_no_room++;
            return -1;
        }
        uint32_t nread = ch->nread;
        uint32_t room = ch->write_len > need - done ? need - done : (uint32_t)ch->write_len;
        /* Header bytes go in after the pops (num_buffers is known then). */
        if (n == 0) {
            put_frame(t, q->mem, ch->segs + nread, ch->nseg - nread, hl, f, 0, room - hl);
        } else {
            put_frame(t, q->mem, ch->segs + nread, ch->nseg - nread, 0, f, done - hl, room);
        }
        heads[n] = ch->head;
        lens[n] = room;
        done += room;
        n++;
    }
    uint8_t h[12];
    memcpy(h, hdr, 12);   /* hdr is always 12 bytes (pack_hdr); hl of them go out */
    if (hl == 12)
        put_le16(h + 10, (uint16_t)n);
    vr_segs_scatter(q->mem, c0.segs + c0.nread, c0.nseg - c0.nread, 0, h, hl);
    t->npend += n;             /* made used by push_pending */
    vr_prefetch_next(q, hl + len);   /* buffers for frames like this one */
    r->st.rx_frames++;
    r->st.rx_bytes += len;
    return 0;
}

/* The header for the peer with `flags` in place of h's (h is read field by
 * field: it was just built from narrow stores, and a wide load of it would
 * stall on store forwarding). */
static void pack_hdr(uint8_t *b, const struct vr_net_hdr *h, uint8_t flags)
{
    b[0] = flags;
    b[1] = h->gso_type;
    put_le16(b + 2, h->hdr_len);
    put_le16(b + 4, h->gso_size);
    put_le16(b + 6, h->csum_start);
    put_le16(b + 8, h->csum_offset);
    put_le16(b + 10, 1);
}

static int deliver_one(struct vr_net_tx *t, struct port *dst, const struct vr_net_hdr *h,
                       uint8_t flags, const uint8_t *f, uint32_t len)
{
    uint8_t hb[12];
    if ((h->gso_type & ~GSO_ECN) == GSO_NONE && vr_net_over_mtu(__atomic_load_n(&dst->mtu, __ATOMIC_ACQUIRE), f, len)) {
        STAT(dst, rx_over_mtu, 1);   /* dropped whole, never cut to size */
        return -1;
    }
    pack_hdr(hb, h, flags);
    if (dst->tap_fd >= 0) {
        if (f == t->frame + t->fhl)
            net_frame_all(t);
        struct iovec iov[2] = {{hb, 12}, {(void *)f, len}};
        ssize_t r;
        do {
            r = writev(dst->tap_fd, iov, 2);
        } while (r < 0 && errno == EINTR);
        if (r < 0) {
            STAT(dst, rx_no_room, 1);
            return -1;
        }
        STAT(dst, rx_frames, 1);
        STAT(dst, rx_bytes, len);
        return 0;
    }
    uint64_t feat = __atomic_load_n(&dst->features, __ATOMIC_ACQUIRE);
    uint32_t hl = hdr_len_of(feat);
    /* 5.1.6.5.5: only the first `pairs` rx queues take frames. */
    uint32_t nq = __atomic_load_n(&dst->pairs, __ATOMIC_ACQUIRE);
    if (nq == 0 || nq > VR_NET_MAX_QP)
        nq = VR_NET_MAX_QP;
    for (uint32_t k = 0; k < nq; k++) {
        uint32_t i = t->rxsel + k;
        struct rxq *r = &dst->rxq[i < nq ? i : i % nq];
        if (t->open != r && !__atomic_load_n(&r->q, __ATOMIC_ACQUIRE))
            continue;
        if (!net_rx_open(t, r))
            continue;
        return copy_to_rx(t, dst, r, hb, hl, f, len);
    }
    STAT(dst, rx_not_ready, 1);
    return -1;
}

struct seg_ctx {
    struct vr_net_tx *t;
    struct port *dst;
};

static void emit_segment(void *ctx, const uint8_t *seg, uint32_t len)
{
    struct seg_ctx *sc = ctx;
    struct vr_net_hdr none = {0};
    deliver_one(sc->t, sc->dst, &none, 0, seg, len);
}

/* Hand a peer only the offloads it negotiated (5.1.6.4). */
static void deliver(struct vr_net_tx *t, struct port *dst, struct vr_net_hdr *h, uint8_t *f,
                    uint32_t len)
{
    if (dst->tap_fd < 0) {
        uint64_t feat = __atomic_load_n(&dst->features, __ATOMIC_ACQUIRE);
        uint8_t gso = h->gso_type & ~GSO_ECN;
        if (gso != GSO_NONE) {
            int ok = has(feat, gso == GSO_TCPV4 ? VR_NET_F_GUEST_TSO4 : VR_NET_F_GUEST_TSO6) &&
                     (!(h->gso_type & GSO_ECN) || has(feat, VR_NET_F_GUEST_ECN));
            if (!ok) {
                struct seg_ctx sc = {t, dst};
                net_frame_all(t);
                if (vr_net_segment(h, f, len, t->seg, emit_segment, &sc) < 0)
                    STAT(dst, rx_no_room, 1);
                else
                    STAT(dst, segmented, 1);
                return;
            }
        }
        if (!has(feat, VR_NET_F_GUEST_CSUM)) {
            if (h->flags & HDR_F_NEEDS_CSUM) {
                /* Done in place: the frame is now complete for every peer. */
                net_frame_all(t);
                vr_net_resolve_csum(f, len, h);
                h->flags &= ~HDR_F_NEEDS_CSUM;
                STAT(dst, csum_resolved, 1);
            }
            deliver_one(t, dst, h, 0, f, len);
            return;
        }
    }
    deliver_one(t, dst, h, h->flags, f, len);
}

static void deliver_filtered(struct vr_net_tx *t, struct port *dst, struct vr_net_hdr *h,
                             uint8_t *f, uint32_t len)
{
    if (!vr_net_filter_accepts(&dst->filter, f)) {
        STAT(dst, rx_filtered, 1);
        return;
    }
    deliver(t, dst, h, f, len);
}

/* One frame from port `src` (header of hl bytes + frame in t->frame). */
void net_switch_frame(struct vr_net_tx *t, uint32_t hl, uint32_t total)
{
    struct vr_net_switch *sw = t->sw;
    struct port *sp = &sw->ports[t->port];
    if (total < hl + ETH_HLEN) {
        TXSTAT(t, tx_runt, 1);
        return;
    }
    uint8_t *b = t->frame, *f = b + hl;
    uint32_t len = total - hl;
    t->fhl = hl;
    t->total = total;
    struct vr_net_hdr h = {b[0], b[1], le16(b + 2), le16(b + 4), le16(b + 6), le16(b + 8)};
    uint64_t feat = __atomic_load_n(&sp->features, __ATOMIC_ACQUIRE);
    if (vr_net_check_hdr(&h, feat, len, sp->tap_fd < 0) < 0) {
        TXSTAT(t, tx_bad_header, 1);
        return;
    }
    TXSTAT(t, tx_frames, 1);
    TXSTAT(t, tx_bytes, len);
    if (sw->cap)
        capture(sw, net_frame_all(t) + hl, len);
    t->rxsel = sp->tap_fd >= 0 || t->qp >= VR_NET_MAX_QP ? vr_net_flow_hash(net_frame_all(t) + hl, len)
                                                         : t->qp;
    int dst = net_switch_lookup(t, f);
    if (dst >= 0) {
        if (dst != t->port)
            deliver_filtered(t, &sw->ports[dst], &h, f, len);
        return;
    }
    TXSTAT(t, flooded, 1);
    for (int i = 0; i < sw->nports; i++)
        if (i != t->port && sw->ports[i].used)
            deliver_filtered(t, &sw->ports[i], &h, f, len);
}
