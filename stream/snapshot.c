/* Saving a stream to a file and loading it back; see kmv.h.
 *
 * Layout (native little-endian; the magic's bytes reject anything else):
 *   header  (struct snap_header, fixed size)
 *   rows    n x d floats, the key store's order
 *   id_at   n uint32, position -> key id
 *   x       n x c floats, id order
 *   q       m x d floats, id order
 *   XXH3-64 of every byte above.
 * The LSH tables are not stored: they are a function of their shape, the
 * seed and the keys in id order, so loading rebuilds them bit for bit. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <xxhash.h>

#include "common/alloc.h"
#include "common/fileio.h"
#include "common/output.h"
#include "common/params.h"
#include "stream/stream.h"

/* Fields move between file and memory as raw bytes. */
#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__) && \
    __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "stream/snapshot.c supports little-endian hosts only"
#endif

#define SNAP_MAGIC "KMVSTRM\x1a"
#define SNAP_VERSION 1u
/* A loaded file is read whole; this bounds what a damaged size can ask. */
#define SNAP_MAX ((size_t)1 << 40)

typedef struct snap_header {
    char magic[8];
    uint32_t version, header_bytes;
    uint64_t d, c, n, m;
    double sigma, eps, delta, alpha, gamma;
    uint64_t seed;
    int32_t sketch_size, min_samples, causal, exact;
    uint64_t shuffle_rng;
    int32_t lsh_built, lsh_k, lsh_L, refused_cap; /* refused_cap: 0 in older files */
    double lsh_w, kappa;
    uint64_t lsh_n;
    double plan_steps, plan_cands, plan_cost;
    uint64_t refused_n, decode_refused_n;
    uint64_t keys_hashed, table_inserts, table_builds, sketch_inserts;
} snap_header;

int kmv_stream_save(const kmv_stream *s, const char *path, char *err, size_t err_len) {
    if (err != NULL && err_len > 0) err[0] = '\0';
    if (path == NULL) return kmv__file_error(err, err_len, path, KMV_EINVAL, "path is NULL");
    if (s == NULL) return kmv__file_error(err, err_len, path, KMV_EINVAL, "stream is NULL");
    if (s->attn)
        return kmv__file_error(err, err_len, path, KMV_EUNSUPPORTED,
                               "attention streams cannot be saved in this version");
    const kmv_index *ix = s->ix;
    const kmv__params *p = kmv__index_params(ix);
    const kmv__keystore *ks = kmv__index_keys(ix);
    kmv__index_state st;
    kmv__index_get_state(ix, &st);
    size_t n = ks->n, d = s->d, c = s->c, m = s->m;
    snap_header h;
    memset(&h, 0, sizeof h);
    memcpy(h.magic, SNAP_MAGIC, 8);
    h.version = SNAP_VERSION;
    h.header_bytes = (uint32_t)sizeof h;
    h.d = d;
    h.c = c;
    h.n = n;
    h.m = m;
    h.sigma = p->sigma;
    h.eps = p->eps;
    h.delta = p->delta;
    h.alpha = p->alpha;
    h.gamma = p->gamma;
    h.seed = p->seed;
    h.sketch_size = p->sketch_size;
    h.min_samples = p->min_samples;
    h.causal = p->causal;
    h.exact = p->exact;
    h.shuffle_rng = st.shuffle_rng;
    h.lsh_built = st.lsh_built;
    if (st.lsh_built) {
        h.lsh_k = st.plan.shape.k;
        h.lsh_L = st.plan.shape.L;
        h.lsh_w = st.plan.shape.w;
        h.kappa = st.kappa;
        h.lsh_n = st.lsh_n;
        h.plan_steps = st.plan.steps_per_query;
        h.plan_cands = st.plan.cands_per_query;
        h.plan_cost = st.plan.cost_per_query;
    }
    h.refused_n = st.refused_n;
    h.decode_refused_n = s->decode_refused_n;
    h.refused_cap = s->decode_refused_cap;
    h.keys_hashed = st.counts.keys_hashed;
    h.table_inserts = st.counts.table_inserts;
    h.table_builds = st.counts.table_builds;
    h.sketch_inserts = s->sketch_inserts;
    kmv__part parts[6] = {{&h, sizeof h},
                          {ks->rows, n * d * sizeof(float)},
                          {ks->id_at, n * sizeof(uint32_t)},
                          {s->x, n * c * sizeof(float)},
                          {s->q, m * d * sizeof(float)},
                          {NULL, sizeof(uint64_t)}};
    XXH3_state_t *xs = XXH3_createState();
    if (xs == NULL) return kmv__file_error(err, err_len, path, KMV_ENOMEM, "out of memory");
    XXH3_64bits_reset(xs);
    for (int u = 0; u < 5; u++)
        if (parts[u].len) XXH3_64bits_update(xs, parts[u].data, parts[u].len);
    uint64_t sum = XXH3_64bits_digest(xs);
    XXH3_freeState(xs);
    parts[5].data = &sum;
    /* Outside the memory cap: the writer's few KB are not the stream's. */
    return kmv__write_parts(path, &kmv__index_meter((kmv_index *)ix)->base, parts, 6, err, err_len);
}

