/* Attention streams (kmv_stream_attention_create): decoding steps of
 * softmax attention against a growing context, checked against a float64
 * softmax; the lift's bound rising as longer keys arrive; the relative
 * guarantee of an approximate step and its exact fallback; block splits;
 * snapshots (save, load, continue bit for bit; every damaged byte refused);
 * refused calls and failed appends. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "engine/index_layout.h"
#include "stream/stream.h"
#include "tests/datagen.h"
#include "tests/testutil.h"

#define D 16
#define C 3

static kmv_ctx *ctx_from(kmv_params *p) {
    p->n_threads = 1;
    kmv_ctx *ctx;
    assert_int_equal(kmv_ctx_create(p, &ctx), KMV_OK);
    return ctx;
}

static kmv_ctx *ctx_with(int exact, int measure, kmv_allocator *a) {
    kmv_params p;
    kmv_params_init(&p);
    p.exact = exact;
    p.measure_error = measure;
    p.seed = 17;
    if (a != NULL) p.allocator = *a;
    return ctx_from(&p);
}

static double ref_err(const float *out, const float *q, const float *k, size_t n, const float *v) {
    double o[C], oa[C], e2 = 0.0;
    tu_ref_attn(q, 1, k, n, D, v, C, 1.0 / sqrt((double)D), 0, o, oa);
    for (int col = 0; col < C; col++) e2 += (out[col] - o[col]) * (out[col] - o[col]);
    return sqrt(e2);
}

/* n keys and m queries on the sphere of radius 4 (dg_sphere, seed 21:
 * self-attention where cluster mates carry a row) and Gaussian values
 * drawn from vseed. */
static void sphere_data(size_t n, size_t m, uint64_t vseed, float **k, float **q, float **v) {
    *k = malloc(n * D * sizeof(float));
    *q = malloc(m * D * sizeof(float));
    *v = malloc(n * C * sizeof(float));
    dg_sphere(*k, n, *q, m, D, 4.0, 21);
    dg_x(*v, n * C, DG_X_GAUSS, vseed);
}

/* One decoding step of query q and its error against the float64 softmax. */
static double step_err(kmv_stream *s, const float *q, const float *k, size_t n, const float *v,
                       kmv_stats *st) {
    float out[C];
    assert_int_equal(kmv_stream_decode(s, q, out, st), KMV_OK);
    return ref_err(out, q, k, n, v);
}

/* Keys arrive in blocks of uneven sizes, some longer than any before (the
 * bound rises and the keys held are lifted again); every step matches the
 * float64 softmax. */
static void exact_steps_as_keys_grow(void **state) {
    (void)state;
    const size_t n = 700;
    float *k = tu_random(n * D, 3, 1.0f), *q = tu_random(40 * D, 4, 1.0f), *v = tu_random(n * C, 5, 2.0f);
    for (size_t j = 0; j < n; j++) /* norms that set records now and then */
        for (size_t t = 0; t < D; t++) k[j * D + t] *= (float)(1.0 + 3.0 * (double)(j % 97) / 97.0 + (double)j / 200.0);
    kmv_ctx *ctx = ctx_with(0, 0, NULL);
    kmv_stream *s;
    assert_int_equal(kmv_stream_attention_create(ctx, D, C, &s), KMV_OK);
    float out[C];
    assert_int_equal(kmv_stream_decode(s, q, out, NULL), KMV_EEMPTY);
    const size_t blocks[] = {1, 7, 50, 1, 1, 141, 300, 199};
    size_t at = 0, qi = 0;
    for (size_t b = 0; b < sizeof blocks / sizeof *blocks; b++) {
        assert_int_equal(kmv_stream_append_keys(s, k + at * D, v + at * C, blocks[b]), KMV_OK);
        at += blocks[b];
        for (int u = 0; u < 5; u++, qi = (qi + 1) % 40) {
            kmv_stats st;
            assert_int_equal(kmv_stream_decode(s, q + qi * D, out, &st), KMV_OK);
            assert_int_equal(st.n_cols, C);
            assert_int_equal(st.dim, D);
            assert_true(ref_err(out, q + qi * D, k, at, v) < 2e-5);
        }
    }
    kmv_stream_info info;
    assert_int_equal(kmv_stream_get_info(s, &info), KMV_OK);
    assert_int_equal(info.attention, 1);
    assert_int_equal(info.n_keys, n);
    assert_int_equal(info.dim, D);
    assert_int_equal(info.n_cols, C);
    assert_true(info.relifts >= 3);
    assert_true(info.key_bound == kmv_max_sq_norm(k, n, D));
    kmv_stream_free(s);
    kmv_ctx_free(ctx);
    free(k);
    free(q);
    free(v);
}

