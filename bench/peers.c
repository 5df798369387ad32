/* Peer estimators of normalized attention; see peers.h. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "bench/peers.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Rows of Q whose logits one sgemm computes at a time: 256 x s floats. */
#define ROWS 256

static uint64_t splitmix(uint64_t *st) {
    uint64_t z = (*st += 0x9e3779b97f4a7c15u);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}

static double uniform01(uint64_t *st) { return (double)(splitmix(st) >> 11) * 0x1p-53; }

static double gauss(uint64_t *st) {
    double u = uniform01(st), w = uniform01(st);
    return sqrt(-2.0 * log(u > 0.0 ? u : 0x1p-53)) * cos(6.283185307179586 * w);
}

/* L (rows x s) = scale A B^T for A rows x d and B s x d. */
static void logits(const float *a, size_t rows, const float *b, size_t s, size_t d, double scale,
                   float *L) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, (int)s, (int)d, (float)scale,
                a, (int)d, b, (int)d, 0.0f, L, (int)s);
}

/* s draws with replacement from weights w[0..n) (not all zero), by the
 * cumulative sums: ids and their probabilities. */
static int draw(const double *w, size_t n, size_t s, uint64_t *st, size_t *ids, double *prob) {
    double *cdf = malloc(n * sizeof(double));
    if (cdf == NULL) return -1;
    double tot = 0.0;
    for (size_t j = 0; j < n; j++) cdf[j] = (tot += w[j]);
    for (size_t t = 0; t < s; t++) {
        double u = uniform01(st) * tot;
        size_t lo = 0, hi = n - 1;
        while (lo < hi) {
            size_t mid = lo + (hi - lo) / 2;
            if (cdf[mid] > u) hi = mid;
            else lo = mid + 1;
        }
        while (w[lo] <= 0.0) lo = lo + 1 < n ? lo + 1 : 0; /* u landed on a zero-width step */
        ids[t] = lo;
        prob[t] = w[lo] / tot;
    }
    free(cdf);
    return 0;
}

static void gather(const float *src, const size_t *ids, size_t count, size_t width, float *dst) {
    for (size_t t = 0; t < count; t++) memcpy(dst + t * width, src + ids[t] * width, width * sizeof(float));
}

/* e[t] = exp(l[t] - mx): float exps the compiler vectorizes (this file is
 * built with -ffast-math for libmvec), as the exact engine's are. */
static void exp_shifted(const float *l, size_t len, float mx, float *e) {
#pragma omp simd
    for (size_t t = 0; t < len; t++) e[t] = expf(l[t] - mx);
}

static float row_max(const float *l, size_t len, float m) {
    for (size_t t = 0; t < len; t++) m = l[t] > m ? l[t] : m;
    return m;
}

int peer_uniform(const peer_problem *p, size_t s, uint64_t seed, float *out) {
    size_t d = p->d, c = p->c;
    size_t *ids = malloc(s * sizeof(size_t));
    float *ks = malloc(s * d * sizeof(float));
    int rc = ids && ks ? 0 : -1;
    uint64_t st = seed;
    for (size_t t = 0; rc == 0 && t < s; t++) ids[t] = (size_t)(splitmix(&st) % p->n);
    if (rc == 0) gather(p->k, ids, s, d, ks);
#pragma omp parallel
    {
        float *L = malloc(ROWS * s * sizeof(float)), *e = malloc(s * sizeof(float));
        double *acc = malloc(c * sizeof(double));
        int ok = L && e && acc && ids && ks;
        if (!ok) {
#pragma omp atomic write
            rc = -1;
        }
#pragma omp for schedule(dynamic)
        for (size_t r0 = 0; r0 < p->m; r0 += ROWS) {
            if (!ok) continue;
            size_t rows = p->m - r0 < ROWS ? p->m - r0 : ROWS;
            logits(p->q + r0 * d, rows, ks, s, d, p->scale, L);
            for (size_t i = 0; i < rows; i++) {
                const float *l = L + i * s;
                exp_shifted(l, s, row_max(l, s, -INFINITY), e);
                double z = 0.0;
                memset(acc, 0, c * sizeof(double));
                for (size_t t = 0; t < s; t++) {
                    z += e[t];
                    const float *vr = p->v + ids[t] * c;
                    for (size_t col = 0; col < c; col++) acc[col] += (double)e[t] * vr[col];
                }
                for (size_t col = 0; col < c; col++) out[(r0 + i) * c + col] = (float)(acc[col] / z);
            }
        }
        free(L);
        free(e);
        free(acc);
    }
    free(ids);
    free(ks);
    return rc;
}

