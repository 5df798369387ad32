/* GRAM, min ||(A^T A)^j x - b||, and AGRAM, min ||A (A^T A)^j x - b||, by
 * sketch-and-precondition (docs/regress.md):
 *  - R from the QR of a CountSketch of A (sketch.c), so that A R^-1 is
 *    well-conditioned whatever cond(A) is;
 *  - AGRAM: y = argmin ||A y - b|| by LSQR on A R^-1. With A of full
 *    column rank y = (A^T A)^j x ranges over all of R^d, so both problems
 *    have the same optimum;
 *  - then j solves of (A^T A) u = v, by conjugate gradients preconditioned
 *    with (R^T R)^-1 = R^-1 R^-T, take b (GRAM) or y (AGRAM) to x.
 * (A^T A)^j is never formed: each product is two passes of dgemv over A,
 * fused into one pass where A^T A is applied whole.
 *
 * Where float64 cannot hold the solution (M = (A^T A)^j or A (A^T A)^j
 * numerically singular: DBL_EPSILON cond(M) near 1 or past it), the
 * iterations only amplify rounding; spectral() then gives a filtered
 * solution over A's singular vectors, from the same sketch. It also runs
 * where the iterations fell short of tol, and the lesser residual wins. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <cblas.h>
#include <float.h>
#include <lapacke.h>
#include <limits.h>
#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/timer.h"
#include "regress/regress.h"

/* Relative residuals an inner solve is asked for go no lower: past it the
 * recurrence's residual goes on falling while the true one does not
 * (float64 products of A carry errors near DBL_EPSILON ||A||^2 ||u||). */
#define TOL_FLOOR 1e-15

/* The iterations are tried while DBL_EPSILON cond(M) stays under this,
 * cond(M) estimated from R. The exact solution x of a random b has
 * ||x|| ~ cond(M) ||b|| / ||M||, so its float64 rounding alone moves M x
 * by about DBL_EPSILON cond(M) ||b|| (measured, on the iterations' x:
 * 0.005 to 0.2 of that). Past 100 the iterations' answer is noise larger
 * than b, and only spectral() runs; under it they may still beat it
 * (GRAM, cond(A) = 1e8, j = 1: a residual of 0.011 against 0.038). */
#define ITERATE_NOISE 100.0

/* spectral()'s candidates: FILTERS filters, gamma from FILTER_MAX down by
 * halves, each then measured. */
#define FILTERS 7
#define FILTER_MAX 4.0

/* SMALL_WORK: LAPACK on d x d (or 4d x d) matrices runs on one thread of
 * a team of the call's threads, as the products do, so OpenBLAS (its
 * OpenMP build) stays on that thread: called outside a team it forks for
 * each of the many small BLAS calls LAPACK makes, and on a loaded machine
 * each fork can wait for a descheduled thread (a 256 x 64 QR seen taking
 * 0.4 s instead of 1 ms). */

/* A's products. Rows go in blocks of BLOCK_BYTES, each thread summing its
 * blocks' share of A^T u, so a block read for A v is still in cache for
 * A^T (A v), and the sums come in a fixed order (the same x bit for bit). */
#define BLOCK_BYTES (256u << 10)

typedef struct gram_ops {
    const double *a;
    size_t n, d, block, nblocks;
    int threads;
    const double *r; /* the sketch's R, or NULL: plain iterations */
    double *acc;     /* threads x d: each thread's share of A^T u */
    double *tb;      /* threads x block: A_b v of one block */
    double *td;      /* d: R^-1 z */
    uint64_t products;
    double seconds;
} gram_ops;

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* The rows in block k: how many. */
static int block_rows(const gram_ops *g, size_t k) {
    size_t lo = k * g->block, hi = lo + g->block < g->n ? lo + g->block : g->n;
    return (int)(hi - lo);
}

/* y (n) = A v. */
static void mul_a(gram_ops *g, const double *v, double *y) {
    double t0 = kmv__now();
    const int d = (int)g->d;
#pragma omp parallel for num_threads(g->threads) schedule(static)
    for (size_t k = 0; k < g->nblocks; k++)
        cblas_dgemv(CblasRowMajor, CblasNoTrans, block_rows(g, k), d, 1.0,
                    g->a + k * g->block * g->d, d, v, 1, 0.0, y + k * g->block, 1);
    g->products++;
    g->seconds += kmv__now() - t0;
}

