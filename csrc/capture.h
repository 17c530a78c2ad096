/*
 * capture.h - a bounded ring of ready-made pcap records, shared by the
 * engines that capture what they move (net's switch, vsock's data path).
 *
 * Theory of operation
 * -------------------
 * The data path appends one record per frame (the 16-byte pcap record
 * header, then the frame cut to the snap length, with the original length
 * kept in the header) and never waits: when the ring has no room for the
 * whole record, the frame is dropped from the capture only and counted.  A
 * reader thread (Python, GIL released here) takes whole records out and
 * writes them to the file, so the file is valid pcap whatever was dropped.
 * One mutex guards the ring; it is held for two memcpys per record, never
 * across I/O.  The ring is allocated once; nothing here allocates per frame.
 */
#ifndef VR_CAPTURE_H
#define VR_CAPTURE_H

#include <stdint.h>
#include <sys/uio.h>

/* cdef-begin */
#define VR_CAPTURE_RECORD_HDR 16u       /* struct pcaprec_hdr */
#define VR_CAPTURE_MAX_SNAPLEN 262144u  /* tcpdump's MAXIMUM_SNAPLEN */

struct vr_capture;

struct vr_capture_stats {
    uint64_t frames;        /* records appended */
    uint64_t dropped;       /* frames the ring had no room for */
    uint64_t bytes;         /* record bytes appended (headers included) */
};

/* A ring of `bytes` bytes whose records keep at most `snaplen` bytes of a
 * frame; NULL when out of memory or snaplen is 0 or over the maximum. */
struct vr_capture *vr_capture_new(uint32_t bytes, uint32_t snaplen);
void vr_capture_free(struct vr_capture *cap);

/* Append one frame: `head` (hlen bytes) then the first `plen` bytes that
 * `iov` covers (fewer if it covers fewer).  Never blocks on the reader. */
void vr_capture_putv(struct vr_capture *cap, const void *head, uint32_t hlen,
                     const struct iovec *iov, int niov, uint32_t plen);
/* Append one contiguous frame. */
void vr_capture_put(struct vr_capture *cap, const uint8_t *frame, uint32_t len);

/* Move whole records (at most `bufcap` bytes) into `buf`; returns the bytes
 * moved.  *dropped gets the drop count so far (may be NULL). */
uint32_t vr_capture_read(struct vr_capture *cap, uint8_t *buf, uint32_t bufcap,
                         uint64_t *dropped);
void vr_capture_get_stats(struct vr_capture *cap, struct vr_capture_stats *out);

/* cdef-end */

#endif
