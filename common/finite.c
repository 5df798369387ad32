/* The finiteness scan every entry point runs on its operands (contract in
 * kmv.h). */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <math.h>

#include "kmv/kmv.h"

int kmv_find_nonfinite(const float *data, size_t count, size_t *where) {
    if (count == 0) return KMV_OK;
    /* A branch-free scan first: inputs are almost always clean, and the
     * position is only needed when they are not. */
    int bad = 0;
#pragma omp simd reduction(| : bad)
    for (size_t i = 0; i < count; i++) bad |= !isfinite(data[i]);
    if (!bad) return KMV_OK;
    for (size_t i = 0; i < count; i++) {
        if (!isfinite(data[i])) {
            if (where != NULL) *where = i;
            break;
        }
    }
    return KMV_ENONFINITE;
}
