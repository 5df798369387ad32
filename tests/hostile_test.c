/* Hostile input: each case of the bad-input table names the code the
 * library returns, and checks that the output was not touched; then one
 * test per bug the fuzzer found (fuzz/corpus/api/regress-* replays the
 * original inputs; these are the same bugs as readable scenarios).
 * The CLI's side of the table (messages, exit statuses, no output file)
 * is tests/cli_test.sh. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <float.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "engine/index_layout.h"
#include "algo/kernel.h"
#include "kmv/kmv.h"
#include "tests/datagen.h"

enum { M = 8, N = 16, D = 4, C = 2 };

/* Clean operands; each case spoils one thing. */
typedef struct operands {
    float q[M * D], k[N * D], x[N * C];
    float y[M * C];
} operands;

static void fill(operands *o) {
    uint64_t s = 11;
    for (size_t i = 0; i < M * D; i++) o->q[i] = tu_uniform(&s);
    for (size_t i = 0; i < N * D; i++) o->k[i] = tu_uniform(&s);
    for (size_t i = 0; i < N * C; i++) o->x[i] = tu_uniform(&s);
    for (size_t i = 0; i < M * C; i++) o->y[i] = 42.0f;
}

static int untouched(const operands *o) {
    for (size_t i = 0; i < M * C; i++)
        if (o->y[i] != 42.0f) return 0;
    return 1;
}

static kmv_ctx *ctx_with(int exact) {
    kmv_params p;
    kmv_params_init(&p);
    p.exact = exact;
    kmv_ctx *ctx;
    assert_int_equal(kmv_ctx_create(&p, &ctx), KMV_OK);
    return ctx;
}

typedef enum { ON_MATVEC, ON_MATVEC_APPROX, ON_ATTENTION, ON_INDEX } target;

/* Run the product named by t on o, with the dimensions given. */
static int product(target t, operands *o, size_t m, size_t n, size_t d) {
    kmv_ctx *ctx = ctx_with(t != ON_MATVEC_APPROX && t != ON_INDEX);
    int rc;
    if (t == ON_INDEX) {
        kmv_index *ix;
        assert_int_equal(kmv_index_create(ctx, d, &ix), KMV_OK);
        rc = kmv_index_append(ix, o->k, n);
        if (rc == KMV_OK) rc = kmv_index_matvec(ix, o->q, m, o->x, C, o->y, NULL);
        kmv_index_free(ix);
    } else if (t == ON_ATTENTION) {
        rc = kmv_attention(ctx, o->q, m, o->k, n, d, o->x, C, o->y, NULL);
    } else {
        rc = kmv_matvec(ctx, o->q, m, o->k, n, d, o->x, C, o->y, NULL);
    }
    kmv_ctx_free(ctx);
    return rc;
}

static const char *target_name[] = {"kmv_matvec (exact)", "kmv_matvec (approximate)",
                                    "kmv_attention", "kmv_index_append + kmv_index_matvec"};

/* Non-finite values in each operand, for every entry point. */
static void test_nonfinite_operands(void **state) {
    (void)state;
    const float bad[] = {NAN, INFINITY, -INFINITY};
    for (int t = ON_MATVEC; t <= ON_INDEX; t++) {
        for (int which = 0; which < 3; which++) {
            for (size_t b = 0; b < 3; b++) {
                operands o;
                fill(&o);
                float *victim = which == 0 ? &o.q[5] : which == 1 ? &o.k[9] : &o.x[3];
                *victim = bad[b];
                int rc = product((target)t, &o, M, N, D);
                if (rc != KMV_ENONFINITE || !untouched(&o))
                    fail_msg("%s with %s in %s: got %s, output %s", target_name[t],
                             b == 0 ? "NaN" : "infinity", which == 0 ? "queries" : which == 1 ? "keys" : "x",
                             kmv_errname(rc), untouched(&o) ? "untouched" : "written");
            }
        }
    }
}

