/* Shared helpers for kmv's tests: a seeded generator, float64 references and
 * allocators that count or fail. Header-only so each test stays one file. */
#ifndef KMV_TESTUTIL_H
#define KMV_TESTUTIL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#define KMV_STATIC_LINKING_ONLY /* tests read the engine's counters and set its knobs */
#include "kmv/kmv.h"
#include "kmv/kmv_experimental.h"

/* The engine's counters of a call. */
static inline kmv_stats_x tu_x(const kmv_stats *st) {
    kmv_stats_x x;
    kmv_stats_get_x(st, &x);
    return x;
}

/* p's experimental knobs, to change and set back with kmv_params_set_x(). */
static inline kmv_params_x tu_px(const kmv_params *p) {
    kmv_params_x x;
    kmv_params_get_x(p, &x);
    return x;
}

static inline uint64_t tu_next(uint64_t *s) {
    /* splitmix64: tiny, and good enough to make test data. */
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* Uniform in [-1, 1). */
static inline float tu_uniform(uint64_t *s) {
    return (float)((double)(tu_next(s) >> 11) * 0x1.0p-53 * 2.0 - 1.0);
}

static inline float *tu_random(size_t count, uint64_t seed, float amp) {
    float *v = malloc(count ? count * sizeof(float) : 1);
    for (size_t i = 0; i < count; i++) v[i] = amp * tu_uniform(&seed);
    return v;
}

/* float64 reference of the Gaussian product; yabs_out receives sum |K x|
 * per entry, the scale of the floating-point error bound. */
static inline void tu_ref_gauss(const float *q, size_t m, const float *k, size_t n, size_t d,
                                const float *x, size_t c, double sigma, int causal,
                                double *y, double *yabs) {
    for (size_t i = 0; i < m; i++) {
        for (size_t t = 0; t < c; t++) y[i * c + t] = yabs[i * c + t] = 0.0;
        for (size_t j = 0; j < n; j++) {
            if (causal && j > i) break;
            double d2 = 0.0;
            for (size_t u = 0; u < d; u++) {
                double diff = (double)q[i * d + u] - (double)k[j * d + u];
                d2 += diff * diff;
            }
            double kij = exp(-d2 / (2.0 * sigma * sigma));
            for (size_t t = 0; t < c; t++) {
                y[i * c + t] += kij * x[j * c + t];
                yabs[i * c + t] += kij * fabs((double)x[j * c + t]);
            }
        }
    }
}

/* float64 reference of D^{-1} A V with the row maximum subtracted; oabs
 * receives D^{-1} A |V|. */
static inline void tu_ref_attn(const float *q, size_t m, const float *k, size_t n, size_t d,
                               const float *v, size_t c, double scale, int causal, double *o,
                               double *oabs) {
    for (size_t i = 0; i < m; i++) {
        size_t nv = causal ? (i + 1 < n ? i + 1 : n) : n;
        double mx = -INFINITY;
        for (size_t j = 0; j < nv; j++) {
            double s = 0.0;
            for (size_t u = 0; u < d; u++) s += (double)q[i * d + u] * k[j * d + u];
            if (s * scale > mx) mx = s * scale;
        }
        double l = 0.0;
        for (size_t t = 0; t < c; t++) o[i * c + t] = oabs[i * c + t] = 0.0;
        for (size_t j = 0; j < nv; j++) {
            double s = 0.0;
            for (size_t u = 0; u < d; u++) s += (double)q[i * d + u] * k[j * d + u];
            double a = exp(s * scale - mx);
            l += a;
            for (size_t t = 0; t < c; t++) {
                o[i * c + t] += a * v[j * c + t];
                oabs[i * c + t] += a * fabs((double)v[j * c + t]);
            }
        }
        for (size_t t = 0; t < c; t++) {
            o[i * c + t] /= l;
            oabs[i * c + t] /= l;
        }
    }
}

/* Allocator that counts, and fails the fail_at-th call (1-based; 0 never). */
typedef struct tu_alloc_state {
    long calls, live, fail_at;
} tu_alloc_state;

static inline void *tu_alloc(void *opaque, size_t size) {
    tu_alloc_state *st = opaque;
    st->calls++;
    if (st->fail_at > 0 && st->calls == st->fail_at) return NULL;
    void *p = malloc(size);
    if (p != NULL) st->live++;
    return p;
}

static inline void tu_free(void *opaque, void *ptr) {
    tu_alloc_state *st = opaque;
    if (ptr != NULL) st->live--;
    free(ptr);
}

static inline kmv_allocator tu_allocator(tu_alloc_state *st) {
    kmv_allocator a = {tu_alloc, tu_free, st};
    return a;
}

#endif /* KMV_TESTUTIL_H */