/* Bytes the payload of h takes, or 0 when its sizes overflow. */
static size_t payload_bytes(const snap_header *h) {
    size_t a, b, cc, dd, total;
    if (!kmv__mul_size((size_t)h->n, (size_t)h->d, &a) || !kmv__mul_size(a, 4, &a)) return 0;
    if (!kmv__mul_size((size_t)h->n, 4, &b)) return 0;
    if (!kmv__mul_size((size_t)h->n, (size_t)h->c, &cc) || !kmv__mul_size(cc, 4, &cc)) return 0;
    if (!kmv__mul_size((size_t)h->m, (size_t)h->d, &dd) || !kmv__mul_size(dd, 4, &dd)) return 0;
    total = sizeof *h;
    if (a > SIZE_MAX - total) return 0;
    total += a;
    if (b > SIZE_MAX - total) return 0;
    total += b;
    if (cc > SIZE_MAX - total) return 0;
    total += cc;
    if (dd > SIZE_MAX - total - 8) return 0;
    return total + dd + 8;
}

/* ctx's params with the algorithm's taken from the file. */
static kmv__params header_params(const kmv_ctx *ctx, const snap_header *h) {
    kmv__params p = ctx->params;
    p.sigma = h->sigma;
    p.eps = h->eps;
    p.delta = h->delta;
    p.alpha = h->alpha;
    p.gamma = h->gamma;
    p.seed = h->seed;
    p.sketch_size = h->sketch_size;
    p.min_samples = h->min_samples;
    p.causal = h->causal;
    p.exact = h->exact;
    return p;
}

/* The parts of a checked file, rebuilt into a stream. */
static int rebuild(const kmv_ctx *ctx, const snap_header *h, const unsigned char *body,
                   kmv_stream **out) {
    kmv__params p = header_params(ctx, h);
    size_t n = (size_t)h->n, d = (size_t)h->d, c = (size_t)h->c, m = (size_t)h->m;
    const float *rows = (const float *)(const void *)body;
    const uint32_t *id_at = (const uint32_t *)(const void *)(body + n * d * 4);
    const float *x = (const float *)(const void *)(body + n * d * 4 + n * 4);
    const float *q = (const float *)(const void *)(body + n * d * 4 + n * 4 + n * c * 4);
    kmv_stream *s;
    int rc = kmv__stream_new(&p, &ctx->alloc, d, c, &s);
    if (rc != KMV_OK) return rc;
    kmv_index *ix = s->ix;
    const kmv_allocator *a = kmv__index_alloc(ix);
    /* Keys go in through the normal path in id order (the sketch, the
     * weights), then the index takes the saved order, shuffle state and
     * tables, which is what those appends would have left. */
    float *kid = kmv__malloc_array(a, n ? n : 1, d * sizeof(float));
    if (kid == NULL) {
        rc = KMV_ENOMEM;
        goto fail;
    }
    for (size_t pos = 0; pos < n; pos++) memcpy(kid + (size_t)id_at[pos] * d, rows + pos * d, d * sizeof(float));
    rc = kmv__stream_append_keys(s, kid, x, n, 1);
    kmv__free(a, kid);
    if (rc != KMV_OK) goto fail;
    kmv__index_state st = {h->shuffle_rng, h->lsh_built,
                           {{h->lsh_k, h->lsh_L, h->lsh_w}, h->plan_steps, h->plan_cands, h->plan_cost},
                           h->kappa, (size_t)h->lsh_n, (size_t)h->refused_n,
                           {h->keys_hashed, h->table_inserts, h->table_builds}};
    rc = kmv__index_restore(ix, rows, id_at, &st);
    if (rc != KMV_OK) goto fail;
    for (size_t pos = 0; pos < n; pos++) {
        memcpy(s->xs + pos * c, s->x + (size_t)id_at[pos] * c, c * sizeof(float));
        s->ws[pos] = s->wid[id_at[pos]];
    }
    if (m) {
        rc = kmv__stream_append_queries(s, q, m);
        if (rc != KMV_OK) goto fail;
    }
    s->decode_refused_n = (size_t)h->decode_refused_n;
    s->decode_refused_cap = h->refused_cap;
    s->sketch_inserts = h->sketch_inserts;
    *out = s;
    return KMV_OK;
fail:
    rc = kmv__meter_code(kmv__index_meter(ix), rc);
    kmv_stream_free(s);
    return rc;
}

/* What is wrong with the file's frame (magic, version, sizes, checksum),
 * or NULL; *h its header when NULL. */
