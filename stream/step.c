/* The decoding step's skeleton, the same for every kind of stream; see
 * step.h. kmv__stream_decode() takes the stream's lock, prepares the
 * shared state when the keys have moved on, and runs decode_once(), which
 * reads as the list of the step's parts. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <math.h>
#include <string.h>

#include "algo/budget.h"
#include "algo/costmodel.h"
#include "algo/density.h"
#include "algo/kernel.h"
#include "algo/stats.h"
#include "common/alloc.h"
#include "common/timer.h"
#include "stream/step.h"

/* Steps in a row that tried the approximate path and ran exact before the
 * next ones skip the attempt, and the longest skip. */
#define KMV__BACKOFF_FAILS 8
#define KMV__BACKOFF_MAX 4096

/* Where a step goes after one of its parts. */
typedef enum { FLOW_GO, FLOW_EXACT, FLOW_DONE } flow;

/* The exact row's cost in the cost model's units, for the plan's caps. */
static double row_cost(const kmv_stream *s) {
    return (double)kmv__index_keys(s->ix)->n * kmv__cost_window((double)s->d) *
           (1.0 + 0.1 * (double)(s->c - 1));
}

/* Whether the plan at this size was refused for its cost (not for the
 * memory cap): retried once the keys have doubled. */
static int plan_refused(const kmv_stream *s) {
    size_t n = kmv__index_keys(s->ix)->n;
    return s->decode_refused_n && n < 2 * s->decode_refused_n && !s->decode_refused_cap;
}

/* Why a step at the stream's size computes the exact row without looking
 * at the tables (a kmv_fallback, or -1 under params.exact), or 0 when it
 * takes the approximate path. */
static int exact_rule(const kmv_stream *s) {
    const kmv_index *ix = s->ix;
    size_t n = kmv__index_keys(ix)->n;
    if (kmv__index_params(ix)->exact) return -1;
    /* A refused plan is retried once the keys have doubled; one past the
     * memory cap, even under force_approx (it would only be refused
     * again). */
    int refused = s->decode_refused_n && n < 2 * s->decode_refused_n;
    if (refused && s->decode_refused_cap) return KMV_FALLBACK_MEMORY;
    if (kmv__index_force_approx(ix)) return 0; /* tests: measure the approximate path */
    if (n < KMV__DECODE_MIN_KEYS) return KMV_FALLBACK_SMALL;
    if (refused && !s->kind->sample_without_tables) return KMV_FALLBACK_LSH;
    return 0;
}

/* Where H1 starts, for the tables held. */
static double h1_weight(const kmv_stream *s) {
    const kmv_index *ix = s->ix;
    size_t n = kmv__index_keys(ix)->n;
    return kmv__h1_ratio(kmv__index_params(ix), n, 1, kmv__index_kappa(ix)) *
           (s->nx2 / (double)n);
}

/* Whether the step searches tables (a refused plan leaves a step of a kind
 * that samples without them). */
static int uses_tables(const kmv_stream *s) {
    return !(s->kind->sample_without_tables && plan_refused(s));
}

/* Whether the shared state must change before a step at the stream's size
 * can run: tables that do not serve this size's threshold, or draws made
 * at another size. Decided without the query, so every step at one size
 * reads the same state, whichever thread prepared it. */
static int needs_prep(const kmv_stream *s) {
    const kmv_index *ix = s->ix;
    size_t n = kmv__index_keys(ix)->n;
    if (n == 0 || s->nx2 <= 0.0 || exact_rule(s) != 0) return 0;
    if (kmv__stream_tree_serves(s)) return 0; /* no tables, no draws */
    double kappa = kmv__heavy_threshold(kmv__index_params(ix), n, 1);
    int serve = kmv__index_has_tables(ix) && kappa >= 0.5 * kmv__index_kappa(ix) &&
                n <= 2 * kmv__index_planned_keys(ix);
    if (!serve && uses_tables(s)) return 1;
    return s->drawn_n != n || s->drawn_w != h1_weight(s);
}

