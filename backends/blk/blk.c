/*
 * blk.c - virtio-blk request engine (virtio 1.2, 5.2.6 "Device
 * Operation"), run by vr_run() in the queue's worker thread.
 *
 * A request is: a 16-byte header {le32 type; le32 reserved; le64 sector}
 * in the device-readable part (it may be split across descriptors), then
 * data (readable for OUT/DISCARD/WRITE_ZEROES, writable for IN/GET_ID),
 * and a status byte: the last byte of the last writable descriptor.  I/O
 * goes straight between the backing fd and guest memory (preadv/pwritev
 * on iovecs built from the chain's segments).  Any I/O failure becomes
 * VIRTIO_BLK_S_IOERR; only a chain with no room for a status byte breaks
 * the queue.  All buffers are allocated once in vr_blk_new().
 *
 * With cfg.io_threads > 0 the engine owns a pool of that many I/O threads
 * (blk_pool.c).  The data transfer of a read or write of at least
 * POOL_MIN_LEN bytes is cut into pieces at 4 KiB multiples of the request
 * and deferred: the pieces of up to DEFER_MAX such requests of one batch
 * form one job, run by the pool and the worker at once, before the used
 * entries are pushed (and before a flush, discard or write-zeroes is
 * served).  A full job is run and its requests pushed at once, so the
 * driver refills while the next job runs.  A request's status is written only after every one of its
 * pieces finished; any failed piece fails that request alone.  Small
 * requests never touch the pool and are served at once.
 *
 * With cfg.map_reads the engine maps the image read-only (MAP_SHARED, the
 * page cache itself) and serves reads with memcpy from the mapping into
 * guest memory: no system call and no page-cache lookup per request once
 * the pages are mapped.  Writes stay pwritev; Linux keeps the two coherent
 * (one page cache).  Only where that changes nothing but the cost: not on
 * tmpfs (a read fault there allocates the hole), and a read the mapping
 * would serve worse than preadv keeps preadv (map_choose: cold sequential
 * runs want the kernel's read-ahead, and MADV_RANDOM keeps a fault from
 * reading a whole read-ahead window for one random block).  A page past
 * the file's end (the image was shrunk on the host under a running guest,
 * or a guest memory file truncated by the front-end) raises SIGBUS: the
 * copy runs under a per-thread guard that the SIGBUS handler jumps back
 * to, and that read fails with IOERR like a short preadv would.  Outside
 * a guarded copy the handler hands the signal to whatever disposition was
 * there before.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "blk.h"
#include "blk_pool.h"
#include "blk_hdr.h" /* struct virtio_blk_outhdr, shared with the driver side */

#define WZ_UNMAP 1u
#define MAX_DWZ_SEGS 256  /* discard/write-zeroes segments per request */
#define BOUNCE_SIZE (256u * 1024u)
#define BATCH 32
#define POOL_MIN_LEN (128u * 1024u)   /* smallest request the pool splits, by default */
/* smallest piece: half the smallest pooled request (64 KiB by default) */
#define POOL_ALIGN 4096u              /* cuts at multiples of this many bytes */
#define MAX_PIECES (VR_POOL_MAX_THREADS + 1)  /* per request */
#define DEFER_MAX 4                           /* large requests per job */
#define ST_DEFERRED 0xff                      /* internal: status written when the job ends */
#define MAP_LARGE (64u * 1024u)               /* reads this long copy only pages resident now */

#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0x01
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif
#ifndef FALLOC_FL_ZERO_RANGE
#define FALLOC_FL_ZERO_RANGE 0x10
#endif

struct dwz_seg {           /* virtio_blk_discard_write_zeroes */
    uint64_t sector;
    uint32_t num_sectors;
    uint32_t flags;
};

struct blk_piece {
    struct iovec *iov;     /* a slice of vr_blk.piov */
    int cnt;
    int write;
    int mapped;            /* copied from the image's mapping */
    int rc;                /* 0 or -errno (-EFAULT: the mapping's page was gone) */
    uint64_t off, len, done;
};

struct blk_deferred {      /* a large request whose pieces are in the job */
    uint8_t *status;       /* its status byte (guest memory, valid during vr_blk_handle) */
    uint32_t slot;         /* its entry in heads/lens */
    unsigned first, n;     /* its pieces */
    int write;
};