/* The SimHash code of each row on `bits` hyperplanes H (bits x d). */
static void simhash(const float *x, size_t count, size_t d, const float *H, int bits, uint32_t *code) {
    for (size_t i = 0; i < count; i++) {
        uint32_t h = 0;
        for (int b = 0; b < bits; b++) {
            double dot = 0.0;
            for (size_t t = 0; t < d; t++) dot += (double)x[i * d + t] * H[(size_t)b * d + t];
            h = (h << 1) | (dot > 0.0);
        }
        code[i] = h;
    }
}

/* Ids sorted by code, ties by id: qsort over (code, id) pairs. */
typedef struct coded {
    uint32_t code;
    uint32_t id;
} coded;

static int cmp_coded(const void *a, const void *b) {
    const coded *x = a, *y = b;
    if (x->code != y->code) return (x->code > y->code) - (x->code < y->code);
    return (x->id > y->id) - (x->id < y->id);
}

static int sort_by_code(const uint32_t *code, size_t count, size_t *order) {
    coded *cd = malloc(count * sizeof(coded));
    if (cd == NULL) return -1;
    for (size_t i = 0; i < count; i++) cd[i] = (coded){code[i], (uint32_t)i};
    qsort(cd, count, sizeof(coded), cmp_coded);
    for (size_t i = 0; i < count; i++) order[i] = cd[i].id;
    free(cd);
    return 0;
}