/* y = the sum of the threads' rows of acc (threads x d), in order. */
static void sum_rows(const double *acc, int threads, size_t d, double *y) {
    memcpy(y, acc, d * sizeof(double));
    for (int t = 1; t < threads; t++)
        for (size_t c = 0; c < d; c++) y[c] += acc[(size_t)t * d + c];
}

/* y (d) = A^T u. */
static void mul_at(gram_ops *g, const double *u, double *y) {
    double t0 = kmv__now();
    const int d = (int)g->d;
    memset(g->acc, 0, (size_t)g->threads * g->d * sizeof(double));
#pragma omp parallel num_threads(g->threads)
    {
        double *acc = g->acc + (size_t)thread_id() * g->d;
#pragma omp for schedule(static)
        for (size_t k = 0; k < g->nblocks; k++)
            cblas_dgemv(CblasRowMajor, CblasTrans, block_rows(g, k), d, 1.0,
                        g->a + k * g->block * g->d, d, u + k * g->block, 1, 1.0, acc, 1);
    }
    sum_rows(g->acc, g->threads, g->d, y);
    g->products++;
    g->seconds += kmv__now() - t0;
}

/* y (d) = A^T A v, one pass over A. */
static void mul_gram(gram_ops *g, const double *v, double *y) {
    double t0 = kmv__now();
    const int d = (int)g->d;
    memset(g->acc, 0, (size_t)g->threads * g->d * sizeof(double));
#pragma omp parallel num_threads(g->threads)
    {
        int id = thread_id();
        double *acc = g->acc + (size_t)id * g->d, *t = g->tb + (size_t)id * g->block;
#pragma omp for schedule(static)
        for (size_t k = 0; k < g->nblocks; k++) {
            const double *ab = g->a + k * g->block * g->d;
            int rows = block_rows(g, k);
            cblas_dgemv(CblasRowMajor, CblasNoTrans, rows, d, 1.0, ab, d, v, 1, 0.0, t, 1);
            cblas_dgemv(CblasRowMajor, CblasTrans, rows, d, 1.0, ab, d, t, 1, 1.0, acc, 1);
        }
    }
    sum_rows(g->acc, g->threads, g->d, y);
    g->products += 2;
    g->seconds += kmv__now() - t0;
}

/* y = R^-1 x (trans 0) or R^-T x (trans 1), in place when y == x. */
static void solve_r(const gram_ops *g, int trans, const double *x, double *y) {
    if (y != x) memcpy(y, x, g->d * sizeof(double));
    cblas_dtrsv(CblasRowMajor, CblasUpper, trans ? CblasTrans : CblasNoTrans, CblasNonUnit,
                (int)g->d, g->r, (int)g->d, y, 1);
}

/* The operators the Krylov solvers see. */
static int op_gram(void *ctx, const double *x, double *y) {
    mul_gram(ctx, x, y);
    return KMV_OK;
}

static int op_precond(void *ctx, const double *x, double *y) {
    solve_r(ctx, 1, x, y);
    solve_r(ctx, 0, y, y);
    return KMV_OK;
}

/* A R^-1 (A when plain) and its transpose, for LSQR. */
static int op_b(void *ctx, const double *z, double *y) {
    gram_ops *g = ctx;
    if (g->r != NULL) solve_r(g, 0, z, g->td);
    mul_a(g, g->r != NULL ? g->td : z, y);
    return KMV_OK;
}

static int op_bt(void *ctx, const double *u, double *z) {
    gram_ops *g = ctx;
    mul_at(g, u, z);
    if (g->r != NULL) solve_r(g, 1, z, z);
    return KMV_OK;
}

static double norm2(const double *v, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += v[i] * v[i];
    return sqrt(s);
}

/* LAPACK's workspace query: the size it asks for, at least least. */
static lapack_int lwork_of(lapack_int info, double q, lapack_int least) {
    return info == 0 && q >= (double)least && q < (double)INT_MAX ? (lapack_int)q : least;
}