/* With the approximate path forced, each step's normalized error is
 * within the bound it reports (probability 1 - delta each: a few misses
 * are allowed), and the steps that could not meet it ran exact. */
static void approximate_steps_within_bound(void **state) {
    (void)state;
    const size_t n = 16384, m = 60;
    float *k, *q, *v;
    sphere_data(n, m, 22, &k, &q, &v);
    kmv_ctx *ctx = ctx_with(0, 1, NULL);
    kmv_stream *s;
    assert_int_equal(kmv_stream_attention_create(ctx, D, C, &s), KMV_OK);
    s->ix->force_approx = 1;
    assert_int_equal(kmv_stream_append_keys(s, k, v, n), KMV_OK);
    int approx = 0, misses = 0;
    double worst = 0.0, bound = 0.0;
    for (size_t i = 0; i < m; i++) {
        kmv_stats st;
        double err = step_err(s, q + i * D, k, n, v, &st);
        assert_true(fabs(err - st.error_measured) < 1e-5 + 1e-3 * err);
        if (st.mode == KMV_MODE_APPROX) {
            approx++;
            assert_true(tu_x(&st).samples > 0 && tu_x(&st).heavy_pairs > 0);
            misses += err > st.error_bound;
            worst = err > worst ? err : worst;
            bound = st.error_bound;
        } else {
            assert_int_equal(st.mode, KMV_MODE_FALLBACK);
            assert_true(err < 2e-5);
        }
    }
    print_message("%d of %zu steps approximate, %d beyond their bound; worst error %.2e, bound %.2e\n",
                  approx, m, misses, worst, bound);
    assert_true(approx >= (int)m / 2);
    assert_true(misses <= 2);
    kmv_stream_free(s);
    kmv_ctx_free(ctx);
    free(k);
    free(q);
    free(v);
}

/* Queries orthogonal to every key (their second half against the keys'
 * first): attention spreads evenly over n keys, no key is heavy, and a
 * step must sample the whole row against the bound on its row sum. qamp
 * scales the queries. */
static void spread_data(size_t n, size_t m, float qamp, float **k, float **q, float **v) {
    *k = tu_random(n * D, 8, 1.0f);
    *q = tu_random(m * D, 9, 1.0f);
    *v = tu_random(n * C, 10, 1.0f);
    for (size_t j = 0; j < n; j++)
        for (size_t t = D / 2; t < D; t++) (*k)[j * D + t] = 0.0f;
    for (size_t i = 0; i < m; i++)
        for (size_t t = 0; t < D; t++) (*q)[i * D + t] = t < D / 2 ? 0.0f : qamp * (*q)[i * D + t];
}

static kmv_ctx *ctx_budget(double eps, int budget) {
    kmv_params p;
    kmv_params_init(&p);
    p.eps = eps;
    kmv_params_x px = tu_px(&p);
    px.attn_budget = budget;
    kmv_params_set_x(&p, &px);
    return ctx_from(&p);
}

/* Spread attention (every logit 0: a uniform row) over 32768 keys. Under
 * the certified budget the light keys' range is all the step knows of
 * them (a window cannot rule out a key far above the rest), and the
 * samples that would bound it pass half the keys: the step is exact.
 * Under the empirical budget the same rows are sampled, about z^2 / eps^2
 * of them; with queries 6 times as long too, whose lifted kernel,
 * exp(-s (||q||^2 + alpha) / 2) = e^-1200, is far below float's range:
 * the step takes it relative to the nearest distance a key could have
 * (here e^-64). */