int peer_kdeformer(const peer_problem *p, size_t block, int bits, size_t probe, size_t s,
                   uint64_t seed, float *out) {
    size_t n = p->n, m = p->m, d = p->d, c = p->c;
    size_t nb = (m + block - 1) / block; /* query blocks, and as many key blocks */
    size_t kb = (n + nb - 1) / nb;       /* keys per block */
    uint64_t st = seed;
    float *H = malloc((size_t)bits * d * sizeof(float));
    uint32_t *qc = malloc(m * sizeof(uint32_t)), *kc = malloc(n * sizeof(uint32_t));
    size_t *qo = malloc(m * sizeof(size_t)), *ko = malloc(n * sizeof(size_t));
    size_t *kblk = malloc(n * sizeof(size_t)), *ids = malloc(s * sizeof(size_t));
    size_t *pr = malloc(probe * sizeof(size_t));
    double *w = malloc(n * sizeof(double)), *prob = malloc(s * sizeof(double));
    float *qp = malloc(probe * d * sizeof(float)), *Lp = malloc(probe * n * sizeof(float));
    float *ks = malloc(s * d * sizeof(float));
    int rc = H && qc && kc && qo && ko && kblk && ids && pr && w && prob && qp && Lp && ks ? 0 : -1;
    if (rc != 0) goto out;
    /* The heavy part: queries and keys sorted by their hash, block u of
     * the queries against block u of the keys. */
    for (size_t u = 0; u < (size_t)bits * d; u++) H[u] = (float)gauss(&st);
    simhash(p->q, m, d, H, bits, qc);
    simhash(p->k, n, d, H, bits, kc);
    if (sort_by_code(qc, m, qo) || sort_by_code(kc, n, ko)) {
        rc = -1;
        goto out;
    }
    for (size_t t = 0; t < n; t++) kblk[ko[t]] = t / kb;
    /* Column norms of D^-1 A, ||(D^-1 A)_{:,j}||, from `probe` queries,
     * in the log domain: each probe row normalized by its log-sum-exp,
     * then 0.5 log sum_i exp(2 l_ij), each column's largest subtracted. */
    for (size_t t = 0; t < probe; t++) pr[t] = (size_t)(splitmix(&st) % m);
    gather(p->q, pr, probe, d, qp);
    logits(qp, probe, p->k, n, d, p->scale, Lp);
    for (size_t t = 0; t < probe; t++) {
        float *lr = Lp + t * n;
        float mx = row_max(lr, n, -INFINITY);
        double z = 0.0;
        for (size_t j = 0; j < n; j++) z += exp((double)lr[j] - mx);
        if (!(z >= 1.0)) z = 1.0; /* the maximum's own term: z >= 1 */
        float lse = (float)(mx + log(z));
        for (size_t j = 0; j < n; j++) lr[j] -= lse;
    }
    double amax = -INFINITY;
    for (size_t j = 0; j < n; j++) {
        float mx = -INFINITY;
        for (size_t t = 0; t < probe; t++) mx = Lp[t * n + j] > mx ? Lp[t * n + j] : mx;
        double z = 0.0;
        for (size_t t = 0; t < probe; t++) z += exp(2.0 * ((double)Lp[t * n + j] - mx));
        double v2 = 1.0;
        for (size_t col = 0; col < c; col++) v2 += (double)p->v[j * c + col] * p->v[j * c + col];
        w[j] = mx + 0.5 * log(z) + 0.5 * log(v2); /* log of the sampling weight */
        amax = w[j] > amax ? w[j] : amax;
    }
    for (size_t j = 0; j < n; j++) w[j] = exp(w[j] - amax);
    if (draw(w, n, s, &st, ids, prob)) {
        rc = -1;
        goto out;
    }
    gather(p->k, ids, s, d, ks);
#pragma omp parallel
    {
        float *qb = malloc(block * d * sizeof(float)), *kbk = malloc(kb * d * sizeof(float));
        float *Lb = malloc(block * kb * sizeof(float)), *Ls = malloc(block * s * sizeof(float));
        float *e = malloc((kb > s ? kb : s) * sizeof(float));
        double *acc = malloc(c * sizeof(double));
        int ok = qb && kbk && Lb && Ls && e && acc;
        if (!ok) {
#pragma omp atomic write
            rc = -1;
        }
#pragma omp for schedule(dynamic)
        for (size_t u = 0; u < nb; u++) {
            if (!ok) continue;
            size_t q0 = u * block, qn = m - q0 < block ? m - q0 : block;
            size_t k0 = u * kb, kn = k0 < n ? (n - k0 < kb ? n - k0 : kb) : 0;
            gather(p->q, qo + q0, qn, d, qb);
            if (kn) {
                gather(p->k, ko + k0, kn, d, kbk);
                logits(qb, qn, kbk, kn, d, p->scale, Lb);
            }
            logits(qb, qn, ks, s, d, p->scale, Ls);
            for (size_t i = 0; i < qn; i++) {
                const float *lb = Lb + i * kn, *ls = Ls + i * s;
                float mx = row_max(ls, s, kn ? row_max(lb, kn, -INFINITY) : -INFINITY);
                double z = 0.0;
                memset(acc, 0, c * sizeof(double));
                exp_shifted(lb, kn, mx, e);
                for (size_t t = 0; t < kn; t++) {
                    z += e[t];
                    const float *vr = p->v + ko[k0 + t] * c;
                    for (size_t col = 0; col < c; col++) acc[col] += (double)e[t] * vr[col];
                }
                exp_shifted(ls, s, mx, e);
                for (size_t t = 0; t < s; t++) {
                    if (kblk[ids[t]] == u) continue; /* summed exactly above */
                    double f = (double)e[t] / ((double)s * prob[t]);
                    z += f;
                    const float *vr = p->v + ids[t] * c;
                    for (size_t col = 0; col < c; col++) acc[col] += f * vr[col];
                }
                float *o = out + qo[q0 + i] * c;
                for (size_t col = 0; col < c; col++) o[col] = (float)(acc[col] / z);
            }
        }
        free(qb);
        free(kbk);
        free(Lb);
        free(Ls);
        free(e);
        free(acc);
    }
out:
    free(H);
    free(qc);
    free(kc);
    free(qo);
    free(ko);
    free(kblk);
    free(ids);
    free(pr);
    free(w);
    free(prob);
    free(qp);
    free(Lp);
    free(ks);
    return rc;
}

/* s keys drawn in proportion to w (NULL: uniform), gathered into ks, and
 * the weight sum(w) / s of each draw; *empty when w is 0 everywhere. */
