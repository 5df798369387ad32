/* ApproxKMV's driver (Algorithm 3) for a block of queries; see batch.h.
 * kmv__batch_matvec() reads as the algorithm's list of steps: each step is
 * a function below that either lets the product go on, hands it to the
 * exact engine (a fallback, with the reason) or finishes it. Rows run in
 * parallel blocks; results do not depend on the threads. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "algo/budget.h"
#include "algo/costmodel.h"
#include "algo/density.h"
#include "algo/exact.h"
#include "algo/heavy.h"
#include "algo/kernel.h"
#include "algo/light.h"
#include "algo/sketch.h"
#include "algo/stats.h"
#include "algo/xsplit.h"
#include "common/alloc.h"
#include "common/rng.h"
#include "common/threads.h"
#include "common/timer.h"
#include "engine/batch.h"
#include "engine/batch_tree.h"
#include "engine/index_layout.h"
#include "engine/rows.h"

#define QB KMV__HEAVY_BLOCK /* queries per block of the row passes */

/* Where the product goes after a step. */
typedef enum { FLOW_GO, FLOW_FALLBACK, FLOW_DONE } flow;

/* Everything the steps share. */
typedef struct batch {
    kmv_index *ix;
    const kmv__params *pa;
    const kmv_allocator *a;
    const float *q, *x;
    float *y;
    size_t m, n, d, c;
    int nt, causal;
    kmv__stats *S;
    flow flow;
    float inv2s2, kappa;
    double exact_cost, col_cost, win, samples;
    kmv__heavy_src src;
    kmv__xsplit xs;
    kmv__sketch sk;
    kmv__budget budget;
    /* per row */
    double *yh;        /* m x c heavy sums */
    double *w;         /* the light mass W_i */
    uint32_t **hid;    /* heavy ids, ascending */
    uint32_t *hlen;
    uint32_t **blocks; /* per block allocation behind hid */
    size_t nblk;
    size_t *order;     /* rows in the order the heavy pass takes them */
    size_t *s;         /* samples; n means an exact row */
    double *var;       /* window variance */
    double *w2;        /* the resampling's scratch */
    size_t *s2;
    unsigned char *redo;
    float *chunk;      /* nt x 256: the sampling pass's scratch */
    double *acc;       /* nt x stride: acc (2c) and est (c) */
    size_t stride;     /* 3c rounded up to a cache line, so threads never
                          share one (acc is written in the window's loop) */
    /* the heavy pass's accounting */
    uint64_t steps, cands, heavy_pairs;
    double cost_cap, cost_spent;
    int abort, nomem;
} batch;

static void progress(const batch *b, double f) {
    if (b->pa->progress != NULL) b->pa->progress(b->pa->progress_opaque, f);
}

/* The last key id row i may see. */
static uint32_t row_limit(const batch *b, size_t i) {
    return b->causal && i < UINT32_MAX ? (uint32_t)i : UINT32_MAX;
}

/* Kernel entries the product needs: m n, or under causal masking the
 * min(i + 1, n) keys each row i sees. */
static double visible_entries(const kmv_index *ix, size_t m) {
    double n = (double)ix->ks.n, mm = (double)m;
    if (!ix->params.causal) return mm * n;
    double tri = mm < n ? mm : n;
    return tri * (tri + 1.0) / 2.0 + (mm - tri) * n;
}

/* The exact engine over the store's order, with x permuted to match; for
 * a causal product, over the keys gathered back into id order. */
static int exact_product(const kmv_index *ix, const float *q, size_t m, const float *x, size_t c,
                         float *y, int *threads) {
    const kmv__keystore *ks = &ix->ks;
    int causal = ix->params.causal;
    size_t n = ks->n, d = ix->d;
    float *buf = causal ? kmv__malloc_array(&ix->alloc, n, d * sizeof(float))
                        : kmv__malloc_array(&ix->alloc, n, c * sizeof(float));
    if (buf == NULL) return KMV_ENOMEM;
    kmv__problem pr = {q, ks->rows, buf, y, m, n, d, c, 0, kmv__threads(&ix->params), NULL, NULL};
    if (causal) {
        for (size_t j = 0; j < n; j++) memcpy(buf + j * d, kmv__keystore_row(ks, j), d * sizeof(float));
        pr.k = buf;
        pr.x = x;
        pr.causal = 1;
    } else {
        for (size_t p = 0; p < n; p++)
            memcpy(buf + p * c, x + (size_t)ks->id_at[p] * c, c * sizeof(float));
    }
    int wide = 0;
    int rc = kmv__exact_gauss(&ix->alloc, &pr, ix->params.sigma, &wide, threads);
    kmv__free(&ix->alloc, buf);
    return rc;
}

