/*
 * kmv: fast Gaussian-kernel matrix-vector products and transformer attention.
 *
 * Given keys k_1..k_n and queries q_1..q_m in R^d, kmv computes y = K x with
 *
 *     K_ij = exp(-||q_i - k_j||^2 / (2 sigma^2))          (Gaussian kernel)
 *
 * and normalized attention O = D^{-1} A V with A_ij = exp(s <q_i, k_j>),
 * s = 1/sqrt(d) unless given, D = diag(A 1).
 *
 * BANDWIDTH CONVENTION, stated loudly because peers differ: sigma is the
 * standard deviation of the Gaussian, K_ij = exp(-||q-k||^2 / (2 sigma^2)).
 * Code written for exp(-||q-k||^2 / h^2) must pass sigma = h / sqrt(2).
 *
 * Conventions used by every declaration below:
 *  - Matrices are float32, row-major, contiguous: keys are n_keys x dim,
 *    queries n_queries x dim, x (or V) n_keys x n_cols, y (or O)
 *    n_queries x n_cols. A vector x is the case n_cols = 1.
 *  - Every call that can fail returns an int: KMV_OK (0) or a negative
 *    KMV_E* code; kmv_strerror() names it. There is no global "last error".
 *  - Inputs are never modified and never retained after a call returns,
 *    unless a declaration says otherwise. Outputs are written only on success
 *    of the call's validation: a call that returns an error before computing
 *    leaves its outputs untouched.
 *  - All memory the library allocates goes through the allocator in
 *    kmv_params (malloc/free by default). BLAS and the OpenMP runtime keep
 *    private buffers of their own that this hook does not see.
 *
 * Threads. Which calls may overlap:
 *  - Anywhere, any number at once: the version and error-name queries,
 *    kmv_params_init/check, kmv_find_nonfinite, kmv_ctx_create,
 *    kmv_npy_read, kmv_output_target, and kmv_npy_write on distinct
 *    paths; kmv_output handles, one thread each.
 *  - On one context: any number of kmv_matvec, kmv_attention and
 *    kmv_index_create calls at once (the context is read-only after
 *    creation); kmv_ctx_free only when none is running.
 *  - On one index: one call at a time, whichever (products update its
 *    tables). Distinct indexes are independent, even from one context.
 *  - On one stream: any number of kmv_stream_decode calls at once; every
 *    other call on it (appends, products, save, info, free) alone, with
 *    no step running. Distinct streams are independent.
 *  - Each call may run its own OpenMP team (params.n_threads), and calls
 *    the allocator hook from those threads: the hook must be thread-safe.
 *    The progress hook runs only on the calling thread.
 * tests/concurrency_test checks these under ThreadSanitizer (.bazelrc
 * config tsan) with one thread per call inside: libgomp is not built with
 * TSan, so the teams' own synchronization is outside what it can check.
 *
 * ABI promise: none before 1.0. Until then, rebuild against the header of the
 * library you link; KMV_VERSION_NUMBER tells which one that is. Source
 * compatibility is kept across minor versions: new fields are added to the
 * params struct only with defaults set by kmv_params_init(), so callers that
 * initialize with it keep working.
 */
#ifndef KMV_H
#define KMV_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__) && __GNUC__ >= 4
#define KMV_API __attribute__((visibility("default")))
#else
#define KMV_API
#endif

/* ---------------------------------------------------------------- version */

#define KMV_VERSION_MAJOR 0
#define KMV_VERSION_MINOR 1
#define KMV_VERSION_PATCH 0
#define KMV_VERSION_NUMBER \
    (KMV_VERSION_MAJOR * 10000 + KMV_VERSION_MINOR * 100 + KMV_VERSION_PATCH)

/* "MAJOR.MINOR.PATCH" of the linked library. Static storage; thread-safe. */
KMV_API const char *kmv_version_string(void);

/* Version number of the linked library, KMV_VERSION_NUMBER's format.
 * Thread-safe. */
KMV_API unsigned kmv_version_number(void);

/* ----------------------------------------------------------------- errors */

/* X(NAME, value, message). Codes are explicit so they never shift. */
#define KMV_ERRNO_MAP(X)                                                        \
    X(OK, 0, "success")                                                         \
    X(EINVAL, -1, "invalid argument")                                           \
    X(ENOMEM, -2, "out of memory")                                              \
    X(EDIM, -3, "dimension mismatch")                                           \
    X(ENONFINITE, -4, "input contains NaN or infinity")                         \
    X(EOVERFLOW, -5, "size or value beyond the representable range")           \
    X(EEMPTY, -6, "empty input where at least one row is required")             \
    X(EIO, -7, "input/output error")                                            \
    X(EFORMAT, -8, "malformed or unsupported file")                             \
    X(EUNSUPPORTED, -9, "not supported by this version")                       \
    X(ELIMIT, -10, "memory cap (params.max_bytes) reached")

typedef enum kmv_errno {
#define KMV__ERRNO_ENUM(name, value, msg) KMV_##name = value,
    KMV_ERRNO_MAP(KMV__ERRNO_ENUM)
#undef KMV__ERRNO_ENUM
} kmv_errno;

/* A static, human-readable message for a code returned by any kmv call, or
 * "unknown error" for anything else. Never NULL. Thread-safe. */
KMV_API const char *kmv_strerror(int code);

/* The code's symbolic name ("KMV_ENOMEM"), or "KMV_UNKNOWN". Thread-safe. */
KMV_API const char *kmv_errname(int code);

/* -------------------------------------------------------------- allocator */

/* Every allocation the library makes goes through this hook. alloc returns
 * NULL on failure (the library then returns KMV_ENOMEM and frees whatever
 * it had taken); free accepts NULL. alloc must return memory aligned for any
 * type, as malloc does (64-byte alignment helps the engine but is not
 * needed). Both must be thread-safe: the library calls them from its own
 * worker threads as well as the caller's. Neither may call back into kmv.
 * Leaving both pointers NULL selects malloc/free. */