struct vr_blk {
    struct vr_blk_config cfg;
    struct vr_blk_stats stats;
    /* The image, read-only, cfg.capacity sectors, advised MADV_RANDOM (a
     * fault reads in its own page only, as preadv of a random block would,
     * not the device's whole read-ahead window).  NULL: preadv. */
    const uint8_t *map;
    size_t map_len;
    uint64_t next_read;    /* where the last small read ended (worker only) */
    uint64_t pool_min, piece_min;  /* cfg.pool_min_len or POOL_MIN_LEN, and half of it */
    uint8_t *bounce;       /* aligned, for O_DIRECT retries and zeroes */
    int bounce_is_zero;
    uint32_t nbatch;
    uint16_t heads[BATCH];
    uint32_t lens[BATCH];
    struct dwz_seg dwz[MAX_DWZ_SEGS];
    struct vr_seg segs[VR_MAX_SEGS];
    struct iovec iov[VR_MAX_SEGS];
    /* the I/O pool (NULL when cfg.io_threads is 0) and its job */
    struct vr_pool *pool;
    uint8_t *pool_bounce[VR_POOL_MAX_THREADS + 1]; /* per thread, O_DIRECT only; [0] = bounce */
    unsigned npieces, ndefer, npiov;
    struct blk_deferred defer[DEFER_MAX];
    struct blk_piece pieces[DEFER_MAX * MAX_PIECES];
    struct iovec piov[DEFER_MAX * (VR_MAX_SEGS + MAX_PIECES)];
};

/* ---- reads from the image's mapping ---- */

/* Set only around a guarded copy.  volatile: the compiler knows memcpy
 * never reads it, and would drop the store before the copy otherwise. */
static __thread sigjmp_buf *volatile fault_guard;
static struct sigaction prev_sigbus;
static pthread_once_t sigbus_once = PTHREAD_ONCE_INIT;
static int sigbus_ready;

static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
    sigjmp_buf *g = fault_guard;
    (void)si;
    (void)uc;
    if (g) {
        fault_guard = NULL;
        siglongjmp(*g, 1);
    }
    /* Not a guarded copy: the disposition from before takes it (for the
     * default one, the process ends as it would have without us). */
    sigaction(SIGBUS, &prev_sigbus, NULL);
    raise(sig);
}

static void sigbus_install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_sigbus;
    sigemptyset(&sa.sa_mask);
    /* NODEFER: SIGBUS stays unblocked across the jump out of the handler,
     * so sigsetjmp need not save the mask (no system call per copy). */
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigbus_ready = sigaction(SIGBUS, &sa, &prev_sigbus) == 0;
}

static void map_release(struct vr_blk *b)
{
    if (b->map)
        munmap((void *)b->map, b->map_len);
    b->map = NULL;
    b->map_len = 0;
}

#define TMPFS_MAGIC_ 0x01021994
#define HUGETLBFS_MAGIC_ 0x958458f6

/* A block device, or a regular file on a file system where reading a hole
 * through a mapping allocates nothing.  tmpfs (memfd, /dev/shm) and
 * hugetlbfs fill a hole with a new page on a read fault, where preadv
 * returns zeroes and allocates nothing: a guest reading a sparse disk
 * would fill it (or, on a full tmpfs, fail).  Those keep preadv. */
static int mappable(int fd)
{
    struct stat st;
    struct statfs fs;
    if (fstat(fd, &st) != 0)
        return 0;
    if (S_ISBLK(st.st_mode))
        return 1;
    if (!S_ISREG(st.st_mode) || fstatfs(fd, &fs) != 0)
        return 0;
    return fs.f_type != TMPFS_MAGIC_ && fs.f_type != (typeof(fs.f_type))HUGETLBFS_MAGIC_;
}

