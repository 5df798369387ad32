/* The ApproxKMV driver (Algorithm 3): preprocessing x, heavy keys by LSH,
 * the sketch's budgets, window sampling, and the cost model's fallback.
 *
 * Error budget. With B = eps ||x||, the dropped keys (H2) cost each row at
 * most D = sum_{H2} ||x_j||, so at most sqrt(m) D in l2; the rest,
 * Bs = B - sqrt(m) D, is the sampling's. Rows are independent given the
 * key order (their window offsets are), so ||err||^2 is a sum of
 * independent terms with mean V = sum_i v_i; treating each row's error as
 * Gaussian, Var ||err||^2 = 2 sum_i v_i^2, and Chebyshev gives
 * P(||err||^2 > V + sqrt(2 sum v_i^2 / delta_s)) <= delta_s. The plan makes
 * that threshold Bs^2. For a given V the sample total sum_i n W_i / v_i is
 * least with v_i proportional to sqrt(n W_i) (Lagrange), which fixes every
 * row's count up to V, and V follows from the threshold in closed form.
 *
 * Heavy threshold. kappa = min(n^-alpha, eps sqrt(s_min / (16 m h))) where
 * h bounds x_j^2 / mean(x^2) over T: then one light key at the threshold,
 * seen through a window of s_min samples, costs a row at most 1/16 of its
 * share Bs^2 / m. Keys with larger x_j^2 than h allows join the exactly
 * summed columns H1 (with those above n^gamma). */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/alloc.h"
#include "common/params.h"
#include "algo/exact.h"
#include "engine/index.h"
#include "algo/kernel.h"
#include "common/rng.h"
#include "algo/light.h"
#include "algo/sketch.h"
#include "common/timer.h"
#include "algo/xsplit.h"

#define QB 16           /* queries per block of the row passes */
#define BUILD_BLOCK 8192 /* keys copied out of the random order per append */

typedef struct growbuf {
    void *p;
    size_t cap; /* elements */
} growbuf;

static int reserve(const kmv_allocator *a, growbuf *b, size_t need, size_t elem) {
    if (need <= b->cap) return 1;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need) cap *= 2;
    void *p = kmv__malloc_array(a, cap, elem);
    if (p == NULL) return 0;
    if (b->cap) memcpy(p, b->p, b->cap * elem);
    kmv__free(a, b->p);
    b->p = p;
    b->cap = cap;
    return 1;
}

typedef struct tscratch {
    uint32_t *stamp; /* n: last row that met each key */
    uint32_t cur;
    growbuf cand, dist, heavy;
    uint64_t *codes;
    const uint32_t **bkt; /* QB x L buckets of the block's queries */
    uint32_t *blen;
    float *proj;
    float *qblk; /* QB x d: the block's queries */
    float *chunk;
    double *acc, *est;
    float *skd;
} tscratch;

/* Everything the row passes share. */
typedef struct run {
    const kmv_index *ix;
    const kmv_allocator *a;
    const float *q, *x;
    size_t m, n, d, c;
    float inv2s2, inv_s2, kappa;
    const kmv__xsplit *xs;
    const kmv__sketch *sk;
    /* per row */
    double *yh;        /* m x c heavy sums */
    double *w;         /* sketch estimate of W_i */
    uint32_t **hid;    /* heavy ids, ascending */
    uint32_t *hlen;
    uint32_t **blocks; /* per block allocation behind hid */
    size_t *order;     /* rows in the order pass 1 takes them */
    size_t *s;         /* samples; n means an exact row */
    double *var;       /* window variance */
    /* pass 1 accounting */
    uint64_t steps, cands, heavy_pairs;
    double cost_cap, cost_spent;
    int abort, nomem;
    int nt;
    int causal;        /* row i sees key ids <= i */
} run;

/* The last key id row i may see. */
static uint32_t row_limit(const run *r, size_t i) {
    return r->causal && i < UINT32_MAX ? (uint32_t)i : UINT32_MAX;
}

static void scratch_free(const kmv_allocator *a, tscratch *t) {
    kmv__free(a, t->stamp);
    kmv__free(a, t->cand.p);
    kmv__free(a, t->dist.p);
    kmv__free(a, t->heavy.p);
    kmv__free(a, t->codes);
    kmv__free(a, t->bkt);
    kmv__free(a, t->blen);
    kmv__free(a, t->proj);
    kmv__free(a, t->qblk);
    kmv__free(a, t->chunk);
    kmv__free(a, t->acc);
    kmv__free(a, t->est);
    kmv__free(a, t->skd);
    memset(t, 0, sizeof *t);
}