static void spread_attention(void **state) {
    (void)state;
    const size_t n = 32768, m = 24;
    const float amps[] = {10.0f, 10.0f, 60.0f};
    const int budgets[] = {KMV_BUDGET_CERTIFIED, KMV_BUDGET_EMPIRICAL, KMV_BUDGET_EMPIRICAL};
    for (int z = 0; z < 3; z++) {
        float *k, *q, *v;
        spread_data(n, m, amps[z], &k, &q, &v);
        kmv_ctx *ctx = ctx_budget(0.1, budgets[z]);
        kmv_stream *s;
        assert_int_equal(kmv_stream_attention_create(ctx, D, C, &s), KMV_OK);
        assert_int_equal(kmv_stream_append_keys(s, k, v, n), KMV_OK);
        double worst = 0.0;
        for (size_t i = 0; i < m; i++) {
            kmv_stats st;
            double err = step_err(s, q + i * D, k, n, v, &st);
            if (z == 0) {
                assert_int_equal(st.mode, KMV_MODE_FALLBACK);
                assert_int_equal(st.fallback_reason, KMV_FALLBACK_SAMPLES);
                assert_true(err < 2e-5);
                continue;
            }
            assert_int_equal(st.mode, KMV_MODE_APPROX);
            assert_int_equal(tu_x(&st).heavy_pairs, 0);
            assert_true(isinf(st.error_bound));
            assert_true(tu_x(&st).samples >= 500 && tu_x(&st).samples < n / 2);
            assert_true(err < 0.1); /* eps / z_err of the row's scale, typically */
            worst = err > worst ? err : worst;
        }
        if (z > 0)
            print_message("spread, empirical budget, queries x%.0f: %zu of %zu steps approximate, worst error %.2e\n",
                          (double)amps[z], m, m, worst);
        kmv_stream_free(s);
        kmv_ctx_free(ctx);
        free(k);
        free(q);
        free(v);
    }
}

/* Spread rows with one dominant key each (half the row's mass, logit
 * ln n above the rest): a window of s keys misses it with probability
 * 1 - s / n and sees a uniform row. Under the certified budget every
 * step stays within its bound; under the empirical one, steps that never
 * met their dominant key are off by about half the row, which is why it
 * is not the default. */
static void dominant_key(void **state) {
    (void)state;
    const size_t n = 32768, m = 24;
    float *k, *q, *v;
    spread_data(n, m, 10.0f, &k, &q, &v);
    for (size_t i = 0; i < m; i++) { /* key 1000 i + 7 along query i */
        float *kj = k + (1000 * i + 7) * D;
        const float *qi = q + i * D;
        double q2 = 0.0;
        for (int t = 0; t < D; t++) q2 += (double)qi[t] * qi[t];
        double f = log((double)n) / (0.25 * q2); /* s <q, k> = ln n at s = 1/sqrt(16) */
        for (int t = 0; t < D; t++) kj[t] = (float)(f * qi[t]);
    }
    double bound = 0.0; /* the certified steps', which the empirical ones are held to */
    for (int budget = 0; budget < 2; budget++) {
        kmv_ctx *ctx = ctx_budget(0.1, budget);
        kmv_stream *s;
        assert_int_equal(kmv_stream_attention_create(ctx, D, C, &s), KMV_OK);
        assert_int_equal(kmv_stream_append_keys(s, k, v, n), KMV_OK);
        int approx = 0, beyond = 0;
        for (size_t i = 0; i < m; i++) {
            kmv_stats st;
            double err = step_err(s, q + i * D, k, n, v, &st);
            if (budget == KMV_BUDGET_CERTIFIED) {
                bound = st.error_bound;
                assert_true(bound > 0.0 && err <= bound + 2e-5);
            }
            approx += st.mode == KMV_MODE_APPROX;
            beyond += err > bound;
        }
        print_message("dominant key, %s budget: %d of %zu steps approximate, %d beyond %.2f\n",
                      budget ? "empirical" : "certified", approx, m, beyond, bound);
        if (budget == KMV_BUDGET_EMPIRICAL) assert_true(beyond > 0);
        kmv_stream_free(s);
        kmv_ctx_free(ctx);
    }
    free(k);
    free(q);
    free(v);
}

/* A query so long that even relative to the nearest possible key every
 * lifted kernel value, exp(-s ||q|| sqrt(alpha)) for a query orthogonal
 * to the keys, falls below float's range: the window sees a row sum of 0,
 * no sample can bound it, and the step is the exact softmax row (taken in
 * the logit domain, which is uniform here). */
