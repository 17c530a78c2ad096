/*
 * net_offload.h - virtio-net header checks and software offloads (internal
 * to the switch, backends/net/net.c).
 */
#ifndef VR_NET_OFFLOAD_H
#define VR_NET_OFFLOAD_H

#include <stdint.h>

#include "net.h"

#define HDR_F_NEEDS_CSUM 1
#define HDR_F_DATA_VALID 2
#define GSO_NONE 0
#define GSO_TCPV4 1
#define GSO_TCPV6 4
#define GSO_ECN 0x80

struct vr_net_hdr {          /* virtio_net_hdr_v1 without num_buffers, host order */
    uint8_t flags, gso_type;
    uint16_t hdr_len, gso_size, csum_start, csum_offset;
};

/* 0 if a port with negotiated features `feat` may send this header with a
 * frame of `len` bytes; -1 if the header is broken or not negotiated.
 * from_driver: the header comes from a guest's tx queue (not a TAP). */
int vr_net_check_hdr(const struct vr_net_hdr *h, uint64_t feat, uint32_t len, int from_driver);
/* NEEDS_CSUM: the field holds the pseudo-header sum; store the full checksum. */
void vr_net_resolve_csum(uint8_t *f, uint32_t len, const struct vr_net_hdr *h);
/* TCPv4/v6 GSO -> segments; -1 if the frame is not a TCP frame we can cut. */
int vr_net_segment(const struct vr_net_hdr *h, const uint8_t *f, uint32_t len, uint8_t *out,
                   void (*emit)(void *ctx, const uint8_t *seg, uint32_t len), void *ctx);

#endif
