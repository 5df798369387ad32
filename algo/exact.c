/* The exact engine.
 *
 * Queries are cut into blocks of up to BQ rows, one block per OpenMP task;
 * each block walks the keys in blocks of BK. A block pair costs one SGEMM for
 * the dot products, then one vectorized exp per entry (kmv/kernel.c), then
 * the product with x: fused into the exp pass when x is a vector, one more
 * SGEMM when it has columns. Nothing larger than BQ x BK is ever held, so
 * memory is O((m + n) d) for the operands plus O(threads * BQ * (BK + c)).
 *
 * Accuracy: each block row sums at most BK terms in float; the running sums
 * across key blocks are kept in double, so the error stays near float
 * rounding of one block however many keys there are. The Gaussian kernel
 * also loses precision in ||q||^2 + ||k||^2 - 2<q,k> when distances are
 * small next to norms; keys are centred, and where the predicted loss still
 * exceeds 4e-6 of a kernel value its dot products are taken in double.
 */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "algo/exact.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/alloc.h"
#include "algo/kernel.h"

/* BQ x BK floats of dot products (128 KiB) stay in a core's L2 while the exp
 * pass and the product with x reread them. Measured by bench/exact_bench. */
enum { BQ = 128, BK = 256 };

/* One thread's working memory. */
typedef struct scratch {
    double *sd;  /* bq x BK: dot products in double (wide Gaussian only) */
    float *s;    /* bq x BK: dot products, then kernel values */
    float *tmp;  /* bq x c: E V for one key block */
    double *acc; /* bq x c: running sums */
    double *l;   /* bq: attention row sums */
    float *mx;   /* bq: attention running row maxima */
} scratch;

typedef struct plan {
    size_t bq;      /* query rows per block */
    size_t nblocks; /* query blocks */
    int nt;         /* threads */
    scratch *w;     /* nt of them */
    void *mem;      /* everything above, one allocation */
} plan;

static int plan_create(const kmv_allocator *a, const kmv__problem *p, int wide, plan *pl) {
    size_t nt = (size_t)p->n_threads;
    /* Small m: shrink blocks so that several threads still get work. The
     * block size depends on m alone, never on the thread count, so that the
     * output is bit-for-bit the same on any number of threads. */
    size_t bq = (p->m + 7) / 8;
    bq = bq > BQ ? BQ : bq;
    bq = bq == 0 ? 1 : bq;
    size_t nblocks = (p->m + bq - 1) / bq;
    if (nt > nblocks) nt = nblocks;

    /* Per thread: s, tmp, mx as floats; acc, l as doubles. Sizes were
     * validated by the caller, so only the per-thread multiples can grow. */
    size_t n_f = bq * BK + bq * p->c + bq;
    size_t n_d = bq * p->c + bq + (wide ? bq * BK : 0);
    /* Slices start on 64-byte boundaries: the doubles stay aligned whatever
     * the float count, and threads never share a cache line. */
    size_t per = (n_d * sizeof(double) + n_f * sizeof(float) + 63) & ~(size_t)63;
    size_t total, head = (nt * sizeof(scratch) + 63) & ~(size_t)63;
    if (!kmv__mul_size(per, nt, &total) || total > SIZE_MAX - head) return KMV_ENOMEM;
    char *mem = kmv__malloc(a, total + head);
    if (mem == NULL) return KMV_ENOMEM;

    pl->bq = bq;
    pl->nblocks = nblocks;
    pl->nt = (int)nt;
    pl->mem = mem;
    pl->w = (scratch *)mem;
    /* Doubles first so that each slice stays 8-byte aligned. */
    for (size_t t = 0; t < nt; t++) {
        scratch *w = &pl->w[t];
        char *cur = mem + head + t * per;
        w->acc = (double *)(void *)cur;
        w->l = w->acc + bq * p->c;
        w->sd = wide ? w->l + bq : NULL;
        w->s = (float *)(void *)(w->l + bq + (wide ? bq * BK : 0));
        w->tmp = w->s + bq * BK;
        w->mx = w->tmp + bq * p->c;
    }
    return KMV_OK;
}

/* The calling thread's scratch. Also keeps BLAS on this thread: OpenBLAS's
 * OpenMP build sizes its own team from omp_get_max_threads(), and a team of
 * one (n_threads = 1) does not count as "in parallel", so it would split a
 * block's GEMM across cores and, with that, change the rounding. Setting the
 * ICV here touches only this implicit task, never the host's setting. */
static scratch *thread_scratch(const plan *pl) {
#ifdef _OPENMP
    omp_set_num_threads(1);
    return &pl->w[omp_get_thread_num()];
#else
    return &pl->w[0];
#endif
}

