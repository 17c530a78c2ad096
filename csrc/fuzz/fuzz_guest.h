/*
 * fuzz_guest.h - what every native libFuzzer harness shares: a byte reader
 * over the input, a guest memory of two regions with a hole between them,
 * and a split or packed ring laid out from fuzzer bytes.
 *
 * The regions are malloc'ed, not mmap'ed, so AddressSanitizer puts redzones
 * around them: any read or write the C under test makes outside guest
 * memory (including a preadv/readv the kernel would fill) is a report.
 *
 * Guest-physical layout (the same as the Python `ring` target's):
 *   region 0  [0x00000, 0x10000): desc 0x0, avail 0x1000, used 0x2000,
 *                                 indirect tables 0x3000, data 0x4000..
 *   hole      [0x10000, 0x20000)
 *   region 1  [0x20000, 0x30000): more data
 * Front-end virtual addresses are the GPA plus UADDR_BASE, so a ring
 * address given as a GPA by mistake is caught.
 */
#ifndef VR_FUZZ_GUEST_H
#define VR_FUZZ_GUEST_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../vring.h"

#define FG_DESC 0x0000u
#define FG_AVAIL 0x1000u
#define FG_USED 0x2000u
#define FG_INDIRECT 0x3000u
#define FG_DATA 0x4000u
#define FG_DATA_END 0x10000u
#define FG_OTHER 0x20000u
#define FG_OTHER_END 0x30000u
#define FG_UADDR_BASE 0x7f0000000000ull
#define FG_MAX_NUM 256u

/* Reads past the end give zeros: every input is a valid input. */
struct fg_reader {
    const uint8_t *data;
    size_t size, pos;
};

static inline uint64_t fg_uint(struct fg_reader *r, unsigned n)
{
    uint64_t v = 0;
    for (unsigned i = 0; i < n; i++) {
        uint64_t b = r->pos < r->size ? r->data[r->pos] : 0;
        if (r->pos < r->size)
            r->pos++;
        v |= b << (8 * i);
    }
    return v;
}
static inline uint8_t fg_u8(struct fg_reader *r) { return (uint8_t)fg_uint(r, 1); }
static inline uint16_t fg_u16(struct fg_reader *r) { return (uint16_t)fg_uint(r, 2); }
static inline uint32_t fg_u32(struct fg_reader *r) { return (uint32_t)fg_uint(r, 4); }
static inline uint64_t fg_u64(struct fg_reader *r) { return fg_uint(r, 8); }

/* Up to n bytes straight from the input (fewer when it runs out). */
static inline size_t fg_take(struct fg_reader *r, void *dst, size_t n)
{
    size_t left = r->size - r->pos;
    if (n > left)
        n = left;
    memcpy(dst, r->data + r->pos, n);
    r->pos += n;
    return n;
}

struct fg_guest {
    struct vr_mem mem;
    uint8_t *ram[2];
};

/* The regions are allocated once per process and zeroed for every input. */
static inline void fg_guest_init(struct fg_guest *g)
{
    static const uint64_t base[2] = {0, FG_OTHER};
    static const uint64_t size[2] = {FG_DATA_END, FG_OTHER_END - FG_OTHER};
    static uint8_t *ram[2];
    memset(&g->mem, 0, sizeof(g->mem));
    g->mem.nregions = 2;
    for (int i = 0; i < 2; i++) {
        if (!ram[i] && !(ram[i] = malloc(size[i])))
            abort();
        memset(ram[i], 0, size[i]);
        g->ram[i] = ram[i];
        g->mem.regions[i] = (struct vr_region){base[i], size[i], base[i] + FG_UADDR_BASE, ram[i]};
    }
}

static inline void fg_guest_free(struct fg_guest *g) { (void)g; }

/* A copy of both regions, to see afterwards which bytes the device wrote. */
struct fg_snapshot {
    uint8_t *ram[2];
};

static inline void fg_snapshot_take(const struct fg_guest *g, struct fg_snapshot *s)
{
    static uint8_t *copy[2];
    for (int i = 0; i < 2; i++) {
        if (!copy[i] && !(copy[i] = malloc(g->mem.regions[i].size)))
            abort();
        memcpy(copy[i], g->ram[i], g->mem.regions[i].size);
        s->ram[i] = copy[i];
    }
}

/* Trap unless every changed byte of region `i` lies in one of the n
 * [start, end) offset ranges (sorted or not). */
