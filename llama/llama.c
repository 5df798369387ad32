/* llama2.c checkpoints through kmv attention streams; see llama.h. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "llama/llama.h"

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "llama/fail.h"
#include "tools/clock.h"

struct llm_model {
    llm_config c;
    float *data; /* the whole file after the header */
    /* Weights, pointing into data, in the file's order. */
    const float *emb, *rms_att, *wq, *wk, *wv, *wo, *rms_ffn, *w1, *w2, *w3, *rms_final, *wcls;
};

int llm_load(const char *path, llm_model **out, char *err, size_t err_len) {
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (f == NULL) return llm__fail(err, err_len, KMV_EIO, "%s: cannot open: %s", path, strerror(errno));
    int32_t h[7];
    if (fread(h, sizeof h, 1, f) != 1) {
        fclose(f);
        return llm__fail(err, err_len, KMV_EFORMAT, "%s: shorter than a llama2.c header", path);
    }
    /* INT32_MIN has no negation; it fails the range check as 0 does. */
    llm_config c = {h[0], h[1], h[2], h[3], h[4], h[5] == INT32_MIN ? 0 : h[5] < 0 ? -h[5] : h[5], h[6]};
    int shared = h[5] > 0;
    /* Bounds far above any checkpoint this runner is for, so that every
     * size below fits comfortably in size_t. */
    if (c.dim <= 0 || c.dim > 65536 || c.hidden_dim <= 0 || c.hidden_dim > 1 << 20 ||
        c.n_layers <= 0 || c.n_layers > 1024 || c.n_heads <= 0 || c.n_kv_heads <= 0 ||
        c.n_kv_heads > c.n_heads || c.n_heads % c.n_kv_heads != 0 || c.dim % c.n_heads != 0 ||
        (c.dim / c.n_heads) % 2 != 0 || c.vocab_size <= 0 || c.vocab_size > 1 << 20 ||
        c.seq_len <= 0 || c.seq_len > 1 << 20) {
        fclose(f);
        return llm__fail(err, err_len, KMV_EFORMAT,
                    "%s: not a llama2.c checkpoint this runner reads (header dim %d, hidden %d, "
                    "layers %d, heads %d, kv heads %d, vocab %d, seq_len %d)",
                    path, h[0], h[1], h[2], h[3], h[4], h[5], h[6]);
    }
    size_t dim = (size_t)c.dim, hid = (size_t)c.hidden_dim, L = (size_t)c.n_layers;
    size_t hs = dim / (size_t)c.n_heads, kv = hs * (size_t)c.n_kv_heads;
    size_t V = (size_t)c.vocab_size, T = (size_t)c.seq_len;
    size_t want = V * dim + L * dim + L * dim * dim + 2 * L * dim * kv + L * dim * dim + L * dim +
                  3 * L * dim * hid + dim + T * hs + (shared ? 0 : V * dim);
    if (fseek(f, 0, SEEK_END) != 0) {
        fclose(f);
        return llm__fail(err, err_len, KMV_EIO, "%s: cannot seek", path);
    }
    long size = ftell(f);
    if (size < 0 || (size_t)size != sizeof h + want * sizeof(float)) {
        fclose(f);
        return llm__fail(err, err_len, KMV_EFORMAT,
                    "%s: %ld bytes, but its header describes %zu (truncated or not a checkpoint)",
                    path, size, sizeof h + want * sizeof(float));
    }
    llm_model *m = calloc(1, sizeof *m);
    float *data = malloc(want * sizeof(float));
    if (m == NULL || data == NULL || fseek(f, (long)sizeof h, SEEK_SET) != 0 ||
        fread(data, sizeof(float), want, f) != want) {
        int nomem = m == NULL || data == NULL;
        free(m);
        free(data);
        fclose(f);
        return nomem ? llm__fail(err, err_len, KMV_ENOMEM, "%s: out of memory", path)
                     : llm__fail(err, err_len, KMV_EIO, "%s: read failed", path);
    }
    fclose(f);
    if (kmv_find_nonfinite(data, want, NULL) != KMV_OK) {
        free(m);
        free(data);
        return llm__fail(err, err_len, KMV_EFORMAT, "%s: weights contain NaN or infinity", path);
    }
    m->c = c;
    m->data = data;
    const float *p = data;
    m->emb = p, p += V * dim;
    m->rms_att = p, p += L * dim;
    m->wq = p, p += L * dim * dim;
    m->wk = p, p += L * dim * kv;
    m->wv = p, p += L * dim * kv;
    m->wo = p, p += L * dim * dim;
    m->rms_ffn = p, p += L * dim;
    m->w1 = p, p += L * dim * hid;
    m->w2 = p, p += L * hid * dim;
    m->w3 = p, p += L * dim * hid;
    m->rms_final = p, p += dim;
    p += T * hs; /* the legacy rotary tables: computed instead */
    m->wcls = shared ? m->emb : p;
    *out = m;
    return KMV_OK;
}

void llm_free(llm_model *m) {
    if (m == NULL) return;
    free(m->data);
    free(m);
}

const llm_config *llm_config_of(const llm_model *m) { return &m->c; }

