/*
 * blk_pool.c - a fixed pool of I/O threads for one queue's engine.
 *
 * Theory of operation: the threads are created once (vr_pool_new, when
 * the engine is bound to a queue) and sleep on a condition variable.
 * vr_pool_run() publishes a job of n pieces, wakes at most n-1 threads
 * and takes pieces itself too, so a busy or slow-to-wake pool only costs
 * parallelism, never progress.  It returns when every piece has finished:
 * between two calls no pool thread touches anything the job named (guest
 * memory included), so a queue stop or a memory-table swap, which only
 * happen between calls of the queue handler, never race a pool thread.
 * The threads block every signal but SIGBUS (blk.c's guarded copies),
 * never allocate and never call Python.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>

#include "blk_pool.h"

#define POOL_STACK (256u * 1024u)

struct pool_thread {
    struct vr_pool *pool;
    unsigned id;           /* 1..nthreads */
    pthread_t th;
};

struct vr_pool {
    pthread_mutex_t mu;
    pthread_cond_t work;   /* a job has pieces left to take, or stop */
    pthread_cond_t idle;   /* the last piece of a job finished */
    vr_pool_fn fn;
    void *arg;
    unsigned npieces, next, left;
    int stop;
    unsigned nthreads;     /* threads running */
    struct pool_thread t[VR_POOL_MAX_THREADS];
};

static void *pool_main(void *opaque)
{
    struct pool_thread *self = opaque;
    struct vr_pool *p = self->pool;

    pthread_setname_np(pthread_self(), "blk-io");
    /* A fault's SIGBUS must reach this thread (a blocked one kills the
     * process): the engine's guarded copies from the image's mapping. */
    sigset_t bus;
    sigemptyset(&bus);
    sigaddset(&bus, SIGBUS);
    pthread_sigmask(SIG_UNBLOCK, &bus, NULL);
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->stop && p->next >= p->npieces)
            pthread_cond_wait(&p->work, &p->mu);
        if (p->stop)
            break;
        unsigned k = p->next++;
        vr_pool_fn fn = p->fn;
        void *arg = p->arg;
        pthread_mutex_unlock(&p->mu);
        fn(arg, k, self->id);
        pthread_mutex_lock(&p->mu);
        if (--p->left == 0)
            pthread_cond_signal(&p->idle);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

struct vr_pool *vr_pool_new(unsigned nthreads)
{
    if (nthreads == 0 || nthreads > VR_POOL_MAX_THREADS)
        return NULL;
    struct vr_pool *p = calloc(1, sizeof(*p));
    if (!p)
        return NULL;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->work, NULL);
    pthread_cond_init(&p->idle, NULL);

    pthread_attr_t attr;
    sigset_t all, old;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, POOL_STACK);
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* inherited: signals stay with the process's own threads */
    for (unsigned i = 0; i < nthreads; i++) {
        p->t[i].pool = p;
        p->t[i].id = i + 1;
        if (pthread_create(&p->t[i].th, &attr, pool_main, &p->t[i]) != 0)
            break;
        p->nthreads++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (p->nthreads != nthreads) {
        vr_pool_free(p);
        return NULL;
    }
    return p;
}

void vr_pool_free(struct vr_pool *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->mu);
    for (unsigned i = 0; i < p->nthreads; i++)
        pthread_join(p->t[i].th, NULL);
    pthread_cond_destroy(&p->idle);
    pthread_cond_destroy(&p->work);
    pthread_mutex_destroy(&p->mu);
    free(p);
}

unsigned vr_pool_threads(const struct vr_pool *p)
{
    return p ? p->nthreads : 0;
}

void vr_pool_run(struct vr_pool *p, vr_pool_fn fn, void *arg, unsigned npieces)
{
    if (npieces == 0)
        return;
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->arg = arg;
    p->npieces = npieces;
    p->next = 0;
    p->left = npieces;
    /* The caller takes a piece too: wake only as many threads as can help. */
    unsigned wake = npieces - 1 < p->nthreads ? npieces - 1 : p->nthreads;
    if (wake == p->nthreads)
        pthread_cond_broadcast(&p->work);
    else
        for (unsigned i = 0; i < wake; i++)
            pthread_cond_signal(&p->work);
    while (p->next < p->npieces) {
        unsigned k = p->next++;
        pthread_mutex_unlock(&p->mu);
        fn(arg, k, 0);
        pthread_mutex_lock(&p->mu);
        p->left--;
    }
    while (p->left > 0)
        pthread_cond_wait(&p->idle, &p->mu);
    p->npieces = p->next = 0;
    p->fn = NULL;
    p->arg = NULL;
    pthread_mutex_unlock(&p->mu);
}
