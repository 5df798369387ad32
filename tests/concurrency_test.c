/* What kmv.h promises about threads, hammered from several threads at once:
 * concurrent kmv_matvec() and kmv_attention() calls on one context (exact
 * and approximate engines, each call running its own OpenMP team and, on
 * the capped context, its own memory meter), distinct indexes used from
 * distinct threads, and concurrent decoding steps on one stream. Every answer must equal,
 * bit for bit, the one computed alone beforehand. Run under the `tsan`
 * configuration (.bazelrc), ThreadSanitizer checks that nothing races;
 * under the others it checks the answers.
 *
 * Under TSan each call runs on one thread: Debian's libgomp is not built
 * with TSan, so the barriers that order an OpenMP team's work are invisible
 * to it and every parallel region would be reported. The calls' own
 * threading is covered by the other configurations (same answers for any
 * thread count, exact_test) and by ASan; TSan covers what callers share. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "engine/index_layout.h"
#include "kmv/kmv.h"
#include "stream/stream.h"
#include "tests/datagen.h"

#define THREADS 4
#define ROUNDS 2
/* Small enough for TSan's pace. At this size the one-shot approximate
 * call falls back to exact after planning (the tables would cost more than
 * they save); the index calls force the approximate path (an internal
 * switch) so that the whole engine runs concurrently. */
#define N 8192
#define M 1024
#define D 32

static float *keys, *queries, *x, *v;

#ifdef __SANITIZE_THREAD__
#define INNER_THREADS 1
#else
#define INNER_THREADS 2
#endif

static kmv_ctx *make_ctx(int exact, size_t max_bytes) {
    kmv_params p;
    kmv_params_init(&p);
    p.exact = exact;
    p.n_threads = INNER_THREADS; /* a team per call, inside the test's threads */
    p.seed = 5;
    p.max_bytes = max_bytes;
    kmv_ctx *ctx;
    assert_int_equal(kmv_ctx_create(&p, &ctx), KMV_OK);
    return ctx;
}

static int setup(void **state) {
    (void)state;
    keys = malloc(N * D * sizeof(float));
    queries = malloc(M * D * sizeof(float));
    x = malloc(N * sizeof(float));
    v = malloc(N * 4 * sizeof(float));
    dg_clustered(keys, N, queries, M, D, 16, 1.0, 3);
    dg_x(x, N, DG_X_GAUSS, 4);
    dg_x(v, N * 4, DG_X_NONNEG, 5);
    return 0;
}

static int teardown(void **state) {
    (void)state;
    free(keys);
    free(queries);
    free(x);
    free(v);
    return 0;
}

/* One kind of call, and its answer computed alone. */
typedef enum { CALL_APPROX, CALL_EXACT, CALL_ATTN, CALL_INDEX, NCALLS } call_kind;

typedef struct shared {
    kmv_ctx *approx, *exact;
    float *want[NCALLS];
    size_t len[NCALLS];
    int expect_mode[NCALLS];
} shared;

static int call(const shared *sh, call_kind kind, float *out, kmv_stats *st) {
    switch (kind) {
    case CALL_APPROX: return kmv_matvec(sh->approx, queries, M, keys, N, D, x, 1, out, st);
    case CALL_EXACT: return kmv_matvec(sh->exact, queries, M, keys, N, D, v, 4, out, st);
    case CALL_ATTN: return kmv_attention(sh->exact, queries, M, keys, N, D, v, 4, out, st);
    case CALL_INDEX: {
        /* An index per call: distinct indexes are independent. */
        kmv_index *ix;
        int rc = kmv_index_create(sh->approx, D, &ix);
        if (rc == KMV_OK) ix->force_approx = 1;
        if (rc == KMV_OK) rc = kmv_index_append(ix, keys, N / 2);
        if (rc == KMV_OK) rc = kmv_index_append(ix, keys + (size_t)(N / 2) * D, N / 2);
        if (rc == KMV_OK) rc = kmv_index_matvec(ix, queries, M, v, 4, out, st);
        kmv_index_free(ix);
        return rc;
    }
    default: return KMV_EINVAL;
    }
}

typedef struct worker {
    const shared *sh;
    int id;
    int mismatches, errors;
} worker;