/* The exact engine in the plan's place; S keeps what planning found. */
static int run_fallback(const kmv_index *ix, const float *q, size_t m, const float *x, size_t c,
                        float *y, kmv__stats *S) {
    double tk = kmv__now();
    int threads = 1;
    int rc = exact_product(ix, q, m, x, c, y, &threads);
    S->seconds_kernel = kmv__now() - tk;
    if (rc != KMV_OK) return rc;
    S->n_threads = threads;
    kmv__stats_fallback(S, S->fallback_reason, (uint64_t)(visible_entries(ix, m) + 0.5));
    if (ix->params.exact) { /* asked for, not fallen back to (kmv_mode) */
        S->mode = KMV_MODE_EXACT;
        S->fallback_reason = KMV_FALLBACK_NONE;
        S->error_bound = 0.0;
    }
    return KMV_OK;
}

static void fall_back(batch *b, kmv_fallback why) {
    b->S->fallback_reason = why;
    b->flow = FLOW_FALLBACK;
}

/* ---------------------------------------------------------------- steps */

/* Too small to gain (fewer keys than a few windows), and the exact cost
 * the plan has to beat. */
static int check_size(batch *b) {
    size_t n = b->n, s_min = (size_t)b->pa->min_samples;
    if (n == 0) { /* an empty sum */
        memset(b->y, 0, b->m * b->c * sizeof(float));
        if (b->pa->measure_error) b->S->error_measured = 0.0;
        b->flow = FLOW_DONE;
        return KMV_OK;
    }
    if (b->pa->exact) { /* the exact engine, as asked */
        b->flow = FLOW_FALLBACK;
        return KMV_OK;
    }
    if (!b->ix->force_approx && b->pa->backend != KMV_BACKEND_TREE &&
        (n < 4 * s_min || (double)b->m * (double)n < KMV__APPROX_MIN_ENTRIES)) {
        fall_back(b, KMV_FALLBACK_SMALL);
        return KMV_OK;
    }
    b->exact_cost = visible_entries(b->ix, b->m) * kmv__cost_exact((double)b->d) *
                    (1.0 + 0.03 * (double)(b->c - 1));
    /* Where the exact engine would take its double-precision path, the
     * product to beat costs about twice as much. */
    int wide = 0;
    int rc = kmv__exact_gauss_wide(b->a, b->q, b->m, b->ix->ks.rows, n, b->d, b->pa->sigma, &wide);
    if (wide) b->exact_cost *= KMV__COST_WIDE;
    return rc;
}

/* The bounds tree, where its certificate is cheap (batch_tree.h). */
static int try_tree(batch *b) {
    int answered;
    int rc = kmv__batch_tree(b->ix, b->q, b->m, b->x, b->c, b->y, b->exact_cost, b->S, &answered);
    if (rc == KMV_OK && answered) b->flow = FLOW_DONE;
    return rc;
}

/* FindHeavy's tables for this threshold (half the failure probability for
 * sampling, half for misses). */
static int plan_tables(batch *b) {
    double tl = kmv__now();
    kmv__plan_req rq = {b->q, b->m, kmv__heavy_threshold(b->pa, b->n, b->m), 0.5 * b->pa->delta,
                        b->ix->force_approx ? INFINITY : 0.25 * b->exact_cost,
                        (double)b->n / (double)b->m};
    int refused;
    int rc = kmv__index_plan(b->ix, &rq, &refused);
    b->S->seconds_lsh = kmv__now() - tl;
    if (rc != KMV_OK) return rc;
    if (refused) {
        fall_back(b, KMV_FALLBACK_LSH);
        return KMV_OK;
    }
    b->kappa = (float)b->ix->kappa; /* tables planned for a finer threshold serve too */
    b->src = kmv__index_heavy(b->ix);
    kmv__stats_tables(b->S, b->ix->kappa, kmv__index_shape(b->ix));
    return KMV_OK;
}

/* Lemma 3.2: x's huge entries summed exactly, its tiny ones dropped and
 * charged to eps; then what the budget leaves for sampling. */
