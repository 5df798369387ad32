/* The sketch preconditioner of GRAM and AGRAM: a CountSketch S of A and the
 * R of SA = QR. A CountSketch is one pass over A (O(nd), against the
 * O(nd log n) of a randomized Hadamard transform) and, with s = O(d) rows,
 * an embedding good enough that A R^-1 is well-conditioned whatever
 * cond(A) is: only A's column space matters, and R carries A's scaling. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <lapacke.h>
#include <limits.h>
#include <math.h>
#include <string.h>

#include "common/rng.h"
#include "regress/regress.h"

int kmv__sketch_r(const kmv_allocator *al, uint64_t seed, const double *a, size_t n, size_t d,
                  size_t s, double *r) {
    if (s < d || s > (size_t)INT_MAX || d > (size_t)INT_MAX) return KMV_EINVAL;
    /* Rows of SA are accumulated row-major, which LAPACK reads as the
     * column-major d x s matrix (SA)^T; its LQ, (SA)^T = L Q, is SA's QR
     * with R = L^T, and L^T in column-major order is R in row-major order:
     * no transposition and no LAPACKE work arrays outside our allocator. */
    double *sa = kmv__malloc_array(al, s, d * sizeof(double));
    double *tau = kmv__malloc_array(al, d, sizeof(double));
    int rc = sa == NULL || tau == NULL ? KMV_ENOMEM : KMV_OK;
    double *work = NULL;
    lapack_int lwork = 0;
    if (rc == KMV_OK) {
        memset(sa, 0, s * d * sizeof(double));
        uint64_t base = kmv__rng_stream(seed, KMV__RNG_REGRESS);
        for (size_t i = 0; i < n; i++) {
            /* Hashed per row, as rng.h asks of per-row draws; the top bits
             * pick the bucket and the lowest the sign, nearly independent. */
            uint64_t h = kmv__mix64(base ^ kmv__mix64((uint64_t)i + 1));
            size_t k = (size_t)(((unsigned __int128)h * s) >> 64);
            double sign = (h & 1) ? -1.0 : 1.0;
            const double *ai = a + i * d;
            double *row = sa + k * d;
            for (size_t c = 0; c < d; c++) row[c] += sign * ai[c];
        }
        double q;
        lapack_int info = LAPACKE_dgelqf_work(LAPACK_COL_MAJOR, (lapack_int)d, (lapack_int)s, sa,
                                              (lapack_int)d, tau, &q, -1);
        lwork = info == 0 && q >= 1.0 ? (lapack_int)q : (lapack_int)d;
        work = kmv__malloc_array(al, (size_t)lwork, sizeof(double));
        if (work == NULL) rc = KMV_ENOMEM;
    }
    if (rc == KMV_OK) {
        lapack_int info = LAPACKE_dgelqf_work(LAPACK_COL_MAJOR, (lapack_int)d, (lapack_int)s, sa,
                                              (lapack_int)d, tau, work, lwork);
        /* Only an illegal argument fails dgelqf, which the sizes above rule out. */
        if (info != 0) rc = KMV_EINVAL;
    }
    if (rc == KMV_OK) {
        for (size_t i = 0; i < d; i++)
            for (size_t c = 0; c < d; c++) r[i * d + c] = c >= i ? sa[i * d + c] : 0.0;
    }
    kmv__free(al, work);
    kmv__free(al, tau);
    kmv__free(al, sa);
    return rc;
}