/* Parameters out of range: the context is refused. */
static void test_bad_params(void **state) {
    (void)state;
    typedef struct param_case {
        const char *what;
        double *field;
        double value;
    } param_case;
    param_case cases[16];
    kmv_params p;
    size_t nc = 0;
    const double sig[] = {0.0, -1.0, NAN, INFINITY, 1e-200};
    for (size_t i = 0; i < 5; i++) cases[nc++] = (param_case){"sigma", &p.sigma, sig[i]};
    const double unit[] = {0.0, 1.0, -0.1, NAN};
    for (size_t i = 0; i < 4; i++) cases[nc++] = (param_case){"eps", &p.eps, unit[i]};
    for (size_t i = 0; i < 4; i++) cases[nc++] = (param_case){"delta", &p.delta, unit[i]};
    cases[nc++] = (param_case){"attn_scale", &p.attn_scale, -1.0};
    cases[nc++] = (param_case){"attn_scale", &p.attn_scale, NAN};
    for (size_t i = 0; i < nc; i++) {
        kmv_params_init(&p);
        *cases[i].field = cases[i].value;
        kmv_ctx *ctx = (kmv_ctx *)&p; /* must be overwritten with NULL */
        int rc = kmv_ctx_create(&p, &ctx);
        if (rc != KMV_EINVAL || ctx != NULL)
            fail_msg("%s = %g: got %s", cases[i].what, cases[i].value, kmv_errname(rc));
    }
}

/* Sizes: products that overflow, more keys than an index holds, dim 0,
 * NULL with a nonzero count. */
static void test_bad_sizes(void **state) {
    (void)state;
    operands o;
    fill(&o);
    assert_int_equal(product(ON_MATVEC, &o, SIZE_MAX / 2, N, D), KMV_EOVERFLOW);
    assert_int_equal(product(ON_MATVEC, &o, M, SIZE_MAX / 3, D), KMV_EOVERFLOW);
    assert_int_equal(product(ON_ATTENTION, &o, M, N, SIZE_MAX / 8), KMV_EOVERFLOW);
    assert_int_equal(product(ON_MATVEC_APPROX, &o, M, N, 0), KMV_EINVAL);
    assert_true(untouched(&o));

    kmv_ctx *ctx = ctx_with(0);
    kmv_index *ix;
    assert_int_equal(kmv_index_create(ctx, SIZE_MAX / 2, &ix), KMV_EOVERFLOW);
    assert_int_equal(kmv_index_create(ctx, D, &ix), KMV_OK);
    assert_int_equal(kmv_index_append(ix, o.k, N), KMV_OK);
    /* Past the 2^32 - 2 keys an index holds: refused before reading. */
    assert_int_equal(kmv_index_append(ix, o.k, (size_t)UINT32_MAX), KMV_EOVERFLOW);
    assert_int_equal(kmv_index_get_size(ix), N);
    assert_int_equal(kmv_index_append(ix, NULL, 1), KMV_EINVAL);
    assert_int_equal(kmv_index_matvec(ix, o.q, SIZE_MAX / 2, o.x, C, o.y, NULL), KMV_EOVERFLOW);
    assert_int_equal(kmv_index_matvec(ix, NULL, M, o.x, C, o.y, NULL), KMV_EINVAL);
    assert_int_equal(kmv_index_matvec(ix, o.q, M, NULL, C, o.y, NULL), KMV_EINVAL);
    assert_int_equal(kmv_index_matvec(ix, o.q, M, o.x, C, NULL, NULL), KMV_EINVAL);
    assert_true(untouched(&o));
    kmv_index_free(ix);
    kmv_ctx_free(ctx);
}

/* Nothing to answer from: an empty index gives the empty sum, y = 0;
 * attention over no keys is undefined and refused. */
static void test_empty(void **state) {
    (void)state;
    operands o;
    fill(&o);
    kmv_ctx *ctx = ctx_with(0);
    kmv_index *ix;
    assert_int_equal(kmv_index_create(ctx, D, &ix), KMV_OK);
    kmv_stats st;
    assert_int_equal(kmv_index_matvec(ix, o.q, M, o.x, C, o.y, &st), KMV_OK);
    for (size_t i = 0; i < M * C; i++) assert_true(o.y[i] == 0.0f);
    kmv_index_free(ix);
    kmv_ctx_free(ctx);
    fill(&o);
    assert_int_equal(product(ON_ATTENTION, &o, M, 0, D), KMV_EEMPTY);
    assert_true(untouched(&o));
}

/* Fuzz find 1 (regress-null-heavy): a block of queries with no heavy key
 * at all formed NULL + 0 in the heavy search. Queries far from every key. */
