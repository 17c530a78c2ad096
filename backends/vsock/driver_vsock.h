/*
 * driver_vsock.h: a virtio-vsock stream load on the driver side, for
 * `vhost-user-bench vsock`.  One thread drives one established STREAM
 * connection through the tx and rx queues of a vsock device, using only the
 * driver.h verbs (add, kick, reap, wait).
 *
 * Theory of operation
 * -------------------
 * The Python driver model (backends/vsock/driver.py) owns the connection
 * and the buffers; it hands C the connection's counters (`struct
 * drv_vsock_conn`), its pool of tx slots and the rx buffers it has posted
 * (`struct drv_vsock_slot`: guest-physical address and the head it is posted
 * at), and takes them back when the call returns: every rx buffer is posted
 * again and its slot says at which head, every tx slot says whether its chain
 * is still in flight.  The cookie of an rx head is the slot number, so a used
 * element maps back to its buffer without a search.
 *
 * guest->host: the tx queue is kept full of RW packets of write_size bytes
 * (header + payload in one descriptor; the payload was written into each slot
 * by the caller) as long as the peer's credit (virtio 1.2 5.10.6.3) allows a
 * whole packet.  Every header from the peer on this connection refreshes its
 * buf_alloc/fwd_cnt; a CREDIT_REQUEST is answered with a CREDIT_UPDATE.
 *
 * host->guest: RW payload is counted and consumed at once (fwd_cnt grows by
 * its length); a CREDIT_UPDATE goes out when the peer's view of our free
 * space falls below half of buf_alloc.  The run ends when the peer sends
 * SHUTDOWN or RST on the connection.
 *
 * Packets for any other connection are counted and dropped.  A used length
 * shorter than a header or longer than the buffer, or a header whose len
 * does not fit the used length, is counted as an error and dropped; nothing
 * is read outside the buffer.  No function allocates inside its loop.
 */
#ifndef DRV_VSOCK_H
#define DRV_VSOCK_H

#include <stdint.h>

#include "driver.h"

/* cdef-begin */
#define DRV_VSOCK_HDR_SIZE 44
#define DRV_VSOCK_MAX_PAYLOAD 65536
#define DRV_VSOCK_NO_HEAD 0xffffffffu

#define DRV_VSOCK_G2H 0 /* guest -> host: send */
#define DRV_VSOCK_H2G 1 /* host -> guest: receive */

/* One buffer of guest RAM and the head it is posted at (DRV_VSOCK_NO_HEAD: not posted). */
struct drv_vsock_slot {
    uint64_t gpa;
    uint32_t head;
    uint32_t len; /* tx: payload bytes of the packet in flight (driver-private) */
};

/* One STREAM connection's addresses and credit counters (5.10.6.3). */
struct drv_vsock_conn {
    uint64_t local_cid;
    uint64_t peer_cid;
    uint32_t local_port;
    uint32_t peer_port;
    uint32_t buf_alloc;      /* our receive buffer, sent in every header */
    uint32_t peer_buf_alloc; /* from the peer's last header */
    uint32_t peer_fwd_cnt;   /* from the peer's last header */
    uint64_t tx_cnt;         /* payload bytes we sent */
    uint64_t rx_cnt;         /* payload bytes we received */
    uint64_t fwd_cnt;        /* payload bytes we consumed */
    uint64_t reported_fwd;   /* fwd_cnt the peer last heard from us */
};

struct drv_vsock_bench_params {
    int direction;             /* DRV_VSOCK_G2H or DRV_VSOCK_H2G */
    uint32_t write_size;       /* g2h: payload bytes per RW packet, 1..65536 */
    uint32_t tx_slot_size;     /* bytes at each tx slot: >= header (+ write_size for g2h) */
    uint32_t rx_buf_len;       /* bytes at each rx buffer (header + payload room) */
    int rx_split;              /* rx buffers are posted as header + payload descriptors */
    uint64_t duration_ns;      /* g2h: send this long; h2g: 0 = until the peer closes */
    uint64_t stall_timeout_ns; /* give up when nothing moves this long */
};

struct drv_vsock_bench_stats {
    uint64_t tx_bytes;        /* RW payload of tx chains the device completed */
    uint64_t tx_packets;      /* RW packets completed */
    uint64_t rx_bytes;        /* RW payload received on the connection */
    uint64_t rx_packets;      /* packets received on the connection */
    uint64_t credit_updates;  /* CREDIT_UPDATE packets sent */
    uint64_t credit_requests; /* CREDIT_REQUEST packets sent (stalled on credit) */
    uint64_t other;           /* packets for other connections, dropped */
    uint64_t errors;          /* malformed used lengths or headers, dropped */
    uint64_t peer_credit_violations; /* RW beyond the credit we advertised */
    uint64_t elapsed_ns;      /* g2h: start to last completion; h2g: first to last byte */
    uint32_t end_op;          /* 0, or the SHUTDOWN / RST that ended the run */
    uint32_t end_flags;       /* its flags */
};

int drv_vsock_bench(struct drv_queue *tx, struct drv_queue *rx, struct drv_vsock_conn *c,
                    struct drv_vsock_slot *tx_slots, uint32_t n_tx,
                    struct drv_vsock_slot *rx_slots, uint32_t n_rx,
                    const struct drv_vsock_bench_params *p, struct drv_vsock_bench_stats *s);

/* cdef-end */

#endif