static void *work(void *arg) {
    worker *w = arg;
    float *out = malloc(M * 4 * sizeof(float));
    for (int r = 0; r < ROUNDS; r++) {
        for (int c = 0; c < NCALLS; c++) {
            /* Threads walk the calls from different starting points, so
             * different kinds overlap as well as equal ones. */
            call_kind kind = (call_kind)((c + w->id) % NCALLS);
            kmv_stats st;
            int rc = call(w->sh, kind, out, &st);
            if (rc != KMV_OK || st.mode != w->sh->expect_mode[kind]) {
                w->errors++;
                continue;
            }
            if (memcmp(out, w->sh->want[kind], w->sh->len[kind] * sizeof(float)) != 0)
                w->mismatches++;
        }
    }
    free(out);
    return NULL;
}

static void test_concurrent_calls(void **state) {
    (void)state;
    shared sh;
    memset(&sh, 0, sizeof sh);
    /* A cap far above need: the calls run as uncapped, but through the
     * per-call meters. */
    sh.approx = make_ctx(0, (size_t)1 << 34);
    sh.exact = make_ctx(1, 0);
    for (int c = 0; c < NCALLS; c++) {
        sh.len[c] = c == CALL_APPROX ? M : (size_t)M * 4;
        sh.want[c] = malloc(sh.len[c] * sizeof(float));
        kmv_stats st;
        assert_int_equal(call(&sh, (call_kind)c, sh.want[c], &st), KMV_OK);
        sh.expect_mode[c] = st.mode;
    }
    /* The approximate engine really ran in the index calls. */
    assert_int_equal(sh.expect_mode[CALL_INDEX], KMV_MODE_APPROX);

    pthread_t th[THREADS];
    worker w[THREADS];
    for (int t = 0; t < THREADS; t++) {
        w[t] = (worker){&sh, t, 0, 0};
        assert_int_equal(pthread_create(&th[t], NULL, work, &w[t]), 0);
    }
    for (int t = 0; t < THREADS; t++) {
        assert_int_equal(pthread_join(th[t], NULL), 0);
        if (w[t].errors || w[t].mismatches)
            fail_msg("thread %d: %d errors, %d answers differing from the lone run", t,
                     w[t].errors, w[t].mismatches);
    }
    for (int c = 0; c < NCALLS; c++) free(sh.want[c]);
    kmv_ctx_free(sh.approx);
    kmv_ctx_free(sh.exact);
}

/* Decoding steps on one stream, THREADS at once, between exclusive
 * appends: each round appends a block (so the first step of the round
 * finds the tables or draws stale and prepares them under the write lock
 * while the others wait or read), then every thread decodes its share of
 * the queries. Afterwards each query is decoded again alone: the state a
 * step reads at one size does not depend on which step prepared it, so the
 * answers must agree bit for bit. */
#define STREAM_COLS 2
#define STREAM_ROUNDS 4
#define STEPS 24 /* per thread and round */

typedef struct stepper {
    kmv_stream *s;
    int id;
    float *out; /* STEPS x STREAM_COLS */
    int mode[STEPS];
    int errors;
} stepper;

static const float *step_query(int id, int u) {
    return queries + (size_t)((id * STEPS + u) % M) * D;
}

static void *steps(void *arg) {
    stepper *w = arg;
    for (int u = 0; u < STEPS; u++) {
        kmv_stats st;
        if (kmv_stream_decode(w->s, step_query(w->id, u), w->out + u * STREAM_COLS, &st) != KMV_OK)
            w->errors++;
        w->mode[u] = st.mode;
    }
    return NULL;
}

/* The keys in rounds blocks, each followed by the steps; every step's mode
 * must be want_mode. */
