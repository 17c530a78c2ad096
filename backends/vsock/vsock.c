/*
 * vsock.c - RW packets between guest memory and host sockets (see vsock.h).
 *
 * Every guest value is copied to a local before it is checked; segments
 * come from vr_pop(), which has already bounded them to guest memory.
 * Host sockets are non-blocking: a short write or an empty read hands the
 * chain back to Python (tx) or to the ring (rx, vr_unpop) without losing
 * a byte.
 */
#include <errno.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "capture.h"
#include "vsock.h"
#include "vsock_hdr.h" /* struct vs_hdr (5.10.6), shared with the driver side */

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "vsock.c writes little-endian virtio headers in place: little-endian hosts only"
#endif

#define IOV_CAP 1024 /* IOV_MAX on Linux */

/* ---- capture (Linux vsockmon, pcap LINKTYPE_VSOCK 271) ---- */

/* struct af_vsockmon_hdr (include/uapi/linux/vsockmon.h), then the virtio header. */
struct vs_mon_frame {
    uint64_t src_cid;
    uint64_t dst_cid;
    uint32_t src_port;
    uint32_t dst_port;
    uint16_t op;          /* AF_VSOCK_OP_PAYLOAD: only RW packets are captured here */
    uint16_t transport;   /* AF_VSOCK_TRANSPORT_VIRTIO */
    uint16_t len;         /* the transport header's length */
    uint8_t reserved[2];
    struct vs_hdr hdr;
} __attribute__((packed));

_Static_assert(sizeof(struct vs_mon_frame) == 32 + VS_HDR_SIZE, "af_vsockmon_hdr is 32 bytes");

/* One RW packet, header and payload (where `iov` points), into the capture
 * ring: called before the chain is pushed, while the guest cannot reuse it. */
static void capture_rw(struct vr_capture *cap, const struct vs_hdr *h,
                       const struct iovec *iov, int niov)
{
    struct vs_mon_frame f = {
        .src_cid = h->src_cid, .dst_cid = h->dst_cid,
        .src_port = h->src_port, .dst_port = h->dst_port,
        .op = VS_MON_OP_PAYLOAD, .transport = VS_MON_TRANSPORT_VIRTIO, .len = VS_HDR_SIZE,
        .hdr = *h,
    };
    vr_capture_putv(cap, &f, sizeof(f), iov, niov, h->len);
}

/* A control packet (no payload) the C path sent. */
static void capture_ctl(struct vr_capture *cap, const struct vs_hdr *h)
{
    struct vs_mon_frame f = {
        .src_cid = h->src_cid, .dst_cid = h->dst_cid,
        .src_port = h->src_port, .dst_port = h->dst_port,
        .op = VS_MON_OP_CONTROL, .transport = VS_MON_TRANSPORT_VIRTIO, .len = VS_HDR_SIZE,
        .hdr = *h,
    };
    vr_capture_putv(cap, &f, sizeof(f), NULL, 0, 0);
}

/* ---- connection table ---- */

static uint32_t slot_of(uint64_t cid, uint32_t host_port, uint32_t guest_port)
{
    uint64_t h = cid * 0x9E3779B97F4A7C15ull;
    h ^= (uint64_t)host_port * 0xC2B2AE3D27D4EB4Full;
    h ^= (uint64_t)guest_port * 0x165667B19E3779F9ull;
    return (uint32_t)(h >> 40) & (VS_TABLE_SLOTS - 1);
}

static int same(const struct vs_conn *c, uint64_t cid, uint32_t hp, uint32_t gp)
{
    return c->peer_cid == cid && c->host_port == hp && c->guest_port == gp;
}

struct vs_conn *vs_table_lookup(const struct vs_table *t, uint64_t peer_cid,
                                uint32_t host_port, uint32_t guest_port)
{
    uint32_t i = slot_of(peer_cid, host_port, guest_port);
    for (uint32_t n = 0; n < VS_TABLE_SLOTS; n++, i = (i + 1) & (VS_TABLE_SLOTS - 1)) {
        struct vs_conn *c = t->slot[i];
        if (!c)
            return NULL;
        if (same(c, peer_cid, host_port, guest_port))
            return c;
    }
    return NULL;
}

