/* Internal: a monotonic clock for the phase timings in kmv_stats. */
#ifndef KMV_TIMER_H
#define KMV_TIMER_H

#include <time.h>

static inline double kmv__now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#endif /* KMV_TIMER_H */
