/* Saving a stream to a file and loading it back; see kmv.h.
 *
 * Layout (native little-endian; the magic's bytes reject anything else):
 *   header  (struct snap_header, fixed size)
 *   attn    (struct snap_attn; version 2 on: the attention stream's lift)
 *   rows    n x d floats, the key store's order (attention: lifted)
 *   id_at   n uint32, position -> key id
 *   x       n x c floats, id order (attention: [v, 1])
 *   q       m x d floats, id order
 *   kn2     n doubles, id order (attention streams only: ||k||^2)
 *   XXH3-64 of every byte above.
 * Version 1 files (before attention streams could be saved) have no attn
 * part and load as before. The LSH tables and the bounds tree are not
 * stored: they are functions of their shape or size, the seed and the
 * keys in id order, so loading rebuilds them bit for bit. */
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
#define SNAP_VERSION 2u
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

/* Version 2: an attention stream's lift (attn 0: a Gaussian stream, the
 * rest 0). The lifted coordinate of key j is sqrt(key_bound - kn2[j]),
 * whatever blocks the keys came in (a raised bound lifts every key
 * again), so these and the lifted rows are the whole state. */
typedef struct snap_attn {
    int32_t attn, pad;
    double scale, key_bound;
    uint64_t relifts;
} snap_attn;

int kmv_stream_save(const kmv_stream *s, const char *path, char *err, size_t err_len) {
    if (err != NULL && err_len > 0) err[0] = '\0';
    if (path == NULL) return kmv__file_error(err, err_len, path, KMV_EINVAL, "path is NULL");
    if (s == NULL) return kmv__file_error(err, err_len, path, KMV_EINVAL, "stream is NULL");
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
    h.header_bytes = (uint32_t)(sizeof h + sizeof(snap_attn));
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
    snap_attn at;
    memset(&at, 0, sizeof at);
    if (s->attn) at = (snap_attn){1, 0, s->scale, s->key_bound, s->relifts};
    kmv__part parts[8] = {{&h, sizeof h},
                          {&at, sizeof at},
                          {ks->rows, n * d * sizeof(float)},
                          {ks->id_at, n * sizeof(uint32_t)},
                          {s->x, n * c * sizeof(float)},
                          {s->q, m * d * sizeof(float)},
                          {s->kn2, s->attn ? n * sizeof(double) : 0},
                          {NULL, sizeof(uint64_t)}};
    XXH3_state_t *xs = XXH3_createState();
    if (xs == NULL) return kmv__file_error(err, err_len, path, KMV_ENOMEM, "out of memory");
    XXH3_64bits_reset(xs);
    for (int u = 0; u < 7; u++)
        if (parts[u].len) XXH3_64bits_update(xs, parts[u].data, parts[u].len);
    uint64_t sum = XXH3_64bits_digest(xs);
    XXH3_freeState(xs);
    parts[7].data = &sum;
    /* Outside the memory cap: the writer's few KB are not the stream's. */
    return kmv__write_parts(path, &kmv__index_meter((kmv_index *)ix)->base, parts, 8, err, err_len);
}

/* A file's header, its attention part (zero in version 1) and the bytes
 * they take before the arrays. */
typedef struct frame {
    snap_header h;
    snap_attn at;
    size_t head;
} frame;

/* Bytes the file of f takes, or 0 when its sizes overflow. */
static size_t payload_bytes(const frame *f) {
    const snap_header *h = &f->h;
    size_t a, b, cc, dd, kn = 0, total;
    if (!kmv__mul_size((size_t)h->n, (size_t)h->d, &a) || !kmv__mul_size(a, 4, &a)) return 0;
    if (!kmv__mul_size((size_t)h->n, 4, &b)) return 0;
    if (!kmv__mul_size((size_t)h->n, (size_t)h->c, &cc) || !kmv__mul_size(cc, 4, &cc)) return 0;
    if (!kmv__mul_size((size_t)h->m, (size_t)h->d, &dd) || !kmv__mul_size(dd, 4, &dd)) return 0;
    if (f->at.attn && !kmv__mul_size((size_t)h->n, 8, &kn)) return 0;
    size_t part[5] = {a, b, cc, dd, kn};
    total = f->head;
    for (int u = 0; u < 5; u++) {
        if (part[u] > SIZE_MAX - total) return 0;
        total += part[u];
    }
    return total > SIZE_MAX - 8 ? 0 : total + 8;
}

/* ctx's params with the algorithm's taken from the file. */
static kmv__params header_params(const kmv_ctx *ctx, const frame *f) {
    const snap_header *h = &f->h;
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
    if (f->at.attn) p.attn_scale = f->at.scale;
    return p;
}

/* The arrays of a checked file's body. */
typedef struct body {
    const float *rows, *x, *q;
    const unsigned char *id_at; /* uint32, maybe unaligned in a crafted file's view */
    const unsigned char *kn2;   /* doubles */
} body;

