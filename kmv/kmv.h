/*
 * kmv: fast Gaussian-kernel matrix-vector products and transformer attention.
 *
 *     y = K x,   K_ij = exp(-||q_i - k_j||^2 / (2 sigma^2))
 *     O = D^-1 A V,  A_ij = exp(s <q_i, k_j>),  s = 1/sqrt(d) unless given,
 *                    D = diag(A 1)
 *
 * BANDWIDTH: sigma is the Gaussian's standard deviation. Code written for
 * exp(-||q-k||^2 / h^2) must pass sigma = h / sqrt(2).
 *
 * GUARANTEE (without params.exact): ||Kx - y||_2 <= eps ||x||_2 with
 * probability >= 1 - delta (Frobenius norms for several columns); an
 * attention row is within eps sqrt(1 + R^2) / (1 - eps), R = max ||v_j||.
 * Where approximating would cost more, the exact engine answers (stats say
 * why). The arguments: docs/guarantee-gaussian.md, docs/guarantee-attention.md.
 *
 * CONVENTIONS
 *  - Matrices are float32, row-major, contiguous: keys n_keys x dim, queries
 *    n_queries x dim, x (or V) n_keys x n_cols, y (or O) n_queries x n_cols.
 *  - Calls return KMV_OK (0) or a negative KMV_E* code; no global error.
 *  - Inputs are never modified nor retained. A call that fails leaves its
 *    outputs untouched unless its declaration says otherwise.
 *  - All memory goes through params.allocator (BLAS and OpenMP keep their
 *    own buffers outside it).
 *  - The same inputs, params and seed give the same outputs, bit for bit,
 *    whatever the thread count.
 *
 * THREADS
 *  - Any number at once: version and error queries, kmv_params_*,
 *    kmv_find_nonfinite, kmv_ctx_create, kmv_attention_lift and friends,
 *    kmv_npy_read, kmv_output_target, kmv_npy_write on distinct paths.
 *  - One context: any number of kmv_matvec, kmv_attention and
 *    kmv_index_create calls at once; kmv_ctx_free when none runs.
 *  - One index, one kmv_output: one call at a time.
 *  - One stream: any number of kmv_stream_decode at once; every other call
 *    alone.
 *  - Calls run OpenMP teams (params.n_threads) and call the allocator from
 *    them: it must be thread-safe. The progress hook runs on the caller's
 *    thread only.
 *
 * EXPERIMENTAL knobs (the algorithm's exponents, forced approximation, the
 * empirical attention budget) and the engine's internal counters are in
 * kmv/kmv_experimental.h, behind KMV_STATIC_LINKING_ONLY as zstd does.
 *
 * ABI: none promised before 1.0; rebuild against the header of the library
 * you link (KMV_VERSION_NUMBER). Source compatibility holds across minor
 * versions for callers that start from kmv_params_init().
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
#define KMV_VERSION_MINOR 3
#define KMV_VERSION_PATCH 0
#define KMV_VERSION_NUMBER \
    (KMV_VERSION_MAJOR * 10000 + KMV_VERSION_MINOR * 100 + KMV_VERSION_PATCH)

/* "MAJOR.MINOR.PATCH" of the linked library; static storage. */
KMV_API const char *kmv_version_string(void);
/* The linked library's KMV_VERSION_NUMBER. */
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

/* A message for any code ("unknown error" otherwise); never NULL. */
KMV_API const char *kmv_strerror(int code);
/* The code's symbolic name ("KMV_ENOMEM"), or "KMV_UNKNOWN". */
KMV_API const char *kmv_errname(int code);

/* -------------------------------------------------------------- allocator */

/* Every allocation the library makes. alloc returns NULL on failure (the
 * call then returns KMV_ENOMEM and frees what it took) and memory aligned
 * as malloc's; free accepts NULL. Both thread-safe; neither may call kmv.
 * {NULL, NULL, NULL} selects malloc/free. */
typedef struct kmv_allocator {
    void *(*alloc)(void *opaque, size_t size);
    void (*free)(void *opaque, void *ptr);
    void *opaque;
} kmv_allocator;

/* ----------------------------------------------------------------- params */

