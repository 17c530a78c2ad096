/*
 * driver_blk.c: the virtio-blk request load of the built-in front-end (see
 * driver_blk.h).  Everything it does to the ring goes through driver.h.
 */
#define _GNU_SOURCE
#include "clock.h"
#include "driver_blk.h"
#include "blk_hdr.h" /* struct virtio_blk_outhdr, shared with the device side */

#include <string.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "driver_blk.c writes the little-endian virtio-blk header with native stores"
#endif

_Static_assert(VIRTIO_BLK_HDR_SIZE + 1 <= DRV_BLK_SLOT_META, "a slot's meta block holds header and status");

static uint64_t align_up(uint64_t v, uint64_t a)
{
    return (v + a - 1) & ~(a - 1);
}

/* [off, off + len) lies inside [0, limit), without 64-bit overflow. */
static int range_ok(uint64_t off, uint64_t len, uint64_t limit)
{
    return off <= limit && len <= limit - off;
}

static int ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return a < b + blen && b < a + alen;
}

struct bench {
    struct drv_queue *q;
    const struct drv_bench_params *p;
    struct drv_bench_stats *s;
    uint64_t data_stride;
    uint64_t meta_offset;  /* first slot's header, in the area */
    uint64_t blocks;       /* capacity in blocks of block_size */
    uint64_t next_block;   /* sequential mode */
    uint64_t rng;
    uint64_t submitted;
    uint64_t t_start;
};

uint64_t drv_bench_area_size(uint32_t block_size, uint32_t queue_depth)
{
    uint64_t stride = align_up(block_size, DRV_BENCH_DATA_ALIGN);
    return (uint64_t)queue_depth * (stride + DRV_BLK_SLOT_META);
}

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static int bench_check(const struct drv_queue *q, const struct drv_bench_params *p)
{
    if (p->block_size == 0 || p->block_size % 512 || p->queue_depth == 0)
        return DRV_E_ARG;
    if (p->capacity_sectors < p->block_size / 512)
        return DRV_E_ARG;
    if (p->duration_ns == 0 && p->requests == 0)
        return DRV_E_ARG;
    if (q->inflight != 0 || 3ull * p->queue_depth > q->size)
        return DRV_E_ARG;
    uint64_t len = drv_bench_area_size(p->block_size, p->queue_depth);
    if (!range_ok(p->data_offset, len, q->area_size))
        return DRV_E_RANGE;
    for (int i = 0; i < 3; i++)
        if (ranges_overlap(p->data_offset, len, q->ring_off[i], q->ring_len[i]))
            return DRV_E_RANGE;
    return DRV_OK;
}

static int may_submit(const struct bench *b, uint64_t now)
{
    if (b->p->requests && b->submitted >= b->p->requests)
        return 0;
    return !b->p->duration_ns || now - b->t_start < b->p->duration_ns;
}

static uint64_t next_sector(struct bench *b)
{
    uint64_t block;
    if (b->p->random) {
        block = splitmix64(&b->rng) % b->blocks;
    } else {
        block = b->next_block;
        b->next_block = (b->next_block + 1) % b->blocks;
    }
    return block * (b->p->block_size / 512);
}

/* Fills slot's header, resets its status byte and publishes its 3-descriptor chain. */
static void bench_submit(struct bench *b, uint32_t slot, uint64_t now)
{
    struct drv_queue *q = b->q;
    uint64_t meta = b->meta_offset + (uint64_t)slot * DRV_BLK_SLOT_META;
    uint64_t data = b->p->data_offset + (uint64_t)slot * b->data_stride;
    const struct virtio_blk_outhdr hdr = {
        .type = b->p->write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN,
        .sector = next_sector(b),
    };

    memcpy(q->area + meta, &hdr, sizeof(hdr)); /* 5.2.6 struct virtio_blk_req */
    q->area[meta + VIRTIO_BLK_HDR_SIZE] = 0xff; /* a device that never writes it counts as an error */

    const struct drv_seg segs[3] = {
        {q->gpa_base + meta, VIRTIO_BLK_HDR_SIZE, 0},
        {q->gpa_base + data, b->p->block_size, !b->p->write},
        {q->gpa_base + meta + VIRTIO_BLK_HDR_SIZE, 1, 1},
    };
    /* bench_check proved room and range: drv_add cannot fail here */
    uint16_t head = (uint16_t)drv_add(q, segs, 3);
    q->st[head].cookie = slot;
    q->st[head].stamp = now;
    b->submitted++;
}