typedef struct kmv_allocator {
    void *(*alloc)(void *opaque, size_t size);
    void (*free)(void *opaque, void *ptr);
    void *opaque;
} kmv_allocator;

/* ----------------------------------------------------------------- params */

typedef enum kmv_mode {
    KMV_MODE_EXACT = 0,    /* the exact engine ran because it was asked for */
    KMV_MODE_APPROX = 1,   /* the approximate engine ran */
    KMV_MODE_FALLBACK = 2  /* approximation was asked for; exact was cheaper */
} kmv_mode;

/* How an attention step sizes its light-key samples (params.attn_budget;
 * see kmv_stream_attention_create()). */
typedef enum kmv_attn_budget {
    /* Against the variance the light keys can have given what the LSH
     * certifies of them: the step's error bound holds. */
    KMV_BUDGET_CERTIFIED = 0,
    /* Against the variance its windows show, as the implementation in the
     * paper's appendix A.1.4 does: far fewer samples where attention
     * spreads, and no bound (a dominant key that no window meets goes
     * unseen); stats.error_bound is then INFINITY. For experiments. */
    KMV_BUDGET_EMPIRICAL = 1
} kmv_attn_budget;

typedef struct kmv_params {
    double sigma;      /* Gaussian bandwidth, in [1e-150, 1e150]. Default 1. */
    double attn_scale; /* attention logit scale s in exp(s <q,k>); 0 means
                          1/sqrt(dim). Finite and >= 0. Default 0.          */
    int causal;        /* nonzero: query i sees only keys j <= i (query and
                          key rows being positions of one sequence; keys
                          past the last query are then never seen).
                          Default 0.                                        */
    int exact;         /* nonzero: always run the exact engine. Default 0,
                          which asks for the approximate engine.            */
    int force_approx;  /* 1: skip the cost model's fallbacks to exact
                          (inputs too small to gain, plans costing more
                          than the exact product), so the approximate
                          path runs and its behaviour can be measured
                          where exact would be cheaper; the guarantee is
                          unchanged. For experiments. 0 or 1; default 0.   */
    int attn_budget;   /* how attention steps size their samples, a
                          kmv_attn_budget (kmv_stream_attention_create()).
                          Default KMV_BUDGET_CERTIFIED.                     */
    double eps;        /* target error: ||Kx - y||_2 <= eps ||x||_2.
                          In (0, 1). Default 0.1.                           */
    double delta;      /* failure probability of that bound, in (0, 1).
                          Default 0.01.                                     */
    uint64_t seed;     /* every random choice derives from it. Default 1.   */
    /* The approximate engine (ApproxKMV, Indyk, Kapralov, Sheth and Wagner
     * 2025, Algorithm 3). With x scaled to ||x||^2 = n:
     * keys with x_j^2 >= n^gamma are summed exactly, keys with kernel value
     * >= n^-alpha are found by LSH and summed exactly, the rest are
     * sampled. The paper's values (alpha = 1/3, gamma = 0.109) balance its
     * asymptotic exponents; the defaults below were chosen by measurement
     * (README, "Approximate engine"): a lower heavy threshold makes the
     * sampled remainder small enough for few samples per row, and a higher
     * gamma keeps the exactly summed columns few for Gaussian-like x. The
     * heavy threshold is further capped so that one light key at the
     * threshold can cost a row at most 1/16 of its share of the error at
     * min_samples samples; it is reported in the stats. */
    double alpha;      /* heavy threshold exponent, in (0, 1]. Default 0.5. */
    double gamma;      /* exact-column exponent, in (0, 1]. Default 0.25.   */
    int sketch_size;   /* draws of the kernel-density sketch that sets the
                          per-row sample budgets, in [16, 65536].
                          Default 128.                                      */
    int min_samples;   /* samples every approximated row takes at least, in
                          [8, 65536]. Default 64.                           */
    int measure_error; /* nonzero: also run the exact engine and report
                          ||Kx - y|| / ||x|| in the stats (costs an exact
                          product). Default 0.                              */
    int n_threads;     /* threads per call; 0 means OpenMP's default
                          (OMP_NUM_THREADS, else the core count). >= 0.     */
    kmv_allocator allocator; /* {NULL, NULL, NULL} selects malloc/free.     */
    /* The most bytes a handle may hold through the allocator at any moment,
     * counting a header per block (16 bytes on x86-64; blocks of an index
     * then have malloc's alignment, not more): an index's keys, tables and a
     * product's working memory; for kmv_matvec() and kmv_attention() on a
     * context, each call's own. An allocation past it is refused and the
     * call returns KMV_ELIMIT with its outputs untouched (what a refused
     * append leaves: kmv_index_append()). An approximate product whose plan
     * does not fit instead drops the index's LSH tables and runs the exact
     * engine (stats reason KMV_FALLBACK_MEMORY), as do later products until
     * keys are appended; KMV_ELIMIT only if that does not fit either.
     * BLAS's and OpenMP's private buffers are not counted. 0 means no cap.
     * Default 0.                                                           */
    size_t max_bytes;
    /* Progress of long calls: when not NULL, called with the fraction of
     * the work done, in [0, 1], nondecreasing, ending with 1 on success.
     * Always on the thread that made the call, never concurrently with
     * itself for one call; it must not call back into kmv. Default NULL. */
    void (*progress)(void *opaque, double fraction);
    void *progress_opaque;
} kmv_params;

/* Fill *p with the defaults documented above. Thread-safe. */
KMV_API void kmv_params_init(kmv_params *p);

/* Check every field of *p against its documented range.
 * Returns KMV_OK or KMV_EINVAL. Thread-safe. */
KMV_API int kmv_params_check(const kmv_params *p);

/* ------------------------------------------------------------------ stats */