static inline void fg_snapshot_check(const struct fg_guest *g, const struct fg_snapshot *s, int i,
                                     const uint64_t (*allowed)[2], uint32_t n)
{
    const uint8_t *a = s->ram[i], *b = g->ram[i];
    uint64_t size = g->mem.regions[i].size, pos = 0;
    while (pos < size) {
        /* find the next differing byte quickly */
        uint64_t chunk = size - pos > 4096 ? 4096 : size - pos;
        if (memcmp(a + pos, b + pos, chunk) == 0) {
            pos += chunk;
            continue;
        }
        for (uint64_t k = pos; k < pos + chunk; k++) {
            if (a[k] == b[k])
                continue;
            int ok = 0;
            for (uint32_t j = 0; j < n && !ok; j++)
                ok = k >= allowed[j][0] && k < allowed[j][1];
            if (!ok)
                __builtin_trap();
        }
        pos += chunk;
    }
}

/* Host pointer of [gpa, gpa+len) inside one region, or NULL. */
static inline uint8_t *fg_at(struct fg_guest *g, uint64_t gpa, uint64_t len)
{
    for (uint32_t i = 0; i < g->mem.nregions; i++) {
        const struct vr_region *rg = &g->mem.regions[i];
        if (gpa >= rg->gpa && len <= rg->size && gpa - rg->gpa <= rg->size - len)
            return rg->host + (gpa - rg->gpa);
    }
    return NULL;
}

static inline void fg_put(struct fg_guest *g, uint64_t gpa, const void *src, size_t len)
{
    uint8_t *p = fg_at(g, gpa, len);
    if (p)
        memcpy(p, src, len);
}

/* One descriptor: mostly inside memory and well linked, sometimes hostile. */
static inline void fg_desc(struct fg_reader *r, uint32_t num, uint8_t out[16])
{
    static const uint64_t edges[] = {0xFFF8, 0x10000, 0x1FFF8, 0x2FFF8, 0x30000,
                                     1ull << 40, ~0ull - 7};
    uint64_t addr;
    uint32_t len;
    uint16_t flags, next;
    uint8_t mode = fg_u8(r) % 8;
    if (mode <= 2)
        addr = FG_DATA + fg_u16(r) % (FG_DATA_END - FG_DATA);
    else if (mode <= 4)
        addr = FG_OTHER + fg_u16(r) % (FG_OTHER_END - FG_OTHER);
    else if (mode == 5)
        addr = edges[fg_u8(r) % (sizeof(edges) / sizeof(edges[0]))];
    else if (mode == 6)
        addr = FG_INDIRECT + 16u * (fg_u8(r) % 64);
    else
        addr = fg_u64(r);
    len = fg_u8(r) % 8 ? fg_u16(r) % 0x2000 : fg_u32(r);
    flags = fg_u8(r) % 8 ? fg_u8(r) % 8 : fg_u16(r);
    next = fg_u8(r) % 8 ? (uint16_t)(fg_u16(r) % (num + 2)) : fg_u16(r);
    memcpy(out, &addr, 8);
    memcpy(out + 8, &len, 4);
    memcpy(out + 12, &flags, 2);
    memcpy(out + 14, &next, 2);
}

/*
 * A packed ring (virtio 1.2, 2.8) in the same places: descriptors at
 * FG_DESC, the driver event area at FG_AVAIL, the device's at FG_USED.
 * Each descriptor is fg_desc's bytes with id and flags in packed places and
 * its AVAIL/USED bits mostly saying "available" for the wrap counter its
 * slot has from the start position on.  Any size 1..256.
 */
