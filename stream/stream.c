/* The stream's life cycle, appends and batch products; see kmv.h. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <limits.h>
#include <math.h>
#include <stdatomic.h>
#include <string.h>

#include "common/alloc.h"
#include "common/params.h"
#include "algo/light.h"
#include "stream/stream.h"

int kmv__stream_new(const kmv_ctx *ctx, const kmv__params *params, size_t dim, size_t n_cols,
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

int kmv__stream_attention_new(const kmv_ctx *ctx, const kmv__params *params, size_t dim,
                              size_t n_cols, kmv_stream **out) {
    kmv__params p = *params;
    double scale = p.attn_scale > 0.0 ? p.attn_scale : 1.0 / sqrt((double)dim);
    p.sigma = kmv_attention_sigma(scale, dim);
    p.causal = 0; /* a step sees every key so far */
    int rc = kmv__stream_new(ctx, &p, dim + 1, n_cols + 1, out);
    if (rc != KMV_OK) return rc;
    (*out)->attn = 1;
    (*out)->scale = scale;
    (*out)->z_sum = kmv__normal_upper(0.25 * p.delta / KMV__ATTN_ROUNDS);
    (*out)->z_err = kmv__normal_upper(0.125 * p.delta / KMV__ATTN_ROUNDS);
    return KMV_OK;
}

int kmv_stream_attention_create(const kmv_ctx *ctx, size_t dim, size_t n_cols, kmv_stream **out) {
    if (out == NULL) return KMV_EINVAL;
    *out = NULL;
    if (ctx == NULL || dim == 0 || n_cols == 0) return KMV_EINVAL;
    if (n_cols >= INT_MAX || dim >= INT_MAX / 64) return KMV_EOVERFLOW;
    return kmv__stream_attention_new(ctx, &ctx->params, dim, n_cols, out);
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
    kmv__free(a, s->kn2);
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
    for (size_t u = 0; u < count; u++) {
        s->nx2 += s->wid[n0 + u];
        s->wmax = s->wid[n0 + u] > s->wmax ? s->wid[n0 + u] : s->wmax;
    }
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
    size_t prod, dim = s->d - (size_t)s->attn, nc = s->c - (size_t)s->attn;
    if (count > KMV__KEYS_MAX - s->ix->ks.n) return KMV_EOVERFLOW;
    if (!kmv__mul_size(count, s->d, &prod) || !kmv__mul_size(count, s->c, &prod))
        return KMV_EOVERFLOW;
    if (kmv_find_nonfinite(keys, count * dim, NULL) != KMV_OK ||
        kmv_find_nonfinite(x, count * nc, NULL) != KMV_OK)
        return KMV_ENONFINITE;
    if (s->attn) return kmv__stream_attn_append(s, keys, x, count);
    return kmv__stream_append_keys(s, keys, x, count);
}

/* The keys held, lifted again under a raised bound; their tables and
 * draws described the old geometry. Allocates nothing. */
static void relift(kmv_stream *s, double bound, size_t n_old) {
    kmv_index *ix = s->ix;
    kmv__keystore *ks = &ix->ks;
    size_t dim = s->d - 1;
    for (size_t id = 0; id < n_old; id++)
        ks->rows[(size_t)ks->pos_of[id] * s->d + dim] = (float)sqrt(bound - s->kn2[id]);
    if (ix->lsh_built) {
        kmv__lsh_free(&ix->lsh, &ix->alloc);
        ix->lsh_built = 0;
    }
    s->drawn_n = 0;
    s->decode_refused_n = 0;
    s->relifts++;
}