typedef struct kmv_params {
    double sigma;      /* bandwidth, in [1e-150, 1e150]. Default 1 */
    double attn_scale; /* attention's s; 0 means 1/sqrt(dim). Default 0 */
    int causal;        /* 1: query i sees keys j <= i only. Default 0 */
    int exact;         /* 1: the exact engine always. Default 0 */
    double eps;        /* error target, in (0, 1). Default 0.1 */
    double delta;      /* failure probability, in (0, 1). Default 0.01 */
    uint64_t seed;     /* every random choice derives from it. Default 1 */
    int measure_error; /* 1: also run exact and report the error (costs
                          an exact product). Default 0 */
    int n_threads;     /* threads per call; 0: OpenMP's default. Default 0 */
    kmv_allocator allocator; /* Default malloc/free */
    size_t max_bytes;  /* cap on what a handle (or one call on a context)
                          holds through the allocator, block headers
                          included; past it KMV_ELIMIT, or for an
                          approximate plan the exact engine (fallback
                          "memory"). 0: no cap. Default 0 */
    /* Called with the fraction done, nondecreasing, ending with 1 on
     * success; on the caller's thread; must not call kmv. Default NULL. */
    void (*progress)(void *opaque, double fraction);
    void *progress_opaque;
    /* Experimental knobs, set through kmv_experimental.h; kmv_params_init()
     * gives them their defaults. Not to be touched directly. */
    unsigned char experimental_[96];
} kmv_params;

/* Fill *p with the defaults above. */
KMV_API void kmv_params_init(kmv_params *p);
/* KMV_OK, or KMV_EINVAL when a field is out of its range. */
KMV_API int kmv_params_check(const kmv_params *p);

/* ------------------------------------------------------------------ stats */

typedef enum kmv_mode {
    KMV_MODE_EXACT = 0,   /* the exact engine, as asked (params.exact) */
    KMV_MODE_APPROX = 1,  /* the approximate engine answered */
    KMV_MODE_FALLBACK = 2 /* approximation was asked; exact was cheaper */
} kmv_mode;

/* Why the exact engine answered in place of the approximate one. */
typedef enum kmv_fallback {
    KMV_FALLBACK_NONE = 0,
    KMV_FALLBACK_LSH = 1,     /* no heavy search costs under a quarter of exact */
    KMV_FALLBACK_HEAVY = 2,   /* the search met more candidates than that */
    KMV_FALLBACK_SAMPLES = 3, /* the samples would cost more than exact */
    KMV_FALLBACK_COLUMNS = 4, /* too many huge x_j to sum exactly */
    KMV_FALLBACK_BUDGET = 5,  /* the dropped keys alone pass eps */
    KMV_FALLBACK_SMALL = 6,   /* too small to gain */
    KMV_FALLBACK_MEMORY = 7,  /* the plan would pass params.max_bytes */
    KMV_FALLBACK_TREE = 8     /* the bounds tree could not certify the row
                                 within a quarter of the exact row's keys */
} kmv_fallback;

/* "none", "lsh", ... for a kmv_fallback; "unknown" otherwise. */
KMV_API const char *kmv_fallback_name(int reason);

/* What one call did; times are wall-clock seconds. */
typedef struct kmv_stats {
    int mode;               /* a kmv_mode */
    int fallback_reason;    /* a kmv_fallback; NONE unless mode is FALLBACK */
    size_t n_keys, n_queries, dim, n_cols;
    int n_threads;
    uint64_t kernel_evals;  /* kernel entries evaluated */
    int wide_dots;          /* 1: the exact engine's dots ran in float64 */
    size_t rows_exact;      /* rows the approximate engine summed exactly */
    double error_bound;     /* the bound guaranteed: 0 for mode EXACT, else
                               eps (attention: the per-row bound), which a
                               fallback meets trivially; INFINITY where
                               none is claimed */
    double error_measured;  /* ||Kx - y|| / ||x|| (attention ||O - exact||_F
                               / ||V||_F) under params.measure_error, 0 when
                               exact answered; else -1 */
    double seconds;         /* the whole call */
    double seconds_prepare; /* validation, norms, scratch */
    double seconds_kernel;  /* the exact engine (a fallback's too) */
    double seconds_measure; /* params.measure_error's exact product */
    /* The approximate engine's counters: kmv_experimental.h reads them. */
    unsigned char experimental_[320];
} kmv_stats;

/* ---------------------------------------------------------------- context */

/* Validated params and allocator; read-only once made, so any number of
 * calls may share one. */
typedef struct kmv_ctx kmv_ctx;

