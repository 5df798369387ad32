/* The bounds tree's build; see tree.h. Groups come from k-means++ and
 * Lloyd's iterations on a uniform sample of the keys (ids drawn from the
 * seed), every key then goes to its nearest group, and each group's keys,
 * in id order, are split into leaves by Lloyd's iterations of its own:
 * the tree depends on the keys and the seed, not on the store's order.
 * Distances for assignment go through one GEMM per block; radii are
 * measured in double from the float centres the search uses, and rounded
 * up, so the bounds they give hold for every key. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "algo/tree.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "algo/kernel.h"
#include "common/alloc.h"
#include "common/rng.h"
#include "common/threads.h"

#define ITERS 6            /* Lloyd's iterations for the groups */
#define LEAF_ITERS 2       /* and for leaves: k-means++ seeds them well, and
                              refine() splits what stays wide */
#define SAMPLE_PER_GROUP 64 /* the top level's sample */
#define ASSIGN_BLOCK 2048  /* rows per assignment GEMM */

static size_t leaves_for(size_t n) { return (n + KMV__TREE_LEAF - 1) / KMV__TREE_LEAF; }

static size_t groups_for(size_t n) {
    size_t g = (size_t)ceil(sqrt((double)leaves_for(n)));
    return g ? g : 1;
}

double kmv__tree_build_cost(size_t n, size_t d) {
    double N = (double)n, G = (double)groups_for(n), L = (double)leaves_for(n);
    double sample = N < SAMPLE_PER_GROUP * G ? N : SAMPLE_PER_GROUP * G;
    /* distance entries by GEMM: the sample's iterations, every key against
     * the groups, and each group's iterations against its leaves */
    double entries = sample * G * (ITERS + 1) + N * G + N * (L / G) * (LEAF_ITERS + 4);
    return entries * (0.1 + 0.025 * (double)d) + 2.0 * N * (double)d;
}

/* lab[i]: the nearest of C's k centres (norms cn) to P's row i; ties go to
 * the smaller index. buf: np x k. */
static void assign(const float *P, size_t np, size_t d, const float *C, const float *cn, size_t k,
                   float *buf, uint32_t *lab) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)np, (int)k, (int)d, 1.0f, P, (int)d,
                C, (int)d, 0.0f, buf, (int)k);
    for (size_t i = 0; i < np; i++) {
        const float *b = buf + i * k;
        float best = INFINITY;
        uint32_t arg = 0;
        for (size_t j = 0; j < k; j++) {
            float v = cn[j] - 2.0f * b[j];
            if (v < best) best = v, arg = (uint32_t)j;
        }
        lab[i] = arg;
    }
}

static void norms(const float *C, size_t k, size_t d, float *cn) {
    for (size_t j = 0; j < k; j++) {
        float s = 0.0f;
        for (size_t u = 0; u < d; u++) s += C[j * d + u] * C[j * d + u];
        cn[j] = s;
    }
}

/* Lloyd's iterations over P (np x d) from the k centres in C; a centre
 * that loses every point stays where it is. Scratch: buf np x k, lab np,
 * sum k x d, cnt k, cn k. */
static void lloyd(const float *P, size_t np, size_t d, float *C, size_t k, int iters, float *buf,
                  uint32_t *lab, double *sum, size_t *cnt, float *cn) {
    for (int it = 0; it < iters; it++) {
        norms(C, k, d, cn);
        assign(P, np, d, C, cn, k, buf, lab);
        memset(sum, 0, k * d * sizeof(double));
        memset(cnt, 0, k * sizeof(size_t));
        for (size_t i = 0; i < np; i++) {
            cnt[lab[i]]++;
            for (size_t u = 0; u < d; u++) sum[lab[i] * d + u] += P[i * d + u];
        }
        for (size_t j = 0; j < k; j++)
            for (size_t u = 0; cnt[j] && u < d; u++) C[j * d + u] = (float)(sum[j * d + u] / (double)cnt[j]);
    }
    norms(C, k, d, cn);
    assign(P, np, d, C, cn, k, buf, lab);
}

static double dist2(const float *a, const float *b, size_t d) {
    double s = 0.0;
    for (size_t u = 0; u < d; u++) {
        double t = (double)a[u] - b[u];
        s += t * t;
    }
    return s;
}

