/* The paper's appendix A.1.4 in one harness: normalized self-attention on
 * the GloVe vectors (keys = queries, d = 100, scale 1/sqrt(d)), n = 4K to
 * 16K in steps of 1K (--max N to go further), every method tuned so that
 * its error lands in target +- 0.05 (target 0.1), and each one's speed-up
 * = exact time / its time, all in the same run.
 *
 * Values (--values): `glove`, the paper's choice, v = V[:, 1] with V the
 * GloVe matrix itself (columns 1..C with --cols C); or `random`, uniform in
 * [-1, 1]. Errors, both always printed:
 *   err_v = ||O - Y||_F / ||V||_F   the paper's measure;
 *   err_o = ||O - Y||_F / ||O||_F   relative to the output itself.
 * On GloVe, attention at this scale spreads over thousands of keys and
 * every output row is near the mean of v, so the output 0 already has
 * err_v = ||O|| / ||V|| of about 0.1: err_v cannot tell methods apart, and
 * --measure o (the default) tunes on err_o instead; --measure v tunes on
 * the paper's.
 *
 * Methods:
 *   exact     kmv_attention under params.exact (the reference);
 *   kmv       kmv_attention without it (the certified budget), at the
 *             largest eps of a sweep whose error is within the band's top;
 *   kmv_emp   the same under params.attn_budget = KMV_BUDGET_EMPIRICAL,
 *             sized by the windows' own variance as the paper's
 *             implementation is (no bound);
 *   uniform   uniform column sampling (bench/peers.h);
 *   kdeformer LSH-sorted blocks summed exactly plus column-norm sampling;
 *   bimw      Backurs-Indyk-Musco-Wagner 2021: A 1 and A v+, A v- as
 *             weighted density queries answered by sampling;
 *   zero      the output 0.
 * The sampling methods' sample counts are found by bisection. A method
 * that misses the band at every setting is printed with met = 0. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/peers.h"
#define KMV_STATIC_LINKING_ONLY /* the engine's counters and knobs */
#include "kmv/kmv.h"
#include "kmv/kmv_experimental.h"
#include "tools/clock.h"

static void check(int rc, const char *what) {
    if (rc != KMV_OK) {
        fprintf(stderr, "attention_bench: %s: %s\n", what, kmv_strerror(rc));
        exit(1);
    }
}

/* One run of a method: its setting, time and both errors. */
typedef struct result {
    double knob; /* samples, or kmv's eps */
    double seconds, err_v, err_o;
    size_t rows_approx;
    int met;
} result;

/* What every run compares against. */
typedef struct bench {
    peer_problem pp;
    const float *ye; /* exact output */
    double vn, on;   /* ||V||_F, ||O||_F */
    int measure_o;
    double target;
    float *y;
} bench;

static void score(const bench *b, result *r) {
    size_t len = b->pp.m * b->pp.c;
    double e2 = 0.0;
    for (size_t u = 0; u < len; u++) e2 += ((double)b->y[u] - b->ye[u]) * ((double)b->y[u] - b->ye[u]);
    r->err_v = sqrt(e2) / b->vn;
    r->err_o = sqrt(e2) / b->on;
}

static double tuned_err(const bench *b, const result *r) { return b->measure_o ? r->err_o : r->err_v; }

typedef enum { M_UNIFORM, M_KDEFORMER, M_BIMW } method;

/* The KDEformer-style peer's fixed shape: 64-query blocks on an 8-bit
 * SimHash, column norms from 64 queries. */
#define KDE_BLOCK 64
#define KDE_BITS 8
#define KDE_PROBE 64

static result run_peer(const bench *b, method mt, size_t s, uint64_t seed) {
    result r = {(double)s, 0, 0, 0, b->pp.m, 0};
    double t0 = tool_now();
    int rc = mt == M_UNIFORM     ? peer_uniform(&b->pp, s, seed, b->y)
             : mt == M_KDEFORMER ? peer_kdeformer(&b->pp, KDE_BLOCK, KDE_BITS, KDE_PROBE, s, seed, b->y)
                                 : peer_bimw(&b->pp, s, seed, b->y);
    r.seconds = tool_now() - t0;
    if (rc != 0) {
        fprintf(stderr, "attention_bench: out of memory in a peer\n");
        exit(1);
    }
    score(b, &r);
    return r;
}

