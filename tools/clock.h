/* A monotonic clock in seconds, for the programs over the public API (the
 * tool, the model runner, the benchmarks, the tests); the library's own is
 * common/timer.h. Header-only. */
#ifndef KMV_TOOLS_CLOCK_H
#define KMV_TOOLS_CLOCK_H

#include <time.h>

static inline double tool_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#endif /* KMV_TOOLS_CLOCK_H */
