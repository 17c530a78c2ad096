/*
 * blk_hdr.h - the virtio-blk request header and its codes (virtio 1.2,
 * 5.2.6), defined once for the device side (blk.c) and the driver side
 * (driver_blk.c).
 *
 * Little-endian on the wire; both sides run on little-endian hosts only and
 * copy the header whole (the device gathers it from the chain's readable
 * segments, the driver writes it into a slot of guest RAM).
 */
#ifndef VR_BLK_HDR_H
#define VR_BLK_HDR_H

#include <stdint.h>

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_T_DISCARD 11
#define VIRTIO_BLK_T_WRITE_ZEROES 13

#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2

#define VIRTIO_BLK_HDR_SIZE 16

/* 5.2.6: the device-readable start of every request; the status byte is the
 * last device-writable byte of the chain. */
struct virtio_blk_outhdr {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

_Static_assert(sizeof(struct virtio_blk_outhdr) == VIRTIO_BLK_HDR_SIZE,
               "virtio_blk request header is 16 bytes");

#endif
