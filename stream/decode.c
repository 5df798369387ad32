/* The decoding step: one query against every key so far, with the
 * stream's incrementally kept parts (see kmv_stream_decode() in kmv.h).
 *
 * It is ApproxKMV for m = 1: the heavy threshold, the exact columns and the
 * sample budget follow approx.c's rules at m = 1. What differs is that
 * nothing here may cost O(n): x and its weights are kept in the store's
 * order at append time (the window filters the exactly summed keys by
 * weight instead of zeroing them), the exactly summed keys are found from
 * the top groups of the x^2-grouped sketch, the sketch's draws are kept
 * until keys arrive, and candidates are deduplicated by sorting them. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "common/alloc.h"
#include "common/params.h"
#include "algo/costmodel.h"
#include "algo/kernel.h"
#include "common/rng.h"
#include "algo/light.h"
#include "common/timer.h"
#include "stream/stream.h"

/* Below this many keys an exact row costs microseconds: no tables. */
#define DECODE_MIN_KEYS 2048

/* A heavy key and its kernel value. */
typedef struct heavy_key {
    uint32_t id;
    float kv;
} heavy_key;

static int cmp_heavy(const void *a, const void *b) {
    uint32_t x = ((const heavy_key *)a)->id, y = ((const heavy_key *)b)->id;
    return (x > y) - (x < y);
}

/* Scratch for one step. */
typedef struct step {
    uint32_t *cand;  /* candidates, then heavy ids */
    float *kv;
    uint32_t *set;   /* the candidates' dedup set */
    heavy_key *heavy;
    uint64_t *codes;
    const uint32_t **bucket; /* the query's bucket in each table */
    size_t *blen;
    float *proj;
    float *chunk;    /* 256 */
    double *acc;     /* 2 c */
    double *est;     /* c */
    double *sum;     /* c: heavy and exact columns */
    float *skd;      /* sketch_size */
} step;

static void step_free(const kmv_allocator *a, step *t) {
    kmv__free(a, t->cand);
    kmv__free(a, t->kv);
    kmv__free(a, t->set);
    kmv__free(a, t->heavy);
    kmv__free(a, t->codes);
    kmv__free(a, (void *)t->bucket);
    kmv__free(a, t->blen);
    kmv__free(a, t->proj);
    kmv__free(a, t->chunk);
    kmv__free(a, t->acc);
    kmv__free(a, t->est);
    kmv__free(a, t->sum);
    kmv__free(a, t->skd);
}

/* The exact row over the store: a window covering every key. */
static void exact_row(const kmv_stream *s, const float *q, float inv2s2, step *t) {
    const kmv__keystore *ks = &s->ix->ks;
    kmv__window(ks, s->xs, s->c, q, inv2s2, 0.0f, 2.0f, NULL, 0, NULL, 0, ks->n, t->chunk, t->acc,
                t->est);
}

/* An attention stream's exact row: softmax(s <q, k_j>) over the store
 * (the lifted coordinate meets the query's 0), in chunks of 256 with the
 * running maximum subtracted, so nothing overflows or underflows to an
 * empty sum. est[c - 1] = 1: already normalized. */
static void attn_exact_row(const kmv_stream *s, const float *q, step *t) {
    const kmv__keystore *ks = &s->ix->ks;
    size_t n = ks->n, d = s->d, dim = d - 1, c = s->c;
    float fs = (float)s->scale;
    double mx = -INFINITY, z = 0.0;
    for (size_t col = 0; col < c; col++) t->acc[col] = 0.0;
    for (size_t p0 = 0; p0 < n; p0 += 256) {
        size_t len = n - p0 < 256 ? n - p0 : 256;
        float cmx = -INFINITY;
        for (size_t u = 0; u < len; u++) {
            const float *r = ks->rows + (p0 + u) * d;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (size_t i = 0; i < dim; i++) dot += q[i] * r[i];
            t->chunk[u] = fs * dot;
            cmx = t->chunk[u] > cmx ? t->chunk[u] : cmx;
        }
        if (cmx > mx) { /* rescale what is summed to the new maximum */
            double f = exp(mx - cmx);
            z *= f;
            for (size_t col = 0; col < c; col++) t->acc[col] *= f;
            mx = cmx;
        }
        float fm = (float)mx;
        for (size_t u = 0; u < len; u++) t->chunk[u] = fm - t->chunk[u];
        kmv__gauss_row_dist(t->chunk, len, 1.0f, NULL); /* exp(l - max) */
        for (size_t u = 0; u < len; u++) {
            double e = t->chunk[u];
            z += e;
            const float *xr = s->xs + (p0 + u) * c;
            for (size_t col = 0; col + 1 < c; col++) t->acc[col] += e * xr[col];
        }
    }
    for (size_t col = 0; col + 1 < c; col++) t->est[col] = t->acc[col] / z;
    t->est[c - 1] = 1.0;
}