/* The sketch's R, with a floor under its diagonal so that a rank-deficient
 * A (or a sketch that lost a direction) cannot divide by zero: below
 * DBL_EPSILON ||A||_F a direction is numerically null anyway. *full: 1
 * when R shows A of full numerical rank (no floor needed, and R's
 * reciprocal condition number above d DBL_EPSILON). *cond: R's condition
 * number (2-norm), A's within the sketch's distortion (a subspace
 * embedding: ||R x|| = ||S A x|| is ||A x|| within a factor near 1). */
static int make_r(const kmv__params *pa, const kmv_allocator *al, const double *a, size_t n,
                  size_t d, size_t s, double fro, double *r, int *full, double *cond) {
    int rc = kmv__sketch_r(al, pa->seed, a, n, d, s, r);
    if (rc != KMV_OK) return rc;
    double least = DBL_EPSILON * fro;
    *full = 1;
    for (size_t i = 0; i < d; i++) {
        if (fabs(r[i * d + i]) < least) {
            r[i * d + i] = r[i * d + i] < 0.0 ? -least : least;
            *full = 0;
        }
    }
    lapack_int m = (lapack_int)d, info;
    double q = 0.0, *c = kmv__malloc_array(al, d * d + d, sizeof(double)), *work = NULL;
    if (c == NULL) return KMV_ENOMEM;
    double *sv = c + d * d;
    memcpy(c, r, d * d * sizeof(double));
    info = LAPACKE_dgesvd_work(LAPACK_COL_MAJOR, 'N', 'N', m, m, c, m, sv, NULL, 1, NULL, 1, &q, -1);
    lapack_int lwork = lwork_of(info, q, 5 * m);
    work = kmv__malloc_array(al, (size_t)lwork, sizeof(double));
    if (work == NULL) rc = KMV_ENOMEM;
    else
        info = LAPACKE_dgesvd_work(LAPACK_COL_MAJOR, 'N', 'N', m, m, c, m, sv, NULL, 1, NULL, 1,
                                   work, lwork);
    /* dgesvd fails only where its QR iteration does not converge: then no
     * estimate, and the iterations. */
    *cond = rc == KMV_OK && info == 0 && sv[d - 1] > 0.0 ? sv[0] / sv[d - 1] : 0.0;
    if (!(*cond > 0.0 && *cond < 1.0 / ((double)d * DBL_EPSILON))) *full = 0;
    kmv__free(al, work);
    kmv__free(al, c);
    return rc;
}

/* u (d) = (A^T A)^-1 v, by (preconditioned) conjugate gradients to the
 * relative residual target, floored at TOL_FLOOR; st->converged cleared
 * when the solve fell short of target. */
static int solve_gram(gram_ops *g, const kmv_allocator *al, const kmv_regress_params *rp,
                      const double *v, double *u, double target, kmv__history *h,
                      kmv_regress_stats *st) {
    kmv__krylov_result res;
    int rc = kmv__pcg(al, g->d, op_gram, g, g->r != NULL ? op_precond : NULL, g, v, u,
                      target > TOL_FLOOR ? target : TOL_FLOOR, rp->max_iter, h, &res);
    st->iterations += res.iterations;
    if (!res.converged || !(target >= TOL_FLOOR)) st->converged = 0;
    return rc;
}

