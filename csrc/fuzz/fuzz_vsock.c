/*
 * fuzz_vsock.c - libFuzzer harness for the vsock C data path (vsock.c),
 * both directions, against hostile rings and hostile connection state:
 *   guest -> host: vs_tx_burst over tx chains whose headers name known and
 *     unknown connections, lie about their length, op, type and CIDs, or
 *     exceed the credit; host sockets that take everything or only part;
 *   host -> guest: vs_rx_fill (never fuzzed before) into rx buffers too
 *     small for a header, split over descriptors, with any credit window.
 *
 * Checks, beyond AddressSanitizer/UBSan:
 *   - no guest byte changes outside the used rings and the writable
 *     buffers of chains the engine popped;
 *   - tx: the host socket received exactly the payload bytes the engine
 *     reports (completed packets plus the `sent` part of a cut one);
 *   - rx: the guest gets no more bytes than the credit it offered, and
 *     every byte the engine reports was taken from the host socket;
 *   - capture (both directions run with a capture ring): one whole,
 *     consistent vsockmon record per packet finished in C, whose payload
 *     lengths add up to the bytes the engine reports as done.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../capture.h"
#include "../vsock.h"
#include "fuzz_guest.h"

#define NCONN 3
#define GUEST_CID 3

static struct vs_table table;
static struct vs_conn conns[NCONN];
static int peer[NCONN]; /* the host program's end of each connection */
static struct vr_capture *cap;

static void rig_init(void)
{
    static int done;
    if (done)
        return;
    done = 1;
    signal(SIGPIPE, SIG_IGN); /* as in the back-end (Python ignores it): EPIPE comes back instead */
    cap = vr_capture_new(4u << 20, VR_CAPTURE_MAX_SNAPLEN);
    if (!cap)
        abort();
    for (int i = 0; i < NCONN; i++) {
        int sp[2];
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sp))
            abort();
        int small = 4096; /* so a burst can fill the socket and be cut short */
        setsockopt(sp[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));
        conns[i].fd = sp[0];
        peer[i] = sp[1];
    }
}

static uint64_t drain(int fd)
{
    static uint8_t buf[1 << 16];
    uint64_t total = 0;
    ssize_t n;
    while ((n = read(fd, buf, sizeof(buf))) > 0)
        total += (uint64_t)n;
    return total;
}

static void reset_conns(struct fg_reader *r)
{
    for (int i = 0; i < NCONN; i++) {
        struct vs_conn *c = &conns[i];
        if (c->in_table)
            vs_table_remove(&table, c);
        drain(peer[i]);
        drain(c->fd);
        int fd = c->fd;
        memset(c, 0, sizeof(*c));
        c->fd = fd;
        c->peer_cid = VS_HOST_CID;
        c->host_port = 1000u + i;
        c->guest_port = 2000u + i;
        c->type = fg_u8(r) % 8 ? VS_STREAM : VS_SEQPACKET;
        c->state = fg_u8(r) % 8 ? VS_ESTABLISHED : fg_u8(r) % 3;
        c->buf_alloc = fg_u8(r) % 4 ? 256u * 1024 : fg_u32(r);
        c->guest_shut_send = fg_u8(r) % 16 == 0;
        c->pending_bytes = fg_u8(r) % 16 == 0;
        c->fwd_cnt = c->reported_fwd = c->rx_total = fg_u8(r) % 4 ? 0 : fg_u32(r);
        c->peer_buf_alloc = fg_u8(r) % 4 ? 64u * 1024 : fg_u32(r);
        c->peer_fwd_cnt = fg_u32(r);
        c->tx_cnt = c->peer_fwd_cnt + (fg_u8(r) % 4 ? 0 : fg_u32(r));
        if (fg_u8(r) % 8 && vs_table_insert(&table, c) == 0)
            c->in_table = 1;
    }
}

/* A vsock header where each tx head's first descriptor points. */
static void plant_headers(struct fg_guest *g, struct fg_reader *r, uint32_t num)
{
    for (uint32_t i = 0; i < num; i++) {
        uint64_t addr;
        memcpy(&addr, fg_at(g, FG_DESC + 16u * i, 16), 8);
        uint8_t *p = fg_at(g, addr, VS_HDR_SIZE);
        if (!p || fg_u8(r) % 4 == 0)
            continue;
        uint32_t k = fg_u8(r) % (NCONN + 1);
        uint64_t src = fg_u8(r) % 8 ? GUEST_CID : fg_u64(r), dst = fg_u8(r) % 8 ? VS_HOST_CID : fg_u64(r);
        uint32_t sport = 2000u + k, dport = 1000u + k;
        uint32_t len = fg_u8(r) % 4 ? fg_u16(r) % 0x3000 : fg_u32(r);
        uint16_t type = fg_u8(r) % 8 ? VS_STREAM : fg_u16(r), op = fg_u8(r) % 8 ? VS_OP_RW : fg_u8(r) % 8;
        uint32_t flags = 0, buf_alloc = fg_u32(r), fwd = fg_u32(r);
        memcpy(p, &src, 8);
        memcpy(p + 8, &dst, 8);
        memcpy(p + 16, &sport, 4);
        memcpy(p + 20, &dport, 4);
        memcpy(p + 24, &len, 4);
        memcpy(p + 28, &type, 2);
        memcpy(p + 30, &op, 2);
        memcpy(p + 32, &flags, 4);
        memcpy(p + 36, &buf_alloc, 4);
        memcpy(p + 40, &fwd, 4);
    }
}