/* 0 when inserted, -VR_E_NOMEM when full, -VR_E_INVAL for a duplicate key. */
int vs_table_insert(struct vs_table *t, struct vs_conn *c)
{
    if (c->in_table)
        return 0;
    if (t->count >= VS_TABLE_MAX)
        return -VR_E_NOMEM;
    uint32_t i = slot_of(c->peer_cid, c->host_port, c->guest_port);
    while (t->slot[i]) {
        if (same(t->slot[i], c->peer_cid, c->host_port, c->guest_port))
            return -VR_E_INVAL;
        i = (i + 1) & (VS_TABLE_SLOTS - 1);
    }
    t->slot[i] = c;
    t->count++;
    c->in_table = 1;
    return 0;
}

/* Backward-shift deletion keeps every probe sequence unbroken, so lookups
 * never need tombstones. */
void vs_table_remove(struct vs_table *t, struct vs_conn *c)
{
    const uint32_t mask = VS_TABLE_SLOTS - 1;
    if (!c->in_table)
        return;
    uint32_t i = slot_of(c->peer_cid, c->host_port, c->guest_port);
    while (t->slot[i] != c) {
        if (!t->slot[i])
            return; /* not reachable: in_table lied; nothing to undo */
        i = (i + 1) & mask;
    }
    uint32_t hole = i;
    for (uint32_t j = (hole + 1) & mask; t->slot[j]; j = (j + 1) & mask) {
        struct vs_conn *e = t->slot[j];
        uint32_t home = slot_of(e->peer_cid, e->host_port, e->guest_port);
        /* e may move into the hole unless its home lies cyclically in (hole, j]. */
        if (((j - home) & mask) >= ((j - hole) & mask)) {
            t->slot[hole] = e;
            hole = j;
        }
    }
    t->slot[hole] = NULL;
    t->count--;
    c->in_table = 0;
}

/* ---- credit (virtio 1.2, 5.10.6.3) ---- */

/* Bytes the guest can still take from us; 0 when it is over (a guest that
 * shrank buf_alloc below what is in flight). */
uint32_t vs_credit(const struct vs_conn *c)
{
    uint32_t in_flight = (uint32_t)(c->tx_cnt - c->peer_fwd_cnt);
    return c->peer_buf_alloc > in_flight ? c->peer_buf_alloc - in_flight : 0;
}

/* We freed some of our buffer and the guest believes less than half of it
 * is free, or none with nothing of it still queued: a CREDIT_UPDATE is due
 * (Python queues it).  The one rule for both paths. */
int vs_credit_update_due(const struct vs_conn *c)
{
    if (c->fwd_cnt == c->reported_fwd)
        return 0;
    uint64_t in_flight = c->rx_total - c->reported_fwd;
    if (in_flight >= c->buf_alloc)  /* the guest is blocked */
        return in_flight > c->buf_alloc || c->buf_alloc / 2 > 0 || c->pending_bytes == 0;
    return c->buf_alloc - in_flight < c->buf_alloc / 2;
}

/* ---- guest -> host ---- */

/* The header of a popped chain into *h: 1 when it is whole in the first
 * descriptor, 0 otherwise (Python's then). */
static int read_hdr(struct vr_queue *q, const struct vr_chain *c, struct vs_hdr *h)
{
    if (c->nread == 0 || c->segs[0].len < VS_HDR_SIZE)
        return 0;
    memcpy(h, vr_seg_host(q->mem, &c->segs[0]), VS_HDR_SIZE);
    return 1;
}

/* The established stream connection in the table that a guest packet for
 * the host belongs to, or NULL. */
static struct vs_conn *stream_conn(const struct vs_table *t, uint64_t guest_cid, const struct vs_hdr *h)
{
    if (h->type != VS_STREAM || h->src_cid != guest_cid || h->dst_cid != VS_HOST_CID)
        return NULL;
    struct vs_conn *conn = vs_table_lookup(t, h->dst_cid, h->dst_port, h->src_port);
    if (!conn || conn->state != VS_ESTABLISHED || conn->type != VS_STREAM || conn->fd < 0)
        return NULL;
    return conn;
}

/* Whether an RW packet from the guest (header `h`, whole) is one C may
 * finish: sane, and its connection is an established stream with nothing
 * queued before it and room for `extra` more bytes (packets of the same
 * batch) plus this one within our credit.  Returns the connection, or NULL
 * for Python. */
