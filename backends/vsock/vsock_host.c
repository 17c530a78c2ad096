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
 * A connection that finds the rx ring empty waits for buffers in C: it
 * leaves the epoll set for a list, oldest first, and guest kicks are
 * turned on.  The rx queue's worker runs vs_rx_handler() on the kick: it
 * calls Python's handler first when Python has work there (control
 * packets, connections of its own, the first run of a session, a reset
 * due), then fills the waiting connections and puts them back in the
 * epoll set, and tells vr_run to leave kicks off when nobody waits.
 *
 * Anything else goes back to Python, which owns the connection's state:
 * no credit, EOF, an error, an odd buffer, a connection that is no longer
 * a plain established stream, an rx queue C may not fill now (stopped,
 * broken, a transport reset due).  The connection leaves the loop (its
 * slot freed) and its key is reported; Python marks it readable and lets
 * the rx worker finish it, and registers it here again once it is
 * drained.  Python also removes a
 * connection (under the lock) before it closes its socket or drops its
 * record, so a slot never points at freed memory; an event for a slot
 * freed since epoll_wait() returned is ignored.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "vsock.h"

#define PY_TOKEN 0xFFFFFFFFu   /* epoll data of the Python selector's fd */
#define POKE_TOKEN 0xFFFFFFFEu /* ... and of the eventfd the rx handler pokes */
#define NONE 0xFFFFFFFFu
enum { SLOT_FREE = 0, SLOT_POLL = 1, SLOT_WAIT = 2 };
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
    uint32_t worker_waits;     /* Python's rx handler waits for a kick: re-arm it past our pops */
    uint32_t py_work;          /* Python's rx handler has work: call it first */
    uint32_t ctrl;             /* Python has control packets queued */
    vr_handler_fn py_fn;       /* Python's rx handler (the vr_run trampoline) */
    void *py_ctx;
    int poke;                  /* eventfd: hand-backs from the rx handler are pending */
    struct vs_host_counters counters;
    uint32_t nfree;
    uint32_t free_slot[VS_HOST_SLOTS];
    struct vs_conn *slot[VS_HOST_SLOTS];
    uint8_t state[VS_HOST_SLOTS];                /* SLOT_* */
    uint32_t wnext[VS_HOST_SLOTS], wprev[VS_HOST_SLOTS];
    uint32_t whead, wtail;                       /* waiting for rx buffers, oldest first */
    uint32_t npend;                              /* handed back by the rx handler */
    struct vs_back pend[VS_HOST_SLOTS];
};

_Static_assert(VS_HOST_SLOTS >= VS_TABLE_MAX, "every fast connection can be in the loop");

struct vs_host *vs_host_new(struct vs_lock *lock, int py_fd, uint64_t guest_cid)
{
    struct vs_host *h = calloc(1, sizeof(*h));
    if (!h)
        return NULL;
    h->epfd = epoll_create1(EPOLL_CLOEXEC);
    h->poke = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = PY_TOKEN};
    struct epoll_event pk = {.events = EPOLLIN, .data.u32 = POKE_TOKEN};
    if (h->epfd < 0 || h->poke < 0 || epoll_ctl(h->epfd, EPOLL_CTL_ADD, py_fd, &ev) < 0 ||
        epoll_ctl(h->epfd, EPOLL_CTL_ADD, h->poke, &pk) < 0) {
        if (h->epfd >= 0)
            close(h->epfd);
        if (h->poke >= 0)
            close(h->poke);
        free(h);
        return NULL;
    }
    h->lock = lock;
    h->guest_cid = guest_cid;
    h->py_work = 1;
    h->whead = h->wtail = NONE;
    for (uint32_t i = 0; i < VS_HOST_SLOTS; i++)
        h->free_slot[h->nfree++] = VS_HOST_SLOTS - 1 - i;
    return h;
}

void vs_host_free(struct vs_host *h)
{
    if (h) {
        close(h->epfd);
        close(h->poke);
        free(h);
    }
}

void vs_host_set_rx(struct vs_host *h, struct vr_queue *rxq, struct vr_chain *c, struct vr_capture *cap)
{
    h->rxq = rxq;
    h->chain = c;
    h->cap = cap;
    if (!rxq)
        h->py_work = 1; /* the next session's first run is Python's */
}

void vs_host_set_ctrl(struct vs_host *h, uint32_t queued)
{
    h->ctrl = queued;
}

void vs_host_set_py(struct vs_host *h, vr_handler_fn fn, void *ctx)
{
    h->py_fn = fn;
    h->py_ctx = ctx;
}

void vs_host_py_work(struct vs_host *h)
{
    vs_lock_acquire(h->lock);
    h->py_work = 1;
    vs_lock_release(h->lock);
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
    h->state[i] = SLOT_POLL;
    c->host_slot = i + 1;
    return 0;
}

static void wait_unlink(struct vs_host *h, uint32_t i)
{
    uint32_t p = h->wprev[i], n = h->wnext[i];
    if (p == NONE)
        h->whead = n;
    else
        h->wnext[p] = n;
    if (n == NONE)
        h->wtail = p;
    else
        h->wprev[n] = p;
}

