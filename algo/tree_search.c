/* The bounds tree's search for a block of rows; see tree.h.
 *
 * One GEMM gives every query's squared distance to every leaf centre, with
 * a rounding error bounded from the norms. A leaf whose distance is past
 * its threshold (tree_mass.thr) is negligible: its keys' values times its
 * mass stay under cut, and it is estimated as 0. Every other leaf is a
 * candidate: its distance is taken again directly, its keys' values lie in
 * [lb, ub] from the triangle inequality, and its term, the half-width
 * times its mass, bounds what estimating it at its midpoint can cost. The
 * row opens candidates, largest term first, summing their keys exactly,
 * until the terms left plus the negligible leaves' cut fit the budget. A
 * leaf holding keys past a causal row's limit has no valid midpoint: it is
 * opened whenever it holds a visible key. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "algo/kernel.h"
#include "algo/tree.h"
#include "common/alloc.h"

typedef struct cand {
    double term, mid;
    uint32_t leaf;
    int must; /* partial under a causal limit: opened whatever its term */
} cand;

struct kmv__tree_scratch {
    const kmv_allocator *a;
    float *dot;   /* KMV__TREE_BLOCK x n_leaves */
    float *ln;    /* the leaf centres' squared norms */
    float *kv;    /* the largest leaf */
    float *kv2;   /* the largest group's leaves */
    cand *cd;     /* candidates of one row */
    double slack; /* relative rounding of a float sum of d products */
};

int kmv__tree_scratch_new(const kmv__tree *t, const kmv_allocator *a, int block,
                          kmv__tree_scratch **out) {
    size_t L = t->n_leaves ? t->n_leaves : 1, wide = t->l_wide ? t->l_wide : 1;
    *out = NULL;
    kmv__tree_scratch *s = kmv__malloc(a, sizeof *s);
    if (s == NULL) return KMV_ENOMEM;
    memset(s, 0, sizeof *s);
    s->a = a;
    if (block) {
        s->dot = kmv__malloc_array(a, KMV__TREE_BLOCK, L * sizeof(float));
        s->ln = kmv__malloc_array(a, L, sizeof(float));
    }
    s->kv = kmv__malloc_array(a, wide, sizeof(float));
    size_t gw = 1;
    for (size_t g = 0; g < t->n_groups; g++)
        if (t->g_off[g + 1] - t->g_off[g] > gw) gw = t->g_off[g + 1] - t->g_off[g];
    s->kv2 = kmv__malloc_array(a, gw, sizeof(float));
    s->cd = kmv__malloc_array(a, L, sizeof(cand));
    s->slack = kmv__tree_slack(t->d);
    if ((block && (!s->dot || !s->ln)) || !s->kv || !s->kv2 || !s->cd) {
        kmv__tree_scratch_free(s);
        return KMV_ENOMEM;
    }
    for (size_t l = 0; block && l < t->n_leaves; l++) {
        double v = 0.0;
        for (size_t u = 0; u < t->d; u++) v += (double)t->lc[l * t->d + u] * t->lc[l * t->d + u];
        s->ln[l] = (float)v;
    }
    *out = s;
    return KMV_OK;
}

void kmv__tree_scratch_free(kmv__tree_scratch *s) {
    if (s == NULL) return;
    kmv__free(s->a, s->dot);
    kmv__free(s->a, s->ln);
    kmv__free(s->a, s->kv);
    kmv__free(s->a, s->kv2);
    kmv__free(s->a, s->cd);
    kmv__free(s->a, s);
}

static int cmp_cand(const void *pa, const void *pb) {
    const cand *x = pa, *y = pb;
    if (x->must != y->must) return y->must - x->must;
    if (x->term != y->term) return x->term < y->term ? 1 : -1;
    return (x->leaf > y->leaf) - (x->leaf < y->leaf);
}

/* The leaf's visible keys summed exactly into y; how many. */
static size_t open_leaf(const kmv__tree_req *rq, kmv__tree_scratch *s, const float *q,
                        uint32_t lim, size_t l, double *y) {
    const kmv__tree *t = rq->t;
    size_t c = rq->ms->c, k = 0;
    const uint32_t *ids = t->ids + t->l_off[l];
    size_t cnt = t->l_cnt[l];
    for (size_t u = 0; u < cnt; u++)
        if (ids[u] <= lim) s->kv[k++] = kmv__sqdist(q, kmv__keystore_row(rq->ks, ids[u]), t->d);
    kmv__gauss_row_dist(s->kv, k, (float)rq->ms->inv2s2, NULL);
    k = 0;
    for (size_t u = 0; u < cnt; u++) {
        if (ids[u] > lim) continue;
        const float *xj = rq->x + (size_t)ids[u] * c;
        for (size_t col = 0; col < c; col++) y[col] += (double)s->kv[k] * xj[col];
        k++;
    }
    return k;
}