static int scratch_init(const run *r, tscratch *t) {
    const kmv_allocator *a = r->a;
    const kmv__lsh_shape *sh = &r->ix->lsh.shape;
    memset(t, 0, sizeof *t);
    t->stamp = kmv__malloc_array(a, r->n, sizeof(uint32_t));
    t->codes = kmv__malloc_array(a, QB * (size_t)sh->L, sizeof(uint64_t));
    t->bkt = kmv__malloc_array(a, QB * (size_t)sh->L, sizeof(uint32_t *));
    t->blen = kmv__malloc_array(a, QB * (size_t)sh->L, sizeof(uint32_t));
    t->proj = kmv__malloc_array(a, QB * (size_t)sh->L * (size_t)sh->k, sizeof(float));
    t->qblk = kmv__malloc_array(a, QB, r->d * sizeof(float));
    t->chunk = kmv__malloc_array(a, 256, sizeof(float));
    t->acc = kmv__malloc_array(a, 2 * r->c, sizeof(double));
    t->est = kmv__malloc_array(a, r->c, sizeof(double));
    t->skd = kmv__malloc_array(a, r->sk->r ? r->sk->r : 1, sizeof(float));
    if (!t->stamp || !t->codes || !t->bkt || !t->blen || !t->proj || !t->qblk || !t->chunk ||
        !t->acc || !t->est || !t->skd) {
        scratch_free(a, t);
        return 0;
    }
    memset(t->stamp, 0, r->n * sizeof(uint32_t));
    return 1;
}

static void single_threaded_blas(void) {
#ifdef _OPENMP
    /* OpenBLAS's OpenMP build sizes its team from this; one thread each
     * inside our own parallel loops (see exact.c). */
    omp_set_num_threads(1);
#endif
}

/* Pass 1 for rows rows[0 .. bi - 1]: candidates from the LSH buckets, their
 * exact kernel values, the heavy sums and lists, and the sketch estimate.
 * Returns the block's predicted cost, or -1 on allocation failure. */
static double heavy_block(run *r, tscratch *t, const size_t *rows, size_t bi, size_t blk) {
    const kmv_index *ix = r->ix;
    const kmv__lsh *h = &ix->lsh;
    const kmv__keystore *ks = &ix->ks;
    size_t d = r->d, c = r->c;
    int L = h->shape.L;
    for (size_t ii = 0; ii < bi; ii++)
        memcpy(t->qblk + ii * d, r->q + rows[ii] * d, d * sizeof(float));
    kmv__lsh_codes(h, t->qblk, bi, L, t->proj, t->codes);
    /* All the block's lookups in three sweeps, so that their cache misses
     * overlap instead of queueing: slots, then buckets, then ids. */
    size_t nl = bi * (size_t)L;
    for (size_t u = 0; u < nl; u++) kmv__lsh_prefetch(h, (int)(u % (size_t)L), t->codes[u]);
    for (size_t u = 0; u < nl; u++) {
        size_t len;
        t->bkt[u] = kmv__lsh_bucket(h, (int)(u % (size_t)L), t->codes[u], &len);
        t->blen[u] = (uint32_t)len;
        if (len) __builtin_prefetch(t->bkt[u]);
    }
    size_t nheavy = 0;
    uint64_t steps = 0, cands = 0;
    for (size_t ii = 0; ii < bi; ii++) {
        size_t i = rows[ii];
        const float *qi = r->q + i * d;
        uint32_t lim = row_limit(r, i);
        if (++t->cur == 0) { /* wrapped: forget every stamp */
            memset(t->stamp, 0, r->n * sizeof(uint32_t));
            t->cur = 1;
        }
        size_t nc = 0;
        for (int tb = 0; tb < L; tb++) {
            size_t len = t->blen[ii * (size_t)L + (size_t)tb];
            const uint32_t *ids = t->bkt[ii * (size_t)L + (size_t)tb];
            steps += len;
            if (!reserve(r->a, &t->cand, nc + len, sizeof(uint32_t))) return -1.0;
            uint32_t *cand = t->cand.p;
            for (size_t u = 0; u < len; u++) {
                uint32_t id = ids[u];
                if (t->stamp[id] == t->cur || id > lim) continue;
                t->stamp[id] = t->cur;
                cand[nc++] = id;
            }
        }
        cands += nc;
        if (!reserve(r->a, &t->dist, nc, sizeof(float))) return -1.0;
        uint32_t *cid = t->cand.p;
        float *kv = t->dist.p;
        /* The rows are scattered: ask for them all before using any. */
        for (size_t u = 0; u < nc; u++) {
            const char *row = (const char *)kmv__keystore_row(ks, cid[u]);
            for (size_t b = 0; b < d * sizeof(float); b += 64) __builtin_prefetch(row + b);
        }
        for (size_t u = 0; u < nc; u++) kv[u] = kmv__sqdist(qi, kmv__keystore_row(ks, cid[u]), d);
        if (nc) kmv__gauss_row_dist(kv, nc, r->inv2s2, NULL);
        double *yh = r->yh + i * c;
        for (size_t col = 0; col < c; col++) yh[col] = 0.0;
        size_t first = nheavy;
        for (size_t u = 0; u < nc; u++) {
            if (kv[u] < r->kappa) continue;
            if (!reserve(r->a, &t->heavy, nheavy + 1, sizeof(uint32_t))) return -1.0;
            ((uint32_t *)t->heavy.p)[nheavy++] = cid[u];
            const float *xr = r->xs->xp + (size_t)ks->pos_of[cid[u]] * c;
            for (size_t col = 0; col < c; col++) yh[col] += (double)kv[u] * xr[col];
        }
        /* No heavy key yet leaves heavy.p NULL, and NULL + 0 is undefined. */
        uint32_t *hl = nheavy > first ? (uint32_t *)t->heavy.p + first : NULL;
        r->hlen[i] = (uint32_t)(nheavy - first);
        if (hl != NULL) qsort(hl, nheavy - first, sizeof(uint32_t), kmv__cmp_u32);
        /* The sketch: exp(-||q-k||^2 / sigma^2) is K^2. Heavy keys the LSH
         * found are summed exactly, so they leave W_i; missed ones stay. */
        double wi = 0.0;
        if (r->sk->r) {
            kmv__sqdist_rows(qi, r->sk->rows, r->sk->r, d, t->skd);
            kmv__gauss_row_dist(t->skd, r->sk->r, r->inv_s2, NULL);
            float k2 = r->kappa * r->kappa;
            for (size_t u = 0; u < r->sk->r; u++) {
                if (t->skd[u] >= k2 && kmv__contains(hl, r->hlen[i], r->sk->ids[u])) continue;
                wi += t->skd[u];
            }
            wi *= r->sk->scale;
        }
        r->w[i] = wi;
    }
    /* Keep the block's heavy lists. */
    uint32_t *keep = NULL;
    if (nheavy) {
        keep = kmv__malloc_array(r->a, nheavy, sizeof(uint32_t));
        if (keep == NULL) return -1.0;
        memcpy(keep, t->heavy.p, nheavy * sizeof(uint32_t));
    }
    r->blocks[blk] = keep;
    size_t off = 0;
    for (size_t ii = 0; ii < bi; ii++) {
        r->hid[rows[ii]] = keep ? keep + off : NULL;
        off += r->hlen[rows[ii]];
    }
#pragma omp atomic
    r->steps += steps;
#pragma omp atomic
    r->cands += cands;
#pragma omp atomic
    r->heavy_pairs += nheavy;
    return kmv__cost_hash(&h->shape, (double)d) * (double)bi + KMV__COST_STEP * (double)steps +
           kmv__cost_cand((double)d) * (double)cands +
           kmv__cost_window((double)d) * (double)r->sk->r * (double)bi;
}

