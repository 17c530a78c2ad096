/*
 * vsock.h - the vhost-user-vsock data path for established stream
 * connections to host sockets.
 *
 * Theory of operation
 * -------------------
 * The connection state machine stays in Python (backends/vsock).  What
 * crosses per packet is moved here: an RW packet from the guest on an
 * established stream connection is written to the host socket with one
 * writev() straight from guest memory, and host socket bytes are read with
 * one readv() straight into a guest rx buffer behind a header written in
 * place.  Python calls these functions from the queue workers' handlers,
 * holding the device lock, so every field of a struct vs_conn has one
 * writer at a time; the GIL is released (cffi).
 *
 * The counters of a connection live in struct vs_conn, and Python's Conn
 * reads and writes them there, so there is one copy of the credit state
 * (virtio 1.2, 5.10.6.3).  Anything unusual (another op, a bad header, a
 * connection that has bytes queued or is shutting down, a short write, no
 * room) is handed back to Python untouched, with a status that says why;
 * only a fully done packet changes state here.  A CREDIT_UPDATE from the
 * guest for such a connection is taken here too (the new window stored,
 * the chain completed); Python hears of it only when the window opens
 * from zero or closes (VS_TX_ATTENTION).
 *
 * With --pcap the capture stays here too: every RW packet C finishes, in
 * either direction, is appended to a capture ring (capture.h) as a
 * vsockmon frame before its chain is pushed; a full ring drops the frame
 * from the capture only.  Python appends the packets it handles to the
 * same ring, so one file holds both paths in order.
 *
 * struct vs_table maps (peer CID, host port, guest port) to connections
 * for the tx side: open addressing with linear probing and backward-shift
 * deletion, a fixed number of slots, no allocation.
 */
#ifndef VR_VSOCK_H
#define VR_VSOCK_H

#include <stdint.h>

#include "vring.h"
#include "vsock_hdr.h" /* VS_HDR_SIZE, struct vs_hdr */

/* cdef-begin */
struct vr_capture;

#define VS_MAX_PKT (64u * 1024u)  /* Linux VIRTIO_VSOCK_MAX_PKT_BUF_SIZE */
#define VS_TABLE_SLOTS 4096u      /* power of two */
#define VS_TABLE_MAX 3072u        /* beyond this, connections stay on the Python path */
#define VS_HOST_CID 2u

enum vs_state { VS_CONNECTING = 0, VS_ESTABLISHED = 1, VS_CLOSED = 2 };
enum vs_type { VS_STREAM = 1, VS_SEQPACKET = 5 };
enum vs_op { VS_OP_RW = 5, VS_OP_CREDIT_UPDATE = 6 };
enum { VS_MON_OP_CONTROL = 3, VS_MON_OP_PAYLOAD = 4, VS_MON_TRANSPORT_VIRTIO = 2 };  /* linux/vsockmon.h */

/* Statuses of vs_tx_burst(). */
enum vs_tx_status {
    VS_TX_EMPTY = 0,      /* no chain left (or the queue broke: vr_run reports it) */
    VS_TX_MORE = 1,       /* `max` packets done; call again */
    VS_TX_SLOW = 2,       /* chain left popped in *c, state untouched: Python handles it */
    VS_TX_PARTIAL = 3,    /* chain left popped in *c: `sent` bytes of its payload already
                             reached the host socket, nothing else changed */
    VS_TX_ATTENTION = 4,  /* a packet was done; `conn` needs Python (credit update due,
                             or the guest's credit for us opened or closed) */
};

/* Statuses of vs_rx_fill(). */
enum vs_rx_status {
    VS_RX_NO_BUFFER = 0,  /* the rx ring is empty (or broke) */
    VS_RX_MORE = 1,       /* `max` packets done; call again */
    VS_RX_DRAINED = 2,    /* the host socket has nothing now (readable cleared) */
    VS_RX_NO_CREDIT = 3,  /* the guest cannot take more bytes */
    VS_RX_SLOW = 4,       /* an rx buffer C does not fill (no room for header and data) */
    VS_RX_EOF = 5,        /* the host socket reached EOF */
    VS_RX_ERROR = 6,      /* the host socket failed; errno in `err` */
};

