/* `kmv prefix`: the prefix-scaling experiment. One stream receives the rows
 * prefix by prefix (only the new rows each time); at each prefix length i
 * it reports the paper's Assumption A statistics of K[:i, :i], the
 * approximate product's time and error against the exact engine's, and
 * optionally plots them with gnuplot. Public API only. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/io.h"
#include "cli/stats.h"
#include "cli/text.h"
#include "tools/clock.h"
#define KMV_STATIC_LINKING_ONLY /* Assumption A statistics */
#include "kmv/kmv.h"
#include "kmv/kmv_experimental.h"

#define CMD "prefix"
#define DEFAULT_PREFIXES 64

extern char **environ;

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

/* gnuplot's terminal for the image format an output's name asks for, or
 * NULL for a name that says none (standard output gets a PNG). */
static const char *plot_terminal(const char *path) {
    const char *dot = strrchr(path, '.');
    char ext[8] = "";
    if (strcmp(path, "-") == 0) return "pngcairo size 900,760 font ',10'";
    if (dot == NULL || strchr(dot, '/') != NULL || strlen(dot) >= sizeof ext) return NULL;
    for (size_t u = 0; dot[u]; u++) ext[u] = (char)tolower((unsigned char)dot[u]);
    if (strcmp(ext, ".png") == 0) return "pngcairo size 900,760 font ',10'";
    if (strcmp(ext, ".svg") == 0) return "svg size 900,760 font 'sans,10'";
    if (strcmp(ext, ".pdf") == 0) return "pdfcairo size 9in,7.6in font ',10'";
    return NULL;
}

/* Run gnuplot on script with its standard output, the image, into *img.
 * Returns 0 or EXIT_FAIL (message printed). */
static int run_gnuplot(const text *script, text *img) {
    FILE *in = tmpfile();
    int pipefd[2] = {-1, -1}, rc = EXIT_FAIL;
    pid_t pid = -1;
    posix_spawn_file_actions_t fa;
    int fa_ok = 0;
    if (in == NULL || fwrite(script->s, 1, script->len, in) != script->len || fflush(in) != 0 ||
        fseek(in, 0, SEEK_SET) != 0 || pipe(pipefd) != 0 ||
        posix_spawn_file_actions_init(&fa) != 0) {
        fprintf(stderr, "kmv " CMD ": cannot set up gnuplot for --plot\n");
        goto out;
    }
    fa_ok = 1;
    char *argv[] = {"gnuplot", NULL};
    if (posix_spawn_file_actions_adddup2(&fa, fileno(in), 0) != 0 ||
        posix_spawn_file_actions_adddup2(&fa, pipefd[1], 1) != 0 ||
        posix_spawn_file_actions_addclose(&fa, pipefd[0]) != 0 ||
        posix_spawnp(&pid, "gnuplot", &fa, NULL, argv, environ) != 0) {
        fprintf(stderr, "kmv " CMD ": cannot run gnuplot for --plot\n");
        pid = -1;
        goto out;
    }
    close(pipefd[1]);
    pipefd[1] = -1;
    char buf[65536];
    for (;;) {
        ssize_t r = read(pipefd[0], buf, sizeof buf);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        text_add(img, buf, (size_t)r);
    }
out:
    if (pipefd[0] >= 0) close(pipefd[0]);
    if (pipefd[1] >= 0) close(pipefd[1]);
    if (fa_ok) posix_spawn_file_actions_destroy(&fa);
    if (in != NULL) fclose(in);
    if (pid > 0) {
        int status;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
        if (WIFEXITED(status) && WEXITSTATUS(status) == 0 && img->len > 0 && !img->failed)
            rc = 0;
        else
            fprintf(stderr, "kmv " CMD ": gnuplot failed drawing the plot\n");
    }
    return rc;
}

/* Progress on stderr once a run passes two seconds. */
static void progress(double t0, double *last, size_t i, size_t n) {
    double t = tool_now();
    if (t - t0 < 2.0 || t - *last < (isatty(STDERR_FILENO) ? 0.5 : 5.0)) return;
    *last = t;
    fprintf(stderr, "kmv " CMD ": prefix %zu of %zu (%.0f%% of the work, %.1f s)\n", i, n,
            100.0 * pow((double)i / (double)n, 3.0), t - t0);
}

/* The experiment's inputs, in the form the stream takes them. */
typedef struct run {
    kmv_params p;
    int attn;
    size_t n, d, c;   /* rows run (min of queries and keys), dim, columns of x */
    size_t sd, sc;    /* the stream's dim and columns (attention: lifted, and
                         a column of ones after x for the row sums) */
    const float *qs, *ks; /* the stream's rows */
    float *x, *xs, *ql, *kl;
    int own_x;
} run;