/* Count one finished query block. The team's first thread, which is the
 * caller's own thread in OpenMP, reports progress, so the caller's hook
 * never runs on a thread it did not create. */
static void block_done(const kmv__problem *p, const plan *pl, size_t *done) {
    size_t now_done;
#pragma omp atomic capture
    now_done = ++*done;
#ifdef _OPENMP
    if (omp_get_thread_num() != 0) return;
#endif
    if (p->progress != NULL) p->progress(p->progress_opaque, (double)now_done / (double)pl->nblocks);
}

/* Keys row gi of a block may see: all of [j0, j0 + bj), or under the causal
 * mask only those up to gi. */
static size_t visible(const kmv__problem *p, size_t gi, size_t j0, size_t bj) {
    if (!p->causal) return bj;
    if (gi < j0) return 0;
    return gi - j0 + 1 < bj ? gi - j0 + 1 : bj;
}

/* S = Q[i0 : i0+bi] K[j0 : j0+bj]^T into s (row stride bj). */
static void dots(const float *q, const float *k, size_t d, size_t bi, size_t bj,
                 float *s) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)bi, (int)bj, (int)d, 1.0f, q,
                (int)d, k, (int)d, 0.0f, s, (int)bj);
}

/* acc += E X[j0 : j0+bj] for the c > 1 case; E's masked entries are zero. */
static void accumulate_cols(const kmv__problem *p, const scratch *w, size_t bi, size_t bj,
                            size_t j0) {
    size_t c = p->c;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)bi, (int)c, (int)bj, 1.0f,
                w->s, (int)bj, p->x + j0 * c, (int)c, 0.0f, w->tmp, (int)c);
    for (size_t i = 0; i < bi * c; i++) w->acc[i] += w->tmp[i];
}

/* Keys that at least one row of [i0, i0 + bi) sees. */
static size_t key_end(const kmv__problem *p, size_t i0, size_t bi) {
    if (!p->causal) return p->n;
    return i0 + bi < p->n ? i0 + bi : p->n;
}

/* The Gaussian operands after centring, in the precision chosen for them. */
typedef struct gauss_ops {
    int wide;              /* dot products in double */
    const float *qf, *kf;  /* centred rows (float path) */
    const double *qd, *kd; /* centred rows (wide path) */
    const double *qn, *kn; /* squared norms of the centred rows */
    float coef;            /* 1 / (2 sigma^2) (float path) */
    double coef_wide;      /* the same in double (wide path) */
} gauss_ops;

/* Scaled squared distances d^2 / (2 sigma^2) of block rows to keys
 * [j0, j0 + bj) into w->s, from dot products in double: only the final
 * exponent is rounded to float (to infinity when huge, whose exp is 0). */
static void wide_distances(const kmv__problem *p, const gauss_ops *g, size_t i0, size_t bi,
                           size_t j0, size_t bj, scratch *w) {
    size_t d = p->d;
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)bi, (int)bj, (int)d, 1.0,
                g->qd + i0 * d, (int)d, g->kd + j0 * d, (int)d, 0.0, w->sd, (int)bj);
    for (size_t r = 0; r < bi; r++) {
        double qn = g->qn[i0 + r];
#pragma omp simd
        for (size_t j = 0; j < bj; j++)
            w->s[r * bj + j] =
                (float)((qn + g->kn[j0 + j] - 2.0 * w->sd[r * bj + j]) * g->coef_wide);
    }
}

static void gauss_block(const kmv__problem *p, const gauss_ops *g, const float *qnf,
                        const float *knf, size_t i0, size_t bi, scratch *w) {
    size_t c = p->c, d = p->d;
    memset(w->acc, 0, bi * c * sizeof(double));
    size_t nend = key_end(p, i0, bi);
    for (size_t j0 = 0; j0 < nend; j0 += BK) {
        size_t bj = nend - j0 < BK ? nend - j0 : BK;
        if (g->wide)
            wide_distances(p, g, i0, bi, j0, bj, w);
        else
            dots(g->qf + i0 * d, g->kf + j0 * d, d, bi, bj, w->s);
        for (size_t r = 0; r < bi; r++) {
            float *row = w->s + r * bj;
            size_t len = visible(p, i0 + r, j0, bj);
            if (c == 1) {
                /* The product with x rides along in the exp pass. */
                if (len == 0) continue;
                if (g->wide)
                    w->acc[r] += kmv__gauss_row_dist(row, len, 1.0f, p->x + j0);
                else
                    w->acc[r] += kmv__gauss_row(row, len, qnf[i0 + r], knf + j0, g->coef,
                                                p->x + j0);
                continue;
            }
            if (g->wide)
                kmv__gauss_row_dist(row, len, 1.0f, NULL);
            else
                kmv__gauss_row_exp(row, len, qnf[i0 + r], knf + j0, g->coef);
            memset(row + len, 0, (bj - len) * sizeof(float));
        }
        if (c > 1) accumulate_cols(p, w, bi, bj, j0);
    }
    for (size_t i = 0; i < bi * c; i++) p->y[i0 * c + i] = (float)w->acc[i];
}

