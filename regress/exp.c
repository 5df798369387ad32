/* EXP: min over x of ||(exp(s A A^T) + ridge I) x - b|| (docs/regress.md).
 *
 * exp(s <a_i, a_j>) = e^{g_i} e^{g_j} K_ij with g_i = s ||a_i||^2 / 2 and K
 * the Gaussian kernel of A's rows at sigma = 1/sqrt(s), so with
 * E_i = sqrt(e^{2 g_i} + ridge) (the root of M's diagonal)
 *
 *     M = D K D + ridge I = E Mt E,   Mt = T K T + (I - T^2),  T = D E^-1.
 *
 * Mt is the Jacobi scaling of M: its diagonal is 1, every entry lies in
 * [0, 1], and T and I - T^2 = ridge E^-2 are computed from logarithms, so
 * nothing in it overflows or underflows however the norms spread. That is
 * why the log domain goes through Jacobi rather than factoring out
 * max e^{g_i} alone: D e^{-max g} underflows to 0 for rows far below the
 * largest norm, which would make M numerically singular on them, while
 * T_i = 1 / sqrt(1 + ridge e^{-2 g_i}) never vanishes where M's own rows
 * do not. With ridge = 0, Mt is K itself.
 *
 * CG runs on M'' = e^{-2m} M = E'' Mt E'' (E'' = E e^{-m}, m the middle of
 * log E's range, so E''^2 stays within e^{+-355}) against b / ||b||: its
 * residual is M's relative residual, which is what tol is about, and the
 * scaling enters as the preconditioner E''^-1 P E''^-1 (P ~ Mt^-1: the
 * Nystrom preconditioner, or I for plain iterations). x = u ||b|| e^{-2m}
 * is assembled with ldexp at the end.
 *
 * Products with K go through one kmv index over A's rows (float32): each
 * vector is divided by its largest entry before the conversion, so float
 * keeps its relative precision, and the approximate engine's guarantee
 * ||Kv - y|| <= eps ||v|| becomes ||M'' u - y''|| <= eps max_i M''_ii ||u||
 * <= eps ||M''|| ||u||: product_error is eps when any product was
 * approximate.
 *
 * Stopping: a solve stops at max(tol, floor), the floor being the
 * products' relative error (eps once an approximate product answered, 0
 * for exact ones): past it CG's own residual no longer describes M x - b.
 * Where the float64 residual is affordable (n <= DENSE_MAX) it is computed
 * after each solve, and while it is above tol and halves per solve, CG
 * runs again on it (iterative refinement: float32 or approximate products,
 * float64 residuals), up to ROUNDS_MAX solves in all. Float32's products
 * (about 1e-7 of ||M|| ||u|| even from the exact engine) thus limit the
 * speed of the refinement, not its end, while 1e-7 cond(M) stays below 1;
 * past that CG may diverge, and a solve whose residual grows is dropped.
 *
 * Range: KMV_EOVERFLOW where M's largest entry, max_i e^{2 g_i} + ridge,
 * is not a double, or where x overflows or underflows entirely; entries
 * of x that underflow alone are kept as the subnormals or zeros they are,
 * and the residual reported is that of the x returned. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>
#include <lapacke.h>

#include "common/rng.h"
#include "common/threads.h"
#include "common/timer.h"
#include "engine/index.h"
#include "regress/regress.h"

#define DENSE_MAX 16384 /* the float64 residual, O(n^2 d), is affordable up to here */
#define ROUNDS_MAX 4    /* CG solves in all: the first and its refinements */
#define NYS_DEFAULT 200 /* Nystrom columns when rp->sketch_rows is 0 */
#define RB 64           /* float64 residual: rows per block */
#define CB 512          /* and columns per block */
#define LOG_DBL_MAX 709.782712893383973 /* log(DBL_MAX) */
#define LN2 0.693147180559945309

