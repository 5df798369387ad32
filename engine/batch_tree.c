/* The product by the bounds tree; see batch_tree.h. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "engine/batch_tree.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

#include "algo/costmodel.h"
#include "algo/kernel.h"
#include "algo/tree.h"
#include "common/alloc.h"
#include "common/threads.h"
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
    for (int u = 0; rc == KMV_OK && u < r->nt; u++) rc = kmv__tree_scratch_new(r->t, a, 1, &r->sc[u]);
    return rc;
}

/* Rows rows[0 .. cnt) (cnt <= TB) into y (cnt x c), on thread tid's
 * scratch; rows the search gives up on are summed exactly, unless
 * cost_only (the trial, which only counts). */
static void tree_block(const tree_run *r, const size_t *rows, size_t cnt, int tid, double *y,
                       kmv__tree_out *o, int cost_only) {
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
    for (size_t u = 0; u < cnt && !cost_only; u++)
        if (o[u].gave_up) kmv__exact_row(ks, r->q + rows[u] * d, r->x, r->c, r->inv2s2, lim[u], y + u * r->c);
}

/* The predicted cost of every row from a few spread ones, in blocks of
 * 16: once the rows seen predict more than cap, the trial stops there
 * (returning that prediction), so data the tree cannot certify costs it
 * 16 rows, not 64. */
static double trial(const tree_run *r, double cap) {
    size_t rows = r->m < KMV__TREE_TRIAL_ROWS ? r->m : KMV__TREE_TRIAL_ROWS;
    double d = (double)r->ix->d, cost = 0.0, n = (double)r->ix->ks.n;
    size_t seen = 0;
    for (size_t u0 = 0; u0 < rows; u0 += 16) {
        size_t cnt = rows - u0 < 16 ? rows - u0 : 16, idx[16] = {0};
        kmv__tree_out o[16];
        for (size_t u = 0; u < cnt; u++) idx[u] = (u0 + u) * r->m / rows;
        tree_block(r, idx, cnt, 0, r->ybuf, o, 1);
        for (size_t u = 0; u < cnt; u++) {
            cost += (double)r->t->n_leaves * kmv__cost_scan(d) +
                    (double)o[u].bounded * kmv__cost_bound(d) +
                    (double)o[u].visited * kmv__cost_visit(d);
            if (o[u].gave_up) cost += n * kmv__cost_window(d);
        }
        seen += cnt;
        if (cost / (double)seen * (double)r->m > cap) break;
    }
    return cost / (double)seen * (double)r->m;
}

/* What the rows did, summed over threads. */
typedef struct tally {
    uint64_t bounded, visited, gave;
    double tail2;
} tally;

static void count(tally *tl, const kmv__tree_out *o, uint64_t scanned) {
    tl->bounded += o->bounded + scanned;
    tl->visited += o->visited;
    tl->gave += (uint64_t)o->gave_up;
    if (!o->gave_up) tl->tail2 += o->tail * o->tail;
}

/* Rows rows[0 .. cnt) by the full scan, in blocks of TB. */
static void scan_rows(const tree_run *r, const size_t *rows, size_t cnt, float *y, tally *out) {
    size_t nblk = (cnt + TB - 1) / TB;
    uint64_t bounded = 0, visited = 0, gave = 0;
    double tail2 = 0.0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(r->nt) \
    reduction(+ : bounded, visited, gave, tail2)
    for (size_t b = 0; b < nblk; b++) {
        kmv__blas_single();
        int tid = kmv__thread_id();
        size_t i0 = b * TB, bc = cnt - i0 < TB ? cnt - i0 : TB;
        double *yb = r->ybuf + (size_t)tid * TB * r->c;
        kmv__tree_out o[TB];
        tree_block(r, rows + i0, bc, tid, yb, o, 0);
        tally tl = {0, 0, 0, 0.0};
        for (size_t u = 0; u < bc; u++) {
            for (size_t col = 0; col < r->c; col++) y[rows[i0 + u] * r->c + col] = (float)yb[u * r->c + col];
            count(&tl, &o[u], r->t->n_leaves);
        }
        bounded += tl.bounded, visited += tl.visited, gave += tl.gave, tail2 += tl.tail2;
    }
    out->bounded += bounded, out->visited += visited, out->gave += gave, out->tail2 += tail2;
}