/* The iterations: x from b. v, u: d doubles of scratch; tn: n (AGRAM). */
static int iterate(gram_ops *g, const kmv_allocator *al, const kmv_regress_params *rp,
                   const double *b, double nb, double fro, int full, double *v, double *u,
                   double *tn, kmv_regress_stats *st) {
    const int agram = rp->problem == KMV_REGRESS_AGRAM, j = rp->power;
    kmv__history h = {rp->history, rp->history_len, 0};
    int rc = KMV_OK;
    st->converged = 1;
    if (agram) {
        kmv__krylov_result res;
        rc = kmv__lsqr(al, g->n, g->d, op_b, op_bt, g, b, v, rp->tol / 2.0, rp->max_iter, &h,
                       &res);
        st->iterations += res.iterations;
        if (!res.converged) st->converged = 0;
        if (rc == KMV_OK && g->r != NULL) solve_r(g, 0, v, v);
        /* Past LSQR's test ||A^T r|| <= tol ||A|| ||r|| on the
         * well-conditioned A R^-1, ||A y - b|| is the optimum to a factor
         * 1 + O(tol^2): the optimum, as far as it is known cheaply. */
        if (rc == KMV_OK && g->r != NULL && full && res.converged) {
            mul_a(g, v, tn);
            for (size_t i = 0; i < g->n; i++) tn[i] -= b[i];
            st->residual_optimal = nb > 0.0 ? norm2(tn, g->n) / nb : 0.0;
        }
    } else {
        memcpy(v, b, g->d * sizeof(double));
    }
    /* Solve i of (A^T A) u_i = u_{i-1} (u_0 = b, or y) leaves a residual
     * rho_i, which reaches the final residual as (A^T A)^(i-1) rho_i (GRAM)
     * or A (A^T A)^(i-1) rho_i (AGRAM, whose LSQR took tol / 2): rho_i is
     * held to tol ||b|| / (parts ||A||^(2i-2)), or ||A||^(2i-1), with
     * ||A||_F for ||A||_2 (a bound), so that the parts sum to tol ||b||. */
    double parts = agram ? 2.0 * j : j, scale = agram ? fro : 1.0;
    for (int i = 1; rc == KMV_OK && i <= j; i++) {
        double nv = norm2(v, g->d);
        double target = nv > 0.0 ? rp->tol * nb / (parts * scale * nv) : 1.0;
        rc = solve_gram(g, al, rp, v, u, target, &h, st);
        memcpy(v, u, g->d * sizeof(double));
        scale *= fro * fro;
    }
    return rc;
}

/* res[c] = ||M x_c - b|| / ||b|| (||M x_c|| where b = 0) for the K
 * columns x_c of X (d x K, row-major), M = (A^T A)^j or A (A^T A)^j,
 * recomputed in float64 through A's products, one pass over A per power
 * for all columns: the residual reported, and the measure spectral()'s
 * candidates are chosen by. */
static int residuals(gram_ops *g, const kmv_allocator *al, int agram, int j, const double *xs,
                     size_t nc, const double *b, double nb, double *res) {
    const size_t d = g->d, nt = (size_t)g->threads, dk = d * nc;
    const int m = (int)d, k = (int)nc;
    double *w = kmv__malloc_array(al, 2 * dk + nt * (dk + g->block * nc + nc), sizeof(double));
    if (w == NULL) return KMV_ENOMEM;
    double *y = w, *acc = y + dk, *tb = acc + nt * dk, *sums = tb + nt * g->block * nc;
    double *z = sums + nt * nc;
    double t0 = kmv__now();
    memcpy(y, xs, dk * sizeof(double));
    for (int p = 0; p <= j; p++) {
        int last = p == j;
        if (last && !agram) break;
        memset(acc, 0, nt * (dk + g->block * nc + nc) * sizeof(double));
#pragma omp parallel num_threads(g->threads)
        {
            int id = thread_id();
            double *ac = acc + (size_t)id * dk, *t = tb + (size_t)id * g->block * nc;
            double *sm = sums + (size_t)id * nc;
#pragma omp for schedule(static)
            for (size_t q = 0; q < g->nblocks; q++) {
                const double *ab = g->a + q * g->block * d;
                int rows = block_rows(g, q);
                cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, k, m, 1.0, ab, m, y,
                            k, 0.0, t, k);
                if (!last) {
                    cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, m, k, rows, 1.0, ab, m, t,
                                k, 1.0, ac, k);
                    continue;
                }
                const double *bq = b + q * g->block;
                for (int r = 0; r < rows; r++)
                    for (size_t c = 0; c < nc; c++) {
                        double e = t[(size_t)r * nc + c] - bq[r];
                        sm[c] += e * e;
                    }
            }
        }
        if (!last) sum_rows(acc, g->threads, dk, y);
        g->products += (uint64_t)nc * (last ? 1 : 2);
    }
    if (agram) {
        sum_rows(sums, g->threads, nc, z);
    } else {
        memset(z, 0, nc * sizeof(double));
        for (size_t r = 0; r < d; r++)
            for (size_t c = 0; c < nc; c++) z[c] += (y[r * nc + c] - b[r]) * (y[r * nc + c] - b[r]);
    }
    for (size_t c = 0; c < nc; c++) res[c] = nb > 0.0 ? sqrt(z[c]) / nb : sqrt(z[c]);
    g->seconds += kmv__now() - t0;
    kmv__free(al, w);
    return KMV_OK;
}

