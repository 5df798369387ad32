/* Approximate batch attention (kmv_attention without params.exact): one
 * attention stream over the keys and a decoding step per query row, so
 * that every row carries the step's bound on its normalized output. The
 * tests set params.force_approx to run it at sizes a unit test affords. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

#include "tests/datagen.h"
#include "tests/testutil.h"

#define N 16384
#define M 160
#define D 16
#define C 3

static float *keys, *queries, *v;

static int setup(void **state) {
    (void)state;
    keys = malloc(N * D * sizeof(float));
    queries = malloc(M * D * sizeof(float));
    v = malloc(N * C * sizeof(float));
    dg_sphere(keys, N, queries, M, D, 4.0, 7);
    dg_x(v, N * C, DG_X_GAUSS, 8);
    return 0;
}

static int teardown(void **state) {
    (void)state;
    free(keys);
    free(queries);
    free(v);
    return 0;
}

static kmv_ctx *ctx_with(int causal, int measure, int force, kmv_allocator *a) {
    kmv_params p;
    kmv_params_init(&p);
    p.causal = causal;
    p.measure_error = measure;
    kmv_params_x px = tu_px(&p);
    px.force_approx = force;
    kmv_params_set_x(&p, &px);
    p.seed = 11;
    p.n_threads = 1;
    if (a != NULL) p.allocator = *a;
    kmv_ctx *ctx;
    assert_int_equal(kmv_ctx_create(&p, &ctx), KMV_OK);
    return ctx;
}

/* Each row's error against the float64 softmax, and the Frobenius error
 * over ||V||_F (appendix A.1.4's measure). */
static double row_errors(const float *out, const float *q, size_t m, int causal, double *rows) {
    double *o = malloc(m * C * sizeof(double)), *oa = malloc(m * C * sizeof(double));
    tu_ref_attn(q, m, keys, N, D, v, C, 1.0 / sqrt((double)D), causal, o, oa);
    double e2 = 0.0, v2 = 0.0;
    for (size_t i = 0; i < m; i++) {
        double r2 = 0.0;
        for (size_t col = 0; col < C; col++) r2 += (out[i * C + col] - o[i * C + col]) * (out[i * C + col] - o[i * C + col]);
        rows[i] = sqrt(r2);
        e2 += r2;
    }
    for (size_t u = 0; u < (size_t)N * C; u++) v2 += (double)v[u] * v[u];
    free(o);
    free(oa);
    return sqrt(e2 / v2);
}

/* Every approximated row within the bound (each with probability
 * 1 - delta: a few misses allowed), the reported measured error the one
 * we measure, rows counted. Causal too, as self-attention (queries = keys)
 * so that the later rows see contexts long enough to sample. */
static void rows_within_bound(void **state) {
    (void)state;
    double *rows = malloc(N * sizeof(double));
    for (int causal = 0; causal < 2; causal++) {
        const float *q = causal ? keys : queries;
        size_t m = causal ? N : M;
        kmv_ctx *ctx = ctx_with(causal, 1, 1, NULL);
        float *out = malloc(m * C * sizeof(float));
        kmv_stats st;
        assert_int_equal(kmv_attention(ctx, q, m, keys, N, D, v, C, out, &st), KMV_OK);
        assert_int_equal(st.mode, KMV_MODE_APPROX);
        assert_true(st.error_bound > 0.0 && st.error_bound < 1.0);
        assert_true(tu_x(&st).samples > 0);
        double fro = row_errors(out, q, m, causal, rows);
        assert_true(fabs(fro - st.error_measured) <= 1e-6 + 1e-3 * fro);
        int misses = 0;
        for (size_t i = 0; i < m; i++) misses += rows[i] > st.error_bound;
        print_message("causal %d: %zu of %zu rows exact, error %.2e (over ||V||), bound per row %.2e, %d beyond\n",
                      causal, st.rows_exact, m, fro, st.error_bound, misses);
        assert_true(misses <= 1 + (int)(m / 50));
        assert_true(st.rows_exact < m);
        free(out);
        kmv_ctx_free(ctx);
    }
    free(rows);
}

