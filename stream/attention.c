/* Attention streams (kmv_stream_attention_create() in kmv.h): keys kept
 * lifted by Lemma 4.1 beside the values [v, 1], and the attention kind of
 * decoding step (step.h): the shift that keeps long queries in float's
 * range, the lifted kernel's certified (or empirical) sampling budget
 * against the row sum, the exact softmax row, and the normalized answer.
 * The argument: docs/guarantee-attention.md. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <float.h>
#include <limits.h>
#include <math.h>
#include <string.h>
#include <xxhash.h>

#include "algo/kernel.h"
#include "algo/light.h"
#include "common/alloc.h"
#include "common/rng.h"
#include "stream/step.h"

/* Bardenet and Maillard's constant in the range term of their empirical
 * Bernstein-Serfling bound: 7/3 + 3/sqrt(2). */
#define BM_KAPPA 4.4546

/* ------------------------------------------------------------- creation */

int kmv__stream_attention_new(const kmv__params *params, const kmv_allocator *base, size_t dim,
                              size_t n_cols, kmv_stream **out) {
    kmv__params p = *params;
    double scale = p.attn_scale > 0.0 ? p.attn_scale : 1.0 / sqrt((double)dim);
    p.sigma = kmv_attention_sigma(scale, dim);
    p.causal = 0; /* a step sees every key so far */
    int rc = kmv__stream_new(&p, base, dim + 1, n_cols + 1, out);
    if (rc != KMV_OK) return rc;
    kmv_stream *s = *out;
    s->attn = 1;
    s->kind = &kmv__attention_step;
    s->scale = scale;
    s->z_sum = kmv__normal_upper(0.25 * p.delta / KMV__ATTN_ROUNDS);
    s->z_err = kmv__normal_upper(0.125 * p.delta / KMV__ATTN_ROUNDS);
    return KMV_OK;
}

int kmv_stream_attention_create(const kmv_ctx *ctx, size_t dim, size_t n_cols, kmv_stream **out) {
    if (out == NULL) return KMV_EINVAL;
    *out = NULL;
    if (ctx == NULL || dim == 0 || n_cols == 0) return KMV_EINVAL;
    if (n_cols >= INT_MAX || dim >= INT_MAX / 64) return KMV_EOVERFLOW;
    return kmv__stream_attention_new(&ctx->params, &ctx->alloc, dim, n_cols, out);
}

/* -------------------------------------------------------------- appends */

/* The keys held, lifted again under a raised bound; their tables and
 * draws described the old geometry. Allocates nothing. */
static void relift(kmv_stream *s, double bound, size_t n_old) {
    kmv__keystore *ks = kmv__index_keys_mut(s->ix);
    size_t dim = s->d - 1;
    for (size_t id = 0; id < n_old; id++)
        ks->rows[(size_t)ks->pos_of[id] * s->d + dim] = (float)sqrt(bound - s->kn2[id]);
    kmv__index_drop_tables(s->ix);
    s->drawn_n = 0;
    s->decode_refused_n = 0;
    s->relifts++;
}

int kmv__stream_attn_append(kmv_stream *s, const float *keys, const float *v, size_t count) {
    kmv_index *ix = s->ix;
    const kmv_allocator *a = kmv__index_alloc(ix);
    kmv__meter *meter = kmv__index_meter(ix);
    size_t dim = s->d - 1, nc = s->c - 1, n0 = kmv__index_keys(ix)->n;
    kmv__meter_reset(meter);
    int rc = kmv__stream_grow(a, (void **)&s->kn2, n0, &s->kn2cap, n0 + count, sizeof(double));
    if (rc != KMV_OK) return kmv__meter_code(meter, rc);
    double *norms = kmv__malloc_array(a, count, sizeof(double));
    float *kl = kmv__malloc_array(a, count, s->d * sizeof(float));
    float *xv = kmv__malloc_array(a, count, s->c * sizeof(float));
    rc = KMV_ENOMEM;
    if (norms && kl && xv) {
        double bound = s->key_bound;
        for (size_t u = 0; u < count; u++) {
            /* In double and kmv_attention_lift's order: its check of
             * the bound and the lifted coordinates agree with these. */
            norms[u] = kmv_max_sq_norm(keys + u * dim, 1, dim);
            bound = norms[u] > bound ? norms[u] : bound;
        }
        /* A lifted coordinate is at most sqrt(bound): past float's range
         * the stream would hold infinities (and could not be saved). */
        rc = sqrt(bound) <= FLT_MAX ? kmv_attention_lift(keys, count, dim, 1, bound, kl)
                                    : KMV_EOVERFLOW;
        for (size_t u = 0; u < count && rc == KMV_OK; u++) {
            memcpy(xv + u * s->c, v + u * nc, nc * sizeof(float));
            xv[u * s->c + nc] = 1.0f;
        }
        /* Only the append can fail; the keys held move after it. Tables
         * about to be dropped take no inserts (which could only fail). */
        int raised = bound > s->key_bound && n0 > 0;
        if (rc == KMV_OK) rc = kmv__stream_append_keys(s, kl, xv, count, !raised);
        if (rc == KMV_OK) {
            memcpy(s->kn2 + n0, norms, count * sizeof(double));
            if (raised) relift(s, bound, n0);
            s->key_bound = bound;
        }
    }
    kmv__free(a, norms);
    kmv__free(a, kl);
    kmv__free(a, xv);
    return kmv__meter_code(meter, rc);
}

