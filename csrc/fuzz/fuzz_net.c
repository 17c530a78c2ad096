/*
 * fuzz_net.c - libFuzzer harness for the vhost-user-net switch (net.c,
 * net_offload.c) fed from a hostile virtio tx ring: virtio-net headers
 * with every checksum/GSO combination the port may or may not have
 * negotiated, runts and oversize chains, writable tx descriptors, frames
 * to a known port, to broadcast and to nobody, delivered into a second
 * guest's hostile rx ring (mergeable buffers or not, offloads kept or
 * completed in software) and to a TAP port; capture on or off.
 *
 * Checks, beyond AddressSanitizer/UBSan: no guest byte changes outside the
 * two used rings and the writable buffers of rx chains the switch popped;
 * every frame the TAP port receives is a whole frame no longer than the
 * largest the switch accepts.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "net.h" /* backends/net/ */
#include "fuzz_guest.h"

static const uint8_t MAC_A[6] = {0x52, 0x54, 0x00, 0, 0, 0xa}; /* port 0, the sender */
static const uint8_t MAC_B[6] = {0x52, 0x54, 0x00, 0, 0, 0xb}; /* port 1, the receiver */
static const uint8_t BCAST[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

static uint64_t features(struct fg_reader *r)
{
    static const int bits[] = {VR_NET_F_CSUM, VR_NET_F_GUEST_CSUM, VR_NET_F_GUEST_TSO4,
                               VR_NET_F_GUEST_TSO6, VR_NET_F_GUEST_ECN, VR_NET_F_HOST_TSO4,
                               VR_NET_F_HOST_TSO6, VR_NET_F_HOST_ECN, VR_NET_F_MRG_RXBUF,
                               VR_NET_F_VERSION_1};
    uint16_t pick = fg_u16(r);
    uint64_t f = 0;
    for (unsigned i = 0; i < sizeof(bits) / sizeof(bits[0]); i++)
        if (pick >> i & 1)
            f |= 1ull << bits[i];
    return f;
}

/* A virtio-net header, an Ethernet header and (often) IPv4/IPv6 + TCP
 * where a tx head's first descriptor points. */
static void plant_frame(struct fg_guest *g, struct fg_reader *r, uint64_t gpa, uint32_t hl)
{
    uint8_t f[12 + 14 + 40 + 20];
    memset(f, 0, sizeof(f));
    uint8_t *p = fg_at(g, gpa, sizeof(f));
    if (!p)
        return;
    /* header: flags, gso type, hdr_len, gso_size, csum_start, csum_offset */
    static const uint8_t gso[] = {0, 1, 4, 0x81, 0x84, 3, 0xff};
    f[0] = fg_u8(r) % 4;
    f[1] = gso[fg_u8(r) % sizeof(gso)];
    uint16_t v = fg_u8(r) % 2 ? 54 : fg_u16(r);
    memcpy(f + 2, &v, 2);
    v = fg_u8(r) % 2 ? 1448 : fg_u16(r);
    memcpy(f + 4, &v, 2);
    v = fg_u8(r) % 2 ? 34 : fg_u16(r);
    memcpy(f + 6, &v, 2);
    v = fg_u8(r) % 2 ? 16 : fg_u16(r);
    memcpy(f + 8, &v, 2);
    uint8_t *e = f + hl;
    const uint8_t *dst = (const uint8_t *[]){MAC_B, BCAST, MAC_A, MAC_B}[fg_u8(r) % 4];
    memcpy(e, dst, 6);
    memcpy(e + 6, fg_u8(r) % 8 ? MAC_A : BCAST, 6); /* a broadcast source must not be learned */
    int v6 = fg_u8(r) & 1;
    e[12] = v6 ? 0x86 : 0x08;
    e[13] = v6 ? 0xdd : 0x00;
    uint8_t *ip = e + 14, *tcp;
    uint16_t iplen = fg_u16(r);
    if (v6) {
        ip[0] = 0x60;
        ip[4] = iplen >> 8, ip[5] = iplen & 0xff;
        ip[6] = fg_u8(r) % 2 ? 6 : fg_u8(r); /* next header */
        tcp = ip + 40;
    } else {
        ip[0] = fg_u8(r) % 4 ? 0x45 : fg_u8(r);
        ip[2] = iplen >> 8, ip[3] = iplen & 0xff;
        ip[9] = fg_u8(r) % 2 ? 6 : fg_u8(r);
        tcp = ip + 20;
    }
    if (tcp + 20 <= f + sizeof(f))
        tcp[12] = fg_u8(r) % 4 ? 0x50 : fg_u8(r); /* data offset */
    memcpy(p, f, sizeof(f));
}

/* A switch costs a thousand mutexes and a MAC table: one per shape
 * (capture on/off) for the whole run, its ports' MACs forgotten and its
 * capture ring drained after every input, so inputs do not leak state. */
struct rig {
    struct vr_net_switch *sw;
    int a, b, t;
    int sp[2];
};

static struct rig *rig_for(int capture)
{
    static struct rig rigs[2];
    struct rig *g = &rigs[capture];
    if (!g->sw) {
        if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK, 0, g->sp))
            abort();
        if (!(g->sw = vr_net_switch_new(capture ? 4096 : 0, 1000000000ull)))
            abort();
        g->a = vr_net_port_add(g->sw, -1, 0);
        g->b = vr_net_port_add(g->sw, -1, 0);
        g->t = vr_net_port_add(g->sw, g->sp[0], 0);
    }
    return g;
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
    struct rig *rig = rig_for(fg_u8(&r) % 2);
    struct vr_net_switch *sw = rig->sw;
    int a = rig->a, b = rig->b, t = rig->t;
    vr_net_port_set_features(sw, t, features(&r)); /* what the TAP offered */
    uint64_t fa = features(&r), fb = features(&r);
    vr_net_port_set_features(sw, a, fa);
    vr_net_port_set_features(sw, b, fb);
    uint32_t hl = (fa >> VR_NET_F_VERSION_1 & 1) || (fa >> VR_NET_F_MRG_RXBUF & 1) ? 12 : 10;

    int rx_ok = fg_ring_at(&g, &r, &rx, 1, &nrx, NULL, FG_RING2) == 0;
    int tx_ok = fg_ring(&g, &r, &tx, 0, &ntx, NULL) == 0;
    if (rx_ok)
        vr_net_rx_attach(sw, b, 0, &rx);
    if (tx_ok) {
        for (uint32_t i = 0; i < ntx; i++) {
            uint64_t addr;
            memcpy(&addr, fg_at(&g, FG_DESC + 16u * i, 16), 8);
            if (fg_u8(&r) % 4)
                plant_frame(&g, &r, addr, hl);
        }
    }
    fg_snapshot_take(&g, &snap);

    /* port b's MAC becomes known the way a guest makes it known: a frame from it */
    uint8_t hello[60] = {0};
    memcpy(hello, MAC_A, 6);
    memcpy(hello + 6, MAC_B, 6);
    if (fg_u8(&r) % 4)
        vr_net_inject(sw, b, hello, sizeof(hello));
    if (tx_ok) {
        struct vr_net_tx *w = vr_net_tx_new(sw, a, 0);
        if (!w)
            abort();
        for (int round = 0; round < 2; round++)
            vr_net_tx_handle(w, &tx);
        vr_net_tx_free(w);
    }
    if (fg_u8(&r) % 2) { /* a TAP frame (12-byte header) into the guest */
        uint8_t frame[256];
        uint32_t n = (uint32_t)fg_take(&r, frame, sizeof(frame));
        vr_net_inject(sw, t, frame, n);
    }
    uint8_t cap[8192];
    uint64_t dropped;
    while (vr_net_capture_read(sw, cap, sizeof(cap), &dropped) > 0)
        ;
    for (;;) {
        static uint8_t got[VR_NET_MAX_FRAME + 64];
        ssize_t n = recv(rig->sp[1], got, sizeof(got), 0);
        if (n < 0)
            break;
        if ((size_t)n > 12 + VR_NET_MAX_FRAME)
            __builtin_trap();
    }
    if (rx_ok)
        vr_net_rx_detach(sw, b, 0);

    uint64_t used[4][2];
    uint32_t nused = fg_ring_writes(&tx, 0, used);
    nused += fg_ring_writes(&rx, FG_RING2, used + nused);
    fg_check_writes(&g, &snap, (const uint64_t (*)[2])used, nused);
    vr_queue_fini(&tx);
    vr_queue_fini(&rx);
    vr_net_port_forget(sw, a);
    vr_net_port_forget(sw, b);
    vr_net_port_forget(sw, t);
    fg_guest_free(&g);
    return 0;
}