struct llm_session {
    const llm_model *m;
    kmv_ctx *ctx;    /* the caller's params with the model's attention scale */
    kmv_stream **st; /* n_layers x n_kv_heads */
    float *x, *xb, *xb2, *hb, *hb2, *q, *k, *v, *logits;
    float *dq, *dk, *dv; /* n_layers x max_pos x heads x head size */
    int pos, max_pos;
    int failed;      /* a stream call failed midway: positions are off */
    double t_attn, t_all;
    llm_attn_stats as;
};

void llm_session_free(llm_session *s) {
    if (s == NULL) return;
    const llm_config *c = &s->m->c;
    for (int u = 0; s->st != NULL && u < c->n_layers * c->n_kv_heads; u++) kmv_stream_free(s->st[u]);
    free(s->st);
    kmv_ctx_free(s->ctx);
    float *bufs[] = {s->x, s->xb, s->xb2, s->hb, s->hb2, s->q, s->k, s->v, s->logits, s->dq, s->dk, s->dv};
    for (size_t u = 0; u < sizeof bufs / sizeof *bufs; u++) free(bufs[u]);
    free(s);
}

int llm_session_create(const llm_model *m, const kmv_params *params, int max_pos, int keep_qkv,
                       llm_session **out) {
    *out = NULL;
    const llm_config *c = &m->c;
    if (max_pos < 0) return KMV_EINVAL;
    if (max_pos == 0) max_pos = c->seq_len;
    size_t dim = (size_t)c->dim, hs = dim / (size_t)c->n_heads, kv = hs * (size_t)c->n_kv_heads;
    size_t per_layer = (size_t)max_pos * dim, dkv = (size_t)max_pos * kv;
    kmv_params p = *params;
    p.attn_scale = 1.0 / sqrt((double)hs); /* the model's, whatever the caller's */
    llm_session *s = calloc(1, sizeof *s);
    if (s == NULL) return KMV_ENOMEM;
    s->m = m;
    s->max_pos = max_pos;
    int rc = kmv_ctx_create(&p, &s->ctx);
    if (rc != KMV_OK) {
        llm_session_free(s);
        return rc;
    }
    s->st = calloc((size_t)(c->n_layers * c->n_kv_heads), sizeof *s->st);
    s->x = malloc(dim * sizeof(float));
    s->xb = malloc(dim * sizeof(float));
    s->xb2 = malloc(dim * sizeof(float));
    s->hb = malloc((size_t)c->hidden_dim * sizeof(float));
    s->hb2 = malloc((size_t)c->hidden_dim * sizeof(float));
    s->q = malloc(dim * sizeof(float));
    s->k = malloc(kv * sizeof(float));
    s->v = malloc(kv * sizeof(float));
    s->logits = malloc((size_t)c->vocab_size * sizeof(float));
    if (keep_qkv) {
        s->dq = malloc((size_t)c->n_layers * per_layer * sizeof(float));
        s->dk = malloc((size_t)c->n_layers * dkv * sizeof(float));
        s->dv = malloc((size_t)c->n_layers * dkv * sizeof(float));
    }
    if (!s->st || !s->x || !s->xb || !s->xb2 || !s->hb || !s->hb2 || !s->q || !s->k || !s->v ||
        !s->logits || (keep_qkv && (!s->dq || !s->dk || !s->dv))) {
        llm_session_free(s);
        return KMV_ENOMEM;
    }
    for (int u = 0; u < c->n_layers * c->n_kv_heads; u++) {
        rc = kmv_stream_attention_create(s->ctx, hs, hs, &s->st[u]);
        if (rc != KMV_OK) {
            llm_session_free(s);
            return rc;
        }
    }
    *out = s;
    return KMV_OK;
}

static void rmsnorm(float *o, const float *x, const float *w, size_t n) {
    float ss = 0.0f;
    for (size_t j = 0; j < n; j++) ss += x[j] * x[j];
    ss /= (float)n;
    ss += 1e-5f;
    ss = 1.0f / sqrtf(ss);
    for (size_t j = 0; j < n; j++) o[j] = w[j] * (ss * x[j]);
}

/* o (d) = W (d x n) x */
static void matmul(float *o, const float *x, const float *w, size_t n, size_t d) {
    for (size_t i = 0; i < d; i++) {
        float v = 0.0f;
        for (size_t j = 0; j < n; j++) v += w[i * n + j] * x[j];
        o[i] = v;
    }
}