static void underflowing_row_runs_exact(void **state) {
    (void)state;
    const size_t n = 4096;
    float *k, *q, *v;
    spread_data(n, 1, 400.0f, &k, &q, &v);
    kmv_ctx *ctx = ctx_with(0, 0, NULL);
    kmv_stream *s;
    assert_int_equal(kmv_stream_attention_create(ctx, D, C, &s), KMV_OK);
    s->ix->force_approx = 1;
    assert_int_equal(kmv_stream_append_keys(s, k, v, n), KMV_OK);
    float out[C];
    kmv_stats st;
    assert_int_equal(kmv_stream_decode(s, q, out, &st), KMV_OK);
    assert_int_equal(st.mode, KMV_MODE_FALLBACK);
    assert_int_equal(st.fallback_reason, KMV_FALLBACK_SAMPLES);
    assert_true(ref_err(out, q, k, n, v) < 2e-5);
    kmv_stream_free(s);
    kmv_ctx_free(ctx);
    free(k);
    free(q);
    free(v);
}

/* One block or many (with the bound rising in between): the same steps,
 * bit for bit. */
static void blocks_do_not_matter(void **state) {
    (void)state;
    const size_t n = 4096, m = 8;
    float *k = malloc(n * D * sizeof(float)), *q = malloc(m * D * sizeof(float));
    float *v = malloc(n * C * sizeof(float));
    dg_sphere(k, n, q, m, D, 4.0, 31);
    for (size_t j = 0; j < n; j += 500) /* records along the way */
        for (size_t t = 0; t < D; t++) k[j * D + t] *= (float)(1.0 + (double)j / 2000.0);
    dg_x(v, n * C, DG_X_GAUSS, 32);
    kmv_ctx *ctx = ctx_with(0, 0, NULL);
    kmv_stream *one, *many;
    assert_int_equal(kmv_stream_attention_create(ctx, D, C, &one), KMV_OK);
    assert_int_equal(kmv_stream_attention_create(ctx, D, C, &many), KMV_OK);
    one->ix->force_approx = many->ix->force_approx = 1;
    assert_int_equal(kmv_stream_append_keys(one, k, v, n), KMV_OK);
    for (size_t at = 0, b = 1; at < n; b = b * 3 + 1) {
        size_t cnt = n - at < b ? n - at : b;
        assert_int_equal(kmv_stream_append_keys(many, k + at * D, v + at * C, cnt), KMV_OK);
        at += cnt;
    }
    kmv_stream_info info;
    assert_int_equal(kmv_stream_get_info(many, &info), KMV_OK);
    assert_true(info.relifts >= 2);
    for (size_t i = 0; i < m; i++) {
        float a[C], b[C];
        kmv_stats sa, sb;
        assert_int_equal(kmv_stream_decode(one, q + i * D, a, &sa), KMV_OK);
        assert_int_equal(kmv_stream_decode(many, q + i * D, b, &sb), KMV_OK);
        assert_memory_equal(a, b, sizeof a);
        assert_int_equal(sa.mode, sb.mode);
    }
    kmv_stream_free(one);
    kmv_stream_free(many);
    kmv_ctx_free(ctx);
    free(k);
    free(q);
    free(v);
}

static void tmp_path(char *buf, size_t len, const char *name) {
    const char *dir = getenv("TEST_TMPDIR");
    snprintf(buf, len, "%s/%s", dir ? dir : "/tmp", name);
}

/* Save, load, continue: a stream whose bound rose on the way (keys lifted
 * again), saved with approximate steps taken, answers every step after the
 * load as the saved one does, bit for bit, and goes on alike through more
 * appends, another rise of the bound included. */