static void report(const tree_run *r, const tally *tl, kmv__stats *S) {
    S->nodes_bounded = tl->bounded;
    S->keys_visited = tl->visited;
    S->rows_exact = (size_t)tl->gave;
    S->kernel_evals = tl->bounded + tl->visited + tl->gave * (uint64_t)r->ix->ks.n;
    double nx = r->budget * sqrt((double)r->m) / r->ix->params.eps;
    S->certified_tail = sqrt(tl->tail2) / nx;
}

/* ------------------------------------------------ rows in groups of queries */

/* Queries near one leaf centre share the scan (kmv__tree_group_cands):
 * one GEMM row per group instead of one per query. */
#define GROUP_MAX 64 /* queries per group */

typedef struct qgroup {
    uint32_t leaf;        /* z: this leaf's centre */
    size_t first, count;  /* the group's queries: order[first .. first + count) */
    double rho;           /* every query within rho of z */
} qgroup;

/* Each query's nearest leaf (through its nearest group) and its squared
 * distance, taken directly: they decide grouping only, never a bound. */
static int route(const tree_run *r, uint32_t *leaf, float *d2) {
    const kmv__tree *t = r->t;
    const kmv_allocator *a = &r->ix->alloc;
    size_t G = t->n_groups, d = t->d, m = r->m, wide = 1;
    for (size_t g = 0; g < G; g++)
        if (t->g_off[g + 1] - t->g_off[g] > wide) wide = t->g_off[g + 1] - t->g_off[g];
    float *gn = kmv__malloc_array(a, G, sizeof(float));
    if (gn == NULL) return KMV_ENOMEM;
    for (size_t g = 0; g < G; g++) {
        double v = 0.0;
        for (size_t u = 0; u < d; u++) v += (double)t->gc[g * d + u] * t->gc[g * d + u];
        gn[g] = (float)v;
    }
    int nomem = 0;
    size_t nblk = (m + 255) / 256;
#pragma omp parallel num_threads(r->nt)
    {
        kmv__blas_single();
        float *buf = kmv__malloc_array(a, 256, G * sizeof(float));
        float *ld = kmv__malloc_array(a, wide, sizeof(float));
        if (buf == NULL || ld == NULL) {
#pragma omp atomic write
            nomem = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (size_t b = 0; b < nblk; b++) {
            if (buf == NULL || ld == NULL) continue;
            size_t i0 = b * 256, bc = m - i0 < 256 ? m - i0 : 256;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)bc, (int)G, (int)d, 1.0f,
                        r->q + i0 * d, (int)d, t->gc, (int)d, 0.0f, buf, (int)G);
            for (size_t u = 0; u < bc; u++) {
                size_t best = 0;
                for (size_t g = 1; g < G; g++)
                    if (gn[g] - 2.0f * buf[u * G + g] < gn[best] - 2.0f * buf[u * G + best]) best = g;
                size_t l0 = t->g_off[best], nl = t->g_off[best + 1] - l0, arg = 0;
                kmv__sqdist_rows(r->q + (i0 + u) * d, t->lc + l0 * d, nl, d, ld);
                for (size_t l = 1; l < nl; l++)
                    if (ld[l] < ld[arg]) arg = l;
                leaf[i0 + u] = (uint32_t)(l0 + arg);
                d2[i0 + u] = ld[arg];
            }
        }
        kmv__free(a, buf);
        kmv__free(a, ld);
    }
    kmv__free(a, gn);
    return nomem ? KMV_ENOMEM : KMV_OK;
}

/* Queries sorted by leaf into order[]; those within max(2 r_l, the median
 * leaf radius) of their leaf's centre form groups of up to GROUP_MAX, the
 * rest (far from every leaf) are loners at order[*n_grouped ..). */