/* Accounts for a reaped request; returns its slot. */
static uint32_t bench_complete(struct bench *b, uint16_t head, uint64_t now)
{
    struct drv_bench_stats *s = b->s;
    const struct drv_desc_state *st = &b->q->st[head]; /* intact until the head is reused */
    uint64_t meta = b->meta_offset + (uint64_t)st->cookie * DRV_BLK_SLOT_META;
    uint8_t status = __atomic_load_n(&b->q->area[meta + VIRTIO_BLK_HDR_SIZE], __ATOMIC_RELAXED);
    uint64_t lat = now - st->stamp;

    s->requests++;
    if (status == VIRTIO_BLK_S_OK)
        s->bytes += b->p->block_size;
    else
        s->errors++;
    s->hist[drv_hist_bucket(lat)]++;
    s->lat_sum_ns += lat;
    if (lat > s->lat_max_ns)
        s->lat_max_ns = lat;
    if (lat < s->lat_min_ns)
        s->lat_min_ns = lat;
    return st->cookie;
}

/* Spins up to spin_ns, then blocks on the call eventfd. 1: progress, <0: error. */
static int bench_wait(struct bench *b)
{
    struct drv_queue *q = b->q;
    uint64_t deadline = vr_clock_ns() + b->p->spin_ns;
    while (b->p->spin_ns && vr_clock_ns() < deadline)
        if (drv_used_pending(q))
            return 1;
    uint64_t stall = b->p->stall_timeout_ns ? b->p->stall_timeout_ns : 10000000000ull;
    uint64_t give_up = vr_clock_ns() + stall;
    for (;;) {
        uint64_t now = vr_clock_ns();
        if (now >= give_up)
            return DRV_E_TIMEOUT;
        int rc = drv_wait(q, (int64_t)(give_up - now));
        if (rc != 0)
            return rc;
    }
}

int drv_blk_bench(struct drv_queue *q, const struct drv_bench_params *p, struct drv_bench_stats *s)
{
    if (q->broken)
        return DRV_E_BROKEN;
    int rc = bench_check(q, p);
    if (rc)
        return rc;
    memset(s, 0, sizeof(*s));
    s->lat_min_ns = UINT64_MAX;
    struct bench b = {
        .q = q, .p = p, .s = s,
        .data_stride = align_up(p->block_size, DRV_BENCH_DATA_ALIGN),
        .blocks = p->capacity_sectors / (p->block_size / 512),
        .rng = p->seed,
    };
    b.meta_offset = p->data_offset + (uint64_t)p->queue_depth * b.data_stride;
    if (p->write)
        for (uint32_t i = 0; i < p->queue_depth; i++)
            memset(q->area + p->data_offset + i * b.data_stride, (int)(0xa5 ^ (p->seed & 0xff)),
                   p->block_size);
    uint64_t kicks0 = q->kicks, wakeups0 = q->wakeups, t_last;
    b.t_start = t_last = vr_clock_ns();

    for (uint32_t i = 0; i < p->queue_depth && may_submit(&b, b.t_start); i++)
        bench_submit(&b, i, vr_clock_ns());
    rc = drv_kick(q);

    struct drv_used_elem done[64];
    while (rc >= 0 && q->inflight > 0) {
        int n = drv_reap(q, done, 64);
        if (n < 0) {
            rc = n;
            break;
        }
        if (n == 0) {
            rc = bench_wait(&b);
            continue;
        }
        uint64_t now = t_last = vr_clock_ns();
        /* Account for the whole batch before resubmitting: a new chain may
         * reuse a freed head whose cookie and stamp are still unread. */
        for (int i = 0; i < n; i++)
            done[i].id = bench_complete(&b, (uint16_t)done[i].id, now);
        for (int i = 0; i < n && may_submit(&b, now); i++)
            bench_submit(&b, done[i].id, now);
        rc = drv_kick(q);
    }
    s->elapsed_ns = t_last - b.t_start;
    s->kicks = q->kicks - kicks0;
    s->wakeups = q->wakeups - wakeups0;
    if (s->requests == 0)
        s->lat_min_ns = 0;
    return rc < 0 ? rc : DRV_OK;
}
