/*
 * capture.c - the bounded pcap record ring (see capture.h).
 *
 * head and tail count bytes ever written and read (64-bit, never wrap in
 * practice); head - tail is the fill, offsets are taken modulo the size.
 * Records are stored whole, header and frame adjacent (they may wrap around
 * the end of the buffer), so the reader always finds a header at `tail`.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "capture.h"

struct vr_capture {
    pthread_mutex_t lock;
    uint8_t *buf;
    uint32_t size, snaplen;
    uint64_t head, tail;
    struct vr_capture_stats st;
};

struct vr_capture *vr_capture_new(uint32_t bytes, uint32_t snaplen)
{
    if (bytes == 0 || snaplen == 0 || snaplen > VR_CAPTURE_MAX_SNAPLEN)
        return NULL;
    struct vr_capture *cap = calloc(1, sizeof(*cap));
    if (!cap)
        return NULL;
    cap->buf = malloc(bytes);
    if (!cap->buf) {
        free(cap);
        return NULL;
    }
    cap->size = bytes;
    cap->snaplen = snaplen;
    pthread_mutex_init(&cap->lock, NULL);
    return cap;
}

void vr_capture_free(struct vr_capture *cap)
{
    if (cap) {
        pthread_mutex_destroy(&cap->lock);
        free(cap->buf);
        free(cap);
    }
}

/* Copy `len` bytes in at the head (the caller checked the room). */
static void ring_in(struct vr_capture *cap, const void *src, uint32_t len)
{
    uint32_t off = (uint32_t)(cap->head % cap->size);
    uint32_t first = cap->size - off < len ? cap->size - off : len;
    memcpy(cap->buf + off, src, first);
    memcpy(cap->buf, (const uint8_t *)src + first, len - first);
    cap->head += len;
}

/* Copy `len` bytes out from position `pos` (pos .. pos+len lies in the fill). */
static void ring_out(const struct vr_capture *cap, uint64_t pos, void *dst, uint32_t len)
{
    uint32_t off = (uint32_t)(pos % cap->size);
    uint32_t first = cap->size - off < len ? cap->size - off : len;
    memcpy(dst, cap->buf + off, first);
    memcpy((uint8_t *)dst + first, cap->buf, len - first);
}

void vr_capture_putv(struct vr_capture *cap, const void *head, uint32_t hlen,
                     const struct iovec *iov, int niov, uint32_t plen)
{
    uint64_t covered = 0;
    for (int i = 0; i < niov && covered < plen; i++)
        covered += iov[i].iov_len;
    if (covered > plen)
        covered = plen;
    uint64_t orig = (uint64_t)hlen + covered;
    if (orig > UINT32_MAX)
        orig = UINT32_MAX;
    uint32_t caplen = orig < cap->snaplen ? (uint32_t)orig : cap->snaplen;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    /* struct pcaprec_hdr: seconds, microseconds, captured length, original length */
    uint32_t rec[4] = {(uint32_t)ts.tv_sec, (uint32_t)(ts.tv_nsec / 1000), caplen, (uint32_t)orig};

    pthread_mutex_lock(&cap->lock);
    if ((uint64_t)cap->size - (cap->head - cap->tail) < VR_CAPTURE_RECORD_HDR + caplen) {
        cap->st.dropped++;
        pthread_mutex_unlock(&cap->lock);
        return;
    }
    ring_in(cap, rec, sizeof(rec));
    uint32_t left = caplen;
    uint32_t take = hlen < left ? hlen : left;
    ring_in(cap, head, take);
    left -= take;
    for (int i = 0; i < niov && left; i++) {
        take = iov[i].iov_len < left ? (uint32_t)iov[i].iov_len : left;
        ring_in(cap, iov[i].iov_base, take);
        left -= take;
    }
    cap->st.frames++;
    cap->st.bytes += VR_CAPTURE_RECORD_HDR + caplen;
    pthread_mutex_unlock(&cap->lock);
}

void vr_capture_put(struct vr_capture *cap, const uint8_t *frame, uint32_t len)
{
    vr_capture_putv(cap, frame, len, NULL, 0, 0);
}

uint32_t vr_capture_read(struct vr_capture *cap, uint8_t *buf, uint32_t bufcap,
                         uint64_t *dropped)
{
    uint32_t n = 0;
    pthread_mutex_lock(&cap->lock);
    while (cap->tail < cap->head) {
        uint32_t rec[4];
        ring_out(cap, cap->tail, rec, sizeof(rec));
        uint64_t total = VR_CAPTURE_RECORD_HDR + (uint64_t)rec[2];
        if (n + total > bufcap) {
            if (n == 0 && total > bufcap) {
                /* A record the caller's buffer can never hold: skip it, count it. */
                cap->tail += total;
                cap->st.frames--;
                cap->st.dropped++;
                continue;
            }
            break;
        }
        ring_out(cap, cap->tail, buf + n, (uint32_t)total);
        n += (uint32_t)total;
        cap->tail += total;
    }
    if (dropped)
        *dropped = cap->st.dropped;
    pthread_mutex_unlock(&cap->lock);
    return n;
}

void vr_capture_get_stats(struct vr_capture *cap, struct vr_capture_stats *out)
{
    pthread_mutex_lock(&cap->lock);
    *out = cap->st;
    pthread_mutex_unlock(&cap->lock);
}
