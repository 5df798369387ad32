/* The Gaussian stream's decoding step through the bounds tree; see step.h.
 *
 * The tree is built over the first 2^k keys when the stream reaches 2^k
 * (the doublings where the LSH tables are planned again), then grows key
 * by key: each key appended goes to its nearest leaf (algo/tree_grow.c),
 * and its value's mass to that leaf's and group's sums, so a step never
 * waits for a rebuild and an append costs two scans of centres. Building
 * at powers of two, and inserting in id order, makes the tree a function
 * of the keys and the seed: a stream fed in one block, key by key, or
 * loaded from a snapshot grows the same tree, and answers bit for bit the
 * same.
 *
 * At each build a trial of stored keys taken as queries measures what a
 * step through the tree costs. Past a quarter of the exact row (spread
 * kernels) the tree is dropped until the keys double again; under it, the
 * tree stands by, and its cost caps the LSH tables' plan: tables that would
 * cost more are refused, and the tree serves (on clustered d = 64 keys at
 * sigma 1 the tree wins, at sigma 0.5 the tables; on 2-d data the tables
 * are refused outright). */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <math.h>
#include <string.h>

#include "algo/costmodel.h"
#include "algo/stats.h"
#include "common/rng.h"
#include "common/timer.h"
#include "stream/step.h"

#define TRIAL_ROWS 32   /* stand-in queries of a trial */
#define WORK_SHARE 0.25 /* of the exact row: a trial's mean and a step's most */

/* The largest power of two at most n (n > 0). */
static size_t base_of(size_t n) {
    size_t b = 1;
    while (b <= n / 2) b *= 2;
    return b;
}

/* Whether this stream's steps use a tree at its size at all. */
static int wanted(const kmv_stream *s) {
    const kmv__params *pa = kmv__index_params(s->ix);
    size_t n = kmv__index_keys(s->ix)->n;
    if (s->attn || pa->exact || n == 0 || pa->backend == KMV_BACKEND_LSH) return 0;
    if (pa->backend == KMV_BACKEND_TREE) return 1;
    return !kmv__index_force_approx(s->ix) && n >= KMV__DECODE_MIN_KEYS;
}

int kmv__stream_tree_stale(const kmv_stream *s) {
    if (!wanted(s)) return 0;
    size_t n = kmv__index_keys(s->ix)->n;
    return s->tree_nb != base_of(n) || (s->tree_mode != TREE_NONE && s->tree.n < n);
}

int kmv__stream_tree_serves(const kmv_stream *s) {
    size_t n = kmv__index_keys(s->ix)->n;
    if (!wanted(s) || s->tree_mode == TREE_NONE || s->tree.n != n) return 0;
    /* standing by: serves once the tables' plan was refused at this size */
    return s->tree_mode == TREE_SERVES || (s->decode_refused_n && n < 2 * s->decode_refused_n);
}

void kmv__stream_tree_free(kmv_stream *s) {
    const kmv_allocator *a = kmv__index_alloc(s->ix);
    kmv__tree_free(&s->tree, a);
    kmv__tree_mass_free(&s->tmass, a);
    s->tree_mode = TREE_NONE;
}

/* A row's budget: eps times the 2-norm of x over the keys. */
static double budget_of(const kmv_stream *s, double nx2) {
    return kmv__index_params(s->ix)->eps * sqrt(nx2);
}

/* The mass with a row's budget and cut (the leaves' thresholds were
 * computed under cuts at most this one: nx2 only grows). */
static kmv__tree_mass with_budget(const kmv_stream *s, double nx2) {
    kmv__tree_mass m = s->tmass;
    size_t L = s->tree.n_leaves ? s->tree.n_leaves : 1;
    m.budget = budget_of(s, nx2);
    m.cut = KMV__TREE_CUT * m.budget / (double)L;
    return m;
}

/* A step's cost through the tree over nb keys, in the cost model's units,
 * from its work on stored keys taken as queries (INFINITY past WORK_SHARE
 * of the exact row's keys). */
static double trial(const kmv_stream *s, size_t nb) {
    const kmv__params *pa = kmv__index_params(s->ix);
    const kmv_allocator *a = kmv__index_alloc(s->ix);
    const kmv__keystore *ks = kmv__index_keys(s->ix);
    double nx2 = s->tree_nx2;
    if (nx2 <= 0.0) return INFINITY;
    kmv__tree_scratch *sc;
    double *y = kmv__malloc_array(a, s->c, sizeof(double));
    if (y == NULL || kmv__tree_scratch_new(&s->tree, a, 0, &sc) != KMV_OK) {
        kmv__free(a, y);
        return INFINITY;
    }
    kmv__tree_mass m = with_budget(s, nx2);
    double most = WORK_SHARE * (double)nb, work = 0.0, nodes = 0.0;
    uint64_t rng = kmv__rng_stream(pa->seed ^ kmv__mix64(nb), KMV__RNG_TREE);
    size_t rows = 0;
    for (; rows < TRIAL_ROWS && work <= most * TRIAL_ROWS; rows++) {
        size_t id = (size_t)kmv__rng_below(&rng, nb);
        kmv__tree_req rq = {&s->tree, &m, ks, s->x, kmv__keystore_row(ks, id), 1, NULL, most};
        kmv__tree_out o;
        kmv__tree_row_walk(&rq, sc, y, &o);
        work += (double)(o.bounded + o.visited) + (o.gave_up ? (double)nb : 0.0);
        nodes += (double)o.bounded;
    }
    kmv__tree_scratch_free(sc);
    kmv__free(a, y);
    if (rows < TRIAL_ROWS || work > most * TRIAL_ROWS) return INFINITY;
    double keys = (work - nodes) / TRIAL_ROWS;
    return kmv__cost_window((double)s->d) * (KMV__COST_TREE_NODE * nodes / TRIAL_ROWS + keys) *
               (1.0 + 0.1 * (double)(s->c - 1)) +
           KMV__COST_TREE_STEP;
}

