/* Preprocessing x; see xsplit.h. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "algo/xsplit.h"

#include <math.h>
#include <string.h>

#include "common/alloc.h"

void kmv__xsplit_free(kmv__xsplit *xs, const kmv_allocator *a) {
    kmv__free(a, xs->h1);
    kmv__free(a, xs->xp);
    kmv__free(a, xs->wp);
    memset(xs, 0, sizeof *xs);
}

static double weight(const float *row, size_t c) {
    double s = 0.0;
    for (size_t u = 0; u < c; u++) s += (double)row[u] * row[u];
    return s;
}

int kmv__xsplit_run(kmv__xsplit *xs, const kmv_allocator *a, const kmv__keystore *ks,
                    const float *x, size_t c, double hi) {
    memset(xs, 0, sizeof *xs);
    size_t n = ks->n;
    xs->xp = kmv__malloc_array(a, n, c * sizeof(float));
    xs->wp = kmv__malloc_array(a, n, sizeof(double));
    if (xs->xp == NULL || xs->wp == NULL) goto nomem;
    for (size_t j = 0; j < n; j++) xs->nx2 += weight(x + j * c, c);
    xs->wbar = xs->nx2 / (double)n;
    /* n^-4 of the mean weight: the paper's x_j^2 <= n^-4 at ||x||^2 = n. */
    double lo = xs->wbar * pow((double)n, -4.0);
    double whi = hi * xs->wbar;
    for (size_t j = 0; j < n; j++) {
        double w = weight(x + j * c, c);
        if (w >= whi && w > 0.0) xs->n_h1++;
    }
    if (xs->n_h1 > 0) {
        xs->h1 = kmv__malloc_array(a, xs->n_h1, sizeof(uint32_t));
        if (xs->h1 == NULL) goto nomem;
    }
    size_t h = 0;
    for (size_t j = 0; j < n; j++) {
        const float *row = x + j * c;
        double w = weight(row, c);
        size_t p = ks->pos_of[j];
        float *dst = xs->xp + p * c;
        if (w >= whi && w > 0.0) {
            xs->h1[h++] = (uint32_t)j;
        } else if (w <= lo) {
            xs->n_drop++;
            xs->drop_l1 += sqrt(w);
        } else {
            xs->n_t++;
            memcpy(dst, row, c * sizeof(float));
            xs->wp[p] = w;
            if (w > xs->w_max_t) xs->w_max_t = w;
            continue;
        }
        memset(dst, 0, c * sizeof(float));
        xs->wp[p] = 0.0;
    }
    return KMV_OK;
nomem:
    kmv__xsplit_free(xs, a);
    return KMV_ENOMEM;
}
