/* The stream's life cycle, appends and batch products; see kmv.h. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <limits.h>
#include <math.h>
#include <stdatomic.h>
#include <string.h>

#include "algo/lift.h"
#include "algo/stats.h"
#include "common/alloc.h"
#include "common/params.h"
#include "stream/attention_batch.h"
#include "stream/step.h"

int kmv__stream_new(const kmv__params *params, const kmv_allocator *base, size_t dim,
                    size_t n_cols, kmv_stream **out) {
    kmv_index *ix;
    *out = NULL;
    int rc = kmv__index_new(params, base, dim, &ix);
    if (rc != KMV_OK) return rc;
    const kmv_allocator *a = kmv__index_alloc(ix);
    kmv_stream *s = kmv__malloc(a, sizeof *s);
    if (s == NULL) {
        rc = kmv__meter_code(kmv__index_meter(ix), KMV_ENOMEM);
        kmv_index_free(ix);
        return rc;
    }
    memset(s, 0, sizeof *s);
    if (pthread_rwlock_init(&s->lock, NULL) != 0) {
        kmv__free(a, s);
        kmv_index_free(ix);
        return KMV_ENOMEM;
    }
    s->ix = ix;
    s->kind = &kmv__gauss_step;
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
    return kmv__stream_new(&ctx->params, &ctx->alloc, dim, n_cols, out);
}

void kmv_stream_free(kmv_stream *s) {
    if (s == NULL) return;
    kmv_index *ix = s->ix;
    const kmv_allocator *a = kmv__index_alloc(ix);
    void *arrays[] = {s->x, s->xs, s->ws, s->wid, s->q, s->kn2};
    for (size_t u = 0; u < sizeof arrays / sizeof arrays[0]; u++) kmv__free(a, arrays[u]);
    kmv__sketch_free(&s->sk, a);
    kmv__stream_tree_free(s);
    pthread_rwlock_destroy(&s->lock);
    kmv__free(a, s);
    kmv_index_free(ix);
}

int kmv__stream_grow(const kmv_allocator *a, void **p, size_t have, size_t *cap, size_t need,
                     size_t elem) {
    if (need <= *cap) return KMV_OK;
    size_t c = *cap ? *cap : 256, prod;
    while (c < need) c = c > SIZE_MAX / 2 ? need : 2 * c;
    if (!kmv__mul_size(c, elem, &prod)) return KMV_EOVERFLOW;
    void *q = kmv__malloc_array(a, c, elem);
    if (q == NULL) return KMV_ENOMEM;
    if (have) memcpy(q, *p, have * elem);
    kmv__free(a, *p);
    *p = q;
    *cap = c;
    return KMV_OK;
}

/* Room for need keys in the four per-key arrays, which share one
 * capacity. */
static int key_room(kmv_stream *s, const kmv_allocator *a, size_t have, size_t need) {
    size_t c = s->c, caps[4] = {s->cap, s->cap, s->cap, s->cap};
    int rc = kmv__stream_grow(a, (void **)&s->x, have, &caps[0], need, c * sizeof(float));
    if (rc == KMV_OK) rc = kmv__stream_grow(a, (void **)&s->xs, have, &caps[1], need, c * sizeof(float));
    if (rc == KMV_OK) rc = kmv__stream_grow(a, (void **)&s->ws, have, &caps[2], need, sizeof(double));
    if (rc == KMV_OK) rc = kmv__stream_grow(a, (void **)&s->wid, have, &caps[3], need, sizeof(double));
    /* A failure leaves the grown arrays bigger than cap says: harmless. */
    if (rc == KMV_OK) s->cap = caps[0];
    return rc;
}