/* The tree over the first nb keys, its mass, and the trial's verdict. */
static int build(kmv_stream *s, size_t nb) {
    const kmv__params *pa = kmv__index_params(s->ix);
    const kmv_allocator *a = kmv__index_alloc(s->ix);
    int rc = kmv__tree_build(&s->tree, a, kmv__index_keys(s->ix), nb, pa->seed, kmv__threads(pa));
    if (rc == KMV_OK) rc = kmv__tree_q8(&s->tree, a, kmv__index_keys(s->ix));
    if (rc == KMV_OK) rc = kmv__tree_mass_init(&s->tree, a, s->x, s->c, &s->tmass);
    if (rc != KMV_OK) return rc;
    /* x's squared norm over the tree's keys, added in id order as the
     * stream's own (so it is the stream's at this size, bit for bit) */
    s->tree_nx2 = 0.0;
    for (size_t j = 0; j < nb; j++) s->tree_nx2 += s->wid[j];
    kmv__tree_mass_limits(&s->tree, &s->tmass, budget_of(s, s->tree_nx2),
                          0.5 / (pa->sigma * pa->sigma));
    s->tree_builds++;
    s->tree_cost = pa->backend == KMV_BACKEND_TREE ? 0.0 : trial(s, nb);
    s->tree_mode = pa->backend == KMV_BACKEND_TREE ? TREE_SERVES
                   : s->tree_cost < INFINITY       ? TREE_STANDBY
                                                   : TREE_NONE;
    return KMV_OK;
}

void kmv__stream_tree_prepare(kmv_stream *s, double *seconds) {
    double t0 = kmv__now();
    const kmv_allocator *a = kmv__index_alloc(s->ix);
    const kmv__keystore *ks = kmv__index_keys(s->ix);
    size_t n = ks->n, nb = base_of(n);
    int rc = KMV_OK;
    if (s->tree_nb != nb) {
        kmv__stream_tree_free(s);
        s->tree_nb = nb;
        rc = build(s, nb);
    }
    double t1 = kmv__now();
    while (rc == KMV_OK && s->tree_mode != TREE_NONE && s->tree.n < n) {
        uint32_t leaf, group, id = (uint32_t)s->tree.n;
        rc = kmv__tree_insert(&s->tree, a, ks, id, &leaf, &group);
        if (rc == KMV_OK) rc = kmv__tree_mass_fit(&s->tmass, a, &s->tree);
        if (rc != KMV_OK) break;
        kmv__tree_mass_add(&s->tmass, leaf, group, s->x + (size_t)id * s->c);
        /* the leaf's limit under the budget of the keys so far: at most
         * any later row's */
        s->tree_nx2 += s->wid[id];
        s->tmass.budget = budget_of(s, s->tree_nx2);
        s->tmass.cut = KMV__TREE_CUT * s->tmass.budget / (double)s->tree.n_leaves;
        kmv__tree_leaf_limit(&s->tree, &s->tmass, leaf);
        s->tree_inserts++;
    }
    s->tree_seconds_insert += kmv__now() - t1;
    /* Out of memory (or past the cap): a cache, dropped until the keys
     * double; the steps go the other way meanwhile. */
    if (rc != KMV_OK || s->tree_mode == TREE_NONE) kmv__stream_tree_free(s);
    *seconds += kmv__now() - t0;
}

int kmv__stream_tree_row(const kmv_stream *s, const float *q, double *est, kmv__stats *S,
                         int *answered) {
    const kmv_allocator *a = kmv__index_alloc(s->ix);
    const kmv__keystore *ks = kmv__index_keys(s->ix);
    *answered = 0;
    kmv__tree_scratch *sc;
    int rc = kmv__tree_scratch_new(&s->tree, a, 0, &sc);
    if (rc != KMV_OK) return rc;
    double t0 = kmv__now();
    kmv__tree_mass m = with_budget(s, s->nx2);
    kmv__tree_req rq = {&s->tree, &m, ks, s->x, q, 1, NULL, WORK_SHARE * (double)ks->n};
    kmv__tree_out o;
    kmv__tree_row_walk(&rq, sc, est, &o);
    kmv__tree_scratch_free(sc);
    S->backend = KMV_BACKEND_TREE;
    S->nodes_bounded = o.bounded;
    S->keys_visited = o.visited;
    S->tree_bytes = s->tree.bytes;
    S->seconds_heavy = kmv__now() - t0;
    if (o.gave_up) {
        S->fallback_reason = KMV_FALLBACK_TREE;
        return KMV_OK;
    }
    S->deterministic = 1;
    S->mode = KMV_MODE_APPROX;
    S->certified_tail = o.tail / sqrt(s->nx2);
    S->error_estimate = S->certified_tail;
    S->kernel_evals = o.bounded + o.visited;
    *answered = 1;
    return KMV_OK;
}
