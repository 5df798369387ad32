/* Parameters and statistics: defaults, ranges, and the conversions between
 * the public structs and the engines' flat ones (params.h). Defaults live
 * here and only here. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "common/params.h"

#include <math.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* The experimental parts ride in the public structs' opaque bytes. */
_Static_assert(sizeof(kmv_params_x) <= sizeof(((kmv_params *)0)->experimental_),
               "kmv_params_x must fit kmv_params.experimental_");
_Static_assert(sizeof(kmv_stats_x) <= sizeof(((kmv_stats *)0)->experimental_),
               "kmv_stats_x must fit kmv_stats.experimental_");

static int x_check(const kmv_params_x *x) {
    /* Written as negated ranges so that NaN fails every test. */
    if (x->force_approx != 0 && x->force_approx != 1) return KMV_EINVAL;
    if (x->attn_budget != KMV_BUDGET_CERTIFIED && x->attn_budget != KMV_BUDGET_EMPIRICAL)
        return KMV_EINVAL;
    if (!(x->alpha > 0.0 && x->alpha <= 1.0)) return KMV_EINVAL;
    if (!(x->gamma > 0.0 && x->gamma <= 1.0)) return KMV_EINVAL;
    if (x->sketch_size < 16 || x->sketch_size > 65536) return KMV_EINVAL;
    if (x->min_samples < 8 || x->min_samples > 65536) return KMV_EINVAL;
    if (x->backend < KMV_BACKEND_AUTO || x->backend > KMV_BACKEND_TREE) return KMV_EINVAL;
    if (x->verify_every < 0) return KMV_EINVAL;
    return KMV_OK;
}

void kmv_params_init(kmv_params *p) {
    memset(p, 0, sizeof *p);
    p->sigma = 1.0;
    p->eps = 0.1;
    p->delta = 0.01;
    p->seed = 1;
    kmv_params_x x = {0, KMV_BUDGET_CERTIFIED, 0.5, 0.25, 128, 64, KMV_BACKEND_AUTO, 0};
    memcpy(p->experimental_, &x, sizeof x);
}

void kmv_params_get_x(const kmv_params *p, kmv_params_x *x) { memcpy(x, p->experimental_, sizeof *x); }

int kmv_params_set_x(kmv_params *p, const kmv_params_x *x) {
    if (p == NULL || x == NULL || x_check(x) != KMV_OK) return KMV_EINVAL;
    memcpy(p->experimental_, x, sizeof *x);
    return KMV_OK;
}

int kmv_params_check(const kmv_params *p) {
    if (p == NULL) return KMV_EINVAL;
    /* 1 / (2 sigma^2) must be a finite, nonzero double. */
    if (!(p->sigma >= 1e-150 && p->sigma <= 1e150)) return KMV_EINVAL;
    if (!(isfinite(p->attn_scale) && p->attn_scale >= 0.0)) return KMV_EINVAL;
    if (!(p->eps > 0.0 && p->eps < 1.0)) return KMV_EINVAL;
    if (!(p->delta > 0.0 && p->delta < 1.0)) return KMV_EINVAL;
    if (p->n_threads < 0) return KMV_EINVAL;
    if ((p->allocator.alloc == NULL) != (p->allocator.free == NULL)) return KMV_EINVAL;
    kmv_params_x x;
    kmv_params_get_x(p, &x);
    return x_check(&x);
}

void kmv__params_unpack(const kmv_params *p, kmv__params *out) {
    kmv_params_x x;
    kmv_params_get_x(p, &x);
    *out = (kmv__params){p->sigma,       p->attn_scale, p->causal,     p->exact,
                         p->eps,         p->delta,      p->seed,       p->measure_error,
                         p->n_threads,   p->allocator,  p->max_bytes,  p->progress,
                         p->progress_opaque, x.force_approx, (kmv_attn_budget)x.attn_budget,
                         x.alpha,        x.gamma,       x.sketch_size, x.min_samples,
                         (kmv_backend)x.backend, x.verify_every};
}

void kmv__params_pack(const kmv__params *p, kmv_params *out) {
    kmv_params_init(out);
    out->sigma = p->sigma;
    out->attn_scale = p->attn_scale;
    out->causal = p->causal;
    out->exact = p->exact;
    out->eps = p->eps;
    out->delta = p->delta;
    out->seed = p->seed;
    out->measure_error = p->measure_error;
    out->n_threads = p->n_threads;
    out->allocator = p->allocator;
    out->max_bytes = p->max_bytes;
    out->progress = p->progress;
    out->progress_opaque = p->progress_opaque;
    kmv_params_x x = {p->force_approx, (int)p->attn_budget, p->alpha,
                      p->gamma,        p->sketch_size,      p->min_samples,
                      (int)p->backend, p->verify_every};
    memcpy(out->experimental_, &x, sizeof x);
}

int kmv__params_check(const kmv__params *p) {
    kmv_params pub;
    kmv__params_pack(p, &pub);
    return kmv_params_check(&pub);
}

void kmv_stats_get_x(const kmv_stats *st, kmv_stats_x *x) { memcpy(x, st->experimental_, sizeof *x); }

void kmv__stats_export(const kmv__stats *in, kmv_stats *out) {
    if (out == NULL) return;
    memset(out, 0, sizeof *out);
    out->mode = (int)in->mode;
    out->fallback_reason = (int)in->fallback_reason;
    out->n_keys = in->n_keys;
    out->n_queries = in->n_queries;
    out->dim = in->dim;
    out->n_cols = in->n_cols;
    out->n_threads = in->n_threads;
    out->kernel_evals = in->kernel_evals;
    out->wide_dots = in->wide_dots;
    out->rows_exact = in->rows_exact;
    out->error_bound = in->error_bound;
    out->error_measured = in->error_measured;
    out->seconds = in->seconds;
    out->seconds_prepare = in->seconds_prepare;
    out->seconds_kernel = in->seconds_kernel;
    out->seconds_measure = in->seconds_measure;
    kmv_stats_x x = {in->keys_exact,     in->keys_dropped,   in->keys_sampled,
                     in->heavy_threshold, in->lsh_tables,    in->lsh_hash_len,
                     in->lsh_width,      in->lsh_candidates, in->lsh_steps,
                     in->heavy_pairs,    in->sketch_evals,   in->samples,
                     in->rows_resampled, in->cost_ratio,     in->error_estimate,
                     in->seconds_lsh,    in->seconds_heavy,  in->seconds_sample,
                     (int)in->backend,   in->deterministic,  in->nodes_bounded,
                     in->keys_visited,   in->certified_tail, in->tree_bytes,
                     in->seconds_tree,   in->verified,       in->verify_mean,
                     in->verify_p99,     in->verify_max};
    memcpy(out->experimental_, &x, sizeof x);
}

int kmv__threads(const kmv__params *p) {
    if (p->n_threads > 0) return p->n_threads;
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}
