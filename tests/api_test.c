/* The public API's contract: params and their ranges, error codes and
 * messages, version, contexts, argument checks, and allocation failure at
 * every allocation of every call. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kmv/kmv.h"
#include "tests/testutil.h"

static void test_version(void **state) {
    (void)state;
    char want[32];
    snprintf(want, sizeof want, "%d.%d.%d", KMV_VERSION_MAJOR, KMV_VERSION_MINOR,
             KMV_VERSION_PATCH);
    assert_string_equal(kmv_version_string(), want);
    assert_int_equal(kmv_version_number(), KMV_VERSION_NUMBER);
}

static void test_errors(void **state) {
    (void)state;
    int codes[] = {
#define X(name, value, msg) value,
        KMV_ERRNO_MAP(X)
#undef X
    };
    size_t n = sizeof codes / sizeof codes[0];
    for (size_t i = 0; i < n; i++) {
        assert_true(codes[i] <= 0);
        assert_string_not_equal(kmv_strerror(codes[i]), "unknown error");
        assert_string_not_equal(kmv_errname(codes[i]), "KMV_UNKNOWN");
        for (size_t j = 0; j < i; j++) {
            assert_int_not_equal(codes[i], codes[j]);
            assert_string_not_equal(kmv_strerror(codes[i]), kmv_strerror(codes[j]));
        }
    }
    assert_string_equal(kmv_errname(KMV_ENOMEM), "KMV_ENOMEM");
    assert_string_equal(kmv_strerror(12345), "unknown error");
    assert_string_equal(kmv_errname(-999), "KMV_UNKNOWN");
}

static void test_params_defaults_and_ranges(void **state) {
    (void)state;
    kmv_params p;
    memset(&p, 0xAB, sizeof p);
    kmv_params_init(&p);
    assert_true(p.sigma == 1.0 && p.attn_scale == 0.0 && p.eps == 0.1 && p.delta == 0.01);
    assert_true(p.causal == 0 && p.exact == 0 && p.seed == 1 && p.n_threads == 0);
    assert_true(p.max_bytes == 0); /* no cap */
    assert_null(p.allocator.alloc);
    assert_null(p.allocator.free);
    assert_int_equal(kmv_params_check(&p), KMV_OK);
    assert_int_equal(kmv_params_check(NULL), KMV_EINVAL);

    struct {
        double *field;
        double bad;
    } cases[] = {
        {&p.sigma, 0.0},       {&p.sigma, -1.0},  {&p.sigma, NAN},      {&p.sigma, INFINITY},
        {&p.attn_scale, -1.0}, {&p.attn_scale, NAN}, {&p.attn_scale, INFINITY},
        {&p.eps, 0.0},         {&p.eps, 1.0},     {&p.eps, NAN},        {&p.eps, -0.5},
        {&p.delta, 0.0},       {&p.delta, 1.0},   {&p.delta, NAN},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        kmv_params_init(&p);
        *cases[i].field = cases[i].bad;
        assert_int_equal(kmv_params_check(&p), KMV_EINVAL);
        kmv_ctx *ctx = (kmv_ctx *)&p; /* must be reset to NULL on error */
        assert_int_equal(kmv_ctx_create(&p, &ctx), KMV_EINVAL);
        assert_null(ctx);
    }
    kmv_params_init(&p);
    p.sigma = 1e-151; /* 1 / (2 sigma^2) would not be a finite double */
    assert_int_equal(kmv_params_check(&p), KMV_EINVAL);
    p.sigma = 1e151;
    assert_int_equal(kmv_params_check(&p), KMV_EINVAL);
    kmv_params_init(&p);
    p.n_threads = -1;
    assert_int_equal(kmv_params_check(&p), KMV_EINVAL);
    kmv_params_init(&p);
    p.allocator.alloc = tu_alloc; /* free missing: memory could cross allocators */
    assert_int_equal(kmv_params_check(&p), KMV_EINVAL);
}

