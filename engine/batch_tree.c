/* The product by the bounds tree; see batch_tree.h. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "engine/batch_tree.h"

#include <math.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "algo/costmodel.h"
#include "algo/tree.h"
#include "common/alloc.h"
#include "common/timer.h"
#include "engine/index_layout.h"
#include "engine/rows.h"

/* What the rows need, and what they report. */
typedef struct tree_run {
    kmv_index *ix;
    const kmv__tree *t;
    kmv__tree_mass ms;
    const float *q, *x;
    size_t m, c;
    int nt;
    double budget, inv2s2, max_work;
    kmv__tree_scratch **sc; /* per thread */
    double *ybuf;           /* per thread, KMV__TREE_BLOCK x c each */
} tree_run;

#define TB KMV__TREE_BLOCK

static void run_free(tree_run *r) {
    const kmv_allocator *a = &r->ix->alloc;
    kmv__tree_mass_free(&r->ms, a);
    for (int u = 0; r->sc != NULL && u < r->nt; u++) kmv__tree_scratch_free(r->sc[u]);
    kmv__free(a, r->sc);
    kmv__free(a, r->ybuf);
}

static int run_init(tree_run *r) {
    const kmv_allocator *a = &r->ix->alloc;
    int rc = kmv__tree_mass_new(r->t, a, r->x, r->c, r->budget, r->inv2s2, &r->ms);
    r->sc = kmv__malloc_array(a, (size_t)r->nt, sizeof *r->sc);
    r->ybuf = kmv__malloc_array(a, (size_t)r->nt * TB, r->c * sizeof(double));
    if (r->sc != NULL) memset(r->sc, 0, (size_t)r->nt * sizeof *r->sc);
    if (rc == KMV_OK && (r->sc == NULL || r->ybuf == NULL)) rc = KMV_ENOMEM;
    for (int u = 0; rc == KMV_OK && u < r->nt; u++) rc = kmv__tree_scratch_new(r->t, a, &r->sc[u]);
    return rc;
}

/* Rows rows[0 .. cnt) (cnt <= TB) into y (cnt x c), on thread tid's
 * scratch; rows the search gives up on are summed exactly. */
static void tree_block(const tree_run *r, const size_t *rows, size_t cnt, int tid, double *y,
                       kmv__tree_out *o) {
    const kmv__keystore *ks = &r->ix->ks;
    size_t d = ks->d;
    float qb[TB * 1024];
    float *qblk = d <= 1024 ? qb : NULL;
    uint32_t lim[TB];
    int causal = r->ix->params.causal;
    for (size_t u = 0; u < cnt; u++)
        lim[u] = causal && rows[u] < UINT32_MAX ? (uint32_t)rows[u] : UINT32_MAX;
    if (qblk != NULL) {
        for (size_t u = 0; u < cnt; u++) memcpy(qblk + u * d, r->q + rows[u] * d, d * sizeof(float));
        kmv__tree_req rq = {r->t, &r->ms, ks, r->x, qblk, cnt, lim, r->max_work};
        kmv__tree_rows(&rq, r->sc[tid], y, o);
    } else {
        for (size_t u = 0; u < cnt; u++) {
            kmv__tree_req rq = {r->t, &r->ms, ks, r->x, r->q + rows[u] * d, 1, lim + u, r->max_work};
            kmv__tree_rows(&rq, r->sc[tid], y + u * r->c, o + u);
        }
    }
    for (size_t u = 0; u < cnt; u++)
        if (o[u].gave_up) kmv__exact_row(ks, r->q + rows[u] * d, r->x, r->c, r->inv2s2, lim[u], y + u * r->c);
}

/* The predicted cost of every row from a few spread ones. */
static double trial(const tree_run *r) {
    size_t rows = r->m < KMV__TREE_TRIAL_ROWS ? r->m : KMV__TREE_TRIAL_ROWS;
    double d = (double)r->ix->d, cost = 0.0, n = (double)r->ix->ks.n;
    for (size_t u0 = 0; u0 < rows; u0 += TB) {
        size_t cnt = rows - u0 < TB ? rows - u0 : TB, idx[TB];
        kmv__tree_out o[TB];
        for (size_t u = 0; u < cnt; u++) idx[u] = (u0 + u) * r->m / rows;
        tree_block(r, idx, cnt, 0, r->ybuf, o);
        for (size_t u = 0; u < cnt; u++) {
            cost += (double)r->t->n_leaves * kmv__cost_scan(d) +
                    (double)o[u].bounded * kmv__cost_bound(d) +
                    (double)o[u].visited * kmv__cost_visit(d);
            if (o[u].gave_up) cost += n * kmv__cost_window(d);
        }
    }
    return cost / (double)rows * (double)r->m;
}

