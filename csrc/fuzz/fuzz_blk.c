/*
 * fuzz_blk.c - libFuzzer harness for the virtio-blk engine (blk.c) over a
 * hostile ring: every request type (IN, OUT, FLUSH, GET_ID, DISCARD,
 * WRITE_ZEROES, unknown), sectors at and past the capacity, headers split
 * over descriptors, missing status bytes, discard segment lists, a
 * read-only disk, an image shorter than its claimed capacity, read with
 * preadv or copied from the engine's mapping of it.
 *
 * The image is a memfd, so I/O is real preadv/pwritev into guest memory
 * (AddressSanitizer checks the ranges the kernel fills).  Checks: no guest
 * byte changes outside the used ring and the writable buffers of chains
 * the engine popped; the image never grows past its capacity.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "blk.h" /* backends/blk/ */
#include "fuzz_guest.h"

#define IMAGE_SIZE (64u * 1024u)

/* Two images: a memfd (tmpfs: the engine reads it with preadv) and an
 * unnamed file on a disk file system, which the engine maps when
 * cfg.map_reads is set (reads past its end then raise SIGBUS, caught by
 * the engine's guard).  FUZZ_BLK_DIR names that directory (default
 * /var/tmp); on tmpfs there the mapped path is simply not reached. */
static int image_fd(int mapped)
{
    static int fds[2] = {-1, -1};
    struct stat st;
    int *fd = &fds[mapped != 0];
    if (*fd < 0) {
        const char *dir = getenv("FUZZ_BLK_DIR") ? getenv("FUZZ_BLK_DIR") : "/var/tmp";
        *fd = mapped ? open(dir, O_TMPFILE | O_RDWR, 0600) : memfd_create("fuzz-blk", 0);
        if (*fd < 0)
            abort();
    }
    if (fstat(*fd, &st) || (st.st_size != IMAGE_SIZE && ftruncate(*fd, IMAGE_SIZE)))
        abort(); /* contents carry over between inputs: they are data only */
    return *fd;
}

/* Some inputs lay a well-formed read or write over descriptors i..i+2
 * (header, data of whole sectors, status), so the I/O paths themselves
 * (preadv, the mapping, the pool) are reached, not only the checks. */
static void plant_chain(struct fg_guest *g, struct fg_reader *r, uint32_t i, uint32_t num)
{
    if (i + 2 >= num)
        return;
    int in = fg_u8(r) % 2;
    uint32_t len = 512u * (1 + fg_u8(r) % 64);              /* up to 32 KiB */
    uint64_t hdr = FG_DATA + 32u * i, data = FG_OTHER + 512u * (fg_u8(r) % 64);
    uint64_t status = FG_DATA + 32u * i + 16;
    uint32_t type = in ? 0 : 1;
    uint64_t sector = fg_u8(r) % 4 ? fg_u8(r) : fg_u16(r) % 2100;   /* past a short image too */
    uint8_t *h = fg_at(g, hdr, 17);
    if (!h || data + len > FG_OTHER_END)
        return;
    memcpy(h, &type, 4);
    memset(h + 4, 0, 4);
    memcpy(h + 8, &sector, 8);
    struct { uint64_t addr; uint32_t len; uint16_t flags, next; } d[3] = {
        {hdr, 16, VR_DESC_F_NEXT, (uint16_t)(i + 1)},
        {data, len, (uint16_t)(VR_DESC_F_NEXT | (in ? VR_DESC_F_WRITE : 0)), (uint16_t)(i + 2)},
        {status, 1, VR_DESC_F_WRITE, 0},
    };
    uint8_t *dst = fg_at(g, FG_DESC + 16u * i, sizeof(d));
    if (dst)
        memcpy(dst, d, sizeof(d));
}

/* Put plausible request headers (and discard segments) where the heads'
 * first descriptors point, so the engine gets past the header checks. */
