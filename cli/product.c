/* `kmv matvec` and `kmv attention`: check the outputs, load, check shapes,
 * one library call, write the result and the stats. The two commands differ
 * only in their option names and the call they make, so they share this
 * file. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/io.h"
#include "cli/stats.h"
#include "cli/text.h"
#include "tools/clock.h"
#include "kmv/kmv.h"

/* Progress on stderr for runs longer than two seconds: a line redrawn in
 * place on a terminal, a line every five seconds in a log. */
typedef struct progress {
    const char *cmd;
    double start, last;
    int tty, shown;
} progress;

static void show_progress(void *opaque, double fraction) {
    progress *pr = opaque;
    double t = tool_now();
    if (t - pr->start < 2.0) return;
    if (fraction < 1.0 && t - pr->last < (pr->tty ? 0.2 : 5.0)) return;
    if (fraction >= 1.0 && !pr->shown) return;
    pr->last = t;
    pr->shown = 1;
    fprintf(stderr, pr->tty ? "\rkmv %s: %3.0f%% (%.1f s)" : "kmv %s: %3.0f%% (%.1f s)\n",
            pr->cmd, 100.0 * fraction, t - pr->start);
    if (pr->tty && fraction >= 1.0) fputc('\n', stderr);
}

/* The options both commands take after their operands. */
#define PRODUCT_OPTS(outname)                                                              \
    OPT_EPS, OPT_DELTA, OPT_SEED, OPT_THREADS, OPT_MAX_MB, OPT_EXACT, OPT_MEASURE_ERROR, \
        OUTPUT("out", 1, outname, "output, n_queries x n_cols float32 ('-': stdout)"),     \
        OUTPUT("stats", 0, "FILE.json", "run statistics as JSON (docs/stats.md)"),         \
        OPT_FORCE_APPROX

