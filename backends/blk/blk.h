/*
 * blk.h - virtio-blk request engine (virtio 1.2, 5.2), a vr_run handler.
 */
#ifndef VR_BLK_H
#define VR_BLK_H

#include <stdint.h>

#include "vring.h"

/* cdef-begin */
#define VR_BLK_SERIAL_LEN 20

struct vr_blk_config {
    int fd;
    int read_only;
    int direct;                    /* fd was opened with O_DIRECT */
    int writethrough;              /* fdatasync before completing a write */
    uint64_t capacity;             /* in 512-byte sectors */
    uint32_t logical_block_size;
    uint32_t max_discard_sectors;  /* 0 = discard unsupported */
    uint32_t max_discard_seg;
    uint32_t max_write_zeroes_sectors; /* 0 = write zeroes unsupported */
    uint32_t max_write_zeroes_seg;
    uint8_t serial[VR_BLK_SERIAL_LEN];
    uint32_t io_threads;           /* I/O pool threads for large requests, 0..16; 0 = none */
    uint32_t pool_min_len;         /* smallest request (bytes) the pool splits; 0 = 128 KiB */
    int map_reads;                 /* serve reads from a read-only mapping of fd (not with direct) */
};

struct vr_blk_stats {
    uint64_t reads, writes, flushes, discards, write_zeroes, get_ids;
    uint64_t unsupported, io_errors;
    uint64_t bytes_read, bytes_written;
    uint64_t pooled;               /* requests whose transfer was split over the I/O pool */
    uint64_t mapped_reads;         /* reads copied from the image's mapping (no system call) */
    uint64_t map_faults;           /* of those, reads failed because the image shrank under them */
};


struct vr_blk;

struct vr_blk *vr_blk_new(const struct vr_blk_config *cfg);
void vr_blk_free(struct vr_blk *b);
int vr_blk_handle(void *ctx, struct vr_queue *q);
void vr_blk_get_stats(const struct vr_blk *b, struct vr_blk_stats *out);
void vr_blk_set_mode(struct vr_blk *b, uint64_t capacity, int writethrough);
/* 1 when this engine's reads go through a mapping of the image now. */
int vr_blk_mapped(const struct vr_blk *b);

/* cdef-end */

#endif
