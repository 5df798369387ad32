/* The stream's life cycle, appends and batch products; see kmv.h. */
#include <limits.h>
#include <math.h>
#include <stdatomic.h>
#include <string.h>

#include "kmv/alloc.h"
#include "kmv/context.h"
#include "stream/stream.h"

int kmv__stream_new(const kmv_ctx *ctx, const kmv_params *params, size_t dim, size_t n_cols,
                    kmv_stream **out) {
    kmv_index *ix;
    int rc = kmv_index_create(ctx, dim, &ix);
    if (rc != KMV_OK) return rc;
    ix->params = *params;
    kmv__keystore_init(&ix->ks, dim, params->seed);
    kmv_stream *s = kmv__malloc(&ix->alloc, sizeof *s);
    if (s == NULL) {
        rc = kmv__meter_code(&ix->meter, KMV_ENOMEM);
        kmv_index_free(ix);
        return rc;
    }
    memset(s, 0, sizeof *s);
    if (pthread_rwlock_init(&s->lock, NULL) != 0) {
        kmv__free(&ix->alloc, s);
        kmv_index_free(ix);
        return KMV_ENOMEM;
    }
    s->ix = ix;
    s->d = dim;
    s->c = n_cols;
    kmv__sketch_init(&s->sk, params->eps);
    *out = s;
    return KMV_OK;
}

int kmv_stream_create(const kmv_ctx *ctx, size_t dim, size_t n_cols, kmv_stream **out) {
    if (out == NULL) return KMV_EINVAL;
    *out = NULL;
    if (ctx == NULL || dim == 0 || n_cols == 0) return KMV_EINVAL;
    if (n_cols > INT_MAX || dim > INT_MAX / 64) return KMV_EOVERFLOW;
    return kmv__stream_new(ctx, &ctx->params, dim, n_cols, out);
}

void kmv_stream_free(kmv_stream *s) {
    if (s == NULL) return;
    kmv_index *ix = s->ix;
    const kmv_allocator *a = &ix->alloc;
    kmv__free(a, s->x);
    kmv__free(a, s->xs);
    kmv__free(a, s->ws);
    kmv__free(a, s->wid);
    kmv__free(a, s->q);
    kmv__sketch_free(&s->sk, a);
    pthread_rwlock_destroy(&s->lock);
    kmv__free(a, s);
    kmv_index_free(ix);
}

/* Grow an array of elem-byte rows to at least need rows (doubling). */
static int grow(const kmv_allocator *a, void **p, size_t have, size_t cap, size_t need,
                size_t elem) {
    if (need <= cap) return KMV_OK;
    void *q = kmv__malloc_array(a, need, elem);
    if (q == NULL) return KMV_ENOMEM;
    if (have) memcpy(q, *p, have * elem);
    kmv__free(a, *p);
    *p = q;
    return KMV_OK;
}

static size_t next_cap(size_t cap, size_t need) {
    size_t c = cap ? cap : 256;
    while (c < need) c = c > SIZE_MAX / 2 ? need : 2 * c;
    return c;
}

int kmv__stream_append_keys(kmv_stream *s, const float *keys, const float *x, size_t count) {
    if (count == 0) return KMV_OK; /* a loaded empty stream: no arrays yet */
    kmv_index *ix = s->ix;
    const kmv_allocator *a = &ix->alloc;
    size_t n0 = ix->ks.n, c = s->c;
    kmv__meter_reset(&ix->meter);
    /* Room first: after it, only the sketch and the index can fail, and
     * both are undone below. */
    size_t cap = n0 + count > s->cap ? next_cap(s->cap, n0 + count) : s->cap;
    int rc = KMV_OK;
    if (cap > s->cap) {
        size_t prod;
        if (!kmv__mul_size(cap, c * sizeof(float), &prod)) return KMV_EOVERFLOW;
        if ((rc = grow(a, (void **)&s->x, n0, s->cap, cap, c * sizeof(float))) != KMV_OK ||
            (rc = grow(a, (void **)&s->xs, n0, s->cap, cap, c * sizeof(float))) != KMV_OK ||
            (rc = grow(a, (void **)&s->ws, n0, s->cap, cap, sizeof(double))) != KMV_OK ||
            (rc = grow(a, (void **)&s->wid, n0, s->cap, cap, sizeof(double))) != KMV_OK)
            return kmv__meter_code(&ix->meter, rc);
        s->cap = cap;
    }
    /* Weights and the sketch, in id order. */
    size_t upto = 0, added = 0; /* keys through the sketch, and added */
    for (size_t u = 0; u < count; u++) {
        double w = 0.0;
        for (size_t col = 0; col < c; col++) w += (double)x[u * c + col] * x[u * c + col];
        s->wid[n0 + u] = w;
        if (w > 0.0) {
            rc = kmv__sketch_add(&s->sk, a, (uint32_t)(n0 + u), w);
            if (rc != KMV_OK) break;
            added++;
        }
        upto = u + 1;
    }
    if (rc == KMV_OK) rc = kmv__index_append_checked(ix, keys, count);
    if (rc != KMV_OK) {
        /* Take the block's keys back out of the sketch, last first. */
        for (size_t u = upto; u-- > 0;)
            if (s->wid[n0 + u] > 0.0) kmv__sketch_pop(&s->sk, s->wid[n0 + u]);
        return kmv__meter_code(&ix->meter, rc);
    }
    memcpy(s->x + n0 * c, x, count * c * sizeof(float));
    for (size_t u = 0; u < count; u++) s->nx2 += s->wid[n0 + u];
    s->sketch_inserts += added;
    /* The shuffle moved keys only into the block's new positions and out
     * of the positions the block's keys now hold: mirror those. */
    const kmv__keystore *ks = &ix->ks;
    for (size_t u = 0; u < 2 * count; u++) {
        size_t p = u < count ? ks->pos_of[n0 + u] : n0 + (u - count);
        size_t id = ks->id_at[p];
        memcpy(s->xs + p * c, s->x + id * c, c * sizeof(float));
        s->ws[p] = s->wid[id];
    }
    return KMV_OK;
}