static void run_free(run *r) {
    if (r->own_x) free(r->x);
    free(r->xs);
    free(r->ql);
    free(r->kl);
}

/* Build r from the loaded arrays: x (random signs when none was given),
 * x with its column of ones, and for attention the lifted rows. Returns 0
 * or EXIT_FAIL (message printed). */
static int run_setup(run *r, const kmv_array *Q, const kmv_array *K, const kmv_array *X) {
    size_t n = r->n, d = r->d;
    r->c = X->data != NULL ? X->cols : 1;
    r->sc = r->c + (size_t)r->attn;
    r->sd = d + (size_t)r->attn;
    r->own_x = X->data == NULL;
    r->x = r->own_x ? malloc(n * sizeof(float)) : X->data;
    r->xs = malloc(n * r->sc * sizeof(float));
    if (r->x == NULL || r->xs == NULL) goto oom;
    if (r->own_x) random_signs(r->x, n, r->p.seed);
    for (size_t i = 0; i < n; i++) {
        memcpy(r->xs + i * r->sc, r->x + i * r->c, r->c * sizeof(float));
        if (r->attn) r->xs[i * r->sc + r->c] = 1.0f;
    }
    r->qs = Q->data;
    r->ks = K->data;
    if (!r->attn) return 0;
    /* The bound covers every key the run will see, so the lifted points of
     * a prefix never change as it grows. */
    double alpha = kmv_max_sq_norm(K->data, n, d);
    r->ql = malloc(n * r->sd * sizeof(float));
    r->kl = malloc(n * r->sd * sizeof(float));
    if (r->ql == NULL || r->kl == NULL) goto oom;
    int err = kmv_attention_lift(Q->data, n, d, 0, alpha, r->ql);
    if (err == KMV_OK) err = kmv_attention_lift(K->data, n, d, 1, alpha, r->kl);
    if (err != KMV_OK) {
        fprintf(stderr, "kmv " CMD ": lifting to the Gaussian kernel: %s\n", kmv_strerror(err));
        return EXIT_FAIL;
    }
    r->p.sigma = kmv_attention_sigma(r->p.attn_scale, d);
    r->qs = r->ql;
    r->ks = r->kl;
    return 0;
oom:
    fprintf(stderr, "kmv " CMD ": out of memory\n");
    return EXIT_FAIL;
}

/* Every prefix from start in steps of step, and the last, as CSV rows of t.
 * Returns 0 or EXIT_FAIL (message printed). */
static int run_prefixes(run *r, const kmv_array *Q, const kmv_array *K, size_t start,
                        size_t step, text *t) {
    size_t n = r->n, d = r->d, c = r->c, sc = r->sc, sd = r->sd;
    kmv_params pe = r->p;
    pe.exact = 1;
    kmv_ctx *ctx = NULL, *exact = NULL;
    kmv_stream *s = NULL;
    float *y = malloc(n * sc * sizeof(float)), *ye = malloc(n * c * sizeof(float));
    int rc = EXIT_FAIL;
    int err = y != NULL && ye != NULL ? KMV_OK : KMV_ENOMEM;
    if (err == KMV_OK) err = kmv_ctx_create(&r->p, &ctx);
    if (err == KMV_OK) err = kmv_ctx_create(&pe, &exact);
    if (err == KMV_OK) err = kmv_stream_create(ctx, sd, sc, &s);
    if (err != KMV_OK) {
        fprintf(stderr, "kmv " CMD ": %s\n", kmv_strerror(err));
        goto out;
    }
    text_put(t, "i,c,ratio_next,ratio_double,approx_seconds,exact_seconds,speedup,error,eps,mode\n");
    double t0 = tool_now(), last = t0;
    size_t fed = 0;
    for (size_t i = start;; i += step) {
        if (i > n) i = n;
        /* Only the new rows go in: the stream grows in place. */
        err = kmv_stream_append_keys(s, r->ks + fed * sd, r->xs + fed * sc, i - fed);
        if (err == KMV_OK) err = kmv_stream_append_queries(s, r->qs + fed * sd, i - fed);
        fed = i;
        kmv_stats st, se;
        double ta = tool_now();
        if (err == KMV_OK) err = kmv_stream_matvec(s, NULL, y, &st);
        ta = tool_now() - ta;
        double te = tool_now();
        if (err == KMV_OK)
            err = r->attn ? kmv_attention(exact, Q->data, i, K->data, i, d, r->x, c, ye, &se)
                          : kmv_matvec(exact, Q->data, i, K->data, i, d, r->x, c, ye, &se);
        te = tool_now() - te;
        kmv_tail_stats ts;
        if (err == KMV_OK) err = kmv_tail_stats_compute(ctx, r->qs, r->ks, i, sd, &ts);
        if (err != KMV_OK) {
            fprintf(stderr, "kmv " CMD ": at prefix %zu: %s (%s)\n", i, kmv_strerror(err),
                    kmv_errname(err));
            goto out;
        }
        if (r->attn) {
            /* D^-1 A x from the two approximate products; a row whose sum
             * came out <= 0 has no estimate, and the error says so. */
            for (size_t u = 0; u < i; u++) {
                float dsum = y[u * sc + c];
                for (size_t col = 0; col < c; col++)
                    y[u * c + col] = dsum > 0.0f ? y[u * sc + col] / dsum : NAN;
            }
        }
        double e = rel_error(y, ye, i * c, r->x, i * c);
        text_put(t, "%zu,%.9g,%.9g,%.9g,%.6e,%.6e,%.4g,%.6e,%g,%s\n", i, ts.c, ts.ratio_next,
                 ts.ratio_double, ta, te, te / ta, e, r->p.eps, stats_mode_name(st.mode));
        progress(t0, &last, i, n);
        if (i == n) break;
    }
    rc = 0;
out:
    kmv_stream_free(s);
    kmv_ctx_free(exact);
    kmv_ctx_free(ctx);
    free(y);
    free(ye);
    return rc;
}

