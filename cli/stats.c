#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "cli/stats.h"

#include <math.h>

const char *stats_mode_name(int mode) {
    switch (mode) {
    case KMV_MODE_EXACT:
        return "exact";
    case KMV_MODE_APPROX:
        return "approx";
    default:
        return "fallback";
    }
}

/* A field "name": number, or null where the number is not finite or
 * negative (the library's "not measured"). */
static void num(text *t, const char *name, double v, int last) {
    text_put(t, "    \"%s\": ", name);
    text_num(t, v >= 0.0 ? v : NAN);
    text_put(t, last ? "\n" : ",\n");
}

void stats_json(text *t, const char *cmd, const kmv_params *p, int attn, const kmv_stats *st,
                double t_load) {
    kmv_stats_x sx;
    kmv_params_x px;
    kmv_stats_get_x(st, &sx);
    kmv_params_get_x(p, &px);
    /* What ran, not what was asked: attention's effective scale and the
     * bandwidth of the Gaussian it lifts to (Lemma 4.1). */
    double scale = attn ? (p->attn_scale > 0.0 ? p->attn_scale : 1.0 / sqrt((double)st->dim)) : NAN;
    double sigma = attn ? kmv_attention_sigma(scale, st->dim) : p->sigma;
    text_put(t, "{\n  \"command\": \"%s\",\n  \"version\": \"%s\",\n", cmd, kmv_version_string());
    text_put(t, "  \"mode\": \"%s\",\n  \"kernel\": \"%s\",\n", stats_mode_name(st->mode),
             attn ? "attention" : "gaussian");
    text_put(t, "  \"n_keys\": %zu,\n  \"n_queries\": %zu,\n  \"dim\": %zu,\n  \"n_cols\": %zu,\n",
             st->n_keys, st->n_queries, st->dim, st->n_cols);
    text_put(t, "  \"causal\": %s,\n  \"sigma\": %.17g,\n  \"scale\": ", p->causal ? "true" : "false",
             sigma);
    text_num(t, scale);
    text_put(t, ",\n  \"eps\": %.17g,\n  \"delta\": %.17g,\n  \"seed\": %llu,\n", p->eps, p->delta,
             (unsigned long long)p->seed);
    text_put(t, "  \"threads\": %d,\n  \"kernel_evals\": %llu,\n  \"dot_precision\": \"%s\",\n",
             st->n_threads, (unsigned long long)st->kernel_evals,
             st->wide_dots ? "float64" : "float32");
    text_put(t, "  \"error_bound\": ");
    text_num(t, st->mode == KMV_MODE_EXACT ? 0.0 : st->error_bound);
    text_put(t, ",\n  \"error_measured\": ");
    text_num(t, st->error_measured >= 0.0 ? st->error_measured : NAN);
    text_put(t, ",\n  \"seconds\": %.9f,\n  \"phases\": {\n", t_load + st->seconds);
    num(t, "load", t_load, 0);
    num(t, "prepare", st->seconds_prepare, 0);
    num(t, "kernel", st->seconds_kernel, 0);
    num(t, "lsh", sx.seconds_lsh, 0);
    num(t, "heavy", sx.seconds_heavy, 0);
    num(t, "sample", sx.seconds_sample, 0);
    num(t, "tree", sx.seconds_tree, 0);
    num(t, "measure", st->seconds_measure, 1);
    text_put(t, "  }");
    if (st->mode == KMV_MODE_EXACT) { /* the approximate engine never ran */
        text_put(t, "\n}\n");
        return;
    }
    text_put(t, ",\n  \"approx\": {\n");
    text_put(t, "    \"fallback_reason\": \"%s\",\n", kmv_fallback_name(st->fallback_reason));
    if (attn)
        text_put(t, "    \"attn_budget\": \"%s\",\n",
                 px.attn_budget == KMV_BUDGET_EMPIRICAL ? "empirical" : "certified");
    text_put(t, "    \"backend\": \"%s\",\n    \"deterministic\": %s,\n",
             sx.backend == KMV_BACKEND_TREE  ? "tree"
             : sx.backend == KMV_BACKEND_LSH ? "lsh"
                                             : "none",
             sx.deterministic ? "true" : "false");
    text_put(t, "    \"nodes_bounded\": %llu,\n    \"keys_visited\": %llu,\n",
             (unsigned long long)sx.nodes_bounded, (unsigned long long)sx.keys_visited);
    num(t, "certified_tail", sx.certified_tail, 0);
    text_put(t, "    \"tree_bytes\": %zu,\n    \"verified\": %zu,\n", sx.tree_bytes, sx.verified);
    text_put(t, "    \"verify_mean\": ");
    text_num(t, sx.verified ? sx.verify_mean : NAN);
    text_put(t, ",\n    \"verify_p99\": ");
    text_num(t, sx.verified ? sx.verify_p99 : NAN);
    text_put(t, ",\n    \"verify_max\": ");
    text_num(t, sx.verified ? sx.verify_max : NAN);
    text_put(t, ",\n");
    text_put(t, "    \"keys_exact\": %zu,\n    \"keys_dropped\": %zu,\n    \"keys_sampled\": %zu,\n",
             sx.keys_exact, sx.keys_dropped, sx.keys_sampled);
    num(t, "heavy_threshold", sx.heavy_threshold, 0);
    text_put(t, "    \"lsh_tables\": %d,\n    \"lsh_hash_len\": %d,\n", sx.lsh_tables,
             sx.lsh_hash_len);
    num(t, "lsh_width", sx.lsh_width, 0);
    text_put(t,
             "    \"lsh_candidates\": %llu,\n    \"lsh_steps\": %llu,\n    \"heavy_pairs\": %llu,\n"
             "    \"sketch_evals\": %llu,\n    \"samples\": %llu,\n",
             (unsigned long long)sx.lsh_candidates, (unsigned long long)sx.lsh_steps,
             (unsigned long long)sx.heavy_pairs, (unsigned long long)sx.sketch_evals,
             (unsigned long long)sx.samples);
    text_put(t, "    \"rows_exact\": %zu,\n    \"rows_resampled\": %zu,\n", st->rows_exact,
             sx.rows_resampled);
    num(t, "cost_ratio", sx.cost_ratio, 0);
    text_put(t, "    \"error_estimate\": ");
    text_num(t, sx.error_estimate);
    text_put(t, "\n  }\n}\n");
}
