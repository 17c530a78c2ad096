/*
 * dirtylog.c - dirty page logging for live migration (QEMU
 * docs/interop/vhost-user.rst, "Migration", VHOST_USER_PROTOCOL_F_LOG_SHMFD,
 * VHOST_F_LOG_ALL, VHOST_VRING_F_LOG).
 *
 * Theory of operation
 * -------------------
 * While the front-end migrates it shares a bitmap (SET_LOG_BASE): bit
 * (page % 8) of byte (page / 8) stands for the 4 KiB guest page `page` of
 * guest-physical memory.  It clears bits as it copies pages; every page the
 * back-end writes afterwards must have its bit set again, after the write,
 * or the destination keeps the stale copy.
 *
 * The back-end writes guest memory in two places, both in vr_push_batch():
 * the device-writable buffers of a completed chain (its first `len` bytes,
 * the used element's length, virtio 1.2, 2.7.8) and the used ring itself
 * (element, idx, and flags / avail_event in vr_disable_notify() /
 * vr_enable_notify()), which is logged at the ring's guest-physical
 * address `log_guest_addr` from SET_VRING_ADDR.  At push time the chain is
 * walked again from its head with the same limits as vr_pop: the guest may
 * have changed its descriptors since, which can only make it lose its own
 * pages, never let us touch memory outside the log.
 *
 * Packed rings (packed.c) differ in two ways: a used descriptor overwrites
 * a slot of the descriptor ring, which is logged at the ring's own
 * guest-physical address, and the device area (log_guest_addr) holds only
 * the device's event flags; the chain cannot be walked again from the ring
 * (its slots may hold newer descriptors by then), so it is logged from the
 * copy taken at pop.
 *
 * A struct vr_log is immutable once published: the control thread builds a
 * new one for each SET_LOG_BASE / SET_LOG_FD and stores its pointer into
 * every queue with a release store; workers load it once per batch.  The
 * old mapping stays alive until the session ends, so a worker never marks
 * an unmapped bitmap.  Pages beyond the log's end are counted
 * (stats.log_missed), never written.
 */
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "vring.h"

void vr_queue_set_log(struct vr_queue *q, const struct vr_log *log)
{
    __atomic_store_n(&q->log, log, __ATOMIC_RELEASE);
}

void vr_queue_set_log_used(struct vr_queue *q, int on, uint64_t used_gpa)
{
    __atomic_store_n(&q->log_used_gpa, used_gpa, __ATOMIC_RELAXED);
    __atomic_store_n(&q->log_used, !!on, __ATOMIC_RELEASE);
}

const struct vr_log *vr_log_active(struct vr_queue *q)
{
    return __atomic_load_n(&q->log, __ATOMIC_ACQUIRE);
}

/* Mark every page of [gpa, gpa + len); returns the pages past the log. */
uint64_t vr_log_write(const struct vr_log *log, uint64_t gpa, uint64_t len)
{
    uint64_t missed = 0;

    if (len == 0)
        return 0;
    /* Clamp a range that would wrap the address space (hostile guest). */
    if (gpa + (len - 1) < gpa)
        len = UINT64_MAX - gpa + 1;
    uint64_t first = gpa / VR_LOG_PAGE, last = (gpa + (len - 1)) / VR_LOG_PAGE;
    uint64_t pages = log->size * 8;
    /* The data (or used-ring) stores come before the bits that announce
     * them: the front-end may read and clear the bitmap at any time. */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    for (uint64_t p = first; p <= last; p++) {
        if (p >= pages) {
            missed += last - p + 1;
            break;
        }
        __atomic_fetch_or(&log->base[p / 8], (uint8_t)(1u << (p % 8)), __ATOMIC_RELAXED);
    }
    return missed;
}

void vr_log_kick(const struct vr_log *log)
{
    uint64_t one = 1;
    if (log->call_fd < 0)
        return;
    while (write(log->call_fd, &one, sizeof(one)) < 0 && errno == EINTR)
        ;
}

/* The used ring bytes [off, off + len) were written. */
void vr_log_used(struct vr_queue *q, const struct vr_log *log, uint64_t off, uint64_t len)
{
    if (!__atomic_load_n(&q->log_used, __ATOMIC_ACQUIRE))
        return;
    uint64_t gpa = __atomic_load_n(&q->log_used_gpa, __ATOMIC_RELAXED);
    q->stats.log_missed += vr_log_write(log, gpa + off, len);
}

/* Packed rings: ring bytes [gpa, gpa + len) outside the used ring (the
 * descriptor ring, where used descriptors land) were written. */
void vr_log_ring(struct vr_queue *q, const struct vr_log *log, uint64_t gpa, uint64_t len)
{
    if (__atomic_load_n(&q->log_used, __ATOMIC_ACQUIRE))
        q->stats.log_missed += vr_log_write(log, gpa, len);
}

/* Descriptor i of the ring's table, or of an indirect table at `table`. */
static int log_desc(struct vr_queue *q, int indirect, uint64_t table, uint32_t i,
                    uint64_t *addr, uint32_t *len, uint16_t *flags, uint16_t *next)
{
    uint8_t d[16];
    if (!indirect)
        memcpy(d, (const uint8_t *)q->desc + 16u * i, sizeof(d));
    else if (vr_mem_read(q->mem, table + 16ull * i, d, sizeof(d)) < 0)
        return -1;
    memcpy(addr, d, 8);
    memcpy(len, d + 8, 4);
    memcpy(flags, d + 12, 2);
    memcpy(next, d + 14, 2);
    return 0;
}

/* Mark the first `len` device-writable bytes of the chain at `head`,
 * walked with vr_pop's limits (hop budget, one indirect level, next in
 * range); a chain that no longer walks is logged as far as it does. */
void vr_log_chain(struct vr_queue *q, const struct vr_log *log, uint16_t head, uint32_t len)
{
    uint32_t size = q->num, i = head, hops = 0;
    uint64_t table = 0, addr;
    uint32_t dlen;
    uint16_t flags, next;
    int indirect = 0;

    while (len > 0 && i < size && ++hops <= size) {
        if (log_desc(q, indirect, table, i, &addr, &dlen, &flags, &next) < 0)
            return;
        if (flags & VR_DESC_F_INDIRECT) {
            /* virtio 1.2, 2.7.5.3.1: one level, whole 16-byte entries. */
            if (indirect || dlen == 0 || (dlen & 15))
                return;
            table = addr;
            size = dlen / 16 < 65536 ? dlen / 16 : 65536;
            i = 0;
            hops = 0;
            indirect = 1;
            continue;
        }
        if (flags & VR_DESC_F_WRITE) {
            uint32_t n = dlen < len ? dlen : len;
            q->stats.log_missed += vr_log_write(log, addr, n);
            len -= n;
        }
        if (!(flags & VR_DESC_F_NEXT))
            return;
        i = next;
    }
}