static void decode_rounds(kmv_stream *s, int rounds, int want_mode) {
    size_t block = N / (size_t)rounds;
    for (int r = 0; r < rounds; r++) {
        assert_int_equal(kmv_stream_append_keys(s, keys + (size_t)r * block * D,
                                                v + (size_t)r * block * STREAM_COLS, block),
                         KMV_OK);
        pthread_t th[THREADS];
        stepper w[THREADS];
        for (int t = 0; t < THREADS; t++) {
            w[t] = (stepper){s, t, malloc(STEPS * STREAM_COLS * sizeof(float)), {0}, 0};
            assert_int_equal(pthread_create(&th[t], NULL, steps, &w[t]), 0);
        }
        for (int t = 0; t < THREADS; t++) assert_int_equal(pthread_join(th[t], NULL), 0);
        for (int t = 0; t < THREADS; t++) {
            assert_int_equal(w[t].errors, 0);
            for (int u = 0; u < STEPS; u++) {
                assert_int_equal(w[t].mode[u], want_mode);
                float alone[STREAM_COLS];
                kmv_stats st;
                assert_int_equal(kmv_stream_decode(s, step_query(t, u), alone, &st), KMV_OK);
                if (memcmp(alone, w[t].out + u * STREAM_COLS, sizeof alone) != 0)
                    fail_msg("round %d, thread %d, step %d: %g differs from %g alone", r, t, u,
                             (double)w[t].out[u * STREAM_COLS], (double)alone[0]);
            }
            free(w[t].out);
        }
    }
}

static kmv_stream *make_stream(size_t max_bytes) {
    kmv_ctx *ctx = make_ctx(0, max_bytes);
    kmv_stream *s;
    assert_int_equal(kmv_stream_create(ctx, D, STREAM_COLS, &s), KMV_OK);
    kmv_ctx_free(ctx);
    return s;
}

static void test_concurrent_decoding(void **state) {
    (void)state;
    /* The approximate path at every size (too small for the cost model to
     * choose it), so that the tables and draws are planned concurrently. */
    kmv_stream *s = make_stream(0);
    s->ix->force_approx = 1;
    decode_rounds(s, STREAM_ROUNDS, KMV_MODE_APPROX);
    kmv_stream_info info;
    assert_int_equal(kmv_stream_get_info(s, &info), KMV_OK);
    assert_true(info.lsh_tables > 0);
    kmv_stream_free(s);
}

static void test_concurrent_decoding_at_cap(void **state) {
    (void)state;
    /* A cap that holds the keys and a step's scratch but only half the
     * tables: the first step is refused its plan and drops the tables
     * under the write lock; every step answers with the exact row. */
    kmv_stream *probe = make_stream(0);
    probe->ix->force_approx = 1;
    assert_int_equal(kmv_stream_append_keys(probe, keys, v, N), KMV_OK);
    kmv_stream_info bare, planned;
    assert_int_equal(kmv_stream_get_info(probe, &bare), KMV_OK);
    float y[STREAM_COLS];
    assert_int_equal(kmv_stream_decode(probe, queries, y, NULL), KMV_OK);
    assert_int_equal(kmv_stream_get_info(probe, &planned), KMV_OK);
    kmv_stream_free(probe);
    assert_true(planned.bytes > bare.bytes + ((size_t)64 << 10));
    kmv_stream *s = make_stream(bare.bytes + (planned.bytes - bare.bytes) / 2);
    s->ix->force_approx = 1;
    decode_rounds(s, 1, KMV_MODE_FALLBACK);
    kmv_stream_free(s);
}

/* The stateless helpers are callable from any thread. */
static void *helpers(void *arg) {
    int *bad = arg;
    for (int i = 0; i < 1000; i++) {
        if (kmv_strerror(KMV_ELIMIT)[0] == '\0' || kmv_errname(-1)[0] != 'K') (*bad)++;
        kmv_params p;
        kmv_params_init(&p);
        if (kmv_params_check(&p) != KMV_OK) (*bad)++;
        size_t where = 0;
        if (kmv_find_nonfinite(x, N, &where) != KMV_OK) (*bad)++;
    }
    return NULL;
}

static void test_concurrent_helpers(void **state) {
    (void)state;
    pthread_t th[THREADS];
    int bad[THREADS] = {0};
    for (int t = 0; t < THREADS; t++) assert_int_equal(pthread_create(&th[t], NULL, helpers, &bad[t]), 0);
    for (int t = 0; t < THREADS; t++) {
        assert_int_equal(pthread_join(th[t], NULL), 0);
        assert_int_equal(bad[t], 0);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_concurrent_helpers),
        cmocka_unit_test(test_concurrent_calls),
        cmocka_unit_test(test_concurrent_decoding),
        cmocka_unit_test(test_concurrent_decoding_at_cap),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
