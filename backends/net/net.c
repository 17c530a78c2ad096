/*
 * net.c - the vhost-user-net learning switch (see net.h for the theory of
 * operation).  virtio-net header and offloads: virtio 1.2, 5.1.6.
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
#include "net_filter.h"
#include "net_offload.h"
#define BATCH 64
#define MAX_MERGE 256        /* rx chains one frame may span */
#define MAC_BUCKETS 4096
#define MAC_PROBE 8

struct rxq {
    pthread_mutex_t lock;
    struct vr_queue *q;      /* NULL while detached */
    struct vr_net_stats st;  /* rx counters, written under lock */
};

struct port {
    int used;
    int tap_fd;              /* >= 0 for a TAP port */
    uint64_t features;       /* negotiated (virtio) or offered (TAP) */
    struct rxq rxq[VR_NET_MAX_QP];
    /* tx counters: one writer per slot (tx worker or TAP reader of queue
     * pair k; the last slot is vr_net_inject's), so plain adds suffice */
    struct vr_net_stats txst[VR_NET_MAX_QP + 1];
    struct vr_net_stats stats;   /* rare-path counters, __atomic adds */
    uint32_t mtu;            /* 0: no limit; else the longest L3 payload delivered */
    uint32_t pairs;          /* rx queue pairs in use (VQ_PAIRS_SET); 0: all */
    struct vr_net_filter filter;
};

struct mac_entry {
    uint64_t key;            /* MAC | 1 << 48 when valid */
    int32_t port;
    uint64_t seen;
};

struct vr_net_switch {
    struct port ports[VR_NET_MAX_PORTS];
    int nports;
    uint64_t ageing_ns;
    pthread_mutex_t mac_lock;
    struct mac_entry macs[MAC_BUCKETS];
    struct vr_capture *cap;  /* ring of pcap records (capture.c), NULL without --pcap */
};

/* Per-worker context: buffers allocated once. */
struct vr_net_tx {
    struct vr_net_switch *sw;
    int port;
    uint32_t qp;
    uint64_t now;
    uint8_t frame[VR_NET_MAX_FRAME + 16];
    uint8_t seg[VR_NET_MAX_FRAME + 16];
    struct vr_seg segs[VR_MAX_SEGS];
    struct vr_seg segs0[VR_MAX_SEGS];
    uint16_t heads[MAX_MERGE > BATCH ? MAX_MERGE : BATCH];
    uint32_t lens[MAX_MERGE > BATCH ? MAX_MERGE : BATCH];
    struct rxq *dirty[VR_NET_MAX_PORTS * VR_NET_MAX_QP];
    uint32_t ndirty;
    struct vr_net_stats *st;     /* this context's tx counter slot */
    uint32_t rxsel;              /* rx pair choice for the frame being switched */
};

#define STAT(p, field, n) __atomic_fetch_add(&(p)->stats.field, (n), __ATOMIC_RELAXED)
#define TXSTAT(t, field, n) ((t)->st->field += (n))

static inline uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static inline void put_le16(uint8_t *p, uint16_t v) { p[0] = v & 0xff; p[1] = v >> 8; }

static inline int has(uint64_t f, int bit) { return (f >> bit) & 1; }

/* 5.1.6.1: the header is 12 bytes with VERSION_1 or MRG_RXBUF, else 10. */
static inline uint32_t hdr_len_of(uint64_t f)
{
    return has(f, VR_NET_F_VERSION_1) || has(f, VR_NET_F_MRG_RXBUF) ? 12 : 10;
}

/* ---- switch and ports ---- */

