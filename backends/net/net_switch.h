/*
 * net_switch.h - what the parts of the net switch share (private to
 * backends/net: net.c ports and tx workers, net_mac.c the MAC table,
 * net_rx.c delivery into rx rings and TAPs).  Not part of the binding.
 */
#ifndef VR_NET_SWITCH_H
#define VR_NET_SWITCH_H

#include <pthread.h>
#include <stdint.h>

#include "capture.h"
#include "net.h"
#include "net_filter.h"

#define BATCH 64
#define MAX_MERGE 256        /* rx chains one frame may span */
#define MAC_BUCKETS 4096
#define MAC_PROBE 8
#define HEAD_COPY 128        /* frame bytes copied (and checked) before switching */
#define PEND (2 * MAX_MERGE) /* filled rx chains held for one used-index store */

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
    uint64_t mac_gen;        /* bumped (under mac_lock) whenever a lookup's answer may change */
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
    struct vr_seg txsegs[VR_MAX_SEGS];
    /* rx session: the destination queue held locked across consecutive
     * frames to it, its filled chains pending until one push (net_rx_close) */
    struct rxq *open;
    uint32_t npend;
    uint16_t pheads[PEND];
    uint32_t plens[PEND];
    struct rxq *dirty[VR_NET_MAX_PORTS * VR_NET_MAX_QP];
    uint32_t ndirty;
    struct vr_net_stats *st;     /* this context's tx counter slot */
    uint32_t rxsel;              /* rx pair choice for the frame being switched */
    /* The frame being switched: t->frame holds its first `have` of `total`
     * bytes (header of fhl included), the rest is still in the tx chain's
     * readable segments (src_*) until net_frame_all copies it.  Only the
     * copied head is ever examined, so the guest cannot change what was
     * checked; the tail goes straight from the tx to the rx buffers. */
    uint32_t have, total, fhl;
    const struct vr_mem *src_mem;
    const struct vr_seg *src_segs;
    uint32_t src_nseg;
    /* last unicast lookup (net_mac.c): good while mac_gen is unchanged and
     * before `until` (keeps src's entry fresh and dst's from ageing out) */
    struct {
        uint64_t src, dst, gen, until;
        int32_t port;
    } mc;
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

/* Append one frame (never blocks on the reader: the ring drops when full). */
static inline void capture(struct vr_net_switch *sw, const uint8_t *frame, uint32_t len)
{
    if (sw->cap)
        vr_capture_put(sw->cap, frame, len);
}

/* net_mac.c: learn the source MAC of `eth` on the context's port, look up
 * its destination; -1 = flood. */
int net_switch_lookup(struct vr_net_tx *t, const uint8_t *eth);

/* net_rx.c: t->frame holds the first `upto` bytes (copied from the tx chain). */
void net_frame_fill(struct vr_net_tx *t, uint32_t upto);

/* net_rx.c: the whole frame in t->frame (copies the tail from the tx chain). */
uint8_t *net_frame_all(struct vr_net_tx *t);

/* net_rx.c: one frame from the context's port (header of hl bytes + frame in
 * t->frame): check the header, capture, and deliver or flood it. */
void net_switch_frame(struct vr_net_tx *t, uint32_t hl, uint32_t total);

/* net_rx.c: push the open rx queue's pending chains and unlock it. */
void net_rx_close(struct vr_net_tx *t);

/* net_rx.c: close the session, then notify every rx queue the context
 * delivered to since the last call. */
void net_flush_notify(struct vr_net_tx *t);

#endif