int kmv__stream_append_keys(kmv_stream *s, const float *keys, const float *x, size_t count,
                            int tables) {
    if (count == 0) return KMV_OK; /* a loaded empty stream: no arrays yet */
    kmv_index *ix = s->ix;
    const kmv_allocator *a = kmv__index_alloc(ix);
    kmv__meter *meter = kmv__index_meter(ix);
    size_t n0 = kmv__index_keys(ix)->n, c = s->c;
    kmv__meter_reset(meter);
    /* Room first: after it, only the sketch and the index can fail, and
     * both are undone below. */
    int rc = key_room(s, a, n0, n0 + count);
    if (rc != KMV_OK) return kmv__meter_code(meter, rc);
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
    if (rc == KMV_OK) rc = kmv__index_append_keys(ix, keys, count, tables);
    if (rc != KMV_OK) {
        /* Take the block's keys back out of the sketch, last first. */
        for (size_t u = upto; u-- > 0;)
            if (s->wid[n0 + u] > 0.0) kmv__sketch_pop(&s->sk, s->wid[n0 + u]);
        return kmv__meter_code(meter, rc);
    }
    memcpy(s->x + n0 * c, x, count * c * sizeof(float));
    for (size_t u = 0; u < count; u++) {
        s->nx2 += s->wid[n0 + u];
        s->wmax = s->wid[n0 + u] > s->wmax ? s->wid[n0 + u] : s->wmax;
    }
    s->sketch_inserts += added;
    /* The shuffle moved keys only into the block's new positions and out
     * of the positions the block's keys now hold: mirror those. */
    const kmv__keystore *ks = kmv__index_keys(ix);
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
    size_t prod, dim = s->d - (size_t)s->attn, nc = s->c - (size_t)s->attn;
    if (count > KMV__KEYS_MAX - kmv__index_keys(s->ix)->n) return KMV_EOVERFLOW;
    if (!kmv__mul_size(count, s->d, &prod) || !kmv__mul_size(count, s->c, &prod))
        return KMV_EOVERFLOW;
    if (kmv_find_nonfinite(keys, count * dim, NULL) != KMV_OK ||
        kmv_find_nonfinite(x, count * nc, NULL) != KMV_OK)
        return KMV_ENONFINITE;
    if (s->attn) return kmv__stream_attn_append(s, keys, x, count);
    return kmv__stream_append_keys(s, keys, x, count, 1);
}

int kmv__stream_append_queries(kmv_stream *s, const float *q, size_t count) {
    kmv__meter *meter = kmv__index_meter(s->ix);
    kmv__meter_reset(meter);
    int rc = kmv__stream_grow(kmv__index_alloc(s->ix), (void **)&s->q, s->m, &s->qcap,
                              s->m + count, s->d * sizeof(float));
    if (rc != KMV_OK) return kmv__meter_code(meter, rc);
    memcpy(s->q + s->m * s->d, q, count * s->d * sizeof(float));
    s->m += count;
    return KMV_OK;
}

int kmv_stream_append_queries(kmv_stream *s, const float *q, size_t count) {
    if (s == NULL || (q == NULL && count > 0)) return KMV_EINVAL;
    if (count == 0) return KMV_OK;
    size_t prod, dim = s->d - (size_t)s->attn;
    if (count > SIZE_MAX / 64 - s->m || !kmv__mul_size(count, s->d, &prod))
        return KMV_EOVERFLOW;
    if (kmv_find_nonfinite(q, count * dim, NULL) != KMV_OK) return KMV_ENONFINITE;
    if (!s->attn) return kmv__stream_append_queries(s, q, count);
    /* An attention stream keeps its queries lifted (a last coordinate 0,
     * Lemma 4.1), as its steps take them. */
    const kmv_allocator *a = kmv__index_alloc(s->ix);
    float *ql = kmv__malloc_array(a, count, s->d * sizeof(float));
    if (ql == NULL) return kmv__meter_code(kmv__index_meter(s->ix), KMV_ENOMEM);
    for (size_t i = 0; i < count; i++) {
        memcpy(ql + i * s->d, q + i * dim, dim * sizeof(float));
        ql[i * s->d + dim] = 0.0f;
    }
    int rc = kmv__stream_append_queries(s, ql, count);
    kmv__free(a, ql);
    return rc;
}

/* kmv_stream_matvec() on an attention stream: its queries' rows. */
static int attention_rows(kmv_stream *s, const float *x_fresh, float *y, kmv__stats *S) {
    if (x_fresh != NULL) return KMV_EUNSUPPORTED; /* values come with their keys */
    if (s->m == 0) {
        kmv__stats_start(S, kmv__index_keys(s->ix)->n, 0, s->d - 1, s->c - 1, 1, 0.0);
        S->mode = KMV_MODE_EXACT;
        return KMV_OK;
    }
    if (kmv__index_keys(s->ix)->n == 0) return KMV_EEMPTY; /* a softmax over nothing */
    size_t dim = s->d - 1;
    const kmv_allocator *a = kmv__index_alloc(s->ix);
    float *qu = kmv__malloc_array(a, s->m, dim * sizeof(float));
    if (qu == NULL) return kmv__meter_code(kmv__index_meter(s->ix), KMV_ENOMEM);
    for (size_t i = 0; i < s->m; i++) memcpy(qu + i * dim, s->q + i * s->d, dim * sizeof(float));
    /* as kmv_attention: logits near float's range are refused */
    if (!kmv__logits_fit(kmv_max_sq_norm(qu, s->m, dim), s->key_bound, s->scale)) {
        kmv__free(a, qu);
        return KMV_EOVERFLOW;
    }
    int rc = kmv__attention_stream_rows(s, qu, s->m, y, S);
    kmv__free(a, qu);
    return rc;
}