/* A context from *params (NULL: the defaults). Errors: KMV_EINVAL,
 * KMV_ENOMEM; *out is NULL on error. */
KMV_API int kmv_ctx_create(const kmv_params *params, kmv_ctx **out);
/* NULL is a no-op; only when no call runs on it. */
KMV_API void kmv_ctx_free(kmv_ctx *ctx);
/* The params it was made with. */
KMV_API const kmv_params *kmv_ctx_get_params(const kmv_ctx *ctx);

/* ------------------------------------------------------------- operations */

/* y = K x, causal under params.causal (K_ij = 0 for j > i).
 * queries: n_queries x dim; keys: n_keys x dim; x: n_keys x n_cols;
 * y: n_queries x n_cols, not overlapping the inputs; stats may be NULL.
 * n_queries or n_cols = 0: nothing written; n_keys = 0: y = 0; dim >= 1.
 * Exact engine: within 1e-5 of a float64 evaluation relative to
 * sum_j |K_ij x_j|, in O(n_queries n_keys (dim + n_cols)) time and no
 * n_queries x n_keys matrix held. Otherwise the GUARANTEE above.
 * Errors: KMV_EINVAL, KMV_ENONFINITE, KMV_EOVERFLOW (sizes, or y past
 * float's range; y is then unspecified), KMV_ENOMEM, KMV_ELIMIT. */
KMV_API int kmv_matvec(const kmv_ctx *ctx,
                       const float *queries, size_t n_queries,
                       const float *keys, size_t n_keys, size_t dim,
                       const float *x, size_t n_cols,
                       float *y, kmv_stats *stats);

/* O = D^-1 A V, causal under params.causal, shapes as kmv_matvec() (v is
 * n_keys x n_cols, out n_queries x n_cols). Logits are shifted by their row
 * maximum: nothing overflows; inputs whose logits could pass float's range
 * (max ||q|| max ||k|| s above FLT_MAX / 1024) are KMV_EOVERFLOW. n_keys = 0
 * is KMV_EEMPTY. Without params.exact each row carries the attention
 * GUARANTEE above (batch attention in docs/guarantee-attention.md). Errors
 * otherwise as kmv_matvec(). */
KMV_API int kmv_attention(const kmv_ctx *ctx,
                          const float *q, size_t n_queries,
                          const float *k, size_t n_keys, size_t dim,
                          const float *v, size_t n_cols,
                          float *out, kmv_stats *stats);

/* Lemma 4.1 (docs/guarantee-attention.md): for alpha >= max ||k||^2, keys
 * become (k, sqrt(alpha - ||k||^2)) and queries (q, 0), so that
 * exp(s <q, k>) = exp(s (||q||^2 + alpha) / 2) K'(q', k') with sigma =
 * 1/sqrt(s). rows: count x dim; out: count x (dim + 1). is_key: 1 for keys.
 * Errors: KMV_EINVAL (NULL, dim = 0, bad alpha, a key past it),
 * KMV_ENONFINITE, KMV_EOVERFLOW. */
KMV_API int kmv_attention_lift(const float *rows, size_t count, size_t dim, int is_key,
                               double alpha, float *out);
/* max ||row||^2 in double: the least alpha for those rows; 0 if count = 0. */
KMV_API double kmv_max_sq_norm(const float *rows, size_t count, size_t dim);
/* The lifted kernel's sigma = 1/sqrt(s) (scale 0: s = 1/sqrt(dim)); 0 for a
 * bad scale or dim = 0. */
KMV_API double kmv_attention_sigma(double scale, size_t dim);

/* KMV_OK when data[0..count) is finite, else KMV_ENONFINITE with *where
 * (when not NULL) the first bad index. data may be NULL if count = 0. */
KMV_API int kmv_find_nonfinite(const float *data, size_t count, size_t *where);

/* ------------------------------------------------------------------ index */

/* Keys held for repeated approximate products with fresh x: the keys in a
 * random order and the tables over them. One call at a time per index. */
typedef struct kmv_index kmv_index;

/* An empty index of dim-dimensional keys under ctx's params (copied).
 * Errors: KMV_EINVAL, KMV_EOVERFLOW, KMV_ENOMEM. */