/* Map cfg.capacity sectors of the image; on any failure reads use preadv. */
static void map_setup(struct vr_blk *b)
{
    map_release(b);
    if (!b->cfg.map_reads || b->cfg.direct || b->cfg.capacity == 0 || !mappable(b->cfg.fd))
        return;
    pthread_once(&sigbus_once, sigbus_install);
    if (!sigbus_ready || b->cfg.capacity > SIZE_MAX / 512)
        return;
    size_t len = (size_t)(b->cfg.capacity * 512);
    void *m = mmap(NULL, len, PROT_READ, MAP_SHARED | MAP_NORESERVE, b->cfg.fd, 0);
    if (m == MAP_FAILED)
        return;
    if (madvise(m, len, MADV_RANDOM) != 0) {
        munmap(m, len);
        return;
    }
    b->map = m;
    b->map_len = len;
}

int vr_blk_mapped(const struct vr_blk *b)
{
    return b->map != NULL;
}

/* Every page of [off, off+len) in the page cache (mincore), so a copy
 * from the mapping takes no major fault.  Otherwise preadv reads it, and
 * the kernel's read-ahead sizes the disk reads as it always did. */
static int resident(const struct vr_blk *b, uint64_t off, uint64_t len)
{
    const uint64_t page = 4096;   /* mincore's unit; a larger page only over-asks */
    unsigned char vec[256];
    uint64_t start = off & ~(page - 1), end = off + len;
    while (start < end) {
        uint64_t n = (end - start + page - 1) / page;
        if (n > sizeof(vec))
            n = sizeof(vec);
        if (mincore((void *)(b->map + start), n * page, vec) != 0)
            return 0;
        for (uint64_t i = 0; i < n; i++)
            if (!(vec[i] & 1))
                return 0;
        start += n * page;
    }
    return 1;
}

/* Copy from the mapping, or preadv?  A small read that does not follow
 * the one before copies (a random block: a miss faults in that page
 * alone); a run of small reads, each starting where the last ended, keeps
 * preadv, whose read-ahead makes a cold sequential scan fast; a large
 * read copies when its pages are all resident.  follows: this read starts
 * where the queue's last read ended (blk_rw keeps that, worker only). */
static int map_choose(const struct vr_blk *b, uint64_t off, uint64_t len, int follows)
{
    if (!b->map)
        return 0;
    return len < MAP_LARGE ? !follows : resident(b, off, len);
}

/* Copy len bytes of the image at off (inside the mapping: range_ok) into
 * iov.  0, or -EFAULT when a page of it is gone (SIGBUS: the file shrank). */
static int map_read(const struct vr_blk *b, const struct iovec *iov, int cnt, uint64_t off,
                    uint64_t len, uint64_t *done)
{
    sigjmp_buf jb;
    *done = 0;
    if (sigsetjmp(jb, 0))
        return -EFAULT;  /* fault_guard was cleared by the handler */
    fault_guard = &jb;
    __asm__ __volatile__("" ::: "memory");  /* the copy stays between the two stores */
    const uint8_t *src = b->map + off;
    uint64_t left = len;
    for (int k = 0; k < cnt && left > 0; k++) {
        size_t t = iov[k].iov_len < left ? iov[k].iov_len : (size_t)left;
        memcpy(iov[k].iov_base, src, t);
        src += t;
        left -= t;
    }
    __asm__ __volatile__("" ::: "memory");
    fault_guard = NULL;
    *done = len - left;
    return left ? -EIO : 0;
}

static void pool_release(struct vr_blk *b)
{
    vr_pool_free(b->pool);
    b->pool = NULL;
    for (unsigned t = 1; t <= VR_POOL_MAX_THREADS; t++) {
        free(b->pool_bounce[t]);
        b->pool_bounce[t] = NULL;
    }
}

/* The pool and, for O_DIRECT, one bounce buffer per pool thread. */
static int pool_setup(struct vr_blk *b)
{
    unsigned n = b->cfg.io_threads;
    b->pool_bounce[0] = b->bounce;
    if (n == 0)
        return 0;
    if (n > VR_POOL_MAX_THREADS)
        return -1;
    for (unsigned t = 1; b->cfg.direct && t <= n; t++)
        if (posix_memalign((void **)&b->pool_bounce[t], 4096, BOUNCE_SIZE) != 0)
            return -1;
    b->pool = vr_pool_new(n);
    return b->pool ? 0 : -1;
}