/* Leaf j's members (label j) split in two by 2-means from its two most
 * distant points; the second half gets label k. 0 when it cannot split. */
static int split_leaf(const float *P, size_t sz, size_t d, uint32_t *lab, float *C, uint32_t j,
                      uint32_t k, double *acc) {
    size_t a = SIZE_MAX, b = SIZE_MAX;
    double far = -1.0;
    for (size_t u = 0; u < sz; u++)
        if (lab[u] == j && dist2(P + u * d, C + (size_t)j * d, d) > far) far = dist2(P + u * d, C + (size_t)j * d, d), a = u;
    far = -1.0;
    for (size_t u = 0; u < sz; u++)
        if (lab[u] == j && dist2(P + u * d, P + a * d, d) > far) far = dist2(P + u * d, P + a * d, d), b = u;
    if (a == SIZE_MAX || b == SIZE_MAX || far <= 0.0) return 0;
    float *ca = C + (size_t)j * d, *cb = C + (size_t)k * d;
    memcpy(ca, P + a * d, d * sizeof(float));
    memcpy(cb, P + b * d, d * sizeof(float));
    for (int it = 0; it < 4; it++) {
        size_t na = 0, nb = 0;
        memset(acc, 0, 2 * d * sizeof(double));
        for (size_t u = 0; u < sz; u++) {
            if (lab[u] != j && lab[u] != k) continue;
            int to_b = dist2(P + u * d, cb, d) < dist2(P + u * d, ca, d);
            lab[u] = to_b ? k : j;
            double *s = acc + (to_b ? d : 0);
            for (size_t v = 0; v < d; v++) s[v] += P[u * d + v];
            if (to_b) nb++;
            else na++;
        }
        if (na == 0 || nb == 0) return 0;
        for (size_t v = 0; v < d; v++) {
            ca[v] = (float)(acc[v] / (double)na);
            cb[v] = (float)(acc[d + v] / (double)nb);
        }
    }
    return 1;
}

static int cmp_dbl(const void *pa, const void *pb) {
    double x = *(const double *)pa, y = *(const double *)pb;
    return (x > y) - (x < y);
}

/* Leaves much wider than the group's typical leaf hold keys of more than
 * one natural cluster, and their bounds help no query: split them until
 * none is past 1.5 times the median radius, or the slots run out. Returns
 * the new leaf count. rad: kcap doubles; acc: max(kcap, 2 d) doubles. */
static size_t refine(const float *P, size_t sz, size_t d, uint32_t *lab, float *C, size_t k,
                     size_t kcap, double *rad, double *acc) {
    for (size_t j = 0; j < k; j++) rad[j] = -1.0;
    for (size_t u = 0; u < sz; u++) {
        double r = dist2(P + u * d, C + (size_t)lab[u] * d, d);
        if (r > rad[lab[u]]) rad[lab[u]] = r;
    }
    size_t live = 0;
    for (size_t j = 0; j < k; j++)
        if (rad[j] > 0.0) acc[live++] = rad[j];
    if (live == 0) return k;
    qsort(acc, live, sizeof(double), cmp_dbl);
    double tau = 2.25 * acc[live / 2]; /* squared: 1.5 times the radius */
    for (size_t j = 0; j < k && k < kcap; j++) {
        while (rad[j] > tau && k < kcap && split_leaf(P, sz, d, lab, C, (uint32_t)j, (uint32_t)k, acc)) {
            rad[j] = rad[k] = 0.0;
            for (size_t u = 0; u < sz; u++) {
                if (lab[u] != j && lab[u] != k) continue;
                double r = dist2(P + u * d, C + (size_t)lab[u] * d, d);
                if (r > rad[lab[u]]) rad[lab[u]] = r;
            }
            k++;
        }
    }
    return k;
}

