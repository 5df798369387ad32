/* Sample budgets; see budget.h. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "algo/budget.h"

#include <math.h>

double kmv__budget_allocate(const kmv__budget *b, const double *w, size_t m, size_t *s) {
    double n = (double)b->n, S = 0.0, G = 0.0;
    for (size_t i = 0; i < m; i++) {
        S += sqrt(n * w[i]);
        G += n * w[i];
    }
    double V = 0.0;
    if (S > 0.0) V = b->bs2 / (1.0 + sqrt(2.0 * (G / (S * S)) / b->delta_s));
    double total = 0.0;
    for (size_t i = 0; i < m; i++) {
        double want = (double)b->s_min;
        if (S > 0.0 && w[i] > 0.0) {
            /* V <= 0 (no budget left) asks for the impossible: exact rows. */
            want = V > 0.0 ? ceil(sqrt(n * w[i]) * S / V) : n;
            if (want < (double)b->s_min) want = (double)b->s_min;
        }
        size_t si = want >= 0.5 * n ? b->n : (size_t)want;
        s[i] = si;
        total += (double)si;
    }
    return total;
}

int kmv__budget_exceeded(const kmv__budget *b, const double *var, size_t m) {
    double V = 0.0, Q = 0.0;
    for (size_t i = 0; i < m; i++) {
        V += var[i];
        Q += var[i] * var[i];
    }
    return V + sqrt(2.0 * Q / b->delta_s) > b->bs2;
}

double kmv__budget_resample(const kmv__budget *b, const double *w, const double *var,
                            const size_t *s, size_t m, double *w2, size_t *s2,
                            unsigned char *redo, size_t *nredo) {
    double n = (double)b->n;
    for (size_t i = 0; i < m; i++) {
        double shown = s[i] < b->n ? var[i] * (double)s[i] / n : 0.0;
        w2[i] = shown > w[i] ? shown : w[i];
    }
    kmv__budget_allocate(b, w2, m, s2);
    double extra = 0.0;
    *nredo = 0;
    for (size_t i = 0; i < m; i++) {
        redo[i] = s2[i] > s[i];
        if (redo[i]) {
            extra += (double)s2[i];
            (*nredo)++;
        }
    }
    return extra;
}

double kmv__heavy_threshold(const kmv__params *pa, size_t n, size_t m) {
    double h = pow((double)n, pa->gamma);
    if (h > KMV__WEIGHT_RATIO) h = KMV__WEIGHT_RATIO;
    if (h < 1.0) h = 1.0;
    double kappa = pow((double)n, -pa->alpha);
    double kb = pa->eps * sqrt((double)pa->min_samples / (16.0 * (double)m * h));
    if (kb < kappa) kappa = kb;
    /* kappa >= 2^-60 keeps r_near finite and the tables meaningful. */
    return kappa < 0x1p-60 ? 0x1p-60 : kappa;
}

double kmv__h1_ratio(const kmv__params *pa, size_t n, size_t m, double kappa) {
    /* H1 at n^gamma, or lower where kappa's bound needs. */
    double hi = pa->eps * pa->eps * (double)pa->min_samples / (16.0 * (double)m * kappa * kappa);
    if (hi > pow((double)n, pa->gamma)) hi = pow((double)n, pa->gamma);
    return hi < 1.0 ? 1.0 : hi;
}
