/* FindHeavy's verification, the same for every backend; see heavy.h. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "algo/heavy.h"

#include <stdlib.h>
#include <string.h>

#include "algo/kernel.h"
#include "common/alloc.h"

/* A heavy key and its kernel value, sorted by id. */
typedef struct heavy_key {
    uint32_t id;
    float kv;
} heavy_key;

struct kmv__heavy_scratch {
    kmv_allocator a;
    const kmv__heavy_ops *ops;
    void *backend;        /* the backend's own */
    size_t runs;          /* per query */
    const uint32_t **run; /* KMV__HEAVY_BLOCK x runs */
    size_t *len;
    /* One query's candidates, their dedup set, values; the block's answer. */
    uint32_t *set, *cand;
    float *kv;
    size_t set_cap, cand_cap;
    heavy_key *key;
    uint32_t *id;
    float *hkv;
    size_t key_cap;
};

static int cmp_heavy(const void *pa, const void *pb) {
    uint32_t x = ((const heavy_key *)pa)->id, y = ((const heavy_key *)pb)->id;
    return (x > y) - (x < y);
}

int kmv__heavy_scratch_new(const kmv__heavy_src *src, const kmv_allocator *a,
                           kmv__heavy_scratch **out) {
    kmv__heavy_scratch *t = kmv__malloc(a, sizeof *t);
    *out = NULL;
    if (t == NULL) return KMV_ENOMEM;
    memset(t, 0, sizeof *t);
    t->a = *a;
    t->ops = src->ops;
    t->runs = src->ops->runs_per_query(src->impl);
    t->run = kmv__malloc_array(a, KMV__HEAVY_BLOCK * (t->runs ? t->runs : 1), sizeof *t->run);
    t->len = kmv__malloc_array(a, KMV__HEAVY_BLOCK * (t->runs ? t->runs : 1), sizeof *t->len);
    int rc = t->run && t->len ? src->ops->scratch_init(src->impl, a, &t->backend) : KMV_ENOMEM;
    if (rc != KMV_OK) {
        kmv__heavy_scratch_free(t);
        return rc;
    }
    *out = t;
    return KMV_OK;
}

void kmv__heavy_scratch_free(kmv__heavy_scratch *t) {
    if (t == NULL) return;
    const kmv_allocator *a = &t->a;
    if (t->backend != NULL) t->ops->scratch_free(a, t->backend);
    kmv__free(a, (void *)t->run);
    kmv__free(a, t->len);
    kmv__free(a, t->set);
    kmv__free(a, t->cand);
    kmv__free(a, t->kv);
    kmv__free(a, t->key);
    kmv__free(a, t->id);
    kmv__free(a, t->hkv);
    kmv_allocator base = *a;
    kmv__free(&base, t);
}

/* Room for need elements in *p (of elem bytes, cap held), contents lost. */
static int room(const kmv_allocator *a, void **p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return 1;
    size_t c = *cap ? *cap : 256;
    while (c < need) c *= 2;
    void *q = kmv__malloc_array(a, c, elem);
    if (q == NULL) return 0;
    kmv__free(a, *p);
    *p = q;
    *cap = c;
    return 1;
}

/* The heavy-key arrays, kept across the block's queries. */
static int key_room(kmv__heavy_scratch *t, size_t need) {
    if (need <= t->key_cap) return 1;
    size_t c = t->key_cap ? 2 * t->key_cap : 256;
    while (c < need) c *= 2;
    heavy_key *key = kmv__malloc_array(&t->a, c, sizeof *key);
    uint32_t *id = kmv__malloc_array(&t->a, c, sizeof *id);
    float *kv = kmv__malloc_array(&t->a, c, sizeof *kv);
    if (key == NULL || id == NULL || kv == NULL) {
        kmv__free(&t->a, key);
        kmv__free(&t->a, id);
        kmv__free(&t->a, kv);
        return 0;
    }
    if (t->key_cap) {
        memcpy(key, t->key, t->key_cap * sizeof *key);
        memcpy(id, t->id, t->key_cap * sizeof *id);
        memcpy(kv, t->hkv, t->key_cap * sizeof *kv);
    }
    kmv__free(&t->a, t->key);
    kmv__free(&t->a, t->id);
    kmv__free(&t->a, t->hkv);
    t->key = key;
    t->id = id;
    t->hkv = kv;
    t->key_cap = c;
    return 1;
}

/* Room for the candidates of a query meeting steps run entries: ids and
 * their values. */
static int cand_room(kmv__heavy_scratch *t, size_t steps) {
    size_t need = steps ? steps : 1;
    if (need <= t->cand_cap) return 1;
    size_t c = t->cand_cap ? t->cand_cap : 256;
    while (c < need) c *= 2;
    uint32_t *cand = kmv__malloc_array(&t->a, c, sizeof *cand);
    float *kv = kmv__malloc_array(&t->a, c, sizeof *kv);
    if (cand == NULL || kv == NULL) {
        kmv__free(&t->a, cand);
        kmv__free(&t->a, kv);
        return 0;
    }
    kmv__free(&t->a, t->cand);
    kmv__free(&t->a, t->kv);
    t->cand = cand;
    t->kv = kv;
    t->cand_cap = c;
    return 1;
}

