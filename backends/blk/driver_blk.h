/*
 * driver_blk.h: a virtio-blk request load on the driver side, for
 * `vhost-user-bench blk`.  One thread keeps queue_depth requests of one
 * block each in flight on one queue and records each one's latency in the
 * driver's histogram (driver.h).  Uses only the driver.h verbs (add, kick,
 * reap, wait, used_pending).
 *
 * Each slot is a data buffer of block_size bytes (4 KiB aligned) and, after
 * all of them, a 32-byte meta block: the request header (blk_hdr.h) and the
 * status byte.  A request is a three-descriptor chain: header (readable),
 * data (writable for IN, readable for OUT), status (writable).
 */
#ifndef DRV_BLK_H
#define DRV_BLK_H

#include <stdint.h>

#include "driver.h"

/* cdef-begin */
#define DRV_BLK_SLOT_META 32     /* header + status byte, padded */
#define DRV_BENCH_DATA_ALIGN 4096

struct drv_bench_params {
    int write;                  /* 1: VIRTIO_BLK_T_OUT, 0: VIRTIO_BLK_T_IN */
    uint32_t block_size;        /* bytes, multiple of 512 */
    uint32_t queue_depth;       /* requests kept in flight */
    int random;                 /* 1: uniform random blocks, 0: sequential */
    uint64_t capacity_sectors;  /* device size in 512-byte sectors */
    uint64_t data_offset;       /* slot area in the queue's area */
    uint64_t duration_ns;       /* stop submitting after this (0: no limit) */
    uint64_t requests;          /* stop submitting after this many (0: no limit) */
    uint64_t seed;
    uint64_t spin_ns;           /* spin on the used ring this long before blocking */
    uint64_t stall_timeout_ns;  /* give up when nothing completes this long */
};

struct drv_bench_stats {
    uint64_t requests;   /* completed */
    uint64_t bytes;      /* payload of completed requests with status OK */
    uint64_t errors;     /* completed with a status byte other than OK */
    uint64_t kicks;
    uint64_t wakeups;    /* call eventfd wakeups */
    uint64_t elapsed_ns; /* first submit to last completion */
    uint64_t lat_min_ns;
    uint64_t lat_max_ns;
    uint64_t lat_sum_ns;
    uint64_t hist[DRV_HIST_BUCKETS];
};

uint64_t drv_bench_area_size(uint32_t block_size, uint32_t queue_depth);
int drv_blk_bench(struct drv_queue *q, const struct drv_bench_params *p, struct drv_bench_stats *s);

/* cdef-end */

#endif
