/* Internal: the exact engine, the reference every approximation is measured
 * against and the fallback when approximating would cost more. */
#ifndef KMV_EXACT_H
#define KMV_EXACT_H

#include <stddef.h>

#include "kmv/kmv.h"

/* One product's operands, already validated by the caller (kmv/api.c):
 * finite values, dim >= 1, every size product fits size_t and every
 * dimension passed to BLAS fits an int. */
typedef struct kmv__problem {
    const float *q; /* m x d */
    const float *k; /* n x d */
    const float *x; /* n x c */
    float *y;       /* m x c, output */
    size_t m, n, d, c;
    int causal;    /* row i sees keys j <= i */
    int n_threads; /* > 0 */
    void (*progress)(void *opaque, double fraction); /* may be NULL */
    void *progress_opaque;
} kmv__problem;

/* y = K x for the Gaussian kernel with bandwidth sigma. Keys are centred on
 * their mean first (distances do not change) so that the expansion
 * ||q||^2 + ||k||^2 - 2<q,k> keeps its precision on data far from the
 * origin, and its dot products are taken in double when float's rounding
 * would still cost more than 4e-6 of a kernel value (narrow bandwidths);
 * *wide tells which. Returns KMV_OK or KMV_ENOMEM (y untouched).
 * Requires n >= 1. */
int kmv__exact_gauss(const kmv_allocator *a, const kmv__problem *p, double sigma, int *wide,
                     int *threads);

/* Whether kmv__exact_gauss would take the double-precision path for these
 * operands (it costs about twice the float path): O((m + n) d). Returns
 * KMV_OK or KMV_ENOMEM. */
int kmv__exact_gauss_wide(const kmv_allocator *a, const float *q, size_t m, const float *k,
                          size_t n, size_t d, double sigma, int *wide);

/* y = D^{-1} A x with A_ij = exp(scale <q_i, k_j>), by an online softmax:
 * each row keeps its running maximum logit and rescales its sums when it
 * grows, so nothing overflows. Requires n >= 1 (with causal, every row then
 * sees key 0) and every |scale <q_i, k_j>| well inside float's range (the
 * caller checks). Returns KMV_OK or KMV_ENOMEM; *threads receives the number
 * of threads used (both engines). */
int kmv__exact_attn(const kmv_allocator *a, const kmv__problem *p, double scale, int *threads);

#endif /* KMV_EXACT_H */