static void test_ctx(void **state) {
    (void)state;
    kmv_ctx *ctx = NULL;
    assert_int_equal(kmv_ctx_create(NULL, NULL), KMV_EINVAL);
    assert_int_equal(kmv_ctx_create(NULL, &ctx), KMV_OK);
    assert_non_null(ctx);
    assert_true(kmv_ctx_get_params(ctx)->sigma == 1.0);
    kmv_ctx_free(ctx);
    kmv_ctx_free(NULL);
}

/* Argument checks come before any work: bad calls leave y untouched. */
static void test_bad_arguments(void **state) {
    (void)state;
    kmv_params p;
    kmv_params_init(&p);
    p.exact = 1;
    kmv_ctx *ctx;
    assert_int_equal(kmv_ctx_create(&p, &ctx), KMV_OK);
    float q[6] = {0, 1, 2, 3, 4, 5}, k[6] = {1, 1, 1, 1, 1, 1}, x[3] = {1, 2, 3};
    float y[3] = {9, 9, 9};
    assert_int_equal(kmv_matvec(NULL, q, 3, k, 3, 2, x, 1, y, NULL), KMV_EINVAL);
    assert_int_equal(kmv_matvec(ctx, NULL, 3, k, 3, 2, x, 1, y, NULL), KMV_EINVAL);
    assert_int_equal(kmv_matvec(ctx, q, 3, NULL, 3, 2, x, 1, y, NULL), KMV_EINVAL);
    assert_int_equal(kmv_matvec(ctx, q, 3, k, 3, 2, NULL, 1, y, NULL), KMV_EINVAL);
    assert_int_equal(kmv_matvec(ctx, q, 3, k, 3, 2, x, 1, NULL, NULL), KMV_EINVAL);
    assert_int_equal(kmv_matvec(ctx, q, SIZE_MAX / 2, k, 3, 2, x, 1, y, NULL), KMV_EOVERFLOW);
    assert_int_equal(kmv_attention(ctx, q, 3, k, SIZE_MAX / 4, 2, x, 1, y, NULL),
                     KMV_EOVERFLOW);
    float bad[6] = {0, 1, NAN, 3, 4, 5};
    assert_int_equal(kmv_matvec(ctx, bad, 3, k, 3, 2, x, 1, y, NULL), KMV_ENONFINITE);
    assert_int_equal(kmv_matvec(ctx, q, 3, bad, 3, 2, x, 1, y, NULL), KMV_ENONFINITE);
    float xinf[3] = {1, INFINITY, 3};
    assert_int_equal(kmv_attention(ctx, q, 3, k, 3, 2, xinf, 1, y, NULL), KMV_ENONFINITE);
    assert_true(y[0] == 9 && y[1] == 9 && y[2] == 9);
    kmv_ctx_free(ctx);

    /* Approximate attention this small runs exact and says why. */
    kmv_params_init(&p);
    assert_int_equal(kmv_ctx_create(&p, &ctx), KMV_OK);
    kmv_stats st;
    assert_int_equal(kmv_attention(ctx, q, 3, k, 3, 2, x, 1, y, &st), KMV_OK);
    assert_int_equal(st.mode, KMV_MODE_FALLBACK);
    assert_int_equal(st.fallback_reason, KMV_FALLBACK_SMALL);
    /* An approximate product this small runs exact and says why. */
    assert_int_equal(kmv_matvec(ctx, q, 3, k, 3, 2, x, 1, y, &st), KMV_OK);
    assert_int_equal(st.mode, KMV_MODE_FALLBACK);
    assert_int_equal(st.fallback_reason, KMV_FALLBACK_SMALL);
    kmv_ctx_free(ctx);
}

/* stats.n_threads is what ran, not what was allowed. */
static void test_threads_reported(void **state) {
    (void)state;
    kmv_params p;
    kmv_params_init(&p);
    p.exact = 1;
    p.n_threads = 16;
    kmv_ctx *ctx;
    assert_int_equal(kmv_ctx_create(&p, &ctx), KMV_OK);
    float q[2] = {1, 2}, x[2] = {1, 1}, y[1];
    kmv_stats st;
    assert_int_equal(kmv_matvec(ctx, q, 1, q, 2, 1, x, 1, y, &st), KMV_OK);
    assert_int_equal(st.n_threads, 1);
    kmv_ctx_free(ctx);
}

