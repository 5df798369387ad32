/* kmv_regress against dense LAPACK and against plain iterations, in the
 * same run (issue 22's bench).
 *
 *   regress_bench [--quick] [--glove PATH] [--threads T]
 *
 * GRAM and AGRAM: synthetic A = U diag(sv) V^T (U, V random orthonormal,
 * sv geometric from 1 to 1/cond) for cond 1e2 and 1e6, j = 1 and 2, at
 * n = 2K, 16K and 64K (--quick: 2K and 16K) and d = 32, 64 and 128. Dense
 * baseline: the matrix formed (A (A^T A)^j, n x d, or (A^T A)^j, d x d)
 * and LAPACKE_dgelsd on it, timed from A. kmv: preconditioned (the sketch)
 * and plain; iterations, seconds, relative residuals and the speed-up over
 * the dense solve.
 *
 * EXP: GloVe rows (the first n of PATH, default the shipped 4096-row
 * sample; ../shared/data/glove100d_first65536.npy gives more), each row
 * scaled to norm r so the kernel exp(s A A^T) is sparse (s = 1/sqrt(d)
 * and r chosen so that sigma = 1/sqrt(s) is a third of the median
 * distance); ridge 1e-3 times the diagonal's scale. kmv with exact
 * products and with the approximate engine, each with the Nystrom
 * preconditioner and plain; dense baseline: M formed in float64 and
 * LAPACKE_dposv (n <= 8192).
 *
 * Prints CSV; ratios are measured in the same run. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kmv/kmv.h"
#include "tools/clock.h"

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static double uniform(void) {
    rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
    return ((double)(rng_state >> 11) + 0.5) / 9007199254740992.0;
}

static double gauss(void) {
    return sqrt(-2.0 * log(uniform())) * cos(6.283185307179586 * uniform());
}

/* Q (rows x cols, rows >= cols) with orthonormal columns, row-major. */
static void orthonormal(double *q, size_t rows, size_t cols) {
    double *tau = malloc(cols * sizeof(double));
    for (size_t i = 0; i < rows * cols; i++) q[i] = gauss();
    LAPACKE_dgeqrf(LAPACK_ROW_MAJOR, (int)rows, (int)cols, q, (int)cols, tau);
    LAPACKE_dorgqr(LAPACK_ROW_MAJOR, (int)rows, (int)cols, (int)cols, q, (int)cols, tau);
    free(tau);
}

/* A = U diag(sv) V^T, float32 and float64 copies. */
static void make_a(size_t n, size_t d, double cond, float *af, double *ad) {
    double *u = malloc(n * d * sizeof(double)), *v = malloc(d * d * sizeof(double));
    orthonormal(u, n, d);
    orthonormal(v, d, d);
    for (size_t j = 0; j < d; j++) {
        double sv = pow(cond, -(double)j / (double)(d > 1 ? d - 1 : 1));
        for (size_t i = 0; i < n; i++) u[i * d + j] *= sv;
    }
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)d, (int)d, 1.0, u, (int)d, v,
                (int)d, 0.0, ad, (int)d);
    /* The solvers see A in float32: the baseline solves that same A. */
    for (size_t i = 0; i < n * d; i++) ad[i] = af[i] = (float)ad[i];
    free(u);
    free(v);
}

/* The dense baseline for GRAM (agram = 0) or AGRAM: form the matrix and
 * dgelsd; returns seconds, *res the relative residual. */
