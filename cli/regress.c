/* `kmv regress`: least squares against the attention proxies, one
 * kmv_regress() call between checked inputs and outputs that appear whole
 * or not at all. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/io.h"
#include "cli/npz.h"
#include "cli/text.h"
#include "tools/clock.h"
#include "kmv/kmv.h"

/* Iterations whose relative residual the stats list at most. */
#define HISTORY_MAX 100000

static const char *const problems[] = {"exp", "gram", "agram"};

/* A float64 .npy of n entries: x keeps the solver's precision, which
 * float32 would cut for ill-conditioned problems. */
static int write_npy64(const io_outputs *outs, const double *x, size_t n) {
    char head[256];
    size_t hl = npy_header("<f8", &n, 1, head, sizeof head);
    if (io_write(outs, "out", head, hl)) return EXIT_FAIL;
    return io_write(outs, "out", x, n * sizeof(double)); /* x86-64: little-endian */
}

static void stats_json_regress(text *t, const kmv_regress_params *rp, const kmv_params *p,
                               size_t n, size_t d, const kmv_regress_stats *st, double t_load) {
    text_put(t, "{\n  \"command\": \"regress\",\n  \"version\": \"%s\",\n", kmv_version_string());
    text_put(t, "  \"problem\": \"%s\",\n  \"n\": %zu,\n  \"d\": %zu,\n", problems[rp->problem], n, d);
    if (rp->problem != KMV_REGRESS_EXP) text_put(t, "  \"power\": %d,\n", rp->power);
    if (rp->problem == KMV_REGRESS_EXP) {
        text_put(t, "  \"scale\": %.17g,\n  \"ridge\": %.17g,\n  \"exact_products\": %s,\n",
                 rp->scale > 0 ? rp->scale : 1.0 / sqrt((double)d), rp->ridge,
                 p->exact ? "true" : "false");
        text_put(t, "  \"eps\": %.17g,\n  \"delta\": %.17g,\n", p->eps, p->delta);
    }
    text_put(t, "  \"seed\": %llu,\n  \"tol\": %.17g,\n  \"max_iter\": %d,\n",
             (unsigned long long)p->seed, rp->tol, rp->max_iter);
    text_put(t, "  \"preconditioned\": %s,\n  \"sketch_rows\": %zu,\n",
             rp->precondition ? "true" : "false", st->sketch_rows);
    text_put(t, "  \"iterations\": %d,\n  \"converged\": %s,\n  \"residual\": ", st->iterations,
             st->converged ? "true" : "false");
    text_num(t, st->residual >= 0 ? st->residual : NAN);
    text_put(t, ",\n  \"residual_optimal\": ");
    text_num(t, st->residual_optimal >= 0 ? st->residual_optimal : NAN);
    text_put(t, ",\n  \"products\": %llu,\n", (unsigned long long)st->products);
    if (rp->problem == KMV_REGRESS_EXP) {
        text_put(t, "  \"approx_products\": %d,\n  \"product_error\": ", st->approx_products);
        text_num(t, st->product_error);
        text_put(t, ",\n  \"log_scale_max\": ");
        text_num(t, st->log_scale_max);
        text_put(t, ",\n");
    }
    text_put(t, "  \"residual_per_iteration\": [");
    size_t k = (size_t)st->iterations < rp->history_len ? (size_t)st->iterations : rp->history_len;
    for (size_t i = 0; i < k; i++) {
        if (i > 0) text_put(t, ", ");
        text_num(t, rp->history[i]);
    }
    text_put(t, "],\n  \"seconds\": %.9f,\n  \"phases\": {\n", t_load + st->seconds);
    text_put(t, "    \"load\": %.9f,\n    \"precondition\": %.9f,\n    \"products\": %.9f\n  }\n}\n",
             t_load, st->seconds_precond, st->seconds_products);
}