int llm_forward(llm_session *s, int token, const float **logits) {
    const llm_model *m = s->m;
    const llm_config *c = &m->c;
    if (s->failed || token < 0 || token >= c->vocab_size || s->pos >= s->max_pos) return KMV_EINVAL;
    double t0 = tool_now();
    size_t dim = (size_t)c->dim, hid = (size_t)c->hidden_dim, hs = dim / (size_t)c->n_heads;
    size_t kv = hs * (size_t)c->n_kv_heads, kv_mul = (size_t)(c->n_heads / c->n_kv_heads);
    size_t pos = (size_t)s->pos, T = (size_t)s->max_pos;
    memcpy(s->x, m->emb + (size_t)token * dim, dim * sizeof(float));
    for (size_t l = 0; l < (size_t)c->n_layers; l++) {
        rmsnorm(s->xb, s->x, m->rms_att + l * dim, dim);
        matmul(s->q, s->xb, m->wq + l * dim * dim, dim, dim);
        matmul(s->k, s->xb, m->wk + l * dim * kv, dim, kv);
        matmul(s->v, s->xb, m->wv + l * dim * kv, dim, kv);
        /* Rotary embedding, as run.c: pairs (i, i + 1), frequency by the
         * position within the head. */
        for (size_t i = 0; i < dim; i += 2) {
            size_t hd = i % hs;
            float freq = 1.0f / powf(10000.0f, (float)hd / (float)hs);
            float val = (float)pos * freq, fcr = cosf(val), fci = sinf(val);
            for (int w = 0; w < (i < kv ? 2 : 1); w++) {
                float *vec = w == 0 ? s->q : s->k;
                float v0 = vec[i], v1 = vec[i + 1];
                vec[i] = v0 * fcr - v1 * fci;
                vec[i + 1] = v0 * fci + v1 * fcr;
            }
        }
        if (s->dq != NULL) {
            memcpy(s->dq + (l * T + pos) * dim, s->q, dim * sizeof(float));
            memcpy(s->dk + (l * T + pos) * kv, s->k, kv * sizeof(float));
            memcpy(s->dv + (l * T + pos) * kv, s->v, kv * sizeof(float));
        }
        double ta = tool_now();
        for (size_t g = 0; g < (size_t)c->n_kv_heads; g++) {
            kmv_stream *st = s->st[l * (size_t)c->n_kv_heads + g];
            int rc = kmv_stream_append_keys(st, s->k + g * hs, s->v + g * hs, 1);
            for (size_t h = g * kv_mul; rc == KMV_OK && h < (g + 1) * kv_mul; h++) {
                kmv_stats stats;
                rc = kmv_stream_decode(st, s->q + h * hs, s->xb + h * hs, &stats);
                if (rc != KMV_OK) break;
                s->as.steps++;
                if (stats.mode == KMV_MODE_FALLBACK && stats.fallback_reason >= 0 &&
                    stats.fallback_reason <= KMV_FALLBACK_TREE)
                    s->as.exact_why[stats.fallback_reason]++;
                if (stats.mode == KMV_MODE_APPROX) {
                    s->as.approx_steps++;
                    if (stats.error_bound > s->as.worst_bound) s->as.worst_bound = stats.error_bound;
                }
            }
            if (rc != KMV_OK) {
                /* Some streams hold this position's key, others not. */
                s->failed = 1;
                return rc;
            }
        }
        s->t_attn += tool_now() - ta;
        matmul(s->xb2, s->xb, m->wo + l * dim * dim, dim, dim);
        for (size_t i = 0; i < dim; i++) s->x[i] += s->xb2[i];
        rmsnorm(s->xb, s->x, m->rms_ffn + l * dim, dim);
        matmul(s->hb, s->xb, m->w1 + l * dim * hid, dim, hid);
        matmul(s->hb2, s->xb, m->w3 + l * dim * hid, dim, hid);
        for (size_t i = 0; i < hid; i++) {
            float v = s->hb[i];
            s->hb[i] = v * (1.0f / (1.0f + expf(-v))) * s->hb2[i];
        }
        matmul(s->xb, s->hb, m->w2 + l * dim * hid, hid, dim);
        for (size_t i = 0; i < dim; i++) s->x[i] += s->xb[i];
    }
    rmsnorm(s->x, s->x, m->rms_final, dim);
    matmul(s->logits, s->x, m->wcls, dim, (size_t)c->vocab_size);
    s->pos++;
    s->t_all += tool_now() - t0;
    *logits = s->logits;
    return KMV_OK;
}

double llm_attention_seconds(const llm_session *s) { return s->t_attn; }
double llm_forward_seconds(const llm_session *s) { return s->t_all; }
llm_attn_stats llm_attention_stats(const llm_session *s) { return s->as; }
void llm_attention_reset_worst(llm_session *s) { s->as.worst_bound = 0.0; }
int llm_position(const llm_session *s) { return s->pos; }
const float *llm_dump_q(const llm_session *s, int layer) {
    return s->pos && s->dq ? s->dq + (size_t)layer * (size_t)s->max_pos * (size_t)s->m->c.dim : NULL;
}
const float *llm_dump_k(const llm_session *s, int layer) {
    const llm_config *c = &s->m->c;
    size_t kv = (size_t)(c->dim / c->n_heads * c->n_kv_heads);
    return s->pos && s->dk ? s->dk + (size_t)layer * (size_t)s->max_pos * kv : NULL;
}
const float *llm_dump_v(const llm_session *s, int layer) {
    const llm_config *c = &s->m->c;
    size_t kv = (size_t)(c->dim / c->n_heads * c->n_kv_heads);
    return s->pos && s->dv ? s->dv + (size_t)layer * (size_t)s->max_pos * kv : NULL;
}