typedef struct exp_sys {
    const kmv__params *pa;
    const kmv_allocator *al;
    const float *a;
    size_t n, d;
    int nt;
    double s, ridge;
    double mid;        /* m: M'' = e^{-2m} M */
    double *e, *t, *r; /* E'', T and 1 - T^2 */
    /* Products with K. */
    kmv_index *ix;
    const float *q;    /* the index's rows: A, or A 2^k for an extreme s */
    float *q_own;      /* that copy, when made */
    float *x32, *y32;
    double *w;
    uint64_t products;
    int approx;
    double eta;        /* the largest error bound of an approximate product */
    double t_products;
    kmv__nystrom ny;   /* the preconditioner (k = 0: Jacobi alone) */
    /* The float64 residual's blocks, per thread. */
    double *dense;
} exp_sys;

/* Bytes a block of count * size costs through the meters, headers and
 * all (an over-estimate): what the index may no longer take. */
static size_t held(size_t count, size_t size) { return count * size + 64; }

/* ------------------------------------------------------------ products */

/* y = M'' u through the index. */
static int apply_m(void *ctx, const double *u, double *y) {
    exp_sys *S = ctx;
    size_t n = S->n;
    double amax = 0.0;
    for (size_t i = 0; i < n; i++) {
        S->w[i] = S->t[i] * S->e[i] * u[i];
        if (fabs(S->w[i]) > amax) amax = fabs(S->w[i]);
    }
    if (amax > 0.0) {
        for (size_t i = 0; i < n; i++) S->x32[i] = (float)(S->w[i] / amax);
        kmv_stats ks;
        double t0 = kmv__now();
        int rc = kmv_index_matvec(S->ix, S->q, n, S->x32, 1, S->y32, &ks);
        S->t_products += kmv__now() - t0;
        if (rc != KMV_OK) return rc;
        S->products++;
        if (ks.mode == KMV_MODE_APPROX) {
            S->approx++;
            if (ks.error_bound > S->eta) S->eta = ks.error_bound;
        }
    } else {
        memset(S->y32, 0, n * sizeof(float));
    }
    for (size_t i = 0; i < n; i++)
        y[i] = S->e[i] * (S->t[i] * (double)S->y32[i] * amax + S->r[i] * S->e[i] * u[i]);
    return KMV_OK;
}

/* y = P v. */
static int apply_p(void *ctx, const double *v, double *y) {
    kmv__nystrom_apply(&((exp_sys *)ctx)->ny, v, y);
    return KMV_OK;
}

/* res = bh - M'' u in float64, every entry from A: exp(s <a_i, a_j> - 2m),
 * plus ridge e^{-2m} on the diagonal. */
static void residual64(const exp_sys *S, const double *u, const double *bh, double *res) {
    size_t n = S->n, d = S->d, per = RB * d + CB * d + RB * CB;
    double two_m = 2.0 * S->mid;
    double ridge = S->ridge > 0.0 ? exp(log(S->ridge) - two_m) : 0.0;
    long blocks = (long)((n + RB - 1) / RB);
#pragma omp parallel num_threads(S->nt)
    {
        kmv__blas_single();
        double *ai = S->dense + (size_t)kmv__thread_id() * per;
        double *aj = ai + RB * d, *sb = aj + CB * d;
#pragma omp for schedule(dynamic, 1)
        for (long ib = 0; ib < blocks; ib++) {
            size_t i0 = (size_t)ib * RB, bi = n - i0 < RB ? n - i0 : RB;
            double acc[RB] = {0};
            for (size_t x = 0; x < bi * d; x++) ai[x] = S->a[i0 * d + x];
            for (size_t j0 = 0; j0 < n; j0 += CB) {
                size_t bj = n - j0 < CB ? n - j0 : CB;
                for (size_t x = 0; x < bj * d; x++) aj[x] = S->a[j0 * d + x];
                cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)bi, (int)bj, (int)d,
                            1.0, ai, (int)d, aj, (int)d, 0.0, sb, CB);
                for (size_t x = 0; x < bi; x++) {
                    double sum = 0.0;
                    for (size_t c = 0; c < bj; c++)
                        sum += exp(S->s * sb[x * CB + c] - two_m) * u[j0 + c];
                    acc[x] += sum;
                }
            }
            for (size_t x = 0; x < bi; x++)
                res[i0 + x] = bh[i0 + x] - (acc[x] + ridge * u[i0 + x]);
        }
    }
}