int kmv__stream_attn_decode(kmv_stream *s, const float *query, float *y, kmv__stats *stats,
                            unsigned flags) {
    int defer = (flags & KMV__STEP_DEFER) != 0;
    kmv_index *ix = s->ix;
    const kmv_allocator *a = kmv__index_alloc(ix);
    if (kmv__index_keys(ix)->n == 0) return KMV_EEMPTY; /* a softmax over nothing */
    /* The lifted query (extra coordinate 0) and the row with its ones
     * column; steps may run concurrently, so the scratch is the call's. */
    unsigned long r0 = kmv__meter_refusals_here(); /* steps beside this one refuse their own */
    float *ql = kmv__malloc_array(a, s->d, sizeof(float));
    float *yl = kmv__malloc_array(a, s->c, sizeof(float));
    int rc = KMV_ENOMEM;
    if (ql && yl) {
        memcpy(ql, query, (s->d - 1) * sizeof(float));
        ql[s->d - 1] = 0.0f;
        rc = kmv__stream_decode(s, ql, yl, stats, flags);
        if (rc == KMV_OK && !(defer && stats->mode != KMV_MODE_APPROX))
            memcpy(y, yl, (s->c - 1) * sizeof(float));
    }
    kmv__free(a, ql);
    kmv__free(a, yl);
    if (rc == KMV_ENOMEM && kmv__meter_refusals_here() != r0) rc = KMV_ELIMIT;
    return rc;
}

/* ------------------------------------------------------- the step's kind */

static double miss(const kmv_stream *s) {
    /* The certificate needs every key above the threshold found: each may
     * be missed with delta / (4 n), as the tables serve until the keys
     * double (at most 2 n keys: delta / 2 in all). */
    return 0.25 * kmv__index_params(s->ix)->delta / (double)kmv__index_keys(s->ix)->n;
}

static void stand_in(const kmv_stream *s, float *row) {
    row[s->d - 1] = 0.0f; /* a query's lifted coordinate */
}

/* Kernel values relative to exp(-(||q|| - sqrt(alpha))^2 / (2 sigma^2)):
 * every lifted key has ||k'||^2 = alpha, so that distance is the least any
 * key can have, no value passes 1, and the factor, common to the row,
 * cancels in the normalized output. Without it a long query's row would
 * fall below float's range. A distance that rounding takes below the shift
 * is clamped to 0 by the kernel. The subtraction costs a logit error of
 * about s (||q||^2 + alpha) 2^-24 per coordinate's rounding. */
static float shift(const kmv_stream *s, const float *q) {
    double qn = 0.0;
    for (size_t i = 0; i < s->d; i++) qn += (double)q[i] * q[i];
    double g = sqrt(qn) - sqrt(s->key_bound);
    return (float)(g * g);
}

/* What one window shows against the budget. */
typedef struct dev {
    double d2; /* ||D||^2 of the [v, 1] estimate's deviation bounds */
    double a2; /* its parts falling as 1 / sqrt(s) ... */
    double r2; /* ... and as 1 / s (the range's): they size the next window */
    double dz; /* the row sum's deviation bound */
} dev;

/* A window of size `want`'s deviation bounds. Certified: per column, n
 * times the empirical Bernstein-Serfling bound on the mean of its terms
 * (Bardenet and Maillard 2015, Theorem 3; failure 5 p per side, l =
 * ln(10 / p)), whose range b is what the light keys are certified to stay
 * under (tau, 2 tau max |v|). Empirical: the window's (and the sketch's)
 * variance times the normal quantiles, as the paper's A.1.4. */
