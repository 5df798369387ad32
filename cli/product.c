/* `kmv matvec` and `kmv attention`: load, check shapes, one library call,
 * write the result and the stats. The two commands differ only in their
 * option names and the call they make, so they share this file. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/io.h"
#include "kmv/kmv.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static const char *mode_name(int mode) {
    switch (mode) {
    case KMV_MODE_EXACT:
        return "exact";
    case KMV_MODE_APPROX:
        return "approx";
    default:
        return "fallback";
    }
}

/* Stage the stats JSON (see io_stage_text); the output's own write is not
 * timed, since the stats are staged before it. */
static int stage_stats(const char *cmd, const char *path, const kmv_params *p, int attn,
                       const kmv_stats *st, double t_load, char **staged) {
    char buf[4096], measured[64] = "null", bound[64] = "null", estimate[64] = "null";
    if (st->error_measured >= 0.0) snprintf(measured, sizeof measured, "%.9g", st->error_measured);
    /* JSON has no infinity: an empirical budget's missing bound is null. */
    double eb = st->mode == KMV_MODE_EXACT ? 0.0 : st->error_bound;
    if (isfinite(eb)) snprintf(bound, sizeof bound, "%.9g", eb);
    if (isfinite(st->error_estimate)) snprintf(estimate, sizeof estimate, "%.9g", st->error_estimate);
    int len = snprintf(
        buf, sizeof buf,
        "{\n"
        "  \"command\": \"%s\",\n"
        "  \"version\": \"%s\",\n"
        "  \"mode\": \"%s\",\n"
        "  \"kernel\": \"%s\",\n"
        "  \"n_keys\": %zu,\n"
        "  \"n_queries\": %zu,\n"
        "  \"dim\": %zu,\n"
        "  \"n_cols\": %zu,\n"
        "  \"causal\": %s,\n"
        "  \"sigma\": %.17g,\n"
        "  \"scale\": %.17g,\n"
        "  \"eps\": %.17g,\n"
        "  \"delta\": %.17g,\n"
        "  \"seed\": %llu,\n"
        "  \"threads\": %d,\n"
        "  \"kernel_evals\": %llu,\n"
        "  \"dot_precision\": \"%s\",\n"
        "  \"seconds\": %.9f,\n"
        "  \"phases\": {\n"
        "    \"load\": %.9f,\n"
        "    \"prepare\": %.9f,\n"
        "    \"kernel\": %.9f,\n"
        "    \"lsh\": %.9f,\n"
        "    \"heavy\": %.9f,\n"
        "    \"sample\": %.9f\n"
        "  },\n"
        "  \"approx\": {\n"
        "    \"fallback_reason\": \"%s\",\n"
        "    \"keys_exact\": %zu,\n"
        "    \"keys_dropped\": %zu,\n"
        "    \"keys_sampled\": %zu,\n"
        "    \"heavy_threshold\": %.9g,\n"
        "    \"lsh_tables\": %d,\n"
        "    \"lsh_hash_len\": %d,\n"
        "    \"lsh_width\": %.9g,\n"
        "    \"lsh_candidates\": %llu,\n"
        "    \"lsh_steps\": %llu,\n"
        "    \"heavy_pairs\": %llu,\n"
        "    \"sketch_evals\": %llu,\n"
        "    \"samples\": %llu,\n"
        "    \"rows_exact\": %zu,\n"
        "    \"rows_resampled\": %zu,\n"
        "    \"cost_ratio\": %.6g,\n"
        "    \"attn_budget\": \"%s\",\n"
        "    \"error_bound\": %s,\n"
        "    \"error_estimate\": %s,\n"
        "    \"error_measured\": %s\n"
        "  }\n"
        "}\n",
        cmd, kmv_version_string(), mode_name(st->mode), attn ? "attention" : "gaussian",
        st->n_keys, st->n_queries, st->dim, st->n_cols, p->causal ? "true" : "false",
        attn ? 0.0 : p->sigma, attn ? p->attn_scale : 0.0, p->eps, p->delta,
        (unsigned long long)p->seed, st->n_threads, (unsigned long long)st->kernel_evals, st->wide_dots ? "float64" : "float32",
        t_load + st->seconds, t_load, st->seconds_prepare, st->seconds_kernel, st->seconds_lsh,
        st->seconds_heavy, st->seconds_sample, kmv_fallback_name(st->fallback_reason),
        st->keys_exact, st->keys_dropped, st->keys_sampled, st->heavy_threshold, st->lsh_tables,
        st->lsh_hash_len, st->lsh_width, (unsigned long long)st->lsh_candidates,
        (unsigned long long)st->lsh_steps, (unsigned long long)st->heavy_pairs,
        (unsigned long long)st->sketch_evals, (unsigned long long)st->samples, st->rows_exact,
        st->rows_resampled, st->cost_ratio,
        p->attn_budget == KMV_BUDGET_EMPIRICAL ? "empirical" : "certified", bound, estimate,
        measured);
    if (len < 0 || (size_t)len >= sizeof buf) {
        fprintf(stderr, "kmv %s: stats too long\n", cmd);
        return EXIT_FAIL;
    }
    return io_stage_text(cmd, path, buf, (size_t)len, staged);
}

