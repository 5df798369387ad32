/* Internal: what each step of the approximate engine costs, and the LSH
 * shape that minimizes it.
 *
 * Costs are in nanoseconds of one core of the machine the constants were
 * measured on, fitted to bench/approx_bench's phase times at n = 65536,
 * d = 64 and 100, where the tables (tens to hundreds of MB) are far out of
 * cache: a table lookup or insert is then a few cache misses, not a few
 * instructions. Only ratios matter: every decision compares a predicted
 * approximate cost with the predicted exact cost in the same units.
 * Decisions use counts, never clocks, so the same seed always takes the
 * same path and gives the same output. */
#ifndef KMV_COSTMODEL_H
#define KMV_COSTMODEL_H

#include <stddef.h>

#include "algo/keystore.h"
#include "algo/lsh.h"

/* One entry of the exact engine (blocked GEMM, vectorized exp). */
static inline double kmv__cost_exact(double d) { return 0.5 + 0.025 * d; }
/* The exact engine's double-precision path against its float path
 * (bench/exact_bench: 1.8 to 2.3 at d = 64 to 128). */
#define KMV__COST_WIDE 1.9
/* One LSH candidate verified: a random row fetched, a distance, an exp. */
static inline double kmv__cost_cand(double d) { return 20.0 + 0.15 * d; }
/* A decoding step through the bounds tree: each node bounded (the scan
 * reads int8 leaf centres) against one key of a window, and what every
 * step pays whatever the tree (bench/stream_bench: 6.8 ns per node at
 * d = 64 where a window key costs 12 ns; about 3 us a step on 2-d data). */
#define KMV__COST_TREE_NODE 0.6
#define KMV__COST_TREE_STEP 1000.0
/* One step along a bucket chain (duplicates included). */
#define KMV__COST_STEP 2.0
/* One bucket looked up by a query (hash of k integers, a slot and a
 * bucket that miss cache). */
#define KMV__COST_LOOKUP 140.0
/* One key inserted into one table (the same, plus growing the bucket). */
#define KMV__COST_INSERT 190.0
/* One multiply-add of the projections GEMM. */
#define KMV__COST_PROJ 0.03
/* One key of a contiguous window or sketch row: a distance and an exp. */
static inline double kmv__cost_window(double d) { return 1.5 + 0.07 * d; }

/* One leaf centre against a query in the tree's GEMM, with its test. */
static inline double kmv__cost_scan(double d) { return 0.3 + 0.025 * d; }
/* One bounds-tree node bounded: a distance to a centre stored with its
 * siblings, an exp and a heap step. */
static inline double kmv__cost_bound(double d) { return 8.0 + 0.07 * d; }
/* One key a tree's query sums exactly: a leaf's keys sit at random places
 * of the store, a cache miss each. */
static inline double kmv__cost_visit(double d) { return 12.0 + 0.1 * d; }

/* Looking one query up in all tables. */
static inline double kmv__cost_hash(const kmv__lsh_shape *s, double d) {
    return KMV__COST_PROJ * s->k * s->L * d + KMV__COST_LOOKUP * s->L;
}

/* Inserting one key into all tables. */
static inline double kmv__cost_insert(const kmv__lsh_shape *s, double d) {
    return KMV__COST_PROJ * s->k * s->L * d + KMV__COST_INSERT * s->L;
}

typedef struct kmv__lsh_plan {
    kmv__lsh_shape shape;
    double steps_per_query;  /* predicted chain steps */
    double cands_per_query;  /* predicted distinct candidates */
    double cost_per_query;   /* hashing, steps, verification */
} kmv__lsh_plan;

/* The prediction's sample: up to this many queries against the first
 * KMV__PLAN_KEYS keys of the random order. */
#define KMV__PLAN_QUERIES 32
#define KMV__PLAN_KEYS 256

/* Choose (k, L, w) so that every key within r_near of a query (kernel value
 * >= kappa) shares a bucket with it in at least one of L tables with
 * probability >= 1 - miss, at the least predicted cost. The prediction
 * uses distances from up to 32 queries to the first 256 keys of the random
 * order (a uniform sample). keys_per_query is n / m when the keys still
 * need hashing, else 0. Returns KMV_OK, with *found set when a shape of
 * at most KMV__LSH_MAX_TABLES tables reaches the recall (then *out is
 * it), or KMV_ENOMEM. Deterministic in seed. */
#define KMV__LSH_MAX_TABLES 160
int kmv__lsh_choose(const kmv_allocator *al, const kmv__keystore *ks, const float *q, size_t m,
                    double r_near, double miss, double keys_per_query, uint64_t seed,
                    kmv__lsh_plan *out, int *found);

#endif /* KMV_COSTMODEL_H */