int kmv_stream_matvec(kmv_stream *s, const float *x_fresh, float *y, kmv_stats *stats) {
    if (s == NULL || (y == NULL && s->m > 0)) return KMV_EINVAL;
    if (s->attn) {
        kmv__stats S;
        int rc = attention_rows(s, x_fresh, y, &S);
        if (rc == KMV_OK) kmv__stats_export(&S, stats);
        return rc;
    }
    if (x_fresh != NULL && kmv_find_nonfinite(x_fresh, kmv__index_keys(s->ix)->n * s->c, NULL) != KMV_OK)
        return KMV_ENONFINITE;
    const float *x = x_fresh != NULL ? x_fresh : s->x;
    /* The index sizes its scratch from x; an empty stream has none. */
    static const float none = 0.0f;
    if (x == NULL) x = &none;
    kmv__stats S;
    int rc = kmv__index_matvec_checked(s->ix, s->q ? s->q : &none, s->m, x, s->c, y, &S);
    if (rc == KMV_OK) kmv__stats_export(&S, stats);
    return rc;
}

int kmv_stream_decode(kmv_stream *s, const float *query, float *y, kmv_stats *stats) {
    if (s == NULL || query == NULL || y == NULL) return KMV_EINVAL;
    if (kmv_find_nonfinite(query, s->d - (size_t)s->attn, NULL) != KMV_OK) return KMV_ENONFINITE;
    kmv__stats S;
    /* the monitor: steps 0, N, 2N, ... of this stream computed exactly too */
    unsigned long k = atomic_fetch_add_explicit(&s->steps_taken, 1, memory_order_relaxed);
    int every = kmv__index_params(s->ix)->verify_every;
    unsigned flags = every > 0 && k % (unsigned long)every == 0 ? KMV__STEP_VERIFY : 0u;
    int rc = s->attn ? kmv__stream_attn_decode(s, query, y, &S, flags)
                     : kmv__stream_decode(s, query, y, &S, flags);
    if (rc == KMV_OK) kmv__stats_export(&S, stats);
    return rc;
}

int kmv_stream_get_params(const kmv_stream *s, kmv_params *out) {
    if (s == NULL || out == NULL) return KMV_EINVAL;
    kmv__params_pack(kmv__index_params(s->ix), out);
    if (s->attn) out->attn_scale = s->scale;
    return KMV_OK;
}

int kmv_stream_get_info(const kmv_stream *s, kmv_stream_info *info) {
    if (s == NULL || info == NULL) return KMV_EINVAL;
    const kmv_index *ix = s->ix;
    kmv__index_counts n = kmv__index_get_counts(ix);
    memset(info, 0, sizeof *info);
    info->n_keys = kmv__index_keys(ix)->n;
    info->n_queries = s->m;
    info->dim = s->d;
    info->n_cols = s->c;
    info->bytes = kmv_index_get_bytes(ix);
    info->keys_hashed = n.keys_hashed;
    info->table_inserts = n.table_inserts;
    info->table_builds = n.table_builds;
    info->sketch_inserts = s->sketch_inserts;
    info->lsh_tables = kmv__index_has_tables(ix) ? kmv__index_shape(ix).L : 0;
    info->tree_builds = s->tree_builds;
    info->tree_inserts = s->tree_inserts;
    info->tree_seconds_insert = s->tree_seconds_insert;
    info->tree_keys = s->tree_mode != TREE_NONE ? s->tree.n : 0;
    info->tree_bytes = s->tree_mode != TREE_NONE ? s->tree.bytes : 0;
    if (s->attn) {
        info->dim = s->d - 1;
        info->n_cols = s->c - 1;
        info->attention = 1;
        info->key_bound = s->key_bound;
        info->relifts = s->relifts;
    }
    return KMV_OK;
}