/* The rows a plan samples its queries' cost from: stored keys, taken as
 * queries, from the random order just past the keys the cost model
 * compares them with (so no key meets itself). A sample of the stream's
 * own keys rather than the query at hand: one unlucky first query must not
 * leave every step at this size exact, and the plan is then a function of
 * the stream alone. Returns the row count, into *out (free with the
 * allocator), or 0 when out of memory. */
static size_t plan_sample(const kmv_stream *s, float **out) {
    const kmv__keystore *ks = kmv__index_keys(s->ix);
    size_t n = ks->n, d = ks->d;
    size_t cnt = n < KMV__PLAN_QUERIES ? n : KMV__PLAN_QUERIES;
    size_t from = n >= KMV__PLAN_KEYS + cnt ? KMV__PLAN_KEYS : n - cnt;
    float *rows = kmv__malloc_array(kmv__index_alloc(s->ix), cnt ? cnt : 1, d * sizeof(float));
    *out = rows;
    if (rows == NULL) return 0;
    memcpy(rows, ks->rows + from * d, cnt * d * sizeof(float));
    for (size_t i = 0; i < cnt; i++) s->kind->stand_in(s, rows + i * d);
    return cnt;
}

/* Plan and fill the tables for this size and draw the sketch's rows below
 * H1; or record a refused plan (a kind that samples without tables still
 * draws). The only writer of the state steps share. */
static int prepare(kmv_stream *s, double *seconds) {
    double t0 = kmv__now();
    kmv_index *ix = s->ix;
    const kmv__params *pa = kmv__index_params(ix);
    size_t n = kmv__index_keys(ix)->n;
    int rc = KMV_OK, refused = 0;
    if (uses_tables(s)) {
        float *sample;
        size_t m = plan_sample(s, &sample);
        /* tables costing more than a tree standing by are refused: the
         * tree then serves */
        double cap = 0.25 * row_cost(s);
        if (s->tree_mode == TREE_STANDBY && s->tree_cost < cap) cap = s->tree_cost;
        kmv__plan_req rq = {sample, m, kmv__heavy_threshold(pa, n, 1), s->kind->miss(s),
                            kmv__index_force_approx(ix) ? INFINITY : cap * (double)m, 1.0};
        rc = m == 0 ? KMV_ENOMEM : kmv__index_plan(ix, &rq, &refused);
        kmv__free(kmv__index_alloc(ix), sample);
    }
    if (refused) {
        s->decode_refused_n = n;
        s->decode_refused_cap = 0;
    }
    /* A refused plan that leaves steps exact needs no draws. */
    if (rc == KMV_OK && !(refused && !s->kind->sample_without_tables)) {
        double whi = h1_weight(s);
        rc = kmv__sketch_draw(&s->sk, kmv__index_alloc(ix), kmv__index_keys(ix),
                              (size_t)pa->sketch_size, pa->seed, whi);
        s->drawn_n = rc == KMV_OK ? n : 0;
        s->drawn_w = whi;
    }
    *seconds += kmv__now() - t0;
    return rc;
}

/* ----------------------------------------------------------- one step */

static void step_free(kmv__step *t) {
    kmv__heavy_scratch_free(t->ht);
    void *arrays[] = {t->lb.chunk, t->lb.acc, t->lb.est, t->sum, t->skd, t->heavy};
    for (size_t u = 0; u < sizeof arrays / sizeof arrays[0]; u++) kmv__free(t->a, arrays[u]);
}