KMV_API int kmv_index_create(const kmv_ctx *ctx, size_t dim, kmv_index **out);
/* NULL is a no-op. */
KMV_API void kmv_index_free(kmv_index *ix);
/* Append n_keys keys (n_keys x dim), ids kmv_index_get_size() onwards, in
 * time proportional to the block. Errors: KMV_EINVAL, KMV_ENONFINITE,
 * KMV_EOVERFLOW (past 2^32 - 2 keys), KMV_ENOMEM, KMV_ELIMIT; the index
 * then answers as before (room it reserved may stay held). */
KMV_API int kmv_index_append(kmv_index *ix, const float *keys, size_t n_keys);
/* y = K x over the index's keys (x: size x n_cols in id order), with the
 * GUARANTEE above; the tables are reused across calls. Errors as
 * kmv_matvec(). */
KMV_API int kmv_index_matvec(kmv_index *ix, const float *queries, size_t n_queries,
                             const float *x, size_t n_cols, float *y, kmv_stats *stats);
/* Keys held; bytes held through the allocator now, and the most held. */
KMV_API size_t kmv_index_get_size(const kmv_index *ix);
KMV_API size_t kmv_index_get_bytes(const kmv_index *ix);
KMV_API size_t kmv_index_get_peak_bytes(const kmv_index *ix);

/* ----------------------------------------------------------------- stream */

/* A growing context. Keys with their x rows (or V rows) and queries arrive
 * in blocks, in any interleaving, with ids 0, 1, 2, ... in arrival order;
 * each costs time proportional to its block (amortized O(tables) per key).
 * Answers cover the current prefix, with no rebuild, and do not depend on
 * how the keys were split into blocks. */
typedef struct kmv_stream kmv_stream;

/* A Gaussian stream: dim-dimensional keys carrying n_cols values each.
 * Errors: KMV_EINVAL, KMV_EOVERFLOW, KMV_ENOMEM; *out NULL on error. */
KMV_API int kmv_stream_create(const kmv_ctx *ctx, size_t dim, size_t n_cols,
                              kmv_stream **out);
/* An attention stream: decoding steps of softmax attention with scale s =
 * params.attn_scale (0: 1/sqrt(dim)) over keys (dim) and values (n_cols),
 * each step within the attention GUARANTEE. Keys are kept lifted by Lemma
 * 4.1 under alpha = the largest ||k||^2 so far (a longer key lifts the
 * rest again, about ln n times for n keys of i.i.d. norms); a key whose
 * lift would pass float's range (sqrt(alpha) past FLT_MAX) is refused with
 * KMV_EOVERFLOW. A step over no keys is KMV_EEMPTY. Errors: as kmv_stream_create(). */
KMV_API int kmv_stream_attention_create(const kmv_ctx *ctx, size_t dim, size_t n_cols,
                                        kmv_stream **out);
/* NULL is a no-op. */
KMV_API void kmv_stream_free(kmv_stream *s);

/* count keys (count x dim) with their values (count x n_cols). Errors:
 * KMV_EINVAL, KMV_ENONFINITE, KMV_EOVERFLOW, KMV_ENOMEM, KMV_ELIMIT; the
 * stream then answers as before. */
KMV_API int kmv_stream_append_keys(kmv_stream *s, const float *keys, const float *x,
                                   size_t count);
/* count queries (count x dim). Errors as above. */
KMV_API int kmv_stream_append_queries(kmv_stream *s, const float *queries, size_t count);

/* y (n_queries x n_cols) = K x over every query and key so far, with the x
 * given at append or x_fresh (n_keys x n_cols) when not NULL; GUARANTEE,
 * fallbacks and errors as kmv_index_matvec(). On an attention stream, each
 * query's row of softmax(s Q K^T) V over every key so far, as kmv_attention
 * computes it (one decoding step per row, each within the attention
 * GUARANTEE; the same rows bit for bit); x_fresh is KMV_EUNSUPPORTED
 * (values come with their keys), queries over no keys KMV_EEMPTY, and
 * logits near float's range KMV_EOVERFLOW (as kmv_attention, y then
 * untouched). */
KMV_API int kmv_stream_matvec(kmv_stream *s, const float *x_fresh, float *y, kmv_stats *stats);

