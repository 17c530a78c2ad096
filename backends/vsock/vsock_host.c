/*
 * vsock_host.c - the host thread's loop: host socket bytes into guest rx
 * buffers without Python (see vsock.h).
 *
 * Theory of operation
 * -------------------
 * The host thread sleeps here, in epoll_wait(), on the host sockets of
 * established stream connections and on the Python selector's own epoll
 * fd (the listener, CONNECT lines, sockets waiting to be written, and the
 * thread's wake eventfd).  A readable connection is filled with
 * vs_rx_fill() under the device lock (struct vs_lock, the one Python's
 * `with device._lock` takes too), one notification per batch of events.
 * The socket stays registered, level-triggered: when it has more, epoll
 * says so again, and nothing has to re-arm it.
 *
 * Anything else goes back to Python, which owns the connection's state:
 * no rx buffer, no credit, EOF, an error, an odd buffer, a connection that
 * is no longer a plain established stream, an rx queue C may not fill now
 * (stopped, broken, a transport reset due).  The connection leaves the
 * loop (its slot freed, its fd removed from the epoll set) and its key is
 * reported; Python marks it readable and lets the rx worker finish it, and
 * registers it here again once it is drained.  Python also removes a
 * connection (under the lock) before it closes its socket or drops its
 * record, so a slot never points at freed memory; an event for a slot
 * freed since epoll_wait() returned is ignored.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "vsock.h"

#define PY_TOKEN 0xFFFFFFFFu /* epoll data of the Python selector's fd */
#define FILL_ROUNDS 4        /* vs_rx_fill calls per event: then the next socket's turn */
#define FILL_MAX 64          /* packets per vs_rx_fill call */

struct vs_lock {
    pthread_mutex_t m;
};

struct vs_lock *vs_lock_new(void)
{
    struct vs_lock *l = calloc(1, sizeof(*l));
    pthread_mutexattr_t a;
    if (!l)
        return NULL;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_settype(&a, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&l->m, &a);
    pthread_mutexattr_destroy(&a);
    return l;
}

void vs_lock_free(struct vs_lock *l)
{
    if (l) {
        pthread_mutex_destroy(&l->m);
        free(l);
    }
}

void vs_lock_acquire(struct vs_lock *l) { pthread_mutex_lock(&l->m); }
void vs_lock_release(struct vs_lock *l) { pthread_mutex_unlock(&l->m); }

struct vs_host {
    int epfd;
    struct vs_lock *lock;
    uint64_t guest_cid;
    /* set by Python, lock held */
    struct vr_queue *rxq;      /* NULL: no rx queue of this session yet */
    struct vr_chain *chain;    /* the loop's own chain buffer */
    struct vr_capture *cap;
    uint32_t hold;             /* a transport reset is due: nothing reaches the guest */
    uint32_t worker_waits;     /* the rx worker waits for a kick: re-arm it past our pops */
    struct vs_host_counters counters;
    uint32_t nfree;
    uint32_t free_slot[VS_HOST_SLOTS];
    struct vs_conn *slot[VS_HOST_SLOTS];
};

_Static_assert(VS_HOST_SLOTS >= VS_TABLE_MAX, "every fast connection can be in the loop");

struct vs_host *vs_host_new(struct vs_lock *lock, int py_fd, uint64_t guest_cid)
{
    struct vs_host *h = calloc(1, sizeof(*h));
    if (!h)
        return NULL;
    h->epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = PY_TOKEN};
    if (h->epfd < 0 || epoll_ctl(h->epfd, EPOLL_CTL_ADD, py_fd, &ev) < 0) {
        if (h->epfd >= 0)
            close(h->epfd);
        free(h);
        return NULL;
    }
    h->lock = lock;
    h->guest_cid = guest_cid;
    for (uint32_t i = 0; i < VS_HOST_SLOTS; i++)
        h->free_slot[h->nfree++] = VS_HOST_SLOTS - 1 - i;
    return h;
}

void vs_host_free(struct vs_host *h)
{
    if (h) {
        close(h->epfd);
        free(h);
    }
}

void vs_host_set_rx(struct vs_host *h, struct vr_queue *rxq, struct vr_chain *c, struct vr_capture *cap)
{
    h->rxq = rxq;
    h->chain = c;
    h->cap = cap;
}