struct vr_net_switch *vr_net_switch_new(uint32_t capture_bytes, uint64_t ageing_ns)
{
    struct vr_net_switch *sw = calloc(1, sizeof(*sw));
    if (!sw)
        return NULL;
    if (capture_bytes) {
        sw->cap = vr_capture_new(capture_bytes, VR_CAPTURE_MAX_SNAPLEN);
        if (!sw->cap) {
            free(sw);
            return NULL;
        }
    }
    sw->ageing_ns = ageing_ns;
    pthread_mutex_init(&sw->mac_lock, NULL);
    for (int i = 0; i < VR_NET_MAX_PORTS; i++) {
        vr_net_filter_init(&sw->ports[i].filter);
        for (int k = 0; k < VR_NET_MAX_QP; k++)
            pthread_mutex_init(&sw->ports[i].rxq[k].lock, NULL);
    }
    return sw;
}

void vr_net_switch_free(struct vr_net_switch *sw)
{
    if (sw) {
        vr_capture_free(sw->cap);
        free(sw);
    }
}

int vr_net_port_add(struct vr_net_switch *sw, int tap_fd, uint64_t tap_features)
{
    if (sw->nports >= VR_NET_MAX_PORTS)
        return -VR_E_NOMEM;
    struct port *p = &sw->ports[sw->nports];
    p->used = 1;
    p->tap_fd = tap_fd;
    p->features = tap_fd >= 0 ? tap_features : 0;
    return sw->nports++;
}

static struct port *port_of(struct vr_net_switch *sw, int port)
{
    return port >= 0 && port < sw->nports ? &sw->ports[port] : NULL;
}

void vr_net_port_set_features(struct vr_net_switch *sw, int port, uint64_t features)
{
    struct port *p = port_of(sw, port);
    if (p)
        __atomic_store_n(&p->features, features, __ATOMIC_RELEASE);
}

void vr_net_port_set_mtu(struct vr_net_switch *sw, int port, uint32_t mtu)
{
    struct port *p = port_of(sw, port);
    if (p)
        __atomic_store_n(&p->mtu, mtu, __ATOMIC_RELEASE);
}

void vr_net_port_set_pairs(struct vr_net_switch *sw, int port, uint32_t pairs)
{
    struct port *p = port_of(sw, port);
    if (p)
        __atomic_store_n(&p->pairs, pairs > VR_NET_MAX_QP ? VR_NET_MAX_QP : pairs,
                         __ATOMIC_RELEASE);
}

int vr_net_port_set_filter(struct vr_net_switch *sw, int port, uint32_t flags,
                           const uint8_t *own_mac, const uint8_t *macs, uint32_t n_uni,
                           uint32_t n_multi)
{
    struct port *p = port_of(sw, port);
    return p ? vr_net_filter_set(&p->filter, flags, own_mac, macs, n_uni, n_multi) : -VR_E_INVAL;
}

static void add_stats(struct vr_net_stats *out, const struct vr_net_stats *in)
{
    const uint64_t *src = (const uint64_t *)in;
    uint64_t *dst = (uint64_t *)out;
    for (size_t i = 0; i < sizeof(*in) / sizeof(uint64_t); i++)
        dst[i] += __atomic_load_n(&src[i], __ATOMIC_RELAXED);
}

void vr_net_port_get_stats(struct vr_net_switch *sw, int port, struct vr_net_stats *out)
{
    struct port *p = port_of(sw, port);
    memset(out, 0, sizeof(*out));
    if (!p)
        return;
    add_stats(out, &p->stats);
    for (int k = 0; k < VR_NET_MAX_QP; k++)
        add_stats(out, &p->rxq[k].st);
    for (int k = 0; k <= VR_NET_MAX_QP; k++)
        add_stats(out, &p->txst[k]);
}

int vr_net_rx_attach(struct vr_net_switch *sw, int port, uint32_t qp, struct vr_queue *q)
{
    struct port *p = port_of(sw, port);
    if (!p || qp >= VR_NET_MAX_QP)
        return -VR_E_INVAL;
    pthread_mutex_lock(&p->rxq[qp].lock);
    __atomic_store_n(&p->rxq[qp].q, q, __ATOMIC_RELEASE);
    /* The guest need not kick rx: we look for buffers when a frame comes. */
    vr_disable_notify(q);
    pthread_mutex_unlock(&p->rxq[qp].lock);
    return 0;
}

