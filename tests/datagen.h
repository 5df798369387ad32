/* Synthetic data for the approximate engine's tests and benchmarks:
 * clustered points satisfying the paper's Assumption A, and the kinds of x
 * the tests run. Header-only; shared by //tests and //bench. */
#ifndef KMV_DATAGEN_H
#define KMV_DATAGEN_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "tests/testutil.h"

static inline double dg_unit(uint64_t *s) { return (double)(tu_next(s) >> 11) * 0x1.0p-53; }

static inline double dg_normal(uint64_t *s) {
    double u = 1.0 - dg_unit(s), v = dg_unit(s);
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

/* Clusters of `size` keys around centres drawn from N(0, sigma^2 I): two
 * centres lie about sigma sqrt(2 d) apart, so across clusters K_ij is about
 * exp(-d) (nothing, for d >= 32). Points scatter around their centre with
 * N(0, sigma^2 / d I) per coordinate, so two points of one cluster are about
 * sigma sqrt 2 apart and K_ij is about exp(-1). A row of K then holds about
 * `size` entries near e^-1 and nothing else, so the sum of K's entries is
 * linear in n: Assumption A with c about (size - 1) e^-1, not growing with
 * n. Queries (m of them) are fresh points of random clusters. */
static inline void dg_clustered(float *keys, size_t n, float *queries, size_t m, size_t d,
                                size_t size, double sigma, uint64_t seed) {
    size_t nc = (n + size - 1) / size;
    uint64_t s = seed * 0x2545f4914f6cdd1dULL + 7;
    double *ctr = (double *)malloc(nc * d * sizeof(double));
    for (size_t i = 0; i < nc * d; i++) ctr[i] = sigma * dg_normal(&s);
    double spread = sigma / sqrt((double)d);
    for (size_t j = 0; j < n; j++) {
        const double *c = ctr + (j / size) * d;
        for (size_t t = 0; t < d; t++) keys[j * d + t] = (float)(c[t] + spread * dg_normal(&s));
    }
    for (size_t i = 0; i < m; i++) {
        const double *c = ctr + (size_t)(dg_unit(&s) * (double)nc) * d;
        for (size_t t = 0; t < d; t++) queries[i * d + t] = (float)(c[t] + spread * dg_normal(&s));
    }
    free(ctr);
}

/* dg_clustered() with every point scaled to norm r: self-attention data
 * where a query's cluster mates carry its row and key norms are alike (so
 * Lemma 4.1's lifted kernel stays large). */
static inline void dg_sphere(float *keys, size_t n, float *queries, size_t m, size_t d, double r,
                             uint64_t seed) {
    dg_clustered(keys, n, queries, m, d, 16, 1.0, seed);
    float *rows[2] = {keys, queries};
    size_t cnt[2] = {n, m};
    for (int w = 0; w < 2; w++)
        for (size_t i = 0; i < cnt[w]; i++) {
            double s = 0.0;
            for (size_t t = 0; t < d; t++) s += (double)rows[w][i * d + t] * rows[w][i * d + t];
            for (size_t t = 0; t < d; t++) rows[w][i * d + t] = (float)(rows[w][i * d + t] * r / sqrt(s));
        }
}

typedef enum {
    DG_X_GAUSS,   /* mixed signs, N(0, 1) */
    DG_X_HUGE,    /* mixed signs with a few entries 1000 times larger */
    DG_X_NONNEG,  /* |N(0, 1)| */
    DG_X_ONES     /* all ones: kernel density */
} dg_xkind;

static inline void dg_x(float *x, size_t count, dg_xkind kind, uint64_t seed) {
    uint64_t s = seed * 0x9e3779b97f4a7c15ULL + 11;
    for (size_t i = 0; i < count; i++) {
        double v = dg_normal(&s);
        switch (kind) {
        case DG_X_GAUSS: x[i] = (float)v; break;
        case DG_X_HUGE: x[i] = (float)(dg_unit(&s) < 0.002 ? 1000.0 * v : v); break;
        case DG_X_NONNEG: x[i] = (float)fabs(v); break;
        case DG_X_ONES: x[i] = 1.0f; break;
        }
    }
}

#endif /* KMV_DATAGEN_H */