int cmd_regress(int argc, char **argv) {
    opt o[] = {
        INPUT("a", 1, "A.npy", "A, n x d float32/float64"),
        INPUT("b", 1, "B.npy", "b: length n (exp, agram) or d (gram)"),
        REQUIRED("problem", OPT_STRING, "exp|gram|agram",
                 "exp: min ||(exp(s A A^T) + ridge I) x - b||; gram: min ||(A^T A)^j x - b||; "
                 "agram: min ||A (A^T A)^j x - b||"),
        OPTION("power", OPT_INT, "J", "j >= 1 for gram and agram (default 1)"),
        OPTION("scale", OPT_DOUBLE, "S", "s > 0 of exp(s A A^T) (default 1/sqrt(d))"),
        OPTION("ridge", OPT_DOUBLE, "L", "ridge >= 0 added to exp's diagonal (default 0)"),
        OPTION("tol", OPT_DOUBLE, "T", "relative residual to stop at, in (0, 1) (default 1e-6)"),
        OPTION("max-iter", OPT_INT, "N", "iterations per solve, >= 1 (default 1000)"),
        OPTION("sketch", OPT_INT, "R", "sketch rows (gram, agram: default 4d) or Nystrom columns "
                                       "(exp: default min(n, 200))"),
        FLAG("no-precondition", "plain iterations, to compare"),
        OPT_EPS, OPT_DELTA, OPT_SEED, OPT_THREADS, OPT_MAX_MB,
        FLAG("exact", "exp: the exact engine for every product"),
        OUTPUT("out", 1, "X.npy", "x, float64: length n (exp) or d"),
        OUTPUT("stats", 0, "FILE.json", "run statistics as JSON (docs/regress.md)"),
    };
    const char *cmd = "regress";
    size_t no = sizeof o / sizeof o[0];
    int rc = args_parse(cmd,
                        "Regression against attention proxies (the regression paper): sketch-"
                        "and-precondition for the Gram powers, preconditioned conjugate "
                        "gradients over kmv's products for exp(s A A^T).",
                        o, no, argc, argv);
    if (rc != 0) return rc < 0 ? EXIT_OK : rc;

    kmv_regress_params rp;
    kmv_regress_params_init(&rp);
    const char *pn = args_get(o, no, "problem")->s;
    for (rp.problem = 0; rp.problem < 3 && strcmp(pn, problems[rp.problem]) != 0; rp.problem++) {}
    if (rp.problem == 3) {
        fprintf(stderr, "kmv %s: --problem must be exp, gram or agram, not '%s'\n", cmd, pn);
        return EXIT_USAGE;
    }
    opt *v;
    if ((v = args_get(o, no, "power"))->seen) {
        if (v->i < 1 || v->i > 64) {
            fprintf(stderr, "kmv %s: --power must be in [1, 64]\n", cmd);
            return EXIT_USAGE;
        }
        rp.power = (int)v->i;
    }
    if ((v = args_get(o, no, "scale"))->seen) {
        if (!(v->d > 0)) {
            fprintf(stderr, "kmv %s: --scale must be > 0\n", cmd);
            return EXIT_USAGE;
        }
        rp.scale = v->d;
    }
    if ((v = args_get(o, no, "ridge"))->seen) {
        if (!(v->d >= 0)) {
            fprintf(stderr, "kmv %s: --ridge must be >= 0\n", cmd);
            return EXIT_USAGE;
        }
        rp.ridge = v->d;
    }
    if ((v = args_get(o, no, "tol"))->seen) {
        if (!(v->d > 0 && v->d < 1)) {
            fprintf(stderr, "kmv %s: --tol must be in (0, 1)\n", cmd);
            return EXIT_USAGE;
        }
        rp.tol = v->d;
    }
    if ((v = args_get(o, no, "max-iter"))->seen) {
        if (v->i < 1 || v->i > 100000000) {
            fprintf(stderr, "kmv %s: --max-iter must be in [1, 1e8]\n", cmd);
            return EXIT_USAGE;
        }
        rp.max_iter = (int)v->i;
    }
    if ((v = args_get(o, no, "sketch"))->seen) {
        if (v->i < 1) {
            fprintf(stderr, "kmv %s: --sketch must be >= 1\n", cmd);
            return EXIT_USAGE;
        }
        rp.sketch_rows = (size_t)v->i;
    }
    rp.precondition = !args_seen(o, no, "no-precondition");
    kmv_params p;
    kmv_params_init(&p);
    if (args_common_params(cmd, o, no, &p) != EXIT_OK) return EXIT_USAGE;

    io_outputs outs;
    if ((rc = io_outputs_open(cmd, o, no, &outs)) != EXIT_OK) return rc;
    double t0 = tool_now();
    kmv_array A = {0}, B = {0};
    kmv_ctx *ctx = NULL;
    double *b = NULL, *x = NULL;
    text js = {0};
    rc = EXIT_FAIL;
    const char *apath = args_get(o, no, "a")->s, *bpath = args_get(o, no, "b")->s;
    if (io_load(cmd, apath, "A", 0, &A) || io_load(cmd, bpath, "b", 1, &B)) goto done;
    size_t n = A.rows, d = A.cols, want = rp.problem == KMV_REGRESS_GRAM ? d : n;
    if (n == 0) {
        fprintf(stderr, "kmv %s: %s has no rows\n", cmd, apath);
        goto done;
    }
    if (B.cols != 1 || B.rows != want) {
        fprintf(stderr, "kmv %s: b must be a vector of %zu entries (%s: %s), but %s is %zu x %zu\n",
                cmd, want, rp.problem == KMV_REGRESS_GRAM ? "d" : "n", pn, bpath, B.rows, B.cols);
        goto done;
    }
    double t_load = tool_now() - t0;
    size_t xn = rp.problem == KMV_REGRESS_EXP ? n : d;
    b = malloc(want * sizeof(double) + 1);
    x = malloc(xn * sizeof(double) + 1);
    rp.history_len = args_seen(o, no, "stats") ? HISTORY_MAX : 0;
    rp.history = rp.history_len ? malloc(HISTORY_MAX * sizeof(double)) : NULL;
    if (b == NULL || x == NULL || (rp.history_len && rp.history == NULL)) {
        fprintf(stderr, "kmv %s: out of memory\n", cmd);
        goto done;
    }
    for (size_t i = 0; i < want; i++) b[i] = B.data[i];
    kmv_regress_stats st;
    memset(&st, 0, sizeof st);
    int err = kmv_ctx_create(&p, &ctx);
    if (err == KMV_OK) err = kmv_regress(ctx, &rp, A.data, n, d, b, want, x, &st);
    if (err == KMV_EOVERFLOW && rp.problem == KMV_REGRESS_EXP) {
        fprintf(stderr,
                "kmv %s: exp(s A A^T) leaves double's range: the largest s ||a_i||^2 / 2 is %.6g; "
                "lower --scale or rescale A\n",
                cmd, st.log_scale_max);
        goto done;
    }
    if (err == KMV_ELIMIT) {
        fprintf(stderr, "kmv %s: the solve needs more memory than --max-mb %g allows\n", cmd,
                args_get(o, no, "max-mb")->d);
        goto done;
    }
    if (err != KMV_OK) {
        fprintf(stderr, "kmv %s: %s (%s)\n", cmd, kmv_strerror(err), kmv_errname(err));
        goto done;
    }
    if (!st.converged)
        fprintf(stderr, "kmv %s: not converged to --tol %g in %d iterations (relative residual %g)\n",
                cmd, rp.tol, st.iterations, st.residual);
    if (write_npy64(&outs, x, xn)) goto done;
    if (io_output(&outs, "stats") != NULL) {
        stats_json_regress(&js, &rp, &p, n, d, &st, t_load);
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
    free(b);
    free(x);
    free(rp.history);
    kmv_ctx_free(ctx);
    kmv_array_free(&A);
    kmv_array_free(&B);
    return rc;
}