static double norm2(const double *v, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += v[i] * v[i];
    return sqrt(s);
}

/* ---------------------------------------------------------------- solve */

/* x = u e^{lf}, lf = log(||b||) - 2m, through ldexp so that neither factor
 * leaves double's range on its own. KMV_EOVERFLOW where an entry passes
 * it, or where every nonzero entry underflows; *lost: some entry
 * underflowed (u then takes back what x holds). */
static int assemble(double *u, size_t n, double lf, double *x, int *lost) {
    int e = (int)floor(lf / LN2 + 0.5), nonzero = 0, kept = 0;
    double fm = exp(lf - (double)e * LN2);
    *lost = 0;
    for (size_t i = 0; i < n; i++) {
        x[i] = e >= 0 ? ldexp(u[i] * fm, e) : ldexp(u[i], e) * fm;
        if (!isfinite(x[i])) return KMV_EOVERFLOW;
        nonzero |= u[i] != 0.0;
        kept |= x[i] != 0.0;
        if (u[i] != 0.0 && fabs(x[i]) < DBL_MIN) {
            *lost = 1;
            u[i] = ldexp(x[i] / fm, -e);
        }
    }
    return nonzero && !kept ? KMV_EOVERFLOW : KMV_OK;
}

static int all_finite(const double *v, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(v[i])) return 0;
    return 1;
}

/* The solves: CG from u = 0 against bh (||bh|| = 1), then refinements
 * while the float64 residual is affordable, above tol and halving. res
 * ends as bh - M'' u where *known (float64, or by a product under exact
 * params). v holds 3 n scratch doubles. */
static int solve(exp_sys *S, const kmv_regress_params *rp, const double *bh, double *u,
                 double *res, double *v, int *known, int *converged, kmv_regress_stats *st) {
    size_t n = S->n;
    double *rhs = v, *du = v + n, *ubak = v + 2 * n;
    int dense = n <= DENSE_MAX, rc = KMV_OK;
    /* Until a product shows otherwise, the engine approximates unless
     * params or size rule it out (index.h's "too small to gain"). */
    int exact = S->pa->exact ||
                (!S->pa->force_approx && (double)n * (double)n < KMV__APPROX_MIN_ENTRIES);
    double eta = exact ? 0.0 : S->pa->eps, rel = norm2(bh, n);
    kmv__history h = {rp->history, rp->history_len, 0};
    memset(u, 0, n * sizeof(double));
    memcpy(res, bh, n * sizeof(double));
    *known = 1;
    *converged = 0;
    for (int round = 0; round < ROUNDS_MAX; round++) {
        double tol_r = rp->tol / rel > eta ? rp->tol / rel : eta;
        for (size_t i = 0; i < n; i++) rhs[i] = res[i] / rel;
        size_t at0 = h.at;
        kmv__krylov_result kr;
        rc = kmv__pcg(S->al, n, apply_m, S, apply_p, S, rhs, du, tol_r, rp->max_iter, &h, &kr);
        if (rc != KMV_OK) return rc;
        /* Each solve's residuals are relative to its own right-hand side. */
        for (size_t j = at0; rp->history != NULL && j < h.at && j < h.len; j++)
            rp->history[j] *= rel;
        st->iterations += kr.iterations;
        /* Products whose error passes M's smallest eigenvalues (float32's
         * 1e-7 against cond(M) past 1e6, or a loose eps) can make CG
         * diverge: such a solve is dropped, and the solves end. */
        if (!all_finite(du, n) || !(kr.rel_residual <= 1.0)) break;
        memcpy(ubak, u, n * sizeof(double));
        for (size_t i = 0; i < n; i++) u[i] += rel * du[i];
        int at_floor = tol_r > rp->tol / rel;
        double rel_new;
        if (dense) {
            residual64(S, u, bh, res);
            rel_new = norm2(res, n);
        } else if (at_floor && S->approx == 0) {
            /* Stopped at a floor no product imposed: go on from the
             * residual, by one product. */
            if ((rc = apply_m(S, u, res)) != KMV_OK) return rc;
            for (size_t i = 0; i < n; i++) res[i] = bh[i] - res[i];
            rel_new = norm2(res, n);
            *known = 0;
        } else {
            *known = 0;
            *converged = kr.converged && !at_floor;
            return KMV_OK;
        }
        eta = S->approx > 0 ? S->eta : 0.0;
        if (dense && rel_new > rel) { /* refining made it worse: keep the last */
            memcpy(u, ubak, n * sizeof(double));
            for (size_t i = 0; i < n; i++) res[i] = rhs[i] * rel;
            break;
        }
        double gain = rel_new / rel;
        rel = rel_new;
        if (rel <= rp->tol || (dense && gain > 0.5)) break;
    }
    *converged = *known && rel <= rp->tol;
    return KMV_OK;
}