static void test_find_nonfinite(void **state) {
    (void)state;
    float v[5] = {1, 2, 3, 4, 5};
    size_t where = 77;
    assert_int_equal(kmv_find_nonfinite(v, 5, &where), KMV_OK);
    assert_int_equal(where, 77);
    assert_int_equal(kmv_find_nonfinite(NULL, 0, NULL), KMV_OK);
    v[3] = -INFINITY;
    assert_int_equal(kmv_find_nonfinite(v, 5, &where), KMV_ENONFINITE);
    assert_int_equal(where, 3);
    v[1] = NAN;
    assert_int_equal(kmv_find_nonfinite(v, 5, &where), KMV_ENONFINITE);
    assert_int_equal(where, 1);
}

/* The engine sets BLAS to one thread inside its own parallel regions; the
 * host's OpenMP setting must come back unchanged. */
static void test_host_openmp_untouched(void **state) {
    (void)state;
#ifdef _OPENMP
    int before = omp_get_max_threads();
    kmv_params p;
    kmv_params_init(&p);
    p.exact = 1;
    p.n_threads = 1;
    kmv_ctx *ctx;
    assert_int_equal(kmv_ctx_create(&p, &ctx), KMV_OK);
    float *q = tu_random(300 * 8, 1, 1.0f), *x = tu_random(300, 2, 1.0f), y[300];
    assert_int_equal(kmv_matvec(ctx, q, 300, q, 300, 8, x, 1, y, NULL), KMV_OK);
    assert_int_equal(omp_get_max_threads(), before);
    free(q);
    free(x);
    kmv_ctx_free(ctx);
#endif
}

/* Progress reports rise, end at 1, and run on the calling thread only. */
typedef struct progress_log {
    pthread_t caller;
    int calls, foreign, falling;
    double last;
} progress_log;

static void record_progress(void *opaque, double f) {
    progress_log *pl = opaque;
    if (!pthread_equal(pthread_self(), pl->caller)) pl->foreign++;
    if (f < pl->last || f < 0.0 || f > 1.0) pl->falling++;
    pl->last = f;
    pl->calls++;
}

static void test_progress(void **state) {
    (void)state;
    for (int run = 0; run < 4; run++) {
        int attn = run & 1, threads = 1 + (run >> 1);
        progress_log log = {pthread_self(), 0, 0, 0, 0.0};
        kmv_params p;
        kmv_params_init(&p);
        p.exact = 1;
        p.n_threads = threads;
        p.progress = record_progress;
        p.progress_opaque = &log;
        kmv_ctx *ctx;
        assert_int_equal(kmv_ctx_create(&p, &ctx), KMV_OK);
        size_t m = 2000, n = 300, d = 4;
        float *q = tu_random(m * d, 1, 1.0f), *x = tu_random(n, 2, 1.0f);
        float *y = malloc(m * sizeof(float));
        assert_int_equal(attn ? kmv_attention(ctx, q, m, q, n, d, x, 1, y, NULL)
                              : kmv_matvec(ctx, q, m, q, n, d, x, 1, y, NULL),
                         KMV_OK);
        /* One thread does all 16 query blocks of 128 rows, reporting each,
         * then the final 1. With two, the caller's thread may finish few. */
        if (threads == 1)
            assert_int_equal(log.calls, 17);
        else
            assert_true(log.calls >= 1);
        assert_int_equal(log.foreign, 0);
        assert_int_equal(log.falling, 0);
        assert_true(log.last == 1.0);
        free(q);
        free(x);
        free(y);
        kmv_ctx_free(ctx);
    }
}