static double dense_gram(const double *a, size_t n, size_t d, int j, int agram, const double *b,
                         double *res) {
    double t0 = tool_now();
    double *g = malloc(d * d * sizeof(double)), *m = malloc(d * d * sizeof(double));
    double *t = malloc(d * d * sizeof(double));
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)d, (int)n, 1.0, a, (int)d, 0.0, g, (int)d);
    for (size_t r = 0; r < d; r++)
        for (size_t c = 0; c < r; c++) g[r * d + c] = g[c * d + r];
    memcpy(m, g, d * d * sizeof(double));
    for (int k = 1; k < j; k++) {
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)d, (int)d, (int)d, 1.0, m, (int)d,
                    g, (int)d, 0.0, t, (int)d);
        memcpy(m, t, d * d * sizeof(double));
    }
    size_t rows = agram ? n : d;
    double *mat = malloc(rows * d * sizeof(double)), *rhs = malloc(rows * sizeof(double));
    if (agram)
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, (int)d, (int)d, 1.0, a, (int)d,
                    m, (int)d, 0.0, mat, (int)d);
    else
        memcpy(mat, m, d * d * sizeof(double));
    double *keep = malloc(rows * d * sizeof(double));
    memcpy(keep, mat, rows * d * sizeof(double));
    memcpy(rhs, b, rows * sizeof(double));
    double *s = malloc(d * sizeof(double));
    lapack_int rank;
    LAPACKE_dgelsd(LAPACK_ROW_MAJOR, (int)rows, (int)d, 1, mat, (int)d, rhs, 1, s, -1.0, &rank);
    double secs = tool_now() - t0;
    /* rhs[0..d) is x: the residual of the formed matrix */
    double *r = malloc(rows * sizeof(double));
    memcpy(r, b, rows * sizeof(double));
    cblas_dgemv(CblasRowMajor, CblasNoTrans, (int)rows, (int)d, -1.0, keep, (int)d, rhs, 1, 1.0, r, 1);
    *res = cblas_dnrm2((int)rows, r, 1) / cblas_dnrm2((int)rows, b, 1);
    free(g), free(m), free(t), free(mat), free(rhs), free(keep), free(s), free(r);
    return secs;
}

static int solve(const kmv_ctx *ctx, kmv_regress_params *rp, const float *a, size_t n, size_t d,
                 const double *b, size_t bl, double *x, kmv_regress_stats *st, double *secs) {
    double t0 = tool_now();
    int rc = kmv_regress(ctx, rp, a, n, d, b, bl, x, st);
    *secs = tool_now() - t0;
    if (rc != KMV_OK) fprintf(stderr, "regress_bench: kmv_regress: %s\n", kmv_strerror(rc));
    return rc;
}

static void bench_gram(int quick, int threads) {
    printf("problem,n,d,cond,power,dense_s,dense_residual,kmv_s,kmv_iterations,kmv_residual,"
           "speedup,plain_s,plain_iterations,plain_residual,plain_converged\n");
    size_t ns[] = {2048, 16384, 65536}, ds[] = {32, 64, 128};
    double conds[] = {1e2, 1e6};
    kmv_params p;
    kmv_params_init(&p);
    p.n_threads = threads;
    kmv_ctx *ctx;
    kmv_ctx_create(&p, &ctx);
    for (size_t in = 0; in < (quick ? 2u : 3u); in++)
        for (size_t id = 0; id < 3; id++)
            for (size_t ic = 0; ic < 2; ic++) {
                size_t n = ns[in], d = ds[id];
                float *af = malloc(n * d * sizeof(float));
                double *ad = malloc(n * d * sizeof(double)), *b = malloc(n * sizeof(double));
                double *x = malloc(n * sizeof(double));
                make_a(n, d, conds[ic], af, ad);
                for (int agram = 1; agram >= 0; agram--)
                    for (int j = 1; j <= 2; j++) {
                        size_t bl = agram ? n : d;
                        for (size_t i = 0; i < bl; i++) b[i] = gauss();
                        double dres, dsec = dense_gram(ad, n, d, j, agram, b, &dres);
                        kmv_regress_params rp;
                        kmv_regress_params_init(&rp);
                        rp.problem = agram ? KMV_REGRESS_AGRAM : KMV_REGRESS_GRAM;
                        rp.power = j;
                        rp.tol = 1e-8;
                        kmv_regress_stats st, sp;
                        double ks, ps;
                        if (solve(ctx, &rp, af, n, d, b, bl, x, &st, &ks) != KMV_OK) continue;
                        rp.precondition = 0;
                        rp.max_iter = 2000;
                        if (solve(ctx, &rp, af, n, d, b, bl, x, &sp, &ps) != KMV_OK) continue;
                        printf("%s,%zu,%zu,%g,%d,%.4f,%.3e,%.4f,%d,%.3e,%.2f,%.4f,%d,%.3e,%d\n",
                               agram ? "agram" : "gram", n, d, conds[ic], j, dsec, dres, ks,
                               st.iterations, st.residual, dsec / ks, ps, sp.iterations,
                               sp.residual, sp.converged);
                        fflush(stdout);
                    }
                free(af), free(ad), free(b), free(x);
            }
    kmv_ctx_free(ctx);
}

