/* The index's life cycle and argument checks; the product is approx.c. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <limits.h>
#include <stdatomic.h>
#include <string.h>

#include "common/alloc.h"
#include "common/params.h"
#include "engine/index.h"

int kmv_index_create(const kmv_ctx *ctx, size_t dim, kmv_index **out) {
    if (out == NULL) return KMV_EINVAL;
    *out = NULL;
    if (ctx == NULL || dim == 0) return KMV_EINVAL;
    if (dim > INT_MAX / 64) return KMV_EOVERFLOW;
    kmv_index *ix = kmv__malloc(&ctx->alloc, sizeof *ix);
    if (ix == NULL) return KMV_ENOMEM;
    memset(ix, 0, sizeof *ix);
    ix->params = ctx->params;
    ix->force_approx = ctx->params.force_approx;
    kmv__meter_init(&ix->meter, &ctx->alloc, ctx->params.max_bytes);
    ix->alloc = kmv__meter_allocator(&ix->meter);
    ix->d = dim;
    kmv__keystore_init(&ix->ks, dim, ctx->params.seed);
    *out = ix;
    return KMV_OK;
}

void kmv_index_free(kmv_index *ix) {
    if (ix == NULL) return;
    kmv__keystore_free(&ix->ks, &ix->alloc);
    if (ix->lsh_built) kmv__lsh_free(&ix->lsh, &ix->alloc);
    /* The index itself came from the caller's allocator, not the meter. */
    kmv_allocator base = ix->meter.base;
    kmv__free(&base, ix);
}

size_t kmv_index_get_size(const kmv_index *ix) { return ix ? ix->ks.n : 0; }

size_t kmv_index_get_bytes(const kmv_index *ix) { return ix ? atomic_load(&ix->meter.live) : 0; }

size_t kmv_index_get_peak_bytes(const kmv_index *ix) {
    return ix ? atomic_load(&ix->meter.peak) : 0;
}

int kmv_index_append(kmv_index *ix, const float *keys, size_t n_keys) {
    if (ix == NULL || (keys == NULL && n_keys > 0)) return KMV_EINVAL;
    if (n_keys == 0) return KMV_OK;
    if (n_keys > KMV__KEYS_MAX - ix->ks.n) return KMV_EOVERFLOW;
    if (kmv_find_nonfinite(keys, n_keys * ix->d, NULL) != KMV_OK) return KMV_ENONFINITE;
    return kmv__index_append_checked(ix, keys, n_keys);
}

int kmv__index_append_checked(kmv_index *ix, const float *keys, size_t n_keys) {
    kmv__meter_reset(&ix->meter);
    /* Room in the store first, then the tables (whose failure leaves them
     * unchanged), then the store's part, which cannot fail once it has
     * room: a refused append changes no answer. */
    int rc = kmv__keystore_reserve(&ix->ks, &ix->alloc, n_keys);
    int tables = ix->lsh_built && !ix->skip_tables;
    if (rc == KMV_OK && tables)
        rc = kmv__lsh_append(&ix->lsh, &ix->alloc, keys, n_keys, kmv__threads(&ix->params));
    if (rc == KMV_OK) rc = kmv__keystore_append(&ix->ks, &ix->alloc, keys, n_keys);
    if (rc == KMV_OK && tables) {
        ix->keys_hashed += n_keys;
        ix->table_inserts += (uint64_t)n_keys * (uint64_t)ix->lsh.shape.L;
    }
    return kmv__meter_code(&ix->meter, rc);
}

int kmv_index_matvec(kmv_index *ix, const float *q, size_t m, const float *x, size_t c,
                     float *y, kmv_stats *stats) {
    if (ix == NULL) return KMV_EINVAL;
    size_t n = ix->ks.n, d = ix->d, prod;
    if (!kmv__mul_size(m, d, &prod) || !kmv__mul_size(n, c, &prod) ||
        !kmv__mul_size(m, c, &prod) || c > INT_MAX || m > SIZE_MAX / 64)
        return KMV_EOVERFLOW;
    if ((m > 0 && q == NULL) || (n > 0 && c > 0 && x == NULL) || (m > 0 && c > 0 && y == NULL))
        return KMV_EINVAL;
    if (kmv_find_nonfinite(q, m * d, NULL) != KMV_OK ||
        kmv_find_nonfinite(x, n * c, NULL) != KMV_OK)
        return KMV_ENONFINITE;
    kmv__stats S;
    int rc = kmv__index_matvec_checked(ix, q, m, x, c, y, &S);
    if (rc == KMV_OK) kmv__stats_export(&S, stats);
    return rc;
}

int kmv__index_matvec_checked(kmv_index *ix, const float *q, size_t m, const float *x, size_t c,
                              float *y, kmv__stats *stats) {
    kmv__meter_reset(&ix->meter);
    int rc;
    if (ix->refused_n == ix->ks.n + 1) {
        rc = kmv__approx_fallback(ix, q, m, x, c, y, KMV_FALLBACK_MEMORY, stats);
    } else {
        rc = kmv__approx_matvec(ix, q, m, x, c, y, stats);
        /* A plan past the cap leaves y untouched; the exact engine needs
         * only O((m + n) d) and may still fit once the tables (a cache) are
         * dropped. Until keys are added, later products skip the plan. */
        if (rc == KMV_ENOMEM && atomic_load(&ix->meter.refused)) {
            if (ix->lsh_built) {
                kmv__lsh_free(&ix->lsh, &ix->alloc);
                ix->lsh_built = 0;
            }
            ix->refused_n = ix->ks.n + 1;
            kmv__meter_reset(&ix->meter);
            rc = kmv__approx_fallback(ix, q, m, x, c, y, KMV_FALLBACK_MEMORY, stats);
        }
    }
    rc = kmv__meter_code(&ix->meter, rc);
    /* Finite inputs can still sum past float's range (see kmv.h). */
    if (rc == KMV_OK && kmv_find_nonfinite(y, m * c, NULL) != KMV_OK) return KMV_EOVERFLOW;
    return rc;
}