static int split_x(batch *b) {
    const kmv__params *pa = b->pa;
    int rc = kmv__xsplit_run(&b->xs, b->a, &b->ix->ks, b->x, b->c,
                             kmv__h1_ratio(pa, b->n, b->m, b->ix->kappa));
    if (rc != KMV_OK) return rc;
    b->S->keys_exact = b->xs.n_h1;
    b->S->keys_dropped = b->xs.n_drop;
    b->S->keys_sampled = b->xs.n_t;
    if (b->xs.nx2 <= 0.0) { /* x = 0 */
        memset(b->y, 0, b->m * b->c * sizeof(float));
        b->flow = FLOW_DONE;
        return KMV_OK;
    }
    double bs = pa->eps * sqrt(b->xs.nx2) - sqrt((double)b->m) * b->xs.drop_l1;
    b->budget = (kmv__budget){bs * bs, 0.5 * pa->delta, (size_t)pa->min_samples, b->n};
    b->col_cost = (double)b->xs.n_h1 * (double)b->m * kmv__cost_cand((double)b->d);
    if (bs <= 0.0) fall_back(b, KMV_FALLBACK_BUDGET);
    else if (b->col_cost > 0.25 * b->exact_cost && !b->ix->force_approx)
        fall_back(b, KMV_FALLBACK_COLUMNS);
    return KMV_OK;
}

/* The density sketch over T's keys, in the store's order, and the row
 * arrays every later step writes. */
static int draw_sketch(batch *b) {
    const kmv__keystore *ks = &b->ix->ks;
    int rc = KMV_OK;
    for (size_t p = 0; p < b->n && rc == KMV_OK; p++)
        if (b->xs.wp[p] > 0.0) rc = kmv__sketch_add(&b->sk, b->a, ks->id_at[p], b->xs.wp[p]);
    if (rc == KMV_OK)
        rc = kmv__sketch_draw(&b->sk, b->a, ks, (size_t)b->pa->sketch_size, b->pa->seed, INFINITY);
    if (rc != KMV_OK) return rc;
    size_t m = b->m;
    b->nblk = (m + QB - 1) / QB;
    b->yh = kmv__malloc_array(b->a, m, b->c * sizeof(double));
    b->w = kmv__malloc_array(b->a, m, sizeof(double));
    b->hid = kmv__malloc_array(b->a, m, sizeof(uint32_t *));
    b->hlen = kmv__malloc_array(b->a, m, sizeof(uint32_t));
    b->blocks = kmv__malloc_array(b->a, b->nblk, sizeof(uint32_t *));
    if (b->blocks != NULL) memset(b->blocks, 0, b->nblk * sizeof(uint32_t *));
    b->s = kmv__malloc_array(b->a, m, sizeof(size_t));
    b->var = kmv__malloc_array(b->a, m, sizeof(double));
    if (!b->yh || !b->w || !b->hid || !b->hlen || !b->blocks || !b->s || !b->var)
        return KMV_ENOMEM;
    b->cost_cap = b->ix->force_approx ? INFINITY : 0.25 * b->exact_cost - b->col_cost;
    progress(b, 0.05);
    return KMV_OK;
}

typedef struct keyed {
    uint64_t code;
    size_t row;
} keyed;

static int cmp_keyed(const void *pa, const void *pb) {
    const keyed *x = pa, *y = pb;
    if (x->code != y->code) return x->code < y->code ? -1 : 1;
    return (x->row > y->row) - (x->row < y->row);
}

/* Rows in the backend's locality order: queries meeting the same
 * candidates share blocks, and their candidate rows are still in cache
 * when the next one asks. Results do not depend on the order. */
static int order_rows(batch *b) {
    size_t m = b->m;
    keyed *kd = kmv__malloc_array(b->a, m, sizeof(keyed));
    kmv__heavy_scratch *t = NULL;
    b->order = kmv__malloc_array(b->a, m, sizeof(size_t));
    int rc = kd && b->order ? kmv__heavy_scratch_new(&b->src, b->a, &t) : KMV_ENOMEM;
    uint64_t key[QB];
    for (size_t i0 = 0; rc == KMV_OK && i0 < m; i0 += QB) {
        size_t bi = m - i0 < QB ? m - i0 : QB;
        kmv__heavy_locality(&b->src, b->q + i0 * b->d, bi, t, key);
        for (size_t u = 0; u < bi; u++) kd[i0 + u] = (keyed){key[u], i0 + u};
    }
    if (rc == KMV_OK) {
        qsort(kd, m, sizeof(keyed), cmp_keyed);
        for (size_t i = 0; i < m; i++) b->order[i] = kd[i].row;
    }
    kmv__heavy_scratch_free(t);
    kmv__free(b->a, kd);
    return rc;
}

