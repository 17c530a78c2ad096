/*
 * blk_pool.h - a small fixed pool of I/O threads that runs the pieces of
 * one job alongside the calling queue worker (used by blk.c for large
 * reads and writes).
 */
#ifndef VR_BLK_POOL_H
#define VR_BLK_POOL_H

#define VR_POOL_MAX_THREADS 16

/* Runs piece `piece` of the current job; `thread` is 0 for the caller,
 * 1..nthreads for a pool thread (an index for per-thread scratch). */
typedef void (*vr_pool_fn)(void *arg, unsigned piece, unsigned thread);

struct vr_pool;

struct vr_pool *vr_pool_new(unsigned nthreads);
void vr_pool_free(struct vr_pool *p);
unsigned vr_pool_threads(const struct vr_pool *p);
void vr_pool_run(struct vr_pool *p, vr_pool_fn fn, void *arg, unsigned npieces);

#endif