static void snapshot_continue(void **state) {
    (void)state;
    const size_t n = 6000, half = 4000, m = 12;
    float *k = malloc(n * D * sizeof(float)), *q = malloc(m * D * sizeof(float));
    float *v = malloc(n * C * sizeof(float));
    dg_sphere(k, n, q, m, D, 4.0, 41);
    for (size_t t = 0; t < D; t++) { /* records: one before the save, one after */
        k[1200 * D + t] *= 1.1f;
        k[4500 * D + t] *= 1.2f;
    }
    dg_x(v, n * C, DG_X_GAUSS, 42);
    /* the empirical budget: steps approximate at this size */
    kmv_ctx *ctx = ctx_budget(0.1, KMV_BUDGET_EMPIRICAL);
    kmv_stream *a, *b;
    assert_int_equal(kmv_stream_attention_create(ctx, D, C, &a), KMV_OK);
    a->ix->force_approx = 1;
    for (size_t at = 0; at < half; at += 500)
        assert_int_equal(kmv_stream_append_keys(a, k + at * D, v + at * C, 500), KMV_OK);
    float ya[C], yb[C];
    kmv_stats sa, sb;
    int approx = 0;
    for (size_t i = 0; i < m; i++) {
        assert_int_equal(kmv_stream_decode(a, q + i * D, ya, &sa), KMV_OK);
        approx += sa.mode == KMV_MODE_APPROX;
    }
    char path[512], err[512];
    tmp_path(path, sizeof path, "attn.kmvs");
    assert_int_equal(kmv_stream_save(a, path, err, sizeof err), KMV_OK);
    assert_int_equal(kmv_stream_load(ctx, path, &b, err, sizeof err), KMV_OK);
    b->ix->force_approx = 1;
    kmv_stream_info ia, ib;
    assert_int_equal(kmv_stream_get_info(a, &ia), KMV_OK);
    assert_int_equal(kmv_stream_get_info(b, &ib), KMV_OK);
    assert_int_equal(ib.attention, 1);
    assert_int_equal(ib.dim, D);
    assert_int_equal(ib.n_cols, C);
    assert_int_equal(ib.n_keys, half);
    assert_true(ib.key_bound == ia.key_bound && ib.relifts == ia.relifts && ia.relifts >= 1);
    for (int round = 0; round < 2; round++) {
        for (size_t i = 0; i < m; i++) {
            assert_int_equal(kmv_stream_decode(a, q + i * D, ya, &sa), KMV_OK);
            assert_int_equal(kmv_stream_decode(b, q + i * D, yb, &sb), KMV_OK);
            assert_memory_equal(ya, yb, sizeof ya);
            assert_int_equal(sa.mode, sb.mode);
            approx += sa.mode == KMV_MODE_APPROX;
        }
        /* go on: the rest, with a key longer than any before */
        if (round == 0) {
            assert_int_equal(kmv_stream_append_keys(a, k + half * D, v + half * C, n - half), KMV_OK);
            assert_int_equal(kmv_stream_append_keys(b, k + half * D, v + half * C, n - half), KMV_OK);
        }
    }
    assert_true(approx > 0); /* the approximate path ran on both sides */
    assert_int_equal(kmv_stream_get_info(a, &ia), KMV_OK);
    assert_int_equal(kmv_stream_get_info(b, &ib), KMV_OK);
    assert_true(ia.relifts == ib.relifts && ia.key_bound == ib.key_bound);
    remove(path);
    kmv_stream_free(a);
    kmv_stream_free(b);
    kmv_ctx_free(ctx);
    free(k);
    free(q);
    free(v);
}

/* A small attention stream's snapshot: each byte changed, and every
 * truncation, is refused with KMV_EFORMAT and no stream. */
static void snapshot_damage(void **state) {
    (void)state;
    const size_t n = 40;
    float *k = tu_random(n * D, 51, 1.0f), *v = tu_random(n * C, 52, 1.0f);
    kmv_ctx *ctx = ctx_with(0, 0, NULL);
    kmv_stream *s, *l;
    assert_int_equal(kmv_stream_attention_create(ctx, D, C, &s), KMV_OK);
    assert_int_equal(kmv_stream_append_keys(s, k, v, n), KMV_OK);
    char path[512], bad[512], err[512];
    tmp_path(path, sizeof path, "attn-small.kmvs");
    tmp_path(bad, sizeof bad, "attn-bad.kmvs");
    assert_int_equal(kmv_stream_save(s, path, err, sizeof err), KMV_OK);
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    unsigned char buf[16384];
    size_t len = fread(buf, 1, sizeof buf, f);
    fclose(f);
    assert_true(len > 0 && len < sizeof buf);
    for (size_t i = 0; i <= len; i++) {
        for (int cut = 0; cut < 2; cut++) {
            if (cut && i == len) continue;
            unsigned char save = buf[i < len ? i : 0];
            if (!cut && i < len) buf[i] ^= 0x5a;
            f = fopen(bad, "wb");
            assert_non_null(f);
            fwrite(buf, 1, cut ? i : len, f);
            fclose(f);
            if (!cut && i < len) buf[i] = save;
            if (!cut && i == len) continue; /* the intact file */
            l = (kmv_stream *)ctx;
            if (kmv_stream_load(ctx, bad, &l, err, sizeof err) != KMV_EFORMAT || l != NULL)
                fail_msg("byte %zu (%s) not refused: %s", i, cut ? "cut" : "flipped", err);
        }
    }
    assert_int_equal(kmv_stream_load(ctx, path, &l, err, sizeof err), KMV_OK);
    kmv_stream_free(l);
    remove(path);
    remove(bad);
    kmv_stream_free(s);
    kmv_ctx_free(ctx);
    free(k);
    free(v);
}