/* Progress on stderr for runs longer than two seconds: a line redrawn in
 * place on a terminal, a line every five seconds in a log. */
typedef struct progress {
    const char *cmd;
    double start, last;
    int tty, shown;
} progress;

static void show_progress(void *opaque, double fraction) {
    progress *pr = opaque;
    double t = now();
    if (t - pr->start < 2.0) return;
    if (fraction < 1.0 && t - pr->last < (pr->tty ? 0.2 : 5.0)) return;
    if (fraction >= 1.0 && !pr->shown) return;
    pr->last = t;
    pr->shown = 1;
    fprintf(stderr, pr->tty ? "\rkmv %s: %3.0f%% (%.1f s)" : "kmv %s: %3.0f%% (%.1f s)\n",
            pr->cmd, 100.0 * fraction, t - pr->start);
    if (pr->tty && fraction >= 1.0) fputc('\n', stderr);
}

/* Option tables. Names follow the interface; attention says q/k/v. */
#define COMMON_OPTS                                                                          \
    {"eps", OPT_DOUBLE, 0, "E", "target error eps, in (0, 1) (default 0.1)", 0, 0, 0, 0, 0}, \
        {"seed", OPT_U64, 0, "N", "random seed (default 1)", 0, 0, 0, 0, 0},                 \
        {"threads", OPT_INT, 0, "T", "threads, 0 = all cores (default 0)", 0, 0, 0, 0, 0},   \
        {"max-mb", OPT_DOUBLE, 0, "MB", "cap on the engine's memory, MiB (default none)", 0, 0, 0, \
         0, 0},                                                                              \
        {"exact", OPT_FLAG, 0, "", "use the exact engine", 0, 0, 0, 0, 0},                   \
        {"out", OPT_STRING, 1, "Y.npy", "output, n_queries x n_cols float32", 0, 0, 0, 0, 0}, \
        {"stats", OPT_STRING, 0, "FILE.json", "write run statistics as JSON", 0, 0, 0, 0, 0}

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
        p.measure_error = args_get(o, no, "measure-error")->seen;
    } else {
        if ((v = args_get(o, no, "scale"))->seen) {
            if (!(v->d > 0)) {
                fprintf(stderr, "kmv %s: --scale must be > 0\n", cmd);
                return EXIT_USAGE;
            }
            p.attn_scale = v->d;
        }
        if (args_get(o, no, "empirical")->seen) p.attn_budget = KMV_BUDGET_EMPIRICAL;
    }
    if ((v = args_get(o, no, "causal")) != NULL) p.causal = v->seen;
    p.exact = args_get(o, no, "exact")->seen;
    if (args_common_params(cmd, o, no, &p) != EXIT_OK) return EXIT_USAGE;
    if ((v = args_get(o, no, "max-mb"))->seen) {
        if (!(v->d > 0 && v->d <= 1e12)) {
            fprintf(stderr, "kmv %s: --max-mb must be in (0, 1e12]\n", cmd);
            return EXIT_USAGE;
        }
        p.max_bytes = (size_t)(v->d * 1048576.0);
        if (p.max_bytes == 0) p.max_bytes = 1; /* 0 would mean no cap */
    }

    const char *qn = attn ? "q" : "queries", *kn = attn ? "k" : "keys", *xn = attn ? "v" : "x";
    const char *qpath = args_get(o, no, qn)->s, *kpath = args_get(o, no, kn)->s;
    const char *xpath = args_get(o, no, xn)->s, *out = args_get(o, no, "out")->s;
    const char *stats_path = args_get(o, no, "stats")->s;

    double t0 = now();
    kmv_array Q = {0}, K = {0}, X = {0};
    kmv_ctx *ctx = NULL;
    float *y = NULL;
    char *staged = NULL;
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
    double t_load = now() - t0;
    progress pr = {cmd, now(), 0.0, isatty(STDERR_FILENO), 0};
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

    /* Stats are staged first and published only once the output is in
     * place, so a failure of either leaves neither new file behind. */
    if (stats_path != NULL && stage_stats(cmd, stats_path, &p, attn, &st, t_load, &staged))
        goto done;
    char msg[512];
    err = kmv_npy_write(out, y, X.ndim, Q.rows, X.cols, msg, sizeof msg);
    if (err != KMV_OK) {
        fprintf(stderr, "kmv %s: %s\n", cmd, msg);
        goto done;
    }
    if (staged != NULL && io_commit(cmd, &staged, stats_path)) goto done;
    rc = EXIT_OK;