/* The gnuplot script for the table: c_i and the speed-up against i, the
 * speed-up's points marked by the engine that ran. */
static void plot_script(text *g, const char *terminal, const text *csv, const run *r) {
    text_put(g, "set terminal %s\nset datafile separator ','\n$t << EOD\n%sEOD\n", terminal,
             csv->s);
    if (r->attn)
        text_put(g,
                 "set multiplot layout 2,1 title 'attention via Lemma 4.1: n = %zu, d = %zu, "
                 "scale = %g (lifted sigma = %g), eps = %g'\n",
                 r->n, r->d, r->p.attn_scale > 0 ? r->p.attn_scale : 1.0 / sqrt((double)r->d),
                 r->p.sigma, r->p.eps);
    else
        text_put(g,
                 "set multiplot layout 2,1 title 'Gaussian kernel: n = %zu, d = %zu, sigma = %g, "
                 "eps = %g'\n",
                 r->n, r->d, r->p.sigma, r->p.eps);
    /* c_i from 0, so a flat line looks flat. */
    text_put(g,
             "set grid\nset key top right\nset xlabel 'prefix length i'\nset yrange [0:*]\n"
             "set ylabel 'c_i'\nplot $t using 1:2 every ::1 with linespoints pt 7 ps 0.5 "
             "title 'c_i = (||K||_1 - a_i) / a_i'\n"
             "set ylabel 'exact time / approximate time'\n"
             "plot $t using 1:(strcol(10) eq 'approx' ? $7 : NaN) every ::1 with points pt 7 "
             "ps 0.8 lc rgb '#1f77b4' title 'approximate engine ran', "
             "$t using 1:(strcol(10) eq 'approx' ? NaN : $7) every ::1 with points pt 6 ps 0.8 "
             "lc rgb '#d62728' title 'exact engine ran (fallback)', "
             "1 with lines dt 2 lc 'gray' title 'break-even'\nunset multiplot\n");
}

