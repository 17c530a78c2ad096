/*
 * memory.c - guest address translation over a table of mapped regions.
 *
 * Guest physical addresses (descriptor buffers) may span regions and are
 * returned as segments split at region ends.  Ring addresses, which
 * vhost-user passes as front-end virtual addresses, must fall inside one
 * region and come back as one contiguous host range.  All arithmetic is
 * checked for 64-bit overflow: the guest controls every address and
 * length (virtio 1.2, 2.7.5 "The Virtqueue Descriptor Table").
 */
#include <string.h>

#include "vring.h"

/*
 * The region holding gpa and how many of the len bytes from gpa it holds
 * (the span stops at the region end).  NULL when gpa is in no region.
 */
static const struct vr_region *span_at(const struct vr_mem *m, uint64_t gpa, uint64_t len,
                                       uint64_t *chunk)
{
    const struct vr_region *r = vr_mem_find(m, gpa);
    if (r != NULL) {
        uint64_t rest = r->size - (gpa - r->gpa);
        *chunk = rest < len ? rest : len;
    }
    return r;
}

/*
 * Split [gpa, gpa+len) into segments at region ends.  A zero length gives
 * zero segments.  Returns VR_OK, VR_E_ADDRESS (outside every region or
 * addr+len overflows) or VR_E_CHAIN (more than cap segments).
 */
int vr_mem_translate(const struct vr_mem *m, uint64_t gpa, uint64_t len,
                     struct vr_seg *segs, uint32_t cap, uint32_t *nseg)
{
    uint32_t n = *nseg;

    if (len == 0)
        return VR_OK;
    /* virtio 1.2, 2.7.5: addr + len must not wrap the 64-bit space. */
    if (gpa + (len - 1) < gpa)
        return VR_E_ADDRESS;
    while (len > 0) {
        uint64_t chunk;
        const struct vr_region *r = span_at(m, gpa, len, &chunk);
        if (r == NULL)
            return VR_E_ADDRESS;
        uint64_t off = gpa - r->gpa;
        if (chunk > UINT32_MAX)
            chunk = UINT32_MAX; /* a descriptor len is 32 bits anyway */
        if (n >= cap)
            return VR_E_CHAIN;
        segs[n].offset = off;
        segs[n].len = (uint32_t)chunk;
        segs[n].region = (uint16_t)(r - m->regions);
        segs[n].writable = 0;
        n++;
        gpa += chunk;
        len -= chunk;
    }
    *nseg = n;
    return VR_OK;
}

/* Host pointer for [gpa, gpa+len) if it lies inside one region, else NULL. */
uint8_t *vr_mem_gpa_contig(const struct vr_mem *m, uint64_t gpa, uint64_t len)
{
    if (len == 0 || gpa + (len - 1) < gpa)
        return NULL;
    const struct vr_region *r = vr_mem_find(m, gpa);
    if (r == NULL)
        return NULL;
    uint64_t off = gpa - r->gpa;
    if (len > r->size - off)
        return NULL;
    return r->host + off;
}

/* Host pointer for a front-end virtual range inside one region, else NULL. */
uint8_t *vr_mem_uva_contig(const struct vr_mem *m, uint64_t uva, uint64_t len)
{
    if (len == 0 || uva + (len - 1) < uva)
        return NULL;
    for (uint32_t i = 0; i < m->nregions; i++) {
        const struct vr_region *r = &m->regions[i];
        if (uva >= r->uaddr && uva - r->uaddr < r->size) {
            uint64_t off = uva - r->uaddr;
            if (len > r->size - off)
                return NULL;
            return r->host + off;
        }
    }
    return NULL;
}

/* The guest-physical address of front-end address uva; 0 if mapped. */
int vr_mem_uva_to_gpa(const struct vr_mem *m, uint64_t uva, uint64_t *gpa)
{
    for (uint32_t i = 0; i < m->nregions; i++) {
        const struct vr_region *r = &m->regions[i];
        if (uva >= r->uaddr && uva - r->uaddr < r->size) {
            *gpa = r->gpa + (uva - r->uaddr);
            return VR_OK;
        }
    }
    return VR_E_ADDRESS;
}

/* Copy len bytes at gpa (possibly across regions) into dst. */
int vr_mem_read(const struct vr_mem *m, uint64_t gpa, void *dst, uint64_t len)
{
    uint8_t *out = dst;

    if (len == 0)
        return VR_OK;
    if (gpa + (len - 1) < gpa)
        return VR_E_ADDRESS;
    while (len > 0) {
        uint64_t chunk;
        const struct vr_region *r = span_at(m, gpa, len, &chunk);
        if (r == NULL)
            return VR_E_ADDRESS;
        memcpy(out, r->host + (gpa - r->gpa), chunk);
        out += chunk;
        gpa += chunk;
        len -= chunk;
    }
    return VR_OK;
}

/* Host pointer of a segment produced by vr_mem_translate on the same table. */
uint8_t *vr_seg_host(const struct vr_mem *m, const struct vr_seg *s)
{
    return m->regions[s->region].host + s->offset;
}

/*
 * Sanity-check a table built by Python: count, non-zero sizes, no
 * overflow, no GPA or VA overlap.  Python validates too; this keeps C
 * safe on its own.
 */
int vr_mem_check(const struct vr_mem *m)
{
    if (m->nregions > VR_MAX_REGIONS)
        return VR_E_INVAL;
    for (uint32_t i = 0; i < m->nregions; i++) {
        const struct vr_region *a = &m->regions[i];
        if (a->size == 0 || a->host == NULL ||
            a->gpa + (a->size - 1) < a->gpa ||
            a->uaddr + (a->size - 1) < a->uaddr)
            return VR_E_INVAL;
        for (uint32_t j = 0; j < i; j++) {
            const struct vr_region *b = &m->regions[j];
            if (a->gpa <= b->gpa + (b->size - 1) &&
                b->gpa <= a->gpa + (a->size - 1))
                return VR_E_INVAL;
            if (a->uaddr <= b->uaddr + (b->size - 1) &&
                b->uaddr <= a->uaddr + (a->size - 1))
                return VR_E_INVAL;
        }
    }
    return VR_OK;
}
