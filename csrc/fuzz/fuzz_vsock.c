/*
 * fuzz_vsock.c - libFuzzer harness for the vsock C data path (vsock.c),
 * both directions, against hostile rings and hostile connection state:
 *   guest -> host: vs_tx_burst over tx chains whose headers name known and
 *     unknown connections, lie about their length, op, type and CIDs, or
 *     exceed the credit; host sockets that take everything or only part;
 *   host -> guest: vs_rx_fill (never fuzzed before) into rx buffers too
 *     small for a header, split over descriptors, with any credit window.
 * Both rings are either fully fuzzed (split, indirect, hostile addresses)
 * or shaped (shape_ring): chains of many tiny descriptors, indirect tables
 * shared by every head so a batch needs more than IOV_CAP iovecs, header
 * and payload lengths at their boundaries.  Each input gets fresh socket
 * pairs, an empty table and an empty capture ring, so it replays alone.
 *
 * Checks, beyond AddressSanitizer/UBSan:
 *   - no guest byte changes outside the used rings and the writable
 *     buffers of chains the engine popped;
 *   - tx: the host socket received exactly the payload bytes the engine
 *     reports (completed packets plus the `sent` part of a cut one);
 *   - rx: the guest gets no more bytes than the credit it offered, and
 *     every byte the engine reports was taken from the host socket;
 *   - capture (three inputs in four run with a capture ring): one whole,
 *     consistent vsockmon record per packet finished in C, whose payload
 *     lengths add up to the bytes the engine reports as done.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../capture.c" /* the core's, built in, not linked: the harness empties the ring per input */
#include "vsock.h" /* backends/vsock/ */
#include "fuzz_guest.h"

#define NCONN 3
#define GUEST_CID 3

/*
 * Everything an input touches is built for it and torn down after it:
 * fresh socket pairs (so no socket buffer, EOF or shutdown carries over),
 * an empty connection table and an empty capture ring (one allocation for
 * the process, its positions and counters set back to zero: allocating
 * 8 MiB per input cost 90% of the time).  A finding replays alone.
 */
static struct vs_table table;
static struct vs_conn conns[NCONN];
static int peer[NCONN]; /* the host program's end of each connection */
static struct vr_capture *cap, *cap_ring;

static void rig_open(struct fg_reader *r)
{
    static int done;
    if (!done) {
        done = 1;
        signal(SIGPIPE, SIG_IGN); /* as in the back-end (Python ignores it): EPIPE comes back instead */
    }
    memset(&table, 0, sizeof(table));
    if (!cap_ring && !(cap_ring = vr_capture_new(8u << 20, VR_CAPTURE_MAX_SNAPLEN)))
        abort();
    cap_ring->head = cap_ring->tail = 0;
    memset(&cap_ring->st, 0, sizeof(cap_ring->st));
    cap = fg_u8(r) % 4 ? cap_ring : NULL;
    for (int i = 0; i < NCONN; i++) {
        struct vs_conn *c = &conns[i];
        int sp[2];
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sp))
            abort();
        if (fg_u8(r) % 4) {
            int small = 4096; /* so a burst can fill the socket and be cut short */
            setsockopt(sp[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));
        }
        memset(c, 0, sizeof(*c));
        c->fd = sp[0];
        peer[i] = sp[1];
        c->peer_cid = VS_HOST_CID;
        c->host_port = 1000u + i;
        c->guest_port = 2000u + i;
        c->type = fg_u8(r) % 8 ? VS_STREAM : VS_SEQPACKET;
        c->state = fg_u8(r) % 8 ? VS_ESTABLISHED : fg_u8(r) % 3;
        static const uint32_t windows[] = {0, 1, 43, 44, 45, 4095, 4096, 65535, 65536, 65537};
        uint8_t w = fg_u8(r) % 8;
        c->buf_alloc = w < 4 ? 256u * 1024 : w < 6 ? windows[fg_u8(r) % 10] : fg_u32(r);
        c->guest_shut_send = fg_u8(r) % 16 == 0;
        c->pending_bytes = fg_u8(r) % 16 == 0;
        c->fwd_cnt = c->reported_fwd = c->rx_total = fg_u8(r) % 4 ? 0 : fg_u32(r);
        w = fg_u8(r) % 8;
        c->peer_buf_alloc = w < 4 ? 64u * 1024 : w < 6 ? windows[fg_u8(r) % 10] : fg_u32(r);
        c->peer_fwd_cnt = fg_u32(r);
        c->tx_cnt = c->peer_fwd_cnt + (fg_u8(r) % 4 ? 0 : fg_u32(r));
        if (fg_u8(r) % 8)
            vs_table_insert(&table, c);
    }
}