void vr_net_rx_detach(struct vr_net_switch *sw, int port, uint32_t qp)
{
    struct port *p = port_of(sw, port);
    if (!p || qp >= VR_NET_MAX_QP)
        return;
    pthread_mutex_lock(&p->rxq[qp].lock);
    __atomic_store_n(&p->rxq[qp].q, NULL, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&p->rxq[qp].lock);
}

void vr_net_rx_lock(struct vr_net_switch *sw, int port, uint32_t qp)
{
    struct port *p = port_of(sw, port);
    if (p && qp < VR_NET_MAX_QP)
        pthread_mutex_lock(&p->rxq[qp].lock);
}

void vr_net_rx_unlock(struct vr_net_switch *sw, int port, uint32_t qp)
{
    struct port *p = port_of(sw, port);
    if (p && qp < VR_NET_MAX_QP)
        pthread_mutex_unlock(&p->rxq[qp].lock);
}

/* ---- MAC table ---- */

static inline uint64_t mac_key(const uint8_t *m)
{
    uint64_t k = 0;
    for (int i = 0; i < 6; i++)
        k = k << 8 | m[i];
    return k | 1ull << 48;
}

static inline uint32_t mac_hash(uint64_t k)
{
    k *= 0x9E3779B97F4A7C15ull;
    return (uint32_t)(k >> 40) & (MAC_BUCKETS - 1);
}

static int lookup_locked(struct vr_net_switch *sw, uint64_t key, uint64_t now)
{
    uint32_t h = mac_hash(key);
    for (int i = 0; i < MAC_PROBE; i++) {
        struct mac_entry *e = &sw->macs[(h + i) & (MAC_BUCKETS - 1)];
        if (e->key == key)
            return now - e->seen < sw->ageing_ns ? e->port : -1;
    }
    return -1;
}

static void learn_locked(struct vr_net_switch *sw, uint64_t key, int port, uint64_t now)
{
    uint32_t h = mac_hash(key);
    struct mac_entry *victim = NULL;
    for (int i = 0; i < MAC_PROBE; i++) {
        struct mac_entry *e = &sw->macs[(h + i) & (MAC_BUCKETS - 1)];
        if (e->key == key) {
            e->port = port;
            e->seen = now;
            return;
        }
        if (!victim || e->key == 0 || (victim->key != 0 && e->seen < victim->seen))
            if (!victim || victim->key != 0)
                victim = e;
    }
    victim->key = key;
    victim->port = port;
    victim->seen = now;
}

/* Learn src, look up dst; -1 = flood. */
static int switch_lookup(struct vr_net_switch *sw, const uint8_t *eth, int src, uint64_t now)
{
    int dst = -1;
    int learn = !(eth[6] & 1) && mac_key(eth + 6) != 1ull << 48;
    int unicast = !(eth[0] & 1);
    if (!learn && !unicast)
        return -1;
    pthread_mutex_lock(&sw->mac_lock);
    if (learn)
        learn_locked(sw, mac_key(eth + 6), src, now);
    if (unicast)
        dst = lookup_locked(sw, mac_key(eth), now);
    pthread_mutex_unlock(&sw->mac_lock);
    return dst;
}

int vr_net_mac_lookup(struct vr_net_switch *sw, const uint8_t *mac)
{
    pthread_mutex_lock(&sw->mac_lock);
    int port = lookup_locked(sw, mac_key(mac), vr_clock_ns());
    pthread_mutex_unlock(&sw->mac_lock);
    return port;
}

void vr_net_port_forget(struct vr_net_switch *sw, int port)
{
    pthread_mutex_lock(&sw->mac_lock);
    for (int i = 0; i < MAC_BUCKETS; i++)
        if (sw->macs[i].key && sw->macs[i].port == port)
            sw->macs[i].key = 0;
    pthread_mutex_unlock(&sw->mac_lock);
}

/* ---- capture (the shared ring: capture.c) ---- */