/* The decoding step: y (n_cols) = one query's row against every key so far,
 * within the GUARANTEE (eps ||x||; attention: the per-row bound), in time
 * independent of the keys held once the tables exist (planned at the first
 * step after the keys double, from a sample of the stored keys). The query
 * is not stored. Below 2048 keys, where the plan would cost more than a
 * quarter of the exact row, and under params.exact, the exact row answers.
 * Steps may run concurrently on one stream; each answers as it would alone.
 * Errors: KMV_EINVAL, KMV_ENONFINITE, KMV_ENOMEM, KMV_ELIMIT, KMV_EOVERFLOW,
 * KMV_EEMPTY (attention, no keys). A step past params.max_bytes reruns as
 * the exact row; a plan past it drops the tables until the keys double. */
KMV_API int kmv_stream_decode(kmv_stream *s, const float *query, float *y, kmv_stats *stats);

/* What a stream holds and has done, all time. */
typedef struct kmv_stream_info {
    size_t n_keys, n_queries, dim, n_cols;
    size_t bytes;            /* held through the allocator now */
    uint64_t keys_hashed;    /* keys projected into LSH tables */
    uint64_t table_inserts;  /* (key, table) inserts */
    uint64_t table_builds;   /* times the tables were planned and filled */
    uint64_t sketch_inserts; /* keys added to the density sketch */
    int lsh_tables;          /* tables held now (0: none) */
    int attention;           /* 1 for an attention stream */
    double key_bound;        /* attention: the lift's alpha */
    uint64_t relifts;        /* attention: times the keys were lifted again */
    /* The decoding steps' bounds tree (Gaussian streams): built at each
     * power of two of the keys where its trial shows it cheap, and grown
     * key by key between (docs/bounds.md). */
    uint64_t tree_builds;       /* builds, kept or dropped */
    uint64_t tree_inserts;      /* keys inserted into a built tree */
    double tree_seconds_insert; /* those inserts' time: the append cost
                                   per key is this over tree_inserts */
    size_t tree_keys;           /* keys under the tree the steps take now
                                   (0: none) */
    size_t tree_bytes;          /* its memory */
} kmv_stream_info;

/* Errors: KMV_EINVAL. */
KMV_API int kmv_stream_get_info(const kmv_stream *s, kmv_stream_info *info);
/* The params s answers under: as made, or for a loaded stream the file's
 * algorithm params with ctx's allocator, threads, cap and hooks. An
 * attention stream gives its effective scale s in attn_scale and the
 * lifted kernel's bandwidth 1/sqrt(s) in sigma. Errors: KMV_EINVAL. */
KMV_API int kmv_stream_get_params(const kmv_stream *s, kmv_params *out);

/* Save a stream (params, keys in store order with the shuffle's state,
 * values, queries, table shape; an attention stream's lift: its scale,
 * bound and key norms; XXH3-64 of it all) by the rules of
 * kmv_output_open(). Errors: KMV_EINVAL, KMV_EIO, KMV_ENOMEM. err as for
 * kmv_npy_read(). */
KMV_API int kmv_stream_save(const kmv_stream *s, const char *path, char *err, size_t err_len);
/* A stream saved by kmv_stream_save(): the algorithm's params from the
 * file, allocator, threads, cap and hooks from ctx; it answers and goes on
 * exactly as the saved one. A file not a snapshot of this version, or
 * damaged anywhere, is KMV_EFORMAT. Errors: KMV_EINVAL, KMV_EIO,
 * KMV_EFORMAT, KMV_ENOMEM, KMV_ELIMIT; *out NULL on error. */
KMV_API int kmv_stream_load(const kmv_ctx *ctx, const char *path, kmv_stream **out, char *err,
                            size_t err_len);

/* ------------------------------------------------------------- regression */