/* Whether two rows of A are equal (then M is singular when ridge = 0):
 * rows hashed, sorted by hash, neighbours compared. */
typedef struct row_hash {
    uint64_t h;
    size_t i;
} row_hash;

static int cmp_hash(const void *x, const void *y) {
    const row_hash *p = x, *q = y;
    if (p->h != q->h) return p->h < q->h ? -1 : 1;
    return p->i < q->i ? -1 : p->i > q->i;
}

static int has_duplicates(const kmv_allocator *al, const float *a, size_t n, size_t d, int *out) {
    row_hash *rh = kmv__malloc_array(al, n, sizeof(row_hash));
    if (rh == NULL) return KMV_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        uint64_t h = 0x243f6a8885a308d3ULL;
        for (size_t c = 0; c < d; c++) {
            float v = a[i * d + c] == 0.0f ? 0.0f : a[i * d + c]; /* -0 is 0 */
            uint32_t bits;
            memcpy(&bits, &v, sizeof bits);
            h = kmv__mix64(h ^ bits);
        }
        rh[i] = (row_hash){h, i};
    }
    qsort(rh, n, sizeof *rh, cmp_hash);
    *out = 0;
    for (size_t i = 1; i < n && !*out; i++) {
        if (rh[i].h != rh[i - 1].h) continue;
        const float *p = a + rh[i].i * d, *q = a + rh[i - 1].i * d;
        size_t c = 0;
        while (c < d && p[c] == q[c]) c++;
        *out = c == d;
    }
    kmv__free(al, rh);
    return KMV_OK;
}

