/* The streaming engine, measured in one run on a shared machine (ratios
 * from the same run, never a wall-clock limit):
 *
 *   stream_bench [--glove PATH] [--steps N]
 *
 *  1. Appending: microseconds per key (median and mean of 16 blocks of 256;
 *     the mean includes the storage doubling a block may meet) appended
 *     to a stream of 1K, 2K, 8K and 64K keys after a decoding step built
 *     its tables, with the table inserts per key. Twice: as the cost model
 *     decides (no tables below 64K here), and with tables forced at every
 *     size through the index's test flag, so that the cost per (key,
 *     table) insert can be compared across sizes. Flat means O(block).
 *  2. The decoding step at n = 65536: clustered data (d = 64, sigma = 1)
 *     and the GloVe vectors (d = 100, sigma = 0.5, keys = the first n
 *     vectors, steps for vectors past them when the file has more, else
 *     for the keys themselves): mean latency of the approximate row and of
 *     the exact row (the stream with params.exact: one pass over the keys),
 *     their ratio, and the worst ||y - exact|| / ||x|| against eps = 0.1.
 *     Also zip codes (data/zipcodes_latlon.npy, standardized, x = 1: kernel
 *     density) at sigma 0.01 to 0.05, and --backend to pin one backend.
 *  3. A decoding loop, token by token: one key appended and one step per
 *     token from 32K and 48K clustered keys, against the exact stream; the
 *     tree's insert cost per key and its memory.
 *  4. Kx for the current prefix after streaming 64 blocks against one
 *     block: the same answer, and the ratio of their times. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KMV_STATIC_LINKING_ONLY /* the engine's counters and knobs */
#include "kmv/kmv.h"
#include "kmv/kmv_experimental.h"
#include "tools/clock.h"
#include "tests/datagen.h"
#include "tests/realdata.h"

static int backend; /* --backend auto|lsh|tree: the decoding steps' */

/* forced: the approximate path even where the cost model would run
 * exact, so tables exist at every size. */
static kmv_ctx *ctx_for(double sigma, int exact, int forced) {
    kmv_params p;
    kmv_params_init(&p);
    p.sigma = sigma;
    p.eps = 0.1;
    p.exact = exact;
    kmv_params_x px;
    kmv_params_get_x(&p, &px);
    px.force_approx = forced;
    px.backend = forced ? KMV_BACKEND_LSH : backend;
    kmv_params_set_x(&p, &px);
    kmv_ctx *ctx;
    if (kmv_ctx_create(&p, &ctx) != KMV_OK) exit(1);
    return ctx;
}

/* The tables a step reports. */
static int last_tables(const kmv_stats *st) {
    kmv_stats_x sx;
    kmv_stats_get_x(st, &sx);
    return sx.lsh_tables;
}

static void check(int rc, const char *what) {
    if (rc != KMV_OK) {
        fprintf(stderr, "%s: %s\n", what, kmv_strerror(rc));
        exit(1);
    }
}

static int cmp_double(const void *pa, const void *pb) {
    double a = *(const double *)pa, b = *(const double *)pb;
    return (a > b) - (a < b);
}

static void appending(int forced) {
    const size_t d = 64, blk = 256, nblk = 16;
    size_t sizes[] = {1024, 2048, 8192, 65536};
    if (!forced) {
        printf("# appending %zu blocks of %zu keys to a stream of n keys (clustered, d = %zu); the\n"
               "# tables come from a decoding step (model: as the cost model decides; forced:\n"
               "# built at every size); ns_per_insert = median time per key / tables\n",
               nblk, blk, d);
        printf("series,n,median_us_per_key,mean_us_per_key,table_inserts_per_key,tables,"
               "ns_per_insert\n");
    }
    for (int si = 0; si < 4; si++) {
        size_t n = sizes[si], total = n + nblk * blk;
        float *k = malloc(total * d * sizeof(float)), *q = malloc(d * sizeof(float));
        float *x = malloc(total * sizeof(float));
        dg_clustered(k, total, q, 1, d, 16, 1.0, 5 + n);
        dg_x(x, total, DG_X_GAUSS, 6 + n);
        kmv_ctx *ctx = ctx_for(1.0, 0, forced);
        kmv_stream *s;
        check(kmv_stream_create(ctx, d, 1, &s), "create");
        check(kmv_stream_append_keys(s, k, x, n), "append");
        float y;
        check(kmv_stream_decode(s, q, &y, NULL), "decode");
        kmv_stream_info a, b;
        kmv_stream_get_info(s, &a);
        double t[16], sum = 0.0;
        for (size_t u = 0; u < nblk; u++) {
            double t0 = tool_now();
            check(kmv_stream_append_keys(s, k + (n + u * blk) * d, x + n + u * blk, blk), "append");
            t[u] = (tool_now() - t0) / (double)blk;
            sum += t[u];
        }
        kmv_stream_get_info(s, &b);
        qsort(t, nblk, sizeof(double), cmp_double);
        double median = 0.5 * (t[nblk / 2 - 1] + t[nblk / 2]);
        printf("%s,%zu,%.2f,%.2f,%.1f,%d,", forced ? "forced" : "model", n, 1e6 * median,
               1e6 * sum / (double)nblk,
               (double)(b.table_inserts - a.table_inserts) / (double)(nblk * blk), b.lsh_tables);
        if (b.lsh_tables > 0)
            printf("%.0f\n", 1e9 * median / b.lsh_tables);
        else
            printf("-\n");
        free(k);
        free(q);
        free(x);
        kmv_stream_free(s);
        kmv_ctx_free(ctx);
    }
}