/* k-means++ seeding from P's rows. d2: np. */
static void seed_pp(const float *P, size_t np, size_t d, float *C, size_t k, double *d2,
                    uint64_t *rng) {
    size_t first = (size_t)kmv__rng_below(rng, np);
    memcpy(C, P + first * d, d * sizeof(float));
    for (size_t i = 0; i < np; i++) d2[i] = INFINITY;
    for (size_t j = 1; j < k; j++) {
        double tot = 0.0;
        const float *cj = C + (j - 1) * d;
        for (size_t i = 0; i < np; i++) {
            double s = (double)kmv__sqdist(P + i * d, cj, d);
            if (s < d2[i]) d2[i] = s;
            tot += d2[i];
        }
        double r = kmv__rng_unit(rng) * tot;
        size_t pick = np - 1;
        for (size_t i = 0; i < np; i++) {
            r -= d2[i];
            if (r < 0.0) {
                pick = i;
                break;
            }
        }
        memcpy(C + j * d, P + pick * d, d * sizeof(float));
    }
}

void kmv__tree_free(kmv__tree *t, const kmv_allocator *a) {
    void *p[] = {t->gc, t->lc, t->gr, t->lr, t->g_off, t->l_off, t->l_cnt, t->l_cap, t->ids,
                 t->g_lo, t->g_hi, t->l_lo, t->l_hi, t->lq, t->lqs};
    for (size_t u = 0; u < sizeof p / sizeof *p; u++) kmv__free(a, p[u]);
    memset(t, 0, sizeof *t);
}

/* The node's centre (mean of its keys), radius and id range. */
static void fit_node(const kmv__keystore *ks, const uint32_t *ids, size_t cnt, float *centre,
                     double *radius, uint32_t *lo, uint32_t *hi, double *acc) {
    size_t d = ks->d;
    memset(acc, 0, d * sizeof(double));
    *lo = UINT32_MAX;
    *hi = 0;
    for (size_t u = 0; u < cnt; u++) {
        const float *r = kmv__keystore_row(ks, ids[u]);
        for (size_t v = 0; v < d; v++) acc[v] += r[v];
        if (ids[u] < *lo) *lo = ids[u];
        if (ids[u] > *hi) *hi = ids[u];
    }
    for (size_t v = 0; v < d; v++) centre[v] = (float)(acc[v] / (double)cnt);
    double best = 0.0;
    for (size_t u = 0; u < cnt; u++) {
        const float *r = kmv__keystore_row(ks, ids[u]);
        double s = 0.0;
        for (size_t v = 0; v < d; v++) {
            double t = (double)r[v] - centre[v];
            s += t * t;
        }
        if (s > best) best = s;
    }
    *radius = kmv__tree_radius(sqrt(best));
}

typedef struct build {
    kmv__tree *t;
    const kmv_allocator *a;
    const kmv__keystore *ks;
    uint64_t seed;
    int threads;
    size_t G, Lmax;
    float *gc0;        /* G x d: the top level's centres */
    uint32_t *glab;    /* ks->n: each store position's group (UINT32_MAX:
                          a key past t->n) */
    uint32_t *gstart;  /* G + 1: group g's keys in t->ids */
    uint32_t *lbase;   /* G + 1: group g's leaf slots */
    int nomem;
} build;

/* The sample: S key ids below n drawn from the seed (with repeats, which
 * k-means does not mind), their rows into P. Drawn by id, not by store
 * position: the store's order depends on how the keys arrived, and a
 * stream's tree must not. */
static void gather_sample(const kmv__keystore *ks, size_t n, size_t S, uint64_t seed, float *P) {
    size_t d = ks->d;
    uint64_t rng = kmv__rng_stream(seed ^ kmv__mix64(n), KMV__RNG_TREE);
    if (S >= n)
        for (size_t k = 0; k < n; k++) memcpy(P + k * d, kmv__keystore_row(ks, k), d * sizeof(float));
    else
        for (size_t k = 0; k < S; k++)
            memcpy(P + k * d, kmv__keystore_row(ks, (size_t)kmv__rng_below(&rng, n)), d * sizeof(float));
}

