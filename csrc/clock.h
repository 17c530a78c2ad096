/*
 * clock.h - the one monotonic clock the C code reads.
 *
 * Spin budgets, stall timeouts, bench latencies and the MAC table's ageing
 * all measure intervals, so they read CLOCK_MONOTONIC (never the wall
 * clock: capture.c's pcap timestamps are the one CLOCK_REALTIME user).
 * Header-only so both native modules (_native, _driver) share it.
 */
#ifndef VR_CLOCK_H
#define VR_CLOCK_H

#include <stdint.h>
#include <time.h>

/* Nanoseconds on CLOCK_MONOTONIC. */
static inline uint64_t vr_clock_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

#endif
