/* Assumption A statistics (contract in kmv.h).
 *
 * The n x n matrix is never held: each thread takes blocks of query rows,
 * forms their dot products with all n keys in one GEMM (in double: float's
 * cancellation in ||q||^2 + ||k||^2 - 2 <q, k>, divided by 2 sigma^2, would
 * move the ratios by percents at narrow bandwidths), and keeps a running
 * log-sum-exp of every entry and a min-heap of the 2n largest. Entries are
 * handled as logarithms, -||q - k||^2 / (2 sigma^2), so a matrix whose
 * entries all underflow float (or double) still has well-defined
 * statistics: c and the ratios do not change when every entry is scaled. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/alloc.h"
#include "common/params.h"

#define ROWS_PER_BLOCK 32

/* Min-heap of at most cap doubles: the largest values seen. */
typedef struct topk {
    double *v;
    size_t len, cap;
} topk;

static void topk_push(topk *h, double x) {
    double *v = h->v;
    if (h->len < h->cap) {
        size_t i = h->len++;
        while (i > 0 && v[(i - 1) / 2] > x) {
            v[i] = v[(i - 1) / 2];
            i = (i - 1) / 2;
        }
        v[i] = x;
        return;
    }
    if (x <= v[0]) return;
    size_t i = 0, n = h->len;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && v[c + 1] < v[c]) c++;
        if (v[c] >= x) break;
        v[i] = v[c];
        i = c;
    }
    v[i] = x;
}

/* Running sum of exp(l) as exp(m) * s, rescaled when a larger l arrives. */
typedef struct lse {
    double m, s;
} lse;

static void lse_add(lse *a, double l) {
    if (l <= a->m) {
        a->s += exp(l - a->m);
    } else {
        a->s = a->s * exp(a->m - l) + 1.0;
        a->m = l;
    }
}

static void lse_merge(lse *a, lse b) {
    if (b.s == 0.0) return;
    if (a->s == 0.0 || b.m > a->m) {
        double s = a->s == 0.0 ? 0.0 : a->s * exp(a->m - b.m);
        a->m = b.m;
        a->s = b.s + s;
    } else {
        a->s += b.s * exp(b.m - a->m);
    }
}

static int cmp_desc(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x < y) - (x > y);
}

/* One computation's shared state: the keys in double with their squared
 * norms, and per thread a heap of the largest log-entries, a running
 * log-sum and a block of dot products. */
typedef struct tail_job {
    const float *queries;
    size_t n, dim, heap;
    int threads;
    double c; /* 1 / (2 sigma^2) */
    double *kd, *kn, *tops, *blocks;
    size_t *lens;
    lse *sums;
} tail_job;

/* Every entry's logarithm, row block by row block on the job's threads:
 * each thread keeps the 2n largest of its rows and their log-sum. */
static void scan(tail_job *jb) {
    size_t n = jb->n, dim = jb->dim, nblocks = (n + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
#pragma omp parallel num_threads(jb->threads)
    {
        int me = 0;
#ifdef _OPENMP
        me = omp_get_thread_num();
#endif
        topk h = {jb->tops + (size_t)me * jb->heap, 0, jb->heap};
        lse acc = {0.0, 0.0};
        double *s = jb->blocks + (size_t)me * ROWS_PER_BLOCK * (n + dim);
        double *qd = s + ROWS_PER_BLOCK * n;
#pragma omp for schedule(dynamic, 1)
        for (size_t b = 0; b < nblocks; b++) {
            size_t r0 = b * ROWS_PER_BLOCK;
            size_t rows = n - r0 < ROWS_PER_BLOCK ? n - r0 : ROWS_PER_BLOCK;
            for (size_t u = 0; u < rows * dim; u++) qd[u] = jb->queries[r0 * dim + u];
            cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, (int)n, (int)dim,
                        1.0, qd, (int)dim, jb->kd, (int)dim, 0.0, s, (int)n);
            for (size_t r = 0; r < rows; r++) {
                const double *q = qd + r * dim;
                double qn = 0.0;
                for (size_t t = 0; t < dim; t++) qn += q[t] * q[t];
                for (size_t j = 0; j < n; j++) {
                    double d2 = qn + jb->kn[j] - 2.0 * s[r * n + j];
                    double l = -(d2 > 0.0 ? d2 : 0.0) * jb->c;
                    if (acc.s == 0.0) {
                        acc.m = l;
                        acc.s = 1.0;
                    } else {
                        lse_add(&acc, l);
                    }
                    topk_push(&h, l);
                }
            }
        }
        jb->lens[me] = h.len;
        jb->sums[me] = acc;
    }
}