static void rig_close(void)
{
    for (int i = 0; i < NCONN; i++) {
        close(conns[i].fd);
        close(peer[i]);
    }
    cap = NULL;
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

/* A descriptor at `gpa`, as the guest wrote it. */
static void put_desc(struct fg_guest *g, uint64_t gpa, uint64_t addr, uint32_t len, uint16_t flags,
                     uint16_t next)
{
    uint8_t d[16];
    memcpy(d, &addr, 8);
    memcpy(d + 8, &len, 4);
    memcpy(d + 12, &flags, 2);
    memcpy(d + 14, &next, 2);
    fg_put(g, gpa, d, 16);
}

/*
 * Sometimes replace the fuzzed ring `at` (already laid out by fg_ring_at)
 * with a shaped hostile one the random bytes rarely make:
 *   1: chains of many tiny descriptors (1-4 bytes each, up to the whole
 *      table in one chain), heads in the avail ring repeated or not;
 *   2: indirect chains of up to 256 tiny descriptors, every head sharing
 *      tables, so one batch needs far more than IOV_CAP iovecs;
 *   3: a header descriptor (43, 44 or 45 bytes, or more) and one payload
 *      descriptor of a boundary length (VS_MAX_PKT +-1, up to a region end).
 * `write` marks the buffers device-writable (rx).  The avail ring keeps
 * fg_ring_at's indexes; only its entries are rewritten.
 */
static void shape_ring(struct fg_guest *g, struct fg_reader *r, uint64_t at, uint32_t num, int write)
{
    static const uint32_t hdr_lens[] = {VS_HDR_SIZE, VS_HDR_SIZE, VS_HDR_SIZE - 1, VS_HDR_SIZE + 1,
                                        VS_HDR_SIZE + 100, 4096};
    static const uint32_t big_lens[] = {1, VS_MAX_PKT - 1, VS_MAX_PKT, VS_MAX_PKT + 1,
                                        VS_MAX_PKT + VS_HDR_SIZE, 4095, 4096, 0};
    uint8_t mode = fg_u8(r) % 4;
    uint16_t wf = write ? VR_DESC_F_WRITE : 0;
    uint64_t data = at ? FG_OTHER : FG_DATA, data_end = at ? FG_RING2 : FG_DATA_END;
    uint64_t pos = data;
    if (mode == 0)
        return;
    uint16_t heads[FG_MAX_NUM];
    uint32_t nheads = 0;
    if (mode == 1 || mode == 3) {
        for (uint32_t i = 0; i < num;) {
            uint32_t len = mode == 1 ? 1 + fg_u8(r) % num : 2;
            if (len > num - i)
                len = num - i;
            heads[nheads++] = (uint16_t)i;
            for (uint32_t k = 0; k < len; k++, i++) {
                uint32_t l = k == 0 ? hdr_lens[fg_u8(r) % 6] : mode == 1 ? 1 + fg_u8(r) % 4
                                                                       : big_lens[fg_u8(r) % 8];
                if (mode == 3 && l == 0) /* up to the region's end */
                    l = (uint32_t)(data_end - pos);
                if (pos + l > data_end)
                    pos = data;
                uint16_t f = (k + 1 < len ? VR_DESC_F_NEXT : 0) | wf;
                put_desc(g, at + FG_DESC + 16u * i, pos, l, f, (uint16_t)(i + 1));
                pos += l + fg_u8(r) % 4; /* adjacent or not */
            }
        }
    } else { /* indirect: tables in the 4 KiB at FG_INDIRECT, 256 entries */
        uint32_t ntab = 1 + fg_u8(r) % 4, used = 0;
        for (uint32_t t = 0; t < ntab && used < 256; t++) {
            uint32_t n = 1 + fg_u16(r) % (256 - used);
            for (uint32_t k = 0; k < n; k++) {
                uint32_t l = k == 0 ? hdr_lens[fg_u8(r) % 6] : 1 + fg_u8(r) % 4;
                if (pos + l > data_end)
                    pos = data;
                uint16_t f = (k + 1 < n ? VR_DESC_F_NEXT : 0) | wf;
                put_desc(g, at + FG_INDIRECT + 16u * (used + k), pos, l, f, (uint16_t)(k + 1));
                pos += l + fg_u8(r) % 2;
            }
            uint32_t len = 16u * n;
            if (fg_u8(r) % 8 == 0)
                len += fg_u8(r) % 2 ? 8 : -8u; /* not a whole number of entries */
            put_desc(g, at + FG_DESC + 16u * t, at + FG_INDIRECT + 16u * used, len, VR_DESC_F_INDIRECT, 0);
            heads[nheads++] = (uint16_t)t;
            used += n;
        }
    }
    /* avail entries: the heads in turn, or one head over and over */
    int same = fg_u8(r) % 2;
    for (uint32_t i = 0; i < num; i++) {
        uint16_t v = heads[same ? 0 : i % nheads];
        fg_put(g, at + FG_AVAIL + 4 + 2u * i, &v, 2);
    }
}

/* The readable bytes of the chain at `head` (direct or one indirect table),
 * as a simple walk of what the guest wrote; bounded, for header lengths at
 * the payload's boundary. */
static uint64_t chain_read_len(struct fg_guest *g, uint32_t num, uint16_t head)
{
    uint64_t total = 0, table = FG_DESC;
    uint32_t size = num, i = head;
    for (uint32_t steps = 0; steps < 512 && i < size; steps++) {
        uint8_t *d = fg_at(g, table + 16u * i, 16);
        if (!d)
            break;
        uint64_t addr;
        uint32_t len;
        uint16_t flags, next;
        memcpy(&addr, d, 8);
        memcpy(&len, d + 8, 4);
        memcpy(&flags, d + 12, 2);
        memcpy(&next, d + 14, 2);
        if ((flags & VR_DESC_F_INDIRECT) && table == FG_DESC) {
            table = addr;
            size = len / 16;
            i = 0;
            continue;
        }
        if (!(flags & VR_DESC_F_WRITE))
            total += len;
        if (!(flags & VR_DESC_F_NEXT))
            break;
        i = next;
    }
    return total;
}

/* A vsock header where each tx chain's first descriptor points (following
 * an indirect head into its table). */
static void plant_headers(struct fg_guest *g, struct fg_reader *r, uint32_t num)
{
    for (uint32_t i = 0; i < num; i++) {
        uint64_t addr;
        uint16_t flags;
        memcpy(&addr, fg_at(g, FG_DESC + 16u * i, 16), 8);
        memcpy(&flags, fg_at(g, FG_DESC + 16u * i + 12, 2), 2);
        if ((flags & VR_DESC_F_INDIRECT) && fg_at(g, addr, 16) && fg_u8(r) % 4)
            memcpy(&addr, fg_at(g, addr, 16), 8);
        uint8_t *p = fg_at(g, addr, VS_HDR_SIZE);
        if (!p || fg_u8(r) % 4 == 0)
            continue;
        uint32_t k = fg_u8(r) % (NCONN + 1);
        uint64_t src = fg_u8(r) % 8 ? GUEST_CID : fg_u64(r), dst = fg_u8(r) % 8 ? VS_HOST_CID : fg_u64(r);
        uint32_t sport = 2000u + k, dport = 1000u + k;
        uint32_t len, room = (uint32_t)(chain_read_len(g, num, (uint16_t)i) - VS_HDR_SIZE);
        switch (fg_u8(r) % 8) {
        case 0: len = fg_u32(r); break;
        case 1: len = room - 1 + fg_u8(r) % 3; break; /* the payload's end, +-1 */
        case 2: len = VS_MAX_PKT - 1 + fg_u8(r) % 3; break;
        case 3: len = room; break;
        default: len = fg_u16(r) % 0x3000;
        }
        uint16_t type = fg_u8(r) % 8 ? VS_STREAM : fg_u16(r), op = fg_u8(r) % 8 ? VS_OP_RW : fg_u8(r) % 8;
        uint32_t hflags = 0, buf_alloc = fg_u32(r), fwd = fg_u32(r);
        memcpy(p, &src, 8);
        memcpy(p + 8, &dst, 8);
        memcpy(p + 16, &sport, 4);
        memcpy(p + 20, &dport, 4);
        memcpy(p + 24, &len, 4);
        memcpy(p + 28, &type, 2);
        memcpy(p + 30, &op, 2);
        memcpy(p + 32, &hflags, 4);
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
    if (!cap)
        return 0;
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
            /* RW packets carry their payload; C's CREDIT_UPDATEs none */
            int ctl = mon_op == VS_MON_OP_CONTROL && f[32 + 30] == VS_OP_CREDIT_UPDATE && vlen == 0;
            if ((mon_op != VS_MON_OP_PAYLOAD && !ctl) || hlen != VS_HDR_SIZE || vlen != rec[2] - 76 ||
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

static void guest_to_host(struct vr_queue *q, struct vr_queue *rxq, struct fg_reader *r)
{
    struct vr_seg segs[VR_MAX_SEGS], rxsegs[VR_MAX_SEGS];
    struct vr_chain c = {.cap = VR_MAX_SEGS, .segs = segs};
    struct vr_chain rxc = {.cap = VR_MAX_SEGS, .segs = rxsegs};
    uint64_t reported = 0, received = 0;
    for (int call = 0; call < 16; call++) {
        struct vs_tx_result res;
        vs_tx_burst(q, &table, GUEST_CID, &c, 1 + fg_u8(r) % 64, cap, rxq, &rxc, &res);
        if (cap && captured_payload() != res.bytes) /* the cut packet is Python's to capture */
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
    static uint8_t bytes[1 << 17];
    static const uint32_t sizes[] = {1, 43, 44, 45, 4095, 4096, 4097, VS_MAX_PKT, VS_MAX_PKT + 1,
                                     sizeof(bytes)};
    struct vr_seg segs[VR_MAX_SEGS];
    struct vr_chain c = {.cap = VR_MAX_SEGS, .segs = segs};
    struct vs_conn *conn = &conns[fg_u8(r) % NCONN];
    int fd = peer[conn - conns];
    size_t n = fg_u8(r) % 4 ? fg_u16(r) % 8192 : sizes[fg_u8(r) % 10];
    memset(bytes, 0xa5, n);
    ssize_t w = write(fd, bytes, n);
    if (fg_u8(r) % 8 == 0)
        shutdown(fd, SHUT_WR); /* EOF after the bytes */
    uint64_t written = w > 0 ? (uint64_t)w : 0, delivered = 0;
    uint32_t credit = vs_credit(conn);
    conn->readable = 1;
    for (int call = 0; call < 8; call++) {
        struct vs_rx_result res;
        vs_rx_fill(q, conn, GUEST_CID, &c, 1 + fg_u8(r) % 32, cap, &res);
        if (cap && captured_payload() != res.bytes)
            __builtin_trap();
        delivered += res.bytes;
        if (res.status != VS_RX_MORE || vr_queue_broken(q))
            break;
    }
    int left = 0;
    if (ioctl(conn->fd, FIONREAD, &left) || delivered > credit || delivered + (uint64_t)left != written)
        __builtin_trap();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fg_reader r = {data, size, 0};
    struct fg_guest g;
    struct fg_snapshot snap;
    struct vr_queue tx, rx;
    uint32_t ntx = 0, nrx = 0;

    fg_guest_init(&g);
    fg_trace_reset();
    rig_open(&r);
    int tx_ok = fg_ring(&g, &r, &tx, 1, &ntx, NULL) == 0;
    if (tx_ok) {
        shape_ring(&g, &r, 0, ntx, 0);
        plant_headers(&g, &r, ntx);
    }
    int rx_ok = fg_ring_at(&g, &r, &rx, 0, &nrx, NULL, FG_RING2) == 0;
    if (rx_ok)
        shape_ring(&g, &r, FG_RING2, nrx, 1);
    fg_snapshot_take(&g, &snap);
    if (tx_ok) /* credit updates go to the rx ring in one input of two that has one */
        guest_to_host(&tx, rx_ok && fg_u8(&r) % 2 ? &rx : NULL, &r);
    if (rx_ok)
        host_to_guest(&rx, &r);
    uint64_t used[4][2];
    uint32_t nused = fg_ring_writes(&tx, 0, used);
    nused += fg_ring_writes(&rx, FG_RING2, used + nused);
    fg_check_writes(&g, &snap, (const uint64_t (*)[2])used, nused);
    vr_queue_fini(&tx);
    vr_queue_fini(&rx);
    fg_guest_free(&g);
    rig_close();
    return 0;
}
