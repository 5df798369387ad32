/* Internal: each row's sample count for the error budget, and the check
 * after the fact (docs/guarantee-gaussian.md, "The error budget").
 *
 * With Bs^2 the sampling's share of (eps ||x||)^2 and delta_s its failure
 * probability, rows of light masses W_i get s_i = ceil(sqrt(n W_i) S / V),
 * S = sum sqrt(n W_i), V = Bs^2 / (1 + sqrt(2 (G / S^2) / delta_s)),
 * G = sum n W_i: the least total samples whose variances V_i (summing to V)
 * pass Chebyshev's bound. A decoding step is the case m = 1. */
#ifndef KMV_ALGO_BUDGET_H
#define KMV_ALGO_BUDGET_H

#include <stddef.h>

#include "common/params.h"

/* h: the largest x_j^2 / mean(x^2) left to sampling. */
#define KMV__WEIGHT_RATIO 16

/* The heavy threshold for n keys and m queries: min(n^-alpha,
 * eps sqrt(min_samples / (16 m h))), h = min(n^gamma, KMV__WEIGHT_RATIO):
 * then one light key at it, seen through min_samples samples, costs a row
 * at most 1/16 of its share of the budget. At least 2^-60. */
double kmv__heavy_threshold(const kmv__params *p, size_t n, size_t m);

/* Where the exactly summed columns H1 start, as a multiple of the mean
 * weight, for tables at threshold kappa: n^gamma, or lower where kappa's
 * bound needs; at least 1. */
double kmv__h1_ratio(const kmv__params *p, size_t n, size_t m, double kappa);

typedef struct kmv__budget {
    double bs2;     /* the sampling's share of the squared error */
    double delta_s; /* its failure probability */
    size_t s_min;   /* samples every sampled row takes at least */
    size_t n;       /* keys */
} kmv__budget;

/* s[i] for rows of light mass w[i], i < m; a row whose count would pass
 * n / 2 is summed exactly (s = n). Returns the total, exact rows counted
 * as n. */
double kmv__budget_allocate(const kmv__budget *b, const double *w, size_t m, size_t *s);

/* Whether the variances the windows showed, var[0..m), pass the budget:
 * V + sqrt(2 sum var^2 / delta_s) > Bs^2. */
int kmv__budget_exceeded(const kmv__budget *b, const double *var, size_t m);

/* Fresh counts for rows that showed more variance than planned: each row's
 * mass taken as the larger of w[i] and what it showed, var[i] s[i] / n;
 * s2[i] the new counts, redo[i] whether they grew. Returns the extra
 * samples the redone rows take; *nredo their count. w2: m doubles of
 * scratch. */
double kmv__budget_resample(const kmv__budget *b, const double *w, const double *var,
                            const size_t *s, size_t m, double *w2, size_t *s2,
                            unsigned char *redo, size_t *nredo);

#endif /* KMV_ALGO_BUDGET_H */