/* Two streams (attention or Gaussian) over the same n keys with one value
 * column each, under ca and ce: the approximate one and the exact one a
 * measurement compares it with. */
static void stream_pair(kmv_ctx *ca, kmv_ctx *ce, int attention, const float *k, const float *x,
                        size_t n, size_t d, kmv_stream **sa, kmv_stream **se) {
    kmv_stream **s[2] = {sa, se};
    kmv_ctx *c[2] = {ca, ce};
    for (int u = 0; u < 2; u++) {
        check(attention ? kmv_stream_attention_create(c[u], d, 1, s[u])
                        : kmv_stream_create(c[u], d, 1, s[u]),
              "create");
        check(kmv_stream_append_keys(*s[u], k, x, n), "append");
    }
}

/* Decoding steps for `steps` queries against n keys, approximate and exact. */
static void decoding(const char *name, const float *k, size_t n, const float *qs, size_t steps,
                     size_t d, double sigma, const float *x) {
    kmv_ctx *ca = ctx_for(sigma, 0, 0), *ce = ctx_for(sigma, 1, 0);
    kmv_stream *sa, *se;
    stream_pair(ca, ce, 0, k, x, n, d, &sa, &se);
    double x2 = 0.0;
    for (size_t j = 0; j < n; j++) x2 += (double)x[j] * x[j];
    float y, ye;
    kmv_stats st;
    double tb = tool_now();
    check(kmv_stream_decode(sa, qs, &y, &st), "decode"); /* builds the tables */
    tb = tool_now() - tb;
    double ta = 0.0, te = 0.0, worst = 0.0, cands = 0.0, samples = 0.0, th = 0.0, ts = 0.0;
    double bounded = 0.0, visited = 0.0;
    int approx = 0;
    for (size_t i = 0; i < steps; i++) {
        const float *q = qs + i * d;
        double t0 = tool_now();
        check(kmv_stream_decode(sa, q, &y, &st), "decode");
        double t1 = tool_now();
        check(kmv_stream_decode(se, q, &ye, NULL), "decode");
        double t2 = tool_now();
        ta += t1 - t0;
        te += t2 - t1;
        approx += st.mode == KMV_MODE_APPROX;
        kmv_stats_x sx;
        kmv_stats_get_x(&st, &sx);
        cands += (double)sx.lsh_candidates;
        bounded += (double)sx.nodes_bounded;
        visited += (double)sx.keys_visited;
        samples += (double)sx.samples;
        th += sx.seconds_heavy;
        ts += sx.seconds_sample;
        double e = fabs((double)y - ye) / sqrt(x2);
        worst = e > worst ? e : worst;
    }
    kmv_stats_x sx;
    kmv_stats_get_x(&st, &sx);
    printf("%s,%zu,%zu,%.1f,%.1f,%.2f,%.5f,%d/%zu,%s,%.0f,%.0f,%.0f,%.0f,%.1f,%.1f,%.3f,%d\n", name,
           n, d, 1e6 * ta / (double)steps, 1e6 * te / (double)steps, te / ta, worst, approx, steps,
           sx.backend == KMV_BACKEND_TREE ? "tree" : "lsh", bounded / (double)steps,
           visited / (double)steps, cands / (double)steps, samples / (double)steps,
           1e6 * th / (double)steps, 1e6 * ts / (double)steps, tb, last_tables(&st));
    kmv_stream_free(sa);
    kmv_stream_free(se);
    kmv_ctx_free(ca);
    kmv_ctx_free(ce);
}