/* The stream's exact row, normalized for attention. */
static void exact_answer(const kmv_stream *s, const float *q, float inv2s2, step *t) {
    if (s->attn) attn_exact_row(s, q, t);
    else exact_row(s, q, inv2s2, t);
}

/* Exact-row cost in the cost model's units, for the plan's caps. */
static double row_cost(const kmv_stream *s) {
    return (double)s->ix->ks.n * kmv__cost_window((double)s->d) * (1.0 + 0.1 * (double)(s->c - 1));
}

/* Whether the plan at this size was refused for its cost (not for the
 * memory cap): retried once the keys have doubled. An attention step then
 * samples without a heavy search, since its budget is relative to the row
 * sum and spread rows need none (see attn_light()). */
static int plan_refused(const kmv_stream *s) {
    size_t n = s->ix->ks.n;
    return s->decode_refused_n && n < 2 * s->decode_refused_n && !s->decode_refused_cap;
}

/* Why a step at the stream's size computes the exact row without looking
 * at the tables (a kmv_fallback, or -1 under params.exact), or 0 when it
 * takes the approximate path. */
static int exact_rule(const kmv_stream *s) {
    const kmv_index *ix = s->ix;
    size_t n = ix->ks.n;
    if (ix->params.exact) return -1;
    /* A refused plan is retried once the keys have doubled; one past the
     * memory cap, even under force_approx (it would only be refused
     * again). */
    int refused = s->decode_refused_n && n < 2 * s->decode_refused_n;
    if (refused && s->decode_refused_cap) return KMV_FALLBACK_MEMORY;
    if (ix->force_approx) return 0; /* tests: measure the approximate path */
    if (n < DECODE_MIN_KEYS) return KMV_FALLBACK_SMALL;
    if (refused) return s->attn ? 0 : KMV_FALLBACK_LSH;
    return 0;
}

/* Where H1 starts, for the tables held. */
static double h1_weight(const kmv_stream *s) {
    const kmv_index *ix = s->ix;
    size_t n = ix->ks.n;
    return kmv__h1_ratio(&ix->params, n, 1, ix->kappa) * (s->nx2 / (double)n);
}

/* Whether the shared state must change before a step at the stream's size
 * can run: tables that do not serve this size's threshold, or draws made
 * at another size. Decided without the query, so every step at one size
 * reads the same state, whichever thread prepared it. */
static int needs_prep(const kmv_stream *s) {
    const kmv_index *ix = s->ix;
    size_t n = ix->ks.n;
    if (n == 0 || s->nx2 <= 0.0 || exact_rule(s) != 0) return 0;
    double kappa = kmv__heavy_threshold(&ix->params, n, 1);
    int serve = ix->lsh_built && kappa >= 0.5 * ix->kappa && n <= 2 * ix->lsh_n;
    if (!serve && !(s->attn && plan_refused(s))) return 1;
    return s->drawn_n != n || s->drawn_w != h1_weight(s);
}

/* The rows a plan samples its queries' cost from: stored keys, taken as
 * queries, from the random order just past the keys the cost model
 * compares them with (so no key meets itself). A sample of the stream's
 * own keys rather than the query at hand: one unlucky first query must not
 * leave every step at this size exact, and the plan is then a function of
 * the stream alone. An attention key's lifted coordinate is zeroed, as a
 * query's is. Returns the row count, into *out (free with the allocator),
 * or 0 when out of memory. */
static size_t plan_sample(const kmv_stream *s, float **out) {
    const kmv__keystore *ks = &s->ix->ks;
    size_t n = ks->n, d = ks->d;
    size_t cnt = n < KMV__PLAN_QUERIES ? n : KMV__PLAN_QUERIES;
    size_t from = n >= KMV__PLAN_KEYS + cnt ? KMV__PLAN_KEYS : n - cnt;
    float *rows = kmv__malloc_array(&s->ix->alloc, cnt ? cnt : 1, d * sizeof(float));
    *out = rows;
    if (rows == NULL) return 0;
    memcpy(rows, ks->rows + from * d, cnt * d * sizeof(float));
    if (s->attn)
        for (size_t i = 0; i < cnt; i++) rows[i * d + d - 1] = 0.0f;
    return cnt;
}

