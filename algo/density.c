/* A query's light mass from the sketch; see density.h. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "algo/density.h"

#include "algo/kernel.h"
#include "algo/light.h"

double kmv__density(const kmv__sketch *sk, const kmv__density_req *rq, float *scratch) {
    if (sk->r == 0) return 0.0;
    kmv__sqdist_rows(rq->q, sk->rows, sk->r, rq->dim, scratch);
    if (rq->shift != 0.0f)
        for (size_t u = 0; u < sk->r; u++) scratch[u] -= rq->shift;
    /* exp(-||q - k||^2 / sigma^2) is K^2. */
    kmv__gauss_row_dist(scratch, sk->r, 2.0f * rq->inv2s2, NULL);
    float k2 = rq->kappa * rq->kappa;
    double w = 0.0;
    for (size_t u = 0; u < sk->r; u++) {
        uint32_t j = sk->ids[u];
        if (rq->w != NULL && rq->w[j] >= rq->whi) continue;
        if (scratch[u] >= k2 && kmv__contains(rq->heavy, rq->n_heavy, j)) continue;
        w += scratch[u];
    }
    return w * sk->scale;
}