static const char *check_frame(const unsigned char *buf, size_t len, snap_header *h) {
    memset(h, 0, sizeof *h);
    if (len < 8 || memcmp(buf, SNAP_MAGIC, 8) != 0) return "not a kmv stream snapshot";
    if (len < sizeof *h + 8) return "truncated: shorter than the header";
    memcpy(h, buf, sizeof *h);
    uint64_t sum;
    memcpy(&sum, buf + len - 8, 8);
    size_t want;
    if (h->version != SNAP_VERSION || h->header_bytes != sizeof *h)
        return "a snapshot of another format version";
    if ((want = payload_bytes(h)) == 0) return "damaged: sizes overflow";
    if (len != want) return len < want ? "truncated" : "damaged: longer than its sizes say";
    if (XXH3_64bits(buf, len - 8) != sum) return "damaged: checksum mismatch";
    return NULL;
}

/* The checksum held, but a file can be made to pass it: every field is
 * still checked before use. What is wrong, or NULL; *nomem when the check
 * itself ran out of memory. */
static const char *check_fields(const kmv_ctx *ctx, const snap_header *h,
                                const unsigned char *body, int *nomem) {
    kmv__params p = header_params(ctx, h);
    size_t n = (size_t)h->n, d = (size_t)h->d, c = (size_t)h->c, m = (size_t)h->m;
    *nomem = 0;
    if (kmv__params_check(&p) != KMV_OK || (h->causal != 0 && h->causal != 1) ||
        (h->exact != 0 && h->exact != 1) || (h->refused_cap != 0 && h->refused_cap != 1))
        return "inconsistent: parameters out of range";
    if (d == 0 || c == 0 || d > INT_MAX / 64 || c > INT_MAX || n > KMV__KEYS_MAX)
        return "inconsistent: shape out of range";
    /* Width 0 can come out of the planner (the api fuzzer found a saved
     * stream holding it, over keys all equal): a load must take what a
     * save writes. */
    if (h->lsh_built && (h->lsh_k < 1 || h->lsh_k > 64 || h->lsh_L < 1 ||
                         h->lsh_L > KMV__LSH_MAX_TABLES || !(h->lsh_w >= 0.0) ||
                         !isfinite(h->lsh_w) || !(h->kappa > 0.0 && h->kappa <= 1.0) ||
                         h->lsh_n > n))
        return "inconsistent: table shape out of range";
    if (kmv_find_nonfinite((const float *)(const void *)body, n * d, NULL) != KMV_OK ||
        kmv_find_nonfinite((const float *)(const void *)(body + n * d * 4 + n * 4), n * c, NULL) !=
            KMV_OK ||
        kmv_find_nonfinite((const float *)(const void *)(body + n * d * 4 + n * 4 + n * c * 4),
                           m * d, NULL) != KMV_OK)
        return "inconsistent: non-finite values";
    /* id_at must be a permutation of 0 .. n-1. */
    unsigned char *seen = n ? kmv__malloc(&ctx->alloc, n) : NULL;
    if (n && seen == NULL) {
        *nomem = 1;
        return "out of memory";
    }
    if (n) memset(seen, 0, n);
    const char *why = NULL;
    const unsigned char *ids = body + n * d * 4;
    for (size_t pos = 0; pos < n && why == NULL; pos++) {
        uint32_t id;
        memcpy(&id, ids + pos * 4, 4);
        if (id >= n || seen[id]) why = "inconsistent: key order is not a permutation";
        else seen[id] = 1;
    }
    kmv__free(&ctx->alloc, seen);
    return why;
}

int kmv_stream_load(const kmv_ctx *ctx, const char *path, kmv_stream **out, char *err,
                    size_t err_len) {
    if (err != NULL && err_len > 0) err[0] = '\0';
    if (out != NULL) *out = NULL;
    if (path == NULL) return kmv__file_error(err, err_len, path, KMV_EINVAL, "path is NULL");
    if (ctx == NULL || out == NULL) return kmv__file_error(err, err_len, path, KMV_EINVAL, "ctx or out is NULL");
    unsigned char *buf;
    size_t len;
    int r = kmv__read_whole(path, &ctx->alloc, SNAP_MAX, &buf, &len);
    if (r == -1) return kmv__file_error(err, err_len, path, KMV_EIO, "cannot read: %s", strerror(errno));
    if (r == -2) return kmv__file_error(err, err_len, path, KMV_EFORMAT, "larger than any stream snapshot");
    if (r == -3) return kmv__file_error(err, err_len, path, KMV_ENOMEM, "out of memory reading the file");
    snap_header h;
    int nomem = 0, rc;
    const char *why = check_frame(buf, len, &h);
    if (why == NULL) why = check_fields(ctx, &h, buf + sizeof h, &nomem);
    if (why != NULL) {
        kmv__free(&ctx->alloc, buf);
        return kmv__file_error(err, err_len, path, nomem ? KMV_ENOMEM : KMV_EFORMAT, "%s", why);
    }
    /* The body sits after a header of 8-byte fields; the buffer is
     * malloc-aligned, so every array in it is 4-byte aligned. */
    rc = rebuild(ctx, &h, buf + sizeof h, out);
    kmv__free(&ctx->alloc, buf);
    if (rc != KMV_OK)
        return kmv__file_error(err, err_len, path, rc, "cannot rebuild the stream: %s", kmv_strerror(rc));
    return KMV_OK;
}