/* Plan and fill the tables for this size and draw the sketch's rows below
 * H1; or record a refused plan (an attention stream, which samples without
 * tables, still draws). The only writer of the state steps share. */
static int prepare(kmv_stream *s, double *seconds) {
    double t0 = kmv__now();
    kmv_index *ix = s->ix;
    const kmv__params *pa = &ix->params;
    size_t n = ix->ks.n;
    int rc = KMV_OK;
    /* A Gaussian step's misses cost variance, so each heavy key may be
     * missed with probability delta / 2; an attention step's certificate
     * needs all of them found: each with delta / (4 n), as the tables
     * serve until the keys double. */
    double miss = s->attn ? 0.25 * pa->delta / (double)n : 0.5 * pa->delta;
    if (!(s->attn && plan_refused(s))) {
        float *sample;
        size_t m = plan_sample(s, &sample);
        rc = m == 0 ? KMV_ENOMEM
                    : kmv__index_ensure_lsh(ix, sample, m, kmv__heavy_threshold(pa, n, 1), miss,
                                            ix->force_approx ? INFINITY
                                                             : 0.25 * row_cost(s) * (double)m,
                                            1.0);
        kmv__free(&ix->alloc, sample);
    }
    int refused = rc == 1;
    if (refused) {
        s->decode_refused_n = n;
        s->decode_refused_cap = 0;
        rc = KMV_OK;
    }
    if (rc == KMV_OK && !(refused && !s->attn)) { /* a refused Gaussian plan runs exact: no draws */
        double whi = h1_weight(s);
        rc = kmv__sketch_draw(&s->sk, &ix->alloc, &ix->ks, (size_t)pa->sketch_size, pa->seed, whi);
        s->drawn_n = rc == KMV_OK ? n : 0;
        s->drawn_w = whi;
    }
    *seconds += kmv__now() - t0;
    return rc;
}

/* Bardenet and Maillard's constant in the range term of their empirical
 * Bernstein-Serfling bound: 7/3 + 3/sqrt(2). */
#define BM_KAPPA 4.4546

/* The light part of an attention step (see kmv_stream_attention_create()
 * for the guarantee). The budget is relative to a lower confidence bound
 * on the whole lifted row sum, lo = L + max(0, Z - D_Z): L the part summed
 * exactly (heavy keys, exact columns), Z the window's estimate of the rest
 * and D_Z its deviation bound. A window is kept when the deviation bounds
 * of its [v, 1] estimate, D, have ||D|| <= eps lo; otherwise a larger
 * window is drawn, until its size reaches half the keys.
 *
 * Certified window sizes come from a fixed grid, min_samples 2^j, and the
 * window of grid size j starts at an offset fixed by j (and the seed and
 * the query): so each window is an event fixed before any key is looked
 * at, and a union over the grid and the columns covers whichever window
 * the data leads to.
 *
 * Under KMV_BUDGET_CERTIFIED each column's deviation is the empirical
 * Bernstein-Serfling bound for sampling without replacement (Bardenet and
 * Maillard 2015, Theorem 3; failure 5 p per side): for a mean of s of n
 * terms in a range of width b with sample variance S^2,
 * S sqrt(2 rho l / s) + BM_KAPPA b l / s, rho = 1 - (s - 1) / n,
 * l = ln(10 / p), p = delta / (2 grid columns). The range is what the
 * light keys are certified to stay under: K'' < tau (tau = 1 by the
 * shift, or kappa exp(sh inv2s2) where the tables were searched, whose
 * plan misses a key with K' >= kappa with probability delta / (4 n), so
 * any of at most 2 n keys with delta / 2), so a dominant key no window met
 * still counts through b. The sketch's prediction only sizes the windows.
 *
 * Under KMV_BUDGET_EMPIRICAL the deviations are the windows' (and the
 * sketch's) variance times the normal quantile z_err, and lo uses z_sum:
 * the paper's appendix A.1.4 implementation, many fewer samples where
 * the range is wide, and no guarantee.
 *
 * Returns 0 with t->est the light sums, *sn the samples of every window
 * drawn, *dev the kept ||D|| and *lo the bound; else the kmv_fallback for
 * the exact row. */
