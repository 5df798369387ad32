/* Attention decoding steps, kmv and its peers in one harness: one query
 * against every key so far, as a decoding loop asks, on GloVe
 * self-attention (as the paper's appendix A.1.4 runs it).
 *
 *   decode_peers [--glove PATH] [--n N] [--steps S]
 *
 * Keys: the first n GloVe vectors (d = 100; ../shared/data's 65,536, else
 * the shipped 4,096); one value column, Gaussian (tests/datagen.h); scale
 * 1/sqrt(d); queries: keys at spread positions. Methods, each on the same
 * steps:
 *  - exact: a kmv attention stream under params.exact (the reference);
 *  - kmv certified and kmv empirical: attention streams at eps = 0.1;
 *  - Quest-style pages (bench/peers.h): pages of 16 tokens in order, the
 *    top k pages by their box bound, softmax over their keys; k from 8 to
 *    1024 pages;
 *  - uniform sampling: s keys drawn uniformly, softmax over them.
 * Prints per method: microseconds per step, the speed-up over exact in the
 * same run, the mean and largest |o - exact|, and the bound a method
 * claims (kmv certified only). Read the peers at equal time against kmv's
 * rows: a row with the same microseconds. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KMV_STATIC_LINKING_ONLY
#include "bench/peers.h"
#include "kmv/kmv.h"
#include "kmv/kmv_experimental.h"
#include "tests/datagen.h"
#include "tools/clock.h"

static void check(int rc, const char *what) {
    if (rc != KMV_OK) {
        fprintf(stderr, "decode_peers: %s: %s\n", what, kmv_strerror(rc));
        exit(1);
    }
}

/* An attention stream over the keys: exact, or at eps 0.1 under budget. */
static kmv_stream *stream(const float *k, const float *v, size_t n, size_t d, int exact,
                          int budget, kmv_ctx **ctx) {
    kmv_params p;
    kmv_params_init(&p);
    p.eps = 0.1;
    p.exact = exact;
    kmv_params_x px;
    kmv_params_get_x(&p, &px);
    px.attn_budget = budget;
    kmv_params_set_x(&p, &px);
    check(kmv_ctx_create(&p, ctx), "context");
    kmv_stream *s;
    check(kmv_stream_attention_create(*ctx, d, 1, &s), "create");
    check(kmv_stream_append_keys(s, k, v, n), "append");
    return s;
}

static void row(const char *method, const char *param, double us, double exact_us,
                const float *o, const float *oe, size_t steps, double bound) {
    double mean = 0.0, worst = 0.0;
    for (size_t i = 0; i < steps; i++) {
        double e = fabs((double)o[i] - oe[i]);
        mean += e / (double)steps;
        worst = e > worst ? e : worst;
    }
    printf("%s,%s,%.1f,%.2f,%.5f,%.5f,", method, param, us, exact_us / us, mean, worst);
    if (isfinite(bound)) printf("%.3f\n", bound);
    else printf("none\n");
}

int main(int argc, char **argv) {
    const char *glove = "../shared/data/glove100d_first65536.npy";
    size_t n_want = 0, steps = 200;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--glove") && i + 1 < argc) glove = argv[++i];
        else if (!strcmp(argv[i], "--n") && i + 1 < argc) n_want = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = strtoull(argv[++i], NULL, 10);
        else {
            fprintf(stderr, "usage: decode_peers [--glove PATH] [--n N] [--steps S]\n");
            return 2;
        }
    }
    kmv_array g;
    char err[256];
    if (kmv_npy_read(glove, NULL, &g, err, sizeof err) != KMV_OK &&
        kmv_npy_read("data/glove100d_first4096.npy", NULL, &g, err, sizeof err) != KMV_OK) {
        fprintf(stderr, "decode_peers: %s\n", err);
        return 1;
    }
    size_t n = n_want && n_want < g.rows ? n_want : g.rows, d = g.cols;
    const float *k = g.data;
    float *v = malloc(n * sizeof(float)), *oe = malloc(steps * sizeof(float));
    float *o = malloc(steps * sizeof(float));
    if (!v || !oe || !o || steps == 0) return 1;
    dg_x(v, n, DG_X_GAUSS, 23);
    double scale = 1.0 / sqrt((double)d);
    printf("# attention decoding steps on GloVe: n = %zu keys, d = %zu, %zu steps (queries: keys),\n"
           "# one value column; eps = 0.1 for kmv; error |o - exact|\n", n, d, steps);
    printf("method,param,us_per_step,speedup,mean_err,max_err,bound\n");

    kmv_ctx *ce;
    kmv_stream *se = stream(k, v, n, d, 1, KMV_BUDGET_CERTIFIED, &ce);
    double t0 = tool_now();
    for (size_t i = 0; i < steps; i++) check(kmv_stream_decode(se, k + ((i * 7919) % n) * d, &oe[i], NULL), "exact");
    double exact_us = 1e6 * (tool_now() - t0) / (double)steps;
    row("exact", "-", exact_us, exact_us, oe, oe, steps, 0.0);

    static const char *budget_name[2] = {"certified", "empirical"};
    for (int b = 0; b < 2; b++) {
        kmv_ctx *ca;
        kmv_stream *sa = stream(k, v, n, d, 0, b, &ca);
        kmv_stats st;
        check(kmv_stream_decode(sa, k, &o[0], &st), "first step"); /* plans the tables */
        double bound = 0.0;
        t0 = tool_now();
        for (size_t i = 0; i < steps; i++) {
            check(kmv_stream_decode(sa, k + ((i * 7919) % n) * d, &o[i], &st), "kmv");
            bound = st.error_bound > bound ? st.error_bound : bound;
        }
        double us = 1e6 * (tool_now() - t0) / (double)steps;
        row("kmv", budget_name[b], us, exact_us, o, oe, steps, bound);
        kmv_stream_free(sa);
        kmv_ctx_free(ca);
    }

    peer_pages *pp = peer_pages_new(k, n, d, 16);
    if (pp == NULL) return 1;
    for (size_t top = 8; top <= 1024; top *= 4) {
        t0 = tool_now();
        for (size_t i = 0; i < steps; i++)
            if (peer_pages_step(pp, k + ((i * 7919) % n) * d, top, v, 1, scale, &o[i]) != 0) return 1;
        char param[32];
        snprintf(param, sizeof param, "top %zu pages", top);
        row("quest", param, 1e6 * (tool_now() - t0) / (double)steps, exact_us, o, oe, steps, INFINITY);
    }
    peer_pages_free(pp);

    for (size_t s = 256; s <= 16384; s *= 4) {
        t0 = tool_now();
        for (size_t i = 0; i < steps; i++) {
            peer_problem pr = {k + ((i * 7919) % n) * d, 1, k, n, d, v, 1, scale};
            if (peer_uniform(&pr, s, 1000 + i, &o[i]) != 0) return 1;
        }
        char param[32];
        snprintf(param, sizeof param, "%zu samples", s);
        row("uniform", param, 1e6 * (tool_now() - t0) / (double)steps, exact_us, o, oe, steps, INFINITY);
    }
    kmv_stream_free(se);
    kmv_ctx_free(ce);
    kmv_array_free(&g);
    free(v);
    free(o);
    free(oe);
    return 0;
}
