/*
 * net_mac.c - the switch's MAC table: learning, ageing, lookup (a probed
 * hash table under one lock; see net.h for the theory of operation).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "capture.h"
#include "net.h"
#include "net_switch.h"
#include "net_filter.h"
#include "net_offload.h"

/* ---- MAC table ---- */

/* The table's key of a MAC: its 6 bytes (in memory order) | 1 << 48. */
static inline uint64_t mac_key(const uint8_t *m)
{
    uint32_t lo;
    uint16_t hi;
    memcpy(&lo, m, 4);
    memcpy(&hi, m + 4, 2);
    return (uint64_t)lo | (uint64_t)hi << 32 | 1ull << 48;
}

static inline uint32_t mac_hash(uint64_t k)
{
    k *= 0x9E3779B97F4A7C15ull;
    return (uint32_t)(k >> 40) & (MAC_BUCKETS - 1);
}

static void bump_gen(struct vr_net_switch *sw)
{
    __atomic_store_n(&sw->mac_gen, sw->mac_gen + 1, __ATOMIC_RELEASE);
}

/* The port of `key`, -1 if unknown or aged; *seen its last sighting. */
static int lookup_locked(struct vr_net_switch *sw, uint64_t key, uint64_t now, uint64_t *seen)
{
    uint32_t h = mac_hash(key);
    for (int i = 0; i < MAC_PROBE; i++) {
        struct mac_entry *e = &sw->macs[(h + i) & (MAC_BUCKETS - 1)];
        if (e->key == key) {
            if (seen)
                *seen = e->seen;
            return now - e->seen < sw->ageing_ns ? e->port : -1;
        }
    }
    return -1;
}

static void learn_locked(struct vr_net_switch *sw, uint64_t key, int port, uint64_t now)
{
    uint32_t h = mac_hash(key);
    struct mac_entry *victim = NULL;
    for (int i = 0; i < MAC_PROBE; i++) {
        struct mac_entry *e = &sw->macs[(h + i) & (MAC_BUCKETS - 1)];
        if (e->key == key) {
            if (e->port != port)
                bump_gen(sw);
            e->port = port;
            e->seen = now;
            return;
        }
        if (!victim || e->key == 0 || (victim->key != 0 && e->seen < victim->seen))
            if (!victim || victim->key != 0)
                victim = e;
    }
    bump_gen(sw);   /* a new entry, maybe in place of another */
    victim->key = key;
    victim->port = port;
    victim->seen = now;
}

/* Learn src, look up dst; -1 = flood.  A stream of frames between the same
 * two MACs takes the lock once per ageing/16 (or table change): the cached
 * answer is what the table would say, as no entry changed port, left or
 * came since (mac_gen), src was refreshed within ageing/16, and dst does
 * not age out before `until`. */
int net_switch_lookup(struct vr_net_tx *t, const uint8_t *eth)
{
    struct vr_net_switch *sw = t->sw;
    uint64_t now = t->now;
    int dst = -1;
    uint64_t skey = mac_key(eth + 6), dkey = mac_key(eth);
    int learn = !(eth[6] & 1) && skey != 1ull << 48;
    int unicast = !(eth[0] & 1);
    if (!learn && !unicast)
        return -1;
    int cacheable = learn && unicast;
    if (cacheable && t->mc.src == skey && t->mc.dst == dkey && now < t->mc.until &&
        t->mc.gen == __atomic_load_n(&sw->mac_gen, __ATOMIC_ACQUIRE))
        return t->mc.port;
    uint64_t seen = 0;
    pthread_mutex_lock(&sw->mac_lock);
    if (learn)
        learn_locked(sw, skey, t->port, now);
    if (unicast)
        dst = lookup_locked(sw, dkey, now, &seen);
    uint64_t gen = sw->mac_gen;
    pthread_mutex_unlock(&sw->mac_lock);
    if (cacheable) {
        uint64_t until = now + sw->ageing_ns / 16;
        if (dst >= 0 && seen + sw->ageing_ns < until)
            until = seen + sw->ageing_ns;
        t->mc.src = skey;
        t->mc.dst = dkey;
        t->mc.gen = gen;
        t->mc.until = until;
        t->mc.port = dst;
    }
    return dst;
}

int vr_net_mac_lookup(struct vr_net_switch *sw, const uint8_t *mac)
{
    pthread_mutex_lock(&sw->mac_lock);
    int port = lookup_locked(sw, mac_key(mac), vr_clock_ns(), NULL);
    pthread_mutex_unlock(&sw->mac_lock);
    return port;
}

void vr_net_port_forget(struct vr_net_switch *sw, int port)
{
    pthread_mutex_lock(&sw->mac_lock);
    for (int i = 0; i < MAC_BUCKETS; i++)
        if (sw->macs[i].key && sw->macs[i].port == port)
            sw->macs[i].key = 0;
    bump_gen(sw);
    pthread_mutex_unlock(&sw->mac_lock);
}