/* Bisect the sample count for an error in the band; the run kept is the
 * cheapest in the band, else the last one tried. */
static result tune_peer(const bench *b, method mt) {
    size_t lo = 16, hi = b->pp.n, s = 256;
    double top = b->target + 0.05, bot = b->target - 0.05;
    result best = {0}, last = {0};
    int have = 0;
    for (int it = 0; it < 16; it++) {
        last = run_peer(b, mt, s, 0x5eed + (uint64_t)it);
        double e = tuned_err(b, &last);
        if (e <= top && e >= bot && (!have || last.knob < best.knob)) {
            best = last;
            have = 1;
        }
        if (e > top) lo = s;
        else hi = s; /* in the band or below it: try fewer */
        size_t ns = (lo + hi) / 2;
        if (ns == s || hi - lo <= 2 + lo / 32) break;
        s = ns;
    }
    if (have) {
        best.met = 1;
        return best;
    }
    return last;
}

/* kmv: the largest eps of a sweep whose error is within the band's top. */
static result tune_kmv(const bench *b, int budget, const float *k, size_t n, size_t d,
                       const float *v, size_t c) {
    const double eps[] = {0.9, 0.7, 0.5, 0.4, 0.3, 0.25, 0.2, 0.17, 0.14,
                          0.12, 0.1, 0.08, 0.065, 0.05, 0.04, 0.03};
    result r = {0};
    for (size_t u = 0; u < sizeof eps / sizeof *eps; u++) {
        kmv_params pa;
        kmv_params_init(&pa);
        pa.eps = eps[u];
        kmv_params_x px;
        kmv_params_get_x(&pa, &px);
        px.attn_budget = budget;
        kmv_params_set_x(&pa, &px);
        kmv_ctx *ca;
        check(kmv_ctx_create(&pa, &ca), "ctx");
        kmv_stats st;
        double t0 = tool_now();
        check(kmv_attention(ca, k, n, k, n, d, v, c, b->y, &st), "kmv");
        r.seconds = tool_now() - t0;
        kmv_ctx_free(ca);
        r.knob = eps[u];
        r.rows_approx = n - st.rows_exact;
        score(b, &r);
        double e = tuned_err(b, &r);
        r.met = e <= b->target + 0.05 && e >= b->target - 0.05;
        if (e <= b->target + 0.05) break;
    }
    return r;
}

static void print_result(const result *r, double te) {
    printf(",%g,%.4f,%.4f,%.4f,%.2f,%d", r->knob, r->seconds, r->err_v, r->err_o, te / r->seconds,
           r->met);
}