struct vr_blk *vr_blk_new(const struct vr_blk_config *cfg)
{
    struct vr_blk *b = calloc(1, sizeof(*b));
    if (!b)
        return NULL;
    if (posix_memalign((void **)&b->bounce, 4096, BOUNCE_SIZE) != 0) {
        free(b);
        return NULL;
    }
    memset(b->bounce, 0, BOUNCE_SIZE);
    b->bounce_is_zero = 1;
    b->cfg = *cfg;
    b->pool_min = cfg->pool_min_len ? cfg->pool_min_len : POOL_MIN_LEN;
    b->piece_min = b->pool_min / 2 ? b->pool_min / 2 : 1;
    if (b->cfg.max_discard_seg > MAX_DWZ_SEGS || b->cfg.max_discard_seg == 0)
        b->cfg.max_discard_seg = MAX_DWZ_SEGS;
    if (b->cfg.max_write_zeroes_seg > MAX_DWZ_SEGS || b->cfg.max_write_zeroes_seg == 0)
        b->cfg.max_write_zeroes_seg = MAX_DWZ_SEGS;
    if (pool_setup(b) < 0) {
        vr_blk_free(b);
        return NULL;
    }
    b->next_read = UINT64_MAX;   /* the first read follows none */
    map_setup(b);
    return b;
}

void vr_blk_free(struct vr_blk *b)
{
    if (b) {
        pool_release(b);
        map_release(b);
        free(b->bounce);
        free(b);
    }
}

void vr_blk_get_stats(const struct vr_blk *b, struct vr_blk_stats *out)
{
    *out = b->stats;
}

/* Resize and cache mode; only while the queue's worker is parked (between
 * batches), so no request sees a half-changed disk. */
void vr_blk_set_mode(struct vr_blk *b, uint64_t capacity, int writethrough)
{
    uint64_t old = b->cfg.capacity;
    b->cfg.capacity = capacity;
    b->cfg.writethrough = writethrough;
    if (capacity != old)
        map_setup(b);   /* the pool threads are idle: no copy is running */
}

/* ---- segment helpers ---- */

static void iov_advance(struct iovec **iov, int *cnt, size_t n)
{
    while (n > 0 && *cnt > 0) {
        if (n >= (*iov)->iov_len) {
            n -= (*iov)->iov_len;
            (*iov)++;
            (*cnt)--;
        } else {
            (*iov)->iov_base = (uint8_t *)(*iov)->iov_base + n;
            (*iov)->iov_len -= n;
            n = 0;
        }
    }
}

/* Bounce path for O_DIRECT with guest buffers that are not aligned. */
static int bounce_rw(int fd, uint8_t *bounce, struct iovec *iov, int cnt,
                     uint64_t off, uint64_t len, int write, uint64_t *done)
{
    while (len > 0) {
        size_t chunk = len < BOUNCE_SIZE ? len : BOUNCE_SIZE;
        if (write) {
            size_t got = 0;
            struct iovec *v = iov;
            int c = cnt;
            for (; c > 0 && got < chunk; v++, c--) {
                size_t t = v->iov_len < chunk - got ? v->iov_len : chunk - got;
                memcpy(bounce + got, v->iov_base, t);
                got += t;
            }
        }
        size_t pos = 0;
        while (pos < chunk) {
            ssize_t r = write ? pwrite(fd, bounce + pos, chunk - pos, off + pos)
                              : pread(fd, bounce + pos, chunk - pos, off + pos);
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0)
                return r < 0 ? -errno : -EIO;
            pos += (size_t)r;
        }
        if (!write) {
            size_t put = 0;
            struct iovec *v = iov;
            int c = cnt;
            for (; c > 0 && put < chunk; v++, c--) {
                size_t t = v->iov_len < chunk - put ? v->iov_len : chunk - put;
                memcpy(v->iov_base, bounce + put, t);
                put += t;
            }
        }
        iov_advance(&iov, &cnt, chunk);
        off += chunk;
        len -= chunk;
        *done += chunk;
    }
    return 0;
}

/* Whole transfer, looping on short reads/writes; *done counts bytes.
 * bounce is the calling thread's own buffer (O_DIRECT retries). */