/* What one call did. Times are wall-clock seconds. */
typedef struct kmv_stats {
    int mode;               /* a kmv_mode */
    size_t n_keys;
    size_t n_queries;
    size_t dim;
    size_t n_cols;
    int n_threads;          /* threads the call ran on */
    uint64_t kernel_evals;  /* kernel entries evaluated */
    int wide_dots;          /* 1 when the Gaussian's dot products ran in
                               float64 because float32 cancellation would
                               have cost more than 4e-6 of a kernel value
                               (narrow bandwidth, large norms); 0 else */
    double seconds;         /* whole call */
    double seconds_prepare; /* validation, norms, scratch */
    double seconds_kernel;  /* kernel evaluation and accumulation (exact
                               engine, including a fallback's) */
    /* The approximate engine; zero after an exact run. */
    int fallback_reason;      /* a kmv_fallback, KMV_FALLBACK_NONE unless
                                 mode is KMV_MODE_FALLBACK */
    size_t keys_exact;        /* H1: keys with x_j^2 >= n^gamma, summed
                                 exactly for every row */
    size_t keys_dropped;      /* H2: keys with x_j^2 <= n^-4, dropped */
    size_t keys_sampled;      /* T: the rest */
    double heavy_threshold;   /* kernel value from which keys are heavy */
    int lsh_tables;           /* L */
    int lsh_hash_len;         /* projections per table, k */
    double lsh_width;         /* bucket width w */
    uint64_t lsh_candidates;  /* distinct (query, key) pairs verified */
    uint64_t lsh_steps;       /* bucket entries scanned, repeats included */
    uint64_t heavy_pairs;     /* pairs with K_ij >= heavy_threshold found */
    uint64_t sketch_evals;    /* kernel values the sketch evaluated */
    uint64_t samples;         /* light-key samples drawn, all rows */
    size_t rows_exact;        /* rows whose budget exceeded an exact row's
                                 cost and were computed exactly */
    size_t rows_resampled;    /* rows sampled again because their first
                                 window's variance exceeded the plan */
    double cost_ratio;        /* predicted approximate / exact cost */
    double error_bound;       /* the bound the call guarantees, whichever
                                 engine answered: eps on ||Kx - y|| / ||x||
                                 (attention: the per-row bound of
                                 kmv_stream_attention_create()); a fallback
                                 meets it trivially. INFINITY where none is
                                 claimed (KMV_BUDGET_EMPIRICAL) */
    double error_estimate;    /* the estimate of ||Kx - y|| / ||x|| from the
                                 samples' own variance plus the dropped
                                 keys' bound */
    double error_measured;    /* measured against the exact engine when
                                 params.measure_error (0 when the exact
                                 engine answered), else -1 */
    double seconds_lsh;       /* planning and hashing the keys */
    double seconds_heavy;     /* hashing queries, verifying candidates,
                                 the sketch */
    double seconds_sample;    /* windows and exact columns */
    double seconds_measure;   /* params.measure_error's exact product */
} kmv_stats;

/* Why the approximate engine ran the exact one instead. */
typedef enum kmv_fallback {
    KMV_FALLBACK_NONE = 0,
    KMV_FALLBACK_LSH = 1,     /* no LSH shape finds the heavy keys for less
                                 than a quarter of the exact cost */
    KMV_FALLBACK_HEAVY = 2,   /* the search met more candidates than that */
    KMV_FALLBACK_SAMPLES = 3, /* the sample budget would cost more than the
                                 rest of the exact product */
    KMV_FALLBACK_COLUMNS = 4, /* too many keys with huge x_j to sum exactly */
    KMV_FALLBACK_BUDGET = 5,  /* dropped keys' bound alone exceeds eps */
    KMV_FALLBACK_SMALL = 6,   /* too few keys or queries to gain anything */
    KMV_FALLBACK_MEMORY = 7   /* the plan needed more than params.max_bytes */
} kmv_fallback;

/* "none", "lsh", ... for a kmv_fallback; "unknown" otherwise. */
KMV_API const char *kmv_fallback_name(int reason);

/* ---------------------------------------------------------------- context */

/* A validated copy of kmv_params and the allocator; the handle later
 * versions hang caches on. Calls take it const: one context may serve any
 * number of concurrent calls from different threads. */
typedef struct kmv_ctx kmv_ctx;

/* Create a context from *params (NULL: the defaults).
 * On success *out owns a context to release with kmv_ctx_free().
 * Errors: KMV_EINVAL (out NULL, or a field out of range), KMV_ENOMEM.
 * On error *out is set to NULL. Thread-safe. */
KMV_API int kmv_ctx_create(const kmv_params *params, kmv_ctx **out);

/* Release a context; NULL is a no-op. Not concurrently with calls using it. */
KMV_API void kmv_ctx_free(kmv_ctx *ctx);

/* The params the context was created with. Thread-safe. */
KMV_API const kmv_params *kmv_ctx_params(const kmv_ctx *ctx);

/* ------------------------------------------------------------- operations */

