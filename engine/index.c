/* The index: its life cycle, appends, the heavy search's tables, and the
 * public kmv_index_* calls; ApproxKMV's product over it is batch.c. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <limits.h>
#include <math.h>
#include <stdatomic.h>
#include <string.h>

#include "common/alloc.h"
#include "common/params.h"
#include "common/timer.h"
#include "engine/batch.h"
#include "engine/index_layout.h"

/* Keys copied out of the random order per block when filling tables. */
#define BUILD_BLOCK 8192

int kmv__index_new(const kmv__params *p, const kmv_allocator *base, size_t dim, kmv_index **out) {
    kmv_index *ix = kmv__malloc(base, sizeof *ix);
    *out = NULL;
    if (ix == NULL) return KMV_ENOMEM;
    memset(ix, 0, sizeof *ix);
    ix->params = *p;
    ix->force_approx = p->force_approx;
    kmv__meter_init(&ix->meter, base, p->max_bytes);
    ix->alloc = kmv__meter_allocator(&ix->meter);
    ix->d = dim;
    kmv__keystore_init(&ix->ks, dim, p->seed);
    *out = ix;
    return KMV_OK;
}

int kmv_index_create(const kmv_ctx *ctx, size_t dim, kmv_index **out) {
    if (out == NULL) return KMV_EINVAL;
    *out = NULL;
    if (ctx == NULL || dim == 0) return KMV_EINVAL;
    if (dim > INT_MAX / 64) return KMV_EOVERFLOW;
    return kmv__index_new(&ctx->params, &ctx->alloc, dim, out);
}

void kmv_index_free(kmv_index *ix) {
    if (ix == NULL) return;
    kmv__keystore_free(&ix->ks, &ix->alloc);
    kmv__index_drop_tables(ix);
    /* The index itself came from the caller's allocator, not the meter. */
    kmv_allocator base = ix->meter.base;
    kmv__free(&base, ix);
}

const kmv__keystore *kmv__index_keys(const kmv_index *ix) { return &ix->ks; }
kmv__keystore *kmv__index_keys_mut(kmv_index *ix) { return &ix->ks; }
const kmv__params *kmv__index_params(const kmv_index *ix) { return &ix->params; }
const kmv_allocator *kmv__index_alloc(const kmv_index *ix) { return &ix->alloc; }
kmv__meter *kmv__index_meter(kmv_index *ix) { return &ix->meter; }
int kmv__index_force_approx(const kmv_index *ix) { return ix->force_approx; }
void kmv__index_set_force_approx(kmv_index *ix, int on) { ix->force_approx = on; }

size_t kmv_index_get_size(const kmv_index *ix) { return ix ? ix->ks.n : 0; }
size_t kmv_index_get_bytes(const kmv_index *ix) { return ix ? atomic_load(&ix->meter.live) : 0; }
size_t kmv_index_get_peak_bytes(const kmv_index *ix) { return ix ? atomic_load(&ix->meter.peak) : 0; }

int kmv_index_append(kmv_index *ix, const float *keys, size_t n_keys) {
    if (ix == NULL || (keys == NULL && n_keys > 0)) return KMV_EINVAL;
    if (n_keys == 0) return KMV_OK;
    if (n_keys > KMV__KEYS_MAX - ix->ks.n) return KMV_EOVERFLOW;
    if (kmv_find_nonfinite(keys, n_keys * ix->d, NULL) != KMV_OK) return KMV_ENONFINITE;
    return kmv__index_append_keys(ix, keys, n_keys, 1);
}

int kmv__index_append_keys(kmv_index *ix, const float *keys, size_t n_keys, int tables) {
    kmv__meter_reset(&ix->meter);
    /* Room in the store first, then the tables (whose failure leaves them
     * unchanged), then the store's part, which cannot fail once it has
     * room: a refused append changes no answer. */
    int rc = kmv__keystore_reserve(&ix->ks, &ix->alloc, n_keys);
    tables = tables && ix->lsh_built;
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
        rc = kmv__batch_fallback(ix, q, m, x, c, y, KMV_FALLBACK_MEMORY, stats);
    } else {
        rc = kmv__batch_matvec(ix, q, m, x, c, y, stats);
        /* A plan past the cap leaves y untouched; the exact engine needs
         * only O((m + n) d) and may still fit once the tables (a cache) are
         * dropped. Until keys are added, later products skip the plan. */
        if (rc == KMV_ENOMEM && atomic_load(&ix->meter.refused)) {
            kmv__index_drop_tables(ix);
            ix->refused_n = ix->ks.n + 1;
            kmv__meter_reset(&ix->meter);
            rc = kmv__batch_fallback(ix, q, m, x, c, y, KMV_FALLBACK_MEMORY, stats);
        }
    }
    rc = kmv__meter_code(&ix->meter, rc);
    /* Finite inputs can still sum past float's range (see kmv.h). */
    if (rc == KMV_OK && kmv_find_nonfinite(y, m * c, NULL) != KMV_OK) return KMV_EOVERFLOW;
    return rc;
}

/* ----------------------------------------------------------------- tables */

/* (Re)build tables of the given shape from every stored key, in id order,
 * so that the same keys, shape and seed give the same tables however the
 * keys arrived. KMV_OK (tables held) or KMV_ENOMEM (none left). */