/* Attention decoding steps: `steps` queries (rows of k: self-attention,
 * as the paper's appendix A.1.4 runs GloVe) against n keys with one
 * value column, an attention stream at eps = 0.1 under `budget` against
 * one under params.exact. */
static void attention_decoding(const char *name, const float *k, size_t n, size_t steps, size_t d,
                               const float *v, int budget) {
    kmv_params p;
    kmv_params_init(&p);
    p.eps = 0.1;
    kmv_params_x px;
    kmv_params_get_x(&p, &px);
    px.attn_budget = budget;
    kmv_params_set_x(&p, &px);
    kmv_ctx *ca, *ce;
    check(kmv_ctx_create(&p, &ca), "ctx");
    p.exact = 1;
    check(kmv_ctx_create(&p, &ce), "ctx");
    kmv_stream *sa, *se;
    stream_pair(ca, ce, 1, k, v, n, d, &sa, &se);
    float y, ye;
    kmv_stats st;
    check(kmv_stream_decode(sa, k, &y, &st), "decode"); /* builds the tables */
    double ta = 0.0, te = 0.0, worst = 0.0, bound = 0.0;
    int approx = 0;
    for (size_t i = 0; i < steps; i++) {
        const float *q = k + ((i * 7919) % n) * d;
        double t0 = tool_now();
        check(kmv_stream_decode(sa, q, &y, &st), "decode");
        double t1 = tool_now();
        check(kmv_stream_decode(se, q, &ye, NULL), "decode");
        double t2 = tool_now();
        ta += t1 - t0;
        te += t2 - t1;
        approx += st.mode == KMV_MODE_APPROX;
        double e = fabs((double)y - ye);
        worst = e > worst ? e : worst;
        bound = st.error_bound;
    }
    printf("%s,%s,%zu,%zu,%.1f,%.1f,%.2f,%.5f,%.3f,%d/%zu\n", name,
           budget == KMV_BUDGET_EMPIRICAL ? "empirical" : "certified", n, d,
           1e6 * ta / (double)steps, 1e6 * te / (double)steps, te / ta, worst, bound, approx, steps);
    kmv_stream_free(sa);
    kmv_stream_free(se);
    kmv_ctx_free(ca);
    kmv_ctx_free(ce);
}

/* A decoding loop: from n0 clustered keys (d = 64), one key appended and
 * one step taken `steps` times, under the cost model and exact: the mean
 * step (inserting the new key into the tree included) and the tree's
 * insert cost per key. */
static void token_by_token(size_t n0, size_t steps, double sigma) {
    const size_t d = 64;
    size_t total = n0 + steps;
    float *k = malloc(total * d * sizeof(float)), *q = malloc(steps * d * sizeof(float));
    float *x = malloc(total * sizeof(float));
    dg_clustered(k, total, q, steps, d, 16, 1.0, 31);
    dg_x(x, total, DG_X_GAUSS, 32);
    kmv_ctx *ca = ctx_for(sigma, 0, 0), *ce = ctx_for(sigma, 1, 0);
    kmv_stream *sa, *se;
    stream_pair(ca, ce, 0, k, x, n0, d, &sa, &se);
    float y, ye;
    kmv_stats st;
    check(kmv_stream_decode(sa, q, &y, &st), "decode"); /* the build */
    kmv_stream_info i0;
    kmv_stream_get_info(sa, &i0);
    double ta = 0.0, te = 0.0, x2 = 0.0, worst = 0.0;
    for (size_t j = 0; j < n0; j++) x2 += (double)x[j] * x[j];
    int tree = 0;
    for (size_t i = 0; i < steps; i++) {
        const float *kj = k + (n0 + i) * d;
        x2 += (double)x[n0 + i] * x[n0 + i];
        double t0 = tool_now();
        check(kmv_stream_append_keys(sa, kj, x + n0 + i, 1), "append");
        check(kmv_stream_decode(sa, q + i * d, &y, &st), "decode");
        double t1 = tool_now();
        check(kmv_stream_append_keys(se, kj, x + n0 + i, 1), "append");
        check(kmv_stream_decode(se, q + i * d, &ye, NULL), "decode");
        double t2 = tool_now();
        ta += t1 - t0;
        te += t2 - t1;
        kmv_stats_x sx;
        kmv_stats_get_x(&st, &sx);
        tree += sx.backend == KMV_BACKEND_TREE && st.mode == KMV_MODE_APPROX;
        double e = fabs((double)y - ye) / sqrt(x2);
        worst = e > worst ? e : worst;
    }
    kmv_stream_info i1;
    kmv_stream_get_info(sa, &i1);
    double ins = i1.tree_seconds_insert - i0.tree_seconds_insert;
    uint64_t nins = i1.tree_inserts - i0.tree_inserts;
    printf("%zu,%zu,%g,%.1f,%.1f,%.2f,%.5f,%d/%zu,%.2f,%zu,%.1f\n", n0, steps, sigma,
           1e6 * ta / (double)steps, 1e6 * te / (double)steps, te / ta, worst, tree, steps,
           nins ? 1e6 * ins / (double)nins : 0.0, i1.tree_bytes,
           100.0 * (double)i1.tree_bytes / (double)(total * d * sizeof(float)));
    kmv_stream_free(sa);
    kmv_stream_free(se);
    kmv_ctx_free(ca);
    kmv_ctx_free(ce);
    free(k);
    free(q);
    free(x);
}