/* The top level: centres from the sample, then every key's group. */
static int top_level(build *b) {
    const kmv__keystore *ks = b->ks;
    size_t n = b->t->n, d = ks->d, G = b->G;
    size_t S = n < SAMPLE_PER_GROUP * G ? n : SAMPLE_PER_GROUP * G;
    const kmv_allocator *a = b->a;
    float *P = kmv__malloc_array(a, S, d * sizeof(float));
    float *buf = kmv__malloc_array(a, S > ASSIGN_BLOCK ? S : ASSIGN_BLOCK, G * sizeof(float));
    uint32_t *lab = kmv__malloc_array(a, S, sizeof(uint32_t));
    double *sum = kmv__malloc_array(a, G, d * sizeof(double));
    size_t *cnt = kmv__malloc_array(a, G, sizeof(size_t));
    float *cn = kmv__malloc_array(a, G, sizeof(float));
    double *d2 = kmv__malloc_array(a, S, sizeof(double));
    int rc = P && buf && lab && sum && cnt && cn && d2 ? KMV_OK : KMV_ENOMEM;
    if (rc == KMV_OK) {
        gather_sample(ks, n, S, b->seed, P);
        /* BLAS on one thread inside a team of one, as everywhere in kmv:
         * the same result for any thread count, and no BLAS team of its
         * own on the caller's thread */
#pragma omp parallel num_threads(1)
        {
            kmv__blas_single();
            uint64_t rng = kmv__rng_stream(b->seed, KMV__RNG_TREE);
            seed_pp(P, S, d, b->gc0, G, d2, &rng);
            lloyd(P, S, d, b->gc0, G, ITERS, buf, lab, sum, cnt, cn);
        }
    }
    kmv__free(a, P);
    kmv__free(a, buf);
    kmv__free(a, lab);
    kmv__free(a, sum);
    kmv__free(a, cnt);
    kmv__free(a, d2);
    if (rc != KMV_OK) {
        kmv__free(a, cn);
        return rc;
    }
    /* Every key: blocks on every thread, each GEMM on one, so the labels
     * do not depend on the thread count (keys past n are labelled too, and
     * then left out). */
    size_t N = ks->n, nblk = (N + ASSIGN_BLOCK - 1) / ASSIGN_BLOCK;
#pragma omp parallel num_threads(b->threads)
    {
        kmv__blas_single();
        float *bb = kmv__malloc_array(a, ASSIGN_BLOCK, G * sizeof(float));
        if (bb == NULL) {
#pragma omp atomic write
            b->nomem = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (size_t k = 0; k < nblk; k++) {
            size_t p0 = k * ASSIGN_BLOCK, np = N - p0 < ASSIGN_BLOCK ? N - p0 : ASSIGN_BLOCK;
            if (bb != NULL) assign(ks->rows + p0 * d, np, d, b->gc0, cn, G, bb, b->glab + p0);
        }
        kmv__free(a, bb);
    }
    kmv__free(a, cn);
    return b->nomem ? KMV_ENOMEM : KMV_OK;
}

/* Group g's keys into leaves: slots lbase[g] .. lbase[g + 1) of the leaf
 * arrays, keys in ids[gstart[g] ..), empty slots left with no keys. */
static int split_group(build *b, size_t g) {
    kmv__tree *t = b->t;
    const kmv__keystore *ks = b->ks;
    size_t d = ks->d, g0 = b->gstart[g], sz = b->gstart[g + 1] - g0;
    size_t kcap = b->lbase[g + 1] - b->lbase[g], L0 = b->lbase[g];
    size_t k = leaves_for(sz);
    uint32_t *gid = t->ids + g0;
    if (sz == 0) return KMV_OK;
    const kmv_allocator *a = b->a;
    float *P = kmv__malloc_array(a, sz, d * sizeof(float));
    float *buf = kmv__malloc_array(a, sz, (k > 2 ? k : 2) * sizeof(float));
    uint32_t *lab = kmv__malloc_array(a, sz, sizeof(uint32_t));
    uint32_t *tmp = kmv__malloc_array(a, sz, sizeof(uint32_t));
    double *sum = kmv__malloc_array(a, kcap + 2, d * sizeof(double));
    size_t *cnt = kmv__malloc_array(a, kcap + 1, sizeof(size_t));
    float *cn = kmv__malloc_array(a, k, sizeof(float));
    double *d2 = kmv__malloc_array(a, sz > kcap ? sz : kcap, sizeof(double));
    int rc = P && buf && lab && tmp && sum && cnt && cn && d2 ? KMV_OK : KMV_ENOMEM;
    if (rc == KMV_OK) {
        for (size_t u = 0; u < sz; u++) memcpy(P + u * d, kmv__keystore_row(ks, gid[u]), d * sizeof(float));
        float *C = t->lc + L0 * d;
        /* k-means++: a natural cluster of keys gets a seed of its own with
         * high probability, so leaves follow the data's clusters */
        uint64_t rng = kmv__rng_stream(b->seed ^ kmv__mix64(g + 1), KMV__RNG_TREE);
        seed_pp(P, sz, d, C, k, d2, &rng);
        if (k > 1) lloyd(P, sz, d, C, k, LEAF_ITERS, buf, lab, sum, cnt, cn);
        else memset(lab, 0, sz * sizeof(uint32_t));
        k = refine(P, sz, d, lab, C, k, kcap, d2, sum);
        memset(cnt, 0, (k + 1) * sizeof(size_t));
        for (size_t u = 0; u < sz; u++) cnt[lab[u] + 1]++;
        for (size_t j = 0; j < k; j++) cnt[j + 1] += cnt[j];
        for (size_t j = 0; j <= kcap; j++) t->l_off[L0 + j] = (uint32_t)(g0 + cnt[j < k ? j : k]);
        for (size_t u = 0; u < sz; u++) tmp[cnt[lab[u]]++] = gid[u];
        memcpy(gid, tmp, sz * sizeof(uint32_t));
        for (size_t j = 0; j < k; j++) {
            size_t lo = t->l_off[L0 + j], hi = t->l_off[L0 + j + 1];
            if (hi > lo)
                fit_node(ks, t->ids + lo, hi - lo, C + j * d, &t->lr[L0 + j], &t->l_lo[L0 + j],
                         &t->l_hi[L0 + j], sum);
        }
        fit_node(ks, gid, sz, t->gc + g * d, &t->gr[g], &t->g_lo[g], &t->g_hi[g], sum);
    }
    void *p[] = {P, buf, lab, tmp, sum, cnt, cn, d2};
    for (size_t u = 0; u < sizeof p / sizeof *p; u++) kmv__free(a, p[u]);
    return rc;
}

/* Keys sorted by group into t->ids, and each group's leaf slots. */
static void sort_groups(build *b) {
    kmv__tree *t = b->t;
    size_t N = b->ks->n, n = t->n, G = b->G;
    for (size_t p = 0; p < N; p++)
        if (b->ks->id_at[p] >= n) b->glab[p] = UINT32_MAX;
    memset(b->gstart, 0, (G + 1) * sizeof(uint32_t));
    for (size_t p = 0; p < N; p++)
        if (b->glab[p] != UINT32_MAX) b->gstart[b->glab[p] + 1]++;
    for (size_t g = 0; g < G; g++) b->gstart[g + 1] += b->gstart[g];
    b->lbase[0] = 0;
    for (size_t g = 0; g < G; g++)
        b->lbase[g + 1] = b->lbase[g] + (uint32_t)(2 * leaves_for(b->gstart[g + 1] - b->gstart[g]));
    /* ids in order within a group: whatever the store's order */
    for (size_t id = 0; id < n; id++) {
        uint32_t g = b->glab[b->ks->pos_of[id]];
        t->ids[b->gstart[g]] = (uint32_t)id;
        b->gstart[g]++;
    }
    for (size_t g = G; g > 0; g--) b->gstart[g] = b->gstart[g - 1];
    b->gstart[0] = 0;
}

/* Drop empty leaves and groups, keeping the order. */
static void compact(build *b) {
    kmv__tree *t = b->t;
    size_t d = t->d, L = 0, G = 0;
    t->l_off[0] = 0;
    for (size_t g = 0; g < b->G; g++) {
        size_t L_start = L;
        for (size_t j = b->lbase[g]; j < b->lbase[g + 1]; j++) {
            uint32_t a0 = t->l_off[j], a1 = t->l_off[j + 1];
            if (a1 == a0) continue;
            memmove(t->lc + L * d, t->lc + j * d, d * sizeof(float));
            t->lr[L] = t->lr[j];
            t->l_lo[L] = t->l_lo[j];
            t->l_hi[L] = t->l_hi[j];
            t->l_off[L] = a0;
            t->l_off[L + 1] = a1; /* rewritten by the next leaf's a0 */
            L++;
        }
        if (L == L_start) continue;
        memmove(t->gc + G * d, t->gc + g * d, d * sizeof(float));
        t->gr[G] = t->gr[g];
        t->g_lo[G] = t->g_lo[g];
        t->g_hi[G] = t->g_hi[g];
        t->g_off[G] = (uint32_t)L_start;
        G++;
    }
    t->g_off[G] = (uint32_t)L;
    t->l_off[L] = (uint32_t)t->n;
    t->n_groups = G;
    t->n_leaves = L;
}

/* The leaf arrays cut to the leaves there are (the build reserved twice
 * the slots for splits). */
static int shrink(kmv__tree *t, const kmv_allocator *a) {
    size_t L = t->n_leaves ? t->n_leaves : 1, d = t->d;
    float *lc = kmv__malloc_array(a, L, d * sizeof(float));
    double *lr = kmv__malloc_array(a, L, sizeof(double));
    uint32_t *off = kmv__malloc_array(a, L + 1, sizeof(uint32_t));
    uint32_t *lo = kmv__malloc_array(a, L, sizeof(uint32_t)), *hi = kmv__malloc_array(a, L, sizeof(uint32_t));
    t->l_cnt = kmv__malloc_array(a, L, sizeof(uint32_t));
    t->l_cap = kmv__malloc_array(a, L, sizeof(uint32_t));
    if (!lc || !lr || !off || !lo || !hi || !t->l_cnt || !t->l_cap) {
        void *p[] = {lc, lr, off, lo, hi};
        for (size_t u = 0; u < 5; u++) kmv__free(a, p[u]);
        return KMV_ENOMEM;
    }
    t->l_wide = 0;
    for (size_t l = 0; l < t->n_leaves; l++) {
        t->l_cnt[l] = t->l_cap[l] = t->l_off[l + 1] - t->l_off[l];
        if (t->l_cnt[l] > t->l_wide) t->l_wide = t->l_cnt[l];
    }
    t->ids_len = t->ids_cap = t->n;
    t->l_room = L;
    memcpy(lc, t->lc, t->n_leaves * d * sizeof(float));
    memcpy(lr, t->lr, t->n_leaves * sizeof(double));
    memcpy(off, t->l_off, (t->n_leaves + 1) * sizeof(uint32_t));
    memcpy(lo, t->l_lo, t->n_leaves * sizeof(uint32_t));
    memcpy(hi, t->l_hi, t->n_leaves * sizeof(uint32_t));
    void *old[] = {t->lc, t->lr, t->l_off, t->l_lo, t->l_hi};
    for (size_t u = 0; u < 5; u++) kmv__free(a, old[u]);
    t->lc = lc, t->lr = lr, t->l_off = off, t->l_lo = lo, t->l_hi = hi;
    t->bytes = kmv__tree_bytes(t);
    return KMV_OK;
}

static int median_radius(kmv__tree *t, const kmv_allocator *a) {
    double *rad = kmv__malloc_array(a, t->n_leaves ? t->n_leaves : 1, sizeof(double));
    if (rad == NULL) return KMV_ENOMEM;
    memcpy(rad, t->lr, t->n_leaves * sizeof(double));
    qsort(rad, t->n_leaves, sizeof(double), cmp_dbl);
    t->r_med = t->n_leaves ? rad[t->n_leaves / 2] : 0.0;
    memcpy(rad, t->gr, t->n_groups * sizeof(double));
    qsort(rad, t->n_groups, sizeof(double), cmp_dbl);
    t->gr_med = t->n_groups ? rad[t->n_groups / 2] : 0.0;
    kmv__free(a, rad);
    return KMV_OK;
}

static int alloc_tree(build *b) {
    kmv__tree *t = b->t;
    const kmv_allocator *a = b->a;
    size_t d = t->d, G = b->G, L = b->Lmax, n = t->n;
    t->gc = kmv__malloc_array(a, G, d * sizeof(float));
    t->lc = kmv__malloc_array(a, L, d * sizeof(float));
    t->gr = kmv__malloc_array(a, G, sizeof(double));
    t->lr = kmv__malloc_array(a, L, sizeof(double));
    t->g_off = kmv__malloc_array(a, G + 1, sizeof(uint32_t));
    t->l_off = kmv__malloc_array(a, L + 1, sizeof(uint32_t));
    t->ids = kmv__malloc_array(a, n, sizeof(uint32_t));
    t->g_lo = kmv__malloc_array(a, G, sizeof(uint32_t));
    t->g_hi = kmv__malloc_array(a, G, sizeof(uint32_t));
    t->l_lo = kmv__malloc_array(a, L, sizeof(uint32_t));
    t->l_hi = kmv__malloc_array(a, L, sizeof(uint32_t));
    t->bytes = (G + L) * (d * sizeof(float) + sizeof(double) + 3 * sizeof(uint32_t)) +
               2 * sizeof(uint32_t) + n * sizeof(uint32_t);
    return t->gc && t->lc && t->gr && t->lr && t->g_off && t->l_off && t->ids && t->g_lo &&
                   t->g_hi && t->l_lo && t->l_hi
               ? KMV_OK
               : KMV_ENOMEM;
}

int kmv__tree_build(kmv__tree *t, const kmv_allocator *a, const kmv__keystore *ks, size_t n,
                    uint64_t seed, int threads) {
    memset(t, 0, sizeof *t);
    t->d = ks->d;
    t->n = n < ks->n ? n : ks->n;
    if (t->n == 0) return KMV_OK;
    build b = {t, a, ks, seed, threads > 0 ? threads : 1, groups_for(t->n), 0,
               NULL, NULL, NULL, NULL, 0};
    if (b.G > t->n) b.G = t->n;
    b.Lmax = 2 * (leaves_for(t->n) + b.G);
    b.gc0 = kmv__malloc_array(a, b.G, ks->d * sizeof(float));
    b.glab = kmv__malloc_array(a, ks->n, sizeof(uint32_t));
    b.gstart = kmv__malloc_array(a, b.G + 1, sizeof(uint32_t));
    b.lbase = kmv__malloc_array(a, b.G + 1, sizeof(uint32_t));
    int rc = b.gc0 && b.glab && b.gstart && b.lbase ? alloc_tree(&b) : KMV_ENOMEM;
    if (rc == KMV_OK) rc = top_level(&b);
    if (rc == KMV_OK) {
        sort_groups(&b);
#pragma omp parallel for schedule(dynamic, 1) num_threads(b.threads)
        for (size_t g = 0; g < b.G; g++) {
            kmv__blas_single();
            if (split_group(&b, g) != KMV_OK) {
#pragma omp atomic write
                b.nomem = 1;
            }
        }
        if (b.nomem) rc = KMV_ENOMEM;
    }
    if (rc == KMV_OK) {
        compact(&b);
        rc = shrink(t, a);
    }
    if (rc == KMV_OK) rc = median_radius(t, a);
    t->g_room = b.G;
    t->g_built = t->n_groups;
    kmv__free(a, b.gc0);
    kmv__free(a, b.glab);
    kmv__free(a, b.gstart);
    kmv__free(a, b.lbase);
    if (rc != KMV_OK) kmv__tree_free(t, a);
    return rc;
}

int kmv__tree_mass_init(const kmv__tree *t, const kmv_allocator *a, const float *x, size_t c,
                        kmv__tree_mass *ms) {
    size_t L = t->n_leaves ? t->n_leaves : 1;
    memset(ms, 0, sizeof *ms);
    ms->c = c;
    ms->l_room = L;
    ms->g_room = t->n_groups ? t->n_groups : 1;
    ms->la = kmv__malloc_array(a, L, sizeof(double));
    ms->ga = kmv__malloc_array(a, t->n_groups ? t->n_groups : 1, sizeof(double));
    ms->ls = kmv__malloc_array(a, L, c * sizeof(double));
    ms->h = kmv__malloc_array(a, L, sizeof(float));
    ms->s = kmv__malloc_array(a, L, sizeof(float));
    ms->thr = kmv__malloc_array(a, L, sizeof(float));
    if (!ms->la || !ms->ga || !ms->ls || !ms->thr || !ms->h || !ms->s) {
        kmv__tree_mass_free(ms, a);
        return KMV_ENOMEM;
    }
    for (size_t l = 0; l < t->n_leaves; l++) {
        double la = 0.0, *ls = ms->ls + l * c;
        for (size_t col = 0; col < c; col++) ls[col] = 0.0;
        for (size_t u = t->l_off[l]; u < t->l_off[l] + t->l_cnt[l]; u++) {
            const float *xj = x + (size_t)t->ids[u] * c;
            double s2 = 0.0;
            for (size_t col = 0; col < c; col++) {
                ls[col] += xj[col];
                s2 += (double)xj[col] * xj[col];
            }
            la += sqrt(s2);
        }
        /* rounded up: the mass multiplies a bound */
        ms->la[l] = la * (1.0 + 1e-12);
    }
    kmv__tree_group_mass(t, ms);
    return KMV_OK;
}

void kmv__tree_leaf_limit(const kmv__tree *t, kmv__tree_mass *ms, size_t l) {
    /* exp(-D^2 inv2s2) mass = cut at distance D past the radius; a float
     * rounded up so that d2 >= thr still means D is passed */
    double thr = 0.0;
    if (ms->la[l] > ms->cut) {
        double D = sqrt(log(ms->la[l] / ms->cut) / ms->inv2s2);
        thr = (D + t->lr[l]) * (D + t->lr[l]) * (1.0 + 1e-6);
    }
    ms->thr[l] = thr < 3e38 ? (float)thr : INFINITY;
    ms->s[l] = thr < 3e38 ? (float)(sqrt(thr) * (1.0 + 1e-6)) : INFINITY;
    /* d2 = qn + ln - 2 <q, c> computed, |error| <= 2 g' (qn + ln) with g'
     * the slack: negligible when d2 - err >= thr, that is when
     * <q, c> <= (ln (1 - 2 g') - thr) / 2 + qn (1 - 2 g') / 2 */
    if (t->lc == NULL) { /* int8 centres: no dot-product test */
        ms->h[l] = -INFINITY;
        return;
    }
    double ln = 0.0;
    for (size_t u = 0; u < t->d; u++) ln += (double)t->lc[l * t->d + u] * t->lc[l * t->d + u];
    double g = 1.0 - 2.0 * kmv__tree_slack(t->d);
    double hv = 0.5 * (ln * g - thr);
    /* rounded down, so that the float test never says negligible where
     * the exact one would not */
    ms->h[l] = thr < 3e38 ? (float)(hv - 1e-6 * fabs(hv)) : -INFINITY;
}

void kmv__tree_mass_limits(const kmv__tree *t, kmv__tree_mass *ms, double budget, double inv2s2) {
    size_t L = t->n_leaves ? t->n_leaves : 1;
    ms->budget = budget;
    ms->inv2s2 = inv2s2;
    ms->cut = KMV__TREE_CUT * budget / (double)L;
    for (size_t l = 0; l < t->n_leaves; l++) kmv__tree_leaf_limit(t, ms, l);
}

int kmv__tree_mass_new(const kmv__tree *t, const kmv_allocator *a, const float *x, size_t c,
                       double budget, double inv2s2, kmv__tree_mass *ms) {
    int rc = kmv__tree_mass_init(t, a, x, c, ms);
    if (rc == KMV_OK) kmv__tree_mass_limits(t, ms, budget, inv2s2);
    return rc;
}

void kmv__tree_mass_free(kmv__tree_mass *ms, const kmv_allocator *a) {
    kmv__free(a, ms->la);
    kmv__free(a, ms->ga);
    kmv__free(a, ms->ls);
    kmv__free(a, ms->thr);
    kmv__free(a, ms->h);
    kmv__free(a, ms->s);
    memset(ms, 0, sizeof *ms);
}

size_t kmv__tree_bytes(const kmv__tree *t) {
    size_t node = t->d * sizeof(float) + sizeof(double) + 2 * sizeof(uint32_t);
    /* a leaf's centre: d floats, or d int8 and a scale */
    size_t leaf = node + 3 * sizeof(uint32_t) - (t->lc == NULL ? t->d * sizeof(float) : 0) +
                  (t->lq != NULL ? t->d + sizeof(float) : 0);
    return t->n_groups * (node + sizeof(uint32_t)) + t->n_leaves * leaf + 2 * sizeof(uint32_t) +
           t->ids_cap * sizeof(uint32_t);
}

void kmv__tree_group_mass(const kmv__tree *t, kmv__tree_mass *ms) {
    for (size_t g = 0; g < t->n_groups; g++) {
        double m = 0.0;
        for (size_t l = t->g_off[g]; l < t->g_off[g + 1]; l++) m += ms->la[l];
        ms->ga[g] = m * (1.0 + 1e-12); /* rounded up: it multiplies a bound */
    }
}
