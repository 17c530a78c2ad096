/*
 * net.h - the vhost-user-net switch: frame copying between ports in C.
 *
 * Theory of operation
 * -------------------
 * One `struct vr_net_switch` joins every port of the process (virtio ports
 * served over vhost-user, and TAP ports).  The tx worker of a virtio port
 * runs vr_net_tx_handle() under vr_run(): it pops a batch of tx chains,
 * copies each frame (virtio-net header + Ethernet frame) into a private
 * bounce buffer (so a guest cannot change it while we look at it), checks
 * the header against what the source port negotiated, learns the source
 * MAC, looks the destination up in the MAC table and delivers the frame
 * straight into the rx buffers of the destination port(s).  A TAP port's
 * reader thread runs vr_net_tap_run(), which does the same for frames the
 * kernel hands us.
 *
 * An rx queue has no worker.  It is reachable only while attached
 * (vr_net_rx_attach), and every access (pop, copy, push, notify, and every
 * control-plane change of the queue) happens under that rx queue's mutex.
 * No thread ever holds two rx mutexes, the MAC-table mutex, a port's
 * receive-filter mutex or the capture mutex at once, so there is no lock
 * order to get wrong.
 *
 * Per-port delivery rules, set from the control plane (the device's control
 * queue or NET_SET_MTU): an MTU (a frame longer than the MTU plus its L2
 * header is dropped and counted, never truncated), the number of rx queue
 * pairs in use (VQ_PAIRS_SET), and a receive filter (promisc, allmulti,
 * alluni, nomulti, nouni, nobcast, the port's own MAC and a MAC table), all
 * checked before a frame is copied.  The rx queue of a frame is the sender's
 * tx pair for a virtio sender (its guest already spread flows) and a hash of
 * the L3/L4 addresses for a TAP sender.
 *
 * Offloads: a frame keeps its header (partial checksum, GSO) when the
 * destination negotiated the matching GUEST_* feature; otherwise the switch
 * completes the checksum or segments the TCP frame in software, so a port
 * never sees a header it did not negotiate.
 */
#ifndef VR_NET_H
#define VR_NET_H

#include <stdint.h>

#include "vring.h"

/* cdef-begin */
#define VR_NET_MAX_PORTS 64
#define VR_NET_MAX_QP 16
/* Largest Ethernet frame accepted (64 KiB GSO packet plus L2 header). */
#define VR_NET_MAX_FRAME 65550

/* virtio-net feature bits (virtio 1.2, 5.1.3). */
#define VR_NET_F_CSUM 0
#define VR_NET_F_GUEST_CSUM 1
#define VR_NET_F_GUEST_TSO4 7
#define VR_NET_F_GUEST_TSO6 8
#define VR_NET_F_GUEST_ECN 9
#define VR_NET_F_HOST_TSO4 11
#define VR_NET_F_HOST_TSO6 12
#define VR_NET_F_HOST_ECN 13
#define VR_NET_F_MRG_RXBUF 15
#define VR_NET_F_VERSION_1 32

/* Receive filter flags (vr_net_port_set_filter); VIRTIO_NET_CTRL_RX, 5.1.6.5.1. */
#define VR_NET_RX_FILTER 1u      /* the filter applies (the port serves CTRL_RX) */
#define VR_NET_RX_PROMISC 2u
#define VR_NET_RX_ALLMULTI 4u
#define VR_NET_RX_ALLUNI 8u
#define VR_NET_RX_NOMULTI 16u
#define VR_NET_RX_NOUNI 32u
#define VR_NET_RX_NOBCAST 64u
/* MAC table entries per port (QEMU's virtio-net keeps 64 as well). */
#define VR_NET_MAX_MACS 64

struct vr_net_stats {
    uint64_t tx_frames, tx_bytes;        /* accepted from the port */
    uint64_t rx_frames, rx_bytes;        /* delivered to the port */
    uint64_t tx_runt, tx_oversize, tx_bad_header, tx_malformed;
    uint64_t rx_no_room;                 /* no (or too small) rx buffers */
    uint64_t rx_not_ready;               /* no rx queue attached */
    uint64_t csum_resolved, segmented, flooded;
    uint64_t rx_filtered;                /* refused by the port's receive filter */
    uint64_t rx_over_mtu;                /* longer than the port's MTU allows */
};

struct vr_net_switch;
struct vr_net_tx;

struct vr_net_switch *vr_net_switch_new(uint32_t capture_bytes, uint64_t ageing_ns);
void vr_net_switch_free(struct vr_net_switch *sw);
int vr_net_port_add(struct vr_net_switch *sw, int tap_fd, uint64_t tap_features);
void vr_net_port_set_features(struct vr_net_switch *sw, int port, uint64_t features);
void vr_net_port_get_stats(struct vr_net_switch *sw, int port, struct vr_net_stats *out);
void vr_net_port_forget(struct vr_net_switch *sw, int port);
void vr_net_port_set_mtu(struct vr_net_switch *sw, int port, uint32_t mtu);
void vr_net_port_set_pairs(struct vr_net_switch *sw, int port, uint32_t pairs);
int vr_net_port_set_filter(struct vr_net_switch *sw, int port, uint32_t flags,
                           const uint8_t *own_mac, const uint8_t *macs, uint32_t n_uni,
                           uint32_t n_multi);
int vr_net_mac_lookup(struct vr_net_switch *sw, const uint8_t *mac);

int vr_net_rx_attach(struct vr_net_switch *sw, int port, uint32_t qp, struct vr_queue *q);
void vr_net_rx_detach(struct vr_net_switch *sw, int port, uint32_t qp);
void vr_net_rx_lock(struct vr_net_switch *sw, int port, uint32_t qp);
void vr_net_rx_unlock(struct vr_net_switch *sw, int port, uint32_t qp);

struct vr_net_tx *vr_net_tx_new(struct vr_net_switch *sw, int port, uint32_t qp);
void vr_net_tx_free(struct vr_net_tx *t);
int vr_net_tx_handle(void *ctx, struct vr_queue *q);
int vr_net_inject(struct vr_net_switch *sw, int port, const uint8_t *frame, uint32_t len);
int vr_net_tap_run(struct vr_net_switch *sw, int port, int ctl_fd);

uint32_t vr_net_capture_read(struct vr_net_switch *sw, uint8_t *buf, uint32_t cap,
                             uint64_t *dropped);
/* The ring's drop count now, without taking records (the drainer may be
 * blocked in a write and not reading). */
uint64_t vr_net_capture_dropped(struct vr_net_switch *sw);

/* cdef-end */

#endif
