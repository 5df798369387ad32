/* The oracle the benchmarks measure certificates against: the fewest keys
 * per row that leave at most the row's share eps ||x|| / sqrt(m) of the
 * budget outside, keys taken by |K_ij x_j|, largest first, and the rest
 * estimated as 0; the mean fraction of the n keys over `rows` rows spread
 * through the m queries. O(rows n d), in double. */
#ifndef KMV_BENCH_ORACLE_H
#define KMV_BENCH_ORACLE_H

#include <math.h>
#include <stddef.h>
#include <stdlib.h>

static int oracle_cmp_desc(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x < y) - (x > y);
}

static inline double bench_oracle(const float *q, size_t m, const float *k, size_t n, size_t d,
                                  const float *x, double sigma, double eps, size_t rows) {
    double x2 = 0.0;
    for (size_t j = 0; j < n; j++) x2 += (double)x[j] * x[j];
    double share = eps * sqrt(x2 / (double)m), total = 0.0;
    double *t = malloc(n * sizeof(double));
    for (size_t r = 0; r < rows; r++) {
        const float *qi = q + (r * m / rows) * d;
        double rest = 0.0;
        for (size_t j = 0; j < n; j++) {
            double d2 = 0.0;
            for (size_t u = 0; u < d; u++) {
                double z = (double)qi[u] - k[j * d + u];
                d2 += z * z;
            }
            t[j] = exp(-d2 / (2.0 * sigma * sigma)) * fabs((double)x[j]);
            rest += t[j];
        }
        qsort(t, n, sizeof(double), oracle_cmp_desc);
        size_t kept = 0;
        while (kept < n && rest > share) rest -= t[kept++];
        total += (double)kept / (double)n;
    }
    free(t);
    return total / (double)rows;
}

#endif /* KMV_BENCH_ORACLE_H */