static int step_init(kmv__step *t, const kmv_stream *s, const float *q, kmv__stats *S) {
    const kmv_index *ix = s->ix;
    memset(t, 0, sizeof *t);
    t->s = s;
    t->ix = ix;
    t->pa = kmv__index_params(ix);
    t->a = kmv__index_alloc(ix);
    t->ks = kmv__index_keys(ix);
    t->q = q;
    t->n = t->ks->n;
    t->d = s->d;
    t->c = s->c;
    t->inv2s2 = (float)(0.5 / (t->pa->sigma * t->pa->sigma));
    t->S = S;
    size_t c = t->c, r = t->pa->sketch_size > 0 ? (size_t)t->pa->sketch_size : 1;
    t->lb = (kmv__light_buf){kmv__malloc_array(t->a, 256, sizeof(float)),
                             kmv__malloc_array(t->a, 2 * c, sizeof(double)),
                             kmv__malloc_array(t->a, c, sizeof(double))};
    t->sum = kmv__malloc_array(t->a, c, sizeof(double));
    t->skd = kmv__malloc_array(t->a, r, sizeof(float));
    if (!t->lb.chunk || !t->lb.acc || !t->lb.est || !t->sum || !t->skd) return KMV_ENOMEM;
    for (size_t col = 0; col < c; col++) t->sum[col] = 0.0;
    return KMV_OK;
}

/* Whether a step runs exact before it looks at anything (exact_why: the
 * caller's reason, a plan past params.max_bytes or the backoff), and what
 * it will search. */
static flow check_rule(kmv__step *t, int exact_why) {
    const kmv_stream *s = t->s;
    int rule = exact_rule(s);
    if (rule == -1) return FLOW_EXACT;
    t->S->fallback_reason = exact_why ? (kmv_fallback)exact_why : (kmv_fallback)rule;
    if (exact_why || rule != 0) return FLOW_EXACT;
    t->use_tables = uses_tables(s);
    if (needs_prep(s) || (t->use_tables && !kmv__index_has_tables(t->ix))) {
        /* the state moved under us */
        t->S->fallback_reason = KMV_FALLBACK_LSH;
        return FLOW_EXACT;
    }
    t->kappa = (float)kmv__index_kappa(t->ix);
    t->whi = h1_weight(s);
    t->shift = s->kind->shift(s, t->q);
    t->mask = (kmv__keymask){UINT32_MAX, s->ws, t->whi};
    kmv__lsh_shape none = {0, 0, 0.0};
    kmv__stats_tables(t->S, kmv__index_kappa(t->ix), t->use_tables ? kmv__index_shape(t->ix) : none);
    return FLOW_GO;
}

/* H1, the keys at or above whi, summed exactly from the sketch's top
 * groups (only the group straddling whi holds keys below it). */
static flow exact_columns(kmv__step *t) {
    const kmv_stream *s = t->s;
    size_t visited = 0, n_h1 = 0;
    for (size_t b = s->sk.ng; b-- > 0;) {
        const kmv__sketch_group *g = &s->sk.g[b];
        if (g->wround < t->whi) break;
        visited += g->len;
        if ((double)visited > 0.25 * (double)t->n) break;
        for (size_t u = 0; u < g->len; u++) {
            uint32_t j = g->ids[u];
            if (s->wid[j] < t->whi) continue;
            float kv = kmv__sqdist(t->q, kmv__keystore_row(t->ks, j), t->d) - t->shift;
            kmv__gauss_row_dist(&kv, 1, t->inv2s2, NULL);
            for (size_t col = 0; col < t->c; col++) t->sum[col] += (double)kv * s->x[(size_t)j * t->c + col];
            n_h1++;
        }
    }
    t->S->keys_exact = n_h1;
    if ((double)visited > 0.25 * (double)t->n) {
        t->S->fallback_reason = KMV_FALLBACK_COLUMNS;
        return FLOW_EXACT;
    }
    return FLOW_GO;
}

/* FindHeavy over the tables; a search meeting more bucket entries than a
 * quarter of the exact row is worth leaves the row exact, or unsearched
 * for a kind that samples without tables. */
