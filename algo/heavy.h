/* Internal: FindHeavy (Algorithm 1), each query's heavy keys, the keys with
 * K(q, k_j) >= kappa, summed exactly by every engine.
 *
 * A backend proposes candidates for a block of queries (runs of key ids:
 * LSH buckets today); what follows is the same for every backend and every
 * engine: candidates are deduplicated, their kernel values computed
 * exactly, and those at or above kappa returned with their values in
 * ascending id order, so that sums over them have the keys' order whatever
 * order the backend found them in. A heavy key the backend misses stays
 * among the light keys, where it costs variance, never bias. */
#ifndef KMV_ALGO_HEAVY_H
#define KMV_ALGO_HEAVY_H

#include <stddef.h>
#include <stdint.h>

#include "algo/keystore.h"
#include "algo/lsh.h"

/* Queries one search takes at most: their lookups' cache misses overlap. */
#define KMV__HEAVY_BLOCK 16

typedef struct kmv__heavy_scratch kmv__heavy_scratch;

/* What a backend provides. Its runs for query i of a block are
 * run[i R + r], r < R, with R = runs_per_query(impl); len alike. */
typedef struct kmv__heavy_ops {
    const char *name;
    size_t (*runs_per_query)(const void *impl);
    /* Its own scratch for a block (NULL when it needs none). */
    int (*scratch_init)(const void *impl, const kmv_allocator *a, void **out);
    void (*scratch_free)(const kmv_allocator *a, void *p);
    /* Fill the runs of q[0..count) (count x dim), prefetched for reading. */
    void (*lookup)(const void *impl, const float *q, size_t count, void *scratch,
                   const uint32_t **run, size_t *len);
    /* A key per query such that queries with equal keys meet the same
     * candidates: a batch visits its queries in key order, so that what
     * one query fetched is still in cache for the next. count is at most
     * KMV__HEAVY_BLOCK. */
    void (*locality)(const void *impl, const float *q, size_t count, void *scratch,
                     uint64_t *key);
} kmv__heavy_ops;

/* A backend over its index. */
typedef struct kmv__heavy_src {
    const kmv__heavy_ops *ops;
    const void *impl;
} kmv__heavy_src;

/* The LSH tables as a backend: a query's runs are its L buckets. */
kmv__heavy_src kmv__heavy_lsh(const kmv__lsh *h);

/* One search: a block of queries and how their values are taken. */
typedef struct kmv__heavy_req {
    const kmv__keystore *ks;
    const float *q;         /* count x dim */
    size_t count;           /* 1 .. KMV__HEAVY_BLOCK */
    const uint32_t *id_lim; /* per query, keys with larger ids are
                               invisible (causal rows); NULL: none */
    float shift;            /* subtracted from every squared distance
                               (an attention step's, kmv__window()'s) */
    float inv2s2;           /* 1 / (2 sigma^2) */
    float kappa;            /* the heavy threshold */
    double max_steps;       /* a query whose runs pass this many entries
                               stops the search: over (INFINITY: never) */
} kmv__heavy_req;

/* Query i's heavy keys: id[off[i] .. off[i + 1]) ascending, kv alike.
 * Valid until the scratch's next search. */
typedef struct kmv__heavy_out {
    const uint32_t *id;
    const float *kv;
    size_t off[KMV__HEAVY_BLOCK + 1];
    uint64_t steps; /* run entries scanned, repeats included */
    uint64_t cands; /* distinct visible candidates verified */
    int over;       /* a query passed max_steps: nothing was verified */
} kmv__heavy_out;

/* A thread's scratch for searches on src over keys of dimension dim. */
int kmv__heavy_scratch_new(const kmv__heavy_src *src, const kmv_allocator *a,
                           kmv__heavy_scratch **out);
void kmv__heavy_scratch_free(kmv__heavy_scratch *t);

/* The backend's locality keys of q[0..count), count <= KMV__HEAVY_BLOCK. */
void kmv__heavy_locality(const kmv__heavy_src *src, const float *q, size_t count,
                         kmv__heavy_scratch *t, uint64_t *key);

/* Search; KMV_OK (see out->over) or KMV_ENOMEM. */
int kmv__heavy_find(const kmv__heavy_src *src, const kmv__heavy_req *rq, kmv__heavy_scratch *t,
                    kmv__heavy_out *out);

/* Where the values of keys are: c per key, at row pos_of[id] (x in the
 * store's order) or at row id when pos_of is NULL; keys with
 * w[id] >= whi are summed elsewhere (the exact columns) and skipped, when
 * w is not NULL. */
typedef struct kmv__values {
    const float *x;
    size_t c;
    const uint32_t *pos_of;
    const double *w;
    double whi;
} kmv__values;

/* sum[col] += kv[u] x_{id[u], col} over u < n, in that order. */
void kmv__heavy_sum(const uint32_t *id, const float *kv, size_t n, const kmv__values *v,
                    double *sum);

#endif /* KMV_ALGO_HEAVY_H */