static int do_rw(const struct vr_blk *b, uint8_t *bounce, struct iovec *iov, int cnt,
                 uint64_t off, uint64_t len, int write, uint64_t *done)
{
    *done = 0;
    while (len > 0) {
        int c = cnt < IOV_MAX ? cnt : IOV_MAX;
        ssize_t r = write ? pwritev(b->cfg.fd, iov, c, (off_t)off)
                          : preadv(b->cfg.fd, iov, c, (off_t)off);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && errno == EINVAL && b->cfg.direct)
            return bounce_rw(b->cfg.fd, bounce, iov, cnt, off, len, write, done);
        if (r < 0)
            return -errno;
        if (r == 0)
            return -EIO; /* end of file inside capacity: short I/O */
        iov_advance(&iov, &cnt, (size_t)r);
        off += (uint64_t)r;
        len -= (uint64_t)r;
        *done += (uint64_t)r;
    }
    return 0;
}

static void count_mapped(struct vr_blk *b, int mapped, int faulted)
{
    b->stats.mapped_reads += mapped != 0;
    b->stats.map_faults += faulted != 0;
}

/* ---- large requests over the I/O pool ---- */

static void piece_run(void *arg, unsigned k, unsigned thread)
{
    struct vr_blk *b = arg;
    struct blk_piece *pc = &b->pieces[k];
    pc->mapped = !pc->write && b->map && resident(b, pc->off, pc->len);
    if (pc->mapped)
        pc->rc = map_read(b, pc->iov, pc->cnt, pc->off, pc->len, &pc->done);
    else
        pc->rc = do_rw(b, b->pool_bounce[thread], pc->iov, pc->cnt, pc->off, pc->len, pc->write,
                       &pc->done);
}

/* Append n pieces of step bytes (the last takes the rest) covering
 * iov[0..cnt) (len bytes at file offset off) to the job; entries that
 * straddle a cut are split in b->piov (cnt + n - 1 entries at most). */
static void cut_pieces(struct vr_blk *b, const struct iovec *iov, int cnt, uint64_t off,
                       uint64_t len, int write, unsigned n, uint64_t step)
{
    struct iovec *out = b->piov + b->npiov;
    int k = 0;                 /* input entry */
    size_t used = 0;           /* bytes of iov[k] already given to a piece */
    for (unsigned p = 0; p < n; p++) {
        struct blk_piece *pc = &b->pieces[b->npieces + p];
        uint64_t want = p + 1 < n ? step : len - step * (n - 1);
        pc->iov = out;
        pc->cnt = 0;
        pc->off = off + step * p;
        pc->len = want;
        pc->write = write;
        pc->rc = 0;
        pc->done = 0;
        while (want > 0 && k < cnt) {
            size_t avail = iov[k].iov_len - used;
            size_t take = avail < want ? avail : (size_t)want;
            out->iov_base = (uint8_t *)iov[k].iov_base + used;
            out->iov_len = take;
            out++;
            pc->cnt++;
            want -= take;
            used += take;
            if (used == iov[k].iov_len) {
                k++;
                used = 0;
            }
        }
    }
    b->npiov = (unsigned)(out - b->piov);
    b->npieces += n;
}

/* Run the job: every piece of every deferred request, on the pool and
 * this thread; then write their statuses and used lengths. */
static void job_finish(struct vr_blk *b, struct vr_queue *q)
{
    if (b->ndefer == 0)
        return;
    vr_pool_run(b->pool, piece_run, b, b->npieces);
    /* 5.2.5 writethrough: the job's writes are on stable storage before
     * any of them completes (one sync covers them all). */
    int sync_failed = 0;
    if (b->cfg.writethrough) {
        for (unsigned i = 0; i < b->ndefer; i++) {
            if (b->defer[i].write) {
                sync_failed = fdatasync(b->cfg.fd) != 0;
                break;
            }
        }
    }
    for (unsigned i = 0; i < b->ndefer; i++) {
        const struct blk_deferred *d = &b->defer[i];
        uint64_t done = 0;
        int rc = 0, mapped = 0, faulted = 0;
        for (unsigned p = d->first; p < d->first + d->n; p++) {
            done += b->pieces[p].done;
            mapped |= b->pieces[p].mapped;
            faulted |= b->pieces[p].rc == -EFAULT;
            if (rc == 0)
                rc = b->pieces[p].rc;
        }
        if (d->write && sync_failed && rc == 0)
            rc = -1;
        if (d->write) {
            b->stats.writes++;
            b->stats.bytes_written += done;
            q->stats.bytes_written += done;
        } else {
            b->stats.reads++;
            b->stats.bytes_read += done;
            q->stats.bytes_read += done;
            b->lens[d->slot] += (uint32_t)done;
            count_mapped(b, mapped, faulted);
        }
        if (rc != 0) {
            b->stats.io_errors++;
            q->stats.io_errors++;
        }
        b->stats.pooled++;
        *d->status = rc == 0 ? VIRTIO_BLK_S_OK : VIRTIO_BLK_S_IOERR;
    }
    b->ndefer = b->npieces = b->npiov = 0;
}