/* Gaussian kernel product y = K x, K_ij = exp(-||q_i - k_j||^2/(2 sigma^2)),
 * sigma from the context's params; causal params mask K_ij for j > i.
 *
 * @param queries  n_queries x dim
 * @param keys     n_keys x dim
 * @param x        n_keys x n_cols (a vector when n_cols = 1)
 * @param y        n_queries x n_cols, written on success; may not overlap
 *                 the inputs
 * @param stats    filled on success when not NULL
 *
 * n_queries = 0 or n_cols = 0 is an empty result (KMV_OK, nothing written);
 * n_keys = 0 gives y = 0 (an empty sum). dim must be >= 1.
 * The exact engine (params.exact) gives y within 1e-5 relative of a
 * float64 evaluation of sum_j |K_ij x_j| per entry. Otherwise the
 * approximate engine runs (see kmv_index_matvec(), which this call wraps
 * with an index built for the call) and the result satisfies
 * ||Kx - y||_2 <= eps ||x||_2 (Frobenius norms for n_cols > 1), as stated
 * there, K being the masked matrix under params.causal.
 * Errors: KMV_EINVAL (NULL pointer with a nonzero size, dim = 0),
 * KMV_EOVERFLOW (a size product overflows size_t, or the arithmetic
 * leaves float's range: an entry of y past FLT_MAX, as sums of x near it
 * can be, or squared norms or distances past it, from coordinates beyond
 * about 1e19; y's content is then unspecified), KMV_ENONFINITE (NaN or
 * infinity in queries, keys or x), KMV_ENOMEM, KMV_ELIMIT (the call's
 * working memory would pass params.max_bytes), KMV_EUNSUPPORTED. On
 * KMV_ENOMEM and KMV_ELIMIT y is untouched.
 * Cost (exact): O(n_queries n_keys (dim + n_cols)) time on params.n_threads threads,
 * O((n_queries + n_keys) dim) extra memory, never an n_queries x n_keys
 * matrix. Thread-safe: concurrent calls on one context are allowed. */
KMV_API int kmv_matvec(const kmv_ctx *ctx,
                       const float *queries, size_t n_queries,
                       const float *keys, size_t n_keys, size_t dim,
                       const float *x, size_t n_cols,
                       float *y, kmv_stats *stats);

/* ------------------------------------------------------------------ index */

/* Keys held for repeated approximate products: the keys in a random order,
 * LSH tables over them and the x-independent parts of the engine. Keys are
 * appended in blocks, each append costing time proportional to the block,
 * not to the keys already inside; a product with a fresh x reuses the
 * tables. One index is used by one thread at a time (products update its
 * tables); distinct indexes are independent. */
typedef struct kmv_index kmv_index;

/* An empty index for dim-dimensional keys under ctx's params (copied; ctx
 * may be freed afterwards). Errors: KMV_EINVAL (NULL ctx or out, dim = 0),
 * KMV_ENOMEM. On error *out is NULL. */
KMV_API int kmv_index_create(const kmv_ctx *ctx, size_t dim, kmv_index **out);

/* Release an index; NULL is a no-op. */
KMV_API void kmv_index_free(kmv_index *ix);

/* Append n_keys keys (n_keys x dim). They get ids kmv_index_size() ..
 * kmv_index_size() + n_keys - 1, the row order of x in later products.
 * Errors: KMV_EINVAL (NULL keys with n_keys > 0), KMV_ENONFINITE,
 * KMV_EOVERFLOW (more than 2^32 - 2 keys in total), KMV_ENOMEM, KMV_ELIMIT
 * (params.max_bytes). On error the keys and tables hold what they held, so
 * later products give the same answers as without the failed call; room
 * the call reserved may stay held (kmv_index_bytes() counts it), which
 * under a cap leaves less for later calls. */
KMV_API int kmv_index_append(kmv_index *ix, const float *keys, size_t n_keys);

/* Keys held. */
KMV_API size_t kmv_index_size(const kmv_index *ix);

/* Bytes the index holds through the allocator now (headers included: the
 * quantity params.max_bytes caps), and the most it has held. */
KMV_API size_t kmv_index_bytes(const kmv_index *ix);
KMV_API size_t kmv_index_peak_bytes(const kmv_index *ix);

/* Approximate y = K x over the index's keys (x is kmv_index_size() x
 * n_cols in id order; y is n_queries x n_cols):
 *
 *     ||Kx - y||_2 <= eps ||x||_2   with probability >= 1 - delta,
 *
 * by ApproxKMV: keys with huge x_j summed exactly, keys with x_j^2 below
 * n^-4 of the mean dropped (their bound is charged to eps), each query's
 * heavy keys found with LSH and summed exactly, the remaining light keys
 * estimated from a uniform window sample of the random key order, with
 * per-row sample counts that minimize the total for a variance budget:
 * E||Kx - y||^2 plus sqrt(2 Var ||Kx - y||^2 / delta) stays within
 * (eps ||x||)^2, which is Chebyshev's bound on the squared error treating
 * each row's error as Gaussian (each is a mean of >= min_samples terms).
 * What the bound rests on: LSH recalls each heavy pair with probability
 * >= 1 - delta (misses add variance, never bias), and the sketch's density
 * estimates; a row whose samples show more variance than planned is sampled
 * again with a larger budget. The tests measure the failure rate over
 * hundreds of seeds. When the plan would cost more than the exact product,
 * the exact engine runs instead (stats mode KMV_MODE_FALLBACK with the
 * reason); the whole call then costs at most about 1.25 exact products.
 *
 * params.causal masks K_ij for key ids j > i: the heavy search and the
 * windows skip those keys (a masked key counts as 0, so the estimate stays
 * unbiased and the budgets, planned for the unmasked row, only grow more
 * careful), and a row that sees fewer keys than its sample budget is
 * summed exactly over them.
 *
 * Errors: as kmv_matvec().
 * Deterministic: the same keys, queries, x and params give the same y. */
KMV_API int kmv_index_matvec(kmv_index *ix, const float *queries, size_t n_queries,
                             const float *x, size_t n_cols, float *y, kmv_stats *stats);