/* Least squares against the attention proxies of Xiong, He and Du (the
 * regression paper, docs/regress.md), for A (n x d, float32, row-major) and
 * b (float64):
 *   KMV_REGRESS_EXP:   min over x in R^n of ||(exp(s A A^T) + ridge I) x - b||,
 *                      b in R^n; exp entrywise, s = rp.scale (0:
 *                      1/sqrt(d)). The matrix is D K D + ridge I, D =
 *                      diag(exp(s ||a_i||^2 / 2)) and K the Gaussian kernel
 *                      of A's rows at sigma = 1/sqrt(s): positive definite
 *                      for distinct rows or ridge > 0, solved by conjugate
 *                      gradients on its Jacobi scaling (kept in the log
 *                      domain; precondition 0 keeps it too) whose products
 *                      are kmv's (exact under the context's params.exact,
 *                      else approximate where the cost model says it pays),
 *                      preconditioned by a randomized Nystrom approximation
 *                      from columns drawn by pivoted Cholesky. Products are
 *                      float32: for n <= 16384 the float64 residual drives
 *                      up to 3 refinements, which meet tol while about 1e-7
 *                      cond(M) < 1; each solve stops at product_error (its
 *                      floor) if that is above tol.
 *   KMV_REGRESS_GRAM:  min over x in R^d of ||(A^T A)^j x - b||, b in R^d.
 *   KMV_REGRESS_AGRAM: min over x in R^d of ||A (A^T A)^j x - b||, b in R^n.
 *                      Both by sketch-and-precondition: a CountSketch S of
 *                      A, R from the QR of SA, and iterations on A R^-1
 *                      (LSQR, and conjugate gradients on the normal
 *                      equations for each power), whose count does not grow
 *                      with cond(A); (A^T A)^j is never formed. */
typedef enum kmv_regress_problem {
    KMV_REGRESS_EXP = 0,
    KMV_REGRESS_GRAM = 1,
    KMV_REGRESS_AGRAM = 2
} kmv_regress_problem;

typedef struct kmv_regress_params {
    int problem;        /* a kmv_regress_problem. Default EXP */
    int power;          /* j >= 1, for GRAM and AGRAM. Default 1 */
    double scale;       /* s > 0 of exp(s A A^T); 0: 1/sqrt(d). Default 0 */
    double ridge;       /* >= 0, added to exp's diagonal. Default 0 */
    double tol;         /* in (0, 1): stop when the iteration's relative
                           residual is under it. Default 1e-6 */
    int max_iter;       /* iterations per solve, >= 1. Default 1000 */
    int precondition;   /* 1: the sketch (GRAM, AGRAM) or Nystrom (EXP)
                           preconditioner; 0: plain iterations, to compare.
                           Default 1 */
    size_t sketch_rows; /* rows of the sketch (GRAM, AGRAM; 0: 4 d) or
                           columns sampled (EXP; 0: min(n, 200)). Default 0 */
    /* When not NULL: the relative residual after each iteration, the first
     * history_len of them (stats.iterations says how many there were). */
    double *history;
    size_t history_len;
} kmv_regress_params;

/* Fill *p with the defaults above. */
KMV_API void kmv_regress_params_init(kmv_regress_params *p);

/* What kmv_regress() did; times are wall-clock seconds. */
typedef struct kmv_regress_stats {
    int iterations;          /* iterations, over every inner solve */
    int converged;           /* 1: every solve met tol within max_iter
                                (EXP: the final residual is under tol, or
                                where it is -1, the last solve met tol) */
    double residual;         /* ||M x - b|| / ||b||, recomputed in float64
                                at the end (EXP: for n <= 16384; beyond,
                                through the exact engine's float32 product
                                under params.exact, good to about 1e-7
                                cond(M), else -1) */
    double residual_optimal; /* the optimum's ||M x* - b|| / ||b|| where
                                it is known cheaply (AGRAM: ||b - Q Q^T b||
                                / ||b||; GRAM with A of full rank, EXP with
                                ridge > 0 or distinct rows: 0), else -1 */
    size_t sketch_rows;      /* as used */
    uint64_t products;       /* products with A or A^T (GRAM, AGRAM) or
                                with the kernel matrix (EXP) */
    int approx_products;     /* EXP: products the approximate engine
                                answered */
    double product_error;    /* EXP: the products' error bound, relative
                                to ||M||: eps once an approximate product
                                answered, else 0 (exact products carry
                                float32's 1e-7) */
    double log_scale_max;    /* EXP: max s ||a_i||^2 / 2 */
    double seconds, seconds_precond, seconds_products;
} kmv_regress_stats;

/* Solve the problem rp->problem for A (n x d) and b (b_len = n for EXP
 * and AGRAM, d for GRAM) into x (n for EXP, d otherwise), under ctx's
 * params (eps, delta, seed, exact, threads, allocator, max_bytes). x is
 * written only on success. Errors: KMV_EINVAL (NULL, a param out of range,
 * n or d of 0), KMV_EDIM (b_len), KMV_ENONFINITE (A or b), KMV_EOVERFLOW
 * (EXP: exp(s ||a_i||^2) + ridge past double's range, or x past it or
 * underflowing entirely; stats.log_scale_max names the largest
 * s ||a_i||^2 / 2), KMV_ENOMEM,
 * KMV_ELIMIT. Not converging within max_iter is not an error: stats say
 * so. Any number of calls at once on one context. */