static body body_of(const frame *f, const unsigned char *buf) {
    size_t n = (size_t)f->h.n, d = (size_t)f->h.d, c = (size_t)f->h.c, m = (size_t)f->h.m;
    const unsigned char *p = buf + f->head;
    body b;
    b.rows = (const float *)(const void *)p;
    b.id_at = p + n * d * 4;
    b.x = (const float *)(const void *)(p + n * d * 4 + n * 4);
    b.q = (const float *)(const void *)(p + n * d * 4 + n * 4 + n * c * 4);
    b.kn2 = p + n * d * 4 + n * 4 + n * c * 4 + m * d * 4;
    return b;
}

/* The parts of a checked file, rebuilt into a stream. */
static int rebuild(const kmv_ctx *ctx, const frame *f, const unsigned char *buf,
                   kmv_stream **out) {
    const snap_header *h = &f->h;
    kmv__params p = header_params(ctx, f);
    size_t n = (size_t)h->n, d = (size_t)h->d, c = (size_t)h->c, m = (size_t)h->m;
    body b = body_of(f, buf);
    uint32_t *id_at = NULL;
    kmv_stream *s;
    int rc = f->at.attn ? kmv__stream_attention_new(&p, &ctx->alloc, d - 1, c - 1, &s)
                        : kmv__stream_new(&p, &ctx->alloc, d, c, &s);
    if (rc != KMV_OK) return rc;
    kmv_index *ix = s->ix;
    const kmv_allocator *a = kmv__index_alloc(ix);
    /* Keys go in through the normal path in id order (the sketch, the
     * weights; an attention stream's as lifted), then the index takes the
     * saved order, shuffle state and tables, which is what those appends
     * would have left. */
    float *kid = kmv__malloc_array(a, n ? n : 1, d * sizeof(float));
    id_at = kmv__malloc_array(a, n ? n : 1, sizeof(uint32_t));
    if (kid == NULL || id_at == NULL) {
        kmv__free(a, kid);
        rc = KMV_ENOMEM;
        goto fail;
    }
    if (n) memcpy(id_at, b.id_at, n * sizeof(uint32_t));
    for (size_t pos = 0; pos < n; pos++) memcpy(kid + (size_t)id_at[pos] * d, b.rows + pos * d, d * sizeof(float));
    rc = kmv__stream_append_keys(s, kid, b.x, n, 1);
    kmv__free(a, kid);
    if (rc != KMV_OK) goto fail;
    kmv__index_state st = {h->shuffle_rng, h->lsh_built,
                           {{h->lsh_k, h->lsh_L, h->lsh_w}, h->plan_steps, h->plan_cands, h->plan_cost},
                           h->kappa, (size_t)h->lsh_n, (size_t)h->refused_n,
                           {h->keys_hashed, h->table_inserts, h->table_builds}};
    rc = kmv__index_restore(ix, b.rows, id_at, &st);
    if (rc != KMV_OK) goto fail;
    for (size_t pos = 0; pos < n; pos++) {
        memcpy(s->xs + pos * c, s->x + (size_t)id_at[pos] * c, c * sizeof(float));
        s->ws[pos] = s->wid[id_at[pos]];
    }
    if (m) {
        rc = kmv__stream_append_queries(s, b.q, m);
        if (rc != KMV_OK) goto fail;
    }
    if (f->at.attn) {
        rc = kmv__stream_grow(a, (void **)&s->kn2, 0, &s->kn2cap, n, sizeof(double));
        if (rc != KMV_OK) goto fail;
        if (n) memcpy(s->kn2, b.kn2, n * sizeof(double));
        s->key_bound = f->at.key_bound;
        s->relifts = f->at.relifts;
    }
    s->decode_refused_n = (size_t)h->decode_refused_n;
    s->decode_refused_cap = h->refused_cap;
    s->sketch_inserts = h->sketch_inserts;
    kmv__free(a, id_at);
    *out = s;
    return KMV_OK;
fail:
    kmv__free(a, id_at);
    rc = kmv__meter_code(kmv__index_meter(ix), rc);
    kmv_stream_free(s);
    return rc;
}

/* What is wrong with the file's frame (magic, version, sizes, checksum),
 * or NULL; *f its header when NULL. */