/* Append one frame (never blocks on the reader: the ring drops when full). */
static void capture(struct vr_net_switch *sw, const uint8_t *frame, uint32_t len)
{
    if (sw->cap)
        vr_capture_put(sw->cap, frame, len);
}

uint32_t vr_net_capture_read(struct vr_net_switch *sw, uint8_t *buf, uint32_t cap,
                             uint64_t *dropped)
{
    if (!sw->cap)
        return 0;
    return vr_capture_read(sw->cap, buf, cap, dropped);
}

/* ---- delivery ---- */

static void write_segs(const struct vr_mem *m, const struct vr_seg *segs, uint32_t n,
                       uint32_t skip, const uint8_t *src, uint32_t len)
{
    for (uint32_t k = 0; k < n && len > 0; k++) {
        uint32_t l = segs[k].len;
        if (skip >= l) {
            skip -= l;
            continue;
        }
        uint32_t take = l - skip < len ? l - skip : len;
        memcpy(vr_seg_host(m, &segs[k]) + skip, src, take);
        src += take;
        len -= take;
        skip = 0;
    }
}

static void mark_dirty(struct vr_net_tx *t, struct rxq *r)
{
    for (uint32_t i = 0; i < t->ndirty; i++)
        if (t->dirty[i] == r)
            return;
    if (t->ndirty < sizeof(t->dirty) / sizeof(t->dirty[0]))
        t->dirty[t->ndirty++] = r;
}

static void flush_notify(struct vr_net_tx *t)
{
    for (uint32_t i = 0; i < t->ndirty; i++) {
        struct rxq *r = t->dirty[i];
        pthread_mutex_lock(&r->lock);
        if (r->q && r->q->started)
            vr_notify(r->q);
        pthread_mutex_unlock(&r->lock);
    }
    t->ndirty = 0;
}

/* Copy one frame (with header h) into the rx buffers of a virtio port. */
static int copy_to_rx(struct vr_net_tx *t, struct port *dst, struct rxq *r,
                      const uint8_t *hdr, uint32_t hl, const uint8_t *f, uint32_t len)
{
    struct vr_queue *q = r->q;
    uint64_t feat = __atomic_load_n(&dst->features, __ATOMIC_ACQUIRE);
    int mrg = has(feat, VR_NET_F_MRG_RXBUF);
    uint32_t need = hl + len, done = 0, n = 0;
    struct vr_chain c0 = {.cap = VR_MAX_SEGS, .segs = t->segs0};
    struct vr_chain c = {.cap = VR_MAX_SEGS, .segs = t->segs};
    while (done < need) {
        struct vr_chain *ch = n == 0 ? &c0 : &c;
        int rc = (n < MAX_MERGE) ? vr_pop(q, ch) : 0;
        /* 5.1.6.3.1: the header must fit in the first buffer. */
        if (rc <= 0 || (!mrg && ch->write_len < need) || ch->write_len == 0 ||
            (n == 0 && ch->write_len < hl)) {
            if (rc > 0)
                n++;
            if (q->broken)
                return -1;
            if (q->inflight) {   /* cannot rewind: hand them back empty */
                for (uint32_t i = 0; i < n; i++)
                    t->lens[i] = 0;
                vr_push_batch(q, t->heads, t->lens, n);
            } else {   /* undo the pops: the chains stay available to the driver */
                vr_unpop_n(q, n);
            }
            r->st.rx_no_room++;
            return -1;
        }
        uint32_t nread = ch->nread;
        uint32_t room = ch->write_len > need - done ? need - done : (uint32_t)ch->write_len;
        /* Header bytes go in after the pops (num_buffers is known then). */
        if (n == 0) {
            write_segs(q->mem, ch->segs + nread, ch->nseg - nread, hl, f, room - hl);
        } else {
            write_segs(q->mem, ch->segs + nread, ch->nseg - nread, 0, f + (done - hl), room);
        }
        t->heads[n] = ch->head;
        t->lens[n] = room;
        done += room;
        n++;
    }
    uint8_t h[12];
    memcpy(h, hdr, hl);
    if (hl == 12)
        put_le16(h + 10, (uint16_t)n);
    write_segs(q->mem, c0.segs + c0.nread, c0.nseg - c0.nread, 0, h, hl);
    vr_push_batch(q, t->heads, t->lens, n);
    r->st.rx_frames++;
    r->st.rx_bytes += len;
    return 0;
}