/* A candidate's interval from its squared distance d2, taken directly. */
static cand bound_leaf(const kmv__tree_req *rq, const kmv__tree_scratch *s, double d2, size_t l,
                       int must) {
    const kmv__tree *t = rq->t;
    double dlo2 = d2 * (1.0 - s->slack), dhi2 = d2 * (1.0 + s->slack);
    double dlo = sqrt(dlo2 > 0.0 ? dlo2 : 0.0) - t->lr[l], dhi = sqrt(dhi2) + t->lr[l];
    if (dlo < 0.0) dlo = 0.0;
    double ub = exp(-dlo * dlo * rq->ms->inv2s2), lb = exp(-dhi * dhi * rq->ms->inv2s2);
    return (cand){0.5 * (ub - lb) * rq->ms->la[l], 0.5 * (ub + lb), (uint32_t)l, must};
}

static void settle(const kmv__tree_req *rq, kmv__tree_scratch *s, const float *q, uint32_t lim,
                   size_t nc, size_t negl, double *y, kmv__tree_out *o);

/* One row, from its dot products with the leaf centres. */
static void one_row(const kmv__tree_req *rq, kmv__tree_scratch *s, const float *q, uint32_t lim,
                    const float *dot, double *y, kmv__tree_out *o) {
    const kmv__tree *t = rq->t;
    const kmv__tree_mass *ms = rq->ms;
    size_t c = ms->c, nc = 0, negl = 0;
    double qn = 0.0;
    for (size_t u = 0; u < t->d; u++) qn += (double)q[u] * q[u];
    memset(o, 0, sizeof *o);
    for (size_t col = 0; col < c; col++) y[col] = 0.0;
    if (lim >= t->n) {
        /* every key visible: one vectorizable test per leaf, on the dot */
        float qh = (float)(0.5 * qn * (1.0 - 2.0 * s->slack));
        qh -= 1e-6f * qh; /* rounded down: never negligible by rounding */
        for (size_t l = 0; l < t->n_leaves; l++) {
            if (dot[l] <= ms->h[l] + qh) continue;
            if (ms->la[l] == 0.0) continue; /* adds nothing */
            s->cd[nc++] = bound_leaf(rq, s, kmv__sqdist(q, t->lc + l * t->d, t->d), l, 0);
        }
        negl = t->n_leaves - nc;
    } else {
        for (size_t l = 0; l < t->n_leaves; l++) {
            if (t->l_lo[l] > lim) continue; /* nothing visible */
            int must = t->l_hi[l] > lim;
            if (!must) {
                if (ms->la[l] == 0.0) continue;
                if (dot[l] <= ms->h[l] + (float)(0.5 * qn * (1.0 - 2.0 * s->slack)) * (1.0f - 1e-6f)) {
                    negl++;
                    continue;
                }
            }
            s->cd[nc++] = bound_leaf(rq, s, kmv__sqdist(q, t->lc + l * t->d, t->d), l, must);
        }
    }
    settle(rq, s, q, lim, nc, negl, y, o);
}

/* The row from its candidates s->cd[0 .. nc) (the other leaves, negl of
 * them counted, negligible): open the largest terms until the rest fits. */
static void settle(const kmv__tree_req *rq, kmv__tree_scratch *s, const float *q, uint32_t lim,
                   size_t nc, size_t negl, double *y, kmv__tree_out *o) {
    const kmv__tree *t = rq->t;
    const kmv__tree_mass *ms = rq->ms;
    size_t c = ms->c;
    o->bounded = nc;
    qsort(s->cd, nc, sizeof(cand), cmp_cand);
    double rest = (double)negl * ms->cut, T = 0.0;
    for (size_t u = 0; u < nc; u++) T += s->cd[u].term;
    size_t u = 0;
    while (u < nc && (s->cd[u].must || T + rest > ms->budget)) {
        size_t l = s->cd[u].leaf;
        if ((double)(o->visited + t->l_cnt[l]) > rq->max_work) {
            o->gave_up = 1;
            return;
        }
        o->visited += open_leaf(rq, s, q, lim, l, y);
        T -= s->cd[u].term;
        u++;
    }
    /* the certificate: what is left, summed afresh */
    T = rest;
    for (size_t v = u; v < nc; v++) {
        T += s->cd[v].term;
        const double *sum = ms->ls + (size_t)s->cd[v].leaf * c;
        for (size_t col = 0; col < c; col++) y[col] += s->cd[v].mid * sum[col];
    }
    o->tail = T;
}

