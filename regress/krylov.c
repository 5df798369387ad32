/* Krylov solvers over operator callbacks, in float64. */
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