static int attn_light(const kmv_stream *s, const float *q, float inv2s2, float fk, double tau,
                      step *t, size_t nh, const kmv__keymask *mask, double W, float sh,
                      size_t *sn, double *dev, double *lo) {
    const kmv__params *pa = &s->ix->params;
    const kmv__keystore *ks = &s->ix->ks;
    size_t n = ks->n, c = s->c;
    int certified = pa->attn_budget == KMV_BUDGET_CERTIFIED;
    double L = t->sum[c - 1];
    size_t smin = (size_t)pa->min_samples;
    int grid = 1; /* sizes smin 2^j below n / 2 */
    while (2 * (smin << grid) < n && grid < 40) grid++;
    double l = log(10.0 * 2.0 * grid * (double)c / pa->delta);
    double xr = sqrt(s->wmax - 1.0 > 0.0 ? s->wmax - 1.0 : 0.0); /* max |v_j,col| */
    uint64_t qh = XXH3_64bits(q, s->d * sizeof(float));
    *sn = 0;
    int j = 0; /* certified: the grid index of want */
    size_t want = smin;
    for (int round = 0; round < KMV__ATTN_ROUNDS; round++) {
        if (2 * want >= n) break;
        size_t off =
            kmv__window_offset(pa->seed ^ qh, KMV__RNG_DECODE, n, certified ? j : round, n);
        double v = kmv__window(ks, s->xs, c, q, inv2s2, sh, fk, t->cand, nh, mask, off, want,
                               t->chunk, t->acc, t->est);
        *sn += want;
        double sw = (double)want, fpc = (1.0 - sw / (double)n) / sw;
        double vsk = (double)n * W * fpc; /* the sketch's prediction of v */
        /* ||D||^2 = d2; its parts that fall as 1 / sqrt(s) (a2) and as 1 / s
         * (r2, the range's) size the next window. */
        double d2 = 0.0, a2 = 0.0, r2 = 0.0, dz = 0.0;
        if (certified) {
            /* Per column, n times the bound on the mean of the terms, whose
             * sample variance is var / (n^2 fpc). */
            double rho = 1.0 - (sw - 1.0) / (double)n;
            for (size_t col = 0; col < c; col++) {
                double var = kmv__window_var_col(t->acc, c, col, n, want);
                double b = col + 1 == c ? tau : 2.0 * tau * xr;
                double dv = sqrt(2.0 * rho * l * var / (fpc * sw));
                double dr = (double)n * BM_KAPPA * b * l / sw;
                d2 += (dv + dr) * (dv + dr);
                a2 += dv * dv;
                r2 += dr * dr;
                if (col + 1 == c) dz = dv + dr;
            }
        } else {
            double vz = kmv__window_var_col(t->acc, c, c - 1, n, want);
            d2 = a2 = s->z_err * s->z_err * (v > vsk ? v : vsk);
            dz = s->z_sum * sqrt(vz);
        }
        double low = L + fmax(0.0, t->est[c - 1] - dz);
        double allow = pa->eps * low;
        /* Kernel values below float's normal range are flushed: n of them,
         * times the largest value row, must stay far below the error
         * allowed. */
        int floor_ok = allow > (double)n * 0x1p-119 * sqrt(s->wmax);
        if (d2 <= allow * allow && floor_ok) {
            *dev = sqrt(d2);
            *lo = low;
            return 0;
        }
        if (!(allow > 0.0) || !floor_ok) break;
        /* The grid size at which A / sqrt(s) + B / s meets the allowance (A
         * and B bound the two parts' norms, by Minkowski), a little over,
         * at least the next; more where the sketch expects more variance
         * than the window saw. */
        double A = sqrt(a2), B = sqrt(r2);
        if (vsk > v && v > 0.0) A *= sqrt(vsk / v);
        double x = B > 0.0 ? (sqrt(A * A + 4.0 * B * allow) - A) / (2.0 * B) : allow / A;
        double need = 1.1 * sw / (x * x); /* x = sqrt(s / need) */
        if (!(need < 0.5 * (double)n)) break;
        if (certified) {
            j++;
            while (j < grid && (double)(smin << j) < need) j++;
            if (j >= grid) break;
            want = smin << j;
        } else {
            want = need < 2.0 * (double)want ? 2 * want : (size_t)ceil(need);
        }
    }
    return KMV_FALLBACK_SAMPLES;
}

/* One step on prepared state, reading the stream only; with no_plan (a
 * plan that did not fit params.max_bytes), the exact row. prep: seconds
 * this call spent preparing. */