int cmd_prefix(int argc, char **argv) {
    opt o[] = {
        INPUT("queries", 1, "Q.npy", "queries, m x d"),
        INPUT("keys", 1, "K.npy", "keys, n x d (prefixes run to min(m, n))"),
        INPUT("x", 0, "X.npy", "x (or V), length n or n x c (default: random signs)"),
        OPTION("sigma", OPT_DOUBLE, "S", "Gaussian bandwidth, K = exp(-|q-k|^2 / (2 S^2))"),
        FLAG("attention", "attention exp(scale <q,k>) through Lemma 4.1; the statistics are "
                          "of the lifted Gaussian, the error of D^-1 A x"),
        OPTION("scale", OPT_DOUBLE, "S", "attention logit scale, > 0 (default 1/sqrt(d))"),
        OPTION("start", OPT_INT, "I", "first prefix length, >= 2 (default 50)"),
        OPTION("step", OPT_INT, "N", "prefix step, >= 1 (default: at most 64 prefixes)"),
        OPT_EPS,
        OPT_DELTA,
        OPT_SEED,
        OPT_THREADS,
        OUTPUT("out", 1, "table.csv", "one row per prefix length ('-': stdout)"),
        OUTPUT("plot", 0, "figure.png", "plot c_i and the speed-up (.png, .svg or .pdf; "
                                        "needs gnuplot)"),
        OPT_FORCE_APPROX,
    };
    size_t no = sizeof o / sizeof o[0];
    int rc = args_parse(CMD,
                        "Prefix scaling: Assumption A statistics of K[:i, :i] and the "
                        "approximate vs exact Kx, for growing i, from one stream.",
                        o, no, argc, argv);
    if (rc != 0) return rc < 0 ? EXIT_OK : rc;

    run r;
    memset(&r, 0, sizeof r);
    r.attn = args_seen(o, no, "attention");
    opt *v;
    if (r.attn == args_seen(o, no, "sigma")) {
        fprintf(stderr, "kmv " CMD ": give exactly one of --sigma and --attention\n");
        return EXIT_USAGE;
    }
    kmv_params_init(&r.p);
    if (!r.attn) {
        r.p.sigma = args_get(o, no, "sigma")->d;
        if (!(r.p.sigma >= 1e-150 && r.p.sigma <= 1e150)) {
            fprintf(stderr, "kmv " CMD ": --sigma must be in [1e-150, 1e150]\n");
            return EXIT_USAGE;
        }
    }
    if ((v = args_get(o, no, "scale"))->seen) {
        if (!r.attn) {
            fprintf(stderr, "kmv " CMD ": --scale goes with --attention\n");
            return EXIT_USAGE;
        }
        if (!(v->d > 0 && isfinite(v->d))) {
            fprintf(stderr, "kmv " CMD ": --scale must be > 0\n");
            return EXIT_USAGE;
        }
        r.p.attn_scale = v->d;
    }
    if (args_common_params(CMD, o, no, &r.p) != EXIT_OK) return EXIT_USAGE;
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
    const char *png = args_get(o, no, "plot")->s, *xpath = args_get(o, no, "x")->s;
    if ((rc = io_outputs_check(CMD, o, no)) != EXIT_OK) return rc;
    const char *terminal = png != NULL ? plot_terminal(png) : NULL;
    if (png != NULL && terminal == NULL) {
        fprintf(stderr, "kmv " CMD ": --plot %s: name the image .png, .svg or .pdf\n", png);
        return EXIT_USAGE;
    }
    /* Before the long part: a missing gnuplot found after an hour is rude. */
    if (png != NULL && system("command -v gnuplot >/dev/null 2>&1") != 0) {
        fprintf(stderr, "kmv " CMD ": --plot needs gnuplot (scripts/install-deps installs it)\n");
        return EXIT_FAIL;
    }

    io_outputs outs;
    if ((rc = io_outputs_open(CMD, o, no, &outs)) != EXIT_OK) return rc;
    kmv_array Q = {0}, K = {0}, X = {0};
    text t = {0}, g = {0}, img = {0};
    rc = EXIT_FAIL;
    if (io_load(CMD, args_get(o, no, "queries")->s, "queries", 0, &Q) ||
        io_load(CMD, args_get(o, no, "keys")->s, "keys", 0, &K) ||
        (xpath != NULL && io_load(CMD, xpath, "x", 1, &X)))
        goto done;
    r.d = K.cols;
    r.n = Q.rows < K.rows ? Q.rows : K.rows;
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
    if ((size_t)start > r.n) {
        fprintf(stderr, "kmv " CMD ": --start %lld is past the %zu rows available\n", start, r.n);
        rc = EXIT_USAGE;
        goto done;
    }
    if (step == 0) step = ((long long)r.n - start + DEFAULT_PREFIXES - 2) / (DEFAULT_PREFIXES - 1);
    if (step < 1) step = 1;
    if (run_setup(&r, &Q, &K, &X) || run_prefixes(&r, &Q, &K, (size_t)start, (size_t)step, &t))
        goto done;
    if (t.failed) {
        fprintf(stderr, "kmv " CMD ": out of memory\n");
        goto done;
    }
    if (png != NULL) {
        plot_script(&g, terminal, &t, &r);
        if (g.failed || run_gnuplot(&g, &img) || io_write(&outs, "plot", img.s, img.len))
            goto done;
    }
    if (io_write(&outs, "out", t.s, t.len) || io_outputs_commit(&outs)) goto done;
    rc = EXIT_OK;
done:
    io_outputs_discard(&outs);
    text_free(&t);
    text_free(&g);
    text_free(&img);
    run_free(&r);
    kmv_array_free(&Q);
    kmv_array_free(&K);
    kmv_array_free(&X);
    return rc;
}
