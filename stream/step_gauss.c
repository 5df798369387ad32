/* The Gaussian stream's decoding step: its light keys sampled to the
 * budget's share of one row (the case m = 1 of algo/budget.h), checked
 * after the fact like a batch's rows; see step.h. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <math.h>

#include "algo/budget.h"
#include "algo/light.h"
#include "common/rng.h"
#include "stream/step.h"

static double miss(const kmv_stream *s) {
    /* A miss costs variance, never bias: each heavy key may be missed with
     * the half of delta the sampling does not take. */
    return 0.5 * kmv__index_params(s->ix)->delta;
}

static void stand_in(const kmv_stream *s, float *row) {
    (void)s;
    (void)row; /* a stored key is a query as it is */
}

static float shift(const kmv_stream *s, const float *q) {
    (void)s;
    (void)q;
    return 0.0f;
}

void kmv__step_exact_window(kmv__step *t) {
    kmv__light l = {t->ks, t->s->xs, t->c, t->q, t->inv2s2, 0.0f, 2.0f, NULL, 0, NULL};
    kmv__window(&l, 0, t->n, &t->lb);
}

/* The step's window at round r (its offset fixed by the key count and r). */
static double window(kmv__step *t, size_t s, int r) {
    kmv__light l = {t->ks, t->s->xs, t->c, t->q, t->inv2s2, 0.0f, t->kappa,
                    t->heavy, t->nh, &t->mask};
    size_t off = kmv__window_offset(t->pa->seed, KMV__RNG_DECODE, t->n, r, t->n);
    return kmv__window(&l, off, s, &t->lb);
}

static int light(kmv__step *t, kmv__step_light *out) {
    const kmv__params *pa = t->pa;
    kmv__budget b = {pa->eps * pa->eps * t->s->nx2, 0.5 * pa->delta, (size_t)pa->min_samples, t->n};
    size_t s, s2;
    kmv__budget_allocate(&b, &t->W, 1, &s);
    if (s >= t->n) return KMV_FALLBACK_SAMPLES;
    double v = window(t, s, 0);
    if (kmv__budget_exceeded(&b, &v, 1)) {
        /* A fresh window sized from what this one showed (the first
         * estimate is discarded, so the answer stays unbiased), or the
         * exact row when that would cost as much. */
        double w2;
        unsigned char redo;
        size_t nredo;
        kmv__budget_resample(&b, &t->W, &v, &s, 1, &w2, &s2, &redo, &nredo);
        if (s2 >= t->n) return KMV_FALLBACK_SAMPLES;
        v = window(t, s2, 1);
        s = s2;
        out->resampled = 1;
    }
    out->samples = s;
    out->v = v;
    return 0;
}

static void answer(kmv__step *t, const kmv__step_light *l) {
    t->S->error_estimate = sqrt(l->v / t->s->nx2);
}

static double error(const kmv__step *t, const double *ye) {
    double e2 = 0.0;
    for (size_t col = 0; col < t->c; col++) e2 += (t->lb.est[col] - ye[col]) * (t->lb.est[col] - ye[col]);
    return t->s->nx2 > 0.0 ? sqrt(e2 / t->s->nx2) : sqrt(e2);
}

static void report(kmv__step *t) {
    (void)t; /* the shapes and bound kmv__stats_start() gave */
}

const kmv__step_kind kmv__gauss_step = {0, miss, stand_in, shift, light, answer,
                                        kmv__step_exact_window, error, report};