/* Take every record out of the capture ring; each must be a whole vsockmon
 * RW frame (af_vsockmon header consistent with the virtio header, nothing
 * cut, nothing dropped).  Returns the payload bytes they hold. */
static uint64_t captured_payload(void)
{
    static uint8_t buf[1 << 20];
    uint64_t total = 0, dropped = 0;
    uint32_t n;
    while ((n = vr_capture_read(cap, buf, sizeof(buf), &dropped)) > 0) {
        for (uint32_t off = 0; off < n;) {
            uint32_t rec[4], hlen, mon_op, vlen;
            memcpy(rec, buf + off, 16);
            const uint8_t *f = buf + off + 16;
            if (rec[2] != rec[3] || rec[2] < 76 || off + 16 + rec[2] > n)
                __builtin_trap();
            memcpy(&vlen, f + 32 + 24, 4);
            mon_op = f[24] | f[25] << 8;
            hlen = f[28] | f[29] << 8;
            if (mon_op != VS_MON_OP_PAYLOAD || hlen != VS_HDR_SIZE || vlen != rec[2] - 76 ||
                memcmp(f, f + 32, 24)) /* CIDs and ports: both headers agree */
                __builtin_trap();
            total += vlen;
            off += 16 + rec[2];
        }
    }
    if (dropped)
        __builtin_trap();
    return total;
}

static void guest_to_host(struct vr_queue *q, struct fg_reader *r)
{
    struct vr_seg segs[VR_MAX_SEGS];
    struct vr_chain c = {.cap = VR_MAX_SEGS, .segs = segs};
    uint64_t reported = 0, received = 0;
    for (int call = 0; call < 16; call++) {
        struct vs_tx_result res;
        vs_tx_burst(q, &table, GUEST_CID, &c, 1 + fg_u8(r) % 64, cap, &res);
        if (captured_payload() != res.bytes) /* the cut packet is Python's to capture */
            __builtin_trap();
        reported += res.bytes;
        if (res.status == VS_TX_PARTIAL)
            reported += res.sent;
        if (res.status == VS_TX_SLOW || res.status == VS_TX_PARTIAL)
            vr_push(q, c.head, 0); /* Python finishes (or resets) that packet */
        for (int i = 0; i < NCONN; i++) /* the host program reads, sometimes */
            if (fg_u8(r) % 2)
                received += drain(peer[i]);
        if (res.status == VS_TX_EMPTY || vr_queue_broken(q))
            break;
    }
    for (int i = 0; i < NCONN; i++)
        received += drain(peer[i]);
    if (received != reported)
        __builtin_trap();
}

static void host_to_guest(struct vr_queue *q, struct fg_reader *r)
{
    static uint8_t bytes[8192];
    struct vr_seg segs[VR_MAX_SEGS];
    struct vr_chain c = {.cap = VR_MAX_SEGS, .segs = segs};
    struct vs_conn *conn = &conns[fg_u8(r) % NCONN];
    size_t n = fg_u16(r) % sizeof(bytes);
    memset(bytes, 0xa5, n);
    ssize_t w = write(peer[conn - conns], bytes, n);
    if (fg_u8(r) % 8 == 0)
        shutdown(peer[conn - conns], SHUT_WR); /* EOF after the bytes */
    uint64_t written = w > 0 ? (uint64_t)w : 0, delivered = 0;
    uint32_t credit = vs_credit(conn);
    conn->readable = 1;
    for (int call = 0; call < 8; call++) {
        struct vs_rx_result res;
        vs_rx_fill(q, conn, GUEST_CID, &c, 1 + fg_u8(r) % 32, cap, &res);
        if (captured_payload() != res.bytes)
            __builtin_trap();
        delivered += res.bytes;
        if (res.status != VS_RX_MORE || vr_queue_broken(q))
            break;
    }
    int left = 0;
    if (ioctl(conn->fd, FIONREAD, &left) || delivered > credit || delivered + (uint64_t)left != written)
        __builtin_trap();
    if (fg_u8(r) % 8 == 0) { /* a fresh pair for the next input after an EOF */
        close(peer[conn - conns]);
        close(conn->fd);
        int sp[2];
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sp))
            abort();
        conn->fd = sp[0];
        peer[conn - conns] = sp[1];
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fg_reader r = {data, size, 0};
    struct fg_guest g;
    struct fg_snapshot snap;
    struct vr_queue tx, rx;
    uint32_t ntx = 0, nrx = 0;

    rig_init();
    fg_guest_init(&g);
    fg_trace_reset();
    reset_conns(&r);
    int tx_ok = fg_ring(&g, &r, &tx, 1, &ntx, NULL) == 0;
    if (tx_ok)
        plant_headers(&g, &r, ntx);
    int rx_ok = fg_ring_at(&g, &r, &rx, 0, &nrx, NULL, FG_RING2) == 0;
    fg_snapshot_take(&g, &snap);
    if (tx_ok)
        guest_to_host(&tx, &r);
    if (rx_ok)
        host_to_guest(&rx, &r);
    const uint64_t used[2][2] = {{FG_USED, FG_USED + vr_used_size(ntx)},
                                 {FG_RING2 + FG_USED, FG_RING2 + FG_USED + vr_used_size(nrx)}};
    fg_check_writes(&g, &snap, used, 2);
    vr_queue_fini(&tx);
    vr_queue_fini(&rx);
    fg_guest_free(&g);
    return 0;
}
