/* libFuzzer harness for random sequences of API calls.
 *
 * The input is a program: a few bytes pick params (valid or not: sigma,
 * eps, delta at zero, negative, NaN, huge), then each op byte creates or
 * frees an index, appends a block of keys, or runs an index product, a
 * one-shot product or attention, with shapes and values taken from the
 * following bytes (values include 0, NaN, infinities, huge and tiny
 * floats). Half the indexes skip the cost model's fallbacks, so that the
 * approximate engine's own paths run at sizes a fuzzer can afford. With
 * bit 7 of the fourth byte set, the ops drive a stream instead: create
 * (Gaussian or attention), append keys with x, append queries, products
 * (stored or fresh x), decoding steps, and save then load (the loaded
 * stream must answer as the saved one, bit for bit, attention streams
 * too; an attention stream's product takes no fresh values).
 *
 * Checked beyond "no crash, no leak, no undefined behaviour": every code
 * returned is one kmv names; a refused append leaves the index's size as it
 * was; non-finite input is refused as KMV_ENONFINITE; a success never
 * returns a non-finite number; with a memory cap (some inputs set a small
 * one) an index never holds more than it, and KMV_ELIMIT comes only from
 * a cap. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <unistd.h>

#include "engine/index_layout.h"
#include "kmv/kmv.h"
#include "stream/stream.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

typedef struct input {
    const uint8_t *p;
    size_t n;
} input;

static unsigned byte(input *in) {
    if (in->n == 0) return 0;
    in->n--;
    return *in->p++;
}

static float value(input *in) {
    static const float special[] = {0.0f, 1.0f, -1.0f, 0.5f, 1e-30f, -1e-30f, 1e30f, 3e38f,
                                    -3e38f, 1e-45f, NAN, INFINITY, -INFINITY, 2.0f, 10.0f, -7.0f};
    unsigned b = byte(in);
    if (b < 16) return special[b];
    return ((float)b - 136.0f) / 16.0f; /* [-7.5, 7.4] */
}

static void fill(input *in, float *v, size_t count) {
    for (size_t i = 0; i < count; i++) v[i] = value(in);
}

/* A broken property: say which before the fuzzer saves the input. */
#define VIOLATED(what)                                                   \
    do {                                                                 \
        fprintf(stderr, "api_fuzz: %s (line %d)\n", what, __LINE__);    \
        abort();                                                         \
    } while (0)

static size_t cap;

static void check_code(int rc) {
    if (rc != KMV_OK && strcmp(kmv_errname(rc), "KMV_UNKNOWN") == 0) VIOLATED("unnamed code");
    if (rc == KMV_ELIMIT && cap == 0) VIOLATED("KMV_ELIMIT without a cap");
}

static void check_held(const kmv_index *ix) {
    if (cap != 0 && kmv_index_get_peak_bytes(ix) > cap) VIOLATED("index held more than its cap");
}

static int has_nonfinite(const float *v, size_t count) {
    return kmv_find_nonfinite(v, count, NULL) != KMV_OK;
}

static void check_finite(int rc, const float *v, size_t count) {
    if (rc == KMV_OK && has_nonfinite(v, count)) VIOLATED("success with a non-finite output");
}

#define MAXN 48
#define MAXD 6
#define MAXC 3

static void check_stream_held(const kmv_stream *s) {
    kmv_stream_info info;
    if (kmv_stream_get_info(s, &info) != KMV_OK) VIOLATED("info refused");
    if (cap != 0 && info.bytes > cap) VIOLATED("stream held more than its cap");
}

static size_t stream_rows(const kmv_stream *s, int keys) {
    kmv_stream_info info;
    kmv_stream_get_info(s, &info);
    return keys ? info.n_keys : info.n_queries;
}

static int is_attention(const kmv_stream *s) {
    kmv_stream_info info;
    return kmv_stream_get_info(s, &info) == KMV_OK && info.attention;
}