static void flush_used(struct vr_blk *b, struct vr_queue *q);

/* Put a large transfer into the job (running the job, and pushing what is
 * done, first when it is full). */
static uint8_t pool_defer(struct vr_blk *b, struct vr_queue *q, const struct iovec *iov,
                          int cnt, uint64_t off, uint64_t len, int write, uint8_t *status)
{
    unsigned n = vr_pool_threads(b->pool) + 1;
    if (len / b->piece_min < n)
        n = (unsigned)(len / b->piece_min);
    uint64_t step = (len / n + POOL_ALIGN - 1) / POOL_ALIGN * POOL_ALIGN;
    while (n > 1 && step * (n - 1) >= len)  /* rounding up may leave the last piece empty */
        n--;
    if (b->ndefer == DEFER_MAX || b->npiov + (unsigned)cnt + n > sizeof(b->piov) / sizeof(b->piov[0]))
        flush_used(b, q);  /* runs the job; the current request takes slot 0 */
    struct blk_deferred *d = &b->defer[b->ndefer++];
    d->status = status;
    d->slot = b->nbatch;
    d->first = b->npieces;
    d->n = n;
    d->write = write;
    cut_pieces(b, iov, cnt, off, len, write, n, step);
    return ST_DEFERRED;
}

static int write_zeroes_slow(struct vr_blk *b, uint64_t off, uint64_t len)
{
    if (!b->bounce_is_zero) {
        memset(b->bounce, 0, BOUNCE_SIZE);
        b->bounce_is_zero = 1;
    }
    while (len > 0) {
        size_t chunk = len < BOUNCE_SIZE ? len : BOUNCE_SIZE;
        ssize_t r = pwrite(b->cfg.fd, b->bounce, chunk, (off_t)off);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return r < 0 ? -errno : -EIO;
        off += (uint64_t)r;
        len -= (uint64_t)r;
    }
    return 0;
}

static int unsupported_errno(int e)
{
    return e == EOPNOTSUPP || e == ENOSYS || e == EINVAL;
}

/* ---- request types ---- */

static int range_ok(const struct vr_blk *b, uint64_t sector, uint64_t nsec)
{
    /* 5.2.6.2: the device MUST fail requests beyond capacity. */
    return sector <= b->cfg.capacity && nsec <= b->cfg.capacity - sector;
}

static uint8_t blk_rw(struct vr_blk *b, struct vr_queue *q,
                      const struct vr_chain *c, uint64_t sector, int write,
                      uint32_t *used, uint8_t *status)
{
    uint64_t len = write ? c->read_len - 16 : c->write_len - 1;
    uint64_t done = 0;
    int cnt;

    if (write && b->cfg.read_only)
        return VIRTIO_BLK_S_IOERR;
    /* 5.2.6.2: data is a multiple of 512 bytes. */
    if (len % 512 || !range_ok(b, sector, len / 512))
        return VIRTIO_BLK_S_IOERR;
    if (write)
        cnt = vr_segs_iov(q->mem, c->segs, c->nread, 16, len, b->iov, VR_MAX_SEGS);
    else
        cnt = vr_segs_iov(q->mem, c->segs + c->nread, c->nseg - c->nread, 0, len, b->iov,
                          VR_MAX_SEGS);
    if (cnt < 0)   /* not reached: a chain has at most VR_MAX_SEGS segments */
        return VIRTIO_BLK_S_IOERR;
    if (b->cfg.direct)
        b->bounce_is_zero = 0;   /* an O_DIRECT retry may use the bounce buffer */
    int follows = !write && sector * 512 == b->next_read;
    if (!write)
        b->next_read = sector * 512 + len;
    if (b->pool && len >= b->pool_min)
        return pool_defer(b, q, b->iov, cnt, sector * 512, len, write, status);
    int mapped = !write && map_choose(b, sector * 512, len, follows);
    int rc = mapped ? map_read(b, b->iov, cnt, sector * 512, len, &done)
                    : do_rw(b, b->bounce, b->iov, cnt, sector * 512, len, write, &done);
    if (write) {
        b->stats.writes++;
        b->stats.bytes_written += done;
        q->stats.bytes_written += done;
    } else {
        b->stats.reads++;
        b->stats.bytes_read += done;
        q->stats.bytes_read += done;
        *used += (uint32_t)done;
        count_mapped(b, mapped, rc == -EFAULT);
    }
    return rc == 0 ? VIRTIO_BLK_S_OK : VIRTIO_BLK_S_IOERR;
}

