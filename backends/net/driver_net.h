/*
 * driver_net.h: a virtio-net traffic generator and sink on the driver side, for
 * `vhost-user-bench net`.  One thread keeps a tx queue of one port full of
 * prepared frames and the rx queue of another port full of buffers, and
 * counts what arrives.  Uses only the driver.h verbs (add, kick, reap, wait).
 */
#ifndef DRV_NET_H
#define DRV_NET_H

#include <stdint.h>

#include "driver.h"

/* cdef-begin */
struct drv_net_bench_params {
    uint32_t hdr_len;        /* virtio-net header bytes (12 or 10) */
    uint32_t frame_len;      /* Ethernet frame bytes (without header) */
    uint64_t tx_offset;      /* tx slots (already holding header + frame) in the tx area */
    uint32_t tx_slot_size;
    uint32_t tx_slots;
    uint64_t rx_offset;      /* rx buffers in the rx area */
    uint32_t rx_buf_len;
    uint32_t rx_slots;
    int mergeable;           /* num_buffers in the header says how many buffers */
    uint64_t duration_ns;
    uint64_t stall_timeout_ns;
};

struct drv_net_bench_stats {
    uint64_t sent;           /* tx chains completed by the device */
    uint64_t received;       /* frames received */
    uint64_t rx_bytes;       /* frame bytes received (without headers) */
    uint64_t elapsed_ns;
};

int drv_net_bench(struct drv_queue *tx, struct drv_queue *rx,
                  const struct drv_net_bench_params *p, struct drv_net_bench_stats *s);

/* cdef-end */

#endif
