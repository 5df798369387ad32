/* Parameters and the context handle: defaults live here and only here. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <math.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kmv/alloc.h"
#include "kmv/context.h"

void kmv_params_init(kmv_params *p) {
    memset(p, 0, sizeof *p);
    p->sigma = 1.0;
    p->attn_scale = 0.0;
    p->causal = 0;
    p->exact = 0;
    p->attn_budget = KMV_BUDGET_CERTIFIED;
    p->eps = 0.1;
    p->delta = 0.01;
    p->seed = 1;
    p->alpha = 0.5;
    p->gamma = 0.25;
    p->sketch_size = 128;
    p->min_samples = 64;
    p->measure_error = 0;
    p->n_threads = 0;
}

int kmv_params_check(const kmv_params *p) {
    if (p == NULL) return KMV_EINVAL;
    /* Written as negated ranges so that NaN fails every test. */
    /* 1 / (2 sigma^2) must be a finite, nonzero double. */
    if (!(p->sigma >= 1e-150 && p->sigma <= 1e150)) return KMV_EINVAL;
    if (!(isfinite(p->attn_scale) && p->attn_scale >= 0.0)) return KMV_EINVAL;
    if (!(p->eps > 0.0 && p->eps < 1.0)) return KMV_EINVAL;
    if (!(p->delta > 0.0 && p->delta < 1.0)) return KMV_EINVAL;
    if (!(p->alpha > 0.0 && p->alpha <= 1.0)) return KMV_EINVAL;
    if (!(p->gamma > 0.0 && p->gamma <= 1.0)) return KMV_EINVAL;
    if (p->sketch_size < 16 || p->sketch_size > 65536) return KMV_EINVAL;
    if (p->min_samples < 8 || p->min_samples > 65536) return KMV_EINVAL;
    if (p->n_threads < 0) return KMV_EINVAL;
    if (p->force_approx != 0 && p->force_approx != 1) return KMV_EINVAL;
    if (p->attn_budget != KMV_BUDGET_CERTIFIED && p->attn_budget != KMV_BUDGET_EMPIRICAL)
        return KMV_EINVAL;
    if ((p->allocator.alloc == NULL) != (p->allocator.free == NULL)) return KMV_EINVAL;
    return KMV_OK;
}

int kmv_ctx_create(const kmv_params *params, kmv_ctx **out) {
    kmv_params defaults;
    kmv_allocator a;
    kmv_ctx *ctx;
    int rc;

    if (out == NULL) return KMV_EINVAL;
    *out = NULL;
    if (params == NULL) {
        kmv_params_init(&defaults);
        params = &defaults;
    }
    if ((rc = kmv_params_check(params)) != KMV_OK) return rc;
    if ((rc = kmv__allocator_resolve(&params->allocator, &a)) != KMV_OK) return rc;
    ctx = kmv__malloc(&a, sizeof *ctx);
    if (ctx == NULL) return KMV_ENOMEM;
    ctx->params = *params;
    ctx->alloc = a;
    *out = ctx;
    return KMV_OK;
}

void kmv_ctx_free(kmv_ctx *ctx) {
    if (ctx == NULL) return;
    /* Copy first: the allocator lives inside the block being freed. */
    kmv_allocator a = ctx->alloc;
    kmv__free(&a, ctx);
}

const kmv_params *kmv_ctx_params(const kmv_ctx *ctx) { return ctx ? &ctx->params : NULL; }

int kmv__threads(const kmv_params *p) {
    if (p->n_threads > 0) return p->n_threads;
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}