/* Normalized attention O = D^{-1} A V, A_ij = exp(s <q_i, k_j>), s from
 * params.attn_scale (0: 1/sqrt(dim)), D = diag(A 1); causal params mask
 * A_ij for j > i. Logits are shifted by their running row maximum, so the
 * exp never overflows: the result is finite whenever the logits themselves
 * are finite floats. Inputs where they might not be (max ||q|| max ||k||,
 * or that times the scale, above FLT_MAX / 1024) are refused with
 * KMV_EOVERFLOW rather than answered with infinities.
 *
 * @param q    n_queries x dim
 * @param k    n_keys x dim
 * @param v    n_keys x n_cols
 * @param out  n_queries x n_cols, written on success; may not overlap inputs
 * @param stats filled on success when not NULL
 *
 * Without params.exact (and past the size where it can gain, as
 * kmv_matvec(), or under params.force_approx) it runs an attention stream
 * (kmv_stream_attention_create()) over the keys and one decoding step per
 * query row, the keys entering row by row when causal: each row then
 * carries the step's guarantee, ||o_i - exact_i|| <= eps sqrt(1 + R^2) /
 * (1 - eps) with probability >= 1 - delta, R = max_j ||v_j|| (stats:
 * error_bound that bound, rows_exact the rows computed exactly, mode
 * KMV_MODE_APPROX when any row was approximated, error_measured
 * ||O - exact||_F / ||V||_F under params.measure_error, as the paper's
 * appendix A.1.4 reports it). When none of the first 32 rows can be
 * approximated, the rest run on the exact engine. Without params.causal
 * or params.max_bytes, the rows after the first approximated one step
 * concurrently on params.n_threads threads; each row's answer is the one
 * it has alone, so the output does not depend on the thread count.
 *
 * n_queries = 0 or n_cols = 0 is an empty result; n_keys = 0 is KMV_EEMPTY
 * (a softmax over nothing is undefined). Other errors as kmv_matvec().
 * Same cost and thread-safety as kmv_matvec(). */
KMV_API int kmv_attention(const kmv_ctx *ctx,
                          const float *q, size_t n_queries,
                          const float *k, size_t n_keys, size_t dim,
                          const float *v, size_t n_cols,
                          float *out, kmv_stats *stats);

/* The reduction of attention to the Gaussian kernel: Lemma 4.1 of Indyk,
 * Kapralov, Sheth and Wagner (2025), with the constants its printed
 * statement drops. For alpha >= max_j ||k_j||^2, lift keys to
 * k'_j = (k_j, sqrt(alpha - ||k_j||^2)) and queries to q'_i = (q_i, 0) in
 * dimension dim + 1; then with sigma = 1 / sqrt(s),
 *
 *   exp(s <q_i, k_j>) = exp(s (||q_i||^2 + alpha) / 2)
 *                       * exp(-||q'_i - k'_j||^2 / (2 sigma^2)).
 *
 * The first factor depends on the row only, so normalized attention is a
 * ratio of two Gaussian products on the lifted points,
 * D^{-1} A V = diag(K' 1)^{-1} K' V, and nothing is exponentiated that could
 * overflow. alpha must cover every key the lifted kernel will see (for a
 * growing context, a bound on the keys to come). A larger alpha scales
 * every K'_ij by exp(-s (alpha - max ||k||^2) / 2), which shrinks the row
 * sums against an additive eps ||x|| error: take the smallest bound known.
 *
 * @param rows    count x dim
 * @param is_key  nonzero for keys, 0 for queries (extra coordinate 0)
 * @param alpha   the bound on ||k||^2, finite and >= 0
 * @param out     count x (dim + 1), written on success; may not overlap rows
 *
 * Errors: KMV_EINVAL (NULL with count > 0, dim = 0, alpha negative or not
 * finite, a key with ||k||^2 > alpha, norms taken in double), KMV_ENONFINITE,
 * KMV_EOVERFLOW. Thread-safe. */
KMV_API int kmv_attention_lift(const float *rows, size_t count, size_t dim, int is_key,
                               double alpha, float *out);

/* max_j ||row_j||^2 over count rows of dimension dim, in double: the
 * smallest alpha kmv_attention_lift() accepts for them. 0 for count = 0.
 * Thread-safe. */
KMV_API double kmv_max_sq_norm(const float *rows, size_t count, size_t dim);

/* sigma = 1 / sqrt(s) of the lifted kernel for logit scale s (scale 0
 * means 1/sqrt(dim), as params.attn_scale); 0 for dim = 0 or a scale that
 * is negative or not finite. Thread-safe. */
KMV_API double kmv_attention_sigma(double scale, size_t dim);

/* The paper's Assumption A statistics (Section 4, experiments i and ii) of
 * the n x n Gaussian kernel matrix K between queries 1..n and keys 1..n
 * under ctx's sigma (for attention, of the lifted points, as the paper
 * does). With a the sum of the n largest of its n^2 entries:
 *   c            = (||K||_1 - a) / a   (Assumption A: bounded in n)
 *   ratio_next   = n-th largest entry / (n+1)-th largest
 *   ratio_double = n-th largest entry / 2n-th largest
 * Entries are handled as logarithms, so matrices whose entries underflow
 * still get exact statistics (all three are invariant to scaling K); a
 * ratio past double's range is +infinity. Arithmetic is in double.
 * Memory O(n (dim + threads)): the matrix is never held. Time O(n^2 dim).
 * Errors: KMV_EINVAL (NULL argument, dim = 0), KMV_EEMPTY (n < 2),
 * KMV_ENONFINITE, KMV_EOVERFLOW, KMV_ENOMEM, KMV_ELIMIT (params.max_bytes).
 * Same thread-safety as kmv_matvec(). */
typedef struct kmv_tail_stats {
    double c;
    double ratio_next;
    double ratio_double;
} kmv_tail_stats;

KMV_API int kmv_tail_stats_get(const kmv_ctx *ctx, const float *queries, const float *keys,
                               size_t n, size_t dim, kmv_tail_stats *out);

/* ----------------------------------------------------------------- stream */