static uint8_t blk_get_id(struct vr_blk *b, struct vr_queue *q,
                          const struct vr_chain *c, uint32_t *used)
{
    uint64_t room = c->write_len - 1;
    uint64_t n = room < VR_BLK_SERIAL_LEN ? room : VR_BLK_SERIAL_LEN;
    int cnt = vr_segs_iov(q->mem, c->segs + c->nread, c->nseg - c->nread, 0, n, b->iov,
                          VR_MAX_SEGS);
    const uint8_t *src = b->cfg.serial;
    for (int k = 0; k < cnt; k++) {
        memcpy(b->iov[k].iov_base, src, b->iov[k].iov_len);
        src += b->iov[k].iov_len;
    }
    b->stats.get_ids++;
    *used += (uint32_t)n;
    return VIRTIO_BLK_S_OK;
}

static uint8_t blk_dwz(struct vr_blk *b, struct vr_queue *q,
                       const struct vr_chain *c, uint32_t type)
{
    int discard = type == VIRTIO_BLK_T_DISCARD;
    uint32_t max_sec = discard ? b->cfg.max_discard_sectors : b->cfg.max_write_zeroes_sectors;
    uint32_t max_seg = discard ? b->cfg.max_discard_seg : b->cfg.max_write_zeroes_seg;
    uint64_t dlen = c->read_len - 16;

    if (max_sec == 0)
        return VIRTIO_BLK_S_UNSUPP; /* feature not offered */
    if (b->cfg.read_only)
        return VIRTIO_BLK_S_IOERR;
    if (dlen == 0 || dlen % sizeof(struct dwz_seg) || dlen / sizeof(struct dwz_seg) > max_seg)
        return VIRTIO_BLK_S_IOERR;
    uint32_t n = (uint32_t)(dlen / sizeof(struct dwz_seg));
    /* Copy every range to a local first, check them all, then act. */
    for (uint32_t k = 0; k < n; k++) {
        vr_segs_gather(q->mem, c->segs, c->nread, 16 + 16ull * k, &b->dwz[k], sizeof(b->dwz[k]));
        const struct dwz_seg *s = &b->dwz[k];
        /* 5.2.6.2: unknown flag bits, or unmap on discard: UNSUPP. */
        if ((s->flags & ~WZ_UNMAP) || (discard && s->flags))
            return VIRTIO_BLK_S_UNSUPP;
        if (s->num_sectors > max_sec || !range_ok(b, s->sector, s->num_sectors))
            return VIRTIO_BLK_S_IOERR;
    }
    for (uint32_t k = 0; k < n; k++) {
        const struct dwz_seg *s = &b->dwz[k];
        off_t off = (off_t)(s->sector * 512);
        off_t len = (off_t)s->num_sectors * 512;
        if (len == 0)
            continue;
        if (discard) {
            /* Discard is a hint: an fs without hole punching succeeds. */
            if (fallocate(b->cfg.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len) < 0 &&
                !unsupported_errno(errno))
                return VIRTIO_BLK_S_IOERR;
            continue;
        }
        int mode = (s->flags & WZ_UNMAP) ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                                         : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
        if (fallocate(b->cfg.fd, mode, off, len) == 0)
            continue;
        if (!unsupported_errno(errno))
            return VIRTIO_BLK_S_IOERR;
        if (write_zeroes_slow(b, (uint64_t)off, (uint64_t)len) < 0)
            return VIRTIO_BLK_S_IOERR;
    }
    if (discard)
        b->stats.discards++;
    else
        b->stats.write_zeroes++;
    return VIRTIO_BLK_S_OK;
}