/* Out of the epoll set, onto the end of the waiting list. */
static void park(struct vs_host *h, uint32_t i)
{
    epoll_ctl(h->epfd, EPOLL_CTL_DEL, h->slot[i]->fd, NULL);
    h->state[i] = SLOT_WAIT;
    h->wnext[i] = NONE;
    h->wprev[i] = h->wtail;
    if (h->wtail == NONE)
        h->whead = i;
    else
        h->wnext[h->wtail] = i;
    h->wtail = i;
}

/* Off the waiting list, into the epoll set again; 0 when epoll refuses. */
static int unpark(struct vs_host *h, uint32_t i)
{
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
    wait_unlink(h, i);
    h->state[i] = SLOT_POLL;
    return epoll_ctl(h->epfd, EPOLL_CTL_ADD, h->slot[i]->fd, &ev) == 0;
}

/* Before Python closes the socket: a closed fd's number may come back as
 * another socket, which the removal would then hit. */
void vs_host_del(struct vs_host *h, struct vs_conn *c)
{
    if (!c->host_slot || c->host_slot > VS_HOST_SLOTS || h->slot[c->host_slot - 1] != c)
        return;
    uint32_t i = c->host_slot - 1;
    if (h->state[i] == SLOT_WAIT)
        wait_unlink(h, i);
    else if (c->fd >= 0)
        epoll_ctl(h->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    h->state[i] = SLOT_FREE;
    h->slot[i] = NULL;
    h->free_slot[h->nfree++] = i;
    c->host_slot = 0;
}

void vs_host_counters(const struct vs_host *h, struct vs_host_counters *out)
{
    *out = h->counters;
}

/* Out of the loop, reported in `res`, or (NULL) kept for the host thread
 * in `pend`; 0 when `pend` is full (the connection stays where it is). */
static int hand_back(struct vs_host *h, struct vs_conn *c, uint32_t status, int32_t err,
                     struct vs_host_result *res)
{
    struct vs_back b = {c->peer_cid, c->host_port, c->guest_port, status, err};
    if (res)
        res->back[res->nback++] = b;
    else if (h->npend < VS_HOST_SLOTS)
        h->pend[h->npend++] = b;
    else
        return 0;
    vs_host_del(h, c);
    return 1;
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

/* Fill the waiting connections, oldest first, while the ring has buffers
 * (lock held, `q` fillable); back in the epoll set when drained.  Returns
 * 1 while some still wait.  Hand-backs go to `res`, or to `pend` (NULL),
 * counted in *poked. */
static int serve_waiting(struct vs_host *h, struct vr_queue *q, uint32_t *pushed,
                         struct vs_host_result *res, int *poked)
{
    while (h->whead != NONE && !vr_queue_broken(q)) {
        if (res && res->nback >= VS_HOST_BATCH)
            return 1; /* no room to report one: the rest next time */
        uint32_t i = h->whead;
        struct vs_conn *c = h->slot[i];
        int32_t err = 0;
        uint32_t status = fill(h, q, c, &err, pushed);
        if (status == VS_RX_NO_BUFFER)
            return 1;
        if (status == VS_RX_DRAINED || status == VS_RX_MORE) {
            if (unpark(h, i))
                continue;
            status = VS_RX_SLOW;
        }
        if (!hand_back(h, c, status, err, res))
            return 1;
        *poked += !res;
    }
    return 0;
}

/* A connection waits for buffers: make sure a kick comes, and take the
 * buffers that came before the request could be seen. */
static void want_kick(struct vs_host *h, struct vr_queue *q, uint32_t *pushed,
                      struct vs_host_result *res, int *poked)
{
    while (h->whead != NONE && !vr_queue_broken(q) && vr_enable_notify(q)) {
        if (!serve_waiting(h, q, pushed, res, poked))
            break;
    }
}

int vs_rx_handler(void *ctx, struct vr_queue *q)
{
    struct vs_host *h = ctx;
    int rc = 0, poked = 0, waiting = 0;
    uint32_t pushed = 0;

    vs_lock_acquire(h->lock);
    if (h->py_work || h->worker_waits || h->hold || q != h->rxq) {
        h->py_work = 0;
        vs_lock_release(h->lock);
        rc = h->py_fn ? h->py_fn(h->py_ctx, q) : VR_HANDLER_IDLE;
        if (rc < 0)
            return rc;
        vs_lock_acquire(h->lock);
        if (h->worker_waits || h->hold || q != h->rxq || !h->chain) {
            vs_lock_release(h->lock);
            return rc;
        }
    }
    if (q->started && !vr_queue_broken(q)) {
        waiting = serve_waiting(h, q, &pushed, NULL, &poked);
        if (waiting)
            want_kick(h, q, &pushed, NULL, &poked);
        waiting = h->whead != NONE;
    }
    vs_lock_release(h->lock);
    if (poked) {
        uint64_t one = 1;
        ssize_t w = write(h->poke, &one, sizeof(one));
        (void)w; /* EAGAIN: the counter is full, the loop wakes anyway */
    }
    return waiting ? 0 : VR_HANDLER_IDLE;
}

static void take_pending(struct vs_host *h, struct vs_host_result *res)
{
    uint32_t n = h->npend < VS_HOST_BATCH - res->nback ? h->npend : VS_HOST_BATCH - res->nback;
    memcpy(res->back + res->nback, h->pend, n * sizeof(*h->pend));
    res->nback += n;
    memmove(h->pend, h->pend + n, (h->npend - n) * sizeof(*h->pend));
    h->npend -= n;
}

int vs_host_run(struct vs_host *h, int timeout_ms, struct vs_host_result *res)
{
    struct epoll_event ev[VS_HOST_BATCH];

    memset(res, 0, sizeof(*res));
    vs_lock_acquire(h->lock);
    take_pending(h, res);
    vs_lock_release(h->lock);
    if (res->nback)
        return 0;
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
        int poked = 0;
        for (int i = 0; i < n; i++) {
            uint32_t idx = ev[i].data.u32;
            if (idx == PY_TOKEN) {
                res->py = 1;
                continue;
            }
            if (idx == POKE_TOKEN) {
                uint64_t v;
                ssize_t r = read(h->poke, &v, sizeof(v));
                (void)r;
                take_pending(h, res);
                continue;
            }
            struct vs_conn *c = idx < VS_HOST_SLOTS ? h->slot[idx] : NULL;
            if (!c || h->state[idx] != SLOT_POLL || res->nback >= VS_HOST_BATCH)
                continue; /* removed since epoll_wait returned; or no room: it comes back */
            int32_t err = 0;
            uint32_t status = ok ? fill(h, q, c, &err, &pushed) : VS_RX_SLOW;
            if (ok && vr_queue_broken(q)) {
                res->rx_broken = 1;
                ok = 0;
            }
            if (status == VS_RX_NO_BUFFER && ok)
                park(h, idx);
            else if (status != VS_RX_DRAINED && status != VS_RX_MORE)
                hand_back(h, c, status, err, res);
        }
        if (ok)
            want_kick(h, q, &pushed, res, &poked);
        if (pushed && !vr_queue_broken(q)) {
            if (h->worker_waits || h->whead != NONE)
                vr_enable_notify(q);
            vr_notify_force(q);
        }
        vs_lock_release(h->lock);
        if (res->py || res->nback || res->rx_broken)
            return 0;
    }
}

/* ---- the tx queue's handler ---- */

#define TX_BURST 64 /* packets per vs_tx_burst call: bounds one hold of the lock */

/* The rx queue C's tx path may write credit updates to, or NULL (lock held):
 * none while Python's control packets wait, since those go first. */
static struct vr_queue *rx_for_c(const struct vs_host *h)
{
    struct vr_queue *rxq = h->rxq;
    if (!rxq || !h->chain || h->ctrl || h->hold || !rxq->started || vr_queue_broken(rxq))
        return NULL;
    return rxq;
}

int vs_tx_handler(void *ctx, struct vr_queue *q)
{
    struct vs_tx *x = ctx;
    struct vs_host *h = x->h;

    vs_lock_acquire(h->lock);
    if (x->py_work || h->hold || q != x->txq || !x->py_fn) {
        x->py_work = 0;
        x->stash_kind = VS_STASH_NONE;
        vs_lock_release(h->lock);
        return x->py_fn ? x->py_fn(x->py_ctx, q) : 0;
    }
    for (;;) {
        struct vr_queue *rxq = rx_for_c(h);
        struct vs_tx_result *r = &x->stash;
        vs_tx_burst(q, x->t, h->guest_cid, x->c, TX_BURST, h->cap, rxq, x->rxc, r);
        x->counters.packets += r->packets;
        x->counters.bytes += r->bytes;
        x->counters.credit_in += r->credit_in;
        x->counters.rx_pushed += r->rx_pushed;
        int rx_broke = rxq && r->rx_pushed && vr_queue_broken(rxq);
        if (r->status == VS_TX_SLOW) {
            /* The chain may be a packet for a sibling VM: Python takes it
             * without our lock (relays take the other VM's). */
            x->stash_kind = VS_STASH_SLOW;
            vs_lock_release(h->lock);
            return x->py_fn(x->py_ctx, q);
        }
        if (r->status == VS_TX_PARTIAL || r->status == VS_TX_ATTENTION || rx_broke) {
            x->stash_kind = VS_STASH_LOCKED;
            int rc = x->py_fn(x->py_ctx, q); /* recursive: Python's `with` takes it again */
            x->stash_kind = VS_STASH_NONE;
            if (rc < 0 || x->py_work || h->hold) {
                vs_lock_release(h->lock);
                return rc < 0 ? rc : 0;
            }
            if (r->status != VS_TX_EMPTY)
                continue;
        }
        if (r->status == VS_TX_EMPTY || vr_queue_broken(q)) {
            vs_lock_release(h->lock);
            return 0;
        }
        /* VS_TX_MORE: let the other threads in between bursts */
        vs_lock_release(h->lock);
        vs_lock_acquire(h->lock);
        if (x->py_work || h->hold) {
            vs_lock_release(h->lock);
            return 0; /* the wake that set it runs Python's handler next */
        }
    }
}