/* The monitor: rows 0, 7, 14, ... computed exactly too; its figures are
 * those rows' errors against the float64 softmax, under the empirical
 * budget (the fast path it is for: no bound of its own). */
static void verify_every(void **state) {
    (void)state;
    double *rows = malloc(M * sizeof(double));
    for (int empirical = 1; empirical < 2; empirical++) {
        kmv_params p;
        kmv_params_init(&p);
        p.seed = 11;
        kmv_params_x px = tu_px(&p);
        px.force_approx = 1;
        px.verify_every = 7;
        px.attn_budget = empirical ? KMV_BUDGET_EMPIRICAL : KMV_BUDGET_CERTIFIED;
        assert_int_equal(kmv_params_set_x(&p, &px), KMV_OK);
        kmv_ctx *ctx;
        assert_int_equal(kmv_ctx_create(&p, &ctx), KMV_OK);
        float *out = malloc(M * C * sizeof(float));
        kmv_stats st;
        assert_int_equal(kmv_attention(ctx, queries, M, keys, N, D, v, C, out, &st), KMV_OK);
        assert_int_equal(st.mode, KMV_MODE_APPROX);
        row_errors(out, queries, M, 0, rows);
        double mx = 0.0, sum = 0.0;
        size_t nv = 0;
        for (size_t i = 0; i < M; i += 7, nv++) {
            mx = rows[i] > mx ? rows[i] : mx;
            sum += rows[i];
        }
        kmv_stats_x sx = tu_x(&st);
        assert_int_equal(sx.verified, nv);
        assert_true(fabs(sx.verify_max - mx) <= 1e-4 * mx + 1e-7);
        assert_true(fabs(sx.verify_mean - sum / (double)nv) <= 1e-4 * mx + 1e-7);
        assert_true(sx.verify_p99 <= sx.verify_max);
        print_message("%s: %zu rows verified, mean %.2e, max %.2e, bound %g\n",
                      empirical ? "empirical" : "certified", sx.verified, sx.verify_mean,
                      sx.verify_max, st.error_bound);
        free(out);
        kmv_ctx_free(ctx);
    }
    free(rows);
}

/* Same seed, same answer; and the same on 3 threads, where the rows after
 * the first approximated one step concurrently. */
static void deterministic(void **state) {
    (void)state;
    kmv_ctx *ctx = ctx_with(0, 0, 1, NULL);
    float *a = malloc(M * C * sizeof(float)), *b = malloc(M * C * sizeof(float));
    assert_int_equal(kmv_attention(ctx, queries, M, keys, N, D, v, C, a, NULL), KMV_OK);
    assert_int_equal(kmv_attention(ctx, queries, M, keys, N, D, v, C, b, NULL), KMV_OK);
    assert_memory_equal(a, b, M * C * sizeof(float));
    kmv_params p = *kmv_ctx_get_params(ctx);
    p.n_threads = 3;
    kmv_ctx *c3;
    assert_int_equal(kmv_ctx_create(&p, &c3), KMV_OK);
    kmv_stats st;
    memset(b, 0, M * C * sizeof(float));
    assert_int_equal(kmv_attention(c3, queries, M, keys, N, D, v, C, b, &st), KMV_OK);
    assert_int_equal(st.n_threads, 3);
    assert_true(st.rows_exact < M);
    assert_memory_equal(a, b, M * C * sizeof(float));
    kmv_ctx_free(c3);
    free(a);
    free(b);
    kmv_ctx_free(ctx);
}

/* out (m x C) is the float64 softmax's, to float rounding. */
static void assert_exact_rows(const float *out, const float *q, size_t m, const float *k, size_t n,
                              const float *vv, int causal) {
    double *o = malloc(m * C * sizeof(double)), *oa = malloc(m * C * sizeof(double));
    tu_ref_attn(q, m, k, n, D, vv, C, 1.0 / sqrt((double)D), causal, o, oa);
    for (size_t u = 0; u < m * C; u++) assert_true(fabs(out[u] - o[u]) <= 1e-5 * (1.0 + oa[u]));
    free(o);
    free(oa);
}