typedef struct keyed {
    uint64_t code;
    size_t row;
} keyed;

static int cmp_keyed(const void *pa, const void *pb) {
    const keyed *a = pa, *b = pb;
    if (a->code != b->code) return a->code < b->code ? -1 : 1;
    return (a->row > b->row) - (a->row < b->row);
}

/* Rows sorted by their first table's bucket: queries sharing buckets then
 * share blocks, and their buckets and candidate rows are still in cache
 * when the next one asks. Results do not depend on the order. */
static int order_rows(run *r) {
    const kmv__lsh *h = &r->ix->lsh;
    size_t m = r->m, chunk = 1024;
    keyed *kd = kmv__malloc_array(r->a, m, sizeof(keyed));
    float *proj = kmv__malloc_array(r->a, chunk, (size_t)h->shape.k * sizeof(float));
    uint64_t *codes = kmv__malloc_array(r->a, chunk, sizeof(uint64_t));
    r->order = kmv__malloc_array(r->a, m, sizeof(size_t));
    int ok = kd && proj && codes && r->order;
    for (size_t i0 = 0; ok && i0 < m; i0 += chunk) {
        size_t bi = m - i0 < chunk ? m - i0 : chunk;
        kmv__lsh_codes(h, r->q + i0 * r->d, bi, 1, proj, codes);
        for (size_t u = 0; u < bi; u++) kd[i0 + u] = (keyed){codes[u], i0 + u};
    }
    if (ok) {
        qsort(kd, m, sizeof(keyed), cmp_keyed);
        for (size_t i = 0; i < m; i++) r->order[i] = kd[i].row;
    }
    kmv__free(r->a, kd);
    kmv__free(r->a, proj);
    kmv__free(r->a, codes);
    return ok ? KMV_OK : KMV_ENOMEM;
}