static inline int fg_packed_at(struct fg_guest *g, struct fg_reader *r, struct vr_queue *q,
                               uint32_t index, uint32_t *num_out, uint64_t at, int event_idx,
                               void *inflight)
{
    uint32_t num = 1 + fg_u8(r) % FG_MAX_NUM;
    uint16_t start = fg_u16(r) % num, used = fg_u8(r) % 8 ? start : fg_u16(r);
    uint8_t wrap = fg_u8(r) & 1;
    uint8_t d[16];

    for (uint32_t i = 0; i < num + 64; i++) {
        fg_desc(r, num, d);
        uint16_t id, flags;
        memcpy(&flags, d + 12, 2);
        memcpy(&id, d + 14, 2);
        flags &= 7; /* NEXT, WRITE, INDIRECT */
        uint8_t sel = fg_u8(r) % 4;
        uint8_t w = i < num ? (i >= start ? wrap : !wrap) : (uint8_t)(sel & 1);
        if (sel <= 1)
            flags |= w ? VR_PDESC_F_AVAIL : VR_PDESC_F_USED;    /* available */
        else if (sel == 2)
            flags |= w ? 0 : VR_PDESC_F_AVAIL | VR_PDESC_F_USED; /* used */
        else
            flags |= fg_u16(r) & (VR_PDESC_F_AVAIL | VR_PDESC_F_USED);
        memcpy(d + 12, &id, 2);
        memcpy(d + 14, &flags, 2);
        if (i < num)
            fg_put(g, at + FG_DESC + 16u * i, d, 16);
        else /* the indirect tables hold packed descriptors too */
            fg_put(g, at + FG_INDIRECT + 16u * (i - num), d, 16);
    }
    uint16_t ev[2] = {fg_u16(r), (uint16_t)(fg_u8(r) % 4)}; /* off_wrap, flags */
    fg_put(g, at + FG_AVAIL, ev, 4);
    ev[0] = ev[1] = 0;
    fg_put(g, at + FG_USED, ev, 4);

    vr_queue_init(q, index);
    uint32_t base = start | (uint32_t)wrap << 15 | (uint32_t)used << 16 | (uint32_t)(fg_u8(r) & 1) << 31;
    if (vr_queue_set_packed(q, 1) || vr_queue_set_num(q, num) || vr_queue_set_base(q, base))
        return -1;
    vr_queue_set_addr(q, at + FG_DESC + FG_UADDR_BASE, at + FG_AVAIL + FG_UADDR_BASE,
                      at + FG_USED + FG_UADDR_BASE, 0);
    vr_queue_set_event_idx(q, event_idx);
    if (inflight) { /* the packed layout (inflight_packed.c), sometimes too small */
        uint64_t isize = sizeof(struct vr_pk_inflight_region)
                         + (uint64_t)num * sizeof(struct vr_pk_inflight_desc);
        if (fg_u8(r) % 8 == 0)
            isize -= 1 + fg_u8(r) % 32;
        vr_queue_set_inflight(q, inflight, isize);
    }
    *num_out = num;
    return vr_queue_start(q, &g->mem) == VR_OK ? 0 : -1;
}

/* The guest ranges [start, end) a device may write besides its buffers:
 * the used ring (split), or the descriptor ring and the device event area
 * (packed).  Fills out[0..1]; returns the count. */
static inline uint32_t fg_ring_writes(const struct vr_queue *q, uint64_t at, uint64_t out[][2])
{
    if (!q->packed) {
        out[0][0] = at + FG_USED;
        out[0][1] = at + FG_USED + vr_used_size(q->num);
        return 1;
    }
    out[0][0] = at + FG_DESC;
    out[0][1] = at + FG_DESC + vr_desc_size(q->num);
    out[1][0] = at + FG_USED;
    out[1][1] = at + FG_USED + VR_EVENT_AREA_SIZE;
    return 2;
}

/*
 * Lay out a split ring at the fixed addresses and start `q` on it; one
 * value of the event-idx byte (1 in 16) makes it a packed ring instead.
 * Returns 0 when the queue started (it may still break on first use).
 * `inflight`, if not NULL, is a region of at least FG_MAX_NUM descriptors
 * (of either layout) the front-end filled; the size given to the queue is
 * sometimes too small.
 */