/* Queries appended to an attention stream and its batch product: the same
 * rows, bit for bit, as kmv_attention over the same keys (it runs the same
 * steps), each within the step's bound of the float64 softmax; saved with
 * its queries, a loaded stream answers the product alike; a product over
 * no keys is KMV_EEMPTY, over no queries nothing. */
static void queries_and_products(void **state) {
    (void)state;
    const size_t n = 16384, m = 48;
    float *k, *q, *v;
    sphere_data(n, m, 62, &k, &q, &v);
    kmv_params p;
    kmv_params_init(&p);
    p.seed = 5;
    kmv_params_x px = tu_px(&p);
    px.force_approx = 1;
    assert_int_equal(kmv_params_set_x(&p, &px), KMV_OK);
    kmv_ctx *ctx = ctx_from(&p);
    kmv_stream *s, *l;
    assert_int_equal(kmv_stream_attention_create(ctx, D, C, &s), KMV_OK);
    float y[C];
    assert_int_equal(kmv_stream_matvec(s, NULL, y, NULL), KMV_OK); /* no queries: nothing */
    assert_int_equal(kmv_stream_append_queries(s, q, m), KMV_OK);
    float *ys = malloc(m * C * sizeof(float)), *yb = malloc(m * C * sizeof(float));
    assert_int_equal(kmv_stream_matvec(s, NULL, ys, NULL), KMV_EEMPTY); /* no keys */
    for (size_t at = 0; at < n; at += 4096)
        assert_int_equal(kmv_stream_append_keys(s, k + at * D, v + at * C, 4096), KMV_OK);
    kmv_stats ss, sb;
    assert_int_equal(kmv_stream_matvec(s, NULL, ys, &ss), KMV_OK);
    assert_int_equal(kmv_attention(ctx, q, m, k, n, D, v, C, yb, &sb), KMV_OK);
    assert_memory_equal(ys, yb, m * C * sizeof(float));
    assert_int_equal(ss.mode, sb.mode);
    assert_true(ss.error_bound == sb.error_bound);
    kmv_stream_info info;
    assert_int_equal(kmv_stream_get_info(s, &info), KMV_OK);
    assert_int_equal(info.n_queries, m);
    size_t beyond = 0;
    for (size_t i = 0; i < m; i++) beyond += ref_err(ys + i * C, q + i * D, k, n, v) > ss.error_bound;
    print_message("attention stream product: mode %d, %zu rows exact, %zu of %zu past the bound %.3g\n",
                  (int)ss.mode, ss.rows_exact, beyond, m, ss.error_bound);
    assert_true(beyond <= 1);
    assert_int_equal(ss.mode, KMV_MODE_APPROX); /* the product's rows did approximate */
    assert_true(ss.rows_exact < m);
    char path[512], err[512];
    tmp_path(path, sizeof path, "attn-queries.kmvs");
    assert_int_equal(kmv_stream_save(s, path, err, sizeof err), KMV_OK);
    assert_int_equal(kmv_stream_load(ctx, path, &l, err, sizeof err), KMV_OK);
    assert_int_equal(kmv_stream_matvec(l, NULL, yb, NULL), KMV_OK);
    assert_int_equal(kmv_stream_matvec(s, NULL, ys, NULL), KMV_OK);
    assert_memory_equal(ys, yb, m * C * sizeof(float));
    remove(path);
    kmv_stream_free(s);
    kmv_stream_free(l);
    kmv_ctx_free(ctx);
    free(k);
    free(q);
    free(v);
    free(ys);
    free(yb);
}