static struct vs_conn *fast_rw(const struct vs_table *t, uint64_t guest_cid, const struct vr_chain *c,
                               const struct vs_hdr *h, uint64_t extra)
{
    if (h->op != VS_OP_RW || h->len == 0 || h->len > VS_MAX_PKT)
        return NULL;
    if ((uint64_t)h->len > c->read_len - VS_HDR_SIZE)
        return NULL;
    struct vs_conn *conn = stream_conn(t, guest_cid, h);
    if (!conn || conn->guest_shut_send || conn->pending_bytes)
        return NULL;
    /* A guest over its credit is Python's to reset. */
    if (conn->rx_total - conn->reported_fwd + extra + h->len > conn->buf_alloc)
        return NULL;
    return conn;
}

/* Whether a CREDIT_UPDATE from the guest (header `h`, whole) is one C may
 * take: no payload, for an established stream connection in the table.
 * Returns the connection, or NULL for Python. */
static struct vs_conn *fast_credit(const struct vs_table *t, uint64_t guest_cid, const struct vs_hdr *h)
{
    if (h->op != VS_OP_CREDIT_UPDATE || h->len != 0)
        return NULL;
    return stream_conn(t, guest_cid, h);
}

/* One packet of a tx batch: its chain head, its header, its payload iovecs. */
struct tx_pkt {
    uint16_t head;
    int iov0, niov;
    struct vs_hdr h;
};

/* Account and complete packets [0, n) of a batch, all of `conn`, all written. */
static void tx_done(struct vr_queue *q, struct vs_conn *conn, const struct tx_pkt *p, uint32_t n,
                    const struct iovec *iov, struct vr_capture *cap, struct vs_tx_result *res)
{
    for (uint32_t i = 0; i < n; i++) {
        uint32_t len = p[i].h.len;
        conn->peer_buf_alloc = p[i].h.buf_alloc;
        conn->peer_fwd_cnt = p[i].h.fwd_cnt;
        conn->rx_total += len;
        conn->fwd_cnt += len;
        conn->c_bytes_out += len;
        if (cap)
            capture_rw(cap, &p[i].h, iov + p[i].iov0, p[i].niov);
        vr_push(q, p[i].head, 0);
        res->packets++;
        res->bytes += len;
    }
}

/*
 * A CREDIT_UPDATE for `conn` into one rx buffer of `rxq`, without Python:
 * the guest learns of the room our writes freed while its tx thread is
 * still here.  `rxc` is a chain buffer of the caller's own (the rx
 * worker's may hold a chain Python is filling).  Returns 1 when pushed,
 * 0 when the rx ring has no buffer that takes a header (Python queues the
 * update then, as before); a malformed ring breaks `rxq` (reported by
 * the caller).
 */
static int credit_update_rx(struct vr_queue *rxq, struct vr_chain *rxc, struct vs_conn *conn,
                            uint64_t guest_cid, struct vr_capture *cap)
{
    if (!rxq->started || vr_queue_broken(rxq) || vr_pop(rxq, rxc) <= 0)
        return 0;
    const struct vr_seg *first = rxc->nseg > rxc->nread ? &rxc->segs[rxc->nread] : NULL;
    if (!first || first->len < VS_HDR_SIZE) {
        vr_unpop(rxq);
        return 0;
    }
    struct vs_hdr h = {
        .src_cid = conn->peer_cid, .dst_cid = guest_cid,
        .src_port = conn->host_port, .dst_port = conn->guest_port,
        .len = 0, .type = conn->type, .op = VS_OP_CREDIT_UPDATE, .flags = 0,
        .buf_alloc = conn->buf_alloc, .fwd_cnt = (uint32_t)conn->fwd_cnt,
    };
    memcpy(vr_seg_host(rxq->mem, first), &h, VS_HDR_SIZE);
    if (cap)
        capture_ctl(cap, &h);
    conn->reported_fwd = conn->fwd_cnt;
    conn->c_credit_updates++;
    vr_push(rxq, rxc->head, VS_HDR_SIZE);
    return 1;
}

/*
 * Consecutive RW packets of one connection go to its host socket with one
 * writev (a guest writing 4 KiB at a time sends 4 KiB packets).  A short
 * write completes the packets it covered; the one it cut is popped again
 * into *c and handed to Python with the bytes already sent; the ones after
 * it go back to the ring.
 */
#define TX_BATCH 32
static int tx_burst(struct vr_queue *q, const struct vs_table *t, uint64_t guest_cid,
                    struct vr_chain *c, uint32_t max, struct vr_capture *cap,
                    struct vr_queue *rxq, struct vr_chain *rxc, struct vs_tx_result *res)
{
    struct iovec iov[IOV_CAP];
    struct tx_pkt pkt[TX_BATCH];
    struct vs_hdr h;