static int bimw_draws(const peer_problem *p, const double *w, size_t s, uint64_t *st, float *ks,
                      double *per, int *empty) {
    size_t n = p->n;
    size_t *ids = malloc(s * sizeof(size_t));
    double *prob = malloc(s * sizeof(double));
    int rc = ids && prob ? 0 : -1;
    *empty = 0;
    if (rc == 0 && w == NULL) {
        for (size_t t = 0; t < s; t++) ids[t] = (size_t)(splitmix(st) % n);
        *per = (double)n / (double)s;
    } else if (rc == 0) {
        double tot = 0.0;
        for (size_t j = 0; j < n; j++) tot += w[j];
        *empty = !(tot > 0.0);
        if (!*empty) rc = draw(w, n, s, st, ids, prob);
        *per = tot / (double)s;
    }
    if (rc == 0 && !*empty) gather(p->k, ids, s, p->d, ks);
    free(ids);
    free(prob);
    return rc;
}

int peer_bimw(const peer_problem *p, size_t s, uint64_t seed, float *out) {
    size_t n = p->n, m = p->m, d = p->d, c = p->c;
    uint64_t st = seed;
    /* Parts: [0] A 1 from uniform keys, then A v+ and A v- of each column;
     * each row's part u is exp(lm) * sm, its largest logit lm kept apart
     * so that the parts combine without overflow. */
    size_t nd = 1 + 2 * c;
    double *w = malloc(n * sizeof(double));
    double *lm = malloc(m * nd * sizeof(double)), *sm = malloc(m * nd * sizeof(double));
    float *ks = malloc(s * d * sizeof(float));
    int rc = w && lm && sm && ks ? 0 : -1;
    for (size_t u = 0; rc == 0 && u < nd; u++) {
        if (u > 0) {
            size_t col = (u - 1) / 2;
            double sg = (u - 1) % 2 == 0 ? 1.0 : -1.0;
            for (size_t j = 0; j < n; j++) {
                double x = sg * p->v[j * c + col];
                w[j] = x > 0.0 ? x : 0.0;
            }
        }
        double per;
        int empty;
        rc = bimw_draws(p, u ? w : NULL, s, &st, ks, &per, &empty);
        if (rc != 0) break;
        if (empty) {
            for (size_t i = 0; i < m; i++) {
                lm[i * nd + u] = 0.0;
                sm[i * nd + u] = 0.0;
            }
            continue;
        }
#pragma omp parallel
        {
            float *L = malloc(ROWS * s * sizeof(float)), *e = malloc(s * sizeof(float));
            int ok = L && e;
            if (!ok) {
#pragma omp atomic write
                rc = -1;
            }
#pragma omp for schedule(dynamic)
            for (size_t r0 = 0; r0 < m; r0 += ROWS) {
                if (!ok) continue;
                size_t rows = m - r0 < ROWS ? m - r0 : ROWS;
                logits(p->q + r0 * d, rows, ks, s, d, p->scale, L);
                for (size_t i = 0; i < rows; i++) {
                    const float *l = L + i * s;
                    float mx = row_max(l, s, -INFINITY);
                    exp_shifted(l, s, mx, e);
                    double z = 0.0;
                    for (size_t t = 0; t < s; t++) z += e[t];
                    lm[(r0 + i) * nd + u] = mx;
                    sm[(r0 + i) * nd + u] = z * per;
                }
            }
            free(L);
            free(e);
        }
    }
    for (size_t i = 0; rc == 0 && i < m; i++) {
        const double *l = lm + i * nd, *z = sm + i * nd;
        for (size_t col = 0; col < c; col++) {
            double pos = z[1 + 2 * col] * exp(l[1 + 2 * col] - l[0]);
            double neg = z[2 + 2 * col] * exp(l[2 + 2 * col] - l[0]);
            out[i * c + col] = (float)((pos - neg) / z[0]);
        }
    }
    free(w);
    free(lm);
    free(sm);
    free(ks);
    return rc;
}

/* ---------------------------------------------------- Quest-style pages */

struct peer_pages {
    const float *k;
    size_t n, d, P, np;
    float *lo, *hi; /* np x d */
};

