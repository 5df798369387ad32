/* Internal: what each step of the approximate engine costs, and the LSH
 * shape that minimizes it.
 *
 * Costs are in nanoseconds of one core of the machine the constants were
 * measured on, fitted to bench/approx_bench's phase times at n = 16384 and
 * 65536 (a candidate is a cache miss once the keys outgrow the caches). Only
 * ratios matter: every decision compares a predicted approximate cost with
 * the predicted exact cost in the same units. Decisions use counts, never
 * clocks, so the same seed always takes the same path and gives the same
 * output. */
#ifndef KMV_COSTMODEL_H
#define KMV_COSTMODEL_H

#include <stddef.h>

#include "kmv/keystore.h"
#include "kmv/lsh.h"

/* One entry of the exact engine (blocked GEMM, vectorized exp). */
static inline double kmv__cost_exact(double d) { return 0.5 + 0.025 * d; }
/* One LSH candidate verified: a random row fetched, a distance, an exp. */
static inline double kmv__cost_cand(double d) { return 20.0 + 0.15 * d; }
/* One step along a bucket chain (duplicates included). */
#define KMV__COST_STEP 2.0
/* One bucket looked up (hash of k integers, a probe that misses cache). */
#define KMV__COST_LOOKUP 40.0
/* One multiply-add of the projections GEMM. */
#define KMV__COST_PROJ 0.03
/* One key of a contiguous window or sketch row: a distance and an exp. */
static inline double kmv__cost_window(double d) { return 1.5 + 0.07 * d; }

/* Hashing one point into all tables. */
static inline double kmv__cost_hash(const kmv__lsh_shape *s, double d) {
    return KMV__COST_PROJ * s->k * s->L * d + KMV__COST_LOOKUP * s->L;
}

typedef struct kmv__lsh_plan {
    kmv__lsh_shape shape;
    double steps_per_query;  /* predicted chain steps */
    double cands_per_query;  /* predicted distinct candidates */
    double cost_per_query;   /* hashing, steps, verification */
} kmv__lsh_plan;

/* Choose (k, L, w) so that every key within r_near of a query (kernel value
 * >= kappa) shares a bucket with it in at least one of L tables with
 * probability >= 1 - miss, at the least predicted cost. The prediction
 * uses distances from up to 32 queries to the first 256 keys of the random
 * order (a uniform sample). cost_keys_per_query is n / m when the keys
 * still need hashing, times the threads of a product (the tables are built
 * on one thread while the products they are compared with use all), else 0. Returns KMV_OK and fills *out, 1 when no
 * shape with at most KMV__LSH_MAX_TABLES tables reaches the recall, or
 * KMV_ENOMEM. Deterministic in seed. */
#define KMV__LSH_MAX_TABLES 160
int kmv__lsh_choose(const kmv_allocator *al, const kmv__keystore *ks, const float *q, size_t m, double r_near,
                    double miss, double keys_per_query, uint64_t seed, kmv__lsh_plan *out);

#endif /* KMV_COSTMODEL_H */