static int heavy_keys(kmv__step *t, flow *next) {
    const kmv_stream *s = t->s;
    *next = FLOW_GO;
    if (!t->use_tables) return KMV_OK;
    kmv__heavy_src src = kmv__index_heavy(t->ix);
    int rc = kmv__heavy_scratch_new(&src, t->a, &t->ht);
    if (rc != KMV_OK) return rc;
    double cap = 0.25 * row_cost(s) / (KMV__COST_STEP + kmv__cost_cand((double)t->d));
    kmv__heavy_req rq = {t->ks, t->q, 1, NULL, t->shift, t->inv2s2, t->kappa,
                         kmv__index_force_approx(t->ix) ? INFINITY : cap};
    kmv__heavy_out out;
    if ((rc = kmv__heavy_find(&src, &rq, t->ht, &out)) != KMV_OK) return rc;
    t->S->lsh_steps = out.steps;
    if (out.over) {
        if (s->kind->sample_without_tables) t->use_tables = 0;
        else {
            t->S->fallback_reason = KMV_FALLBACK_HEAVY;
            *next = FLOW_EXACT;
        }
        return KMV_OK;
    }
    t->S->lsh_candidates = out.cands;
    t->nh = out.off[1];
    t->heavy = kmv__malloc_array(t->a, t->nh ? t->nh : 1, sizeof(uint32_t));
    if (t->heavy == NULL) return KMV_ENOMEM;
    if (t->nh) memcpy(t->heavy, out.id, t->nh * sizeof(uint32_t));
    kmv__values v = {s->x, t->c, NULL, s->wid, t->whi};
    kmv__heavy_sum(out.id, out.kv, t->nh, &v, t->sum);
    t->S->heavy_pairs = t->nh;
    return KMV_OK;
}

/* The light mass, then the kind's light part (windows). */
static flow light_keys(kmv__step *t, kmv__step_light *l) {
    const kmv_stream *s = t->s;
    kmv__density_req dr = {t->q,    t->d,  t->shift, t->inv2s2, t->kappa, t->heavy,
                           t->nh,   s->wid, t->whi};
    t->W = kmv__density(&s->sk, &dr, t->skd);
    t->S->sketch_evals = s->sk.r;
    int why = s->kind->light(t, l);
    t->S->samples = l->samples;
    t->S->rows_resampled = (size_t)l->resampled;
    if (why != 0) {
        t->S->fallback_reason = (kmv_fallback)why;
        return FLOW_EXACT;
    }
    return FLOW_GO;
}

/* One step on prepared state, reading the stream only; with exact_why
 * (a kmv_fallback), the exact row for that reason. flags as for
 * kmv__stream_decode(). prep: seconds this call spent preparing. */
