/* `kmv prefix`: the prefix-scaling experiment. One stream receives the rows
 * prefix by prefix (only the new rows each time); at each prefix length i
 * it reports the paper's Assumption A statistics of K[:i, :i], the
 * approximate product's time and error against the exact engine's, and
 * optionally plots them with gnuplot. Public API only. */
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/io.h"
#include "kmv/kmv.h"

#define CMD "prefix"
#define DEFAULT_PREFIXES 64

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* A growing text buffer for the table. */
typedef struct text {
    char *s;
    size_t len, cap;
    int failed;
} text;

static void put(text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(text *t, const char *fmt, ...) {
    if (t->failed) return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(t->s + t->len, t->cap - t->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            t->failed = 1;
            return;
        }
        if ((size_t)n < t->cap - t->len) {
            t->len += (size_t)n;
            return;
        }
        size_t cap = 2 * t->cap + (size_t)n + 1;
        char *s = realloc(t->s, cap);
        if (s == NULL) {
            t->failed = 1;
            return;
        }
        t->s = s;
        t->cap = cap;
    }
}

/* Random signs from the seed (splitmix64), the x used when none is given:
 * ||x||^2 = n, no column structure for the sampler to exploit. */
static void random_signs(float *x, size_t count, uint64_t seed) {
    uint64_t z = seed;
    for (size_t i = 0; i < count; i++) {
        z += 0x9e3779b97f4a7c15ull;
        uint64_t r = z;
        r = (r ^ (r >> 30)) * 0xbf58476d1ce4e5b9ull;
        r = (r ^ (r >> 27)) * 0x94d049bb133111ebull;
        r ^= r >> 31;
        x[i] = (r >> 63) ? 1.0f : -1.0f;
    }
}

/* ||a - b||_F / ||ref||_F over count entries (in double). */
static double rel_error(const float *a, const float *b, size_t count, const float *ref,
                        size_t ref_count) {
    double e = 0.0, r = 0.0;
    for (size_t i = 0; i < count; i++) e += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
    for (size_t i = 0; i < ref_count; i++) r += (double)ref[i] * ref[i];
    return r > 0.0 ? sqrt(e / r) : sqrt(e);
}

/* A path quoted for gnuplot's single-quoted strings ('' is a quote). */
static void gp_quote(FILE *f, const char *s) {
    fputc('\'', f);
    for (; *s; s++) {
        if (*s == '\'') fputc('\'', f);
        fputc(*s, f);
    }
    fputc('\'', f);
}

/* Plot c_i and the speed-up against i from the staged table into the
 * staged image. Returns 0 or EXIT_FAIL (message printed). */
static int plot(const char *csv, const char *png, const char *title) {
    FILE *gp = popen("gnuplot", "w");
    if (gp == NULL) {
        fprintf(stderr, "kmv " CMD ": cannot run gnuplot for --plot\n");
        return EXIT_FAIL;
    }
    fprintf(gp, "set terminal pngcairo size 900,760 font ',10'\nset output ");
    gp_quote(gp, png);
    fprintf(gp,
            "\nset datafile separator ','\nset key autotitle columnhead\n"
            "set multiplot layout 2,1 title ");
    gp_quote(gp, title);
    fprintf(gp,
            "\nset grid\nset key top right\nset xlabel 'prefix length i'\n"
            "set ylabel 'c_i'\nplot ");
    gp_quote(gp, csv);
    fprintf(gp,
            " using 1:2 with linespoints pt 7 ps 0.5 title 'c_i = (||K||_1 - a_i) / a_i'\n"
            "set ylabel 'exact time / approximate time'\nplot ");
    gp_quote(gp, csv);
    fprintf(gp,
            " using 1:7 with linespoints pt 7 ps 0.5 title 'speed-up of Kx', "
            "1 with lines dt 2 lc 'gray' title 'break-even'\nunset multiplot\n");
    int status = pclose(gp);
    if (status != 0) {
        fprintf(stderr, "kmv " CMD ": gnuplot failed (status %d) drawing %s\n", status, png);
        return EXIT_FAIL;
    }
    /* gnuplot does not sync what it wrote; the rename must not publish an
     * image that a crash could still truncate. */
    int fd = open(png, O_RDONLY);
    if (fd < 0 || fsync(fd) != 0) {
        if (fd >= 0) close(fd);
        fprintf(stderr, "kmv " CMD ": cannot sync the plot %s\n", png);
        return EXIT_FAIL;
    }
    close(fd);
    return 0;
}