/* Handle one chain; sets *used; returns -1 only if the queue broke. */
static int blk_one(struct vr_blk *b, struct vr_queue *q,
                   const struct vr_chain *c, uint32_t *used)
{
    struct virtio_blk_outhdr hdr;
    uint8_t st;

    /* 5.2.6: the status byte is the last writable byte; without one the
     * request cannot be completed at all. */
    if (c->write_len == 0)
        return vr_queue_fail(q, VR_E_MALFORMED, "virtio-blk request without status byte on queue %u at head %u",
                             q->index, c->head);
    const struct vr_seg *last = &c->segs[c->nseg - 1];
    uint8_t *status = vr_seg_host(q->mem, last) + last->len - 1;

    *used = 1;
    if (c->read_len < sizeof(hdr)) {
        st = VIRTIO_BLK_S_IOERR;
    } else {
        vr_segs_gather(q->mem, c->segs, c->nread, 0, &hdr, sizeof(hdr));
        switch (hdr.type) {
        case VIRTIO_BLK_T_IN:
            st = blk_rw(b, q, c, hdr.sector, 0, used, status);
            break;
        case VIRTIO_BLK_T_OUT:
            st = blk_rw(b, q, c, hdr.sector, 1, used, status);
            break;
        case VIRTIO_BLK_T_FLUSH:
            job_finish(b, q);  /* the deferred writes go first */
            st = fdatasync(b->cfg.fd) == 0 ? VIRTIO_BLK_S_OK : VIRTIO_BLK_S_IOERR;
            b->stats.flushes++;
            break;
        case VIRTIO_BLK_T_GET_ID:
            st = blk_get_id(b, q, c, used);
            break;
        case VIRTIO_BLK_T_DISCARD:
        case VIRTIO_BLK_T_WRITE_ZEROES:
            job_finish(b, q);
            st = blk_dwz(b, q, c, hdr.type);
            break;
        default:
            st = VIRTIO_BLK_S_UNSUPP;
            break;
        }
        /* 5.2.5: writeback 0 is a writethrough cache: a write is on
         * stable storage before it completes. */
        if (st == VIRTIO_BLK_S_OK && b->cfg.writethrough && (hdr.type == VIRTIO_BLK_T_OUT ||
            hdr.type == VIRTIO_BLK_T_WRITE_ZEROES || hdr.type == VIRTIO_BLK_T_DISCARD)) {
            st = fdatasync(b->cfg.fd) == 0 ? VIRTIO_BLK_S_OK : VIRTIO_BLK_S_IOERR;
        }
    }
    if (st == ST_DEFERRED)
        return 0;  /* job_finish() writes the status */
    if (st == VIRTIO_BLK_S_IOERR) {
        b->stats.io_errors++;
        q->stats.io_errors++;
    }
    else if (st == VIRTIO_BLK_S_UNSUPP)
        b->stats.unsupported++;
    *status = st;
    return 0;
}

static void flush_used(struct vr_blk *b, struct vr_queue *q)
{
    job_finish(b, q);  /* every piece done before any used entry is pushed */
    if (b->nbatch) {
        vr_push_batch(q, b->heads, b->lens, b->nbatch);
        b->nbatch = 0;
        vr_notify(q);
    }
}

int vr_blk_handle(void *ctx, struct vr_queue *q)
{
    struct vr_blk *b = ctx;
    struct vr_chain c = {.cap = VR_MAX_SEGS, .segs = b->segs};
    uint32_t used = 0;

    b->nbatch = 0;
    for (;;) {
        int rc = vr_pop(q, &c);
        if (rc <= 0)
            break;
        if (blk_one(b, q, &c, &used) < 0)
            break;
        b->heads[b->nbatch] = c.head;
        b->lens[b->nbatch] = used;
        if (++b->nbatch == BATCH)
            flush_used(b, q);
    }
    flush_used(b, q);
    return q->broken ? -1 : 0;
}