static dev deviation(const kmv__step *t, size_t want, double v, double vsk, double tau,
                     double l) {
    const kmv_stream *s = t->s;
    size_t n = t->n, c = t->c;
    dev D = {0.0, 0.0, 0.0, 0.0};
    if (t->pa->attn_budget != KMV_BUDGET_CERTIFIED) {
        double vz = kmv__window_var_col(t->lb.acc, c, c - 1, n, want);
        D.d2 = D.a2 = s->z_err * s->z_err * (v > vsk ? v : vsk);
        D.dz = s->z_sum * sqrt(vz);
        return D;
    }
    double sw = (double)want, fpc = (1.0 - sw / (double)n) / sw;
    double rho = 1.0 - (sw - 1.0) / (double)n;
    double xr = sqrt(s->wmax - 1.0 > 0.0 ? s->wmax - 1.0 : 0.0); /* max |v_j,col| */
    for (size_t col = 0; col < c; col++) {
        /* The terms' sample variance is var / (n^2 fpc). */
        double var = kmv__window_var_col(t->lb.acc, c, col, n, want);
        double b = col + 1 == c ? tau : 2.0 * tau * xr;
        double dv = sqrt(2.0 * rho * l * var / (fpc * sw));
        double dr = (double)n * BM_KAPPA * b * l / sw;
        D.d2 += (dv + dr) * (dv + dr);
        D.a2 += dv * dv;
        D.r2 += dr * dr;
        if (col + 1 == c) D.dz = dv + dr;
    }
    return D;
}

/* The window size at which A / sqrt(s) + B / s meets the allowance (A and
 * B bound the two parts' norms, by Minkowski), a little over; more where
 * the sketch expects more variance than the window saw. */
static double size_needed(const dev *D, double v, double vsk, double allow, size_t want) {
    double A = sqrt(D->a2), B = sqrt(D->r2);
    if (vsk > v && v > 0.0) A *= sqrt(vsk / v);
    double x = B > 0.0 ? (sqrt(A * A + 4.0 * B * allow) - A) / (2.0 * B) : allow / A;
    return 1.1 * (double)want / (x * x); /* x = sqrt(s / need) */
}

/* What bounds the keys no heavy search returned: the shift's 1, or kappa
 * (unshifted) where the tables were searched (1e-3 over, for the shift's
 * rounding, about 1e-4 relative). */
static double light_range(const kmv__step *t) {
    if (!t->use_tables) return 1.0;
    double lt = log((double)t->kappa * 1.001) + (double)t->inv2s2 * (double)t->shift;
    return lt < 0.0 ? exp(lt) : 1.0;
}

/* The light part against a lower confidence bound on the whole lifted row
 * sum, lo = L + max(0, Z - D_Z) (L summed exactly, Z the window's
 * estimate of the rest): a window is kept when ||D|| <= eps lo, else a
 * larger one is drawn, until half the keys. Certified sizes lie on a fixed
 * grid min_samples 2^j, the window of grid index j at an offset fixed by j
 * (and the seed and the query), so a union over the grid and the columns
 * covers whichever window the data picks. */
static int light(kmv__step *t, kmv__step_light *out) {
    const kmv__params *pa = t->pa;
    size_t n = t->n, c = t->c, smin = (size_t)pa->min_samples, want = smin;
    int certified = pa->attn_budget == KMV_BUDGET_CERTIFIED, j = 0, grid = 1;
    while (2 * (smin << grid) < n && grid < 40) grid++; /* sizes smin 2^j below n / 2 */
    double l = log(10.0 * 2.0 * grid * (double)c / pa->delta), tau = light_range(t);
    double L = t->sum[c - 1];
    uint64_t qh = XXH3_64bits(t->q, t->d * sizeof(float));
    kmv__light lw = {t->ks, t->s->xs, c, t->q, t->inv2s2, t->shift, t->kappa,
                     t->heavy, t->nh, &t->mask};
    for (int round = 0; round < KMV__ATTN_ROUNDS && 2 * want < n; round++) {
        size_t off = kmv__window_offset(pa->seed ^ qh, KMV__RNG_DECODE, n, certified ? j : round, n);
        double v = kmv__window(&lw, off, want, &t->lb);
        out->samples += want;
        double sw = (double)want, vsk = (double)n * t->W * (1.0 - sw / (double)n) / sw;
        dev D = deviation(t, want, v, vsk, tau, l);
        double low = L + fmax(0.0, t->lb.est[c - 1] - D.dz), allow = pa->eps * low;
        /* Kernel values below float's normal range are flushed: n of them,
         * times the largest value row, must stay far below the error
         * allowed. */
        int floor_ok = allow > (double)n * 0x1p-119 * sqrt(t->s->wmax);
        if (D.d2 <= allow * allow && floor_ok) {
            out->v = sqrt(D.d2);
            out->lo = low;
            out->resampled = out->samples > smin;
            return 0;
        }
        if (!(allow > 0.0) || !floor_ok) break;
        double need = size_needed(&D, v, vsk, allow, want);
        if (!(need < 0.5 * (double)n)) break;
        if (certified) {
            for (j++; j < grid && (double)(smin << j) < need; j++) {}
            if (j >= grid) break;
            want = smin << j;
        } else {
            want = need < 2.0 * (double)want ? 2 * want : (size_t)ceil(need);
        }
    }
    return KMV_FALLBACK_SAMPLES;
}