static int decode_once(const kmv_stream *s, const float *q, float *y, kmv__stats *st, int no_plan,
                       int defer, double prep) {
    double t0 = kmv__now() - prep;
    const kmv_index *ix = s->ix;
    const kmv__params *pa = &ix->params;
    const kmv_allocator *a = &ix->alloc;
    const kmv__keystore *ks = &ix->ks;
    size_t n = ks->n, d = s->d, c = s->c;
    float inv2s2 = (float)(0.5 / (pa->sigma * pa->sigma));
    kmv__stats S;
    memset(&S, 0, sizeof S);
    S.mode = KMV_MODE_APPROX;
    S.n_keys = n;
    S.n_queries = 1;
    S.dim = d;
    S.n_cols = c;
    S.n_threads = 1;
    S.error_bound = pa->eps;
    S.error_measured = -1.0;
    S.seconds_lsh = prep;

    step t;
    memset(&t, 0, sizeof t);
    int rc = KMV_OK;
    t.chunk = kmv__malloc_array(a, 256, sizeof(float));
    t.acc = kmv__malloc_array(a, 2 * c, sizeof(double));
    t.est = kmv__malloc_array(a, c, sizeof(double));
    t.sum = kmv__malloc_array(a, c, sizeof(double));
    t.skd = kmv__malloc_array(a, pa->sketch_size > 0 ? (size_t)pa->sketch_size : 1, sizeof(float));
    double *ye = pa->measure_error ? kmv__malloc_array(a, c, sizeof(double)) : NULL;
    if (!t.chunk || !t.acc || !t.est || !t.sum || !t.skd || (pa->measure_error && !ye)) {
        rc = KMV_ENOMEM;
        goto out;
    }
    for (size_t col = 0; col < c; col++) t.sum[col] = 0.0;
    if (n == 0 || s->nx2 <= 0.0) { /* an empty sum, or x = 0 */
        for (size_t col = 0; col < c; col++) t.est[col] = 0.0;
        S.error_estimate = 0.0;
        goto answer;
    }
    if (ye != NULL) {
        exact_answer(s, q, inv2s2, &t);
        memcpy(ye, t.est, c * sizeof(double));
    }

    double exact_cost = row_cost(s);
    int force = ix->force_approx;
    int rule = exact_rule(s);
    if (rule == -1) goto exact;
    S.fallback_reason = no_plan ? KMV_FALLBACK_MEMORY : rule;
    if (no_plan || rule != 0) goto exact;
    /* Tables to search: none for an attention step whose plan was refused,
     * or (below) whose buckets would cost more than they can save. */
    int use_tables = !(s->attn && plan_refused(s));
    if (needs_prep(s) || (use_tables && !ix->lsh_built)) { /* the state moved under us */
        S.fallback_reason = KMV_FALLBACK_LSH;
        goto exact;
    }

    /* Threshold and exact columns: approx.c's rules at m = 1. */
    double delta_s = 0.5 * pa->delta;
    double smin = (double)pa->min_samples;
    double kappa = ix->kappa;
    float fk = (float)kappa;
    const kmv__lsh *lh = &ix->lsh;
    int L = use_tables ? lh->shape.L : 0;
    S.heavy_threshold = kappa;
    S.lsh_tables = L;
    S.lsh_hash_len = lh->shape.k;
    S.lsh_width = lh->shape.w;
    double whi = h1_weight(s);
    /* An attention step takes its kernel values relative to
     * exp(-(||q|| - sqrt(alpha))^2 / (2 sigma^2)): every lifted key has
     * ||k'||^2 = alpha, so that distance is the least any key can have, no
     * value passes 1, and the factor, common to the row, cancels in the
     * normalized output. Without it a long query's row would fall below
     * float's range (exp(-s (||q||^2 + alpha) / 2) at worst, against
     * exp(-s (||q|| - sqrt(alpha))^2 / 2) for its nearest possible key).
     * A distance that rounding takes below the shift is clamped to 0 by the
     * kernel, so no value passes 1. The subtraction costs precision as
     * ||q||^2 + alpha grows: a logit error of about s (||q||^2 + alpha)
     * 2^-24 per coordinate's rounding, 1e-4 at ||q||^2 = 10^4, s = 1/4. */
    float sh = 0.0f;
    if (s->attn) {
        double qn = 0.0;
        for (size_t i = 0; i < d; i++) qn += (double)q[i] * q[i];
        double g = sqrt(qn) - sqrt(s->key_bound);
        sh = (float)(g * g);
    }

    double th = kmv__now();
    /* H1, the keys at or above whi, from the sketch's top groups (only the
     * group straddling whi holds keys below it). */
    size_t visited = 0, n_h1 = 0;
    for (size_t b = s->sk.ng; b-- > 0;) {
        const kmv__sketch_group *g = &s->sk.g[b];
        if (g->wround < whi) break;
        visited += g->len;
        if ((double)visited > 0.25 * (double)n) break;
        for (size_t u = 0; u < g->len; u++) {
            uint32_t j = g->ids[u];
            if (s->wid[j] < whi) continue;
            float kv = kmv__sqdist(q, kmv__keystore_row(ks, j), d) - sh;
            kmv__gauss_row_dist(&kv, 1, inv2s2, NULL);
            for (size_t col = 0; col < c; col++) t.sum[col] += (double)kv * s->x[(size_t)j * c + col];
            n_h1++;
        }
    }
    S.keys_exact = n_h1;
    if ((double)visited > 0.25 * (double)n) {
        S.fallback_reason = KMV_FALLBACK_COLUMNS;
        goto exact;
    }

    /* Heavy keys: the query's buckets, deduplicated through an open-
     * addressed set of twice their entries (sorting every entry cost more
     * than the rest of the step); only the heavy few are sorted. */
    size_t steps = 0, nc = 0, nh = 0;
    if (use_tables) {
        t.codes = kmv__malloc_array(a, (size_t)L, sizeof(uint64_t));
        t.proj = kmv__malloc_array(a, (size_t)L * (size_t)lh->shape.k, sizeof(float));
        t.bucket = kmv__malloc_array(a, (size_t)L, sizeof(const uint32_t *));
        t.blen = kmv__malloc_array(a, (size_t)L, sizeof(size_t));
        if (!t.codes || !t.proj || !t.bucket || !t.blen) {
            rc = KMV_ENOMEM;
            goto out;
        }
        kmv__lsh_query_codes(lh, q, t.proj, t.codes);
        /* Each table is a cache miss or two: ask for every slot, then every
         * bucket, before reading any. */
        for (int tb = 0; tb < L; tb++) kmv__lsh_prefetch(lh, tb, t.codes[tb]);
        for (int tb = 0; tb < L; tb++) {
            t.bucket[tb] = kmv__lsh_bucket(lh, tb, t.codes[tb], &t.blen[tb]);
            if (t.blen[tb]) __builtin_prefetch(t.bucket[tb]);
            steps += t.blen[tb];
        }
        S.lsh_steps = steps;
        if ((double)steps * (KMV__COST_STEP + kmv__cost_cand((double)d)) > 0.25 * exact_cost &&
            !force) {
            if (!s->attn) {
                S.fallback_reason = KMV_FALLBACK_HEAVY;
                goto exact;
            }
            use_tables = 0; /* attention: the row is sampled whole */
        }
    }
    if (use_tables) {
        int bits = 4;
        while (((size_t)1 << bits) < 2 * steps) bits++;
        size_t smask = ((size_t)1 << bits) - 1;
        t.cand = kmv__malloc_array(a, steps ? steps : 1, sizeof(uint32_t));
        t.kv = kmv__malloc_array(a, steps ? steps : 1, sizeof(float));
        t.set = kmv__malloc_array(a, smask + 1, sizeof(uint32_t));
        t.heavy = kmv__malloc_array(a, steps ? steps : 1, sizeof(heavy_key));
        if (!t.cand || !t.kv || !t.set || !t.heavy) {
            rc = KMV_ENOMEM;
            goto out;
        }
        memset(t.set, 0xff, (smask + 1) * sizeof(uint32_t)); /* ids stop below UINT32_MAX */
        for (int tb = 0; tb < L; tb++) {
            size_t len = t.blen[tb];
            const uint32_t *ids = t.bucket[tb];
            for (size_t u = 0; u < len; u++) {
                uint32_t j = ids[u];
                size_t h = (size_t)(((uint64_t)j * 0x9E3779B97F4A7C15u) >> (64 - bits));
                while (t.set[h] != UINT32_MAX && t.set[h] != j) h = (h + 1) & smask;
                if (t.set[h] == j) continue;
                t.set[h] = j;
                t.cand[nc++] = j;
                __builtin_prefetch(&ks->pos_of[j]); /* where its row is, read below */
            }
        }
        S.lsh_candidates = nc;
        for (size_t u = 0; u < nc; u++) {
            /* The rows are scattered: fetch a few ahead. */
            if (u + 8 < nc) {
                const float *r = kmv__keystore_row(ks, t.cand[u + 8]);
                for (size_t o = 0; o < d; o += 16) __builtin_prefetch(r + o);
            }
            t.kv[u] = kmv__sqdist(q, kmv__keystore_row(ks, t.cand[u]), d) - sh;
        }
        if (nc) kmv__gauss_row_dist(t.kv, nc, inv2s2, NULL);
        for (size_t u = 0; u < nc; u++)
            if (t.kv[u] >= fk) t.heavy[nh++] = (heavy_key){t.cand[u], t.kv[u]};
        /* Ascending ids: the window's lookup needs them, and the sum's order
         * is then that of the keys, whatever the buckets' order. */
        qsort(t.heavy, nh, sizeof(heavy_key), cmp_heavy);
        for (size_t u = 0; u < nh; u++) {
            uint32_t j = t.heavy[u].id;
            t.cand[u] = j;
            if (s->wid[j] >= whi) continue; /* summed with H1 */
            for (size_t col = 0; col < c; col++)
                t.sum[col] += (double)t.heavy[u].kv * s->x[(size_t)j * c + col];
        }
    }
    S.heavy_pairs = nh;
    S.seconds_heavy = kmv__now() - th;

    /* The light part's density from the sketch's draws (made by prepare()
     * for this size). */
    double ts = kmv__now();
    double W = 0.0;
    if (s->sk.r) {
        kmv__sqdist_rows(q, s->sk.rows, s->sk.r, d, t.skd);
        for (size_t u = 0; u < s->sk.r; u++) t.skd[u] -= sh;
        kmv__gauss_row_dist(t.skd, s->sk.r, 2.0f * inv2s2, NULL); /* K^2 */
        float k2 = fk * fk;
        for (size_t u = 0; u < s->sk.r; u++) {
            uint32_t j = s->sk.ids[u];
            if (s->wid[j] >= whi) continue;
            if (t.skd[u] >= k2 && kmv__contains(t.cand, nh, j)) continue;
            W += t.skd[u];
        }
        W *= s->sk.scale;
    }
    S.sketch_evals = s->sk.r;
    kmv__keymask mask = {UINT32_MAX, s->ws, whi};
    size_t sn;
    double v, lo = 0.0; /* attention: v is the deviation bound, lo the row sum's bound */
    if (s->attn) {
        /* What bounds the keys no heavy search returned: the shift's 1, or
         * kappa (unshifted) where the tables were searched. */
        double tau = 1.0;
        if (use_tables) {
            /* 1e-3 over, for the shift's rounding (about 1e-4 relative). */
            double lt = log(kappa * 1.001) + (double)inv2s2 * (double)sh;
            tau = lt < 0.0 ? exp(lt) : 1.0;
        }
        int why = attn_light(s, q, inv2s2, fk, tau, &t, nh, &mask, W, sh, &sn, &v, &lo);
        S.samples = sn;
        if (why != 0) {
            S.fallback_reason = why;
            goto exact;
        }
        S.rows_resampled = sn > (size_t)smin;
    } else {
        /* One row's share of the budget: approx.c's allocation at m = 1. */
        double V = pa->eps * pa->eps * s->nx2 / (1.0 + sqrt(2.0 / delta_s));
        double want = ceil((double)n * W / V);
        if (!(want >= smin)) want = smin;
        if (want >= 0.5 * (double)n) {
            S.fallback_reason = KMV_FALLBACK_SAMPLES;
            goto exact;
        }
        sn = (size_t)want;
        v = kmv__window(ks, s->xs, c, q, inv2s2, 0.0f, fk, t.cand, nh, &mask,
                        kmv__window_offset(pa->seed, KMV__RNG_DECODE, n, 0, n), sn, t.chunk,
                        t.acc, t.est);
        /* More variance than planned: a fresh window sized from what this
         * one showed (the first estimate is discarded, so the answer stays
         * unbiased), or the exact row when that would cost as much. */
        if (v > V) {
            double more = ceil((double)sn * v / V);
            if (more >= 0.5 * (double)n) {
                S.fallback_reason = KMV_FALLBACK_SAMPLES;
                goto exact;
            }
            sn = (size_t)more;
            v = kmv__window(ks, s->xs, c, q, inv2s2, 0.0f, fk, t.cand, nh, &mask,
                            kmv__window_offset(pa->seed, KMV__RNG_DECODE, n, 1, n), sn, t.chunk,
                            t.acc, t.est);
            S.rows_resampled = 1;
        }
        S.samples = sn;
    }
    S.seconds_sample = kmv__now() - ts;
    for (size_t col = 0; col < c; col++) t.est[col] += t.sum[col];
    S.kernel_evals = nc + S.sketch_evals + sn + n_h1;
    if (s->attn) {
        /* attn_light() accepts only lo <= the estimated row sum, so z > 0. */
        double z = t.est[c - 1], e = v / lo;
        for (size_t col = 0; col + 1 < c; col++) t.est[col] /= z;
        t.est[c - 1] = 1.0;
        S.error_estimate = e < 1.0 ? e * sqrt(s->wmax) / (1.0 - e) : INFINITY;
    } else {
        S.error_estimate = sqrt(v / s->nx2);
    }
    goto answer;

exact:
    S.mode = pa->exact ? KMV_MODE_EXACT : KMV_MODE_FALLBACK;
    S.rows_exact = 1;
    S.error_estimate = 0.0;
    if (defer) { /* the caller sums the row, y untouched */
        S.kernel_evals = 0;
        S.seconds = kmv__now() - t0;
        if (st != NULL) *st = S;
        goto out;
    }
    exact_answer(s, q, inv2s2, &t);
    S.kernel_evals = n;

answer:
    for (size_t col = 0; col < c; col++) {
        if (!(fabs(t.est[col]) <= 3.4028234663852886e38)) {
            rc = KMV_EOVERFLOW;
            goto out;
        }
    }
    if (ye != NULL) {
        double e2 = 0.0;
        for (size_t col = 0; col < c; col++) e2 += (t.est[col] - ye[col]) * (t.est[col] - ye[col]);
        S.error_measured = s->nx2 > 0.0 && !s->attn ? sqrt(e2 / s->nx2) : sqrt(e2);
    }
    if (s->attn) { /* the caller's shapes, and the normalized bound */
        S.dim = d - 1;
        S.n_cols = c - 1;
        S.error_bound = S.mode == KMV_MODE_APPROX && pa->attn_budget == KMV_BUDGET_EMPIRICAL
                            ? INFINITY /* none */
                            : pa->eps * sqrt(s->wmax) / (1.0 - pa->eps);
    }
    if (S.mode == KMV_MODE_EXACT) S.error_bound = 0.0; /* asked for exact */
    for (size_t col = 0; col < c; col++) y[col] = (float)t.est[col];
    S.seconds = kmv__now() - t0;
    if (st != NULL) *st = S;

out:
    step_free(a, &t);
    kmv__free(a, ye);
    return rc;
}