/* The statistics from the threads' heaps, which hold the 2n largest of
 * their rows: the overall 2n largest are among them. */
static void combine(const tail_job *jb, kmv_tail_stats *out) {
    size_t total = 0, n = jb->n;
    lse all = {0.0, 0.0};
    for (int t = 0; t < jb->threads; t++) {
        memmove(jb->tops + total, jb->tops + (size_t)t * jb->heap, jb->lens[t] * sizeof(double));
        total += jb->lens[t];
        lse_merge(&all, jb->sums[t]);
    }
    qsort(jb->tops, total, sizeof(double), cmp_desc);
    double a = 0.0;
    for (size_t r = 0; r < n; r++) a += exp(jb->tops[r] - all.m);
    double rest = all.s - a;
    out->c = rest > 0.0 ? rest / a : 0.0;
    out->ratio_next = exp(jb->tops[n - 1] - jb->tops[n]);
    out->ratio_double = exp(jb->tops[n - 1] - jb->tops[2 * n - 1]);
}

int kmv_tail_stats_compute(const kmv_ctx *ctx, const float *queries, const float *keys, size_t n,
                           size_t dim, kmv_tail_stats *out) {
    if (ctx == NULL || out == NULL || dim == 0) return KMV_EINVAL;
    if (n < 2) return KMV_EEMPTY;
    if (queries == NULL || keys == NULL) return KMV_EINVAL;
    if (n > (size_t)INT32_MAX || dim > (size_t)INT32_MAX || n > SIZE_MAX / 64 / dim)
        return KMV_EOVERFLOW;
    if (kmv_find_nonfinite(queries, n * dim, NULL) != KMV_OK ||
        kmv_find_nonfinite(keys, n * dim, NULL) != KMV_OK)
        return KMV_ENONFINITE;
    const kmv__params *pa = &ctx->params;
    kmv__meter meter;
    kmv__meter_init(&meter, &ctx->alloc, pa->max_bytes);
    kmv_allocator al = kmv__meter_allocator(&meter);
    tail_job jb = {.queries = queries, .n = n, .dim = dim, .heap = 2 * n,
                   .threads = kmv__threads(pa), .c = 1.0 / (2.0 * pa->sigma * pa->sigma)};
    size_t nt = (size_t)jb.threads;
    jb.kd = kmv__malloc_array(&al, n * dim, sizeof(double));
    jb.kn = kmv__malloc_array(&al, n, sizeof(double));
    jb.tops = kmv__malloc_array(&al, nt * jb.heap, sizeof(double));
    jb.lens = kmv__malloc_array(&al, nt, sizeof(size_t));
    jb.sums = kmv__malloc_array(&al, nt, sizeof(lse));
    jb.blocks = kmv__malloc_array(&al, nt * ROWS_PER_BLOCK, (n + dim) * sizeof(double));
    int rc = KMV_OK;
    if (!jb.kd || !jb.kn || !jb.tops || !jb.lens || !jb.sums || !jb.blocks) {
        rc = kmv__meter_code(&meter, KMV_ENOMEM);
    } else {
        /* A team smaller than asked for leaves some slots unused. */
        memset(jb.lens, 0, nt * sizeof(size_t));
        memset(jb.sums, 0, nt * sizeof(lse));
        for (size_t j = 0; j < n; j++) {
            double sq = 0.0;
            for (size_t t = 0; t < dim; t++) {
                jb.kd[j * dim + t] = keys[j * dim + t];
                sq += jb.kd[j * dim + t] * jb.kd[j * dim + t];
            }
            jb.kn[j] = sq;
        }
        scan(&jb);
        combine(&jb, out);
    }
    void *arrays[] = {jb.blocks, jb.sums, jb.lens, jb.tops, jb.kn, jb.kd};
    for (size_t u = 0; u < sizeof arrays / sizeof arrays[0]; u++) kmv__free(&al, arrays[u]);
    return rc;
}
