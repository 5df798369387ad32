/* Krylov solvers over operator callbacks, in float64. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <math.h>
#include <string.h>

#include "regress/regress.h"

static double dot(const double *u, const double *v, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += u[i] * v[i];
    return s;
}

static void record(kmv__history *h, double r) {
    if (h != NULL && h->history != NULL && h->at < h->len) h->history[h->at] = r;
    if (h != NULL) h->at++;
}

int kmv__pcg(const kmv_allocator *a, size_t n, kmv__op_fn apply_m, void *m_ctx,
             kmv__op_fn apply_p, void *p_ctx, const double *b, double *x, double tol,
             int max_iter, kmv__history *h, kmv__krylov_result *out) {
    memset(out, 0, sizeof *out);
    double *w = kmv__malloc_array(a, 4 * n, sizeof(double));
    if (w == NULL) return KMV_ENOMEM;
    double *r = w, *z = w + n, *p = w + 2 * n, *q = w + 3 * n;
    memset(x, 0, n * sizeof(double));
    memcpy(r, b, n * sizeof(double));
    double nb = sqrt(dot(b, b, n)), rel = 1.0;
    int rc = KMV_OK;
    if (nb == 0.0) { /* x = 0 solves it */
        out->converged = 1;
        out->rel_residual = 0.0;
        kmv__free(a, w);
        return KMV_OK;
    }
    if (apply_p != NULL) rc = apply_p(p_ctx, r, z);
    else memcpy(z, r, n * sizeof(double));
    memcpy(p, z, n * sizeof(double));
    double rz = dot(r, z, n);
    int it = 0;
    while (rc == KMV_OK && it < max_iter && rel > tol) {
        if ((rc = apply_m(m_ctx, p, q)) != KMV_OK) break;
        double pq = dot(p, q, n);
        if (!(pq > 0.0)) break; /* M is not positive definite along p, or round-off ended it */
        double alpha = rz / pq;
        for (size_t i = 0; i < n; i++) {
            x[i] += alpha * p[i];
            r[i] -= alpha * q[i];
        }
        it++;
        rel = sqrt(dot(r, r, n)) / nb;
        record(h, rel);
        if (rel <= tol) break;
        if (apply_p != NULL) {
            if ((rc = apply_p(p_ctx, r, z)) != KMV_OK) break;
        } else {
            memcpy(z, r, n * sizeof(double));
        }
        double rz_new = dot(r, z, n), beta = rz_new / rz;
        rz = rz_new;
        for (size_t i = 0; i < n; i++) p[i] = z[i] + beta * p[i];
    }
    kmv__free(a, w);
    out->iterations = it;
    out->converged = rel <= tol;
    out->rel_residual = rel;
    return rc;
}

static double norm(const double *u, size_t n) { return sqrt(dot(u, u, n)); }

static void scale(double *u, size_t n, double s) {
    for (size_t i = 0; i < n; i++) u[i] *= s;
}

/* Golub-Kahan bidiagonalization with the QR of the bidiagonal updated by
 * one Givens rotation per step, as in Paige and Saunders' paper (ACM TOMS
 * 8(1), 1982), without its damping or condition estimate; the relative
 * residual recorded is their phibar / beta1. */
int kmv__lsqr(const kmv_allocator *a, size_t m, size_t n, kmv__op_fn apply_a, kmv__op_fn apply_at,
              void *op_ctx, const double *b, double *x, double tol, int max_iter, kmv__history *h,
              kmv__krylov_result *out) {
    memset(out, 0, sizeof *out);
    memset(x, 0, n * sizeof(double));
    double bnorm = norm(b, m);
    if (bnorm == 0.0) { /* x = 0 solves it */
        out->converged = 1;
        return KMV_OK;
    }
    double *w = kmv__malloc_array(a, 2 * m + 3 * n, sizeof(double));
    if (w == NULL) return KMV_ENOMEM;
    double *u = w, *au = w + m, *v = w + 2 * m, *atv = v + n, *dir = v + 2 * n;
    for (size_t i = 0; i < m; i++) u[i] = b[i] / bnorm;
    int rc = apply_at(op_ctx, u, v);
    double alpha = rc == KMV_OK ? norm(v, n) : 0.0;
    double rel = 1.0, anorm = 0.0, phibar = bnorm, rhobar = alpha;
    int it = 0, done = alpha == 0.0; /* A^T b = 0: x = 0 is a least-squares solution */
    if (alpha > 0.0) scale(v, n, 1.0 / alpha);
    memcpy(dir, v, n * sizeof(double));
    while (rc == KMV_OK && !done && it < max_iter) {
        /* u <- (A v - alpha u) / beta, v <- (A^T u - beta v) / alpha */
        if ((rc = apply_a(op_ctx, v, au)) != KMV_OK) break;
        for (size_t i = 0; i < m; i++) u[i] = au[i] - alpha * u[i];
        double beta = norm(u, m);
        if (beta > 0.0) scale(u, m, 1.0 / beta);
        anorm = sqrt(anorm * anorm + alpha * alpha + beta * beta);
        if (beta > 0.0) {
            if ((rc = apply_at(op_ctx, u, atv)) != KMV_OK) break;
            for (size_t i = 0; i < n; i++) v[i] = atv[i] - beta * v[i];
            alpha = norm(v, n);
            if (alpha > 0.0) scale(v, n, 1.0 / alpha);
        }
        /* The rotation that eliminates beta from the bidiagonal. */
        double rho = hypot(rhobar, beta), c = rhobar / rho, s = beta / rho;
        double theta = s * alpha, phi = c * phibar;
        rhobar = -c * alpha;
        phibar = s * phibar;
        for (size_t i = 0; i < n; i++) {
            x[i] += (phi / rho) * dir[i];
            dir[i] = v[i] - (theta / rho) * dir[i];
        }
        it++;
        /* phibar = ||r||; phibar alpha |c| = ||A^T r||. */
        rel = phibar / bnorm;
        record(h, rel);
        double arnorm = phibar * alpha * fabs(c);
        done = rel <= tol || arnorm <= tol * anorm * phibar || beta == 0.0;
    }
    kmv__free(a, w);
    out->iterations = it;
    out->converged = done;
    out->rel_residual = rel;
    return rc;
}