static void bench_exp(const char *path, int threads) {
    kmv_array g;
    char err[512];
    if (kmv_npy_read(path, NULL, &g, err, sizeof err) != KMV_OK) {
        fprintf(stderr, "regress_bench: %s\n", err);
        return;
    }
    printf("\nproblem,n,d,products,preconditioned,seconds,iterations,residual,approx_products,"
           "product_error,dense_s,dense_residual\n");
    size_t d = g.cols;
    double s = 1.0 / sqrt((double)d);
    size_t sizes[] = {2048, 4096, 16384, 65536};
    for (size_t is = 0; is < 4 && sizes[is] <= g.rows; is++) {
        size_t n = sizes[is];
        /* Rows to norm r: distances then scale with r; sigma = 1/sqrt(s)
         * a third of the median distance makes the kernel sparse. */
        float *a = malloc(n * d * sizeof(float));
        double med = 0.0;
        for (size_t i = 0; i < n; i++) {
            double nr = 0.0;
            for (size_t k = 0; k < d; k++) nr += (double)g.data[i * d + k] * g.data[i * d + k];
            nr = sqrt(nr) + 1e-30;
            for (size_t k = 0; k < d; k++) a[i * d + k] = (float)(g.data[i * d + k] / nr);
        }
        for (size_t i = 0; i < 64; i++) {
            double d2 = 0.0;
            for (size_t k = 0; k < d; k++) {
                double t = a[i * d + k] - a[(i + 1) * d + k];
                d2 += t * t;
            }
            med += sqrt(d2) / 64.0;
        }
        double r = 3.0 / (med * sqrt(s));
        for (size_t i = 0; i < n * d; i++) a[i] = (float)(a[i] * r);
        double *b = malloc(n * sizeof(double)), *x = malloc(n * sizeof(double));
        for (size_t i = 0; i < n; i++) b[i] = gauss();
        double dense_s = NAN, dense_res = NAN;
        if (n <= 8192) {
            double t0 = tool_now();
            double *m = malloc(n * n * sizeof(double)), *rhs = malloc(n * sizeof(double));
            for (size_t i = 0; i < n; i++)
                for (size_t j = 0; j < n; j++) {
                    double dot = 0.0;
                    for (size_t k = 0; k < d; k++) dot += (double)a[i * d + k] * a[j * d + k];
                    m[i * n + j] = exp(s * dot - s * r * r) + (i == j ? 1e-3 : 0.0);
                }
            memcpy(rhs, b, n * sizeof(double));
            LAPACKE_dposv(LAPACK_ROW_MAJOR, 'U', (int)n, 1, m, (int)n, rhs, 1);
            dense_s = tool_now() - t0;
            free(m), free(rhs);
        }
        for (int exact = 1; exact >= 0; exact--)
            for (int pre = 1; pre >= 0; pre--) {
                kmv_params p;
                kmv_params_init(&p);
                p.exact = exact;
                p.n_threads = threads;
                kmv_ctx *ctx;
                kmv_ctx_create(&p, &ctx);
                kmv_regress_params rp;
                kmv_regress_params_init(&rp);
                rp.problem = KMV_REGRESS_EXP;
                rp.ridge = 1e-3 * exp(s * r * r); /* 1e-3 of the diagonal */
                rp.tol = 1e-4;
                rp.precondition = pre;
                kmv_regress_stats st;
                double secs;
                if (solve(ctx, &rp, a, n, d, b, n, x, &st, &secs) == KMV_OK)
                    printf("exp,%zu,%zu,%s,%d,%.4f,%d,%.3e,%d,%.3e,%.4f,%.3e\n", n, d,
                           exact ? "exact" : "approx", pre, secs, st.iterations, st.residual,
                           st.approx_products, st.product_error, dense_s, dense_res);
                fflush(stdout);
                kmv_ctx_free(ctx);
            }
        free(a), free(b), free(x);
    }
    kmv_array_free(&g);
}

int main(int argc, char **argv) {
    int quick = 0, threads = 0;
    const char *glove = "data/glove100d_first4096.npy";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick")) quick = 1;
        else if (!strcmp(argv[i], "--glove") && i + 1 < argc) glove = argv[++i];
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: regress_bench [--quick] [--glove PATH] [--threads T]\n");
            return 2;
        }
    }
    bench_gram(quick, threads);
    bench_exp(glove, threads);
    return 0;
}