/* Steps share the stream under its read lock; the rare writes (planning
 * at a new size, dropping the tables when a plan passes the memory cap)
 * take the write lock, so they wait for the steps reading what they
 * change. A step's own scratch refused by the cap (the steps beside it
 * hold theirs) costs that step only: it reruns as the exact row, which
 * needs less, and the tables stay. */
int kmv__stream_decode(kmv_stream *s, const float *q, float *y, kmv__stats *st, int defer) {
    kmv_index *ix = s->ix;
    double prep = 0.0;
    int rc = KMV_OK;
    if (pthread_rwlock_rdlock(&s->lock) != 0) return KMV_EINVAL;
    /* Another step may drop what this one prepared: try again a few
     * times, then decode_once() goes exact. */
    for (int tries = 0; tries < 4 && needs_prep(s); tries++) {
        pthread_rwlock_unlock(&s->lock);
        pthread_rwlock_wrlock(&s->lock);
        if (needs_prep(s)) {
            /* Exclusive: the refusals counted meanwhile are this plan's. */
            unsigned long r0 = kmv__meter_refusals(&ix->meter);
            rc = prepare(s, &prep);
            if (rc == KMV_ENOMEM && kmv__meter_refusals(&ix->meter) != r0) {
                /* Past the cap the tables (a cache) go and the steps run
                 * exact, as the index's products do, until the keys
                 * double. */
                if (ix->lsh_built) {
                    kmv__lsh_free(&ix->lsh, &ix->alloc);
                    ix->lsh_built = 0;
                }
                s->decode_refused_n = ix->ks.n;
                s->decode_refused_cap = 1;
                rc = KMV_OK;
            }
        }
        pthread_rwlock_unlock(&s->lock);
        if (rc != KMV_OK) return rc;
        pthread_rwlock_rdlock(&s->lock);
    }
    unsigned long h0 = kmv__meter_refusals_here();
    rc = decode_once(s, q, y, st, 0, defer, prep);
    if (rc == KMV_ENOMEM && kmv__meter_refusals_here() != h0 && !ix->params.exact) {
        h0 = kmv__meter_refusals_here();
        rc = decode_once(s, q, y, st, 1, defer, prep);
    }
    pthread_rwlock_unlock(&s->lock);
    if (rc == KMV_ENOMEM && kmv__meter_refusals_here() != h0) rc = KMV_ELIMIT;
    return rc;
}