void vs_host_set_flags(struct vs_host *h, uint32_t hold, uint32_t worker_waits)
{
    h->hold = hold;
    h->worker_waits = worker_waits;
}

/* 0 when the loop reads `c` now, -VR_E_NOMEM with every slot taken,
 * -VR_E_INVAL when epoll refuses its fd. */
int vs_host_add(struct vs_host *h, struct vs_conn *c)
{
    if (c->host_slot)
        return 0;
    if (c->fd < 0)
        return -VR_E_INVAL;
    if (h->nfree == 0)
        return -VR_E_NOMEM;
    uint32_t i = h->free_slot[--h->nfree];
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
    if (epoll_ctl(h->epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) {
        h->nfree++;
        return -VR_E_INVAL;
    }
    h->slot[i] = c;
    c->host_slot = i + 1;
    return 0;
}

/* Before Python closes the socket: a closed fd's number may come back as
 * another socket, which the removal would then hit. */
void vs_host_del(struct vs_host *h, struct vs_conn *c)
{
    if (!c->host_slot || c->host_slot > VS_HOST_SLOTS || h->slot[c->host_slot - 1] != c)
        return;
    uint32_t i = c->host_slot - 1;
    if (c->fd >= 0)
        epoll_ctl(h->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    h->slot[i] = NULL;
    h->free_slot[h->nfree++] = i;
    c->host_slot = 0;
}

void vs_host_counters(const struct vs_host *h, struct vs_host_counters *out)
{
    *out = h->counters;
}

static void hand_back(struct vs_host *h, struct vs_conn *c, uint32_t status, int32_t err,
                      struct vs_host_result *res)
{
    res->back[res->nback++] = (struct vs_back){c->peer_cid, c->host_port, c->guest_port, status, err};
    vs_host_del(h, c);
}

/* Fill from one readable connection; its vs_rx_fill status. */
static uint32_t fill(struct vs_host *h, struct vr_queue *q, struct vs_conn *c, int32_t *err,
                     uint32_t *pushed)
{
    if (c->fd < 0 || c->state != VS_ESTABLISHED || c->type != VS_STREAM || c->guest_shut_rcv)
        return VS_RX_SLOW;
    struct vs_rx_result r = {0};
    for (int round = 0; round < FILL_ROUNDS; round++) {
        vs_rx_fill(q, c, h->guest_cid, h->chain, FILL_MAX, h->cap, &r);
        h->counters.packets += r.packets;
        h->counters.bytes += r.bytes;
        *pushed += r.packets;
        if (r.status != VS_RX_MORE)
            break;
    }
    *err = r.err;
    return r.status;
}

int vs_host_run(struct vs_host *h, int timeout_ms, struct vs_host_result *res)
{
    struct epoll_event ev[VS_HOST_BATCH];

    memset(res, 0, sizeof(*res));
    for (;;) {
        int n = epoll_wait(h->epfd, ev, VS_HOST_BATCH, timeout_ms);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -VR_E_STATE;
        if (n == 0)
            return 0;
        uint32_t pushed = 0;
        vs_lock_acquire(h->lock);
        h->counters.wakeups++;
        struct vr_queue *q = h->rxq;
        int ok = q && h->chain && !h->hold && q->started && !vr_queue_broken(q);
        for (int i = 0; i < n; i++) {
            uint32_t idx = ev[i].data.u32;
            if (idx == PY_TOKEN) {
                res->py = 1;
                continue;
            }
            struct vs_conn *c = idx < VS_HOST_SLOTS ? h->slot[idx] : NULL;
            if (!c)
                continue; /* removed since epoll_wait returned */
            int32_t err = 0;
            uint32_t status = ok ? fill(h, q, c, &err, &pushed) : VS_RX_SLOW;
            if (ok && vr_queue_broken(q)) {
                res->rx_broken = 1;
                ok = 0;
            }
            if (status != VS_RX_DRAINED && status != VS_RX_MORE)
                hand_back(h, c, status, err, res);
        }
        if (pushed && !vr_queue_broken(q)) {
            if (h->worker_waits)
                vr_enable_notify(q);
            vr_notify_force(q);
        }
        vs_lock_release(h->lock);
        if (res->py || res->nback || res->rx_broken)
            return 0;
    }
}
