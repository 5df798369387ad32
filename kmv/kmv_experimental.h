/*
 * kmv's experimental interface: the approximate engine's knobs, its
 * internal counters, and the paper's Assumption A statistics. For
 * measurements and tuning; names and meanings may change between minor
 * versions. Define KMV_STATIC_LINKING_ONLY before including it, as with
 * zstd's experimental section.
 */
#ifndef KMV_EXPERIMENTAL_H
#define KMV_EXPERIMENTAL_H

#ifndef KMV_STATIC_LINKING_ONLY
#error "kmv_experimental.h: define KMV_STATIC_LINKING_ONLY to use the experimental interface"
#endif

#include "kmv/kmv.h"

#ifdef __cplusplus
extern "C" {
#endif

/* How an attention step sizes its light-key samples. */
typedef enum kmv_attn_budget {
    /* Against what the light keys can be certified to stay under: the
     * step's bound holds (docs/guarantee-attention.md). */
    KMV_BUDGET_CERTIFIED = 0,
    /* Against the windows' own variance, as the paper's appendix A.1.4
     * does: far fewer samples where attention spreads, and no bound
     * (stats.error_bound INFINITY): a dominant key no window meets goes
     * unseen. */
    KMV_BUDGET_EMPIRICAL = 1
} kmv_attn_budget;

/* How the approximate engine finds heavy keys and certifies light ones. */
typedef enum kmv_backend {
    /* The cost model picks per call: the bounds tree where a trial on a
     * few rows shows its certificate to be cheap, else the LSH tables,
     * else exact. */
    KMV_BACKEND_AUTO = 0,
    /* LSH tables and sampling (Algorithm 3 as the paper gives it). */
    KMV_BACKEND_LSH = 1,
    /* The bounds tree: a deterministic certificate per row
     * (docs/bounds.md), built whatever it costs; rows it cannot certify
     * cheaply run exact. */
    KMV_BACKEND_TREE = 2
} kmv_backend;

/* The knobs kmv_params carries besides its stable fields. */
typedef struct kmv_params_x {
    int force_approx;  /* 1: skip the cost model's fallbacks to exact, so the
                          approximate path runs where exact is cheaper (the
                          guarantee is unchanged). Default 0 */
    int attn_budget;   /* a kmv_attn_budget. Default CERTIFIED */
    double alpha;      /* heavy threshold n^-alpha, in (0, 1]. Default 0.5 */
    double gamma;      /* exactly summed columns from x_j^2 >= n^gamma mean,
                          in (0, 1]. Default 0.25 */
    int sketch_size;   /* density sketch draws, [16, 65536]. Default 128 */
    int min_samples;   /* samples per approximated row at least,
                          [8, 65536]. Default 64 */
    int backend;       /* a kmv_backend. Default AUTO */
    int verify_every;  /* N > 0: rows 0, N, 2N, ... of an approximate
                          batch product (kmv_matvec, kmv_index_matvec,
                          kmv_attention), and a stream's decoding steps
                          0, N, 2N, ... (kmv_stream_decode, counted per
                          stream), are computed exactly too, and the stats
                          report the errors seen (verify_*; a step: its
                          own). Answers do not change. 0: off. Default 0 */
} kmv_params_x;

/* Read p's knobs into *x. */
KMV_API void kmv_params_get_x(const kmv_params *p, kmv_params_x *x);
/* Set p's knobs from *x. Errors: KMV_EINVAL (a knob out of range: p is
 * then unchanged). */
KMV_API int kmv_params_set_x(kmv_params *p, const kmv_params_x *x);

/* The approximate engine's counters for one call (zero after an exact
 * run). */
typedef struct kmv_stats_x {
    size_t keys_exact;       /* H1: keys with huge x_j, summed exactly */
    size_t keys_dropped;     /* H2: keys with tiny x_j, dropped */
    size_t keys_sampled;     /* T: the rest */
    double heavy_threshold;  /* kernel value from which keys are heavy */
    int lsh_tables;          /* L */
    int lsh_hash_len;        /* k */
    double lsh_width;        /* w */
    uint64_t lsh_candidates; /* distinct (query, key) pairs verified */
    uint64_t lsh_steps;      /* bucket entries scanned, repeats included */
    uint64_t heavy_pairs;    /* pairs found at or above the threshold */
    uint64_t sketch_evals;   /* kernel values the sketch evaluated */
    uint64_t samples;        /* light-key samples, all rows */
    size_t rows_resampled;   /* rows sampled again for their variance */
    double cost_ratio;       /* predicted approximate / exact cost */
    double error_estimate;   /* the samples' own variance as an error (not
                                a bound) */
    double seconds_lsh;      /* planning and hashing the keys */
    double seconds_heavy;    /* heavy search and the sketch */
    double seconds_sample;   /* windows and exactly summed columns */
    /* The backend that answered, and its certificate */
    int backend;             /* a kmv_backend: LSH or TREE (AUTO: none ran) */
    int deterministic;       /* 1: error_bound holds with certainty (the
                                tree's certificate), 0: with 1 - delta */
    uint64_t nodes_bounded;  /* tree nodes whose bounds a query computed */
    uint64_t keys_visited;   /* keys the tree's queries summed exactly */
    double certified_tail;   /* the tree's certified error, relative to
                                ||x||: at most error_bound */
    size_t tree_bytes;       /* the tree's memory */
    double seconds_tree;     /* building the tree (0 when one was held) */
    /* The monitor (params verify_every): rows computed exactly too, and
     * their errors. Gaussian: sqrt(m) ||y_i - (Kx)_i|| / ||x||, on eps's
     * scale (the guarantee bounds their root mean square by eps).
     * Attention: ||o_i - exact_i||, on error_bound's scale (per row). */
    size_t verified;
    double verify_mean, verify_p99, verify_max;
} kmv_stats_x;

/* Read st's counters into *x. */
KMV_API void kmv_stats_get_x(const kmv_stats *st, kmv_stats_x *x);

/* The paper's Assumption A statistics (Section 4, experiments i and ii) of
 * the n x n Gaussian kernel matrix between queries 1..n and keys 1..n under
 * ctx's sigma. With a the sum of its n largest entries:
 *   c            = (||K||_1 - a) / a   (Assumption A: bounded in n)
 *   ratio_next   = n-th largest / (n+1)-th largest
 *   ratio_double = n-th largest / 2n-th largest
 * In logarithms and double, so underflowing entries are fine; O(n^2 dim)
 * time, O(n (dim + threads)) memory. Errors: KMV_EINVAL, KMV_EEMPTY
 * (n < 2), KMV_ENONFINITE, KMV_EOVERFLOW, KMV_ENOMEM, KMV_ELIMIT. */
typedef struct kmv_tail_stats {
    double c;
    double ratio_next;
    double ratio_double;
} kmv_tail_stats;

KMV_API int kmv_tail_stats_compute(const kmv_ctx *ctx, const float *queries, const float *keys,
                                   size_t n, size_t dim, kmv_tail_stats *out);

#ifdef __cplusplus
}
#endif

#endif /* KMV_EXPERIMENTAL_H */