    memset(res, 0, sizeof(*res));
    while (res->packets + res->credit_in < max) {
        struct vs_conn *conn = NULL;
        uint32_t n = 0;
        int niov = 0;
        uint64_t total = 0;
        while (n < TX_BATCH) {
            int rc = vr_pop(q, c);
            if (rc < 0) {
                /* The queue broke on the next chain: write nothing.  A short
                 * write now could not hand its cut packet back (the repop
                 * below fails on a broken queue), so its first bytes would
                 * reach the socket unaccounted; the device needs a reset. */
                res->status = VS_TX_EMPTY;
                return 0;
            }
            if (rc == 0)
                break;
            int whole = read_hdr(q, c, &h); /* one copy of the header serves both checks */
            struct vs_conn *cr = whole ? fast_credit(t, guest_cid, &h) : NULL;
            if (cr) {
                if (n > 0) { /* after the packets before it: their headers carry credit too */
                    vr_unpop(q);
                    break;
                }
                int had_credit = vs_credit(cr) > 0;
                cr->peer_buf_alloc = h.buf_alloc;
                cr->peer_fwd_cnt = h.fwd_cnt;
                if (cap)
                    capture_ctl(cap, &h);
                vr_push(q, c->head, 0);
                res->credit_in++;
                if (had_credit != (vs_credit(cr) > 0)) {
                    res->status = VS_TX_ATTENTION;
                    res->conn = cr;
                    return 0;
                }
                if (res->packets + res->credit_in >= max)
                    break;
                continue;
            }
            struct vs_conn *cc = whole ? fast_rw(t, guest_cid, c, &h, total) : NULL;
            int k = -1;
            if (cc && (conn == NULL || cc == conn))
                k = vr_segs_iov(q->mem, c->segs, c->nread, VS_HDR_SIZE, h.len, iov + niov,
                                IOV_CAP - niov);
            if (k < 0 || niov + k > IOV_CAP) {
                /* Not for this batch: Python's if alone, else the next batch's. */
                if (n == 0) {
                    res->status = VS_TX_SLOW;
                    return 0;
                }
                vr_unpop(q);
                break;
            }
            conn = cc;
            pkt[n++] = (struct tx_pkt){c->head, niov, k, h};
            niov += k;
            total += h.len;
        }
        if (n == 0) {
            res->status = res->packets + res->credit_in < max ? VS_TX_EMPTY : VS_TX_MORE;
            return 0;
        }
        ssize_t w;
        do {
            w = writev(conn->fd, iov, niov);
        } while (w < 0 && errno == EINTR);
        int had_credit = vs_credit(conn) > 0;
        if (w != (ssize_t)total) {
            uint64_t left = w > 0 ? (uint64_t)w : 0;
            uint32_t whole = 0;
            while (whole < n && left >= pkt[whole].h.len)
                left -= pkt[whole++].h.len;
            tx_done(q, conn, pkt, whole, iov, cap, res);
            /* whole < n here: packet `whole` was cut after `left` bytes. */
            vr_unpop_n(q, n - whole);
            if (vr_pop(q, c) <= 0 || c->head != pkt[whole].head) {
                vr_queue_fail(q, VR_E_MALFORMED, "vsock tx: avail ring changed under a popped chain");
                res->status = VS_TX_EMPTY;
                return 0;
            }
            res->status = VS_TX_PARTIAL;
            res->sent = left;
            res->conn = conn;
            return 0;
        }
        tx_done(q, conn, pkt, n, iov, cap, res);
        if (had_credit == (vs_credit(conn) > 0) && vs_credit_update_due(conn) && rxq &&
            credit_update_rx(rxq, rxc, conn, guest_cid, cap)) {
            res->rx_pushed++;
            continue;
        }
        if (had_credit != (vs_credit(conn) > 0) || vs_credit_update_due(conn)) {
            res->status = VS_TX_ATTENTION;
            res->conn = conn;
            return 0;
        }
    }
    res->status = VS_TX_MORE;
    return 0;
}