/* spectral()'s d x d part. In: sh holds N, z holds B^T b (AGRAM). Out:
 * W (wv: column i, A's right singular vector i, at wv + i d), sigma (sv),
 * c, and the FILTERS candidates as the columns of xs (d x FILTERS,
 * row-major). Every other array is scratch. */
typedef struct decomposition {
    size_t d;
    double *sh, *sih, *cm, *wv, *ut, *xs, *ev, *sv, *z, *c, *t;
} decomposition;

/* *ok: 0 where LAPACK's QR iteration did not converge (then no answer
 * but x = 0). */
static int decompose(const kmv_allocator *al, const double *r, int agram, int j,
                     const double *b, decomposition *dc, int *ok) {
    const size_t d = dc->d, dd = d * d;
    const lapack_int m = (lapack_int)d;
    double q = 0.0, *work;
    lapack_int info = LAPACKE_dsyev_work(LAPACK_COL_MAJOR, 'V', 'U', m, dc->sh, m, dc->ev, &q, -1);
    lapack_int lw1 = lwork_of(info, q, 3 * m);
    info = LAPACKE_dgesvd_work(LAPACK_COL_MAJOR, 'A', 'A', m, m, dc->cm, m, dc->sv, dc->wv, m,
                               dc->ut, m, &q, -1);
    lapack_int lw2 = lwork_of(info, q, 5 * m), lwork = lw1 > lw2 ? lw1 : lw2;
    work = kmv__malloc_array(al, (size_t)lwork, sizeof(double));
    if (work == NULL) return KMV_ENOMEM;
    /* N = V diag(ev) V^T (symmetric: either layout), then N^1/2 and the
     * pseudo-inverse N^-1/2 (N is singular only with A). */
    *ok = LAPACKE_dsyev_work(LAPACK_COL_MAJOR, 'V', 'U', m, dc->sh, m, dc->ev, work, lwork) == 0;
    if (*ok) {
        double cut = dc->ev[d - 1] * (double)d * DBL_EPSILON;
        memset(dc->sih, 0, dd * sizeof(double));
        memset(dc->cm, 0, dd * sizeof(double));
        for (size_t i = 0; i < d; i++) {
            const double *vi = dc->sh + i * d; /* eigenvector i, a column */
            double e = dc->ev[i] > 0.0 ? dc->ev[i] : 0.0, hs = sqrt(e);
            double ihs = e > cut ? 1.0 / hs : 0.0;
            for (size_t row = 0; row < d; row++)
                for (size_t col = 0; col < d; col++) {
                    dc->cm[row * d + col] += vi[row] * hs * vi[col];
                    dc->sih[row * d + col] += vi[row] * ihs * vi[col];
                }
        }
        memcpy(dc->sh, dc->cm, dd * sizeof(double));
        /* C = N^1/2 R, row-major: column-major it is C^T = W Sigma U^T,
         * so dgesvd's left vectors are W's columns, its right ones U^T. */
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, m, m, 1.0, dc->sh, m, r, m,
                    0.0, dc->cm, m);
        *ok = LAPACKE_dgesvd_work(LAPACK_COL_MAJOR, 'A', 'A', m, m, dc->cm, m, dc->sv, dc->wv, m,
                                  dc->ut, m, work, lwork) == 0;
    }
    kmv__free(al, work);
    if (!*ok) return KMV_OK;

    /* c: b in the singular vectors (ut is U^T column-major: U[row][i] is
     * ut[row * d + i]). */
    if (agram)
        cblas_dgemv(CblasRowMajor, CblasNoTrans, m, m, 1.0, dc->sih, m, dc->z, 1, 0.0, dc->t, 1);
    for (size_t i = 0; i < d; i++) {
        double s = 0.0;
        for (size_t row = 0; row < d; row++)
            s += agram ? dc->ut[row * d + i] * dc->t[row] : dc->wv[i * d + row] * b[row];
        dc->c[i] = s;
    }
    /* The candidates: coefficients c_i sigma_i^p / (sigma_i^2p + nu^2)
     * for nu = gamma DBL_EPSILON sigma_1^p, in logs (p reaches 129). */
    double pw = agram ? 2.0 * j + 1.0 : 2.0 * j, l1 = log(dc->sv[0]);
    memset(dc->xs, 0, d * FILTERS * sizeof(double));
    for (size_t col = 0; col < FILTERS; col++) {
        double lnu = log(FILTER_MAX) - (double)col * log(2.0) + log(DBL_EPSILON) + pw * l1;
        for (size_t i = 0; i < d && dc->sv[i] > 0.0; i++) {
            double la = pw * log(dc->sv[i]), lb = 2.0 * lnu - la, hi = la > lb ? la : lb;
            double lden = hi + log(exp(la - hi) + exp(lb - hi));
            double coef = copysign(exp(log(fabs(dc->c[i])) - lden), dc->c[i]);
            for (size_t row = 0; row < d; row++)
                dc->xs[row * FILTERS + col] += dc->wv[i * d + row] * coef;
        }
    }
    return KMV_OK;
}