static void streamed_vs_batch(void) {
    const size_t n = 16384, d = 100, blocks = 64;
    float *k = malloc(n * d * sizeof(float)), *q = malloc(n * d * sizeof(float));
    float *x = malloc(n * sizeof(float));
    dg_clustered(k, n, q, n, d, 16, 1.0, 11);
    dg_x(x, n, DG_X_GAUSS, 12);
    kmv_ctx *ctx = ctx_for(1.0, 0, 0);
    kmv_stream *a, *b;
    check(kmv_stream_create(ctx, d, 1, &a), "create");
    check(kmv_stream_create(ctx, d, 1, &b), "create");
    check(kmv_stream_append_keys(a, k, x, n), "append");
    check(kmv_stream_append_queries(a, q, n), "queries");
    size_t bs = n / blocks;
    float *y = malloc(n * sizeof(float)), *yb = malloc(n * sizeof(float));
    kmv_stats st;
    for (size_t i = 0; i < blocks; i++) {
        check(kmv_stream_append_keys(b, k + i * bs * d, x + i * bs, bs), "append");
        check(kmv_stream_append_queries(b, q + i * bs * d, bs), "queries");
        /* Answer at every prefix, as a prefix-scaling run does. */
        check(kmv_stream_matvec(b, NULL, yb, NULL), "matvec");
    }
    double best_a = INFINITY, best_b = INFINITY;
    kmv_stats sb;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = tool_now();
        check(kmv_stream_matvec(a, NULL, y, &st), "matvec");
        double t1 = tool_now();
        check(kmv_stream_matvec(b, NULL, yb, &sb), "matvec");
        double t2 = tool_now();
        best_a = t1 - t0 < best_a ? t1 - t0 : best_a;
        best_b = t2 - t1 < best_b ? t2 - t1 : best_b;
    }
    /* The streamed tables were planned at the last doubling, for fewer
     * keys: the candidates show what that costs. */
    kmv_stats_x xa, xb;
    kmv_stats_get_x(&st, &xa);
    kmv_stats_get_x(&sb, &xb);
    printf("# Kx at n = m = %zu, d = %zu (clustered), best of 5: one block %.4f s, %zu blocks %.4f s, "
           "ratio %.2f, same answer: %s, mode %s; tables (L, k) %d x %d vs %d x %d, "
           "candidates %.2fM vs %.2fM\n",
           n, d, best_a, blocks, best_b, best_b / best_a,
           memcmp(y, yb, n * sizeof(float)) == 0 ? "yes" : "NO",
           st.mode == KMV_MODE_APPROX ? "approx" : "fallback", xa.lsh_tables, xa.lsh_hash_len,
           xb.lsh_tables, xb.lsh_hash_len, 1e-6 * (double)xa.lsh_candidates,
           1e-6 * (double)xb.lsh_candidates);
    free(y);
    free(yb);
    kmv_stream_free(a);
    kmv_stream_free(b);
    kmv_ctx_free(ctx);
    free(k);
    free(q);
    free(x);
}