/* The stream ops (see the top). Returns the stream to keep. */
static kmv_stream *stream_op(input *in, const kmv_ctx *ctx, kmv_stream *s, size_t *d, size_t *c,
                             float *k, float *q, float *x, float *y) {
    unsigned op = byte(in) % 6;
    int rc;
    if (op == 0 || s == NULL) { /* a new stream */
        kmv_stream_free(s);
        s = NULL;
        *d = 1 + byte(in) % MAXD;
        *c = 1 + byte(in) % MAXC;
        unsigned how = byte(in);
        rc = how & 2 ? kmv_stream_attention_create(ctx, *d, *c, &s)
                     : kmv_stream_create(ctx, *d, *c, &s);
        check_code(rc);
        if (rc != KMV_OK) {
            if (s != NULL) VIOLATED("failed create left a stream");
            return NULL;
        }
        s->ix->force_approx = (int)(how & 1);
    } else if (op == 1) { /* append keys with x */
        size_t cnt = byte(in) % 17, before = stream_rows(s, 1);
        fill(in, k, cnt * *d);
        fill(in, x, cnt * *c);
        rc = kmv_stream_append_keys(s, k, x, cnt);
        check_code(rc);
        if ((has_nonfinite(k, cnt * *d) || has_nonfinite(x, cnt * *c)) && rc != KMV_ENONFINITE)
            VIOLATED("non-finite key or x taken");
        if (rc != KMV_OK && stream_rows(s, 1) != before) VIOLATED("refused append changed size");
    } else if (op == 2) { /* append queries */
        size_t cnt = byte(in) % 9, before = stream_rows(s, 0);
        fill(in, q, cnt * *d);
        rc = kmv_stream_append_queries(s, q, cnt);
        check_code(rc);
        if (has_nonfinite(q, cnt * *d) && rc != KMV_ENONFINITE) VIOLATED("non-finite query taken");
        if (rc != KMV_OK && stream_rows(s, 0) != before) VIOLATED("refused append changed size");
    } else if (op == 3) { /* product over the prefix, stored or fresh x */
        int fresh = (int)(byte(in) & 1);
        size_t n = stream_rows(s, 1), m = stream_rows(s, 0);
        if (fresh) fill(in, x, n * *c);
        rc = kmv_stream_matvec(s, fresh ? x : NULL, y, NULL);
        check_code(rc);
        if (is_attention(s) && fresh && rc != KMV_EUNSUPPORTED)
            VIOLATED("an attention stream took fresh values");
        if (is_attention(s) && !fresh && m > 0 && n == 0 && rc != KMV_EEMPTY)
            VIOLATED("attention over no keys answered");
        if (!is_attention(s) && fresh && has_nonfinite(x, n * *c) && rc != KMV_ENONFINITE)
            VIOLATED("non-finite fresh x taken");
        check_finite(rc, y, m * *c);
    } else if (op == 4) { /* decoding step */
        fill(in, q, *d);
        rc = kmv_stream_decode(s, q, y, NULL);
        check_code(rc);
        if (is_attention(s) && stream_rows(s, 1) == 0 && !has_nonfinite(q, *d) && rc != KMV_EEMPTY)
            VIOLATED("attention over no keys answered");
        if (has_nonfinite(q, *d) && rc != KMV_ENONFINITE) VIOLATED("non-finite query taken");
        check_finite(rc, y, *c);
    } else { /* save, load: the loaded stream answers as the saved one */
        char path[64], err[256];
        snprintf(path, sizeof path, "/tmp/kmv-api-fuzz-%ld.kmvs", (long)getpid());
        rc = kmv_stream_save(s, path, err, sizeof err);
        check_code(rc);
        if (rc != KMV_OK) return s;
        kmv_stream *t = NULL;
        rc = kmv_stream_load(ctx, path, &t, err, sizeof err);
        unlink(path);
        check_code(rc);
        if (rc != KMV_OK) {
            if (rc != KMV_ENOMEM && rc != KMV_ELIMIT) {
                fprintf(stderr, "api_fuzz: %s\n", err);
                VIOLATED("a saved stream did not load");
            }
            return s;
        }
        t->ix->force_approx = s->ix->force_approx;
        fill(in, q, *d);
        float ys[MAXC], yt[MAXC];
        int rs = kmv_stream_decode(s, q, ys, NULL), rt = kmv_stream_decode(t, q, yt, NULL);
        /* A loaded stream holds its arrays at their exact sizes, the saved
         * one with room to grow: under a cap, one may be refused
         * (KMV_ELIMIT) where the other is not. Answers given must agree. */
        if (rs != rt && rs != KMV_ELIMIT && rt != KMV_ELIMIT)
            VIOLATED("the loaded stream refuses differently");
        if (rs == KMV_OK && rt == KMV_OK && memcmp(ys, yt, *c * sizeof(float)) != 0)
            VIOLATED("the loaded stream answers differently");
        kmv_stream_free(s);
        s = t;
    }
    check_stream_held(s);
    if (stream_rows(s, 1) > MAXN * 4 || stream_rows(s, 0) > MAXN) { /* keep the runs short */
        kmv_stream_free(s);
        s = NULL;
    }
    return s;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    input in = {data, size};
    static const double sigmas[] = {1.0, 0.5, 3.0, 0.0, -1.0, NAN, 1e-30, 1e30};
    static const double epss[] = {0.1, 0.5, 0.01, 0.0, 1.0, -0.1, NAN, 0.9};
    kmv_params p;
    kmv_params_init(&p);
    unsigned b = byte(&in);
    p.sigma = sigmas[b & 7];
    p.eps = epss[(b >> 3) & 7];
    p.delta = (b >> 6) == 3 ? 0.0 : 0.01 * (double)(1 + (b >> 6));
    p.exact = byte(&in) & 1;
    p.seed = byte(&in);
    /* Bits 4-5 pick the cap, so that inputs saved before it existed (all
     * with those bits clear) still decode as they did. */
    static const size_t caps[] = {0, 2048, 16384, 262144};
    unsigned t = byte(&in);
    p.n_threads = 1 + (int)(t & 1);
    p.max_bytes = caps[(t >> 4) & 3];
    cap = p.max_bytes;
    kmv_ctx *ctx = NULL;
    int rc = kmv_ctx_create(&p, &ctx);
    check_code(rc);
    if (rc != KMV_OK) {
        if (ctx != NULL) VIOLATED("failed create left a context");
        return 0;
    }
    float *k = malloc(MAXN * MAXD * sizeof(float)), *q = malloc(MAXN * MAXD * sizeof(float));
    float *x = malloc(4 * MAXN * MAXC * sizeof(float)), *y = malloc(MAXN * MAXC * sizeof(float));
    kmv_index *ix = NULL;
    kmv_stream *sm = NULL;
    size_t d = 1, sd = 1, sc = 1;
    for (int ops = 0; ops < 24 && in.n > 0; ops++) {
        if (t & 128) {
            sm = stream_op(&in, ctx, sm, &sd, &sc, k, q, x, y);
            continue;
        }
        unsigned op = byte(&in) % 6;
        if (op == 0) { /* a new index */
            kmv_index_free(ix);
            ix = NULL;
            d = 1 + byte(&in) % MAXD;
            rc = kmv_index_create(ctx, d, &ix);
            check_code(rc);
            if (rc == KMV_OK) ix->force_approx = (int)(byte(&in) & 1);
        } else if (op == 1 && ix != NULL) { /* append keys */
            size_t cnt = byte(&in) % 17, before = kmv_index_get_size(ix);
            fill(&in, k, cnt * d);
            rc = kmv_index_append(ix, k, cnt);
            check_code(rc);
            if (has_nonfinite(k, cnt * d) && rc != KMV_ENONFINITE) VIOLATED("non-finite key taken");
            if (rc != KMV_OK && kmv_index_get_size(ix) != before) VIOLATED("refused append changed size");
            check_held(ix);
            if (kmv_index_get_size(ix) > MAXN * 4) { /* keep the runs short */
                kmv_index_free(ix);
                ix = NULL;
            }
        } else if (op == 2 && ix != NULL) { /* index product */
            size_t m = byte(&in) % 9, c = 1 + byte(&in) % MAXC, n = kmv_index_get_size(ix);
            fill(&in, q, m * d);
            fill(&in, x, n * c);
            kmv_stats st;
            rc = kmv_index_matvec(ix, q, m, x, c, y, &st);
            check_code(rc);
            check_held(ix);
            if ((has_nonfinite(q, m * d) || has_nonfinite(x, n * c)) && rc != KMV_ENONFINITE)
                VIOLATED("non-finite query or x taken");
            check_finite(rc, y, m * c);
        } else if (op == 3 || op == 4) { /* one-shot product or attention */
            size_t dd = 1 + byte(&in) % MAXD, m = byte(&in) % 9, n = byte(&in) % 17;
            size_t c = 1 + byte(&in) % MAXC;
            fill(&in, q, m * dd);
            fill(&in, k, n * dd);
            fill(&in, x, n * c);
            kmv_stats st;
            rc = op == 3 ? kmv_matvec(ctx, q, m, k, n, dd, x, c, y, &st)
                         : kmv_attention(ctx, q, m, k, n, dd, x, c, y, &st);
            check_code(rc);
            int bad = has_nonfinite(q, m * dd) || has_nonfinite(k, n * dd) ||
                      has_nonfinite(x, n * c);
            if (bad && rc != KMV_ENONFINITE && !(op == 4 && n == 0 && m > 0 && rc == KMV_EEMPTY))
                VIOLATED("non-finite operand taken");
            check_finite(rc, y, m * c);
        } else if (op == 5) {
            kmv_index_free(ix);
            ix = NULL;
        }
    }
    kmv_index_free(ix);
    kmv_stream_free(sm);
    kmv_ctx_free(ctx);
    free(k);
    free(q);
    free(x);
    free(y);
    return 0;
}