static void test_regress_no_heavy_keys(void **state) {
    (void)state;
    size_t n = 512, m = 64, d = 8;
    float *k = tu_random(n * d, 1, 1.0f), *q = tu_random(m * d, 2, 1.0f);
    for (size_t i = 0; i < m * d; i++) q[i] += 100.0f;
    float *x = tu_random(n, 3, 1.0f), *y = malloc(m * sizeof(float));
    kmv_ctx *ctx = ctx_with(0);
    kmv_index *ix;
    assert_int_equal(kmv_index_create(ctx, d, &ix), KMV_OK);
    assert_int_equal(kmv_index_append(ix, k, n), KMV_OK);
    ix->force_approx = 1;
    kmv_stats st;
    assert_int_equal(kmv_index_matvec(ix, q, m, x, 1, y, &st), KMV_OK);
    assert_int_equal(st.mode, KMV_MODE_APPROX);
    assert_int_equal(tu_x(&st).heavy_pairs, 0);
    for (size_t i = 0; i < m; i++) assert_true(fabsf(y[i]) < 1e-6f); /* K is 0 here */
    kmv_index_free(ix);
    kmv_ctx_free(ctx);
    free(k);
    free(q);
    free(x);
    free(y);
}

/* Fuzz finds 2 and 3 (regress-huge-projection, regress-nan-exp,
 * regress-nan-plan): finite keys so large that their LSH projections pass
 * int32 and their squared distances pass float's range (inf - inf = NaN in
 * the planner and the exp). The answer is a clean code, never undefined
 * behaviour (the UBSan configuration checks the conversions) or a
 * non-finite y passed off as a result. */
static void test_regress_huge_coordinates(void **state) {
    (void)state;
    const float scale[] = {1e12f, 1e18f, 1e19f, 3e38f};
    size_t n = 256, m = 32, d = 4;
    for (size_t s = 0; s < 4; s++) {
        float *k = tu_random(n * d, 4 + s, scale[s]), *q = tu_random(m * d, 5 + s, scale[s]);
        float *x = tu_random(n, 6, 1.0f), *y = malloc(m * sizeof(float));
        for (int exact = 0; exact <= 1; exact++) {
            kmv_ctx *ctx = ctx_with(exact);
            kmv_index *ix;
            assert_int_equal(kmv_index_create(ctx, d, &ix), KMV_OK);
            assert_int_equal(kmv_index_append(ix, k, n), KMV_OK);
            ix->force_approx = 1;
            int rc = exact ? kmv_matvec(ctx, q, m, k, n, d, x, 1, y, NULL)
                           : kmv_index_matvec(ix, q, m, x, 1, y, NULL);
            if (rc == KMV_OK) {
                for (size_t i = 0; i < m; i++) assert_true(isfinite(y[i]));
            } else if (rc != KMV_EOVERFLOW) {
                fail_msg("coordinates %g (%s): got %s", scale[s], exact ? "exact" : "approximate",
                         kmv_errname(rc));
            }
            kmv_index_free(ix);
            kmv_ctx_free(ctx);
        }
        free(k);
        free(q);
        free(x);
        free(y);
    }
    /* The exp itself: NaN passes through (for the output check to see),
     * everything below its range is 0. */
    assert_true(isnan(kmv__expf(NAN)));
    assert_true(kmv__expf(-INFINITY) == 0.0f);
    assert_true(kmv__expf(-1e30f) == 0.0f);
    assert_true(kmv__expf(0.0f) == 1.0f);
}

/* Fuzz find 4 (regress-sum-overflow): x near FLT_MAX summed past it came
 * back as infinity with KMV_OK; now KMV_EOVERFLOW, on both engines. */
static void test_regress_sum_overflow(void **state) {
    (void)state;
    operands o;
    fill(&o);
    for (size_t i = 0; i < N * D; i++) o.k[i] = 0.0f;
    for (size_t i = 0; i < M * D; i++) o.q[i] = 0.0f;
    for (size_t i = 0; i < N * C; i++) o.x[i] = 3e38f;
    assert_int_equal(product(ON_MATVEC, &o, M, N, D), KMV_EOVERFLOW);
    assert_int_equal(product(ON_INDEX, &o, M, N, D), KMV_EOVERFLOW);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_nonfinite_operands),
        cmocka_unit_test(test_bad_params),
        cmocka_unit_test(test_bad_sizes),
        cmocka_unit_test(test_empty),
        cmocka_unit_test(test_regress_no_heavy_keys),
        cmocka_unit_test(test_regress_huge_coordinates),
        cmocka_unit_test(test_regress_sum_overflow),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