KMV_API int kmv_regress(const kmv_ctx *ctx, const kmv_regress_params *rp, const float *a,
                        size_t n, size_t d, const double *b, size_t b_len, double *x,
                        kmv_regress_stats *stats);

/* ---------------------------------------------------------------- .npy I/O */

/* A float32 array: rows x cols, row-major; a 1-D file of length n reads as
 * ndim 1, n x 1. */
typedef struct kmv_array {
    float *data;
    size_t rows;
    size_t cols;
    int ndim;
    kmv_allocator allocator; /* the one data came from */
} kmv_array;

/* Read a .npy file (versions 1 to 3; little-endian float32, or float64
 * converted; C order, or Fortran for 1-D; 1-D or 2-D) into *out (release
 * with kmv_array_free). alloc: NULL for malloc. err (when not NULL) gets a
 * message naming the file and the reason. Errors: KMV_EINVAL, KMV_EIO,
 * KMV_EFORMAT, KMV_EOVERFLOW, KMV_ENOMEM; *out zeroed on error. */
KMV_API int kmv_npy_read(const char *path, const kmv_allocator *alloc,
                         kmv_array *out, char *err, size_t err_len);
/* Release and zero; NULL is a no-op. */
KMV_API void kmv_array_free(kmv_array *a);

/* ---------------------------------------------------------------- outputs */

/* An output that appears whole or not at all, by the rules every kmv
 * writer follows:
 *  - "-", /dev/stdout, /dev/stderr, /dev/fd/N, /proc/self/fd/N: that
 *    descriptor, written directly;
 *  - symbolic links are followed, and stay;
 *  - a character device or FIFO is streamed in place (no temporary, rename
 *    or fsync); a directory, block device or socket is refused;
 *  - otherwise a temporary "<target>.tmp.XXXXXX" is made at open (so a
 *    missing or unwritable directory fails before any work), and commit
 *    syncs it, renames it over the target and syncs the directory. An
 *    existing file keeps its mode and, where allowed, owner and group; a
 *    new one gets 0666 less the umask. Failure or discard removes the
 *    temporary. */
typedef struct kmv_output kmv_output;

/* Errors: KMV_EINVAL, KMV_EIO, KMV_ENOMEM; *out NULL on error. */
KMV_API int kmv_output_open(const char *path, const kmv_allocator *alloc, kmv_output **out,
                            char *err, size_t err_len);
/* Errors: KMV_EINVAL, KMV_EIO (the output is then failed). */
KMV_API int kmv_output_write(kmv_output *o, const void *data, size_t len, char *err,
                             size_t err_len);
/* Publish and release o, whatever the outcome. Errors: KMV_EINVAL, KMV_EIO
 * (the target is as it was). */
KMV_API int kmv_output_commit(kmv_output *o, char *err, size_t err_len);
/* Drop what was written and release o; NULL is a no-op. */
KMV_API void kmv_output_discard(kmv_output *o);
/* The temporary's path while o is open (NULL for direct outputs), for a
 * signal handler to unlink(2). */
KMV_API const char *kmv_output_temp_path(const kmv_output *o);
/* Where path's output would land: links followed, absolute ("/dev/fd/N" for
 * descriptors), into buf. Errors: KMV_EINVAL, KMV_EIO. */
KMV_API int kmv_output_target(const char *path, char *buf, size_t len, char *err,
                              size_t err_len);

/* A float32 .npy file (version 1.0): 1-D of rows (cols = 1) when ndim = 1,
 * else rows x cols, by the output rules. Errors: KMV_EINVAL, KMV_EOVERFLOW,
 * KMV_EIO, KMV_ENOMEM. */
KMV_API int kmv_npy_write(const char *path, const float *data, int ndim,
                          size_t rows, size_t cols, char *err, size_t err_len);
/* The same array to an open output (published by kmv_output_commit()). */
KMV_API int kmv_npy_write_output(kmv_output *o, const float *data, int ndim, size_t rows,
                                 size_t cols, char *err, size_t err_len);

#ifdef __cplusplus
}
#endif

#endif /* KMV_H */
