/* The LSH tables as FindHeavy's backend (heavy.h): a query's runs are its
 * bucket in each table. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <string.h>

#include "algo/heavy.h"
#include "common/alloc.h"

/* A block's codes and the projections behind them. */
typedef struct lsh_scratch {
    uint64_t *codes; /* KMV__HEAVY_BLOCK x L */
    float *proj;     /* KMV__HEAVY_BLOCK x L x k */
} lsh_scratch;

static size_t runs_per_query(const void *impl) {
    return (size_t)((const kmv__lsh *)impl)->shape.L;
}

static void scratch_free(const kmv_allocator *a, void *p) {
    lsh_scratch *s = p;
    kmv__free(a, s->codes);
    kmv__free(a, s->proj);
    kmv__free(a, s);
}

static int scratch_init(const void *impl, const kmv_allocator *a, void **out) {
    const kmv__lsh_shape *sh = &((const kmv__lsh *)impl)->shape;
    lsh_scratch *s = kmv__malloc(a, sizeof *s);
    *out = NULL;
    if (s == NULL) return KMV_ENOMEM;
    s->codes = kmv__malloc_array(a, KMV__HEAVY_BLOCK * (size_t)sh->L, sizeof(uint64_t));
    s->proj = kmv__malloc_array(a, KMV__HEAVY_BLOCK * (size_t)sh->L * (size_t)sh->k, sizeof(float));
    if (s->codes == NULL || s->proj == NULL) {
        scratch_free(a, s);
        return KMV_ENOMEM;
    }
    *out = s;
    return KMV_OK;
}

static void lookup(const void *impl, const float *q, size_t count, void *scratch,
                   const uint32_t **run, size_t *len) {
    const kmv__lsh *h = impl;
    lsh_scratch *s = scratch;
    size_t L = (size_t)h->shape.L, nl = count * L;
    /* One query projects by a vectorized loop; a block by one GEMM, which
     * would pack the whole projection matrix for a single row. */
    if (count == 1) kmv__lsh_query_codes(h, q, s->proj, s->codes);
    else kmv__lsh_codes(h, q, count, (int)L, s->proj, s->codes);
    /* Every lookup in sweeps, so that their cache misses overlap instead of
     * queueing: slots, then buckets (whose ids the caller reads). */
    for (size_t u = 0; u < nl; u++) kmv__lsh_prefetch(h, (int)(u % L), s->codes[u]);
    for (size_t u = 0; u < nl; u++) {
        run[u] = kmv__lsh_bucket(h, (int)(u % L), s->codes[u], &len[u]);
        if (len[u]) __builtin_prefetch(run[u]);
    }
}

/* Queries that share their first table's bucket share candidates. */
static void locality(const void *impl, const float *q, size_t count, void *scratch,
                     uint64_t *key) {
    lsh_scratch *s = scratch;
    kmv__lsh_codes(impl, q, count, 1, s->proj, key);
}

static const kmv__heavy_ops lsh_ops = {"lsh",  runs_per_query, scratch_init, scratch_free,
                                       lookup, locality};

kmv__heavy_src kmv__heavy_lsh(const kmv__lsh *h) { return (kmv__heavy_src){&lsh_ops, h}; }
