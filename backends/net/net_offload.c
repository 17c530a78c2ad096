/*
 * net_offload.c - virtio-net header checks and software offloads for the
 * switch (virtio 1.2, 5.1.6.2): finishing a partial checksum and cutting a
 * TCP GSO frame into MSS-sized segments, for a port that did not negotiate
 * the offload the sender used.  Pure functions over a frame in memory.
 */
#include <string.h>

#include "net_offload.h"

#define ETH_HLEN 14

static inline uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline void put_be16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = v & 0xff; }
static inline uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}
static inline int has(uint64_t f, int bit) { return (f >> bit) & 1; }

/* ---- checksums and segmentation (virtio 1.2, 5.1.6.2) ---- */

static uint32_t csum_add(uint32_t sum, const uint8_t *p, uint32_t len)
{
    uint64_t s = sum;
    while (len >= 2) {
        s += be16(p);
        p += 2;
        len -= 2;
    }
    if (len)
        s += (uint32_t)p[0] << 8;
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (uint32_t)s;
}

static uint16_t csum_fold(uint32_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

/* NEEDS_CSUM: the field holds the pseudo-header sum; finish it. */
void vr_net_resolve_csum(uint8_t *f, uint32_t len, const struct vr_net_hdr *h)
{
    uint32_t at = (uint32_t)h->csum_start + h->csum_offset;
    put_be16(f + at, csum_fold(csum_add(0, f + h->csum_start, len - h->csum_start)));
}

/* Cut a TCP GSO frame into gso_size segments with full checksums; each is
 * built in `out` (VR_NET_MAX_FRAME bytes) and handed to emit(). */
int vr_net_segment(const struct vr_net_hdr *h, const uint8_t *f, uint32_t len, uint8_t *out,
                   void (*emit)(void *ctx, const uint8_t *seg, uint32_t len), void *ctx)
{
    uint32_t l3 = ETH_HLEN;
    uint16_t type = be16(f + 12);
    if (type == 0x8100) {
        l3 += 4;
        type = be16(f + 16);
    }
    uint32_t l4 = h->csum_start;
    int v4 = (h->gso_type & ~GSO_ECN) == GSO_TCPV4;
    if (v4) {
        if (type != 0x0800 || l3 + 20 > len || (f[l3] & 15) < 5 || l4 != l3 + (f[l3] & 15) * 4u ||
            f[l3 + 9] != 6)
            return -1;
    } else {
        if (type != 0x86dd || l3 + 40 > len || l4 != l3 + 40 || f[l3 + 6] != 6)
            return -1;
    }
    if (l4 + 20 > len)
        return -1;
    uint32_t thl = (f[l4 + 12] >> 4) * 4u;
    uint32_t hl = l4 + thl;
    uint32_t mss = h->gso_size;
    if (thl < 20 || hl > len || mss == 0)
        return -1;
    uint32_t payload = len - hl, seq = be32(f + l4 + 4);
    uint32_t off = 0;
    do {
        uint32_t plen = payload - off < mss ? payload - off : mss;
        int last = off + plen >= payload;
        uint8_t *s = out;
        memcpy(s, f, hl);
        memcpy(s + hl, f + hl + off, plen);
        uint32_t seg_no = off / mss;
        if (v4) {
            put_be16(s + l3 + 2, (uint16_t)(hl - l3 + plen));
            put_be16(s + l3 + 4, (uint16_t)(be16(f + l3 + 4) + seg_no));
            put_be16(s + l3 + 10, 0);
            put_be16(s + l3 + 10, csum_fold(csum_add(0, s + l3, l4 - l3)));
        } else {
            put_be16(s + l3 + 4, (uint16_t)(thl + plen));
        }
        put_be32(s + l4 + 4, seq + off);
        if (!last)
            s[l4 + 13] &= ~0x09;          /* FIN, PSH only on the last */
        if (seg_no)
            s[l4 + 13] &= ~0x80;          /* CWR only on the first */
        put_be16(s + l4 + 16, 0);
        uint8_t pseudo[40];
        uint32_t plen_tcp = thl + plen, n;
        if (v4) {
            memcpy(pseudo, s + l3 + 12, 8);
            pseudo[8] = 0;
            pseudo[9] = 6;
            put_be16(pseudo + 10, (uint16_t)plen_tcp);
            n = 12;
        } else {
            memcpy(pseudo, s + l3 + 8, 32);
            put_be32(pseudo + 32, plen_tcp);
            memset(pseudo + 36, 0, 3);
            pseudo[39] = 6;
            n = 40;
        }
        uint32_t sum = csum_add(csum_add(0, pseudo, n), s + l4, plen_tcp);
        put_be16(s + l4 + 16, csum_fold(sum));
        emit(ctx, s, hl + plen);
        off += plen;
    } while (off < payload);
    return 0;
}

/* Check the header against what the source may send (5.1.6.2.1). */
int vr_net_check_hdr(const struct vr_net_hdr *h, uint64_t feat, uint32_t len, int from_driver)
{
    /* 5.1.6.2.1: a driver must not set DATA_VALID (a guest could otherwise
     * tell its peers to skip checking a bad checksum); the host kernel may. */
    uint8_t allowed = HDR_F_NEEDS_CSUM | (from_driver ? 0 : HDR_F_DATA_VALID);
    if (h->flags & ~allowed)
        return -1;
    if (h->flags & HDR_F_NEEDS_CSUM) {
        if (!has(feat, VR_NET_F_CSUM))
            return -1;
        if ((uint32_t)h->csum_start + h->csum_offset + 2 > len || h->csum_start < ETH_HLEN)
            return -1;
    }
    uint8_t gso = h->gso_type & ~GSO_ECN;
    if (gso == GSO_NONE)
        return h->gso_type & GSO_ECN ? -1 : 0;
    if (gso != GSO_TCPV4 && gso != GSO_TCPV6)
        return -1;
    if (!has(feat, gso == GSO_TCPV4 ? VR_NET_F_HOST_TSO4 : VR_NET_F_HOST_TSO6))
        return -1;
    if ((h->gso_type & GSO_ECN) && !has(feat, VR_NET_F_HOST_ECN))
        return -1;
    if (h->gso_size == 0 || !(h->flags & HDR_F_NEEDS_CSUM))
        return -1;
    return 0;
}