/* A numerically singular problem, DBL_EPSILON cond(M) near 1 or past it,
 * or one the iterations left short of tol: the exact solution may then be
 * so large that its float64 rounding alone moves M x by as much as b, and
 * no iteration reaches it. What float64 can hold is a truncated solution,
 * as LAPACK's dgelsd gives on a formed M, but here over A's own singular
 * vectors, which the sketch gives cheaply and to float64's accuracy:
 *  - B = A R^-1 is well-conditioned, so its Gram N = B^T B (one BLAS-3
 *    pass over A) loses nothing, where A^T A would lose cond(A)^2;
 *  - A = Q C with Q = B N^-1/2 orthonormal and C = N^1/2 R (d x d), whose
 *    SVD U Sigma W^T gives A's: A = (Q U) Sigma W^T (as randomized
 *    Cholesky QR, backward stable for cond(A) up to about 1/DBL_EPSILON);
 *  - with c = W^T b (GRAM) or (Q U)^T b (AGRAM) and p = 2j or 2j + 1,
 *    x = sum over i of w_i c_i f_i / sigma_i^p, with the filter f_i =
 *    sigma_i^2p / (sigma_i^2p + nu^2). A float64 coefficient is off by
 *    about DBL_EPSILON times itself, which moves M x by nu = DBL_EPSILON
 *    sigma_1^p times the coefficient: f_i minimizes that rounding plus the
 *    part of c_i left out, direction by direction. That model is a bound
 *    (the rounding seen is 0.005 to 0.2 of it), so nu = gamma DBL_EPSILON
 *    sigma_1^p for FILTERS values of gamma, and the least residual
 *    measured wins. It beats truncating as dgelsd does (on the same
 *    tests: down to 0.57 of dgelsd's residual, never above it), since the
 *    directions near the cut are kept in part.
 * x and *res: the answer and its residual (as residuals()); sets
 * st->residual_optimal where unset and known. tn: n doubles (AGRAM). */