static int decode_once(const kmv_stream *s, const float *q, float *y, kmv__stats *S,
                       int exact_why, unsigned flags, double prep) {
    int defer = (flags & KMV__STEP_DEFER) != 0, verify = (flags & KMV__STEP_VERIFY) != 0;
    double t0 = kmv__now() - prep, *ye = NULL;
    const kmv__params *pa = kmv__index_params(s->ix);
    kmv__stats_start(S, kmv__index_keys(s->ix)->n, 1, s->d, s->c, 1, pa->eps);
    S->seconds_lsh = prep;
    kmv__step t;
    kmv__step_light l = {0, 0.0, 0.0, 0};
    int rc = step_init(&t, s, q, S);
    flow f = FLOW_GO;
    if (rc == KMV_OK && (t.n == 0 || s->nx2 <= 0.0)) { /* an empty sum, or x = 0: exact */
        for (size_t col = 0; col < t.c; col++) t.lb.est[col] = 0.0;
        if (pa->measure_error) S->error_measured = 0.0;
        f = FLOW_DONE;
    }
    if (rc == KMV_OK && f == FLOW_GO && (pa->measure_error || verify)) {
        if ((ye = kmv__malloc_array(t.a, t.c, sizeof(double))) == NULL) rc = KMV_ENOMEM;
        else s->kind->exact_row(&t), memcpy(ye, t.lb.est, t.c * sizeof(double));
    }
    if (rc == KMV_OK && f == FLOW_GO && !exact_why && kmv__stream_tree_serves(s)) {
        /* the bounds tree, where its trial showed it cheap: answered, or
         * the exact row (the tables are not planned while it serves) */
        int answered;
        rc = kmv__stream_tree_row(s, q, t.lb.est, S, &answered);
        S->seconds_tree = prep;
        S->seconds_lsh = 0.0;
        if (rc == KMV_OK) f = answered ? FLOW_DONE : FLOW_EXACT;
    }
    if (rc == KMV_OK && f == FLOW_GO) f = check_rule(&t, exact_why);
    double th = kmv__now();
    if (rc == KMV_OK && f == FLOW_GO) f = exact_columns(&t);
    if (rc == KMV_OK && f == FLOW_GO) rc = heavy_keys(&t, &f);
    S->seconds_heavy = kmv__now() - th;
    double ts = kmv__now();
    if (rc == KMV_OK && f == FLOW_GO) f = light_keys(&t, &l);
    S->seconds_sample = kmv__now() - ts;
    if (rc == KMV_OK && f == FLOW_GO) {
        for (size_t col = 0; col < t.c; col++) t.lb.est[col] += t.sum[col];
        S->kernel_evals = S->lsh_candidates + S->sketch_evals + l.samples + S->keys_exact;
        s->kind->answer(&t, &l);
    } else if (rc == KMV_OK && f == FLOW_EXACT) {
        S->mode = pa->exact ? KMV_MODE_EXACT : KMV_MODE_FALLBACK;
        S->rows_exact = 1;
        S->error_estimate = 0.0;
        S->kernel_evals = defer ? 0 : t.n;
        if (!defer) s->kind->exact_row(&t);
    }
    if (rc == KMV_OK && !(defer && f == FLOW_EXACT)) {
        for (size_t col = 0; col < t.c; col++)
            if (!(fabs(t.lb.est[col]) <= 3.4028234663852886e38)) rc = KMV_EOVERFLOW;
        if (rc == KMV_OK) {
            /* the monitor: one row's error, on the scale error() gives */
            double e = ye != NULL ? s->kind->error(&t, ye) : 0.0;
            if (ye != NULL && pa->measure_error) S->error_measured = e;
            if (verify) kmv__stats_verified(S, &e, 1);
            for (size_t col = 0; col < t.c; col++) y[col] = (float)t.lb.est[col];
        }
    }
    if (rc == KMV_OK) {
        s->kind->report(&t);
        if (S->mode == KMV_MODE_EXACT) S->error_bound = 0.0; /* asked for exact */
        S->seconds = kmv__now() - t0;
    }
    step_free(&t);
    kmv__free(t.a, ye);
    return rc;
}

/* Steps share the stream under its read lock; the rare writes (planning
 * at a new size, dropping the tables when a plan passes the memory cap)
 * take the write lock, so they wait for the steps reading what they
 * change. A step's own scratch refused by the cap (the steps beside it
 * hold theirs) costs that step only: it reruns as the exact row, which
 * needs less, and the tables stay. */
/* The backoff's reason when this step skips the attempt, else 0. Only
 * for decoding steps (not a batch's deferred rows, whose probe decides),
 * and never where the approximate path is asked for whatever it costs. */
static int backing_off(kmv_stream *s, int defer) {
    if (defer || kmv__index_force_approx(s->ix)) return 0;
    unsigned k = atomic_load_explicit(&s->skip, memory_order_relaxed);
    while (k > 0)
        if (atomic_compare_exchange_weak_explicit(&s->skip, &k, k - 1, memory_order_relaxed,
                                                  memory_order_relaxed))
            return atomic_load_explicit(&s->skip_reason, memory_order_relaxed);
    return 0;
}

/* What a step that tried the approximate path tells the backoff: an
 * approximate row ends it; a row that ran exact after a search (not for
 * a rule known before trying) counts towards it. */
