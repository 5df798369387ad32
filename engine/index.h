/* Internal: the index's layout, shared by index.c (its life cycle) and
 * approx.c (the product). */
#ifndef KMV_INDEX_H
#define KMV_INDEX_H

#include "common/alloc.h"
#include "algo/costmodel.h"
#include "algo/keystore.h"
#include "common/params.h"
#include "algo/lsh.h"

struct kmv_index {
    kmv__params params;
    kmv__meter meter;    /* counts and caps (params.max_bytes) what alloc takes */
    kmv_allocator alloc; /* draws through meter */
    size_t d;
    kmv__keystore ks;
    kmv__lsh lsh;       /* valid when lsh_built */
    int lsh_built;
    size_t lsh_n;       /* keys when the tables were planned */
    double kappa;       /* heavy threshold they were planned for */
    kmv__lsh_plan plan;
    size_t refused_n;   /* 1 + the key count at which the approximate plan
                           last passed params.max_bytes (0: never): products
                           at that count go straight to the exact engine */
    /* Work counters, all time: what "grows in place" is tested by. */
    uint64_t keys_hashed;   /* keys projected into the LSH tables */
    uint64_t table_inserts; /* (key, table) inserts */
    uint64_t table_builds;  /* times the tables were planned and filled */
    int skip_tables;    /* appends leave the tables alone: the caller
                           drops them once the append has succeeded */
    int force_approx;   /* params.force_approx (tests set it directly):
                           skip every cost-model fallback, so the
                           approximate path's guarantee can be measured on
                           inputs where exact would be cheaper */
};

/* Below this many kernel entries (about 10 ms of exact work) planning and
 * building tables cost more than approximation can save: exact runs. */
#define KMV__APPROX_MIN_ENTRIES 8388608.0

/* The approximate product; see kmv_index_matvec(). Operands are validated
 * by the caller (index.c). */
int kmv__approx_matvec(kmv_index *ix, const float *q, size_t m, const float *x, size_t c,
                       float *y, kmv__stats *st);

/* kmv_index_append() and kmv_index_matvec() past their argument checks,
 * for callers that made them already (kmv_matvec's one-shot index). */
int kmv__index_append_checked(kmv_index *ix, const float *keys, size_t n_keys);
int kmv__index_matvec_checked(kmv_index *ix, const float *q, size_t m, const float *x, size_t c,
                              float *y, kmv__stats *stats);

/* Plan (and build from the stored keys) LSH tables for heavy threshold
 * kappa, unless the tables held were planned for a threshold at most twice
 * as fine at no less than half the keys. q (m rows) samples the queries
 * for the plan's cost prediction; keys_per_query is the share of the
 * build each query pays (n / m for one product; about 1 for a decoding
 * loop, which appends a key per query). Returns KMV_OK, KMV_ENOMEM, or 1
 * when no shape's predicted heavy-search cost for the m queries is within
 * cap (nothing is built or dropped then). */
int kmv__index_ensure_lsh(kmv_index *ix, const float *q, size_t m, double kappa, double miss,
                          double cap, double keys_per_query);

/* (Re)build the tables of the given shape from every stored key, in id
 * order, so that the same keys, shape and seed give the same tables
 * however the keys arrived. KMV_OK (lsh_built set) or KMV_ENOMEM (no
 * tables left). The caller sets lsh_n, kappa, plan and the counters. */
int kmv__index_fill_lsh(kmv_index *ix, kmv__lsh_shape shape);

/* h: the largest x_j^2 / mean(x^2) left to sampling. */
#define WEIGHT_RATIO 16

/* The heavy threshold for n keys and m queries: min(n^-alpha,
 * eps sqrt(min_samples / (16 m h))), h = min(n^gamma, WEIGHT_RATIO); see
 * the top of approx.c. */
double kmv__heavy_threshold(const kmv__params *p, size_t n, size_t m);

/* Where H1 starts, as a multiple of the mean weight, for tables at
 * threshold kappa: n^gamma, or lower where kappa's bound needs, >= 1. */
double kmv__h1_ratio(const kmv__params *p, size_t n, size_t m, double kappa);

/* The exact engine for the whole product, reported as a fallback for
 * reason (a kmv_fallback); for plans that did not fit params.max_bytes. */
int kmv__approx_fallback(const kmv_index *ix, const float *q, size_t m, const float *x, size_t c,
                         float *y, int reason, kmv__stats *st);

#endif /* KMV_INDEX_H */