static int pass_heavy(run *r) {
    size_t nblk = (r->m + QB - 1) / QB;
    if (order_rows(r) != KMV_OK) return KMV_ENOMEM;
#pragma omp parallel num_threads(r->nt)
    {
        single_threaded_blas();
        tscratch t;
        int ok = scratch_init(r, &t);
        if (!ok) {
#pragma omp atomic write
            r->nomem = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (size_t b = 0; b < nblk; b++) {
            int stop;
#pragma omp atomic read
            stop = r->abort;
            if (stop || !ok) continue;
            size_t i0 = b * QB, bi = r->m - i0 < QB ? r->m - i0 : QB;
            double cost = heavy_block(r, &t, r->order + i0, bi, b);
            if (cost < 0.0) {
#pragma omp atomic write
                r->nomem = 1;
#pragma omp atomic write
                r->abort = 1;
                continue;
            }
            double spent;
#pragma omp atomic capture
            spent = r->cost_spent += cost;
            /* The total is the same whatever the order blocks finish in, so
             * whether it crosses the cap is too: aborting is deterministic. */
            if (spent > r->cost_cap) {
#pragma omp atomic write
                r->abort = 1;
            }
        }
        scratch_free(r->a, &t);
    }
    return r->nomem ? KMV_ENOMEM : KMV_OK;
}

/* Pass 2's scratch, one slice per thread, taken before any row writes y:
 * a failure then leaves y untouched. */
typedef struct sample_scratch {
    float *chunk;  /* nt x 256 */
    double *acc;   /* nt x stride: acc (2c) and est (c) */
    size_t stride; /* 3c rounded up to a cache line, so threads never
                      share one (acc is written in the window's inner loop) */
} sample_scratch;

static int sample_scratch_init(const run *r, sample_scratch *sc) {
    sc->stride = (3 * r->c + 7) / 8 * 8;
    sc->chunk = kmv__malloc_array(r->a, (size_t)r->nt * 256, sizeof(float));
    sc->acc = kmv__malloc_array(r->a, (size_t)r->nt * sc->stride, sizeof(double));
    return sc->chunk != NULL && sc->acc != NULL;
}

static void sample_scratch_free(const kmv_allocator *a, sample_scratch *sc) {
    kmv__free(a, sc->chunk);
    kmv__free(a, sc->acc);
}

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* sum over key ids 0 .. count - 1 of K(q, k_j) x_j, with the caller's x. */
static void prefix_row(const run *r, const float *q, size_t count, double *est) {
    const kmv__keystore *ks = &r->ix->ks;
    for (size_t col = 0; col < r->c; col++) est[col] = 0.0;
    for (size_t j = 0; j < count; j++) {
        float kv = kmv__sqdist(q, kmv__keystore_row(ks, j), r->d);
        kmv__gauss_row_dist(&kv, 1, r->inv2s2, NULL);
        for (size_t col = 0; col < r->c; col++) est[col] += (double)kv * r->x[j * r->c + col];
    }
}

/* Pass 2 for the rows with redo[i] (all rows when redo is NULL): windows or
 * exact rows, plus the exactly summed columns H1; writes y and var. */
static void pass_sample(run *r, const sample_scratch *sc, float *y, const unsigned char *redo,
                        int round) {
    const kmv__keystore *ks = &r->ix->ks;
    size_t c = r->c, d = r->d;
    uint64_t seed = r->ix->params.seed;
#pragma omp parallel num_threads(r->nt)
    {
        size_t tid = (size_t)thread_id();
        float *chunk = sc->chunk + tid * 256;
        double *acc = sc->acc + tid * sc->stride, *est = acc + 2 * c;
#pragma omp for schedule(dynamic, QB)
        for (size_t i = 0; i < r->m; i++) {
            if (redo != NULL && !redo[i]) continue;
            const float *qi = r->q + i * d;
            uint32_t lim = row_limit(r, i);
            kmv__keymask mask = {lim, NULL, 0.0};
            const kmv__keymask *mk = r->causal ? &mask : NULL;
            double v;
            if (r->causal && (size_t)lim < r->n && (r->s[i] >= r->n || (size_t)lim < r->s[i])) {
                /* A causal row that sees fewer keys than its budget: its
                 * visible keys, exactly, with the caller's x (H1 included). */
                prefix_row(r, qi, (size_t)lim + 1, est);
                v = 0.0;
                r->var[i] = v;
                for (size_t col = 0; col < c; col++) y[i * c + col] = (float)est[col];
                continue;
            }
            if (r->s[i] >= r->n) {
                v = kmv__window(ks, r->xs->xp, c, qi, r->inv2s2, 0.0f, r->kappa, NULL, 0, mk, 0, r->n,
                                chunk, acc, est);
            } else {
                size_t off = kmv__window_offset(seed, KMV__RNG_WINDOW, i, round, r->n);
                v = kmv__window(ks, r->xs->xp, c, qi, r->inv2s2, 0.0f, r->kappa, r->hid[i], r->hlen[i],
                                mk, off, r->s[i], chunk, acc, est);
                for (size_t col = 0; col < c; col++) est[col] += r->yh[i * c + col];
            }
            r->var[i] = v;
            /* H1: few keys, summed directly with the caller's x. */
            for (size_t u = 0; u < r->xs->n_h1; u++) {
                uint32_t j = r->xs->h1[u];
                if (j > lim) break; /* h1 is ascending */
                float kv = kmv__sqdist(qi, kmv__keystore_row(ks, j), d);
                kmv__gauss_row_dist(&kv, 1, r->inv2s2, NULL);
                for (size_t col = 0; col < c; col++) est[col] += (double)kv * r->x[(size_t)j * c + col];
            }
            for (size_t col = 0; col < c; col++) y[i * c + col] = (float)est[col];
        }
    }
}

/* Sample counts for budget Bs^2 (see the top of this file) from the
 * per-row densities w; rows whose count would pass half the keys become
 * exact rows (s = n). Returns the total samples, exact rows counted as n. */
static double allocate(const run *r, const double *w, double bs2, double delta_s, size_t s_min,
                       size_t *s) {
    double n = (double)r->n, S = 0.0, G = 0.0;
    for (size_t i = 0; i < r->m; i++) {
        S += sqrt(n * w[i]);
        G += n * w[i];
    }
    double V = 0.0;
    if (S > 0.0) V = bs2 / (1.0 + sqrt(2.0 * (G / (S * S)) / delta_s));
    double total = 0.0;
    for (size_t i = 0; i < r->m; i++) {
        double want = (double)s_min;
        if (S > 0.0 && w[i] > 0.0) {
            /* V <= 0 (no budget left) asks for the impossible: exact rows. */
            want = V > 0.0 ? ceil(sqrt(n * w[i]) * S / V) : n;
            if (want < (double)s_min) want = (double)s_min;
        }
        size_t si = want >= 0.5 * n ? r->n : (size_t)want;
        s[i] = si;
        total += (double)si;
    }
    return total;
}

int kmv__index_ensure_lsh(kmv_index *ix, const float *q, size_t m, double kappa, double miss,
                          double cap, double keys_per_query) {
    size_t n = ix->ks.n;
    if (ix->lsh_built && kappa >= 0.5 * ix->kappa && n <= 2 * ix->lsh_n) return KMV_OK;
    double r_near = ix->params.sigma * sqrt(2.0 * log(1.0 / kappa));
    kmv__lsh_plan plan;
    int rc = kmv__lsh_choose(&ix->alloc, &ix->ks, q, m, r_near, miss, keys_per_query,
                             ix->params.seed, &plan);
    if (rc != KMV_OK) return rc;
    if (plan.cost_per_query * (double)m > cap) return 1;
    if (ix->lsh_built) {
        kmv__lsh_free(&ix->lsh, &ix->alloc);
        ix->lsh_built = 0;
    }
    rc = kmv__index_fill_lsh(ix, plan.shape);
    if (rc != KMV_OK) return rc;
    ix->table_builds++;
    ix->keys_hashed += n;
    ix->table_inserts += (uint64_t)n * (uint64_t)plan.shape.L;
    ix->lsh_n = n;
    ix->kappa = kappa;
    ix->plan = plan;
    return KMV_OK;
}

int kmv__index_fill_lsh(kmv_index *ix, kmv__lsh_shape shape) {
    size_t n = ix->ks.n, d = ix->d;
    int rc = kmv__lsh_init(&ix->lsh, &ix->alloc, d, shape, ix->params.seed);
    if (rc != KMV_OK) return rc;
    /* Keys go in by id, in blocks gathered from the random order. */
    float *blk = kmv__malloc_array(&ix->alloc, n < BUILD_BLOCK ? n : BUILD_BLOCK, d * sizeof(float));
    if (blk == NULL) rc = KMV_ENOMEM;
    for (size_t j0 = 0; rc == KMV_OK && j0 < n; j0 += BUILD_BLOCK) {
        size_t bj = n - j0 < BUILD_BLOCK ? n - j0 : BUILD_BLOCK;
        for (size_t u = 0; u < bj; u++)
            memcpy(blk + u * d, kmv__keystore_row(&ix->ks, j0 + u), d * sizeof(float));
        rc = kmv__lsh_append(&ix->lsh, &ix->alloc, blk, bj, kmv__threads(&ix->params));
    }
    kmv__free(&ix->alloc, blk);
    if (rc != KMV_OK) {
        kmv__lsh_free(&ix->lsh, &ix->alloc);
        return rc;
    }
    ix->lsh_built = 1;
    return KMV_OK;
}

double kmv__heavy_threshold(const kmv__params *pa, size_t n, size_t m) {
    double h = pow((double)n, pa->gamma);
    if (h > WEIGHT_RATIO) h = WEIGHT_RATIO;
    if (h < 1.0) h = 1.0;
    double kappa = pow((double)n, -pa->alpha);
    double kb = pa->eps * sqrt((double)pa->min_samples / (16.0 * (double)m * h));
    if (kb < kappa) kappa = kb;
    /* kappa >= 2^-60 keeps r_near finite and the tables meaningful. */
    return kappa < 0x1p-60 ? 0x1p-60 : kappa;
}

double kmv__h1_ratio(const kmv__params *pa, size_t n, size_t m, double kappa) {
    /* H1 at n^gamma, or lower where kappa's bound needs. */
    double hi = pa->eps * pa->eps * (double)pa->min_samples / (16.0 * (double)m * kappa * kappa);
    if (hi > pow((double)n, pa->gamma)) hi = pow((double)n, pa->gamma);
    return hi < 1.0 ? 1.0 : hi;
}

/* The exact engine over the store's order, with x permuted to match; for
 * a causal product, over the keys gathered back into id order. */
static int exact_product(const kmv_index *ix, const float *q, size_t m, const float *x, size_t c,
                         float *y, int nt, int *threads) {
    const kmv__keystore *ks = &ix->ks;
    int causal = ix->params.causal;
    size_t n = ks->n, d = ix->d;
    float *buf = causal ? kmv__malloc_array(&ix->alloc, n, d * sizeof(float))
                        : kmv__malloc_array(&ix->alloc, n, c * sizeof(float));
    if (buf == NULL) return KMV_ENOMEM;
    kmv__problem pr = {q, ks->rows, buf, y, m, n, d, c, 0, nt, NULL, NULL};
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

/* Kernel entries the product needs: m n, or under causal masking the
 * min(i + 1, n) keys each row i sees. */
static double visible_entries(const kmv_index *ix, size_t m) {
    double n = (double)ix->ks.n, mm = (double)m;
    if (!ix->params.causal) return mm * n;
    double tri = mm < n ? mm : n;
    return tri * (tri + 1.0) / 2.0 + (mm - tri) * n;
}

/* The exact engine in place of the plan; S keeps what planning found. */
static int run_fallback(const kmv_index *ix, const float *q, size_t m, const float *x, size_t c,
                        float *y, kmv__stats *S) {
    double tk = kmv__now();
    int threads = 1;
    int rc = exact_product(ix, q, m, x, c, y, kmv__threads(&ix->params), &threads);
    S->seconds_kernel = kmv__now() - tk;
    if (rc != KMV_OK) return rc;
    S->mode = KMV_MODE_FALLBACK;
    S->n_threads = threads;
    S->kernel_evals = (uint64_t)(visible_entries(ix, m) + 0.5);
    S->error_estimate = 0.0;
    return KMV_OK;
}

static void progress(const kmv__params *p, double f) {
    if (p->progress != NULL) p->progress(p->progress_opaque, f);
}

/* The stats every product starts from, approximate or fallback. */
static kmv__stats stats_start(const kmv_index *ix, size_t m, size_t c) {
    kmv__stats S;
    memset(&S, 0, sizeof S);
    S.mode = KMV_MODE_APPROX;
    S.n_keys = ix->ks.n;
    S.n_queries = m;
    S.dim = ix->d;
    S.n_cols = c;
    S.error_bound = ix->params.eps;
    S.error_measured = -1.0;
    S.n_threads = kmv__threads(&ix->params);
    return S;
}

int kmv__approx_fallback(const kmv_index *ix, const float *q, size_t m, const float *x, size_t c,
                         float *y, int reason, kmv__stats *st) {
    double t0 = kmv__now();
    kmv__stats S = stats_start(ix, m, c);
    if (ix->params.measure_error) S.error_measured = 0.0;
    S.fallback_reason = reason;
    int rc = run_fallback(ix, q, m, x, c, y, &S);
    if (rc != KMV_OK) return rc;
    progress(&ix->params, 1.0);
    S.seconds = kmv__now() - t0;
    if (st != NULL) *st = S;
    return KMV_OK;
}

int kmv__approx_matvec(kmv_index *ix, const float *q, size_t m, const float *x, size_t c,
                       float *y, kmv__stats *st) {
    double t0 = kmv__now();
    const kmv__params *pa = &ix->params;
    const kmv_allocator *a = &ix->alloc;
    size_t n = ix->ks.n, d = ix->d;
    kmv__stats S = stats_start(ix, m, c);
    int nt = S.n_threads;
    /* Everything that can fail is taken before the first write to y, so a
     * failed call leaves y as it was: the measurement's exact product runs
     * first, and the sampling pass's scratch is taken ahead of it. */
    float *ye = NULL;
    sample_scratch sc = {NULL, NULL, 0};
    double *w2 = NULL;
    size_t *s2 = NULL;
    unsigned char *redo = NULL;
    if (m == 0 || c == 0) goto done;
    if (pa->measure_error && n > 0) {
        double tm = kmv__now();
        ye = kmv__malloc_array(a, m, c * sizeof(float));
        if (ye == NULL) return KMV_ENOMEM;
        int threads;
        int rc2 = exact_product(ix, q, m, x, c, ye, nt, &threads);
        if (rc2 != KMV_OK) {
            kmv__free(a, ye);
            return rc2;
        }
        S.seconds_measure = kmv__now() - tm;
    }
    if (n == 0) {
        memset(y, 0, m * c * sizeof(float));
        if (pa->measure_error) S.error_measured = 0.0; /* an empty sum is exact */
        goto done;
    }

    int rc = KMV_OK;
    double exact_cost = visible_entries(ix, m) * kmv__cost_exact((double)d) *
                        (1.0 + 0.03 * (double)(c - 1));
    /* Half the failure probability for sampling, half for LSH misses. */
    double delta_s = 0.5 * pa->delta;
    double miss = delta_s;
    size_t s_min = (size_t)pa->min_samples;
    kmv__xsplit xs;
    kmv__sketch sk;
    memset(&xs, 0, sizeof xs);
    kmv__sketch_init(&sk, pa->eps);
    run r;
    memset(&r, 0, sizeof r);
    r.causal = pa->causal;

    /* Too small to gain: fewer keys than a few windows. */
    if (!ix->force_approx && (n < 4 * s_min || (double)m * (double)n < KMV__APPROX_MIN_ENTRIES)) {
        S.fallback_reason = KMV_FALLBACK_SMALL;
        goto fallback;
    }
    /* On inputs where the exact engine would take its double-precision
     * path, the product to beat costs about twice as much. */
    int wide = 0;
    rc = kmv__exact_gauss_wide(a, q, m, ix->ks.rows, n, d, pa->sigma, &wide);
    if (rc != KMV_OK) goto fail;
    if (wide) exact_cost *= KMV__COST_WIDE;
    double kappa = kmv__heavy_threshold(pa, n, m);

    double tl = kmv__now();
    rc = kmv__index_ensure_lsh(ix, q, m, kappa, miss,
                               ix->force_approx ? INFINITY : 0.25 * exact_cost,
                               (double)n / (double)m);
    S.seconds_lsh = kmv__now() - tl;
    if (rc == 1) {
        S.fallback_reason = KMV_FALLBACK_LSH;
        goto fallback;
    }
    if (rc != KMV_OK) goto fail;
    kappa = ix->kappa; /* tables planned for a finer threshold serve too */
    S.heavy_threshold = kappa;
    S.lsh_tables = ix->lsh.shape.L;
    S.lsh_hash_len = ix->lsh.shape.k;
    S.lsh_width = ix->lsh.shape.w;

    rc = kmv__xsplit_run(&xs, a, &ix->ks, x, c, kmv__h1_ratio(pa, n, m, kappa));
    if (rc != KMV_OK) goto fail;
    S.keys_exact = xs.n_h1;
    S.keys_dropped = xs.n_drop;
    S.keys_sampled = xs.n_t;
    if (xs.nx2 <= 0.0) { /* x = 0 */
        memset(y, 0, m * c * sizeof(float));
        goto cleanup;
    }
    double bound = pa->eps * sqrt(xs.nx2);
    double bs = bound - sqrt((double)m) * xs.drop_l1;
    if (bs <= 0.0) {
        S.fallback_reason = KMV_FALLBACK_BUDGET;
        goto fallback_free;
    }
    double col_cost = (double)xs.n_h1 * (double)m * kmv__cost_cand((double)d);
    if (col_cost > 0.25 * exact_cost && !ix->force_approx) {
        S.fallback_reason = KMV_FALLBACK_COLUMNS;
        goto fallback_free;
    }

    /* The sketch, grown from T's keys in the store's order. */
    for (size_t p = 0; p < n && rc == KMV_OK; p++)
        if (xs.wp[p] > 0.0) rc = kmv__sketch_add(&sk, a, ix->ks.id_at[p], xs.wp[p]);
    if (rc == KMV_OK) rc = kmv__sketch_draw(&sk, a, &ix->ks, (size_t)pa->sketch_size, pa->seed, INFINITY);
    if (rc != KMV_OK) goto fail;

    r.ix = ix;
    r.a = a;
    r.q = q;
    r.x = x;
    r.m = m;
    r.n = n;
    r.d = d;
    r.c = c;
    r.inv2s2 = (float)(0.5 / (pa->sigma * pa->sigma));
    r.inv_s2 = (float)(1.0 / (pa->sigma * pa->sigma));
    r.kappa = (float)kappa;
    r.xs = &xs;
    r.sk = &sk;
    r.nt = nt;
    size_t nblk = (m + QB - 1) / QB;
    r.yh = kmv__malloc_array(a, m, c * sizeof(double));
    r.w = kmv__malloc_array(a, m, sizeof(double));
    r.hid = kmv__malloc_array(a, m, sizeof(uint32_t *));
    r.hlen = kmv__malloc_array(a, m, sizeof(uint32_t));
    r.blocks = kmv__malloc_array(a, nblk, sizeof(uint32_t *));
    if (r.blocks != NULL) memset(r.blocks, 0, nblk * sizeof(uint32_t *));
    r.s = kmv__malloc_array(a, m, sizeof(size_t));
    r.var = kmv__malloc_array(a, m, sizeof(double));
    if (!r.yh || !r.w || !r.hid || !r.hlen || !r.blocks || !r.s || !r.var) {
        rc = KMV_ENOMEM;
        goto fail;
    }
    r.cost_cap = ix->force_approx ? INFINITY : 0.25 * exact_cost - col_cost;
    progress(pa, 0.05);

    double th = kmv__now();
    rc = pass_heavy(&r);
    S.seconds_heavy = kmv__now() - th;
    S.lsh_steps = r.steps;
    S.lsh_candidates = r.cands;
    S.heavy_pairs = r.heavy_pairs;
    S.sketch_evals = (uint64_t)sk.r * m;
    if (rc != KMV_OK) goto fail;
    if (r.abort) {
        S.fallback_reason = KMV_FALLBACK_HEAVY;
        goto fallback_free;
    }
    progress(pa, 0.4);

    /* Budgets, and whether sampling them beats the exact product. */
    double samples = allocate(&r, r.w, bs * bs, delta_s, s_min, r.s);
    double win = kmv__cost_window((double)d) * (1.0 + 0.1 * (double)(c - 1));
    double spent = r.cost_spent + col_cost;
    S.cost_ratio = (spent + samples * win) / exact_cost;
    if (spent + samples * win > exact_cost && !ix->force_approx) {
        S.fallback_reason = KMV_FALLBACK_SAMPLES;
        goto fallback_free;
    }
    double ts = kmv__now();
    w2 = kmv__malloc_array(a, m, sizeof(double));
    s2 = kmv__malloc_array(a, m, sizeof(size_t));
    redo = kmv__malloc_array(a, m, 1);
    if (!sample_scratch_init(&r, &sc) || !w2 || !s2 || !redo) {
        rc = KMV_ENOMEM;
        goto fail;
    }
    pass_sample(&r, &sc, y, NULL, 0);
    progress(pa, 0.85);

    /* The after-the-fact check: the samples' own variance against the
     * plan. Rows that showed more than planned get fresh windows sized from
     * what they showed (their first estimate is discarded, so the new one
     * stays unbiased), when that still costs less than the exact product. */
    double V = 0.0, Q = 0.0;
    for (size_t i = 0; i < m; i++) {
        V += r.var[i];
        Q += r.var[i] * r.var[i];
    }
    if (V + sqrt(2.0 * Q / delta_s) > bs * bs) {
        for (size_t i = 0; i < m; i++) {
            double shown = r.s[i] < n ? r.var[i] * (double)r.s[i] / (double)n : 0.0;
            w2[i] = shown > r.w[i] ? shown : r.w[i];
        }
        double more = allocate(&r, w2, bs * bs, delta_s, s_min, s2);
        (void)more;
        double extra = 0.0;
        size_t nredo = 0;
        for (size_t i = 0; i < m; i++) {
            redo[i] = s2[i] > r.s[i];
            if (redo[i]) {
                extra += (double)s2[i];
                nredo++;
            }
        }
        if (nredo && (spent + (samples + extra) * win <= exact_cost || ix->force_approx)) {
            for (size_t i = 0; i < m; i++)
                if (redo[i]) r.s[i] = s2[i];
            pass_sample(&r, &sc, y, redo, 1);
            samples += extra;
            S.rows_resampled = nredo;
        }
        V = 0.0;
        for (size_t i = 0; i < m; i++) V += r.var[i];
    }
    S.seconds_sample = kmv__now() - ts;
    S.samples = 0;
    for (size_t i = 0; i < m; i++) {
        if (r.s[i] >= n) S.rows_exact++;
        else S.samples += r.s[i];
    }
    S.cost_ratio = (spent + samples * win) / exact_cost;
    S.error_estimate = (sqrt(V) + sqrt((double)m) * xs.drop_l1) / sqrt(xs.nx2);
    S.kernel_evals = S.lsh_candidates + S.sketch_evals + S.samples + (uint64_t)S.rows_exact * n +
                     (uint64_t)xs.n_h1 * m;
    goto cleanup;

fallback_free:
    kmv__xsplit_free(&xs, a);
fallback:
    rc = run_fallback(ix, q, m, x, c, y, &S);
    goto cleanup;

fail:
cleanup:
    kmv__xsplit_free(&xs, a);
    kmv__sketch_free(&sk, a);
    if (r.blocks) {
        for (size_t b = 0; b < (m + QB - 1) / QB; b++) kmv__free(a, r.blocks[b]);
    }
    kmv__free(a, r.yh);
    kmv__free(a, r.w);
    kmv__free(a, r.hid);
    kmv__free(a, r.hlen);
    kmv__free(a, r.blocks);
    kmv__free(a, r.order);
    kmv__free(a, r.s);
    kmv__free(a, r.var);
    sample_scratch_free(a, &sc);
    kmv__free(a, w2);
    kmv__free(a, s2);
    kmv__free(a, redo);
    if (rc != KMV_OK) {
        kmv__free(a, ye);
        return rc;
    }

done:
    if (ye != NULL) {
        double e2 = 0.0, x2 = 0.0;
        for (size_t i = 0; i < m * c; i++) e2 += ((double)y[i] - ye[i]) * ((double)y[i] - ye[i]);
        for (size_t i = 0; i < n * c; i++) x2 += (double)x[i] * x[i];
        S.error_measured = x2 > 0.0 ? sqrt(e2 / x2) : sqrt(e2);
        kmv__free(a, ye);
    }
    progress(pa, 1.0);
    S.seconds = kmv__now() - t0;
    if (st != NULL) *st = S;
    return KMV_OK;
}
