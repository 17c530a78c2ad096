/*
 * fuzz_trace.c - records the writable segments of every chain an engine
 * pops (see fg_check_writes in fuzz_guest.h).  Linked with
 * -Wl,--wrap=vr_pop,--wrap=vr_pop_batch, so the engine's own calls come
 * here first; the walker itself is untouched.
 */
#include "fuzz_guest.h"

#define FG_MAX_RANGES 65536u

static struct fg_range ranges[FG_MAX_RANGES];
static uint32_t nranges;
static int overflowed;

/* Each distinct range is kept once (an engine that pops, unpops and pops
 * the same chain again records nothing new), through an open-addressing
 * set cleared in O(1) by bumping its generation. */
#define FG_SEEN (2u * FG_MAX_RANGES)
static struct {
    uint32_t gen, idx;
} seen[FG_SEEN];
static uint32_t gen = 1;

int __real_vr_pop(struct vr_queue *q, struct vr_chain *c);
int __real_vr_pop_batch(struct vr_queue *q, struct vr_chain *chains, uint32_t n);

void fg_trace_reset(void)
{
    nranges = 0;
    overflowed = 0;
    if (++gen == 0) {
        memset(seen, 0, sizeof(seen));
        gen = 1;
    }
}

uint32_t fg_trace_ranges(const struct fg_range **out)
{
    *out = ranges;
    if (overflowed)
        __builtin_trap(); /* the harness must keep inputs within the budget */
    return nranges;
}

static void record(const struct vr_chain *c)
{
    for (uint32_t i = c->nread; i < c->nseg; i++) {
        const struct vr_seg *s = &c->segs[i];
        struct fg_range rg = {s->region, s->offset, s->offset + s->len};
        uint64_t h = (rg.start * 0x9E3779B97F4A7C15ull) ^ (rg.end * 0xC2B2AE3D27D4EB4Full) ^ rg.region;
        uint32_t k = (uint32_t)(h >> 32) & (FG_SEEN - 1);
        int dup = 0;
        for (; seen[k].gen == gen; k = (k + 1) & (FG_SEEN - 1)) {
            const struct fg_range *o = &ranges[seen[k].idx];
            if (o->region == rg.region && o->start == rg.start && o->end == rg.end) {
                dup = 1;
                break;
            }
        }
        if (dup)
            continue;
        if (nranges == FG_MAX_RANGES) {
            overflowed = 1;
            return;
        }
        seen[k].gen = gen;
        seen[k].idx = nranges;
        ranges[nranges++] = rg;
    }
}

int __wrap_vr_pop(struct vr_queue *q, struct vr_chain *c)
{
    int rc = __real_vr_pop(q, c);
    if (rc == 1)
        record(c);
    return rc;
}

int __wrap_vr_pop_batch(struct vr_queue *q, struct vr_chain *chains, uint32_t n)
{
    int rc = __real_vr_pop_batch(q, chains, n);
    for (int i = 0; i < rc; i++)
        record(&chains[i]);
    return rc;
}
