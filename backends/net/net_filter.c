/*
 * net_filter.c - receive filter, MTU check and flow hash of the switch
 * (see net_filter.h).
 */
#include <string.h>

#include "net_filter.h"

void vr_net_filter_init(struct vr_net_filter *fl)
{
    memset(fl, 0, sizeof(*fl));
    pthread_mutex_init(&fl->lock, NULL);
}

int vr_net_filter_set(struct vr_net_filter *fl, uint32_t flags, const uint8_t *own_mac,
                      const uint8_t *macs, uint32_t n_uni, uint32_t n_multi)
{
    if (n_uni > VR_NET_MAX_MACS || n_multi > VR_NET_MAX_MACS - n_uni)
        return -VR_E_INVAL;
    pthread_mutex_lock(&fl->lock);
    memcpy(fl->own_mac, own_mac, 6);
    if (n_uni + n_multi)
        memcpy(fl->macs, macs, 6 * (size_t)(n_uni + n_multi));
    fl->n_uni = n_uni;
    fl->n_multi = n_multi;
    __atomic_store_n(&fl->flags, flags, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&fl->lock);
    return 0;
}

/* 5.1.6.5.1 (and QEMU's receive_filter): does port p take a frame for `eth`? */
int vr_net_filter_accepts(struct vr_net_filter *fl, const uint8_t *eth)
{
    static const uint8_t bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    uint32_t f = __atomic_load_n(&fl->flags, __ATOMIC_ACQUIRE);
    if (!(f & VR_NET_RX_FILTER) || (f & VR_NET_RX_PROMISC))
        return 1;
    if (memcmp(eth, bcast, 6) == 0)
        return !(f & VR_NET_RX_NOBCAST);
    int multi = eth[0] & 1;
    if (f & (multi ? VR_NET_RX_NOMULTI : VR_NET_RX_NOUNI))
        return 0;
    if (f & (multi ? VR_NET_RX_ALLMULTI : VR_NET_RX_ALLUNI))
        return 1;
    pthread_mutex_lock(&fl->lock);
    int ok = !multi && memcmp(eth, fl->own_mac, 6) == 0;
    uint32_t from = multi ? fl->n_uni : 0;
    uint32_t to = multi ? fl->n_uni + fl->n_multi : fl->n_uni;
    for (uint32_t i = from; !ok && i < to && i < VR_NET_MAX_MACS; i++)
        ok = memcmp(eth, fl->macs[i], 6) == 0;
    pthread_mutex_unlock(&fl->lock);
    return ok;
}

/* 5.1.4: with an MTU set, a frame may carry at most mtu bytes after its
 * Ethernet header (and one 802.1Q tag). */
int vr_net_over_mtu(uint32_t mtu, const uint8_t *f, uint32_t len)
{
    if (mtu == 0)
        return 0;
    uint32_t l2 = ETH_HLEN;
    if (len >= ETH_HLEN + 4 && f[12] == 0x81 && f[13] == 0x00)
        l2 += 4;
    return len > mtu + l2;
}

/* A hash of the IPv4/IPv6 addresses and TCP/UDP ports (0 for other frames),
 * so frames from a TAP port spread over a guest's rx queues by flow. */
uint32_t vr_net_flow_hash(const uint8_t *f, uint32_t len)
{
    uint32_t off = ETH_HLEN, l4 = 0;
    uint16_t type = (uint16_t)(f[12] << 8 | f[13]);
    uint64_t h = 0;
    uint8_t proto = 0;
    if (type == 0x8100 && len >= ETH_HLEN + 4) {
        type = (uint16_t)(f[16] << 8 | f[17]);
        off += 4;
    }
    if (type == 0x0800 && len >= off + 20) {
        proto = f[off + 9];
        for (int i = 12; i < 20; i++)
            h = h * 131 + f[off + i];
        int frag = (f[off + 6] & 0x3f) | f[off + 7];
        l4 = frag ? 0 : off + (uint32_t)(f[off] & 15) * 4;
    } else if (type == 0x86dd && len >= off + 40) {
        proto = f[off + 6];
        for (int i = 8; i < 40; i++)
            h = h * 131 + f[off + i];
        l4 = off + 40;
    } else {
        return 0;
    }
    if ((proto == 6 || proto == 17) && l4 && l4 + 4 <= len)
        for (uint32_t i = l4; i < l4 + 4; i++)
            h = h * 131 + f[i];
    h *= 0x9E3779B97F4A7C15ull;
    return (uint32_t)(h >> 32);
}

