/*
 * vsock_hdr.h - struct virtio_vsock_hdr (virtio 1.2, 5.10.6), defined once
 * for the device side (vsock.c) and the driver side (driver_vsock.c).
 *
 * Little-endian on the wire and packed; both sides run on little-endian
 * hosts only and read/write it in place.  Python sees only its size (the
 * struct's layout is the parsers' business: backends/vsock/packet.py).
 */
#ifndef VR_VSOCK_HDR_H
#define VR_VSOCK_HDR_H

#include <stdint.h>

/* cdef-begin */
#define VS_HDR_SIZE 44
/* cdef-end */

struct vs_hdr {
    uint64_t src_cid;
    uint64_t dst_cid;
    uint32_t src_port;
    uint32_t dst_port;
    uint32_t len;
    uint16_t type;
    uint16_t op;
    uint32_t flags;
    uint32_t buf_alloc;
    uint32_t fwd_cnt;
} __attribute__((packed));

_Static_assert(sizeof(struct vs_hdr) == VS_HDR_SIZE, "virtio_vsock_hdr is 44 bytes");

#endif