/* A growing context: keys with their x rows (or V rows) and queries
 * arrive in blocks, in any interleaving, and get ids 0, 1, 2, ... in
 * arrival order. Each key goes into the index's LSH tables (once they
 * exist) and into the x^2-grouped density sketch as it arrives, in time
 * proportional to the block, not to what the stream holds; the tables are
 * planned and filled once, at the first approximate answer, and again only
 * when the keys have doubled or the queries need a heavy threshold more
 * than twice as fine (amortized O(tables) per key). Answers are for the
 * current prefix, with no rebuild:
 *  - kmv_stream_matvec(): y = K x over every query and key so far (causal
 *    under params.causal: query i sees keys j <= i), with the x given at
 *    append time or a fresh one for the same keys;
 *  - kmv_stream_decode(): one query's row against every key so far, the
 *    step of a decoding loop, in time sublinear in the keys.
 * Same seed, same calls, same answers; how keys were split into blocks
 * does not change any answer (see kmv_stream_append_keys()).
 * Decoding steps may run from several threads at once on one stream (see
 * kmv_stream_decode()); every other call needs the stream to itself.
 * Distinct streams are independent. kmv_stream_create() makes a
 * Gaussian-kernel stream; kmv_stream_attention_create() an attention
 * stream, which takes decoding steps only in this version. */
typedef struct kmv_stream kmv_stream;

/* An empty stream of dim-dimensional keys and queries whose keys carry
 * n_cols values each, under ctx's params (copied). Errors: KMV_EINVAL (NULL
 * ctx or out, dim = 0, n_cols = 0), KMV_EOVERFLOW, KMV_ENOMEM. On error
 * *out is NULL. */
KMV_API int kmv_stream_create(const kmv_ctx *ctx, size_t dim, size_t n_cols,
                              kmv_stream **out);

/* Release a stream; NULL is a no-op. */
KMV_API void kmv_stream_free(kmv_stream *s);

/* Append count keys (count x dim) with their values x (count x n_cols).
 * Keys are shuffled into the store, hashed into the tables and added to
 * the sketch one by one in id order, so appending a prefix in one block or
 * in many gives the same stream, bit for bit (the tables' projections are
 * dot products in one fixed order). Errors: KMV_EINVAL, KMV_ENONFINITE,
 * KMV_EOVERFLOW (more than 2^32 - 2 keys), KMV_ENOMEM, KMV_ELIMIT
 * (params.max_bytes). On error the stream answers as before the call. */
KMV_API int kmv_stream_append_keys(kmv_stream *s, const float *keys, const float *x,
                                   size_t count);

/* Append count queries (count x dim). Errors as kmv_stream_append_keys(). */
KMV_API int kmv_stream_append_queries(kmv_stream *s, const float *queries, size_t count);

/* y = K x for every query and key so far (y: n_queries x n_cols), with the
 * x given at append time, or with x_fresh (n_keys x n_cols) when not NULL
 * (the tables are reused; the stored x does not change). Same guarantee,
 * fallbacks and stats as kmv_index_matvec(); causal under params.causal.
 * Errors as kmv_index_matvec(). */
KMV_API int kmv_stream_matvec(kmv_stream *s, const float *x_fresh, float *y, kmv_stats *stats);

/* The decoding step: y (n_cols) = sum_j K(query, k_j) x_j over every key so
 * far, with ||y - exact||_2 <= eps ||x||_2 with probability >= 1 - delta.
 * The query is not stored (append it to have it in later products). Its
 * heavy keys come from the tables, the keys with the largest x_j^2 are
 * summed exactly, the rest is a window sample sized from the sketch; the
 * row is computed exactly instead when the stream is small (below 2048
 * keys), when the plan would cost more than a quarter of the exact row
 * (predicted from a sample of the stored keys taken as queries, so the
 * plan does not hang on one query), or under params.exact (stats say
 * which). Cost: O(tables (k dim) +
 * candidates dim + (sketch_size + samples) dim), independent of the keys
 * held, once the tables exist; building them (at the first approximate
 * step, and when the keys double) is O(keys tables k dim).
 * Threads: steps may overlap one another on one stream (not any other
 * call on it). The first step at a new size plans the tables and draws
 * the sketch while the others wait; the rest only read. Neither depends
 * on the query, so every step answers exactly as it would alone, whatever
 * runs beside it. The allocator hook must then be thread-safe.
 * Errors: KMV_EINVAL, KMV_ENONFINITE, KMV_ENOMEM, KMV_ELIMIT,
 * KMV_EOVERFLOW (as kmv_matvec()), and on an attention stream with no keys
 * KMV_EEMPTY. On error y is untouched. A step whose own scratch passes
 * params.max_bytes reruns as the exact row (which needs less) and keeps
 * the tables; a plan that passes it drops them until the keys double. */
KMV_API int kmv_stream_decode(kmv_stream *s, const float *query, float *y, kmv_stats *stats);

