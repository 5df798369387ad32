/* Window sampling of light keys; see light.h. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "algo/light.h"

#include <math.h>
#include <string.h>

#include "algo/kernel.h"

#define CHUNK 256

int kmv__cmp_u32(const void *pa, const void *pb) {
    uint32_t a = *(const uint32_t *)pa, b = *(const uint32_t *)pb;
    return (a > b) - (a < b);
}

int kmv__contains(const uint32_t *ids, size_t len, uint32_t id) {
    size_t lo = 0, hi = len;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (ids[mid] < id) lo = mid + 1;
        else hi = mid;
    }
    return lo < len && ids[lo] == id;
}

double kmv__window(const kmv__light *l, size_t off, size_t s, const kmv__light_buf *b) {
    const kmv__keystore *ks = l->ks;
    const kmv__keymask *mask = l->mask;
    const float *xp = l->xp, *q = l->q;
    float inv2s2 = l->inv2s2, shift = l->shift, kappa = l->kappa, *scratch = b->chunk;
    const uint32_t *heavy = l->heavy;
    size_t n = ks->n, d = ks->d, c = l->c, n_heavy = l->n_heavy;
    double *acc = b->acc, *est = b->est;
    double *sum = acc, *sq = acc + c;
    memset(acc, 0, 2 * c * sizeof(double));
    size_t done = 0;
    while (done < s) {
        size_t p0 = (off + done) % n;
        size_t len = s - done;
        if (len > CHUNK) len = CHUNK;
        if (len > n - p0) len = n - p0; /* wrap at the end of the order */
        kmv__sqdist_rows(q, ks->rows + p0 * d, len, d, scratch);
        if (shift != 0.0f)
            for (size_t u = 0; u < len; u++) scratch[u] -= shift;
        kmv__gauss_row_dist(scratch, len, inv2s2, NULL);
        for (size_t u = 0; u < len; u++) {
            float kv = scratch[u];
            size_t p = p0 + u;
            /* The heavy list holds keys whose value, computed elsewhere,
             * was >= kappa: the slack keeps a rounding difference from
             * counting one twice. */
            if (kv >= 0.999f * kappa && n_heavy > 0 && kmv__contains(heavy, n_heavy, ks->id_at[p]))
                continue;
            if (mask != NULL &&
                (ks->id_at[p] > mask->id_lim || (mask->wp != NULL && mask->wp[p] >= mask->whi)))
                continue;
            const float *xr = xp + p * c;
            for (size_t col = 0; col < c; col++) {
                double f = (double)kv * xr[col];
                sum[col] += f;
                sq[col] += f * f;
            }
        }
        done += len;
    }
    double scale = (double)n / (double)s;
    double var = 0.0;
    for (size_t col = 0; col < c; col++) {
        est[col] = scale * sum[col];
        var += kmv__window_var_col(acc, c, col, n, s);
    }
    return var;
}

double kmv__window_var_col(const double *acc, size_t c, size_t col, size_t n, size_t s) {
    if (s <= 1 || s >= n) return 0.0;
    double sum = acc[col], sq = acc[c + col];
    double s2 = (sq - sum * sum / (double)s) / (double)(s - 1);
    if (s2 < 0.0) s2 = 0.0;
    /* Var of N * mean without replacement: N^2 (1 - s/N) S^2 / s. */
    return (double)n * (double)n * (1.0 - (double)s / (double)n) * s2 / (double)s;
}

double kmv__normal_upper(double p) {
    /* Bisection on the tail 0.5 erfc(z / sqrt 2), decreasing in z. */
    double lo = 0.0, hi = 40.0;
    for (int it = 0; it < 80 && hi - lo > 1e-12; it++) {
        double mid = 0.5 * (lo + hi);
        if (0.5 * erfc(mid / sqrt(2.0)) > p) lo = mid;
        else hi = mid;
    }
    return 0.5 * (lo + hi);
}