int kmv__stream_attn_append(kmv_stream *s, const float *keys, const float *v, size_t count) {
    kmv_index *ix = s->ix;
    const kmv_allocator *a = &ix->alloc;
    size_t dim = s->d - 1, nc = s->c - 1, n0 = ix->ks.n;
    kmv__meter_reset(&ix->meter);
    if (n0 + count > s->kn2cap) {
        size_t cap = next_cap(s->kn2cap, n0 + count);
        int rc = grow(a, (void **)&s->kn2, n0, s->kn2cap, cap, sizeof(double));
        if (rc != KMV_OK) return kmv__meter_code(&ix->meter, rc);
        s->kn2cap = cap;
    }
    double *norms = kmv__malloc_array(a, count, sizeof(double));
    float *kl = kmv__malloc_array(a, count, s->d * sizeof(float));
    float *xv = kmv__malloc_array(a, count, s->c * sizeof(float));
    int rc = KMV_ENOMEM;
    if (norms && kl && xv) {
        double bound = s->key_bound;
        for (size_t u = 0; u < count; u++) {
            /* In double and kmv_attention_lift's order: its check of
             * the bound and the lifted coordinates agree with these. */
            norms[u] = kmv_max_sq_norm(keys + u * dim, 1, dim);
            bound = norms[u] > bound ? norms[u] : bound;
        }
        rc = kmv_attention_lift(keys, count, dim, 1, bound, kl);
        for (size_t u = 0; u < count && rc == KMV_OK; u++) {
            memcpy(xv + u * s->c, v + u * nc, nc * sizeof(float));
            xv[u * s->c + nc] = 1.0f;
        }
        /* Only the append can fail; the keys held move after it. Tables
         * about to be dropped take no inserts (which could only fail). */
        ix->skip_tables = bound > s->key_bound && n0 > 0;
        if (rc == KMV_OK) rc = kmv__stream_append_keys(s, kl, xv, count);
        ix->skip_tables = 0;
        if (rc == KMV_OK) {
            memcpy(s->kn2 + n0, norms, count * sizeof(double));
            if (bound > s->key_bound && n0 > 0) relift(s, bound, n0);
            s->key_bound = bound;
        }
    }
    kmv__free(a, norms);
    kmv__free(a, kl);
    kmv__free(a, xv);
    return kmv__meter_code(&ix->meter, rc);
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
    if (s->attn) return KMV_EUNSUPPORTED;
    if (count == 0) return KMV_OK;
    size_t prod;
    if (count > SIZE_MAX / 64 - s->m || !kmv__mul_size(count, s->d, &prod))
        return KMV_EOVERFLOW;
    if (kmv_find_nonfinite(q, count * s->d, NULL) != KMV_OK) return KMV_ENONFINITE;
    return kmv__stream_append_queries(s, q, count);
}

int kmv_stream_matvec(kmv_stream *s, const float *x_fresh, float *y, kmv_stats *stats) {
    if (s == NULL || (y == NULL && s->m > 0)) return KMV_EINVAL;
    if (s->attn) return KMV_EUNSUPPORTED;
    if (x_fresh != NULL && kmv_find_nonfinite(x_fresh, s->ix->ks.n * s->c, NULL) != KMV_OK)
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
    int rc = s->attn ? kmv__stream_attn_decode(s, query, y, &S, 0)
                     : kmv__stream_decode(s, query, y, &S, 0);
    if (rc == KMV_OK) kmv__stats_export(&S, stats);
    return rc;
}

int kmv__stream_attn_decode(kmv_stream *s, const float *query, float *y, kmv__stats *stats,
                            int defer) {
    if (s->ix->ks.n == 0) return KMV_EEMPTY; /* a softmax over nothing */
    /* The lifted query (extra coordinate 0) and the row with its ones
     * column; steps may run concurrently, so the scratch is the call's. */
    kmv_index *ix = s->ix;
    unsigned long r0 = kmv__meter_refusals_here(); /* steps beside this one refuse their own */
    float *ql = kmv__malloc_array(&ix->alloc, s->d, sizeof(float));
    float *yl = kmv__malloc_array(&ix->alloc, s->c, sizeof(float));
    int rc = KMV_ENOMEM;
    if (ql && yl) {
        memcpy(ql, query, (s->d - 1) * sizeof(float));
        ql[s->d - 1] = 0.0f;
        rc = kmv__stream_decode(s, ql, yl, stats, defer);
        if (rc == KMV_OK && !(defer && stats->mode != KMV_MODE_APPROX))
            memcpy(y, yl, (s->c - 1) * sizeof(float));
    }
    kmv__free(&ix->alloc, ql);
    kmv__free(&ix->alloc, yl);
    if (rc == KMV_ENOMEM && kmv__meter_refusals_here() != r0) rc = KMV_ELIMIT;
    return rc;
}

int kmv_stream_get_info(const kmv_stream *s, kmv_stream_info *info) {
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
    if (s->attn) {
        info->dim = s->d - 1;
        info->n_cols = s->c - 1;
        info->attention = 1;
        info->key_bound = s->key_bound;
        info->relifts = s->relifts;
    }
    return KMV_OK;
}
