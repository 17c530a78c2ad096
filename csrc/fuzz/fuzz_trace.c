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

int __real_vr_pop(struct vr_queue *q, struct vr_chain *c);
int __real_vr_pop_batch(struct vr_queue *q, struct vr_chain *chains, uint32_t n);

void fg_trace_reset(void)
{
    nranges = 0;
    overflowed = 0;
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
        if (nranges == FG_MAX_RANGES) {
            overflowed = 1;
            return;
        }
        const struct vr_seg *s = &c->segs[i];
        ranges[nranges++] = (struct fg_range){s->region, s->offset, s->offset + s->len};
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
