/* Internal: ApproxLight, sampling the light keys (Algorithm 2, lines 8
 * to 10).
 *
 * Row i's light sum, sum over j in T \ S_i of K_ij x_j, is estimated from s
 * consecutive positions of the key store's random order starting at a
 * random offset (wrapping). Over the offset, every position is covered by
 * exactly s of the n windows, so (n / s) times the window's sum is unbiased
 * for any fixed order; over the random order the window is a uniform
 * sample without replacement, whose variance is at most n W_i / s with
 * W_i = sum over light keys of x_j^2 K_ij^2 (what the sketch estimates).
 * Heavy keys S_i that fall inside a window are skipped, since their exact
 * sum is added separately; keys the LSH missed are not in S_i and count as
 * light, so a miss costs variance, never bias. A contiguous window is a
 * dense distance loop rather than a gather of random rows (DEANN's
 * "permuted" estimator). Median of means is replaced by a plain mean with
 * the variance budget set for the whole vector (approx.c): per-row medians
 * would buy a union bound over rows that the l2 guarantee does not need. */
#ifndef KMV_ALGO_LIGHT_H
#define KMV_ALGO_LIGHT_H

#include <stddef.h>
#include <stdint.h>

#include "algo/keystore.h"
#include "common/rng.h"

/* Keys a window may use, beyond the heavy list: ids <= id_lim (a causal
 * row), and, when wp is not NULL, positions whose weight wp[p] is below whi
 * (the stream keeps every key's x in store order; those at or above whi are
 * summed exactly elsewhere). A masked key counts as a value of 0, so the
 * estimate stays unbiased for the masked sum. */
typedef struct kmv__keymask {
    uint32_t id_lim;
    const double *wp;
    double whi;
} kmv__keymask;

/* What every window of one row reads. Keys with K >= kappa whose id is in
 * heavy[0..n_heavy) (ascending) are skipped, and so are keys outside mask
 * (NULL: none). */
typedef struct kmv__light {
    const kmv__keystore *ks;
    const float *xp;  /* n x c values in store order (0 outside T) */
    size_t c;
    const float *q;
    float inv2s2;     /* 1 / (2 sigma^2) */
    float shift;      /* subtracted from every squared distance before the
                         exp (at most the smallest one): the kernel values
                         times exp(shift inv2s2), which an attention step
                         cancels in its ratio; 0 for the plain kernel */
    float kappa;
    const uint32_t *heavy;
    size_t n_heavy;
    const kmv__keymask *mask;
} kmv__light;

/* A window's scratch and result. */
typedef struct kmv__light_buf {
    float *chunk; /* 256 floats */
    double *acc;  /* 2 c: the window's per-column sums and sums of squares */
    double *est;  /* c: the estimate of the light sum, per column */
} kmv__light_buf;

/* The window positions [off, off + s) mod n, s in [1, n]: est the
 * estimate. With s = n and no heavy list, the exact sum over every stored
 * key. Returns the estimate's variance summed over columns (the without-
 * replacement formula on the window's own values); 0 when s = n or 1. */
double kmv__window(const kmv__light *l, size_t off, size_t s, const kmv__light_buf *b);

/* The variance of one column's estimate from the window kmv__window()
 * left in acc (its 2 c doubles), for s of n positions: the without-
 * replacement formula that kmv__window() sums over columns. */
double kmv__window_var_col(const double *acc, size_t c, size_t col, size_t n, size_t s);

/* z with P(Z > z) = p for a standard normal Z, p in (0, 0.5]; to 1e-12. */
double kmv__normal_upper(double p);

/* Where row i's window starts in round `round`: a hash of the seed, the
 * part's rng stream and the row, so that it does not depend on threads. */
static inline size_t kmv__window_offset(uint64_t seed, uint64_t stream, uint64_t i, int round,
                                        size_t n) {
    uint64_t st = kmv__rng_stream(seed, stream) ^ kmv__mix64(i * 2 + (uint64_t)round);
    return (size_t)kmv__rng_below(&st, n);
}

/* qsort's comparison of uint32_t ids, ascending. */
int kmv__cmp_u32(const void *pa, const void *pb);

/* Whether id is in the ascending list ids[0..len). */
int kmv__contains(const uint32_t *ids, size_t len, uint32_t id);

#endif /* KMV_ALGO_LIGHT_H */