void kmv__tree_rows(const kmv__tree_req *rq, kmv__tree_scratch *s, double *y, kmv__tree_out *out) {
    const kmv__tree *t = rq->t;
    size_t d = t->d, L = t->n_leaves;
    if (L > 0)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rq->count, (int)L, (int)d, 1.0f,
                    rq->q, (int)d, t->lc, (int)d, 0.0f, s->dot, (int)L);
    for (size_t i = 0; i < rq->count; i++) {
        uint32_t lim = rq->lim ? rq->lim[i] : UINT32_MAX;
        one_row(rq, s, rq->q + i * d, lim, s->dot + i * L, y + i * rq->ms->c, &out[i]);
        /* rounding can leave the fresh sum a hair over: open on */
        if (!out[i].gave_up && out[i].tail > rq->ms->budget) out[i].gave_up = 1;
    }
}

size_t kmv__tree_group_cands(const kmv__tree *t, const kmv__tree_mass *ms, const float *zdot,
                             double zn, double rho, uint32_t *cands) {
    double g = 1.0 - 2.0 * kmv__tree_slack(t->d);
    float base = (float)(0.5 * zn * g - 0.5 * rho * rho);
    base -= 1e-6f * fabsf(base) + 1e-30f; /* rounded down */
    float fr = (float)rho * (1.0f + 1e-6f);
    size_t nc = 0;
    for (size_t l = 0; l < t->n_leaves; l++)
        if (zdot[l] > ms->h[l] + base - fr * ms->s[l] && ms->la[l] != 0.0) cands[nc++] = (uint32_t)l;
    return nc;
}

void kmv__tree_row_from(const kmv__tree_req *rq, kmv__tree_scratch *s, const uint32_t *cands,
                        size_t n_cands, double *y, kmv__tree_out *o) {
    const kmv__tree *t = rq->t;
    const float *q = rq->q;
    memset(o, 0, sizeof *o);
    for (size_t col = 0; col < rq->ms->c; col++) y[col] = 0.0;
    size_t nc = 0, negl = t->n_leaves - n_cands;
    for (size_t u = 0; u < n_cands; u++) {
        size_t l = cands[u];
        double d2 = (double)kmv__sqdist(q, t->lc + l * t->d, t->d);
        if (d2 * (1.0 - s->slack) >= (double)rq->ms->thr[l]) {
            negl++;
            continue;
        }
        s->cd[nc++] = bound_leaf(rq, s, d2, l, 0);
    }
    settle(rq, s, q, UINT32_MAX, nc, negl, y, o);
    if (!o->gave_up && o->tail > rq->ms->budget) o->gave_up = 1;
}

/* Whether a node at squared distance d2 (taken directly) with radius r and
 * mass m is negligible: its keys' values times m stay under cut. */
static int negligible(const kmv__tree_scratch *s, double d2, double r, double m, double inv2s2,
                      double cut) {
    double dlo2 = d2 * (1.0 - s->slack);
    double dlo = sqrt(dlo2 > 0.0 ? dlo2 : 0.0) - r;
    if (dlo <= 0.0) return m == 0.0;
    return exp(-dlo * dlo * inv2s2) * m * (1.0 + 1e-9) <= cut;
}

void kmv__tree_row_walk(const kmv__tree_req *rq, kmv__tree_scratch *s, double *y,
                        kmv__tree_out *o) {
    const kmv__tree *t = rq->t;
    const kmv__tree_mass *ms = rq->ms;
    const float *q = rq->q;
    size_t d = t->d, nc = 0, negl = 0, leaves = 0;
    memset(o, 0, sizeof *o);
    for (size_t col = 0; col < ms->c; col++) y[col] = 0.0;
    for (size_t g = 0; g < t->n_groups; g++) {
        size_t l0 = t->g_off[g], nl = t->g_off[g + 1] - l0;
        double d2 = (double)kmv__sqdist(q, t->gc + g * d, d);
        /* a negligible group counts as the leaves it holds, each under cut */
        if (negligible(s, d2, t->gr[g], ms->ga[g], ms->inv2s2, ms->cut * (double)nl)) {
            negl += nl;
            continue;
        }
        /* squared distances to the group's leaf centres in one pass, each
         * within the slack of the exact one (a float sum of d squares),
         * from the int8 centres where the tree has them */
        const float *thr = ms->thr + l0;
        if (t->lq != NULL) kmv__sqdist_q8_rows(q, t->lq + l0 * d, t->lqs + l0, nl, d, s->kv2);
        else kmv__sqdist_rows(q, t->lc + l0 * d, nl, d, s->kv2);
        leaves += nl;
        for (size_t u = 0; u < nl; u++) {
            size_t l = l0 + u;
            if (ms->la[l] == 0.0) continue; /* adds nothing */
            if ((double)s->kv2[u] * (1.0 - s->slack) >= (double)thr[u]) {
                negl++;
                continue;
            }
            s->cd[nc++] = bound_leaf(rq, s, (double)s->kv2[u], l, 0);
        }
    }
    settle(rq, s, q, UINT32_MAX, nc, negl, y, o);
    o->bounded = t->n_groups + leaves;
    if (!o->gave_up && o->tail > ms->budget) o->gave_up = 1;
}