int kmv_stream_append_keys(kmv_stream *s, const float *keys, const float *x, size_t count) {
    if (s == NULL || ((keys == NULL || x == NULL) && count > 0)) return KMV_EINVAL;
    if (count == 0) return KMV_OK;
    size_t prod;
    if (count > KMV__KEYS_MAX - s->ix->ks.n) return KMV_EOVERFLOW;
    if (!kmv__mul_size(count, s->d, &prod) || !kmv__mul_size(count, s->c, &prod))
        return KMV_EOVERFLOW;
    if (kmv_find_nonfinite(keys, count * s->d, NULL) != KMV_OK ||
        kmv_find_nonfinite(x, count * s->c, NULL) != KMV_OK)
        return KMV_ENONFINITE;
    return kmv__stream_append_keys(s, keys, x, count);
}

int kmv__stream_append_queries(kmv_stream *s, const float *q, size_t count) {
    kmv_index *ix = s->ix;
    kmv__meter_reset(&ix->meter);
    if (s->m + count > s->qcap) {
        size_t cap = next_cap(s->qcap, s->m + count), prod;
        if (!kmv__mul_size(cap, s->d * sizeof(float), &prod)) return KMV_EOVERFLOW;
        int rc = grow(&ix->alloc, (void **)&s->q, s->m, s->qcap, cap, s->d * sizeof(float));
        if (rc != KMV_OK) return kmv__meter_code(&ix->meter, rc);
        s->qcap = cap;
    }
    memcpy(s->q + s->m * s->d, q, count * s->d * sizeof(float));
    s->m += count;
    return KMV_OK;
}

int kmv_stream_append_queries(kmv_stream *s, const float *q, size_t count) {
    if (s == NULL || (q == NULL && count > 0)) return KMV_EINVAL;
    if (count == 0) return KMV_OK;
    size_t prod;
    if (count > SIZE_MAX / 64 - s->m || !kmv__mul_size(count, s->d, &prod))
        return KMV_EOVERFLOW;
    if (kmv_find_nonfinite(q, count * s->d, NULL) != KMV_OK) return KMV_ENONFINITE;
    return kmv__stream_append_queries(s, q, count);
}

int kmv_stream_matvec(kmv_stream *s, const float *x_fresh, float *y, kmv_stats *stats) {
    if (s == NULL || (y == NULL && s->m > 0)) return KMV_EINVAL;
    if (x_fresh != NULL && kmv_find_nonfinite(x_fresh, s->ix->ks.n * s->c, NULL) != KMV_OK)
        return KMV_ENONFINITE;
    const float *x = x_fresh != NULL ? x_fresh : s->x;
    /* The index sizes its scratch from x; an empty stream has none. */
    static const float none = 0.0f;
    if (x == NULL) x = &none;
    return kmv__index_matvec_checked(s->ix, s->q ? s->q : &none, s->m, x, s->c, y, stats);
}

int kmv_stream_decode(kmv_stream *s, const float *query, float *y, kmv_stats *stats) {
    if (s == NULL || query == NULL || y == NULL) return KMV_EINVAL;
    if (kmv_find_nonfinite(query, s->d, NULL) != KMV_OK) return KMV_ENONFINITE;
    return kmv__stream_decode(s, query, y, stats);
}

int kmv_stream_info_get(const kmv_stream *s, kmv_stream_info *info) {
    if (s == NULL || info == NULL) return KMV_EINVAL;
    const kmv_index *ix = s->ix;
    memset(info, 0, sizeof *info);
    info->n_keys = ix->ks.n;
    info->n_queries = s->m;
    info->dim = s->d;
    info->n_cols = s->c;
    info->bytes = atomic_load(&ix->meter.live);
    info->keys_hashed = ix->keys_hashed;
    info->table_inserts = ix->table_inserts;
    info->table_builds = ix->table_builds;
    info->sketch_inserts = s->sketch_inserts;
    info->lsh_tables = ix->lsh_built ? ix->lsh.shape.L : 0;
    return KMV_OK;
}