/* Progress on stderr once a run passes two seconds. */
static void progress(double t0, double *last, size_t i, size_t n) {
    double t = now();
    if (t - t0 < 2.0 || t - *last < (isatty(STDERR_FILENO) ? 0.5 : 5.0)) return;
    *last = t;
    fprintf(stderr, "kmv " CMD ": prefix %zu of %zu (%.0f%% of the work, %.1f s)\n", i, n,
            100.0 * pow((double)i / (double)n, 3.0), t - t0);
}

static const char *mode_name(int mode) {
    return mode == KMV_MODE_APPROX ? "approx" : mode == KMV_MODE_EXACT ? "exact" : "fallback";
}

int cmd_prefix(int argc, char **argv) {
    opt o[] = {
        {"queries", OPT_STRING, 1, "Q.npy", "queries, m x d", 0, 0, 0, 0, 0},
        {"keys", OPT_STRING, 1, "K.npy", "keys, n x d (prefixes run to min(m, n))", 0, 0, 0, 0, 0},
        {"x", OPT_STRING, 0, "X.npy", "x (or V), length n or n x c (default: random signs)", 0, 0, 0, 0, 0},
        {"sigma", OPT_DOUBLE, 0, "S", "Gaussian bandwidth, K = exp(-|q-k|^2 / (2 S^2))", 0, 0, 0, 0, 0},
        {"attention", OPT_FLAG, 0, "", "attention exp(scale <q,k>) through Lemma 4.1; the "
                                       "statistics are of the lifted Gaussian, the error of "
                                       "D^-1 A x", 0, 0, 0, 0, 0},
        {"scale", OPT_DOUBLE, 0, "S", "attention logit scale, > 0 (default 1/sqrt(d))", 0, 0, 0, 0, 0},
        {"start", OPT_INT, 0, "I", "first prefix length, >= 2 (default 50)", 0, 0, 0, 0, 0},
        {"step", OPT_INT, 0, "N", "prefix step, >= 1 (default: at most 64 prefixes)", 0, 0, 0, 0, 0},
        {"eps", OPT_DOUBLE, 0, "E", "target error eps, in (0, 1) (default 0.1)", 0, 0, 0, 0, 0},
        {"delta", OPT_DOUBLE, 0, "P", "failure probability, in (0, 1) (default 0.01)", 0, 0, 0, 0, 0},
        {"seed", OPT_U64, 0, "N", "random seed (default 1)", 0, 0, 0, 0, 0},
        {"threads", OPT_INT, 0, "T", "threads, 0 = all cores (default 0)", 0, 0, 0, 0, 0},
        {"out", OPT_STRING, 1, "table.csv", "one row per prefix length", 0, 0, 0, 0, 0},
        {"plot", OPT_STRING, 0, "figure.png", "plot c_i and the speed-up (needs gnuplot)", 0, 0, 0, 0, 0},
    };
    size_t no = sizeof o / sizeof o[0];
    int rc = args_parse(CMD,
                        "Prefix scaling: Assumption A statistics of K[:i, :i] and the "
                        "approximate vs exact Kx, for growing i, from one stream.",
                        o, no, argc, argv);
    if (rc != 0) return rc < 0 ? EXIT_OK : rc;

    int attn = args_get(o, no, "attention")->seen;
    opt *v;
    if (attn == args_get(o, no, "sigma")->seen) {
        fprintf(stderr, "kmv " CMD ": give exactly one of --sigma and --attention\n");
        return EXIT_USAGE;
    }
    kmv_params p;
    kmv_params_init(&p);
    if (!attn) {
        p.sigma = args_get(o, no, "sigma")->d;
        if (!(p.sigma >= 1e-150 && p.sigma <= 1e150)) {
            fprintf(stderr, "kmv " CMD ": --sigma must be in [1e-150, 1e150]\n");
            return EXIT_USAGE;
        }
    }
    if ((v = args_get(o, no, "scale"))->seen) {
        if (!attn) {
            fprintf(stderr, "kmv " CMD ": --scale goes with --attention\n");
            return EXIT_USAGE;
        }
        if (!(v->d > 0 && isfinite(v->d))) {
            fprintf(stderr, "kmv " CMD ": --scale must be > 0\n");
            return EXIT_USAGE;
        }
        p.attn_scale = v->d;
    }
    if (args_common_params(CMD, o, no, &p) != EXIT_OK) return EXIT_USAGE;
    long long start = 50, step = 0;
    if ((v = args_get(o, no, "start"))->seen) start = v->i;
    if ((v = args_get(o, no, "step"))->seen) {
        step = v->i;
        if (step < 1) {
            fprintf(stderr, "kmv " CMD ": --step must be >= 1\n");
            return EXIT_USAGE;
        }
    }
    if (start < 2) {
        fprintf(stderr, "kmv " CMD ": --start must be >= 2 (the statistics need 2i entries)\n");
        return EXIT_USAGE;
    }
    const char *out = args_get(o, no, "out")->s, *png = args_get(o, no, "plot")->s;
    const char *xpath = args_get(o, no, "x")->s;
    /* Before the long part: a missing gnuplot found after an hour is rude. */
    if (png != NULL && system("command -v gnuplot >/dev/null 2>&1") != 0) {
        fprintf(stderr, "kmv " CMD ": --plot needs gnuplot (scripts/install-deps installs it)\n");
        return EXIT_FAIL;
    }

    kmv_array Q = {0}, K = {0}, X = {0};
    kmv_ctx *ctx = NULL, *exact = NULL;
    kmv_stream *s = NULL;
    float *x = NULL, *ql = NULL, *kl = NULL, *xs = NULL, *y = NULL, *ye = NULL;
    text t = {0};
    char *staged_csv = NULL, *staged_png = NULL;
    rc = EXIT_FAIL;
    if (io_load(CMD, args_get(o, no, "queries")->s, "queries", 0, &Q) ||
        io_load(CMD, args_get(o, no, "keys")->s, "keys", 0, &K) ||
        (xpath != NULL && io_load(CMD, xpath, "x", 1, &X)))
        goto done;
    size_t d = K.cols, n = Q.rows < K.rows ? Q.rows : K.rows;
    if (Q.cols != K.cols) {
        fprintf(stderr, "kmv " CMD ": dimension mismatch: queries have dim %zu, keys %zu\n",
                Q.cols, K.cols);
        goto done;
    }
    if (xpath != NULL && X.rows != K.rows) {
        fprintf(stderr, "kmv " CMD ": %s has %zu rows but there are %zu keys\n", xpath, X.rows,
                K.rows);
        goto done;
    }
    if ((size_t)start > n) {
        fprintf(stderr, "kmv " CMD ": --start %lld is past the %zu rows available\n", start, n);
        rc = EXIT_USAGE;
        goto done;
    }
    if (step == 0) step = ((long long)n - start + DEFAULT_PREFIXES - 2) / (DEFAULT_PREFIXES - 1);
    if (step < 1) step = 1;
    size_t c = xpath != NULL ? X.cols : 1;
    /* The stream holds x with, for attention, a column of ones after it:
     * the row sums D come out of the same pass as A x. */
    size_t sc = c + (size_t)attn, sd = d + (size_t)attn;
    x = xpath != NULL ? X.data : malloc(n * sizeof(float));
    xs = malloc(n * sc * sizeof(float));
    y = malloc(n * sc * sizeof(float));
    ye = malloc(n * c * sizeof(float));
    if (x == NULL || xs == NULL || y == NULL || ye == NULL) {
        fprintf(stderr, "kmv " CMD ": out of memory\n");
        goto done;
    }
    if (xpath == NULL) random_signs(x, n, p.seed);
    for (size_t r = 0; r < n; r++) {
        memcpy(xs + r * sc, x + r * c, c * sizeof(float));
        if (attn) xs[r * sc + c] = 1.0f;
    }
    const float *qs = Q.data, *ks = K.data;
    if (attn) {
        /* The bound covers every key the run will see, so the lifted points
         * of a prefix never change as it grows. */
        double alpha = kmv_max_sq_norm(K.data, n, d);
        ql = malloc(n * sd * sizeof(float));
        kl = malloc(n * sd * sizeof(float));
        if (ql == NULL || kl == NULL) {
            fprintf(stderr, "kmv " CMD ": out of memory\n");
            goto done;
        }
        int err = kmv_attention_lift(Q.data, n, d, 0, alpha, ql);
        if (err == KMV_OK) err = kmv_attention_lift(K.data, n, d, 1, alpha, kl);
        if (err != KMV_OK) {
            fprintf(stderr, "kmv " CMD ": lifting to the Gaussian kernel: %s\n", kmv_strerror(err));
            goto done;
        }
        p.sigma = kmv_attention_sigma(p.attn_scale, d);
        qs = ql;
        ks = kl;
    }
    kmv_params pe = p;
    pe.exact = 1;
    int err = kmv_ctx_create(&p, &ctx);
    if (err == KMV_OK) err = kmv_ctx_create(&pe, &exact);
    if (err == KMV_OK) err = kmv_stream_create(ctx, sd, sc, &s);
    if (err != KMV_OK) {
        fprintf(stderr, "kmv " CMD ": %s\n", kmv_strerror(err));
        goto done;
    }

    put(&t, "i,c,ratio_next,ratio_double,approx_seconds,exact_seconds,speedup,error,eps,mode\n");
    double t0 = now(), last = t0;
    size_t fed = 0;
    for (size_t i = (size_t)start;; i += (size_t)step) {
        if (i > n) i = n;
        err = kmv_stream_append_keys(s, ks + fed * sd, xs + fed * sc, i - fed);
        if (err == KMV_OK) err = kmv_stream_append_queries(s, qs + fed * sd, i - fed);
        fed = i;
        kmv_stats st, se;
        double ta = now();
        if (err == KMV_OK) err = kmv_stream_matvec(s, NULL, y, &st);
        ta = now() - ta;
        double te = now();
        if (err == KMV_OK)
            err = attn ? kmv_attention(exact, Q.data, i, K.data, i, d, x, c, ye, &se)
                       : kmv_matvec(exact, Q.data, i, K.data, i, d, x, c, ye, &se);
        te = now() - te;
        kmv_tail_stats ts;
        if (err == KMV_OK) err = kmv_tail_stats_get(ctx, qs, ks, i, sd, &ts);
        if (err != KMV_OK) {
            fprintf(stderr, "kmv " CMD ": at prefix %zu: %s (%s)\n", i, kmv_strerror(err),
                    kmv_errname(err));
            goto done;
        }
        if (attn) {
            /* D^-1 A x from the two approximate products; a row whose sum
             * came out <= 0 has no estimate, and the error says so. */
            for (size_t r = 0; r < i; r++) {
                float dsum = y[r * sc + c];
                for (size_t col = 0; col < c; col++)
                    y[r * c + col] = dsum > 0.0f ? y[r * sc + col] / dsum : NAN;
            }
        }
        double e = rel_error(y, ye, i * c, x, i * c);
        put(&t, "%zu,%.9g,%.9g,%.9g,%.6e,%.6e,%.4g,%.6e,%g,%s\n", i, ts.c, ts.ratio_next,
            ts.ratio_double, ta, te, te / ta, e, p.eps, mode_name(st.mode));
        progress(t0, &last, i, n);
        if (i == n) break;
    }
    if (t.failed) {
        fprintf(stderr, "kmv " CMD ": out of memory\n");
        goto done;
    }
    /* Both are staged before either is published: a failed plot leaves
     * neither new file behind. */
    if (io_stage_text(CMD, out, t.s, t.len, &staged_csv)) goto done;
    if (png != NULL) {
        char title[256];
        snprintf(title, sizeof title, attn ? "attention via Lemma 4.1, d = %zu, eps = %g"
                                           : "Gaussian kernel, d = %zu, eps = %g",
                 d, p.eps);
        if (io_stage_text(CMD, png, "", 0, &staged_png) || plot(staged_csv, staged_png, title) ||
            io_commit(CMD, &staged_png, png))
            goto done;
    }
    if (io_commit(CMD, &staged_csv, out)) goto done;
    rc = EXIT_OK;
done:
    io_discard(&staged_png);
    io_discard(&staged_csv);
    free(t.s);
    kmv_stream_free(s);
    kmv_ctx_free(exact);
    kmv_ctx_free(ctx);
    if (x != X.data) free(x);
    free(xs);
    free(y);
    free(ye);
    free(ql);
    free(kl);
    kmv_array_free(&Q);
    kmv_array_free(&K);
    kmv_array_free(&X);
    return rc;
}