/* Squared norms of rows of v - mean, in double. */
static void centred_norms(const float *v, size_t n, size_t d, const double *mean,
                          double *out) {
    for (size_t i = 0; i < n; i++) {
        double s = 0.0;
        for (size_t t = 0; t < d; t++) {
            double u = (double)v[i * d + t] - mean[t];
            s += u * u;
        }
        out[i] = s;
    }
}

static double max_of(const double *v, size_t n) {
    double m = 0.0;
    for (size_t i = 0; i < n; i++) m = v[i] > m ? v[i] : m;
    return m;
}

/* A float dot product of length d errs by about sqrt(d) 2^-24 ||q|| ||k||,
 * and the squared distance inherits that error twice over; scaled by
 * 1 / (2 sigma^2) it becomes the relative error of the kernel value. When
 * that exceeds 4e-6 (narrow bandwidths on data with large norms), the dot
 * products are taken in double instead: slower GEMM, same exp. The
 * estimate runs about 2x above the errors measured on GloVe, so float
 * results stay well inside the documented 1e-5. The float path also needs
 * its coefficient and squared norms to be ordinary floats; extreme
 * bandwidths or coordinates go wide. max_norm: the largest centred squared
 * query norm plus the largest centred squared key norm. */
static int needs_wide(double coef_wide, double max_norm, size_t d) {
    float coef = (float)coef_wide;
    double predicted = coef_wide * max_norm * sqrt((double)d) * 0x1p-24;
    return predicted > 4e-6 || !(coef > 0.0f && isfinite(coef)) || !(max_norm < 1e30);
}

static void key_mean(const float *k, size_t n, size_t d, double *mean) {
    for (size_t t = 0; t < d; t++) mean[t] = 0.0;
    for (size_t j = 0; j < n; j++)
        for (size_t t = 0; t < d; t++) mean[t] += k[j * d + t];
    for (size_t t = 0; t < d; t++) mean[t] /= (double)n;
}

static double max_centred(const float *v, size_t n, size_t d, const double *mean) {
    double best = 0.0;
    for (size_t i = 0; i < n; i++) {
        double s;
        centred_norms(v + i * d, 1, d, mean, &s);
        best = s > best ? s : best;
    }
    return best;
}

int kmv__exact_gauss_wide(const kmv_allocator *a, const float *q, size_t m, const float *k,
                          size_t n, size_t d, double sigma, int *wide) {
    double *mean = kmv__malloc_array(a, d, sizeof(double));
    if (mean == NULL) return KMV_ENOMEM;
    key_mean(k, n, d, mean);
    double max_norm = max_centred(q, m, d, mean) + max_centred(k, n, d, mean);
    *wide = needs_wide(1.0 / (2.0 * sigma * sigma), max_norm, d);
    kmv__free(a, mean);
    return KMV_OK;
}