static int spectral(gram_ops *g, const kmv_allocator *al, int agram, int j, const double *b,
                    double nb, int full, double *x, double *res, double *tn,
                    kmv_regress_stats *st) {
    const size_t d = g->d, dd = d * d, nt = (size_t)g->threads;
    const int m = (int)d;
    /* Per thread: N's and B^T b's shares and a block of B; then N^1/2,
     * N^-1/2, C, W, U^T, the candidates, five d-vectors and the
     * candidates' residuals. */
    size_t per = dd + d + g->block * d;
    double *w = kmv__malloc_array(al, nt * per + 5 * dd + d * FILTERS + 5 * d + FILTERS,
                                  sizeof(double));
    if (w == NULL) return KMV_ENOMEM;
    double *cres = w + nt * per;
    decomposition dc = {.d = d, .sh = cres + FILTERS};
    dc.sih = dc.sh + dd, dc.cm = dc.sih + dd, dc.wv = dc.cm + dd, dc.ut = dc.wv + dd;
    dc.xs = dc.ut + dd, dc.ev = dc.xs + d * FILTERS, dc.sv = dc.ev + d, dc.z = dc.sv + d;
    dc.c = dc.z + d, dc.t = dc.c + d;

    double t0 = kmv__now();
    memset(w, 0, nt * (dd + d) * sizeof(double));
#pragma omp parallel num_threads(g->threads)
    {
        int id = thread_id();
        double *nn = w + (size_t)id * (dd + d), *zz = nn + dd;
        double *bb = w + nt * (dd + d) + (size_t)id * g->block * d;
#pragma omp for schedule(static)
        for (size_t q = 0; q < g->nblocks; q++) {
            int rows = block_rows(g, q);
            memcpy(bb, g->a + q * g->block * d, (size_t)rows * d * sizeof(double));
            cblas_dtrsm(CblasRowMajor, CblasRight, CblasUpper, CblasNoTrans, CblasNonUnit, rows,
                        m, 1.0, g->r, m, bb, m);
            cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, m, rows, 1.0, bb, m, 1.0, nn, m);
            if (agram)
                cblas_dgemv(CblasRowMajor, CblasTrans, rows, m, 1.0, bb, m, b + q * g->block, 1,
                            1.0, zz, 1);
        }
    }
    /* N into sh (upper triangles summed in order, then mirrored), B^T b
     * into z. */
    memset(dc.sh, 0, dd * sizeof(double));
    memset(dc.z, 0, d * sizeof(double));
    for (size_t id = 0; id < nt; id++) {
        const double *nn = w + id * (dd + d);
        for (size_t i = 0; i < dd; i++) dc.sh[i] += nn[i];
        for (size_t i = 0; i < d; i++) dc.z[i] += nn[dd + i];
    }
    for (size_t r = 0; r < d; r++)
        for (size_t col = 0; col < r; col++) dc.sh[r * d + col] = dc.sh[col * d + r];
    /* B = A R^-1 counts as d products with A, N = B^T B as d more. */
    g->products += 2 * d + (agram ? 1 : 0);
    g->seconds += kmv__now() - t0;

    int rc = KMV_OK, ok = 0;
    /* On one thread of a team: see SMALL_WORK. */
#pragma omp parallel num_threads(g->threads)
#pragma omp single
    rc = decompose(al, g->r, agram, j, b, &dc, &ok);
    memset(x, 0, d * sizeof(double));
    *res = nb > 0.0 ? 1.0 : 0.0; /* x = 0's */
    if (rc == KMV_OK && ok) rc = residuals(g, al, agram, j, dc.xs, FILTERS, b, nb, cres);
    for (size_t col = 0; rc == KMV_OK && ok && col < FILTERS; col++) {
        if (!(cres[col] < *res)) continue;
        *res = cres[col];
        for (size_t r = 0; r < d; r++) x[r] = dc.xs[r * FILTERS + col];
    }

    /* AGRAM's optimum: the residual of y = A^+ b = W Sigma^-1 c, one
     * more product. */
    if (rc == KMV_OK && ok && agram && full && st->residual_optimal < 0.0) {
        memset(dc.t, 0, d * sizeof(double));
        for (size_t i = 0; i < d && dc.sv[i] > 0.0; i++)
            for (size_t r = 0; r < d; r++) dc.t[r] += dc.wv[i * d + r] * (dc.c[i] / dc.sv[i]);
        mul_a(g, dc.t, tn);
        for (size_t i = 0; i < g->n; i++) tn[i] -= b[i];
        st->residual_optimal = nb > 0.0 ? norm2(tn, g->n) / nb : 0.0;
    }
    kmv__free(al, w);
    return rc;
}

/* Whether a residual meets tol: under it (GRAM), or past the optimum by
 * at most tol ||b|| in quadrature (AGRAM, whose iterations aim there;
 * taken as met where the optimum is unknown). In quadrature the excess is
 * tol^2 / (res + opt), below what float64 norms of n entries resolve once
 * tol is under about sqrt(DBL_EPSILON): that resolution, 8 sqrt(n)
 * DBL_EPSILON, is allowed on top. */
static int met(const kmv_regress_params *rp, size_t n, double res, double opt) {
    if (rp->problem == KMV_REGRESS_GRAM) return res <= rp->tol;
    if (opt < 0.0) return 1;
    double resolution = 8.0 * sqrt((double)n) * DBL_EPSILON * opt;
    return res - opt <= rp->tol * rp->tol / (res + opt) + resolution;
}