static int run(const char *cmd, int attn, opt *o, size_t no, int argc, char **argv) {
    const char *summary =
        attn ? "Normalized attention D^-1 A V with A_ij = exp(scale <q_i, k_j>)."
             : "Gaussian kernel product y = K x, K_ij = exp(-||q_i - k_j||^2 / (2 sigma^2)).";
    int rc = args_parse(cmd, summary, o, no, argc, argv);
    if (rc != 0) return rc < 0 ? EXIT_OK : rc;

    kmv_params p;
    kmv_params_init(&p);
    opt *v;
    if (!attn) {
        p.sigma = args_get(o, no, "sigma")->d;
        if (!(p.sigma >= 1e-150 && p.sigma <= 1e150)) {
            fprintf(stderr, "kmv %s: --sigma must be in [1e-150, 1e150]\n", cmd);
            return EXIT_USAGE;
        }
    } else if ((v = args_get(o, no, "scale"))->seen) {
        if (!(v->d > 0)) {
            fprintf(stderr, "kmv %s: --scale must be > 0\n", cmd);
            return EXIT_USAGE;
        }
        p.attn_scale = v->d;
    }
    p.causal = args_seen(o, no, "causal");
    if (args_common_params(cmd, o, no, &p) != EXIT_OK) return EXIT_USAGE;

    const char *qn = attn ? "q" : "queries", *kn = attn ? "k" : "keys", *xn = attn ? "v" : "x";
    const char *qpath = args_get(o, no, qn)->s, *kpath = args_get(o, no, kn)->s;
    const char *xpath = args_get(o, no, xn)->s;

    io_outputs outs;
    if ((rc = io_outputs_open(cmd, o, no, &outs)) != EXIT_OK) return rc;
    double t0 = tool_now();
    kmv_array Q = {0}, K = {0}, X = {0};
    kmv_ctx *ctx = NULL;
    float *y = NULL;
    text js = {0};
    rc = EXIT_FAIL;
    if (io_load(cmd, qpath, "queries", 0, &Q) || io_load(cmd, kpath, "keys", 0, &K) ||
        io_load(cmd, xpath, attn ? "values" : "x", 1, &X))
        goto done;
    if (Q.cols != K.cols) {
        fprintf(stderr, "kmv %s: dimension mismatch: queries %s have dim %zu, keys %s have dim %zu\n",
                cmd, qpath, Q.cols, kpath, K.cols);
        goto done;
    }
    if (X.rows != K.rows) {
        fprintf(stderr, "kmv %s: %s has %zu rows but there are %zu keys in %s\n", cmd, xpath,
                X.rows, K.rows, kpath);
        goto done;
    }
    if (attn && K.rows == 0 && Q.rows > 0) {
        fprintf(stderr, "kmv %s: %s holds no keys: a softmax over nothing is undefined\n", cmd,
                kpath);
        goto done;
    }
    double t_load = tool_now() - t0;
    progress pr = {cmd, tool_now(), 0.0, isatty(STDERR_FILENO), 0};
    p.progress = show_progress;
    p.progress_opaque = &pr;

    int err = kmv_ctx_create(&p, &ctx);
    if (err == KMV_OK) {
        y = malloc(Q.rows * X.cols * sizeof(float) + 1);
        if (y == NULL) err = KMV_ENOMEM;
    }
    kmv_stats st;
    if (err == KMV_OK) {
        err = attn ? kmv_attention(ctx, Q.data, Q.rows, K.data, K.rows, K.cols, X.data, X.cols, y,
                                   &st)
                   : kmv_matvec(ctx, Q.data, Q.rows, K.data, K.rows, K.cols, X.data, X.cols, y,
                                &st);
    }
    if (err == KMV_EOVERFLOW && attn) {
        fprintf(stderr,
                "kmv %s: logits could exceed float32's range (max |q| max |k| scale above "
                "3.3e35); rescale the inputs or --scale\n",
                cmd);
        goto done;
    }
    if (err == KMV_ELIMIT) {
        fprintf(stderr, "kmv %s: the product needs more memory than --max-mb %g allows\n", cmd,
                args_get(o, no, "max-mb")->d);
        goto done;
    }
    if (err != KMV_OK) {
        fprintf(stderr, "kmv %s: %s (%s)\n", cmd, kmv_strerror(err), kmv_errname(err));
        goto done;
    }

    /* Every output is written before any is published: a failure of one
     * leaves none. */
    if (io_write_npy(&outs, "out", y, X.ndim, Q.rows, X.cols)) goto done;
    if (io_output(&outs, "stats") != NULL) {
        stats_json(&js, cmd, &p, attn, &st, t_load);
        if (js.failed) {
            fprintf(stderr, "kmv %s: out of memory\n", cmd);
            goto done;
        }
        if (io_write(&outs, "stats", js.s, js.len)) goto done;
    }
    if (io_outputs_commit(&outs)) goto done;
    rc = EXIT_OK;
done:
    io_outputs_discard(&outs);
    text_free(&js);
    free(y);
    kmv_ctx_free(ctx);
    kmv_array_free(&Q);
    kmv_array_free(&K);
    kmv_array_free(&X);
    return rc;
}

int cmd_matvec(int argc, char **argv) {
    opt o[] = {
        INPUT("queries", 1, "Q.npy", "queries, m x d float32/float64"),
        INPUT("keys", 1, "K.npy", "keys, n x d"),
        INPUT("x", 1, "X.npy", "x, length n, or n x c for c columns at once"),
        REQUIRED("sigma", OPT_DOUBLE, "S", "bandwidth: K = exp(-|q-k|^2 / (2 S^2)), S > 0"),
        FLAG("causal", "query i sees keys j <= i only"),
        PRODUCT_OPTS("Y.npy"),
        OPT_BACKEND,
        OPT_VERIFY_EVERY,
    };
    return run("matvec", 0, o, sizeof o / sizeof o[0], argc, argv);
}

int cmd_attention(int argc, char **argv) {
    opt o[] = {
        INPUT("q", 1, "Q.npy", "queries, m x d"),
        INPUT("k", 1, "K.npy", "keys, n x d"),
        INPUT("v", 1, "V.npy", "values, n x c (or length n)"),
        OPTION("scale", OPT_DOUBLE, "S", "logit scale, > 0 (default 1/sqrt(d))"),
        FLAG("causal", "query i sees keys j <= i only"),
        PRODUCT_OPTS("O.npy"),
        OPT_VERIFY_EVERY,
        OPT_EMPIRICAL,
    };
    return run("attention", 1, o, sizeof o / sizeof o[0], argc, argv);
}
