/*
 * net_filter.h - per-port delivery rules of the switch (internal to
 * backends/net/net.c): the receive filter a guest sets through its control queue
 * (VIRTIO_NET_CTRL_RX and VIRTIO_NET_CTRL_MAC, virtio 1.2 5.1.6.5.1-2),
 * the MTU check and the flow hash that picks a TAP frame's rx queue.
 */
#ifndef VR_NET_FILTER_H
#define VR_NET_FILTER_H

#include <pthread.h>
#include <stdint.h>

#include "net.h"

#define ETH_HLEN 14

struct vr_net_filter {
    uint32_t flags;          /* VR_NET_RX_*, written under lock, read atomically */
    pthread_mutex_t lock;
    uint8_t own_mac[6];
    uint32_t n_uni, n_multi; /* macs[0..n_uni) unicast, then n_multi multicast */
    uint8_t macs[VR_NET_MAX_MACS][6];
};

void vr_net_filter_init(struct vr_net_filter *fl);
/* The whole filter at once: flags, own MAC, then n_uni unicast and n_multi
 * multicast entries of 6 bytes each in `macs`; -VR_E_INVAL if too many. */
int vr_net_filter_set(struct vr_net_filter *fl, uint32_t flags, const uint8_t *own_mac,
                      const uint8_t *macs, uint32_t n_uni, uint32_t n_multi);
/* 1 if a frame whose destination MAC is `eth` passes the filter. */
int vr_net_filter_accepts(struct vr_net_filter *fl, const uint8_t *eth);
/* 1 if a frame of `len` bytes carries more than `mtu` bytes after its L2 header. */
int vr_net_over_mtu(uint32_t mtu, const uint8_t *f, uint32_t len);
/* Hash of the IP addresses and TCP/UDP ports; 0 for other frames. */
uint32_t vr_net_flow_hash(const uint8_t *f, uint32_t len);

#endif