static void plant_requests(struct fg_guest *g, struct fg_reader *r, uint32_t num)
{
    static const uint32_t types[] = {0, 1, 4, 8, 11, 13, 2, 0xFFFFFFFFu};
    for (uint32_t i = 0; i < num; i++) {
        uint8_t *d = fg_at(g, FG_DESC + 16u * i, 16);
        uint64_t addr;
        memcpy(&addr, d, 8);
        uint8_t *p = fg_at(g, addr, 32);
        if (!p || fg_u8(r) % 4 == 0)
            continue;
        if (fg_u8(r) % 4 == 0) {
            plant_chain(g, r, i, num);
            i += 2;
            continue;
        }
        uint32_t type = types[fg_u8(r) % 8];
        uint64_t sector = fg_u8(r) % 4 ? fg_u8(r) : fg_u64(r);
        memcpy(p, &type, 4);
        memset(p + 4, 0, 4);
        memcpy(p + 8, &sector, 8);
        if (type == 11 || type == 13) { /* one discard/write-zeroes segment after it */
            uint64_t s2 = fg_u8(r);
            uint32_t n = fg_u8(r) % 4 ? fg_u8(r) : fg_u32(r), fl = fg_u8(r) % 4;
            memcpy(p + 16, &s2, 8);
            memcpy(p + 24, &n, 4);
            memcpy(p + 28, &fl, 4);
        }
    }
}

/* vr_blk_new zeroes a 256 KiB bounce buffer: building one engine per input
 * would spend most of the run in page faults.  Engines are kept per
 * configuration instead (an engine carries no request state between
 * vr_blk_handle calls, so reuse is what a long-lived back-end does too). */
static struct vr_blk *engine_for(const struct vr_blk_config *cfg)
{
    static struct {
        struct vr_blk_config cfg;
        struct vr_blk *b;
    } cache[256];
    uint64_t h = cfg->capacity * 31 + cfg->read_only;
    h = h * 31 + cfg->max_discard_sectors;
    h = h * 31 + cfg->max_discard_seg;
    h = h * 31 + cfg->max_write_zeroes_sectors;
    h = h * 31 + cfg->max_write_zeroes_seg;
    h = h * 31 + cfg->io_threads * 7 + cfg->pool_min_len;
    h = h * 31 + (uint64_t)cfg->map_reads;
    h %= 256;
    if (!cache[h].b || memcmp(&cache[h].cfg, cfg, sizeof(*cfg)) != 0) {
        vr_blk_free(cache[h].b);
        cache[h].cfg = *cfg;
        if (!(cache[h].b = vr_blk_new(cfg)))
            abort();
    }
    return cache[h].b;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fg_reader r = {data, size, 0};
    struct fg_guest g;
    struct fg_snapshot snap;
    struct vr_queue q;
    uint32_t num = 0;

    fg_guest_init(&g);
    fg_trace_reset();
    struct vr_blk_config cfg;
    memset(&cfg, 0, sizeof(cfg)); /* the cache compares whole structs, padding included */
    cfg.map_reads = fg_u8(&r) % 2;
    cfg.fd = image_fd(cfg.map_reads);
    cfg.read_only = fg_u8(&r) % 4 == 0;
    cfg.capacity = fg_u8(&r) % 4 ? IMAGE_SIZE / 512 : 1 + fg_u16(&r) % 2048;
    cfg.logical_block_size = 512;
    cfg.max_discard_sectors = fg_u8(&r) % 2 ? 1u + fg_u16(&r) : 0;
    cfg.max_discard_seg = fg_u8(&r) % 8;
    cfg.max_write_zeroes_sectors = fg_u8(&r) % 2 ? 1u + fg_u16(&r) : 0;
    cfg.max_write_zeroes_seg = fg_u8(&r) % 8;
    memcpy(cfg.serial, "fuzz-serial", 11);
    /* The I/O pool, with a threshold low enough for this small guest RAM to
     * reach it: pieces, jobs and the used entries pushed after them. */
    cfg.io_threads = fg_u8(&r) % 3;
    cfg.pool_min_len = 512u << (fg_u8(&r) % 5);
    struct vr_blk *b = engine_for(&cfg);
    if (fg_ring(&g, &r, &q, 0, &num, NULL) == 0) {
        plant_requests(&g, &r, num);
        fg_take(&r, g.ram[1], 4096); /* the rest shapes region 1's data */
        fg_snapshot_take(&g, &snap);
        for (int round = 0; round < 2; round++)
            vr_blk_handle(b, &q);
        uint64_t used[2][2];
        uint32_t nused = fg_ring_writes(&q, 0, used);
        fg_check_writes(&g, &snap, (const uint64_t (*)[2])used, nused);
        struct stat st;
        if (fstat(cfg.fd, &st) || (uint64_t)st.st_size > (cfg.capacity * 512 > IMAGE_SIZE ? cfg.capacity * 512 : IMAGE_SIZE))
            __builtin_trap();
    }
    vr_queue_fini(&q);
    fg_guest_free(&g);
    return 0;
}