/* Every allocation of every call may fail: the call must return KMV_ENOMEM
 * and give back everything it took. Walks k = 1, 2, ... until the call
 * succeeds, so a new allocation in the code is covered automatically. */
typedef int (*call_fn)(const kmv_allocator *a);

static int call_ctx_create(const kmv_allocator *a) {
    kmv_params p;
    kmv_params_init(&p);
    p.allocator = *a;
    kmv_ctx *ctx = NULL;
    int rc = kmv_ctx_create(&p, &ctx);
    assert_true(rc == KMV_OK ? ctx != NULL : ctx == NULL);
    kmv_ctx_free(ctx);
    return rc;
}

static int call_product(const kmv_allocator *a, int attn, size_t c, int causal) {
    enum { M = 200, N = 300, D = 7 };
    static float q[M * D], k[N * D], x[N * 4], y[M * 4];
    static int ready;
    if (!ready) {
        uint64_t s = 5;
        for (size_t i = 0; i < M * D; i++) q[i] = tu_uniform(&s);
        for (size_t i = 0; i < N * D; i++) k[i] = tu_uniform(&s);
        for (size_t i = 0; i < N * 4; i++) x[i] = tu_uniform(&s);
        ready = 1;
    }
    kmv_params p;
    kmv_params_init(&p);
    p.exact = 1;
    p.causal = causal;
    p.allocator = *a;
    kmv_ctx *ctx = NULL;
    int rc = kmv_ctx_create(&p, &ctx);
    if (rc != KMV_OK) return rc;
    for (size_t i = 0; i < M * 4; i++) y[i] = 42.0f;
    rc = attn ? kmv_attention(ctx, q, M, k, N, D, x, c, y, NULL)
              : kmv_matvec(ctx, q, M, k, N, D, x, c, y, NULL);
    kmv_ctx_free(ctx);
    /* A failed call leaves its output untouched. */
    for (size_t i = 0; rc != KMV_OK && i < M * 4; i++) assert_true(y[i] == 42.0f);
    return rc;
}

static int call_gauss_vec(const kmv_allocator *a) { return call_product(a, 0, 1, 0); }
static int call_gauss_cols(const kmv_allocator *a) { return call_product(a, 0, 4, 1); }
static int call_attn_vec(const kmv_allocator *a) { return call_product(a, 1, 1, 1); }
static int call_attn_cols(const kmv_allocator *a) { return call_product(a, 1, 4, 0); }

static void walk_failures(call_fn fn, const char *name) {
    long k;
    for (k = 1; k < 1000; k++) {
        tu_alloc_state st = {0, 0, k};
        kmv_allocator a = tu_allocator(&st);
        int rc = fn(&a);
        if (st.live != 0) fail_msg("%s: %ld blocks leaked when allocation %ld failed", name,
                                   st.live, k);
        if (rc == KMV_OK) {
            /* Succeeded: the failure point lies past the last allocation. */
            assert_true(st.calls < k);
            break;
        }
        if (rc != KMV_ENOMEM) fail_msg("%s: allocation %ld failed, got %s", name, k,
                                       kmv_errname(rc));
    }
    assert_true(k > 1); /* every call here allocates at least once */
}

static void test_alloc_failures(void **state) {
    (void)state;
    walk_failures(call_ctx_create, "kmv_ctx_create");
    walk_failures(call_gauss_vec, "kmv_matvec");
    walk_failures(call_gauss_cols, "kmv_matvec cols causal");
    walk_failures(call_attn_vec, "kmv_attention causal");
    walk_failures(call_attn_cols, "kmv_attention cols");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_version),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_params_defaults_and_ranges),
        cmocka_unit_test(test_ctx),
        cmocka_unit_test(test_bad_arguments),
        cmocka_unit_test(test_find_nonfinite),
        cmocka_unit_test(test_threads_reported),
        cmocka_unit_test(test_host_openmp_untouched),
        cmocka_unit_test(test_progress),
        cmocka_unit_test(test_alloc_failures),
    };
    return cmocka_run_group_tests_name("api", tests, NULL, NULL);
}