done:
    io_discard(&staged);
    free(y);
    kmv_ctx_free(ctx);
    kmv_array_free(&Q);
    kmv_array_free(&K);
    kmv_array_free(&X);
    return rc;
}

int cmd_matvec(int argc, char **argv) {
    opt o[] = {
        {"queries", OPT_STRING, 1, "Q.npy", "queries, m x d float32/float64", 0, 0, 0, 0, 0},
        {"keys", OPT_STRING, 1, "K.npy", "keys, n x d", 0, 0, 0, 0, 0},
        {"x", OPT_STRING, 1, "X.npy", "x, length n, or n x c for c columns at once", 0, 0, 0, 0, 0},
        {"sigma", OPT_DOUBLE, 1, "S", "bandwidth: K = exp(-|q-k|^2 / (2 S^2)), S > 0", 0, 0, 0, 0, 0},
        {"delta", OPT_DOUBLE, 0, "P", "failure probability, in (0, 1) (default 0.01)", 0, 0, 0, 0, 0},
        {"causal", OPT_FLAG, 0, "", "query i sees keys j <= i only", 0, 0, 0, 0, 0},
        {"measure-error", OPT_FLAG, 0, "", "also run exact; report |Kx-y|/|x| in the stats", 0, 0, 0, 0, 0},
        COMMON_OPTS,
    };
    return run("matvec", 0, o, sizeof o / sizeof o[0], argc, argv);
}

int cmd_attention(int argc, char **argv) {
    opt o[] = {
        {"q", OPT_STRING, 1, "Q.npy", "queries, m x d", 0, 0, 0, 0, 0},
        {"k", OPT_STRING, 1, "K.npy", "keys, n x d", 0, 0, 0, 0, 0},
        {"v", OPT_STRING, 1, "V.npy", "values, n x c (or length n)", 0, 0, 0, 0, 0},
        {"scale", OPT_DOUBLE, 0, "S", "logit scale, > 0 (default 1/sqrt(d))", 0, 0, 0, 0, 0},
        {"causal", OPT_FLAG, 0, "", "query i sees keys j <= i only", 0, 0, 0, 0, 0},
        {"empirical", OPT_FLAG, 0, "", "size samples by their own variance (the paper's A.1.4; "
                                       "no error bound)", 0, 0, 0, 0, 0},
        COMMON_OPTS,
    };
    return run("attention", 1, o, sizeof o / sizeof o[0], argc, argv);
}