/* An attention stream: the decoding step of softmax attention,
 * out = sum_j softmax_j(s <query, k_j>) v_j over every key so far, with s
 * from params.attn_scale (0: 1/sqrt(dim)). Keys are kept lifted by Lemma
 * 4.1 (see kmv_attention_lift()) to dim + 1 dimensions with sigma =
 * 1/sqrt(s), beside the values [v_j, 1], so that one approximate row gives
 * both sum_j K'_j v_j and the row sum sum_j K'_j. The lift's bound alpha is
 * the largest ||k||^2 appended so far; a key past it raises the bound,
 * and the keys already held are lifted again and their tables dropped
 * (planned again at the next step). For keys of independent, identically
 * distributed norms that happens about ln n times over n keys, so a key
 * still costs O(tables) amortized up to a log factor.
 *
 * Guarantee per decoding step: the additive bound of the Gaussian stream
 * would be eps ||[V, 1]|| against row sums that, lifted, can be far
 * smaller. An attention step instead budgets its samples against a lower
 * confidence bound on the row's whole lifted sum Z: lo = L + max(0, Z_w -
 * D_Z), with L the part computed exactly (heavy keys found by LSH,
 * exactly summed columns) and Z_w the window sample's estimate of the
 * rest, D_Z its deviation bound. It keeps a window once the deviation
 * bounds D of its [v, 1] estimate have ||D|| <= eps lo, drawing larger
 * windows (sizes min_samples 2^j) until one does or half the keys would
 * be needed. Then with probability >= 1 - delta the error of
 * [sum K' v, sum K'] is at most eps Z, which gives the normalized output
 *   ||out - exact||_2 <= eps sqrt(1 + R^2) / (1 - eps),  R = max_j ||v_j||,
 * reported as stats.error_bound (stats.error_measured: the same norm when
 * params.measure_error). Under params.attn_budget = KMV_BUDGET_CERTIFIED
 * (the default) each column's D is an empirical Bernstein-Serfling bound
 * (Bardenet and Maillard 2015, Theorem 3: sampling without replacement),
 * the window's own variance plus a range term, the range being what the
 * light keys are certified to stay under: the largest value any lifted
 * key can have (below), or the heavy threshold where the LSH tables were
 * searched, planned to miss any key above it with probability delta / 2
 * in all. The failure probability is split over the window sizes and the
 * columns, so the bound holds for whichever window is kept. It holds per
 * step for a query chosen independently of the stream's random choices
 * (a decoding loop's next query depends on earlier outputs, which the
 * bound does not cover). The range term is what rules out a dominant key
 * that no window met; where the light keys cannot be bounded well below
 * the row sum (attention spread over many keys whose logits lie far below
 * ||q|| sqrt(alpha)), the samples that would cover it pass half the keys
 * and the step computes the exact softmax row instead, as it does below
 * 2048 keys and under params.exact; the exact row is taken with the
 * running maximum subtracted and never overflows. Under
 * KMV_BUDGET_EMPIRICAL the windows are sized by their own variance (the
 * paper's appendix A.1.4 implementation): far fewer samples on spread
 * rows, no bound (stats.error_bound INFINITY), and a dominant key that no
 * window meets goes unseen.
 *
 * A step's kernel values are taken relative to exp(-(||q|| -
 * sqrt(alpha))^2 / (2 sigma^2)), the largest value any lifted key can have
 * (every lifted key has ||k'||^2 = alpha), so a long query does not fall
 * below float's range (a row whose sum still does, below n 2^-119 / eps,
 * runs exact); the subtraction costs a logit error of about s (||q||^2 +
 * alpha) 2^-24. Windows start at a hash of the query.
 *
 * kmv_stream_append_keys() takes keys (count x dim) and V (count x
 * n_cols); kmv_stream_decode() writes n_cols outputs. Decoding steps only
 * in this version: kmv_stream_append_queries(), kmv_stream_matvec() and
 * kmv_stream_save() return KMV_EUNSUPPORTED on an attention stream (for
 * a batch, kmv_attention()); a step over no keys is KMV_EEMPTY (a
 * softmax over nothing). Errors: as kmv_stream_create(). */
KMV_API int kmv_stream_attention_create(const kmv_ctx *ctx, size_t dim, size_t n_cols,
                                        kmv_stream **out);

/* What a stream holds and the work it has done, all time. */
typedef struct kmv_stream_info {
    size_t n_keys, n_queries, dim, n_cols;
    size_t bytes;            /* held through the allocator now */
    uint64_t keys_hashed;    /* keys projected into LSH tables */
    uint64_t table_inserts;  /* (key, table) inserts */
    uint64_t table_builds;   /* times the tables were planned and filled */
    uint64_t sketch_inserts; /* keys added to the density sketch */
    int lsh_tables;          /* tables held now (0: none yet) */
    int attention;           /* 1 for kmv_stream_attention_create() */
    double key_bound;        /* attention: the lift's bound, max ||k||^2 */
    uint64_t relifts;        /* attention: times the bound rose and the
                                keys held were lifted again */
} kmv_stream_info;

/* Fill *info. Errors: KMV_EINVAL (NULL argument). */
KMV_API int kmv_stream_info_get(const kmv_stream *s, kmv_stream_info *info);

/* Save the stream to path: its params, keys (in the store's order, with
 * the shuffle's state), values, queries and table shape, followed by an
 * XXH3-64 checksum of everything before it. Written by the rules of
 * kmv_output_open(), so path holds the old file or the whole new one,
 * never part of either. err as for kmv_npy_read(). Errors: KMV_EINVAL,
 * KMV_EIO, KMV_ENOMEM. */
KMV_API int kmv_stream_save(const kmv_stream *s, const char *path, char *err, size_t err_len);

/* Load a stream saved by kmv_stream_save(). The algorithm's params (sigma,
 * eps, delta, seed, alpha, gamma, sketch_size, min_samples, causal, exact)
 * come from the file; the allocator, threads, memory cap, progress hook
 * and measure_error from ctx. The loaded stream answers and continues
 * exactly as the saved one would have. A file that is not a kmv stream,
 * from another format version, truncated, extended or damaged anywhere
 * (checksum), or inconsistent, is refused with KMV_EFORMAT and a message;
 * nothing is left allocated. Errors: KMV_EINVAL, KMV_EIO, KMV_EFORMAT,
 * KMV_ENOMEM, KMV_ELIMIT. On error *out is NULL. */
KMV_API int kmv_stream_load(const kmv_ctx *ctx, const char *path, kmv_stream **out, char *err,
                            size_t err_len);

/* Find the first NaN or infinity among count floats.
 * Returns KMV_OK if there is none, else KMV_ENONFINITE and, when where is
 * not NULL, sets *where to its index. data may be NULL when count = 0.
 * Thread-safe. */
KMV_API int kmv_find_nonfinite(const float *data, size_t count, size_t *where);

/* ---------------------------------------------------------------- .npy I/O */

/* A float32 array read from a .npy file: rows x cols, row-major. A 1-D file
 * of length n reads as ndim = 1, rows = n, cols = 1. */