/* est holds [sum K' v, sum K']: the normalized output. light() accepts
 * only lo <= the estimated row sum, so the sum is positive. */
static void answer(kmv__step *t, const kmv__step_light *l) {
    size_t c = t->c;
    double z = t->lb.est[c - 1], e = l->v / l->lo;
    for (size_t col = 0; col + 1 < c; col++) t->lb.est[col] /= z;
    t->lb.est[c - 1] = 1.0;
    t->S->error_estimate = e < 1.0 ? e * sqrt(t->s->wmax) / (1.0 - e) : INFINITY;
}

/* softmax(s <q, k_j>) over the store (the lifted coordinate meets the
 * query's 0), in chunks of 256 with the running maximum subtracted, so
 * nothing overflows or underflows to an empty sum. */
static void exact_row(kmv__step *t) {
    const kmv__keystore *ks = t->ks;
    size_t n = ks->n, d = t->d, dim = d - 1, c = t->c;
    float fs = (float)t->s->scale, *chunk = t->lb.chunk;
    double mx = -INFINITY, z = 0.0, *acc = t->lb.acc;
    for (size_t col = 0; col < c; col++) acc[col] = 0.0;
    for (size_t p0 = 0; p0 < n; p0 += 256) {
        size_t len = n - p0 < 256 ? n - p0 : 256;
        float cmx = -INFINITY;
        for (size_t u = 0; u < len; u++) {
            const float *r = ks->rows + (p0 + u) * d;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (size_t i = 0; i < dim; i++) dot += t->q[i] * r[i];
            chunk[u] = fs * dot;
            cmx = chunk[u] > cmx ? chunk[u] : cmx;
        }
        if (cmx > mx) { /* rescale what is summed to the new maximum */
            double f = exp(mx - cmx);
            z *= f;
            for (size_t col = 0; col < c; col++) acc[col] *= f;
            mx = cmx;
        }
        float fm = (float)mx;
        for (size_t u = 0; u < len; u++) chunk[u] = fm - chunk[u];
        kmv__gauss_row_dist(chunk, len, 1.0f, NULL); /* exp(l - max) */
        for (size_t u = 0; u < len; u++) {
            double e = chunk[u];
            z += e;
            const float *xr = t->s->xs + (p0 + u) * c;
            for (size_t col = 0; col + 1 < c; col++) acc[col] += e * xr[col];
        }
    }
    for (size_t col = 0; col + 1 < c; col++) t->lb.est[col] = acc[col] / z;
    t->lb.est[c - 1] = 1.0;
}

static double error(const kmv__step *t, const double *ye) {
    double e2 = 0.0;
    for (size_t col = 0; col < t->c; col++) e2 += (t->lb.est[col] - ye[col]) * (t->lb.est[col] - ye[col]);
    return sqrt(e2);
}

/* The caller's shapes, and the normalized bound: none under the empirical
 * budget once a row was sampled. */
static void report(kmv__step *t) {
    kmv__stats *S = t->S;
    const kmv__params *pa = t->pa;
    S->dim = t->d - 1;
    S->n_cols = t->c - 1;
    S->error_bound = S->mode == KMV_MODE_APPROX && pa->attn_budget == KMV_BUDGET_EMPIRICAL
                         ? INFINITY
                         : pa->eps * sqrt(t->s->wmax) / (1.0 - pa->eps);
}

const kmv__step_kind kmv__attention_step = {1, miss, stand_in, shift, light, answer, exact_row,
                                            error, report};