int main(int argc, char **argv) {
    const char *glove = "../shared/data/glove100d_first65536.npy";
    const char *zipcodes = "data/zipcodes_latlon.npy";
    size_t steps = 200;
    int decode_only = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--glove") && i + 1 < argc) glove = argv[++i];
        else if (!strcmp(argv[i], "--zipcodes") && i + 1 < argc) zipcodes = argv[++i];
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = (size_t)strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--decode-only")) decode_only = 1;
        else if (!strcmp(argv[i], "--backend") && i + 1 < argc) {
            const char *b = argv[++i];
            backend = !strcmp(b, "lsh") ? KMV_BACKEND_LSH : !strcmp(b, "tree") ? KMV_BACKEND_TREE : KMV_BACKEND_AUTO;
        } else {
            fprintf(stderr, "usage: stream_bench [--glove PATH] [--steps N] [--decode-only] "
                            "[--backend auto|lsh|tree]\n");
            return 2;
        }
    }
    if (!decode_only) {
        appending(0);
        appending(1);
    }
    printf("# decoding steps, eps = 0.1 (tables built at the first step, build_s)\n");
    printf("data,n,d,approx_us,exact_us,speedup,worst_err,approx_steps,backend,nodes_bounded,"
           "keys_visited,cands,samples,heavy_us,sample_us,build_s,tables\n");
    const size_t n = 65536;
    {
        const size_t d = 64;
        float *k = malloc(n * d * sizeof(float)), *q = malloc(steps * d * sizeof(float));
        float *x = malloc(n * sizeof(float));
        dg_clustered(k, n, q, steps, d, 16, 1.0, 21);
        dg_x(x, n, DG_X_GAUSS, 22);
        decoding("clustered", k, n, q, steps, d, 1.0, x);
        decoding("clustered_s0.5", k, n, q, steps, d, 0.5, x);
        free(k);
        free(q);
        free(x);
    }
    kmv_array g;
    char err[256];
    /* Kernel density (x = 1) on real low-dimensional data: the zip codes'
     * coordinates, standardized; keys the first 32768, steps for the rest */
    if (kmv_npy_read(zipcodes, NULL, &g, err, sizeof err) == KMV_OK && g.rows > 32768 + steps) {
        size_t zn = 32768;
        rd_standardize(g.data, g.rows, g.cols);
        float *x = malloc(zn * sizeof(float));
        for (size_t j = 0; j < zn; j++) x[j] = 1.0f;
        static const double sig[] = {0.01, 0.02, 0.05};
        for (int u = 0; u < 3; u++) {
            char name[64];
            snprintf(name, sizeof name, "zipcodes_s%g", sig[u]);
            decoding(name, g.data, zn, g.data + zn * g.cols, steps, g.cols, sig[u], x);
        }
        free(x);
        kmv_array_free(&g);
    } else {
        printf("# zip code rows skipped: %s\n", err);
    }
    if (kmv_npy_read(glove, NULL, &g, err, sizeof err) == KMV_OK && g.rows >= n) {
        float *x = malloc(n * sizeof(float));
        dg_x(x, n, DG_X_GAUSS, 23);
        size_t extra = g.rows - n;
        const float *qs = extra >= steps ? g.data + n * g.cols : g.data;
        decoding("glove", g.data, n, qs, steps, g.cols, 0.5, x);
        printf("# attention decoding steps, eps = 0.1: queries are keys (self-attention, as in the\n"
               "# paper's appendix A.1.4), one value column; error |out - exact|, bound from the stats\n");
        printf("data,budget,n,d,approx_us,exact_us,speedup,worst_err,bound,approx_steps\n");
        for (int budget = 0; budget < 2; budget++)
            for (size_t an = 4096; an <= n; an *= 4)
                attention_decoding("glove", g.data, an, steps, g.cols, x, budget);
        free(x);
        kmv_array_free(&g);
    } else {
        printf("# GloVe rows skipped: %s\n", err);
    }
    printf("# a decoding loop: one key appended and one step taken per token, clustered d = 64,\n"
           "# eps = 0.1, under the cost model; step_us includes the append and the tree insert\n");
    printf("n0,tokens,sigma,kmv_step_us,exact_step_us,speedup,worst_err,tree_steps,"
           "insert_us_per_key,tree_bytes,tree_pct_of_keys\n");
    token_by_token(32768, 2048, 1.0);
    token_by_token(49152, 2048, 1.0);
    if (!decode_only) streamed_vs_batch();
    return 0;
}