static void pack_hdr(uint8_t *b, const struct vr_net_hdr *h)
{
    b[0] = h->flags;
    b[1] = h->gso_type;
    put_le16(b + 2, h->hdr_len);
    put_le16(b + 4, h->gso_size);
    put_le16(b + 6, h->csum_start);
    put_le16(b + 8, h->csum_offset);
    put_le16(b + 10, 1);
}

static int deliver_one(struct vr_net_tx *t, struct port *dst, const struct vr_net_hdr *h,
                       const uint8_t *f, uint32_t len)
{
    uint8_t hb[12];
    if ((h->gso_type & ~GSO_ECN) == GSO_NONE && vr_net_over_mtu(__atomic_load_n(&dst->mtu, __ATOMIC_ACQUIRE), f, len)) {
        STAT(dst, rx_over_mtu, 1);   /* dropped whole, never cut to size */
        return -1;
    }
    pack_hdr(hb, h);
    if (dst->tap_fd >= 0) {
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
        struct rxq *r = &dst->rxq[(t->rxsel + k) % nq];
        if (!__atomic_load_n(&r->q, __ATOMIC_ACQUIRE))
            continue;
        pthread_mutex_lock(&r->lock);
        struct vr_queue *q = r->q;
        if (!q || !q->started || q->broken) {
            pthread_mutex_unlock(&r->lock);
            continue;
        }
        int rc = copy_to_rx(t, dst, r, hb, hl, f, len);
        pthread_mutex_unlock(&r->lock);
        if (rc == 0)
            mark_dirty(t, r);
        return rc;
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
    deliver_one(sc->t, sc->dst, &none, seg, len);
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
                vr_net_resolve_csum(f, len, h);
                h->flags &= ~HDR_F_NEEDS_CSUM;
                STAT(dst, csum_resolved, 1);
            }
            struct vr_net_hdr plain = *h;
            plain.flags = 0;
            deliver_one(t, dst, &plain, f, len);
            return;
        }
    }
    deliver_one(t, dst, h, f, len);
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
static void switch_frame(struct vr_net_tx *t, uint32_t hl, uint32_t total)
{
    struct vr_net_switch *sw = t->sw;
    struct port *sp = &sw->ports[t->port];
    if (total < hl + ETH_HLEN) {
        TXSTAT(t, tx_runt, 1);
        return;
    }
    uint8_t *b = t->frame, *f = b + hl;
    uint32_t len = total - hl;
    struct vr_net_hdr h = {b[0], b[1], le16(b + 2), le16(b + 4), le16(b + 6), le16(b + 8)};
    uint64_t feat = __atomic_load_n(&sp->features, __ATOMIC_ACQUIRE);
    if (vr_net_check_hdr(&h, feat, len, sp->tap_fd < 0) < 0) {
        TXSTAT(t, tx_bad_header, 1);
        return;
    }
    TXSTAT(t, tx_frames, 1);
    TXSTAT(t, tx_bytes, len);
    capture(sw, f, len);
    t->rxsel = sp->tap_fd >= 0 || t->qp >= VR_NET_MAX_QP ? vr_net_flow_hash(f, len) : t->qp;
    int dst = switch_lookup(sw, f, t->port, t->now);
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

/* ---- tx workers ---- */

struct vr_net_tx *vr_net_tx_new(struct vr_net_switch *sw, int port, uint32_t qp)
{
    if (!port_of(sw, port))
        return NULL;
    struct vr_net_tx *t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    t->sw = sw;
    t->port = port;
    t->qp = qp;
    t->st = &sw->ports[port].txst[qp < VR_NET_MAX_QP ? qp : VR_NET_MAX_QP];
    return t;
}

void vr_net_tx_free(struct vr_net_tx *t)
{
    free(t);
}

/* vr_run handler of a tx queue: a batch of frames, then return. */
int vr_net_tx_handle(void *ctx, struct vr_queue *q)
{
    struct vr_net_tx *t = ctx;
    struct port *sp = &t->sw->ports[t->port];
    uint16_t heads[BATCH];
    uint32_t lens[BATCH] = {0};
    uint32_t n = 0;
    uint32_t hl = hdr_len_of(__atomic_load_n(&sp->features, __ATOMIC_ACQUIRE));
    t->now = vr_clock_ns();
    while (n < BATCH) {
        struct vr_chain c = {.cap = VR_MAX_SEGS, .segs = t->segs};
        int rc = vr_pop(q, &c);
        if (rc <= 0)
            break;
        heads[n++] = c.head;
        q->stats.bytes_read += c.read_len;
        if (c.write_len) {                 /* 5.1.6.2: tx buffers are read-only */
            TXSTAT(t, tx_malformed, 1);
            continue;
        }
        if (c.read_len > hl + VR_NET_MAX_FRAME) {
            TXSTAT(t, tx_oversize, 1);
            continue;
        }
        uint32_t off = 0;
        for (uint32_t k = 0; k < c.nread; k++) {
            memcpy(t->frame + off, vr_seg_host(q->mem, &c.segs[k]), c.segs[k].len);
            off += c.segs[k].len;
        }
        switch_frame(t, hl, off);
    }
    if (n)
        vr_push_batch(q, heads, lens, n);
    flush_notify(t);
    return 0;
}

int vr_net_inject(struct vr_net_switch *sw, int port, const uint8_t *frame, uint32_t len)
{
    if (!port_of(sw, port) || len > VR_NET_MAX_FRAME)
        return -VR_E_INVAL;
    struct vr_net_tx *t = vr_net_tx_new(sw, port, VR_NET_MAX_QP);
    if (!t)
        return -VR_E_NOMEM;
    t->now = vr_clock_ns();
    memset(t->frame, 0, 12);
    memcpy(t->frame + 12, frame, len);
    /* Injected frames carry a plain header; judge it as a VERSION_1 port. */
    uint64_t saved = sw->ports[port].features;
    uint32_t hl = 12;
    if (hdr_len_of(saved) != 12) {
        memmove(t->frame + 10, t->frame + 12, len);
        hl = 10;
    }
    switch_frame(t, hl, hl + len);
    flush_notify(t);
    vr_net_tx_free(t);
    return 0;
}

/* Reader loop of a TAP port (fd non-blocking, vnet header of 12 bytes). */
int vr_net_tap_run(struct vr_net_switch *sw, int port, int ctl_fd)
{
    struct port *p = port_of(sw, port);
    if (!p || p->tap_fd < 0)
        return -VR_E_INVAL;
    struct vr_net_tx *t = vr_net_tx_new(sw, port, 0);
    if (!t)
        return -VR_E_NOMEM;
    struct pollfd fds[2] = {{.fd = ctl_fd, .events = POLLIN}, {.fd = p->tap_fd, .events = POLLIN}};
    int rc = 0;
    for (;;) {
        int r = poll(fds, 2, -1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 || fds[0].revents) {
            rc = r < 0 ? -VR_E_STATE : 0;
            break;
        }
        if (fds[1].revents & (POLLERR | POLLNVAL | POLLHUP)) {
            rc = -VR_E_STATE;
            break;
        }
        t->now = vr_clock_ns();
        for (int k = 0; k < BATCH; k++) {
            ssize_t n = read(p->tap_fd, t->frame, 12 + VR_NET_MAX_FRAME);
            if (n < 0)
                break;
            switch_frame(t, 12, (uint32_t)n);
        }
        flush_notify(t);
    }
    vr_net_tx_free(t);
    return rc;
}