struct vs_conn {
    uint64_t peer_cid;
    uint32_t host_port, guest_port;
    int32_t fd;
    uint16_t type;
    uint16_t state;            /* enum vs_state */
    /* guest -> host (we advertise buf_alloc, count fwd_cnt) */
    uint32_t buf_alloc;
    uint32_t guest_shut_send;
    uint64_t fwd_cnt;          /* bytes written to the host socket */
    uint64_t rx_total;         /* bytes accepted from the guest */
    uint64_t reported_fwd;     /* fwd_cnt last told to the guest */
    uint64_t pending_bytes;    /* accepted, not yet written (Python holds the bytes) */
    /* host -> guest (the guest's window) */
    uint32_t peer_buf_alloc, peer_fwd_cnt;
    uint64_t tx_cnt;           /* bytes sent to the guest */
    uint32_t readable;         /* the host socket has data or EOF */
    uint32_t guest_shut_rcv;   /* the guest will not receive: nothing more is sent to it */
    uint32_t in_table;
    uint32_t host_slot;        /* 1 + its slot in the host loop (vsock_host.c), 0 when not there */
    /* what C moved itself (for the close log line and tests) */
    uint64_t c_bytes_out;      /* guest -> host */
    uint64_t c_bytes_in;       /* host -> guest */
    uint64_t c_credit_updates; /* CREDIT_UPDATEs C wrote to the rx queue */
};

struct vs_table {
    uint32_t count;
    struct vs_conn *slot[VS_TABLE_SLOTS];
};

struct vs_tx_result {
    uint32_t status;
    uint32_t packets;          /* RW packets finished in C by this call */
    uint64_t bytes;            /* their payload bytes */
    uint64_t sent;             /* VS_TX_PARTIAL: payload bytes already written */
    struct vs_conn *conn;      /* VS_TX_PARTIAL / VS_TX_ATTENTION */
    uint32_t rx_pushed;        /* CREDIT_UPDATEs written to the rx queue (then notified) */
    uint32_t credit_in;        /* the guest's CREDIT_UPDATEs taken here */
};

struct vs_rx_result {
    uint32_t status;
    uint32_t packets;
    uint64_t bytes;
    int32_t err;
};

int vs_table_insert(struct vs_table *t, struct vs_conn *c);
void vs_table_remove(struct vs_table *t, struct vs_conn *c);
struct vs_conn *vs_table_lookup(const struct vs_table *t, uint64_t peer_cid,
                                uint32_t host_port, uint32_t guest_port);
uint32_t vs_credit(const struct vs_conn *c);
int vs_credit_update_due(const struct vs_conn *c);

/* `cap` (may be NULL): every RW packet finished here is appended to that
 * capture ring as a vsockmon frame, before its chain is pushed.
 * `rxq` (may be NULL): the device's rx queue, which the caller holds for
 * itself (no other thread pops, pushes or stops it during the call); a
 * credit update due after a batch is written there, into a buffer popped
 * with `rxc`, instead of returning VS_TX_ATTENTION. */
int vs_tx_burst(struct vr_queue *q, const struct vs_table *t, uint64_t guest_cid,
                struct vr_chain *c, uint32_t max, struct vr_capture *cap,
                struct vr_queue *rxq, struct vr_chain *rxc, struct vs_tx_result *res);
int vs_rx_fill(struct vr_queue *q, struct vs_conn *conn, uint64_t guest_cid,
               struct vr_chain *c, uint32_t max, struct vr_capture *cap,
               struct vs_rx_result *res);

/* ---- the host loop (vsock_host.c) ---- */

/* A recursive mutex: the device lock, taken by Python (`with`) and by the
 * host loop in C, so both exclude each other from connections and rings. */
struct vs_lock;
struct vs_lock *vs_lock_new(void);
void vs_lock_free(struct vs_lock *l);
void vs_lock_acquire(struct vs_lock *l);
void vs_lock_release(struct vs_lock *l);

