/*
 * net.c - the vhost-user-net learning switch: switch and ports, capture
 * reads, tx workers, injection and TAP readers (see net.h for the theory of
 * operation; net_mac.c is the MAC table, net_rx.c the delivery).  virtio-net header and offloads: virtio 1.2, 5.1.6.
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

/* ---- capture (the shared ring: capture.c) ---- */

uint32_t vr_net_capture_read(struct vr_net_switch *sw, uint8_t *buf, uint32_t cap,
                             uint64_t *dropped)
{
    if (!sw->cap)
        return 0;
    return vr_capture_read(sw->cap, buf, cap, dropped);
}

uint64_t vr_net_capture_dropped(struct vr_net_switch *sw)
{
    struct vr_capture_stats st = {0};
    if (sw->cap)
        vr_capture_get_stats(sw->cap, &st);
    return st.dropped;
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

/* vr_run handler of a tx queue: a batch of frames, then return.  The
 * batch's descriptors and frame heads are hinted first (the driver wrote
 * them on another CPU: their misses overlap instead of coming one a frame). */
int vr_net_tx_handle(void *ctx, struct vr_queue *q)
{
    struct vr_net_tx *t = ctx;
    struct port *sp = &t->sw->ports[t->port];
    uint16_t heads[BATCH];
    uint32_t lens[BATCH] = {0};
    uint32_t n = 0;
    uint32_t hl = hdr_len_of(__atomic_load_n(&sp->features, __ATOMIC_ACQUIRE));
    t->now = vr_clock_ns();
    vr_prefetch_avail(q, BATCH, 0, hl + HEAD_COPY);
    while (n < BATCH) {
        struct vr_chain chain = {.cap = VR_MAX_SEGS, .segs = t->txsegs}, *c = &chain;
        if (vr_pop(q, c) <= 0)
            break;
        heads[n++] = c->head;
        q->stats.bytes_read += c->read_len;
        if (c->write_len) {                /* 5.1.6.2: tx buffers are read-only */
            TXSTAT(t, tx_malformed, 1);
            continue;
        }
        if (c->read_len > hl + VR_NET_MAX_FRAME) {
            TXSTAT(t, tx_oversize, 1);
            continue;
        }
        uint32_t total = (uint32_t)c->read_len;
        t->have = 0;
        t->src_mem = q->mem;
        t->src_segs = c->segs;
        t->src_nseg = c->nread;
        net_frame_fill(t, total < hl + HEAD_COPY ? total : hl + HEAD_COPY);
        net_switch_frame(t, hl, total);
    }
    if (n)
        vr_push_batch(q, heads, lens, n);
    net_flush_notify(t);
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
    t->have = hl + len;
    net_switch_frame(t, hl, hl + len);
    net_flush_notify(t);
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
            t->have = (uint32_t)n;
            net_switch_frame(t, 12, (uint32_t)n);
        }
        net_flush_notify(t);
    }
    vr_net_tx_free(t);
    return rc;
}
