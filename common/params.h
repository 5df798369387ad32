/* Internal: every parameter and counter the engines use, as one typed
 * struct each. kmv_params and kmv_stats carry their experimental parts
 * (kmv_params_x, kmv_stats_x) as opaque bytes; the engines read and write
 * these flat structs, and the API converts at its edge. Also the context's
 * layout, which every layer that takes a context reads. */
#ifndef KMV_COMMON_PARAMS_H
#define KMV_COMMON_PARAMS_H

#include <stddef.h>
#include <stdint.h>

#define KMV_STATIC_LINKING_ONLY
#include "kmv/kmv.h"
#include "kmv/kmv_experimental.h"

typedef struct kmv__params {
    /* kmv_params */
    double sigma, attn_scale;
    int causal, exact;
    double eps, delta;
    uint64_t seed;
    int measure_error, n_threads;
    kmv_allocator allocator;
    size_t max_bytes;
    void (*progress)(void *opaque, double fraction);
    void *progress_opaque;
    /* kmv_params_x */
    int force_approx;
    kmv_attn_budget attn_budget;
    double alpha, gamma;
    int sketch_size, min_samples;
    kmv_backend backend;
    int verify_every;
} kmv__params;

typedef struct kmv__stats {
    /* kmv_stats */
    kmv_mode mode;
    kmv_fallback fallback_reason;
    size_t n_keys, n_queries, dim, n_cols;
    int n_threads;
    uint64_t kernel_evals;
    int wide_dots;
    size_t rows_exact;
    double error_bound, error_measured;
    double seconds, seconds_prepare, seconds_kernel, seconds_measure;
    /* kmv_stats_x */
    size_t keys_exact, keys_dropped, keys_sampled;
    double heavy_threshold;
    int lsh_tables, lsh_hash_len;
    double lsh_width;
    uint64_t lsh_candidates, lsh_steps, heavy_pairs, sketch_evals, samples;
    size_t rows_resampled;
    double cost_ratio, error_estimate;
    double seconds_lsh, seconds_heavy, seconds_sample;
    kmv_backend backend;
    int deterministic;
    uint64_t nodes_bounded, keys_visited;
    double certified_tail;
    size_t tree_bytes;
    double seconds_tree;
    size_t verified;
    double verify_mean, verify_p99, verify_max;
} kmv__stats;

struct kmv_ctx {
    kmv__params params;
    kmv_params pub;      /* as given, for kmv_ctx_get_params() */
    kmv_allocator alloc; /* params.allocator with defaults resolved */
};

/* The flat params of a checked kmv_params. */
void kmv__params_unpack(const kmv_params *p, kmv__params *out);

/* The public form of flat params (snapshots load into it). */
void kmv__params_pack(const kmv__params *p, kmv_params *out);

/* kmv_params_check() of flat params. */
int kmv__params_check(const kmv__params *p);

/* Export stats at the API's edge; out may be NULL (nothing written). */
void kmv__stats_export(const kmv__stats *in, kmv_stats *out);

/* Threads a call runs on: params.n_threads, or OpenMP's default for 0. */
int kmv__threads(const kmv__params *p);

#endif /* KMV_COMMON_PARAMS_H */