int kmv__regress_exp(const kmv__params *pa, const kmv_allocator *al,
                     const kmv_regress_params *rp, const float *a, size_t n, size_t d,
                     const double *b, double *x, kmv_regress_stats *st) {
    /* BLAS takes int sizes; the index, d up to INT_MAX / 64. */
    if (n > INT_MAX || d > INT_MAX / 64) return KMV_EOVERFLOW;
    exp_sys S = (exp_sys){.pa = pa, .al = al, .a = a, .n = n, .d = d, .nt = kmv__threads(pa),
                  .s = rp->scale > 0.0 ? rp->scale : 1.0 / sqrt((double)d), .ridge = rp->ridge};
    size_t r_want = rp->sketch_rows > 0 ? rp->sketch_rows : NYS_DEFAULT;
    if (r_want > n) r_want = n;
    /* One block of n-vectors: E'', T, R, w, bh, u, res and 3 scratch. */
    enum { NV = 10 };
    double *vec = kmv__malloc_array(al, n, NV * sizeof(double));
    float *f32 = kmv__malloc_array(al, n, 2 * sizeof(float));
    /* With regress.c's x: what the index may not take of the cap. */
    size_t mine = held(n, NV * sizeof(double)) + held(n, 2 * sizeof(float)) +
                  held(n, sizeof(double));
    int rc = vec && f32 ? KMV_OK : KMV_ENOMEM;
    double *bh = NULL, *u = NULL, *res = NULL, *scratch = NULL;
    if (rc == KMV_OK) {
        S.e = vec, S.t = vec + n, S.r = vec + 2 * n, S.w = vec + 3 * n;
        bh = vec + 4 * n, u = vec + 5 * n, res = vec + 6 * n, scratch = vec + 7 * n;
        S.x32 = f32, S.y32 = f32 + n;
    }
    /* log E_i = log(e^{2 g_i} + ridge) / 2 and the range check: M's
     * largest entry, e^{2 max log E}, must be a double. */
    double c = 0.0, lmin = INFINITY, lmax = -INFINITY, lr = S.ridge > 0.0 ? log(S.ridge) : 0.0;
    for (size_t i = 0; rc == KMV_OK && i < n; i++) {
        double sq = 0.0;
        for (size_t k = 0; k < d; k++) sq += (double)a[i * d + k] * (double)a[i * d + k];
        double g = 0.5 * S.s * sq, l = g;
        if (g > c) c = g;
        if (S.ridge > 0.0) l = 2.0 * g > lr ? g + 0.5 * log1p(exp(lr - 2.0 * g))
                                            : 0.5 * lr + 0.5 * log1p(exp(2.0 * g - lr));
        /* T and 1 - T^2 from z = log ridge - 2g: 1 / (1 + e^z), 1 / (1 + e^-z) */
        double z = lr - 2.0 * g;
        S.t[i] = S.ridge > 0.0 ? 1.0 / sqrt(1.0 + exp(z)) : 1.0;
        S.r[i] = S.ridge > 0.0 ? 1.0 / (1.0 + exp(-z)) : 0.0;
        S.e[i] = l;
        if (l < lmin) lmin = l;
        if (l > lmax) lmax = l;
    }
    st->log_scale_max = c;
    if (rc == KMV_OK && !(2.0 * lmax <= LOG_DBL_MAX)) rc = KMV_EOVERFLOW;
    /* b / ||b||, scaled first so that its square sum cannot overflow. */
    double bmax = 0.0, bss = 0.0;
    for (size_t i = 0; i < n; i++)
        if (fabs(b[i]) > bmax) bmax = fabs(b[i]);
    for (size_t i = 0; rc == KMV_OK && i < n && bmax > 0.0; i++) {
        bh[i] = b[i] / bmax;
        bss += bh[i] * bh[i];
    }
    for (size_t i = 0; rc == KMV_OK && i < n && bmax > 0.0; i++) bh[i] /= sqrt(bss);
    double t0 = kmv__now();
    if (rc == KMV_OK && bmax > 0.0) {
        S.mid = 0.5 * (lmin + lmax);
        for (size_t i = 0; i < n; i++) S.e[i] = exp(S.e[i] - S.mid);
        S.ny = (kmv__nystrom){.n = n, .e = S.e};
        if (rp->precondition)
            rc = kmv__nystrom_build(al, a, n, d, S.s, S.t, S.r, S.e, r_want, pa->seed, S.nt,
                                    &S.ny);
        if (S.ny.k > 0)
            mine += held(n, r_want * sizeof(double)) + held(r_want, r_want * sizeof(double)) +
                    held(n, sizeof(double)) + held(r_want, 2 * sizeof(double));
    }
    st->seconds_precond = kmv__now() - t0;
    int dense = n <= DENSE_MAX;
    if (rc == KMV_OK && bmax > 0.0 && dense) {
        size_t per = RB * d + CB * d + RB * CB;
        S.dense = kmv__malloc_array(al, (size_t)S.nt, per * sizeof(double));
        if (S.dense == NULL) rc = KMV_ENOMEM;
        mine += held((size_t)S.nt, per * sizeof(double));
    }
    /* The index over A's rows at sigma = 1/sqrt(s). Where that sigma would
     * leave kmv's range (or float's, for 1 / (2 sigma^2)), the rows are
     * scaled by a power of two, exactly, and s by its inverse square. */
    S.q = a;
    double s_ix = S.s;
    if (rc == KMV_OK && bmax > 0.0 && (S.s < 0x1p-40 || S.s > 0x1p40)) {
        int k2 = (int)floor(0.5 * log2(S.s) + 0.5);
        S.q_own = kmv__malloc_array(al, n * d, sizeof(float));
        if (S.q_own == NULL) rc = KMV_ENOMEM;
        for (size_t i = 0; rc == KMV_OK && i < n * d; i++) S.q_own[i] = ldexpf(a[i], k2);
        S.q = S.q_own;
        s_ix = ldexp(S.s, -2 * k2);
        mine += held(n * d, sizeof(float));
    }
    if (rc == KMV_OK && bmax > 0.0) {
        kmv__params p = *pa;
        p.sigma = 1.0 / sqrt(s_ix);
        p.causal = 0;
        p.measure_error = 0;
        p.progress = NULL;
        p.progress_opaque = NULL;
        /* The index's own cap is what this call leaves of params.max_bytes,
         * so that a plan past it falls back to exact as kmv_matvec's does. */
        if (pa->max_bytes != 0) p.max_bytes = pa->max_bytes > mine ? pa->max_bytes - mine : 1;
        rc = kmv__index_new(&p, al, d, &S.ix);
        if (rc == KMV_OK) rc = kmv_index_append(S.ix, S.q, n);
    }
    int known = 0, converged = 1;
    double rel = 0.0;
    if (rc == KMV_OK && bmax > 0.0)
        rc = solve(&S, rp, bh, u, res, scratch, &known, &converged, st);
    if (rc == KMV_OK && bmax > 0.0) {
        int lost = 0;
        double lf = log(bmax) + 0.5 * log(bss) - 2.0 * S.mid;
        rc = assemble(u, n, lf, x, &lost);
        if (rc == KMV_OK && lost && dense) residual64(&S, u, bh, res);
        if (rc == KMV_OK && !dense && pa->exact) {
            /* Beyond DENSE_MAX, the exact engine's product checks it. */
            rc = apply_m(&S, u, res);
            for (size_t i = 0; rc == KMV_OK && i < n; i++) res[i] = bh[i] - res[i];
            known = rc == KMV_OK;
        }
        if (rc == KMV_OK && known) {
            rel = norm2(res, n) / norm2(bh, n);
            converged = rel <= rp->tol;
        }
    } else if (rc == KMV_OK) {
        memset(x, 0, n * sizeof(double)); /* b = 0: x = 0 solves it */
        known = 1;
    }
    int dup = 0;
    if (rc == KMV_OK && S.ridge == 0.0) rc = has_duplicates(al, a, n, d, &dup);
    if (rc == KMV_OK) {
        st->converged = converged;
        st->residual = known ? rel : -1.0;
        st->residual_optimal = dup ? -1.0 : 0.0;
        st->sketch_rows = S.ny.k;
        st->products = S.products;
        st->approx_products = S.approx;
        st->product_error = S.approx > 0 ? S.eta : 0.0;
        st->seconds_products = S.t_products;
    }
    kmv_index_free(S.ix);
    kmv__free(al, S.q_own);
    kmv__free(al, S.dense);
    kmv__nystrom_free(al, &S.ny);
    kmv__free(al, vec);
    kmv__free(al, f32);
    return rc;
}