static void note_outcome(kmv_stream *s, const kmv__stats *S) {
    int why = S->fallback_reason;
    if (S->mode == KMV_MODE_APPROX) {
        atomic_store_explicit(&s->fails, 0, memory_order_relaxed);
        atomic_store_explicit(&s->span, 0, memory_order_relaxed);
        return;
    }
    if (S->mode != KMV_MODE_FALLBACK ||
        !(why == KMV_FALLBACK_SAMPLES || why == KMV_FALLBACK_BUDGET || why == KMV_FALLBACK_HEAVY ||
          why == KMV_FALLBACK_COLUMNS || why == KMV_FALLBACK_TREE))
        return;
    if (atomic_fetch_add_explicit(&s->fails, 1, memory_order_relaxed) + 1 < KMV__BACKOFF_FAILS)
        return;
    unsigned span = atomic_load_explicit(&s->span, memory_order_relaxed);
    span = span == 0 ? 16 : span >= KMV__BACKOFF_MAX / 2 ? KMV__BACKOFF_MAX : 2 * span;
    atomic_store_explicit(&s->span, span, memory_order_relaxed);
    atomic_store_explicit(&s->skip_reason, why, memory_order_relaxed);
    atomic_store_explicit(&s->skip, span, memory_order_relaxed);
    atomic_store_explicit(&s->fails, 0, memory_order_relaxed);
}

int kmv__stream_decode(kmv_stream *s, const float *q, float *y, kmv__stats *st, unsigned flags) {
    int defer = (flags & KMV__STEP_DEFER) != 0;
    kmv_index *ix = s->ix;
    kmv__meter *meter = kmv__index_meter(ix);
    double prep = 0.0;
    int rc = KMV_OK;
    if (pthread_rwlock_rdlock(&s->lock) != 0) return KMV_EINVAL;
    int skip = kmv__index_params(ix)->exact ? 0 : backing_off(s, defer);
    if (skip) {
        /* the exact row this stretch of steps has been ending with */
        rc = decode_once(s, q, y, st, skip, flags, 0.0);
        pthread_rwlock_unlock(&s->lock);
        return rc;
    }
    /* Another step may drop what this one prepared: try again a few
     * times, then decode_once() goes exact. */
    for (int tries = 0; tries < 4 && (kmv__stream_tree_stale(s) || needs_prep(s)); tries++) {
        pthread_rwlock_unlock(&s->lock);
        pthread_rwlock_wrlock(&s->lock);
        if (kmv__stream_tree_stale(s)) kmv__stream_tree_prepare(s, &prep);
        if (needs_prep(s)) {
            /* Exclusive: the refusals counted meanwhile are this plan's. */
            unsigned long r0 = kmv__meter_refusals(meter);
            rc = prepare(s, &prep);
            if (rc == KMV_ENOMEM && kmv__meter_refusals(meter) != r0) {
                /* Past the cap the tables (a cache) go and the steps run
                 * exact, as the index's products do, until the keys
                 * double. */
                kmv__index_drop_tables(ix);
                s->decode_refused_n = kmv__index_keys(ix)->n;
                s->decode_refused_cap = 1;
                rc = KMV_OK;
            }
        }
        pthread_rwlock_unlock(&s->lock);
        if (rc != KMV_OK) return rc;
        pthread_rwlock_rdlock(&s->lock);
    }
    unsigned long h0 = kmv__meter_refusals_here();
    rc = decode_once(s, q, y, st, 0, flags, prep);
    if (rc == KMV_OK && !defer) note_outcome(s, st);
    if (rc == KMV_ENOMEM && kmv__meter_refusals_here() != h0 && !kmv__index_params(ix)->exact) {
        h0 = kmv__meter_refusals_here();
        rc = decode_once(s, q, y, st, KMV_FALLBACK_MEMORY, flags, prep);
    }
    pthread_rwlock_unlock(&s->lock);
    if (rc == KMV_ENOMEM && kmv__meter_refusals_here() != h0) rc = KMV_ELIMIT;
    return rc;
}