static inline int fg_ring_at(struct fg_guest *g, struct fg_reader *r, struct vr_queue *q,
                             uint32_t index, uint32_t *num_out, void *inflight, uint64_t at)
{
    uint8_t d[16];
    uint32_t num = 1u << (fg_u8(r) % 9); /* 1..256 */
    uint8_t eb = fg_u8(r);
    int event_idx = eb & 1;
    uint16_t base, avail_idx, v;
    uint32_t ahead;

    /* (the choice takes no byte of its own, so older inputs still replay
     * as the split rings they were found on) */
    if ((eb & 0xF0) == 0xA0)
        return fg_packed_at(g, r, q, index, num_out, at, event_idx, inflight);

    for (uint32_t i = 0; i < num; i++) {
        fg_desc(r, num, d);
        fg_put(g, at + FG_DESC + 16u * i, d, 16);
    }
    for (uint32_t i = 0, n = fg_u8(r) % 64; i < n; i++) {
        fg_desc(r, 16, d);
        fg_put(g, at + FG_INDIRECT + 16u * i, d, 16);
    }
    base = fg_u16(r);
    ahead = fg_u8(r) % 8 ? fg_u8(r) % (num + 3) : fg_u16(r);
    avail_idx = (uint16_t)(base + ahead);
    v = fg_u8(r) & 1;
    fg_put(g, at + FG_AVAIL, &v, 2);
    fg_put(g, at + FG_AVAIL + 2, &avail_idx, 2);
    for (uint32_t i = 0; i < num; i++) {
        v = (uint16_t)(fg_u16(r) % (num + 2));
        fg_put(g, at + FG_AVAIL + 4 + 2u * i, &v, 2);
    }
    v = fg_u16(r);
    fg_put(g, at + FG_AVAIL + 4 + 2u * num, &v, 2); /* used_event */
    v = 0;
    fg_put(g, at + FG_USED, &v, 2);
    fg_put(g, at + FG_USED + 2, &base, 2);

    vr_queue_init(q, index);
    if (vr_queue_set_num(q, num) || vr_queue_set_base(q, base))
        return -1;
    vr_queue_set_addr(q, at + FG_DESC + FG_UADDR_BASE, at + FG_AVAIL + FG_UADDR_BASE,
                      at + FG_USED + FG_UADDR_BASE, 0);
    vr_queue_set_event_idx(q, event_idx);
    if (inflight) {
        uint64_t isize = sizeof(struct vr_inflight_region) + (uint64_t)num * sizeof(struct vr_inflight_desc);
        if (fg_u8(r) % 8 == 0)
            isize -= 1 + fg_u8(r) % 16; /* too small: must be refused */
        vr_queue_set_inflight(q, inflight, isize);
    }
    *num_out = num;
    return vr_queue_start(q, &g->mem) == VR_OK ? 0 : -1;
}

/* Every segment of a popped chain lies inside its region. */
static inline void fg_check_chain(const struct fg_guest *g, const struct vr_chain *c)
{
    uint64_t rd = 0, wr = 0;
    if (c->nread > c->nseg || c->nseg > c->cap)
        __builtin_trap();
    for (uint32_t i = 0; i < c->nseg; i++) {
        const struct vr_seg *s = &c->segs[i];
        if (s->region >= g->mem.nregions || s->len == 0 ||
            s->offset > g->mem.regions[s->region].size ||
            s->len > g->mem.regions[s->region].size - s->offset)
            __builtin_trap();
        if ((i >= c->nread) != !!s->writable)
            __builtin_trap();
        if (s->writable)
            wr += s->len;
        else
            rd += s->len;
    }
    if (rd != c->read_len || wr != c->write_len)
        __builtin_trap();
}


/* A second ring in region 1, for harnesses with two queues (net rx). */
#define FG_RING2 (FG_OTHER + 0x8000u)

static inline int fg_ring(struct fg_guest *g, struct fg_reader *r, struct vr_queue *q,
                          uint32_t index, uint32_t *num_out, void *inflight)
{
    return fg_ring_at(g, r, q, index, num_out, inflight, 0);
}

/*
 * Write tracing for the engine harnesses (fuzz_trace.c, linked with
 * -Wl,--wrap=vr_pop,--wrap=vr_pop_batch): every writable segment of every
 * chain an engine pops is recorded, so the harness can check afterwards
 * that the engine wrote guest memory only there and in the used rings.
 */
struct fg_range {
    uint16_t region;
    uint64_t start, end;
};
void fg_trace_reset(void);
uint32_t fg_trace_ranges(const struct fg_range **out);

/* Trap unless each changed byte is in a traced writable segment or in one
 * of the used rings given as GPAs [start, end). */
static inline void fg_check_writes(const struct fg_guest *g, const struct fg_snapshot *s,
                                   const uint64_t (*used)[2], uint32_t nused)
{
    const struct fg_range *rg;
    uint32_t n = fg_trace_ranges(&rg);
    for (int i = 0; i < 2; i++) {
        const uint8_t *a = s->ram[i], *b = g->ram[i];
        uint64_t size = g->mem.regions[i].size, gpa0 = g->mem.regions[i].gpa;
        for (uint64_t pos = 0; pos < size; pos += 4096) {
            uint64_t chunk = size - pos > 4096 ? 4096 : size - pos;
            if (memcmp(a + pos, b + pos, chunk) == 0)
                continue;
            for (uint64_t k = pos; k < pos + chunk; k++) {
                int ok = a[k] == b[k];
                for (uint32_t j = 0; j < nused && !ok; j++)
                    ok = gpa0 + k >= used[j][0] && gpa0 + k < used[j][1];
                for (uint32_t j = 0; j < n && !ok; j++)
                    ok = rg[j].region == i && k >= rg[j].start && k < rg[j].end;
                if (!ok)
                    __builtin_trap();
            }
        }
    }
}

#endif