int kmv__exact_gauss(const kmv_allocator *a, const kmv__problem *p, double sigma, int *wide,
                     int *threads) {
    size_t m = p->m, n = p->n, d = p->d;
    gauss_ops g = {0};
    g.coef_wide = 1.0 / (2.0 * sigma * sigma);
    g.coef = (float)g.coef_wide;

    /* Key mean and centred norms in double, before choosing a precision. */
    double *nd = kmv__malloc_array(a, m + n + d, sizeof(double));
    if (nd == NULL) return KMV_ENOMEM;
    double *qn = nd, *kn = nd + m, *mean = nd + m + n;
    key_mean(p->k, n, d, mean);
    centred_norms(p->q, m, d, mean, qn);
    centred_norms(p->k, n, d, mean, kn);
    g.qn = qn;
    g.kn = kn;

    g.wide = needs_wide(g.coef_wide, max_of(qn, m) + max_of(kn, n), d);
    *wide = g.wide;

    plan pl;
    int rc = plan_create(a, p, g.wide, &pl);
    size_t elem = g.wide ? sizeof(double) : sizeof(float);
    /* Centred rows, then (float path) float copies of the norms. */
    char *rows = rc == KMV_OK ? kmv__malloc_array(a, (m + n) * d + (g.wide ? 0 : m + n), elem)
                              : NULL;
    if (rows == NULL) {
        if (rc == KMV_OK) kmv__free(a, pl.mem);
        kmv__free(a, nd);
        return KMV_ENOMEM;
    }
    float *qnf = NULL, *knf = NULL;
    if (g.wide) {
        double *qd = (double *)(void *)rows, *kd = qd + m * d;
        for (size_t i = 0; i < m; i++)
            for (size_t t = 0; t < d; t++) qd[i * d + t] = (double)p->q[i * d + t] - mean[t];
        for (size_t j = 0; j < n; j++)
            for (size_t t = 0; t < d; t++) kd[j * d + t] = (double)p->k[j * d + t] - mean[t];
        g.qd = qd;
        g.kd = kd;
    } else {
        float *qf = (float *)(void *)rows, *kf = qf + m * d;
        for (size_t i = 0; i < m; i++)
            for (size_t t = 0; t < d; t++) qf[i * d + t] = (float)(p->q[i * d + t] - mean[t]);
        for (size_t j = 0; j < n; j++)
            for (size_t t = 0; t < d; t++) kf[j * d + t] = (float)(p->k[j * d + t] - mean[t]);
        qnf = kf + n * d;
        knf = qnf + m;
        for (size_t i = 0; i < m; i++) qnf[i] = (float)qn[i];
        for (size_t j = 0; j < n; j++) knf[j] = (float)kn[j];
        g.qf = qf;
        g.kf = kf;
    }

    long nb = (long)pl.nblocks;
    size_t done = 0;
#pragma omp parallel for num_threads(pl.nt) schedule(dynamic, 1)
    for (long b = 0; b < nb; b++) {
        size_t i0 = (size_t)b * pl.bq;
        size_t bi = m - i0 < pl.bq ? m - i0 : pl.bq;
        gauss_block(p, &g, qnf, knf, i0, bi, thread_scratch(&pl));
        block_done(p, &pl, &done);
    }
    kmv__free(a, rows);
    kmv__free(a, nd);
    kmv__free(a, pl.mem);
    *threads = pl.nt;
    return KMV_OK;
}

static void attn_block(const kmv__problem *p, float scale, size_t i0, size_t bi, scratch *w) {
    size_t c = p->c, d = p->d;
    memset(w->acc, 0, bi * c * sizeof(double));
    for (size_t r = 0; r < bi; r++) {
        w->l[r] = 0.0;
        w->mx[r] = -INFINITY;
    }
    size_t nend = key_end(p, i0, bi);
    for (size_t j0 = 0; j0 < nend; j0 += BK) {
        size_t bj = nend - j0 < BK ? nend - j0 : BK;
        dots(p->q + i0 * d, p->k + j0 * d, d, bi, bj, w->s);
        for (size_t r = 0; r < bi; r++) {
            float *row = w->s + r * bj;
            double *acc = w->acc + r * c;
            size_t len = visible(p, i0 + r, j0, bj);
            if (len == 0) {
                memset(row, 0, bj * sizeof(float));
                continue;
            }
            /* scale > 0, so the largest logit is scale times the largest dot. */
            float bm = kmv__row_max(row, len) * scale;
            if (bm > w->mx[r]) {
                double f = exp((double)w->mx[r] - (double)bm);
                w->l[r] *= f;
                for (size_t t = 0; t < c; t++) acc[t] *= f;
                w->mx[r] = bm;
            }
            if (c == 1) {
                float dot;
                w->l[r] += kmv__attn_row(row, len, scale, w->mx[r], p->x + j0, &dot);
                acc[0] += dot;
            } else {
                w->l[r] += kmv__attn_row(row, len, scale, w->mx[r], NULL, NULL);
                memset(row + len, 0, (bj - len) * sizeof(float));
            }
        }
        if (c > 1) accumulate_cols(p, w, bi, bj, j0);
    }
    /* Every row saw at least one key (n >= 1, and key 0 is never masked),
     * and its largest term is exp(0) = 1, so l >= 1. */
    for (size_t r = 0; r < bi; r++)
        for (size_t t = 0; t < c; t++)
            p->y[(i0 + r) * c + t] = (float)(w->acc[r * c + t] / w->l[r]);
}

int kmv__exact_attn(const kmv_allocator *a, const kmv__problem *p, double scale, int *threads) {
    plan pl;
    int rc = plan_create(a, p, 0, &pl);
    if (rc != KMV_OK) return rc;
    float fscale = (float)scale;
    long nb = (long)pl.nblocks;
    size_t done = 0;
#pragma omp parallel for num_threads(pl.nt) schedule(dynamic, 1)
    for (long b = 0; b < nb; b++) {
        size_t i0 = (size_t)b * pl.bq;
        size_t bi = p->m - i0 < pl.bq ? p->m - i0 : pl.bq;
        attn_block(p, fscale, i0, bi, thread_scratch(&pl));
        block_done(p, &pl, &done);
    }
    kmv__free(a, pl.mem);
    *threads = pl.nt;
    return KMV_OK;
}