static void all_rows(const tree_run *r, float *y, kmv__stats *S) {
    uint64_t bounded = 0, visited = 0, gave = 0;
    double tail2 = 0.0;
    size_t nblk = (r->m + TB - 1) / TB;
#pragma omp parallel for schedule(dynamic, 1) num_threads(r->nt) \
    reduction(+ : bounded, visited, gave, tail2)
    for (size_t b = 0; b < nblk; b++) {
#ifdef _OPENMP
        omp_set_num_threads(1); /* BLAS inside: one thread each */
        int tid = omp_get_thread_num();
#else
        int tid = 0;
#endif
        size_t i0 = b * TB, cnt = r->m - i0 < TB ? r->m - i0 : TB, idx[TB];
        for (size_t u = 0; u < cnt; u++) idx[u] = i0 + u;
        double *yb = r->ybuf + (size_t)tid * TB * r->c;
        kmv__tree_out o[TB];
        tree_block(r, idx, cnt, tid, yb, o);
        for (size_t u = 0; u < cnt * r->c; u++) y[i0 * r->c + u] = (float)yb[u];
        for (size_t u = 0; u < cnt; u++) {
            bounded += o[u].bounded;
            visited += o[u].visited;
            gave += (uint64_t)o[u].gave_up;
            if (!o[u].gave_up) tail2 += o[u].tail * o[u].tail;
        }
    }
    S->nodes_bounded = bounded + (uint64_t)r->m * r->t->n_leaves;
    S->keys_visited = visited;
    S->rows_exact = (size_t)gave;
    S->kernel_evals = bounded + visited + gave * (uint64_t)r->ix->ks.n;
    double nx = r->budget * sqrt((double)r->m) / r->ix->params.eps;
    S->certified_tail = sqrt(tail2) / nx;
}

int kmv__batch_tree(kmv_index *ix, const float *q, size_t m, const float *x, size_t c, float *y,
                    double exact_cost, kmv__stats *S, int *answered) {
    const kmv__params *pa = &ix->params;
    size_t n = ix->ks.n;
    *answered = 0;
    int forced = pa->backend == KMV_BACKEND_TREE;
    if (pa->backend == KMV_BACKEND_LSH || (!forced && ix->force_approx)) return KMV_OK;
    double x2 = 0.0;
    for (size_t u = 0; u < n * c; u++) x2 += (double)x[u] * x[u];
    if (x2 <= 0.0) return KMV_OK; /* y = 0: the batch's split says so */
    double build = kmv__index_has_tree(ix) ? 0.0 : kmv__tree_build_cost(n, ix->d);
    if (!forced && build > 0.15 * exact_cost) return KMV_OK;
    tree_run r = {ix, NULL, {0, 0, 0, 0, NULL, NULL, NULL, NULL}, q, x, m, c, kmv__threads(pa),
                  pa->eps * sqrt(x2 / (double)m), 0.5 / (pa->sigma * pa->sigma),
                  0.25 * (double)n, NULL, NULL};
    double tb;
    int rc = kmv__index_tree(ix, &r.t, &tb);
    S->seconds_tree = tb;
    if (rc != KMV_OK) return rc;
    S->tree_bytes = r.t->bytes;
    rc = run_init(&r);
    double ts = kmv__now();
    if (rc == KMV_OK && !forced) {
        double pred = build + trial(&r);
        if (pred > 0.5 * exact_cost) {
            S->seconds_heavy = kmv__now() - ts;
            run_free(&r);
            return KMV_OK;
        }
        S->cost_ratio = pred / exact_cost;
    }
    if (rc == KMV_OK) {
        all_rows(&r, y, S);
        S->seconds_heavy = kmv__now() - ts;
        S->backend = KMV_BACKEND_TREE;
        S->deterministic = 1;
        S->mode = KMV_MODE_APPROX;
        S->error_estimate = S->certified_tail;
        *answered = 1;
    }
    run_free(&r);
    return rc;
}