static const char *check_frame(const unsigned char *buf, size_t len, frame *f) {
    memset(f, 0, sizeof *f);
    snap_header *h = &f->h;
    if (len < 8 || memcmp(buf, SNAP_MAGIC, 8) != 0) return "not a kmv stream snapshot";
    if (len < sizeof *h + 8) return "truncated: shorter than the header";
    memcpy(h, buf, sizeof *h);
    f->head = sizeof *h;
    if (h->version == SNAP_VERSION && h->header_bytes == sizeof *h + sizeof(snap_attn)) {
        if (len < f->head + sizeof(snap_attn) + 8) return "truncated: shorter than the header";
        memcpy(&f->at, buf + f->head, sizeof f->at);
        f->head += sizeof f->at;
    } else if (h->version != 1 || h->header_bytes != sizeof *h) {
        return "a snapshot of another format version";
    }
    uint64_t sum;
    memcpy(&sum, buf + len - 8, 8);
    size_t want;
    if (f->at.attn != 0 && f->at.attn != 1) return "inconsistent: stream kind out of range";
    if ((want = payload_bytes(f)) == 0) return "damaged: sizes overflow";
    if (len != want) return len < want ? "truncated" : "damaged: longer than its sizes say";
    if (XXH3_64bits(buf, len - 8) != sum) return "damaged: checksum mismatch";
    return NULL;
}

/* An attention stream's lift: what is wrong with it, or NULL. Every
 * lifted coordinate must be the one the bound gives its key, every value
 * row end in the 1 of the normaliser, and every query's lift be 0. */
static const char *check_attention(const frame *f, const body *b) {
    const snap_header *h = &f->h;
    const snap_attn *at = &f->at;
    size_t n = (size_t)h->n, d = (size_t)h->d, c = (size_t)h->c;
    if (!at->attn)
        return at->scale != 0.0 || at->key_bound != 0.0 || at->relifts != 0 || at->pad != 0
                   ? "inconsistent: attention fields in a Gaussian stream"
                   : NULL;
    if (d < 2 || c < 2 || h->causal != 0 || !(at->scale > 0.0) || !isfinite(at->scale) ||
        !(at->key_bound >= 0.0) || !isfinite(at->key_bound) || at->pad != 0 ||
        h->sigma != kmv_attention_sigma(at->scale, d - 1))
        return "inconsistent: attention parameters out of range";
    for (size_t pos = 0; pos < n; pos++) {
        uint32_t id;
        double kn;
        memcpy(&id, b->id_at + pos * 4, 4);
        memcpy(&kn, b->kn2 + (size_t)id * 8, 8);
        if (!(kn >= 0.0 && kn <= at->key_bound) ||
            b->rows[pos * d + d - 1] != (float)sqrt(at->key_bound - kn))
            return "inconsistent: a key's lift does not match its bound";
    }
    for (size_t j = 0; j < n; j++)
        if (b->x[j * c + c - 1] != 1.0f) return "inconsistent: a value row lacks its 1";
    for (size_t i = 0; i < (size_t)h->m; i++)
        if (b->q[i * d + d - 1] != 0.0f) return "inconsistent: a query's lift is not 0";
    return NULL;
}

/* The checksum held, but a file can be made to pass it: every field is
 * still checked before use. What is wrong, or NULL; *nomem when the check
 * itself ran out of memory. */
static const char *check_fields(const kmv_ctx *ctx, const frame *f, const unsigned char *buf,
                                int *nomem) {
    const snap_header *h = &f->h;
    kmv__params p = header_params(ctx, f);
    size_t n = (size_t)h->n, d = (size_t)h->d, c = (size_t)h->c, m = (size_t)h->m;
    body b = body_of(f, buf);
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
    if (kmv_find_nonfinite(b.rows, n * d, NULL) != KMV_OK ||
        kmv_find_nonfinite(b.x, n * c, NULL) != KMV_OK ||
        kmv_find_nonfinite(b.q, m * d, NULL) != KMV_OK)
        return "inconsistent: non-finite values";
    /* id_at must be a permutation of 0 .. n-1. */
    unsigned char *seen = n ? kmv__malloc(&ctx->alloc, n) : NULL;
    if (n && seen == NULL) {
        *nomem = 1;
        return "out of memory";
    }
    if (n) memset(seen, 0, n);
    const char *why = NULL;
    for (size_t pos = 0; pos < n && why == NULL; pos++) {
        uint32_t id;
        memcpy(&id, b.id_at + pos * 4, 4);
        if (id >= n || seen[id]) why = "inconsistent: key order is not a permutation";
        else seen[id] = 1;
    }
    kmv__free(&ctx->alloc, seen);
    if (why == NULL) why = check_attention(f, &b);
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
    frame f;
    int nomem = 0, rc;
    const char *why = check_frame(buf, len, &f);
    if (why == NULL) why = check_fields(ctx, &f, buf, &nomem);
    if (why != NULL) {
        kmv__free(&ctx->alloc, buf);
        return kmv__file_error(err, err_len, path, nomem ? KMV_ENOMEM : KMV_EFORMAT, "%s", why);
    }
    /* The body sits after a header of 8-byte fields; the buffer is
     * malloc-aligned, so every float array in it is 4-byte aligned (the
     * doubles are read by memcpy). */
    rc = rebuild(ctx, &f, buf, out);
    kmv__free(&ctx->alloc, buf);
    if (rc != KMV_OK)
        return kmv__file_error(err, err_len, path, rc, "cannot rebuild the stream: %s", kmv_strerror(rc));
    return KMV_OK;
}