static int make_groups(const tree_run *r, const uint32_t *leaf, const float *d2, size_t *order,
                       qgroup *grp, size_t *ng, size_t *n_grouped) {
    const kmv__tree *t = r->t;
    const kmv_allocator *a = &r->ix->alloc;
    size_t L = t->n_leaves, m = r->m;
    size_t *start = kmv__malloc_array(a, L + 1, sizeof(size_t));
    size_t *tmp = kmv__malloc_array(a, m, sizeof(size_t));
    if (start == NULL || tmp == NULL) {
        kmv__free(a, start);
        kmv__free(a, tmp);
        return KMV_ENOMEM;
    }
    double r_med = t->r_med;
    memset(start, 0, (L + 1) * sizeof(size_t));
    for (size_t i = 0; i < m; i++) start[leaf[i] + 1]++;
    for (size_t l = 0; l < L; l++) start[l + 1] += start[l];
    for (size_t i = 0; i < m; i++) tmp[start[leaf[i]]++] = i;
    for (size_t l = L; l > 0; l--) start[l] = start[l - 1];
    start[0] = 0;
    size_t in = 0, lone = m, groups = 0;
    double slack = kmv__tree_slack(t->d);
    for (size_t l = 0; l < L; l++) {
        double lim = 2.0 * t->lr[l] > r_med ? 2.0 * t->lr[l] : r_med;
        size_t first = in;
        for (size_t u = start[l]; u < start[l + 1]; u++) {
            size_t i = tmp[u];
            if ((double)d2[i] <= lim * lim) order[in++] = i;
            else order[--lone] = i;
        }
        for (size_t g0 = first; g0 < in; g0 += GROUP_MAX) {
            size_t cnt = in - g0 < GROUP_MAX ? in - g0 : GROUP_MAX;
            double rho = 0.0;
            for (size_t u = g0; u < g0 + cnt; u++)
                if ((double)d2[order[u]] > rho) rho = (double)d2[order[u]];
            /* d2 was a float sum of squares: rounded up past its error */
            grp[groups++] = (qgroup){(uint32_t)l, g0, cnt, sqrt(rho * (1.0 + slack)) * (1.0 + 1e-6)};
        }
    }
    *ng = groups;
    *n_grouped = in;
    kmv__free(a, start);
    kmv__free(a, tmp);
    return KMV_OK;
}

/* One block of up to TB groups: their centres against every leaf in one
 * GEMM, then each query from its group's candidates. */
static void group_block(const tree_run *r, const size_t *order, const qgroup *grp, size_t cnt,
                        int tid, float *zbuf, float *zdot, uint32_t *cands, float *y, tally *tl) {
    const kmv__tree *t = r->t;
    size_t d = t->d, L = t->n_leaves, c = r->c;
    for (size_t u = 0; u < cnt; u++) memcpy(zbuf + u * d, t->lc + (size_t)grp[u].leaf * d, d * sizeof(float));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)cnt, (int)L, (int)d, 1.0f, zbuf,
                (int)d, t->lc, (int)d, 0.0f, zdot, (int)L);
    double *yi = r->ybuf + (size_t)tid * TB * c;
    for (size_t u = 0; u < cnt; u++) {
        double zn = 0.0;
        for (size_t v = 0; v < d; v++) zn += (double)zbuf[u * d + v] * zbuf[u * d + v];
        size_t nc = kmv__tree_group_cands(t, &r->ms, zdot + u * L, zn, grp[u].rho, cands);
        tl->bounded += L;
        for (size_t v = 0; v < grp[u].count; v++) {
            size_t i = order[grp[u].first + v];
            const float *qi = r->q + i * d;
            kmv__tree_req rq = {t, &r->ms, &r->ix->ks, r->x, qi, 1, NULL, r->max_work};
            kmv__tree_out o;
            kmv__tree_row_from(&rq, r->sc[tid], cands, nc, yi, &o);
            if (o.gave_up) kmv__exact_row(&r->ix->ks, qi, r->x, c, r->inv2s2, UINT32_MAX, yi);
            for (size_t col = 0; col < c; col++) y[i * c + col] = (float)yi[col];
            count(tl, &o, 0);
        }
    }
}