peer_pages *peer_pages_new(const float *k, size_t n, size_t d, size_t P) {
    peer_pages *pp = calloc(1, sizeof *pp);
    if (pp == NULL || P == 0) {
        free(pp);
        return NULL;
    }
    *pp = (peer_pages){k, n, d, P, (n + P - 1) / P, NULL, NULL};
    pp->lo = malloc(pp->np * d * sizeof(float));
    pp->hi = malloc(pp->np * d * sizeof(float));
    if (!pp->lo || !pp->hi) {
        peer_pages_free(pp);
        return NULL;
    }
    for (size_t b = 0; b < pp->np; b++)
        for (size_t u = 0; u < d; u++) {
            float lo = INFINITY, hi = -INFINITY;
            for (size_t j = b * P; j < n && j < (b + 1) * P; j++) {
                lo = k[j * d + u] < lo ? k[j * d + u] : lo;
                hi = k[j * d + u] > hi ? k[j * d + u] : hi;
            }
            pp->lo[b * d + u] = lo, pp->hi[b * d + u] = hi;
        }
    return pp;
}

void peer_pages_free(peer_pages *pp) {
    if (pp == NULL) return;
    free(pp->lo);
    free(pp->hi);
    free(pp);
}

/* A min-heap of (score, page) keeping the k largest scores. */
static void heap_push(float *hs, size_t *hp, size_t *len, size_t k, float s, size_t p) {
    size_t i;
    if (*len < k) {
        i = (*len)++;
        while (i > 0 && hs[(i - 1) / 2] > s) {
            hs[i] = hs[(i - 1) / 2], hp[i] = hp[(i - 1) / 2];
            i = (i - 1) / 2;
        }
    } else {
        if (s <= hs[0]) return;
        i = 0;
        for (;;) {
            size_t a = 2 * i + 1, b = a + 1, m = i;
            float ms = s;
            if (a < k && hs[a] < ms) m = a, ms = hs[a];
            if (b < k && hs[b] < ms) m = b;
            if (m == i) break;
            hs[i] = hs[m], hp[i] = hp[m];
            i = m;
        }
    }
    hs[i] = s, hp[i] = p;
}

int peer_pages_step(const peer_pages *pp, const float *q, size_t topk, const float *v, size_t c,
                    double scale, float *out) {
    size_t d = pp->d, k = topk < pp->np ? topk : pp->np;
    float *hs = malloc(k * sizeof(float)), *l = malloc(k * pp->P * sizeof(float));
    size_t *hp = malloc(k * sizeof(size_t)), len = 0;
    double *acc = malloc(c * sizeof(double));
    if (!hs || !l || !hp || !acc) {
        free(hs), free(l), free(hp), free(acc);
        return -1;
    }
    for (size_t b = 0; b < pp->np; b++) {
        const float *lo = pp->lo + b * d, *hi = pp->hi + b * d;
        float s = 0.0f;
        for (size_t u = 0; u < d; u++) s += fmaxf(q[u] * lo[u], q[u] * hi[u]);
        heap_push(hs, hp, &len, k, s, b);
    }
    size_t cnt = 0;
    float mx = -INFINITY;
    for (size_t t = 0; t < len; t++)
        for (size_t j = hp[t] * pp->P; j < pp->n && j < (hp[t] + 1) * pp->P; j++) {
            float s = 0.0f;
            for (size_t u = 0; u < d; u++) s += q[u] * pp->k[j * d + u];
            l[cnt++] = (float)scale * s;
            mx = l[cnt - 1] > mx ? l[cnt - 1] : mx;
        }
    double z = 0.0;
    memset(acc, 0, c * sizeof(double));
    cnt = 0;
    for (size_t t = 0; t < len; t++)
        for (size_t j = hp[t] * pp->P; j < pp->n && j < (hp[t] + 1) * pp->P; j++) {
            double e = exp((double)l[cnt++] - mx);
            z += e;
            for (size_t col = 0; col < c; col++) acc[col] += e * v[j * c + col];
        }
    for (size_t col = 0; col < c; col++) out[col] = (float)(acc[col] / z);
    free(hs), free(l), free(hp), free(acc);
    return 0;
}