/* Query i's distinct visible candidates into t->cand, through an open-
 * addressed set of at least twice its entries (sorting every entry costs
 * more than the rest of a search). Returns the count, or -1 on no memory. */
static long candidates(kmv__heavy_scratch *t, size_t i, size_t steps, uint32_t lim,
                       const kmv__keystore *ks) {
    int bits = 4;
    while (((size_t)1 << bits) < 2 * steps) bits++;
    size_t mask = ((size_t)1 << bits) - 1;
    if (!room(&t->a, (void **)&t->set, &t->set_cap, mask + 1, sizeof(uint32_t)) ||
        !cand_room(t, steps))
        return -1;
    memset(t->set, 0xff, (mask + 1) * sizeof(uint32_t)); /* ids stop below UINT32_MAX */
    size_t nc = 0;
    for (size_t r = 0; r < t->runs; r++) {
        const uint32_t *ids = t->run[i * t->runs + r];
        size_t len = t->len[i * t->runs + r];
        for (size_t u = 0; u < len; u++) {
            uint32_t j = ids[u];
            if (j > lim) continue;
            size_t h = (size_t)(((uint64_t)j * 0x9E3779B97F4A7C15u) >> (64 - bits));
            while (t->set[h] != UINT32_MAX && t->set[h] != j) h = (h + 1) & mask;
            if (t->set[h] == j) continue;
            t->set[h] = j;
            t->cand[nc++] = j;
            __builtin_prefetch(&ks->pos_of[j]); /* where its row is, read next */
        }
    }
    return (long)nc;
}

/* The candidates' kernel values, exactly: the rows are scattered, so a few
 * are fetched ahead. */
static void verify(const kmv__heavy_req *rq, const float *q, const uint32_t *cand, size_t nc,
                   float *kv) {
    const kmv__keystore *ks = rq->ks;
    size_t d = ks->d;
    for (size_t u = 0; u < nc; u++) {
        if (u + 8 < nc) {
            const float *r = kmv__keystore_row(ks, cand[u + 8]);
            for (size_t o = 0; o < d; o += 16) __builtin_prefetch(r + o);
        }
        kv[u] = kmv__sqdist(q, kmv__keystore_row(ks, cand[u]), d) - rq->shift;
    }
    if (nc) kmv__gauss_row_dist(kv, nc, rq->inv2s2, NULL);
}

void kmv__heavy_locality(const kmv__heavy_src *src, const float *q, size_t count,
                         kmv__heavy_scratch *t, uint64_t *key) {
    src->ops->locality(src->impl, q, count, t->backend, key);
}

int kmv__heavy_find(const kmv__heavy_src *src, const kmv__heavy_req *rq, kmv__heavy_scratch *t,
                    kmv__heavy_out *out) {
    size_t d = rq->ks->d, nh = 0;
    memset(out, 0, sizeof *out);
    src->ops->lookup(src->impl, rq->q, rq->count, t->backend, t->run, t->len);
    for (size_t i = 0; i < rq->count; i++) {
        size_t steps = 0;
        for (size_t r = 0; r < t->runs; r++) steps += t->len[i * t->runs + r];
        out->steps += steps;
        if ((double)steps > rq->max_steps) {
            out->over = 1;
            return KMV_OK;
        }
        uint32_t lim = rq->id_lim != NULL ? rq->id_lim[i] : UINT32_MAX;
        long got = candidates(t, i, steps, lim, rq->ks);
        if (got < 0) return KMV_ENOMEM;
        size_t nc = (size_t)got, first = nh;
        out->cands += nc;
        verify(rq, rq->q + i * d, t->cand, nc, t->kv);
        for (size_t u = 0; u < nc; u++) {
            if (t->kv[u] < rq->kappa) continue;
            if (!key_room(t, nh + 1)) return KMV_ENOMEM;
            t->key[nh++] = (heavy_key){t->cand[u], t->kv[u]};
        }
        /* Ascending ids: windows and the sketch look keys up in them, and
         * sums then have the keys' order, whatever the runs' order. */
        if (nh > first) qsort(t->key + first, nh - first, sizeof(heavy_key), cmp_heavy);
        out->off[i + 1] = nh;
    }
    for (size_t u = 0; u < nh; u++) {
        t->id[u] = t->key[u].id;
        t->hkv[u] = t->key[u].kv;
    }
    out->id = t->id;
    out->kv = t->hkv;
    return KMV_OK;
}

void kmv__heavy_sum(const uint32_t *id, const float *kv, size_t n, const kmv__values *v,
                    double *sum) {
    for (size_t u = 0; u < n; u++) {
        uint32_t j = id[u];
        if (v->w != NULL && v->w[j] >= v->whi) continue;
        const float *xr = v->x + (size_t)(v->pos_of != NULL ? v->pos_of[j] : j) * v->c;
        for (size_t col = 0; col < v->c; col++) sum[col] += (double)kv[u] * xr[col];
    }
}