int vs_tx_burst(struct vr_queue *q, const struct vs_table *t, uint64_t guest_cid,
                struct vr_chain *c, uint32_t max, struct vr_capture *cap,
                struct vr_queue *rxq, struct vr_chain *rxc, struct vs_tx_result *res)
{
    int rc = tx_burst(q, t, guest_cid, c, max, cap, rxq, rxc, res);
    /* One interrupt for every update of the burst.  Forced: the rx worker
     * keeps the event-index bookkeeping of its own notifications, and a
     * spare interrupt costs the guest less than a missed one. */
    if (res->rx_pushed) {
        vr_enable_notify(rxq); /* avail_event past the buffers taken here (vring.c) */
        vr_notify_force(rxq);
    }
    return rc;
}

/* ---- host -> guest ---- */

/* One rx buffer of a batch: its head, where its header goes, how much it takes. */
struct rx_buf {
    uint16_t head;
    uint8_t *hdr;
    uint32_t take;
    int iov0, niov;
};

/*
 * One readv fills up to RX_BATCH rx buffers (Linux posts 4 KiB ones) within
 * the guest's credit; each filled buffer gets its header in place, buffers
 * the read did not reach go back to the ring.
 */
#define RX_BATCH 16
int vs_rx_fill(struct vr_queue *q, struct vs_conn *conn, uint64_t guest_cid,
               struct vr_chain *c, uint32_t max, struct vr_capture *cap,
               struct vs_rx_result *res)
{
    struct iovec iov[IOV_CAP];
    struct rx_buf buf[RX_BATCH];

    memset(res, 0, sizeof(*res));
    while (res->packets < max) {
        uint32_t credit = vs_credit(conn);
        if (credit == 0) {
            res->status = VS_RX_NO_CREDIT;
            return 0;
        }
        uint32_t n = 0;
        int niov = 0;
        uint64_t want = 0;
        while (n < RX_BATCH && want < credit) {
            if (vr_pop(q, c) <= 0)
                break;
            /* The header goes whole into the first writable descriptor. */
            const struct vr_seg *first = c->nseg > c->nread ? &c->segs[c->nread] : NULL;
            uint64_t room = c->write_len > VS_HDR_SIZE ? c->write_len - VS_HDR_SIZE : 0;
            uint64_t take = room;
            if (take > credit - want)
                take = credit - want;
            if (take > VS_MAX_PKT)
                take = VS_MAX_PKT;
            int k = (first && first->len >= VS_HDR_SIZE && take)
                        ? vr_segs_iov(q->mem, c->segs + c->nread, c->nseg - c->nread, VS_HDR_SIZE,
                                      take, iov + niov, IOV_CAP - niov)
                        : -1;
            if (k <= 0 || niov + k > IOV_CAP) {
                vr_unpop(q);
                if (n == 0) {
                    res->status = VS_RX_SLOW;
                    return 0;
                }
                break;
            }
            buf[n++] = (struct rx_buf){c->head, vr_seg_host(q->mem, first), (uint32_t)take, niov, k};
            niov += k;
            want += take;
        }
        if (n == 0) {
            res->status = VS_RX_NO_BUFFER;
            return 0;
        }
        ssize_t r;
        do {
            r = readv(conn->fd, iov, niov);
        } while (r < 0 && errno == EINTR);
        if (r <= 0) {
            vr_unpop_n(q, n);
            if (r == 0) {
                res->status = VS_RX_EOF;
            } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
                conn->readable = 0;
                res->status = VS_RX_DRAINED;
            } else {
                res->status = VS_RX_ERROR;
                res->err = errno;
            }
            return 0;
        }
        uint64_t left = (uint64_t)r;
        uint32_t used = 0;
        for (; used < n && left; used++) {
            uint32_t got = left < buf[used].take ? (uint32_t)left : buf[used].take;
            struct vs_hdr h = {
                .src_cid = conn->peer_cid, .dst_cid = guest_cid,
                .src_port = conn->host_port, .dst_port = conn->guest_port,
                .len = got, .type = conn->type, .op = VS_OP_RW, .flags = 0,
                .buf_alloc = conn->buf_alloc, .fwd_cnt = (uint32_t)conn->fwd_cnt,
            };
            memcpy(buf[used].hdr, &h, VS_HDR_SIZE);
            if (cap)
                capture_rw(cap, &h, iov + buf[used].iov0, buf[used].niov);
            conn->tx_cnt += got;
            conn->c_bytes_in += got;
            vr_push(q, buf[used].head, VS_HDR_SIZE + got);
            res->packets++;
            res->bytes += got;
            left -= got;
        }
        conn->reported_fwd = conn->fwd_cnt;
        if (used < n)
            vr_unpop_n(q, n - used);
    }
    res->status = VS_RX_MORE;
    return 0;
}