/* A thread's scratch for the heavy pass. */
typedef struct hscratch {
    kmv__heavy_scratch *t;
    float *qblk; /* QB x d: the block's queries */
    float *skd;  /* the sketch's draws */
} hscratch;

/* FindHeavy and the light mass for rows rows[0 .. bi - 1]: heavy sums and
 * lists (kept in the block's allocation), W_i. Returns the block's
 * predicted cost, or -1 on allocation failure. */
static double heavy_block(batch *b, hscratch *h, const size_t *rows, size_t bi, size_t blk) {
    size_t d = b->d, c = b->c;
    uint32_t lim[QB];
    for (size_t u = 0; u < bi; u++) {
        memcpy(h->qblk + u * d, b->q + rows[u] * d, d * sizeof(float));
        lim[u] = row_limit(b, rows[u]);
    }
    kmv__heavy_req rq = {&b->ix->ks, h->qblk, bi, lim, 0.0f, b->inv2s2, b->kappa, INFINITY};
    kmv__heavy_out out;
    if (kmv__heavy_find(&b->src, &rq, h->t, &out) != KMV_OK) return -1.0;
    size_t nh = out.off[bi];
    uint32_t *keep = nh ? kmv__malloc_array(b->a, nh, sizeof(uint32_t)) : NULL;
    if (nh && keep == NULL) return -1.0;
    if (nh) memcpy(keep, out.id, nh * sizeof(uint32_t));
    b->blocks[blk] = keep;
    kmv__values vals = {b->xs.xp, c, b->ix->ks.pos_of, NULL, 0.0};
    for (size_t u = 0; u < bi; u++) {
        size_t i = rows[u], off = out.off[u], len = out.off[u + 1] - off;
        b->hid[i] = keep ? keep + off : NULL;
        b->hlen[i] = (uint32_t)len;
        double *yh = b->yh + i * c;
        for (size_t col = 0; col < c; col++) yh[col] = 0.0;
        if (len) kmv__heavy_sum(out.id + off, out.kv + off, len, &vals, yh);
        kmv__density_req dr = {h->qblk + u * d, d, 0.0f, b->inv2s2, b->kappa, b->hid[i], len,
                               NULL, 0.0};
        b->w[i] = kmv__density(&b->sk, &dr, h->skd);
    }
#pragma omp atomic
    b->steps += out.steps;
#pragma omp atomic
    b->cands += out.cands;
#pragma omp atomic
    b->heavy_pairs += nh;
    kmv__lsh_shape sh = kmv__index_shape(b->ix);
    return kmv__cost_hash(&sh, (double)d) * (double)bi + KMV__COST_STEP * (double)out.steps +
           kmv__cost_cand((double)d) * (double)out.cands +
           kmv__cost_window((double)d) * (double)b->sk.r * (double)bi;
}

/* The heavy pass over every row, in blocks on b->nt threads, stopping once
 * its predicted cost passes the cap. */