#define VS_HOST_SLOTS 4096u  /* connections the loop reads; at least VS_TABLE_MAX */
#define VS_HOST_BATCH 64     /* events per epoll_wait */

/* A connection the loop handed back to Python, by key (its record may be
 * gone by the time Python looks): `status` is vs_rx_fill()'s, or
 * VS_RX_SLOW when C may not fill at all now. */
struct vs_back {
    uint64_t peer_cid;
    uint32_t host_port, guest_port;
    uint32_t status;
    int32_t err;
};

struct vs_host_result {
    uint32_t py;          /* the Python selector has events */
    uint32_t rx_broken;   /* the rx ring broke under a fill (Python reports it) */
    uint32_t nback;
    struct vs_back back[VS_HOST_BATCH];
};

struct vs_host_counters {
    uint64_t packets, bytes;  /* RW packets and payload bytes the loop filled */
    uint64_t wakeups;         /* epoll_wait returns with events */
};

struct vs_host;
struct vs_host *vs_host_new(struct vs_lock *lock, int py_fd, uint64_t guest_cid);
void vs_host_free(struct vs_host *h);
/* The lock held: */
void vs_host_set_rx(struct vs_host *h, struct vr_queue *rxq, struct vr_chain *c, struct vr_capture *cap);
void vs_host_set_flags(struct vs_host *h, uint32_t hold, uint32_t worker_waits);
void vs_host_set_py(struct vs_host *h, vr_handler_fn fn, void *ctx);
/* Python's rx handler has work (any thread, lock taken here). */
void vs_host_py_work(struct vs_host *h);
/* The rx queue's worker handler (vr_run): Python's first when it has work,
 * then the connections waiting for buffers. */
int vs_rx_handler(void *ctx, struct vr_queue *q);
int vs_host_add(struct vs_host *h, struct vs_conn *c);
void vs_host_del(struct vs_host *h, struct vs_conn *c);
void vs_host_counters(const struct vs_host *h, struct vs_host_counters *out);
/* Without the lock (it takes it per batch); returns 0, or -VR_E_STATE when epoll fails. */
int vs_host_run(struct vs_host *h, int timeout_ms, struct vs_host_result *res);
/* Python has control packets queued (lock held): C writes no credit update
 * to the rx queue before them. */
void vs_host_set_ctrl(struct vs_host *h, uint32_t queued);

/* The tx queue's worker handler: bursts in C (vs_tx_burst) under the lock;
 * Python's handler for the packets C hands back. */
enum vs_tx_stash {
    VS_STASH_NONE = 0,    /* Python's handler runs from the start */
    VS_STASH_LOCKED = 1,  /* `stash` is a PARTIAL or ATTENTION result (or the rx ring
                             broke); Python finishes it with the lock held by C */
    VS_STASH_SLOW = 2,    /* `stash` is a SLOW result: its chain is popped in `c` */
};

struct vs_tx_counters {
    uint64_t packets, bytes;  /* RW packets finished by the C handler */
    uint64_t credit_in;       /* the guest's CREDIT_UPDATEs it took */
    uint64_t rx_pushed;       /* CREDIT_UPDATEs it wrote to the rx queue */
};

struct vs_tx {
    struct vs_host *h;          /* the lock, the rx queue, hold, ctrl */
    const struct vs_table *t;
    struct vr_chain *c;         /* the tx queue's chain buffer */
    struct vr_chain *rxc;       /* a chain buffer for credit updates on rx */
    struct vr_queue *txq;       /* set by Python's first run of a session */
    vr_handler_fn py_fn;        /* Python's tx handler (the vr_run trampoline) */
    void *py_ctx;
    uint32_t py_work;           /* Python's handler runs first (a wake, a parked relay) */
    uint32_t stash_kind;        /* enum vs_tx_stash */
    struct vs_tx_result stash;
    struct vs_tx_counters counters;
};

int vs_tx_handler(void *ctx, struct vr_queue *q);

/* cdef-end */

#endif
