/* Exact single rows and the monitor; see rows.h. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "engine/rows.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "algo/kernel.h"
#include "algo/stats.h"
#include "common/alloc.h"
#include "common/threads.h"

#define CHUNK 256

void kmv__exact_row(const kmv__keystore *ks, const float *q, const float *x, size_t c,
                    double inv2s2, uint32_t lim, double *y) {
    float t[CHUNK];
    for (size_t col = 0; col < c; col++) y[col] = 0.0;
    for (size_t p0 = 0; p0 < ks->n; p0 += CHUNK) {
        size_t len = ks->n - p0 < CHUNK ? ks->n - p0 : CHUNK;
        kmv__sqdist_rows(q, ks->rows + p0 * ks->d, len, ks->d, t);
        kmv__gauss_row_dist(t, len, (float)inv2s2, NULL);
        for (size_t u = 0; u < len; u++) {
            uint32_t id = ks->id_at[p0 + u];
            if (id > lim) continue;
            const float *xj = x + (size_t)id * c;
            for (size_t col = 0; col < c; col++) y[col] += (double)t[u] * xj[col];
        }
    }
}

int kmv__verify_rows(const kmv_allocator *a, const kmv__keystore *ks, const float *q, size_t m,
                     const float *x, size_t c, const float *y, double inv2s2, int causal,
                     size_t every, int threads, kmv__stats *S) {
    if (every == 0 || m == 0 || c == 0) return KMV_OK;
    size_t nv = (m + every - 1) / every;
    double *err = kmv__malloc_array(a, nv, sizeof(double));
    double *ybuf = kmv__malloc_array(a, (size_t)(threads > 0 ? threads : 1), c * sizeof(double));
    if (err == NULL || ybuf == NULL) {
        kmv__free(a, err);
        kmv__free(a, ybuf);
        return KMV_ENOMEM;
    }
    double x2 = 0.0;
    for (size_t u = 0; u < ks->n * c; u++) x2 += (double)x[u] * x[u];
    double scale = x2 > 0.0 ? sqrt((double)m / x2) : 0.0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads > 0 ? threads : 1)
    for (size_t v = 0; v < nv; v++) {
        size_t i = v * every;
        double *ye = ybuf + (size_t)kmv__thread_id() * c;
        uint32_t lim = causal && i < UINT32_MAX ? (uint32_t)i : UINT32_MAX;
        kmv__exact_row(ks, q + i * ks->d, x, c, inv2s2, lim, ye);
        double e2 = 0.0;
        for (size_t col = 0; col < c; col++) {
            double t = (double)y[i * c + col] - ye[col];
            e2 += t * t;
        }
        err[v] = sqrt(e2) * scale;
    }
    kmv__stats_verified(S, err, nv);
    kmv__free(a, err);
    kmv__free(a, ybuf);
    return KMV_OK;
}