/* Long queries orthogonal to every key: each lifted row, even relative
 * to the nearest possible key (exp(-s ||q|| sqrt(alpha))), is below
 * float's range, so no row can be bounded by samples, the probe rows find
 * nothing to gain, and the rest run on the exact engine; the answer is
 * the exact one and the stats say so. Without force_approx, at a size
 * where the approximate path is tried. */
static void probe_gives_up(void **state) {
    (void)state;
    const size_t n = 4096, m = 2100;
    float *k = tu_random(n * D, 8, 1.0f), *q = tu_random(m * D, 9, 1.0f), *vv = tu_random(n * C, 10, 1.0f);
    for (size_t j = 0; j < n; j++)
        for (size_t t = D / 2; t < D; t++) k[j * D + t] = 0.0f;
    for (size_t i = 0; i < m; i++)
        for (size_t t = 0; t < D; t++) q[i * D + t] = t < D / 2 ? 0.0f : 400.0f * q[i * D + t];
    kmv_ctx *ctx = ctx_with(0, 0, 0, NULL);
    float *out = malloc(m * C * sizeof(float));
    kmv_stats st;
    assert_int_equal(kmv_attention(ctx, q, m, k, n, D, vv, C, out, &st), KMV_OK);
    assert_int_equal(st.mode, KMV_MODE_FALLBACK);
    assert_int_equal(st.rows_exact, m);
    assert_exact_rows(out, q, m, k, n, vv, 0);
    free(out);
    free(k);
    free(q);
    free(vv);
    kmv_ctx_free(ctx);
}

/* A causal batch whose first rows see too few keys to approximate: the
 * probe gives up after 32 rows and the exact engine runs the batch, still
 * causal (row i against keys 0..i, however many keys there are). */
static void causal_probe_gives_up(void **state) {
    (void)state;
    const size_t m = 4096;
    kmv_ctx *ctx = ctx_with(1, 0, 0, NULL);
    float *out = malloc(m * C * sizeof(float));
    kmv_stats st;
    assert_int_equal(kmv_attention(ctx, keys, m, keys, N, D, v, C, out, &st), KMV_OK);
    assert_int_equal(st.rows_exact, m);
    assert_exact_rows(out, keys, m, keys, N, v, 1);
    free(out);
    kmv_ctx_free(ctx);
}

/* Every allocation of the call fails in turn: KMV_ENOMEM, output
 * untouched, nothing leaked; then it succeeds. */
static void allocation_failures(void **state) {
    (void)state;
    size_t m = 24;
    float *out = malloc(m * C * sizeof(float));
    tu_alloc_state as = {0, 0, 0};
    kmv_allocator a = tu_allocator(&as);
    kmv_ctx *ctx = ctx_with(0, 1, 1, &a);
    long base = as.live;
    int failures = 0;
    for (long f = 1;; f++) {
        as.calls = 0;
        as.fail_at = f;
        for (size_t u = 0; u < m * C; u++) out[u] = 7.0f;
        int rc = kmv_attention(ctx, queries, m, keys, N, D, v, C, out, NULL);
        as.fail_at = 0;
        assert_int_equal(as.live, base);
        if (rc == KMV_OK) break;
        failures++;
        assert_int_equal(rc, KMV_ENOMEM);
        for (size_t u = 0; u < m * C; u++) assert_true(out[u] == 7.0f);
    }
    assert_true(failures > 5);
    kmv_ctx_free(ctx);
    free(out);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(rows_within_bound),
        cmocka_unit_test(deterministic),
        cmocka_unit_test(verify_every),
        cmocka_unit_test(probe_gives_up),
        cmocka_unit_test(causal_probe_gives_up),
        cmocka_unit_test(allocation_failures),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
