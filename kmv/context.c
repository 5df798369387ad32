/* The context handle: validated params and the resolved allocator. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <string.h>

#include "common/alloc.h"
#include "common/params.h"

int kmv_ctx_create(const kmv_params *params, kmv_ctx **out) {
    kmv_params defaults;
    kmv_allocator a;
    int rc;

    if (out == NULL) return KMV_EINVAL;
    *out = NULL;
    if (params == NULL) {
        kmv_params_init(&defaults);
        params = &defaults;
    }
    if ((rc = kmv_params_check(params)) != KMV_OK) return rc;
    if ((rc = kmv__allocator_resolve(&params->allocator, &a)) != KMV_OK) return rc;
    kmv_ctx *ctx = kmv__malloc(&a, sizeof *ctx);
    if (ctx == NULL) return KMV_ENOMEM;
    kmv__params_unpack(params, &ctx->params);
    ctx->pub = *params;
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

const kmv_params *kmv_ctx_get_params(const kmv_ctx *ctx) { return ctx ? &ctx->pub : NULL; }