int main(int argc, char **argv) {
    const char *glove = "../shared/data/glove100d_first65536.npy";
    size_t max_n = 16384, step = 1024, c = 1;
    int random_values = 0, measure_o = 1;
    double target = 0.1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--glove") && i + 1 < argc) glove = argv[++i];
        else if (!strcmp(argv[i], "--max") && i + 1 < argc) max_n = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--step") && i + 1 < argc) step = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--cols") && i + 1 < argc) c = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--target") && i + 1 < argc) target = strtod(argv[++i], NULL);
        else if (!strcmp(argv[i], "--values") && i + 1 < argc) {
            const char *w = argv[++i];
            if (strcmp(w, "glove") && strcmp(w, "random")) goto usage;
            random_values = !strcmp(w, "random");
        } else if (!strcmp(argv[i], "--measure") && i + 1 < argc) {
            const char *w = argv[++i];
            if (strcmp(w, "o") && strcmp(w, "v")) goto usage;
            measure_o = !strcmp(w, "o");
        } else {
            goto usage;
        }
    }
    kmv_array g;
    char err[256];
    if (kmv_npy_read(glove, NULL, &g, err, sizeof err) != KMV_OK) {
        fprintf(stderr, "attention_bench: %s\n", err);
        return 1;
    }
    size_t d = g.cols;
    if (max_n > g.rows) max_n = g.rows;
    if (c < 1 || c > d || max_n < 4096 || step < 1 || !(target > 0.05 && target < 1.0)) goto usage;
    float *v = malloc(max_n * c * sizeof(float)), *ye = malloc(max_n * c * sizeof(float));
    float *y = malloc(max_n * c * sizeof(float));
    uint64_t rng = 0x9e3779b97f4a7c15u;
    for (size_t j = 0; j < max_n; j++) {
        for (size_t col = 0; col < c; col++) {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            v[j * c + col] = random_values ? (float)((double)(rng >> 11) * 0x1p-53 * 2.0 - 1.0)
                                           : g.data[j * d + col];
        }
    }
    kmv_params p;
    kmv_params_init(&p);
    p.exact = 1;
    kmv_ctx *ce;
    check(kmv_ctx_create(&p, &ce), "ctx");
    printf("# normalized self-attention on GloVe (d = %zu), %zu value column(s), values %s; "
           "err_v = ||O - Y||_F / ||V||_F, err_o = ||O - Y||_F / ||O||_F; tuned on %s to %.2f +- "
           "0.05; speedup = exact time / time; knob = samples (kmv: eps)\n",
           d, c, random_values ? "uniform in [-1, 1]" : "GloVe's first coordinates (the paper's)",
           measure_o ? "err_o" : "err_v", target);
    printf("n,exact_s,zero_err_v");
    const char *names[] = {"kmv", "kmv_emp", "uniform", "kdeformer", "bimw"};
    for (int u = 0; u < 5; u++)
        printf(",%s_knob,%s_s,%s_err_v,%s_err_o,%s_speedup,%s_met", names[u], names[u], names[u],
               names[u], names[u], names[u]);
    printf(",kmv_rows_approx,kmv_emp_rows_approx\n");
    for (size_t n = 4096; n <= max_n; n += step) {
        bench b = {{g.data, n, g.data, n, d, v, c, 1.0 / sqrt((double)d)}, ye, 0.0, 0.0, measure_o,
                   target, y};
        double te = INFINITY;
        for (int rep = 0; rep < (n <= 16384 ? 2 : 1); rep++) { /* the faster of two */
            double t0 = tool_now();
            check(kmv_attention(ce, g.data, n, g.data, n, d, v, c, ye, NULL), "exact");
            double t = tool_now() - t0;
            te = t < te ? t : te;
        }
        for (size_t u = 0; u < n * c; u++) b.vn += (double)v[u] * v[u];
        for (size_t u = 0; u < n * c; u++) b.on += (double)ye[u] * ye[u];
        b.vn = sqrt(b.vn);
        b.on = sqrt(b.on);
        result rk = tune_kmv(&b, KMV_BUDGET_CERTIFIED, g.data, n, d, v, c);
        result re = tune_kmv(&b, KMV_BUDGET_EMPIRICAL, g.data, n, d, v, c);
        result ru = tune_peer(&b, M_UNIFORM);
        result rd = tune_peer(&b, M_KDEFORMER);
        result rb = tune_peer(&b, M_BIMW);
        printf("%zu,%.4f,%.4f", n, te, b.on / b.vn);
        print_result(&rk, te);
        print_result(&re, te);
        print_result(&ru, te);
        print_result(&rd, te);
        print_result(&rb, te);
        printf(",%zu,%zu\n", rk.rows_approx, re.rows_approx);
        fflush(stdout);
        fprintf(stderr, "attention_bench: n = %zu done\n", n);
    }
    kmv_ctx_free(ce);
    kmv_array_free(&g);
    free(v);
    free(ye);
    free(y);
    return 0;
usage:
    fprintf(stderr, "usage: attention_bench [--glove PATH] [--max N] [--step N] [--cols C] "
                    "[--values glove|random] [--measure o|v] [--target T]\n");
    return 2;
}
