/* Internal: the regression solvers behind kmv_regress() (docs/regress.md).
 * Everything is float64; A arrives as float32 and is widened once. One
 * file per part: krylov.c (preconditioned conjugate gradients and LSQR
 * over operator callbacks), sketch.c (CountSketch and the QR of SA),
 * gram.c (GRAM and AGRAM), exp.c (EXP: kmv's kernel products in the log
 * domain, the Nystrom preconditioner), regress.c (the entry point). */
#ifndef KMV_REGRESS_H
#define KMV_REGRESS_H

#include <stddef.h>
#include <stdint.h>

#include "common/alloc.h"
#include "common/params.h"

/* y = Op x for vectors of the operator's size; KMV_OK or an error code,
 * which ends the iteration with it. */
typedef int (*kmv__op_fn)(void *ctx, const double *x, double *y);

/* What a Krylov solve did. */
typedef struct kmv__krylov_result {
    int iterations;
    int converged;
    double rel_residual; /* the iteration's own estimate at the end */
} kmv__krylov_result;

/* Where to record each iteration's relative residual (history may be
 * NULL); `at` counts across solves, so several fill one array. */
typedef struct kmv__history {
    double *history;
    size_t len, at;
} kmv__history;

/* Preconditioned conjugate gradients for M x = b, M symmetric positive
 * definite of size n (apply_m), preconditioner P ~ M^-1 (apply_p, NULL
 * for none), from x = 0. Stops at ||b - M x|| <= tol ||b|| (the
 * recurrence's residual) or max_iter. x is n doubles. */
int kmv__pcg(const kmv_allocator *a, size_t n, kmv__op_fn apply_m, void *m_ctx,
             kmv__op_fn apply_p, void *p_ctx, const double *b, double *x, double tol,
             int max_iter, kmv__history *h, kmv__krylov_result *out);

/* EXP's Nystrom preconditioner (nystrom.c): P ~ (E Mt E)^-1 for Mt = T K T
 * + R, K the Gaussian kernel exp(-s ||a_i - a_j||^2 / 2) of A's rows, T,
 * R and E diagonal (R >= 0, E > 0), from `cols` columns of T K T drawn by
 * randomly pivoted Cholesky from seed's KMV__RNG_NYSTROM stream. */
typedef struct kmv__nystrom {
    size_t n, k, ld;  /* k columns kept; 0: Jacobi alone, P = E^-2 */
    double *q;        /* Q, n x k row-major (leading dimension ld) */
    double *z, *h, *c; /* Z (k x k), the whitening over E (n), scratch (2k) */
    const double *e;  /* E, the caller's */
} kmv__nystrom;

/* Build *out (zeroed first; n and e set even on error). KMV_OK (k = 0
 * where T K T gives nothing to build on or LAPACK fails) or KMV_ENOMEM,
 * with nothing held then. a: n x d float32; t, r, e: n entries, e kept. */
int kmv__nystrom_build(const kmv_allocator *al, const float *a, size_t n, size_t d, double s,
                       const double *t, const double *r, const double *e, size_t cols,
                       uint64_t seed, int threads, kmv__nystrom *out);
/* y = P v (not in place); uses ny's scratch, so one call at a time. */
void kmv__nystrom_apply(kmv__nystrom *ny, const double *v, double *y);
/* Release what build took; NULLs are fine. */
void kmv__nystrom_free(const kmv_allocator *al, kmv__nystrom *ny);

/* LSQR (Paige and Saunders) for min ||A x - b||, A of m x n given by
 * apply_a (x -> A x) and apply_at (y -> A^T y), from x = 0. Stops when
 * ||A^T r|| <= tol ||A|| ||r|| (the estimate of LSQR's own test), or when
 * ||r|| <= tol ||b||, or at max_iter. x is n doubles. */
int kmv__lsqr(const kmv_allocator *a, size_t m, size_t n, kmv__op_fn apply_a, kmv__op_fn apply_at,
              void *op_ctx, const double *b, double *x, double tol, int max_iter, kmv__history *h,
              kmv__krylov_result *out);

/* R (d x d, upper triangular, row-major, zero below the diagonal) of the
 * QR of S A, S an s-row CountSketch drawn from seed's KMV__RNG_REGRESS
 * stream, A row-major n x d. d <= s <= INT_MAX, else KMV_EINVAL; also
 * KMV_ENOMEM. A R^-1 has a condition number O(1) with high probability
 * when s is a small multiple of d. */
int kmv__sketch_r(const kmv_allocator *al, uint64_t seed, const double *a, size_t n, size_t d,
                  size_t s, double *r);

/* GRAM and AGRAM (rp->problem): a is A widened to float64, row-major n x
 * d; b has d (GRAM) or n (AGRAM) entries; x gets d. Fills every field of
 * st that concerns these problems (residual and residual_optimal in
 * float64, products counting A and A^T products). */
int kmv__regress_gram(const kmv__params *pa, const kmv_allocator *al,
                      const kmv_regress_params *rp, const double *a, size_t n, size_t d,
                      const double *b, double *x, kmv_regress_stats *st);

/* EXP: a is A as given (float32, n x d), b and x have n entries. Kernel
 * products go through an index under pa (exact under pa->exact). Fills
 * every field of st that concerns EXP. KMV_EOVERFLOW (st->log_scale_max
 * set) where the diagonal scaling leaves double's range. */
int kmv__regress_exp(const kmv__params *pa, const kmv_allocator *al,
                     const kmv_regress_params *rp, const float *a, size_t n, size_t d,
                     const double *b, double *x, kmv_regress_stats *st);

#endif /* KMV_REGRESS_H */
