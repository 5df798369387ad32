/* The paper's appendix A.1.4 in one harness: normalized self-attention of
 * one value column on the GloVe vectors (keys = queries, d = 100, scale
 * 1/sqrt(d)), n = 4K to 16K in steps of 1K (--max N to go further), the
 * error ||D^-1 A v - y|| / ||v|| held at 0.1 +- 0.05 where a method can
 * be tuned to it, and for each method the exact time / its time, all in
 * the same run (--cols C: C value columns at once, errors in Frobenius
 * norm):
 *   exact    kmv_attention under params.exact (the reference);
 *   kmv      kmv_attention without it, eps the largest of a sweep whose
 *            error is within the band (or the smallest tried);
 *   uniform  uniform column sampling: s keys drawn once, the softmax over
 *            them (the estimator D_S^-1 A_S v_S), s found by bisection;
 *   zero     the output 0, whose error ||D^-1 A V||_F / ||V||_F shows how
 *            lenient the measure is where attention spreads evenly;
 *   uniform_rel  uniform sampling again, with the error held at 0.1 +- 0.05
 *            of the output's own norm, ||D^-1 A V - Y||_F / ||D^-1 A V||_F.
 * Public API only. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kmv/kmv.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void check(int rc, const char *what) {
    if (rc != KMV_OK) {
        fprintf(stderr, "attention_bench: %s: %s\n", what, kmv_strerror(rc));
        exit(1);
    }
}

static double err_of(const float *y, const float *ye, size_t n, double vn) {
    double e2 = 0.0;
    for (size_t i = 0; i < n; i++) e2 += ((double)y[i] - ye[i]) * ((double)y[i] - ye[i]);
    return sqrt(e2) / vn;
}

static uint64_t rng = 0x9e3779b97f4a7c15u;
static uint64_t next(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

/* The uniform estimator with s samples: time and error. */
static double uniform(const kmv_ctx *ce, const float *k, size_t n, size_t d, const float *v,
                      size_t c, size_t s, const float *ye, double vn, float *y, float *ks,
                      float *vs, double *err) {
    for (size_t u = 0; u < s; u++) {
        size_t j = (size_t)(next() % n);
        memcpy(ks + u * d, k + j * d, d * sizeof(float));
        memcpy(vs + u * c, v + j * c, c * sizeof(float));
    }
    double t0 = now();
    check(kmv_attention(ce, k, n, ks, s, d, vs, c, y, NULL), "uniform");
    double t = now() - t0;
    *err = err_of(y, ye, n * c, vn);
    return t;
}

int main(int argc, char **argv) {
    const char *glove = "../shared/data/glove100d_first65536.npy";
    size_t max_n = 16384, step = 1024, c = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--glove") && i + 1 < argc) glove = argv[++i];
        else if (!strcmp(argv[i], "--max") && i + 1 < argc) max_n = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--step") && i + 1 < argc) step = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--cols") && i + 1 < argc) c = strtoull(argv[++i], NULL, 10);
        else {
            fprintf(stderr, "usage: attention_bench [--glove PATH] [--max N] [--step N] [--cols C]\n");
            return 2;
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
    if (c < 1 || max_n < 4096) {
        fprintf(stderr, "attention_bench: --cols >= 1 and --max >= 4096\n");
        return 2;
    }
    float *v = malloc(max_n * c * sizeof(float)), *ye = malloc(max_n * c * sizeof(float));
    float *y = malloc(max_n * c * sizeof(float)), *ks = malloc(max_n * d * sizeof(float));
    float *vs = malloc(max_n * c * sizeof(float));
    for (size_t j = 0; j < max_n * c; j++) v[j] = (float)((double)(next() >> 11) * 0x1p-53 * 2.0 - 1.0);
    kmv_params p;
    kmv_params_init(&p);
    p.exact = 1;
    kmv_ctx *ce;
    check(kmv_ctx_create(&p, &ce), "ctx");
    printf("# normalized self-attention on GloVe (d = %zu), %zu value column(s); error = "
           "||D^-1 A V - Y||_F / ||V||_F, target 0.1 +- 0.05; speedup = exact time / time\n", d, c);
    printf("n,exact_s,kmv_eps,kmv_s,kmv_error,kmv_speedup,kmv_rows_approx,uniform_samples,"
           "uniform_s,uniform_error,uniform_speedup,zero_error,uniform_rel_samples,"
           "uniform_rel_error,uniform_rel_speedup\n");
    for (size_t n = 4096; n <= max_n; n += step) {
        double vn = 0.0;
        for (size_t j = 0; j < n * c; j++) vn += (double)v[j] * v[j];
        vn = sqrt(vn);
        double t0 = now();
        check(kmv_attention(ce, g.data, n, g.data, n, d, v, c, ye, NULL), "exact");
        double te = now() - t0;
        /* kmv: the largest eps whose error is within the band. */
        const double eps[] = {0.9, 0.5, 0.3, 0.2, 0.1, 0.05};
        double ke = 0.0, kt = 0.0, kerr = 0.0;
        size_t krows = 0;
        for (size_t u = 0; u < sizeof eps / sizeof *eps; u++) {
            kmv_params pa;
            kmv_params_init(&pa);
            pa.eps = eps[u];
            kmv_ctx *ca;
            check(kmv_ctx_create(&pa, &ca), "ctx");
            kmv_stats st;
            t0 = now();
            check(kmv_attention(ca, g.data, n, g.data, n, d, v, c, y, &st), "kmv");
            kt = now() - t0;
            kmv_ctx_free(ca);
            ke = eps[u];
            kerr = err_of(y, ye, n * c, vn);
            krows = n - st.rows_exact;
            if (kerr <= 0.15) break;
        }
        /* uniform: bisect s for error 0.1 +- 0.05. */
        size_t lo = 16, hi = n, s = 256;
        double ut = 0.0, uerr = 1.0;
        for (int it = 0; it < 12; it++) {
            ut = uniform(ce, g.data, n, d, v, c, s, ye, vn, y, ks, vs, &uerr);
            if (uerr > 0.15) lo = s;
            else if (uerr < 0.05) hi = s;
            else break;
            size_t ns = (lo + hi) / 2;
            if (ns == s) break;
            s = ns;
        }
        double o2 = 0.0;
        for (size_t u = 0; u < n * c; u++) o2 += (double)ye[u] * ye[u];
        double on = sqrt(o2), rerr = 1.0, rt = 0.0;
        size_t rs = 256;
        lo = 16, hi = n;
        for (int it = 0; it < 14; it++) { /* the same bisection, relative to ||O|| */
            rt = uniform(ce, g.data, n, d, v, c, rs, ye, on, y, ks, vs, &rerr);
            if (rerr > 0.15) lo = rs;
            else if (rerr < 0.05) hi = rs;
            else break;
            size_t ns = (lo + hi) / 2;
            if (ns == rs) break;
            rs = ns;
        }
        printf("%zu,%.4f,%.2f,%.4f,%.4f,%.2f,%zu,%zu,%.4f,%.4f,%.2f,%.4f,%zu,%.4f,%.2f\n", n, te, ke,
               kt, kerr, te / kt, krows, s, ut, uerr, te / ut, on / vn, rs, rerr, te / rt);
        fflush(stdout);
    }
    kmv_ctx_free(ce);
    kmv_array_free(&g);
    free(v);
    free(ye);
    free(y);
    free(ks);
    free(vs);
    return 0;
}