int kmv__regress_gram(const kmv__params *pa, const kmv_allocator *al,
                      const kmv_regress_params *rp, const double *a, size_t n, size_t d,
                      const double *b, double *x, kmv_regress_stats *st) {
    const int agram = rp->problem == KMV_REGRESS_AGRAM, j = rp->power;
    const size_t bn = agram ? n : d;
    if (d > (size_t)INT_MAX / 2) return KMV_EOVERFLOW;
    gram_ops g = {.a = a, .n = n, .d = d, .threads = kmv__threads(pa)};
    if (g.threads < 1) g.threads = 1;
    g.block = BLOCK_BYTES / (d * sizeof(double));
    if (g.block < 16) g.block = 16;
    if (g.block > n) g.block = n;
    g.nblocks = (n + g.block - 1) / g.block;

    /* Scratch: acc, tb, td, three d-vectors (the chain of solves and the
     * spectral answer), the sketch's R, and an n-vector for AGRAM. */
    size_t nt = (size_t)g.threads, len = 0;
    size_t sz[8] = {nt * d, nt * g.block, d, d, d, d, d * d, agram ? n : 0};
    double *p[8];
    for (int i = 0; i < 8; i++) {
        if (len > SIZE_MAX / sizeof(double) - sz[i]) return KMV_EOVERFLOW;
        len += sz[i];
    }
    double *w = kmv__malloc_array(al, len, sizeof(double));
    if (w == NULL) return KMV_ENOMEM;
    p[0] = w;
    for (int i = 1; i < 8; i++) p[i] = p[i - 1] + sz[i - 1];
    g.acc = p[0], g.tb = p[1], g.td = p[2];
    double *u = p[3], *v = p[4], *xs = p[5], *r = p[6], *tn = p[7];

    st->iterations = 0;
    st->converged = 0;
    st->residual_optimal = -1.0;
    double fro = norm2(a, n * d), nb = norm2(b, bn), cond = 0.0;
    int rc = KMV_OK, full = 0;

    /* The preconditioner. An A of zeros has none (and needs none). */
    if (rp->precondition && fro > 0.0) {
        double t0 = kmv__now();
        size_t s = rp->sketch_rows != 0 ? rp->sketch_rows : 4 * d;
        if (s < d) s = d; /* fewer rows than columns leave R singular */
        /* On one thread of a team: see SMALL_WORK. */
#pragma omp parallel num_threads(g.threads)
#pragma omp single
        rc = make_r(pa, al, a, n, d, s, fro, r, &full, &cond);
        g.r = r;
        st->sketch_rows = s;
        st->seconds_precond = kmv__now() - t0;
        if (!agram && full) st->residual_optimal = 0.0;
    }

    /* The iterations, unless DBL_EPSILON cond(M) says they cannot hold
     * the answer (in logs: cond(M) = cond(A)^p, p up to 129). */
    double pw = agram ? 2.0 * j + 1.0 : 2.0 * j, res = INFINITY;
    int iterations = g.r == NULL ||
                     (cond > 0.0 && log(DBL_EPSILON) + pw * log(cond) <= log(ITERATE_NOISE));
    if (rc == KMV_OK && iterations) {
        rc = iterate(&g, al, rp, b, nb, fro, full, v, u, tn, st);
        if (rc == KMV_OK) rc = residuals(&g, al, agram, j, v, 1, b, nb, &res);
        if (rc == KMV_OK) {
            memcpy(x, v, d * sizeof(double));
            st->converged = st->converged && met(rp, n, res, st->residual_optimal);
        }
    }
    /* The spectral answer where the iterations were not run or fell short;
     * the lesser residual wins. */
    if (rc == KMV_OK && g.r != NULL && !st->converged) {
        double sres;
        rc = spectral(&g, al, agram, j, b, nb, full, xs, &sres, tn, st);
        if (rc == KMV_OK && !(res <= sres)) {
            memcpy(x, xs, d * sizeof(double));
            res = sres;
            /* No solve vouches for it: only a known optimum can. */
            st->converged = (!agram || st->residual_optimal >= 0.0) &&
                            met(rp, n, res, st->residual_optimal);
        }
    }
    if (rc == KMV_OK) {
        st->residual = res;
        st->products = g.products;
        st->seconds_products = g.seconds;
    }
    kmv__free(al, w);
    return rc;
}