static int fill_tables(kmv_index *ix, kmv__lsh_shape shape) {
    size_t n = ix->ks.n, d = ix->d;
    kmv__index_drop_tables(ix);
    int rc = kmv__lsh_init(&ix->lsh, &ix->alloc, d, shape, ix->params.seed);
    if (rc != KMV_OK) return rc;
    /* Keys go in by id, in blocks gathered from the random order. */
    float *blk = kmv__malloc_array(&ix->alloc, n < BUILD_BLOCK ? n : BUILD_BLOCK, d * sizeof(float));
    if (blk == NULL && n > 0) rc = KMV_ENOMEM;
    for (size_t j0 = 0; rc == KMV_OK && j0 < n; j0 += BUILD_BLOCK) {
        size_t bj = n - j0 < BUILD_BLOCK ? n - j0 : BUILD_BLOCK;
        for (size_t u = 0; u < bj; u++)
            memcpy(blk + u * d, kmv__keystore_row(&ix->ks, j0 + u), d * sizeof(float));
        rc = kmv__lsh_append(&ix->lsh, &ix->alloc, blk, bj, kmv__threads(&ix->params));
    }
    kmv__free(&ix->alloc, blk);
    if (rc != KMV_OK) {
        kmv__lsh_free(&ix->lsh, &ix->alloc);
        return rc;
    }
    ix->lsh_built = 1;
    return KMV_OK;
}

int kmv__index_plan(kmv_index *ix, const kmv__plan_req *rq, int *refused) {
    size_t n = ix->ks.n;
    *refused = 0;
    if (ix->lsh_built && rq->kappa >= 0.5 * ix->kappa && n <= 2 * ix->lsh_n) return KMV_OK;
    double r_near = ix->params.sigma * sqrt(2.0 * log(1.0 / rq->kappa));
    kmv__lsh_plan plan;
    int found;
    int rc = kmv__lsh_choose(&ix->alloc, &ix->ks, rq->q, rq->m, r_near, rq->miss,
                             rq->keys_per_query, ix->params.seed, &plan, &found);
    if (rc != KMV_OK) return rc;
    if (!found || plan.cost_per_query * (double)rq->m > rq->cap) {
        *refused = 1;
        return KMV_OK;
    }
    rc = fill_tables(ix, plan.shape);
    if (rc != KMV_OK) return rc;
    ix->table_builds++;
    ix->keys_hashed += n;
    ix->table_inserts += (uint64_t)n * (uint64_t)plan.shape.L;
    ix->lsh_n = n;
    ix->kappa = rq->kappa;
    ix->plan = plan;
    return KMV_OK;
}

int kmv__index_has_tables(const kmv_index *ix) { return ix->lsh_built; }
kmv__heavy_src kmv__index_heavy(const kmv_index *ix) { return kmv__heavy_lsh(&ix->lsh); }
double kmv__index_kappa(const kmv_index *ix) { return ix->kappa; }
size_t kmv__index_planned_keys(const kmv_index *ix) { return ix->lsh_n; }
kmv__lsh_shape kmv__index_shape(const kmv_index *ix) { return ix->lsh.shape; }

void kmv__index_drop_tables(kmv_index *ix) {
    if (ix->tree_built) kmv__tree_free(&ix->tree, &ix->alloc);
    ix->tree_built = 0;
    if (!ix->lsh_built) return;
    kmv__lsh_free(&ix->lsh, &ix->alloc);
    ix->lsh_built = 0;
}

int kmv__index_has_tree(const kmv_index *ix) { return ix->tree_built && ix->tree.n == ix->ks.n; }

int kmv__index_tree(kmv_index *ix, const kmv__tree **out, double *seconds) {
    *seconds = 0.0;
    if (!kmv__index_has_tree(ix)) {
        double t0 = kmv__now();
        if (ix->tree_built) kmv__tree_free(&ix->tree, &ix->alloc);
        ix->tree_built = 0;
        int rc = kmv__tree_build(&ix->tree, &ix->alloc, &ix->ks, ix->ks.n, ix->params.seed,
                                 kmv__threads(&ix->params));
        if (rc != KMV_OK) return rc;
        ix->tree_built = 1;
        ix->tree_builds++;
        *seconds = kmv__now() - t0;
    }
    *out = &ix->tree;
    return KMV_OK;
}

kmv__index_counts kmv__index_get_counts(const kmv_index *ix) {
    return (kmv__index_counts){ix->keys_hashed, ix->table_inserts, ix->table_builds};
}

void kmv__index_get_state(const kmv_index *ix, kmv__index_state *st) {
    memset(st, 0, sizeof *st);
    st->shuffle_rng = ix->ks.rng;
    st->lsh_built = ix->lsh_built;
    if (ix->lsh_built) {
        st->plan = ix->plan;
        st->plan.shape = ix->lsh.shape;
        st->kappa = ix->kappa;
        st->lsh_n = ix->lsh_n;
    }
    st->refused_n = ix->refused_n;
    st->counts = kmv__index_get_counts(ix);
}

int kmv__index_restore(kmv_index *ix, const float *rows, const uint32_t *id_at,
                       const kmv__index_state *st) {
    kmv__keystore_restore(&ix->ks, rows, id_at, st->shuffle_rng);
    if (st->lsh_built) {
        /* The tables are a function of their shape, the seed and the keys
         * in id order: rebuilt, they are the saved ones bit for bit. */
        int rc = fill_tables(ix, st->plan.shape);
        if (rc != KMV_OK) return rc;
        ix->lsh_n = st->lsh_n;
        ix->kappa = st->kappa;
        ix->plan = st->plan;
    }
    ix->refused_n = st->refused_n;
    ix->keys_hashed = st->counts.keys_hashed;
    ix->table_inserts = st->counts.table_inserts;
    ix->table_builds = st->counts.table_builds;
    return KMV_OK;
}
