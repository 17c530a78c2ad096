/*
 * fuzz_ring.c - libFuzzer harness for the ring walkers (vring.c, packed.c,
 * memory.c, inflight.c, inflight_packed.c, dirtylog.c): direct and indirect chains, event idx,
 * inflight recovery from a region the (hostile) front-end filled, and the
 * dirty log's chain walk at push (a log of any size, any used-ring address).
 *
 * Checks, beyond AddressSanitizer/UBSan:
 *   - every segment a pop returns lies inside its region, readable first;
 *   - a broken queue stays broken and pops nothing more;
 *   - the device writes no guest byte outside the used ring (packed: the
 *     descriptor ring and the device event area; this harness
 *     never writes into buffers itself).
 */
#include "fuzz_guest.h"

#define MAX_POPPED 512

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fg_reader r = {data, size, 0};
    struct fg_guest g;
    struct vr_queue q;
    struct vr_seg segs[VR_MAX_SEGS];
    struct vr_chain chains[8];
    struct vr_seg bsegs[8][64];
    uint16_t popped[MAX_POPPED];
    uint32_t npopped = 0, num = 0;
    struct fg_snapshot snap;
    void *inflight = NULL;
    uint8_t *logbits = NULL;
    struct vr_log lg = {.call_fd = -1};

    fg_guest_init(&g);
    int with_inflight = fg_u8(&r) % 4 == 0;
    if (with_inflight) {
        /* room for the packed layout, the larger (split takes a prefix) */
        uint64_t isize = sizeof(struct vr_pk_inflight_region)
                         + FG_MAX_NUM * sizeof(struct vr_pk_inflight_desc);
        inflight = calloc(1, isize);
        if (!inflight)
            abort();
        if (fg_u8(&r) & 1) /* left over from before a crash, as the front-end claims */
            fg_take(&r, inflight, isize);
    }
    int started = fg_ring(&g, &r, &q, 0, &num, inflight) == 0;
    if (!started)
        goto out;

    fg_snapshot_take(&g, &snap);

    for (int step = 0; step < 64 && r.pos < r.size; step++) {
        int was_broken = vr_queue_broken(&q);
        switch (fg_u8(&r) % 8) {
        case 0:
        case 1: {
            struct vr_chain c = {.cap = (fg_u8(&r) & 1) ? VR_MAX_SEGS : 1u + fg_u8(&r) % 8, .segs = segs};
            int rc = vr_pop(&q, &c);
            if (rc == 1) {
                if (was_broken)
                    __builtin_trap();
                fg_check_chain(&g, &c);
                if (c.head >= num)
                    __builtin_trap();
                if (npopped < MAX_POPPED)
                    popped[npopped++] = c.head;
            }
            break;
        }
        case 2: {
            uint32_t n = 1 + fg_u8(&r) % 8;
            for (uint32_t i = 0; i < n; i++)
                chains[i] = (struct vr_chain){.cap = 64, .segs = bsegs[i]};
            int got = vr_pop_batch(&q, chains, n);
            if (got > 0 && was_broken)
                __builtin_trap();
            for (int i = 0; i < got; i++) {
                fg_check_chain(&g, &chains[i]);
                if (npopped < MAX_POPPED)
                    popped[npopped++] = chains[i].head;
            }
            break;
        }
        case 3: { /* complete some popped chains, in any order, any length */
            uint32_t n = npopped ? 1 + fg_u8(&r) % npopped : 0;
            uint16_t heads[MAX_POPPED];
            uint32_t lens[MAX_POPPED];
            for (uint32_t i = 0; i < n; i++) {
                uint32_t k = fg_u8(&r) % npopped;
                heads[i] = popped[k];
                popped[k] = popped[--npopped];
                lens[i] = fg_u32(&r);
                if (!npopped) {
                    n = i + 1;
                    break;
                }
            }
            if (n)
                vr_push_batch(&q, heads, lens, n);
            break;
        }
        case 4:
            vr_push(&q, fg_u16(&r), fg_u32(&r)); /* a head never popped: caller misuse */
            break;
        case 5: {
            uint32_t n = fg_u8(&r) % 4;
            if (vr_unpop_n(&q, n) == VR_OK)
                npopped = npopped > n ? npopped - n : 0;
            break;
        }
        case 6: {
            uint8_t how = fg_u8(&r);
            if (how & 1) {
                if (vr_should_notify(&q))
                    vr_notify(&q);
            } else if (how & 2) {
                /* Migration starts (or its log is replaced): a bitmap of a
                 * fuzzed size, often smaller than guest memory, and the
                 * used ring logged at a fuzzed guest address. */
                free(logbits);
                lg.size = 1 + fg_u8(&r) % 64;
                lg.base = logbits = malloc(lg.size);
                if (!logbits)
                    abort();
                memset(logbits, 0, lg.size);
                vr_queue_set_log(&q, &lg);
                vr_queue_set_log_used(&q, how & 4, (how & 8) ? fg_u64(&r) : FG_USED);
            } else if ((how & 16) && !was_broken) {
                /* The back-end dies and a new one starts on what the
                 * front-end kept: the rings and the inflight region.  A
                 * dead back-end's chains exist only as resubmissions. */
                vr_queue_stop(&q);
                if (inflight)
                    npopped = 0;
                if (vr_queue_start(&q, &g.mem) != VR_OK)
                    goto check;
            } else {
                vr_queue_set_log(&q, NULL);
            }
            break;
        }
        default:
            if (fg_u8(&r) & 1)
                vr_disable_notify(&q);
            else
                vr_enable_notify(&q);
            (void)vr_avail_pending(&q);
            {   /* the read-only hints: never a write, never out of bounds */
                uint32_t ahead = fg_u8(&r);
                uint32_t bytes = fg_u16(&r);
                vr_prefetch_avail(&q, ahead, ahead & 1, bytes);
                vr_prefetch_next(&q, bytes);
            }
            break;
        }
        if (was_broken && !vr_queue_broken(&q))
            __builtin_trap();
    }

check:
    /* Only the used ring (flags, idx, ring, avail_event) may have changed. */
    {
        uint64_t used[2][2];
        uint32_t nused = fg_ring_writes(&q, 0, used);
        fg_snapshot_check(&g, &snap, 0, (const uint64_t (*)[2])used, nused);
        fg_snapshot_check(&g, &snap, 1, (const uint64_t (*)[2])used, 0);
    }
out:
    vr_queue_fini(&q);
    free(inflight);
    free(logbits);
    fg_guest_free(&g);
    return 0;
}