/* What an attention stream refuses, with the code kmv.h names. */
static void refusals(void **state) {
    (void)state;
    kmv_ctx *ctx = ctx_with(0, 0, NULL);
    kmv_stream *s;
    assert_int_equal(kmv_stream_attention_create(ctx, 0, C, &s), KMV_EINVAL);
    assert_null(s);
    assert_int_equal(kmv_stream_attention_create(ctx, D, 0, &s), KMV_EINVAL);
    assert_int_equal(kmv_stream_attention_create(NULL, D, C, &s), KMV_EINVAL);
    assert_int_equal(kmv_stream_attention_create(ctx, D, C, &s), KMV_OK);
    float k[D] = {1}, v[C] = {1}, y[C] = {5, 5, 5};
    assert_int_equal(kmv_stream_append_keys(s, k, v, 1), KMV_OK);
    assert_int_equal(kmv_stream_matvec(s, v, y, NULL), KMV_EUNSUPPORTED); /* fresh values */
    k[3] = NAN;
    assert_int_equal(kmv_stream_append_queries(s, k, 1), KMV_ENONFINITE);
    assert_int_equal(kmv_stream_append_keys(s, k, v, 1), KMV_ENONFINITE);
    assert_int_equal(kmv_stream_decode(s, k, y, NULL), KMV_ENONFINITE);
    assert_true(y[0] == 5.0f);
    k[3] = 0.0f;
    v[1] = INFINITY;
    assert_int_equal(kmv_stream_append_keys(s, k, v, 1), KMV_ENONFINITE);
    kmv_stream_info info;
    assert_int_equal(kmv_stream_get_info(s, &info), KMV_OK);
    assert_int_equal(info.n_keys, 1);
    kmv_stream_free(s);
    kmv_ctx_free(ctx);
}

/* Every allocation of an append that raises the bound fails in turn: the
 * stream is left as it was (keys, bound, answers), and nothing leaks. */
static void failed_appends_change_nothing(void **state) {
    (void)state;
    const size_t n = 300;
    float *k = tu_random(n * D, 41, 1.0f), *v = tu_random(n * C, 42, 1.0f), *q = tu_random(D, 43, 1.0f);
    for (size_t t = 0; t < D; t++) k[(n - 1) * D + t] *= 5.0f; /* the last block sets a record */
    tu_alloc_state as = {0, 0, 0};
    kmv_allocator a = tu_allocator(&as);
    kmv_ctx *ctx = ctx_with(0, 0, &a);
    kmv_stream *s;
    assert_int_equal(kmv_stream_attention_create(ctx, D, C, &s), KMV_OK);
    assert_int_equal(kmv_stream_append_keys(s, k, v, n - 50), KMV_OK);
    float before[C], after[C];
    assert_int_equal(kmv_stream_decode(s, q, before, NULL), KMV_OK);
    kmv_stream_info i0, i1;
    assert_int_equal(kmv_stream_get_info(s, &i0), KMV_OK);
    int failures = 0;
    for (long f = 1;; f++) {
        as.calls = 0;
        as.fail_at = f;
        int rc = kmv_stream_append_keys(s, k + (n - 50) * D, v + (n - 50) * C, 50);
        as.fail_at = 0;
        if (rc == KMV_OK) break;
        failures++;
        assert_int_equal(rc, KMV_ENOMEM);
        assert_int_equal(kmv_stream_get_info(s, &i1), KMV_OK);
        assert_int_equal(i1.n_keys, i0.n_keys);
        assert_true(i1.key_bound == i0.key_bound);
        assert_int_equal(i1.relifts, i0.relifts);
        assert_int_equal(kmv_stream_decode(s, q, after, NULL), KMV_OK);
        assert_memory_equal(before, after, sizeof before);
    }
    assert_true(failures >= 3);
    assert_int_equal(kmv_stream_get_info(s, &i1), KMV_OK);
    assert_int_equal(i1.relifts, i0.relifts + 1);
    assert_int_equal(kmv_stream_decode(s, q, after, NULL), KMV_OK);
    assert_true(ref_err(after, q, k, n, v) < 2e-5);
    kmv_stream_free(s);
    kmv_ctx_free(ctx);
    assert_int_equal(as.live, 0);
    free(k);
    free(v);
    free(q);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(exact_steps_as_keys_grow),
        cmocka_unit_test(approximate_steps_within_bound),
        cmocka_unit_test(spread_attention),
        cmocka_unit_test(dominant_key),
        cmocka_unit_test(underflowing_row_runs_exact),
        cmocka_unit_test(blocks_do_not_matter),
        cmocka_unit_test(snapshot_continue),
        cmocka_unit_test(snapshot_damage),
        cmocka_unit_test(queries_and_products),
        cmocka_unit_test(refusals),
        cmocka_unit_test(failed_appends_change_nothing),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