static int find_heavy(batch *b) {
    double th = kmv__now();
    int rc = order_rows(b);
    if (rc != KMV_OK) return rc;
#pragma omp parallel num_threads(b->nt)
    {
        kmv__blas_single();
        hscratch h = {NULL, kmv__malloc_array(b->a, QB, b->d * sizeof(float)),
                      kmv__malloc_array(b->a, b->sk.r ? b->sk.r : 1, sizeof(float))};
        int ok = h.qblk && h.skd && kmv__heavy_scratch_new(&b->src, b->a, &h.t) == KMV_OK;
        if (!ok) {
#pragma omp atomic write
            b->nomem = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (size_t blk = 0; blk < b->nblk; blk++) {
            int stop;
#pragma omp atomic read
            stop = b->abort;
            if (stop || !ok) continue;
            size_t i0 = blk * QB, bi = b->m - i0 < QB ? b->m - i0 : QB;
            double cost = heavy_block(b, &h, b->order + i0, bi, blk);
            if (cost < 0.0) {
#pragma omp atomic write
                b->nomem = 1;
#pragma omp atomic write
                b->abort = 1;
                continue;
            }
            double spent;
#pragma omp atomic capture
            spent = b->cost_spent += cost;
            /* The total is the same whatever the order blocks finish in, so
             * whether it crosses the cap is too: aborting is deterministic. */
            if (spent > b->cost_cap) {
#pragma omp atomic write
                b->abort = 1;
            }
        }
        kmv__heavy_scratch_free(h.t);
        kmv__free(b->a, h.qblk);
        kmv__free(b->a, h.skd);
    }
    b->S->seconds_heavy = kmv__now() - th;
    b->S->lsh_steps = b->steps;
    b->S->lsh_candidates = b->cands;
    b->S->heavy_pairs = b->heavy_pairs;
    b->S->sketch_evals = (uint64_t)b->sk.r * b->m;
    if (b->nomem) return KMV_ENOMEM;
    if (b->abort) fall_back(b, KMV_FALLBACK_HEAVY);
    else progress(b, 0.4);
    return KMV_OK;
}

/* The rows' sample counts, and whether sampling them beats the exact
 * product. Everything the sampling needs is taken here, before any row
 * writes y: a failure then leaves y untouched. */
static int plan_budgets(batch *b) {
    b->samples = kmv__budget_allocate(&b->budget, b->w, b->m, b->s);
    b->win = kmv__cost_window((double)b->d) * (1.0 + 0.1 * (double)(b->c - 1));
    double spent = b->cost_spent + b->col_cost;
    b->S->cost_ratio = (spent + b->samples * b->win) / b->exact_cost;
    if (spent + b->samples * b->win > b->exact_cost && !b->ix->force_approx) {
        fall_back(b, KMV_FALLBACK_SAMPLES);
        return KMV_OK;
    }
    b->stride = (3 * b->c + 7) / 8 * 8;
    b->chunk = kmv__malloc_array(b->a, (size_t)b->nt * 256, sizeof(float));
    b->acc = kmv__malloc_array(b->a, (size_t)b->nt * b->stride, sizeof(double));
    b->w2 = kmv__malloc_array(b->a, b->m, sizeof(double));
    b->s2 = kmv__malloc_array(b->a, b->m, sizeof(size_t));
    b->redo = kmv__malloc_array(b->a, b->m, 1);
    return b->chunk && b->acc && b->w2 && b->s2 && b->redo ? KMV_OK : KMV_ENOMEM;
}

/* sum over key ids 0 .. count - 1 of K(q, k_j) x_j, with the caller's x. */
static void prefix_row(const batch *b, const float *q, size_t count, double *est) {
    const kmv__keystore *ks = &b->ix->ks;
    for (size_t col = 0; col < b->c; col++) est[col] = 0.0;
    for (size_t j = 0; j < count; j++) {
        float kv = kmv__sqdist(q, kmv__keystore_row(ks, j), b->d);
        kmv__gauss_row_dist(&kv, 1, b->inv2s2, NULL);
        for (size_t col = 0; col < b->c; col++) est[col] += (double)kv * b->x[j * b->c + col];
    }
}

/* Row i's estimate into est, its window's variance into b->var[i]: a
 * window (ApproxLight) or the exact row, then the exactly summed columns
 * H1 with the caller's x. */
static void sample_row(batch *b, size_t i, int round, const kmv__light_buf *lb) {
    const kmv__keystore *ks = &b->ix->ks;
    size_t c = b->c, d = b->d;
    const float *qi = b->q + i * d;
    uint32_t lim = row_limit(b, i);
    double *est = lb->est;
    if (b->causal && (size_t)lim < b->n && (b->s[i] >= b->n || (size_t)lim < b->s[i])) {
        /* A causal row that sees fewer keys than its budget: its visible
         * keys, exactly, with the caller's x (H1 included). */
        prefix_row(b, qi, (size_t)lim + 1, est);
        b->var[i] = 0.0;
        return;
    }
    kmv__keymask mask = {lim, NULL, 0.0};
    kmv__light l = {ks, b->xs.xp, c, qi, b->inv2s2, 0.0f, b->kappa, NULL, 0,
                    b->causal ? &mask : NULL};
    if (b->s[i] >= b->n) {
        b->var[i] = kmv__window(&l, 0, b->n, lb);
    } else {
        l.heavy = b->hid[i];
        l.n_heavy = b->hlen[i];
        size_t off = kmv__window_offset(b->pa->seed, KMV__RNG_WINDOW, i, round, b->n);
        b->var[i] = kmv__window(&l, off, b->s[i], lb);
        for (size_t col = 0; col < c; col++) est[col] += b->yh[i * c + col];
    }
    for (size_t u = 0; u < b->xs.n_h1; u++) {
        uint32_t j = b->xs.h1[u];
        if (j > lim) break; /* h1 is ascending */
        float kv = kmv__sqdist(qi, kmv__keystore_row(ks, j), d);
        kmv__gauss_row_dist(&kv, 1, b->inv2s2, NULL);
        for (size_t col = 0; col < c; col++) est[col] += (double)kv * b->x[(size_t)j * c + col];
    }
}

/* The sampling pass over the rows with redo[i] (every row when redo is
 * NULL), writing y. */
static void sample_pass(batch *b, const unsigned char *redo, int round) {
#pragma omp parallel num_threads(b->nt)
    {
        size_t tid = (size_t)kmv__thread_id();
        double *acc = b->acc + tid * b->stride;
        kmv__light_buf lb = {b->chunk + tid * 256, acc, acc + 2 * b->c};
#pragma omp for schedule(dynamic, QB)
        for (size_t i = 0; i < b->m; i++) {
            if (redo != NULL && !redo[i]) continue;
            sample_row(b, i, round, &lb);
            for (size_t col = 0; col < b->c; col++) b->y[i * b->c + col] = (float)lb.est[col];
        }
    }
}

static int sample_rows(batch *b) {
    double ts = kmv__now();
    sample_pass(b, NULL, 0);
    b->S->seconds_sample = kmv__now() - ts;
    progress(b, 0.85);
    return KMV_OK;
}

/* The check after the fact: rows whose samples showed more variance than
 * planned get fresh windows sized from what they showed (their first
 * estimate is discarded, so the new one stays unbiased), when that still
 * costs less than the exact product. Then the stats of what ran. */
static int resample_rows(batch *b) {
    double ts = kmv__now(), spent = b->cost_spent + b->col_cost;
    if (kmv__budget_exceeded(&b->budget, b->var, b->m)) {
        size_t nredo;
        double extra = kmv__budget_resample(&b->budget, b->w, b->var, b->s, b->m, b->w2, b->s2,
                                            b->redo, &nredo);
        if (nredo && (spent + (b->samples + extra) * b->win <= b->exact_cost ||
                      b->ix->force_approx)) {
            for (size_t i = 0; i < b->m; i++)
                if (b->redo[i]) b->s[i] = b->s2[i];
            sample_pass(b, b->redo, 1);
            b->samples += extra;
            b->S->rows_resampled = nredo;
        }
    }
    kmv__stats *S = b->S;
    S->seconds_sample += kmv__now() - ts;
    double V = 0.0;
    for (size_t i = 0; i < b->m; i++) {
        V += b->var[i];
        if (b->s[i] >= b->n) S->rows_exact++;
        else S->samples += b->s[i];
    }
    S->cost_ratio = (spent + b->samples * b->win) / b->exact_cost;
    S->error_estimate = (sqrt(V) + sqrt((double)b->m) * b->xs.drop_l1) / sqrt(b->xs.nx2);
    S->backend = KMV_BACKEND_LSH;
    S->kernel_evals = S->lsh_candidates + S->sketch_evals + S->samples +
                      (uint64_t)S->rows_exact * b->n + (uint64_t)b->xs.n_h1 * b->m;
    b->flow = FLOW_DONE;
    return KMV_OK;
}

/* -------------------------------------------------------------- the call */

static void batch_free(batch *b) {
    const kmv_allocator *a = b->a;
    kmv__xsplit_free(&b->xs, a);
    kmv__sketch_free(&b->sk, a);
    for (size_t u = 0; b->blocks != NULL && u < b->nblk; u++) kmv__free(a, b->blocks[u]);
    void *arrays[] = {b->yh, b->w, b->hid, b->hlen, b->blocks, b->order, b->s, b->var,
                      b->w2, b->s2, b->redo, b->chunk, b->acc};
    for (size_t u = 0; u < sizeof arrays / sizeof arrays[0]; u++) kmv__free(a, arrays[u]);
}

/* With params.measure_error, the exact product the answer is measured
 * against, taken before anything writes y. */
static int measure_first(const batch *b, float **ye) {
    *ye = NULL;
    if (b->pa->measure_error && b->pa->exact) b->S->error_measured = 0.0; /* exact answers */
    if (!b->pa->measure_error || b->pa->exact || b->n == 0 || b->m == 0 || b->c == 0)
        return KMV_OK;
    double tm = kmv__now();
    *ye = kmv__malloc_array(b->a, b->m, b->c * sizeof(float));
    if (*ye == NULL) return KMV_ENOMEM;
    int threads;
    int rc = exact_product(b->ix, b->q, b->m, b->x, b->c, *ye, &threads);
    b->S->seconds_measure = kmv__now() - tm;
    return rc;
}

static void measure_last(const batch *b, const float *ye) {
    double e2 = 0.0, x2 = 0.0;
    for (size_t i = 0; i < b->m * b->c; i++) e2 += ((double)b->y[i] - ye[i]) * ((double)b->y[i] - ye[i]);
    for (size_t i = 0; i < b->n * b->c; i++) x2 += (double)b->x[i] * b->x[i];
    b->S->error_measured = x2 > 0.0 ? sqrt(e2 / x2) : sqrt(e2);
}

int kmv__batch_matvec(kmv_index *ix, const float *q, size_t m, const float *x, size_t c,
                      float *y, kmv__stats *st) {
    static int (*const steps[])(batch *) = {check_size,   try_tree,    plan_tables,
                                            split_x,      draw_sketch, find_heavy,
                                            plan_budgets, sample_rows, resample_rows};
    double t0 = kmv__now();
    const kmv__params *pa = &ix->params;
    kmv__stats S;
    kmv__stats_start(&S, ix->ks.n, m, ix->d, c, kmv__threads(pa), pa->eps);
    batch b;
    memset(&b, 0, sizeof b);
    b = (batch){.ix = ix, .pa = pa, .a = &ix->alloc, .q = q, .x = x, .y = y, .m = m,
                .n = ix->ks.n, .d = ix->d, .c = c, .nt = S.n_threads, .causal = pa->causal,
                .S = &S, .flow = m > 0 && c > 0 ? FLOW_GO : FLOW_DONE,
                .inv2s2 = (float)(0.5 / (pa->sigma * pa->sigma))};
    kmv__sketch_init(&b.sk, pa->eps);
    float *ye;
    int rc = measure_first(&b, &ye);
    for (size_t u = 0; rc == KMV_OK && b.flow == FLOW_GO && u < sizeof steps / sizeof *steps; u++)
        rc = steps[u](&b);
    batch_free(&b);
    if (rc == KMV_OK && b.flow == FLOW_FALLBACK) rc = run_fallback(ix, q, m, x, c, y, &S);
    if (rc == KMV_OK && ye != NULL) measure_last(&b, ye);
    if (rc == KMV_OK && S.mode == KMV_MODE_APPROX && pa->verify_every > 0)
        rc = kmv__verify_rows(&ix->alloc, &ix->ks, q, m, x, c, y, b.inv2s2, pa->causal,
                              (size_t)pa->verify_every, S.n_threads, &S);
    kmv__free(&ix->alloc, ye);
    if (rc != KMV_OK) return rc;
    progress(&b, 1.0);
    S.seconds = kmv__now() - t0;
    if (st != NULL) *st = S;
    return KMV_OK;
}

int kmv__batch_fallback(kmv_index *ix, const float *q, size_t m, const float *x, size_t c,
                        float *y, kmv_fallback reason, kmv__stats *st) {
    double t0 = kmv__now();
    kmv__stats S;
    kmv__stats_start(&S, ix->ks.n, m, ix->d, c, kmv__threads(&ix->params), ix->params.eps);
    if (ix->params.measure_error) S.error_measured = 0.0;
    S.fallback_reason = reason;
    int rc = run_fallback(ix, q, m, x, c, y, &S);
    if (rc != KMV_OK) return rc;
    if (ix->params.progress != NULL) ix->params.progress(ix->params.progress_opaque, 1.0);
    S.seconds = kmv__now() - t0;
    if (st != NULL) *st = S;
    return KMV_OK;
}
