/* Exact engine speed, as ns per kernel entry, against what the machine can
 * do (its SGEMM for the same dot products, plus one exp per entry) and
 * against a plain triple loop. All figures come from one run.
 *
 * usage: exact_bench [--quick]   (--quick: n = 4096 only)
 * CSV columns:
 *   n, d, threads        problem (n = m keys and queries) and threads used
 *   engine_ns            kmv_matvec, exact, x a vector, sigma = sqrt(d) / 2
 *                        (float32 dot products)
 *   engine_wide_ns       the same at sigma = 0.5, narrow enough that the
 *                        engine takes its dot products in float64
 *   engine_cols8_ns      as engine_ns with x of 8 columns (per entry)
 *   gemm_ns              cblas_sgemm of the same Q K^T, in 1024-row slabs
 *   exp_ns               the engine at d = 1: one exp and one multiply-add
 *                        per entry with almost no GEMM, an upper bound on
 *                        the exp's cost
 *   naive_ns             the textbook loop, one thread, timed on 64 rows
 *   engine_vs_floor      engine_ns / (gemm_ns + exp_ns): 1.0 is the floor
 *   speedup_vs_naive     naive_ns / engine_ns (per thread: naive uses one)
 */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kmv/kmv.h"
#include "tools/clock.h"

static float *random_matrix(size_t count, uint64_t seed) {
    float *v = malloc(count * sizeof(float));
    for (size_t i = 0; i < count; i++) {
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        v[i] = (float)((double)(seed >> 11) * 0x1.0p-53 - 0.5);
    }
    return v;
}

/* Best of reps: the least disturbed run on a shared machine. */
static double engine_seconds(double sigma, int want_wide, const float *q, const float *k,
                             size_t n, size_t d, const float *x, size_t c, float *y, int reps) {
    kmv_params p;
    kmv_params_init(&p);
    p.exact = 1;
    p.sigma = sigma;
    kmv_ctx *ctx = NULL;
    if (kmv_ctx_create(&p, &ctx) != KMV_OK) exit(1);
    double best = INFINITY;
    for (int r = 0; r < reps; r++) {
        kmv_stats st;
        double t = tool_now();
        if (kmv_matvec(ctx, q, n, k, n, d, x, c, y, &st) != KMV_OK) {
            fprintf(stderr, "exact_bench: kmv_matvec failed\n");
            exit(1);
        }
        if (st.wide_dots != want_wide) {
            fprintf(stderr, "exact_bench: sigma %g took the %s path\n", sigma,
                    st.wide_dots ? "float64" : "float32");
            exit(1);
        }
        t = tool_now() - t;
        best = t < best ? t : best;
    }
    kmv_ctx_free(ctx);
    return best;
}

static double gemm_seconds(const float *q, const float *k, size_t n, size_t d, float *s,
                           int reps) {
    const size_t slab = 1024;
    double best = INFINITY;
    for (int r = 0; r < reps; r++) {
        double t = tool_now();
        for (size_t i0 = 0; i0 < n; i0 += slab) {
            size_t bi = n - i0 < slab ? n - i0 : slab;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)bi, (int)n, (int)d, 1.0f,
                        q + i0 * d, (int)d, k, (int)d, 0.0f, s, (int)n);
        }
        t = tool_now() - t;
        best = t < best ? t : best;
    }
    return best;
}

static double naive_seconds(const float *q, const float *k, size_t rows, size_t n, size_t d,
                            const float *x, float *y) {
    double t = tool_now();
    for (size_t i = 0; i < rows; i++) {
        float acc = 0.0f;
        for (size_t j = 0; j < n; j++) {
            float d2 = 0.0f;
            for (size_t u = 0; u < d; u++) {
                float diff = q[i * d + u] - k[j * d + u];
                d2 += diff * diff;
            }
            acc += expf(-0.5f * d2) * x[j];
        }
        y[i] = acc;
    }
    return tool_now() - t;
}

/* Threads the engine runs on with default params. */
static int threads(void) {
    kmv_params p;
    kmv_params_init(&p);
    p.exact = 1;
    kmv_ctx *ctx = NULL;
    kmv_stats st;
    float one = 0.0f;
    if (kmv_ctx_create(&p, &ctx) != KMV_OK ||
        kmv_matvec(ctx, &one, 1, &one, 1, 1, &one, 1, &one, &st) != KMV_OK)
        exit(1);
    kmv_ctx_free(ctx);
    return st.n_threads;
}

int main(int argc, char **argv) {
    int quick = argc > 1 && strcmp(argv[1], "--quick") == 0;
    const size_t ns[] = {4096, 16384, 32768}, ds[] = {64, 128};
    const size_t naive_rows = 64;
    printf("n,d,threads,engine_ns,engine_wide_ns,engine_cols8_ns,gemm_ns,exp_ns,naive_ns,"
           "engine_vs_floor,speedup_vs_naive\n");
    for (size_t a = 0; a < (quick ? 1u : 3u); a++) {
        size_t n = ns[a];
        for (size_t b = 0; b < 2; b++) {
            size_t d = ds[b];
            float *q = random_matrix(n * d, 1), *k = random_matrix(n * d, 2);
            float *x = random_matrix(n * 8, 3), *y = malloc(n * 8 * sizeof(float));
            float *s = malloc(1024 * n * sizeof(float));
            double entries = (double)n * (double)n;
            int reps = n <= 4096 ? 5 : 2;
            double sigma = 0.5 * sqrt((double)d);
            double te = engine_seconds(sigma, 0, q, k, n, d, x, 1, y, reps);
            double tw = engine_seconds(0.5, 1, q, k, n, d, x, 1, y, reps);
            double t8 = engine_seconds(sigma, 0, q, k, n, d, x, 8, y, reps);
            double tg = gemm_seconds(q, k, n, d, s, reps);
            /* d = 1: the first column of q and k, the same number of entries. */
            float *q1 = random_matrix(n, 4), *k1 = random_matrix(n, 5);
            double tx = engine_seconds(1.0, 0, q1, k1, n, 1, x, 1, y, reps);
            double tn = naive_seconds(q, k, naive_rows, n, d, x, y);
            double e = 1e9 * te / entries, g = 1e9 * tg / entries, x1 = 1e9 * tx / entries;
            double nv = 1e9 * tn / ((double)naive_rows * (double)n);
            printf("%zu,%zu,%d,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.2f,%.1f\n", n, d, threads(), e,
                   1e9 * tw / entries, 1e9 * t8 / entries, g, x1, nv, e / (g + x1), nv / e);
            fflush(stdout);
            free(q);
            free(k);
            free(x);
            free(y);
            free(s);
            free(q1);
            free(k1);
        }
    }
    return 0;
}