typedef struct kmv_array {
    float *data;
    size_t rows;
    size_t cols;
    int ndim;                /* 1 or 2, as stored in the file */
    kmv_allocator allocator; /* the one data came from */
} kmv_array;

/* Read a NumPy .npy file (format versions 1, 2 and 3) holding little-endian
 * float32 or float64 (converted to float32; values beyond float32's range
 * are an error, not infinity) in C order, 1-D or 2-D. Fortran order is
 * accepted for 1-D arrays, where it is the same layout, and refused for 2-D.
 *
 * @param path   file to read
 * @param alloc  allocator for out->data (NULL: malloc/free)
 * @param out    filled on success; release with kmv_array_free()
 * @param err    when not NULL, receives on failure a message that names the
 *               file and the reason (truncated to err_len bytes, with NUL);
 *               set to "" on success
 *
 * Errors: KMV_EINVAL (NULL path or out, an allocator with only one of
 * alloc/free set), KMV_EIO (cannot open or read),
 * KMV_EFORMAT (not .npy, unsupported dtype, order, rank or version, a
 * malformed header, data shorter or longer than the header says),
 * KMV_EOVERFLOW (the shape's product overflows), KMV_ENOMEM.
 * On error *out is zeroed. Thread-safe. */
KMV_API int kmv_npy_read(const char *path, const kmv_allocator *alloc,
                         kmv_array *out, char *err, size_t err_len);

/* Release an array's data and zero it; NULL or an empty array is a no-op.
 * Not concurrently with other uses of the same array. */
KMV_API void kmv_array_free(kmv_array *a);

/* ---------------------------------------------------------------- outputs */

/* An output file that appears whole or not at all. Every file kmv writes
 * (kmv_npy_write(), kmv_stream_save(), each output of the kmv tool) follows
 * these rules:
 *  - "-", /dev/stdout, /dev/stderr, /dev/fd/N and /proc/self/fd/N name one
 *    of the process's descriptors, which is written directly;
 *  - symbolic links are followed: the file at the end is written and the
 *    links stay as they are;
 *  - a character device (/dev/null, a terminal) or a FIFO is written
 *    directly, streamed, with no temporary file, rename or fsync; opening a
 *    FIFO waits for its reader. A directory, block device or socket is
 *    refused;
 *  - anything else (a regular file, or a name not yet taken) is written to
 *    a temporary file "<target>.tmp.XXXXXX" beside it, created when the
 *    output is opened, so that a missing or unwritable directory fails
 *    before any work; kmv_output_commit() syncs it, renames it over the
 *    target and syncs the directory, so a crash at any moment leaves the
 *    old file or the complete new one. An existing file keeps its mode
 *    and, where the caller may set them, its owner and group (a second
 *    hard link to it keeps the old content). A new file gets 0666 less
 *    the umask. Any failure, or kmv_output_discard(), removes the
 *    temporary and leaves the target as it was.
 * One handle per thread; distinct handles are independent. */
typedef struct kmv_output kmv_output;

/* Open path for writing as above. alloc as for kmv_npy_read(); err
 * receives a message naming the path and the reason. Errors: KMV_EINVAL
 * (NULL or empty path, NULL out, half-set allocator), KMV_EIO (the
 * directory is missing or not writable, the target is refused or cannot
 * be opened), KMV_ENOMEM. On error *out is NULL and nothing is left
 * behind. */
KMV_API int kmv_output_open(const char *path, const kmv_allocator *alloc, kmv_output **out,
                            char *err, size_t err_len);

/* Append len bytes. Errors: KMV_EINVAL, KMV_EIO (the output is then
 * failed: commit refuses it). */
KMV_API int kmv_output_write(kmv_output *o, const void *data, size_t len, char *err,
                             size_t err_len);

/* Publish what was written (see above) and release o, whatever the
 * outcome. Errors: KMV_EINVAL (NULL), KMV_EIO (a write, the sync, close or
 * rename failed: the target is as it was). */
KMV_API int kmv_output_commit(kmv_output *o, char *err, size_t err_len);

/* Drop what was written, remove the temporary file and release o; NULL is
 * a no-op. What a device or pipe received stays received. */
KMV_API void kmv_output_discard(kmv_output *o);

/* The temporary file's path while o is open, or NULL for a direct output:
 * for a host's signal handler, which may unlink(2) it. Valid until o is
 * committed or discarded. */
KMV_API const char *kmv_output_temp_path(const kmv_output *o);

/* Where an output of path would land: path with every symbolic link
 * followed, absolute ("/dev/fd/N" for the descriptor names above), into buf
 * (len bytes). For telling whether two paths name one file before writing
 * either. Errors: KMV_EINVAL, KMV_EIO (a directory on the way is missing,
 * too many links). Thread-safe. */
KMV_API int kmv_output_target(const char *path, char *buf, size_t len, char *err,
                              size_t err_len);

/* Write a float32 .npy file (version 1.0), 1-D of length rows when
 * ndim = 1 (cols must then be 1), else rows x cols, by the rules of
 * kmv_output_open(): path holds its old content or the complete new array,
 * never part of one. err as for kmv_npy_read().
 * Errors: KMV_EINVAL (bad ndim, NULL path, NULL data with nonzero size),
 * KMV_EOVERFLOW, KMV_EIO (with err naming the file and reason),
 * KMV_ENOMEM. Thread-safe for distinct paths. */
KMV_API int kmv_npy_write(const char *path, const float *data, int ndim,
                          size_t rows, size_t cols, char *err, size_t err_len);

/* The same array written to an open output (not committed: the caller
 * publishes it with kmv_output_commit()). Errors as kmv_npy_write(). */
KMV_API int kmv_npy_write_output(kmv_output *o, const float *data, int ndim, size_t rows,
                                 size_t cols, char *err, size_t err_len);

#ifdef __cplusplus
}
#endif

#endif /* KMV_H */
