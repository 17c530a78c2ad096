/*
 * run.c - the per-queue worker loop.
 *
 * vr_run() sleeps in poll() on the control eventfd and the kick eventfd.
 * On a kick it drains the eventfd and runs the handler with guest
 * notifications disabled, notifies the driver once per batch (as the
 * suppression rules allow), re-enables notifications and re-checks the
 * avail ring, which closes the race with a driver that added buffers
 * while notifications were off (virtio 1.2, 2.7.10).  It returns as soon
 * as the control fd is readable (Python then pauses, swaps memory or
 * stops the queue) or the queue breaks.  The handler always finishes the
 * chains it popped before returning, so nothing is in flight when vr_run
 * returns.  Callers release the GIL around this call (cffi does).
 *
 * A handler that returns VR_HANDLER_IDLE has nothing to put in the ring
 * and promises that whoever gives it work later wakes the worker through
 * the control fd: kicks then stay off.  An rx queue whose buffers another
 * thread fills (vsock's host thread) would otherwise be woken by every
 * buffer the driver posts, only to find nothing to send.
 *
 * With poll_us (--poll-us), a worker whose ring ran empty watches the
 * avail index for that long with kicks still off before it arms them and
 * sleeps: a driver that submits again within the window neither kicks nor
 * waits for a wake-up, at the cost of a CPU spinning meanwhile.
 */
#include <errno.h>
#include <poll.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "vring.h"

static void drain(int fd)
{
    uint64_t v;
    ssize_t r;
    do {
        r = read(fd, &v, sizeof(v));
    } while (r < 0 && errno == EINTR);
}

/* Run the handler until the ring is empty or the handler stops making
 * progress (e.g. an RX queue keeping buffers for later).  `arm` 0 leaves
 * kicks off when the ring runs empty, for the caller's busy-poll to arm
 * them when it gives up.  *spin says whether a busy-poll may follow: only
 * once the ring is empty, not after an idle handler or one that left
 * entries it will not take (the poll would call it again and again). */
static int process(struct vr_queue *q, vr_handler_fn fn, void *ctx, int arm, int *spin)
{
    int more;
    *spin = 0;
    do {
        /* progress = chains popped (a packed ring's slot may come round
         * to where it was) */
        uint64_t before = q->stats.requests;
        vr_disable_notify(q);
        int rc = fn(ctx, q);
        if (q->broken)
            return VR_RUN_BROKEN;
        if (rc < 0)
            return VR_RUN_ERROR;
        vr_notify(q);
        if (rc == VR_HANDLER_IDLE)
            break;
        if (q->stats.requests == before) {
            if (!arm && !vr_avail_pending(q)) {
                *spin = 1; /* nothing there (a first look, a stale kick) */
                break;
            }
            vr_enable_notify(q);
            break;
        }
        /* Entries already waiting: go on with kicks still off.  Turning
         * them on and off between batches writes the used ring's lines the
         * driver polls (and invites kicks) for nothing. */
        more = vr_avail_pending(q) || (arm && vr_enable_notify(q));
        *spin = !more && !arm;
    } while (more);
    return VR_RUN_CONTROL;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int ctl_ready(int ctl_fd)
{
    struct pollfd p = {.fd = ctl_fd, .events = POLLIN};
    return poll(&p, 1, 0) > 0;
}

int vr_run(struct vr_queue *q, int ctl_fd, vr_handler_fn fn, void *ctx,
           uint32_t poll_us)
{
    struct pollfd fds[2];
    int nfds, rc, spin = 0, work = 1; /* always look once: entries may be pending */

    if (!q->started || ctl_fd < 0 || fn == NULL)
        return VR_RUN_ERROR;
    fds[0].fd = ctl_fd;
    fds[0].events = POLLIN;
    fds[1].fd = q->kick_fd;
    fds[1].events = POLLIN;
    nfds = q->kick_fd >= 0 ? 2 : 1;
    for (;;) {
        if (q->broken)
            return VR_RUN_BROKEN;
        if (work) {
            rc = process(q, fn, ctx, poll_us == 0, &spin);
            if (rc != VR_RUN_CONTROL)
                return rc;
            work = 0;
        }
        if (spin) {
            /* Brief busy-poll with kicks still off: a driver submitting
             * back to back neither kicks nor waits for our wake-up.  Then
             * arm kicks, and look once more (2.7.10's race). */
            uint64_t deadline = vr_clock_ns() + (uint64_t)poll_us * 1000u;
            unsigned spins = 0;
            spin = 0;
            while (vr_clock_ns() < deadline) {
                if (vr_avail_pending(q)) {
                    work = 1;
                    break;
                }
                if ((++spins & 63) == 0 && ctl_ready(ctl_fd)) {
                    vr_enable_notify(q);
                    return VR_RUN_CONTROL;
                }
                cpu_relax();
            }
            if (work || vr_enable_notify(q)) {
                q->stats.polled++;
                work = 1;
                continue;
            }
        }
        /* Without a kick fd the front-end asked for polling. */
        rc = poll(fds, nfds, nfds == 2 ? -1 : 1);
        if (rc < 0) {
            if (errno == EINTR)
                continue;
            return VR_RUN_ERROR;
        }
        if (fds[0].revents)
            return VR_RUN_CONTROL;
        if (nfds == 1) {
            work = 1;
            continue;
        }
        if (fds[1].revents & (POLLERR | POLLNVAL) ||
            (fds[1].revents & (POLLIN | POLLHUP)) == POLLHUP)
            return VR_RUN_ERROR;
        if (fds[1].revents & POLLIN) {
            drain(q->kick_fd);
            q->stats.kicks++;
            work = 1;
        }
    }
}