static int run_groups(const tree_run *r, const size_t *order, const qgroup *grp, size_t ng,
                      float *y, tally *out) {
    const kmv_allocator *a = &r->ix->alloc;
    size_t L = r->t->n_leaves, d = r->t->d, nblk = (ng + TB - 1) / TB;
    uint64_t bounded = 0, visited = 0, gave = 0;
    double tail2 = 0.0;
    int nomem = 0;
#pragma omp parallel num_threads(r->nt) reduction(+ : bounded, visited, gave, tail2)
    {
        kmv__blas_single();
        int tid = kmv__thread_id();
        float *zbuf = kmv__malloc_array(a, TB, d * sizeof(float));
        float *zdot = kmv__malloc_array(a, TB, L * sizeof(float));
        uint32_t *cands = kmv__malloc_array(a, L, sizeof(uint32_t));
        int ok = zbuf && zdot && cands;
        if (!ok) {
#pragma omp atomic write
            nomem = 1;
        }
        tally tl = {0, 0, 0, 0.0};
#pragma omp for schedule(dynamic, 1)
        for (size_t b = 0; b < nblk; b++) {
            size_t g0 = b * TB, cnt = ng - g0 < TB ? ng - g0 : TB;
            if (ok) group_block(r, order, grp + g0, cnt, tid, zbuf, zdot, cands, y, &tl);
        }
        bounded += tl.bounded, visited += tl.visited, gave += tl.gave, tail2 += tl.tail2;
        kmv__free(a, zbuf);
        kmv__free(a, zdot);
        kmv__free(a, cands);
    }
    out->bounded += bounded, out->visited += visited, out->gave += gave, out->tail2 += tail2;
    return nomem ? KMV_ENOMEM : KMV_OK;
}

/* Every row: causal products by the full scan (a row's limit splits
 * leaves), others grouped by their nearest leaf, loners by the scan. */
static int all_rows(const tree_run *r, float *y, kmv__stats *S) {
    const kmv_allocator *a = &r->ix->alloc;
    size_t m = r->m;
    size_t *order = kmv__malloc_array(a, m, sizeof(size_t));
    uint32_t *leaf = kmv__malloc_array(a, m, sizeof(uint32_t));
    float *d2 = kmv__malloc_array(a, m, sizeof(float));
    qgroup *grp = kmv__malloc_array(a, m, sizeof(qgroup));
    int rc = order && leaf && d2 && grp ? KMV_OK : KMV_ENOMEM;
    size_t ng = 0, grouped = 0;
    if (rc == KMV_OK && !r->ix->params.causal) rc = route(r, leaf, d2);
    if (rc == KMV_OK && !r->ix->params.causal) rc = make_groups(r, leaf, d2, order, grp, &ng, &grouped);
    if (rc == KMV_OK && r->ix->params.causal)
        for (size_t i = 0; i < m; i++) order[i] = i;
    tally tl = {0, 0, 0, 0.0};
    if (rc == KMV_OK && ng > 0) rc = run_groups(r, order, grp, ng, y, &tl);
    if (rc == KMV_OK) scan_rows(r, order + grouped, m - grouped, y, &tl);
    if (rc == KMV_OK) report(r, &tl, S);
    kmv__free(a, order);
    kmv__free(a, leaf);
    kmv__free(a, d2);
    kmv__free(a, grp);
    return rc;
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
    tree_run r = {ix, NULL, {0}, q, x, m, c, kmv__threads(pa),
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
        double pred = build;
        /* BLAS on one thread, inside a team of one (see tree.c) */
#pragma omp parallel num_threads(1)
        {
            kmv__blas_single();
            pred += trial(&r, 0.5 * exact_cost - build);
        }
        if (pred > 0.5 * exact_cost) {
            S->seconds_heavy = kmv__now() - ts;
            run_free(&r);
            return KMV_OK;
        }
        S->cost_ratio = pred / exact_cost;
    }
    if (rc == KMV_OK) {
        rc = all_rows(&r, y, S);
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
