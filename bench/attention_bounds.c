/* How tight can a certificate for attention be? The bound-shape study of
 * issue 18 on stories260K's attention within its trained context (512
 * tokens): per layer and head, the share of keys a certified step must
 * visit, for each page bound tried, against an oracle's.
 *
 *   attention_bounds [--text F] [--model M] [--tokenizer T] [--eps E]
 *                    [--page P] [--csv out.csv]
 *
 * The model scores the text (default data/stories260K/stories_generated.txt,
 * the model's own greedy stories) with exact attention, keeping every
 * position's rotated q and k (llama/, as kmv decode --dump-qk). For each
 * layer, head and position t >= 64, the keys 0..t fall into pages of P
 * (16) consecutive tokens, the way a decoding stream fills them. With
 * w_j = exp(s_j - max s), s_j = <q, k_j> / sqrt(head size):
 *
 *  - certified: pages visited in the order of their upper bound u_p on s_j,
 *    every key of a visited page summed, until what is left is certified
 *    small: sum over unvisited pages of |p| exp(u_p - max s) <= eps times
 *    the visited keys' sum of w (the normaliser's rule; each value column
 *    adds only a factor max |v|);
 *  - oracle: the fewest keys whose complement's true sum of w is at most
 *    eps times theirs (keys taken by decreasing w).
 *
 * Bound shapes u_p, each rigorous for every key of the page:
 *  - ball: centre c (mean), radius r: <q, c> + ||q|| r;
 *  - box (Quest's): per coordinate [lo, hi]: sum_u max(q_u lo_u, q_u hi_u);
 *  - pca box: the box in the page's principal axes (Jacobi on its 8 x 8
 *    covariance), around c;
 *  - gauss lift (node alpha / global alpha): Lemma 4.1 in the Gaussian
 *    form a kernel certificate (the LSH path, the bounds tree) works in:
 *    keys lifted to [k, sqrt(alpha - ||k||^2)], <q, k> = (||q||^2 + alpha -
 *    ||q' - k'||^2) / 2, bounded by the distance to the lifted page's ball;
 *    alpha the page's largest ||k||^2, or one alpha for all keys (what a
 *    single lifted index must take).
 *
 * Prints, per shape, the mean visited share over heads, its ratio to the
 * oracle's (mean, median, worst, heads within 3x), the mean overshoot of
 * u_p over the page's true largest logit, and the work of a certified step
 * against the exact row's n d multiply-adds (every page's bound at its
 * cost, d to d^2 + 2 d, plus d per visited key); --csv writes per layer
 * and head. Public API and the llama runner only. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kmv/kmv.h"
#include "llama/llama.h"
#include "llama/tokenizer.h"

#define NSHAPE 5
#define T0 64 /* positions below: every key is a handful of pages */
static const char *shape_name[NSHAPE] = {"ball", "box", "pca_box", "gauss_lift_node",
                                         "gauss_lift_global"};

static void die(const char *what) {
    fprintf(stderr, "attention_bounds: %s\n", what);
    exit(1);
}

static double dot(const float *a, const float *b, size_t d) {
    double s = 0.0;
    for (size_t u = 0; u < d; u++) s += (double)a[u] * b[u];
    return s;
}

/* Eigenvectors of the symmetric d x d matrix A (destroyed) into V's
 * columns, by cyclic Jacobi rotations. */
static void jacobi(double *A, double *V, size_t d) {
    for (size_t i = 0; i < d; i++)
        for (size_t j = 0; j < d; j++) V[i * d + j] = i == j;
    for (int sweep = 0; sweep < 30; sweep++) {
        double off = 0.0;
        for (size_t i = 0; i < d; i++)
            for (size_t j = i + 1; j < d; j++) off += A[i * d + j] * A[i * d + j];
        if (off < 1e-20) return;
        for (size_t p = 0; p < d; p++)
            for (size_t q = p + 1; q < d; q++) {
                double apq = A[p * d + q];
                if (fabs(apq) < 1e-300) continue;
                double th = 0.5 * (A[q * d + q] - A[p * d + p]) / apq;
                double t = (th >= 0 ? 1.0 : -1.0) / (fabs(th) + sqrt(th * th + 1.0));
                double c = 1.0 / sqrt(t * t + 1.0), s = t * c;
                for (size_t k = 0; k < d; k++) {
                    double akp = A[k * d + p], akq = A[k * d + q];
                    A[k * d + p] = c * akp - s * akq;
                    A[k * d + q] = s * akp + c * akq;
                }
                for (size_t k = 0; k < d; k++) {
                    double apk = A[p * d + k], aqk = A[q * d + k];
                    A[p * d + k] = c * apk - s * aqk;
                    A[q * d + k] = s * apk + c * aqk;
                }
                for (size_t k = 0; k < d; k++) {
                    double vkp = V[k * d + p], vkq = V[k * d + q];
                    V[k * d + p] = c * vkp - s * vkq;
                    V[k * d + q] = s * vkp + c * vkq;
                }
            }
    }
}

#define DMAX 64

/* What each shape keeps of a page of keys (rows of d, stride ld). */
typedef struct page {
    size_t n;
    double c[DMAX], r;                 /* ball */
    double lo[DMAX], hi[DMAX];         /* box */
    double U[DMAX * DMAX], plo[DMAX], phi[DMAX]; /* pca box about c */
    double alpha, lr;                  /* lifted ball, node alpha: radius */
    double lc_last;                    /* its centre's extra coordinate */
    double glr, glc_last;              /* the same under the global alpha */
} page;

static void page_fit(page *p, const float *k, size_t n, size_t d, size_t ld, double galpha) {
    p->n = n;
    for (size_t u = 0; u < d; u++) {
        p->c[u] = 0.0, p->lo[u] = INFINITY, p->hi[u] = -INFINITY;
        for (size_t j = 0; j < n; j++) {
            double v = k[j * ld + u];
            p->c[u] += v / (double)n;
            p->lo[u] = v < p->lo[u] ? v : p->lo[u];
            p->hi[u] = v > p->hi[u] ? v : p->hi[u];
        }
    }
    double A[DMAX * DMAX] = {0};
    p->r = 0.0, p->alpha = 0.0;
    for (size_t j = 0; j < n; j++) {
        double e = 0.0, kn = 0.0;
        for (size_t u = 0; u < d; u++) {
            double x = k[j * ld + u] - p->c[u];
            e += x * x;
            kn += (double)k[j * ld + u] * k[j * ld + u];
            for (size_t w = 0; w < d; w++) A[u * d + w] += x * (k[j * ld + w] - p->c[w]);
        }
        p->r = sqrt(e) > p->r ? sqrt(e) : p->r;
        p->alpha = kn > p->alpha ? kn : p->alpha;
    }
    jacobi(A, p->U, d);
    for (size_t a = 0; a < d; a++) p->plo[a] = INFINITY, p->phi[a] = -INFINITY;
    for (size_t j = 0; j < n; j++)
        for (size_t a = 0; a < d; a++) {
            double y = 0.0;
            for (size_t u = 0; u < d; u++) y += p->U[u * d + a] * (k[j * ld + u] - p->c[u]);
            p->plo[a] = y < p->plo[a] ? y : p->plo[a];
            p->phi[a] = y > p->phi[a] ? y : p->phi[a];
        }
    /* lifted pages: the extra coordinate sqrt(alpha - ||k||^2) */
    for (int g = 0; g < 2; g++) {
        double al = g ? galpha : p->alpha, cl = 0.0, r = 0.0;
        for (size_t j = 0; j < n; j++) cl += sqrt(fmax(0.0, al - dot(k + j * ld, k + j * ld, d))) / (double)n;
        for (size_t j = 0; j < n; j++) {
            double e = 0.0;
            for (size_t u = 0; u < d; u++) e += (k[j * ld + u] - p->c[u]) * (k[j * ld + u] - p->c[u]);
            double x = sqrt(fmax(0.0, al - dot(k + j * ld, k + j * ld, d))) - cl;
            e += x * x;
            r = sqrt(e) > r ? sqrt(e) : r;
        }
        if (g) p->glr = r, p->glc_last = cl;
        else p->lr = r, p->lc_last = cl;
    }
}

/* The page's bound on <q, k> under shape s. */
static double page_ub(const page *p, int s, const float *q, size_t d, double galpha) {
    double qc = 0.0, qn2 = 0.0;
    for (size_t u = 0; u < d; u++) qc += q[u] * p->c[u], qn2 += (double)q[u] * q[u];
    switch (s) {
    case 0: return qc + sqrt(qn2) * p->r;
    case 1: {
        double b = 0.0;
        for (size_t u = 0; u < d; u++) b += fmax(q[u] * p->lo[u], q[u] * p->hi[u]);
        return b;
    }
    case 2: {
        double b = qc;
        for (size_t a = 0; a < d; a++) {
            double qa = 0.0;
            for (size_t u = 0; u < d; u++) qa += p->U[u * d + a] * q[u];
            b += fmax(qa * p->plo[a], qa * p->phi[a]);
        }
        return b;
    }
    default: {
        /* q' = [q, 0]; c' = [c, cl]: ||q' - c'||^2 = ||q - c||^2 + cl^2 */
        int g = s == 4;
        double al = g ? galpha : p->alpha, cl = g ? p->glc_last : p->lc_last, r = g ? p->glr : p->lr;
        double qc2 = 0.0;
        for (size_t u = 0; u < d; u++) qc2 += (q[u] - p->c[u]) * (q[u] - p->c[u]);
        double dist = sqrt(qc2 + cl * cl) - r;
        if (dist < 0.0) dist = 0.0;
        return 0.5 * (qn2 + al - dist * dist);
    }
    }
}

typedef struct ub_page {
    double ub;
    size_t n;
    double mass; /* its keys' sum of w */
} ub_page;

static int cmp_ub(const void *a, const void *b) {
    double x = ((const ub_page *)a)->ub, y = ((const ub_page *)b)->ub;
    return (x < y) - (x > y);
}

static int cmp_desc(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x < y) - (x > y);
}

static int cmp_asc(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    const char *text = "data/stories260K/stories_generated.txt";
    const char *model = "data/stories260K/stories260K.bin", *tokp = "data/stories260K/tok512.bin";
    const char *csv = NULL;
    double eps = 0.1;
    size_t P = 16;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--text") && i + 1 < argc) text = argv[++i];
        else if (!strcmp(argv[i], "--model") && i + 1 < argc) model = argv[++i];
        else if (!strcmp(argv[i], "--tokenizer") && i + 1 < argc) tokp = argv[++i];
        else if (!strcmp(argv[i], "--eps") && i + 1 < argc) eps = atof(argv[++i]);
        else if (!strcmp(argv[i], "--page") && i + 1 < argc) P = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--csv") && i + 1 < argc) csv = argv[++i];
        else {
            fprintf(stderr, "usage: attention_bounds [--text F] [--model M] [--tokenizer T] "
                            "[--eps E] [--page P] [--csv out.csv]\n");
            return 2;
        }
    }
    if (P < 1 || !(eps > 0.0)) die("--page must be >= 1 and --eps > 0");
    char err[512];
    llm_model *m;
    llm_tokenizer *tok;
    if (llm_load(model, &m, err, sizeof err) != KMV_OK) die(err);
    const llm_config *c = llm_config_of(m);
    if (llm_tokenizer_load(tokp, c->vocab_size, &tok, err, sizeof err) != KMV_OK) die(err);
    FILE *f = fopen(text, "rb");
    if (f == NULL) die("cannot open the text (--text)");
    static char buf[1 << 22];
    size_t len = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[len] = '\0';
    int *tk;
    size_t nt;
    if (llm_encode(tok, buf, 1, &tk, &nt) != KMV_OK) die("out of memory");
    size_t T = nt < (size_t)c->seq_len ? nt : (size_t)c->seq_len;
    size_t L = (size_t)c->n_layers, H = (size_t)c->n_heads, hs = (size_t)(c->dim / c->n_heads);
    size_t kvh = (size_t)c->n_kv_heads, kv_mul = H / kvh;
    if (hs > DMAX) die("head size past 64");
    kmv_params p;
    kmv_params_init(&p);
    p.exact = 1;
    llm_session *s;
    if (llm_session_create(m, &p, 0, 1, &s) != KMV_OK) die("session");
    const float *lg;
    for (size_t u = 0; u < T; u++)
        if (llm_forward(s, tk[u], &lg) != KMV_OK) die("forward");
    double scale = 1.0 / sqrt((double)hs);
    size_t npages = (T + P - 1) / P;
    page *pg = malloc(npages * sizeof *pg), part;
    ub_page *up = malloc((npages + 1) * sizeof *up);
    double *w = malloc(T * sizeof(double)), *ws = malloc(T * sizeof(double));
    double *frac = calloc(L * H * (NSHAPE + 1), sizeof(double));
    double *over = calloc(L * H * NSHAPE, sizeof(double));
    double *work = calloc(L * H * NSHAPE, sizeof(double));
    if (!pg || !up || !w || !ws || !frac || !over || !work) die("out of memory");
    /* a bound's multiply-adds: ball d, box 2 d, pca box d^2 + 2 d, lifted
     * ball (a distance) 2 d */
    double bcost[NSHAPE] = {(double)hs, 2.0 * (double)hs, (double)(hs * hs + 2 * hs), 2.0 * (double)hs,
                            2.0 * (double)hs};
    FILE *out = csv ? fopen(csv, "w") : NULL;
    if (csv && out == NULL) die("cannot write --csv");
    if (out) fprintf(out, "layer,head,shape,visited_share,oracle_share,ratio,overshoot_logits,work\n");
    for (size_t l = 0; l < L; l++) {
        const float *dq = llm_dump_q(s, (int)l), *dk = llm_dump_k(s, (int)l);
        for (size_t g = 0; g < kvh; g++) {
            const float *K = dk + g * hs; /* row stride kvh * hs */
            size_t ld = kvh * hs;
            double galpha = 0.0;
            for (size_t j = 0; j < T; j++) galpha = fmax(galpha, dot(K + j * ld, K + j * ld, hs));
            for (size_t b = 0; b + 1 <= T / P; b++) page_fit(&pg[b], K + b * P * ld, P, hs, ld, galpha);
            for (size_t h = g * kv_mul; h < (g + 1) * kv_mul; h++) {
                double *fr = frac + (l * H + h) * (NSHAPE + 1), *ov = over + (l * H + h) * NSHAPE;
                double *wk = work + (l * H + h) * NSHAPE;
                size_t npos = 0, novers = 0;
                for (size_t t = T0; t < T; t++) {
                    const float *q = dq + t * H * hs + h * hs;
                    size_t n = t + 1, full = n / P, rest = n - full * P;
                    double mx = -INFINITY;
                    for (size_t j = 0; j < n; j++) {
                        w[j] = scale * dot(q, K + j * ld, hs);
                        mx = w[j] > mx ? w[j] : mx;
                    }
                    double Z = 0.0;
                    for (size_t j = 0; j < n; j++) Z += (ws[j] = exp(w[j] - mx));
                    if (rest) page_fit(&part, K + full * P * ld, rest, hs, ld, galpha);
                    size_t np = full + (rest > 0);
                    for (int sh = 0; sh < NSHAPE; sh++) {
                        for (size_t b = 0; b < np; b++) {
                            const page *pp = b < full ? &pg[b] : &part;
                            double pm = 0.0, pmax = -INFINITY;
                            for (size_t j = b * P; j < b * P + pp->n; j++) {
                                pm += ws[j];
                                pmax = w[j] > pmax ? w[j] : pmax;
                            }
                            up[b] = (ub_page){scale * page_ub(pp, sh, q, hs, galpha), pp->n, pm};
                            ov[sh] += up[b].ub - pmax;
                            novers++;
                        }
                        qsort(up, np, sizeof *up, cmp_ub);
                        double bound = 0.0, vis = 0.0;
                        for (size_t b = 0; b < np; b++) bound += (double)up[b].n * exp(up[b].ub - mx);
                        size_t visited = 0, b = 0;
                        while (b < np && bound > eps * vis) {
                            bound -= (double)up[b].n * exp(up[b].ub - mx);
                            vis += up[b].mass;
                            visited += up[b].n;
                            b++;
                        }
                        fr[sh] += (double)visited / (double)n;
                        wk[sh] += ((double)np * bcost[sh] + (double)visited * (double)hs) /
                                  ((double)n * (double)hs);
                    }
                    qsort(ws, n, sizeof(double), cmp_desc);
                    double taken = 0.0;
                    size_t k = 0;
                    while (k < n && Z - taken > eps * taken) taken += ws[k++];
                    fr[NSHAPE] += (double)k / (double)n;
                    npos++;
                }
                for (int sh = 0; sh <= NSHAPE; sh++) fr[sh] /= (double)npos;
                for (int sh = 0; sh < NSHAPE; sh++) ov[sh] /= (double)novers / NSHAPE;
                for (int sh = 0; sh < NSHAPE; sh++) wk[sh] /= (double)npos;
                if (out)
                    for (int sh = 0; sh < NSHAPE; sh++)
                        fprintf(out, "%zu,%zu,%s,%.5f,%.5f,%.2f,%.2f,%.3f\n", l, h, shape_name[sh],
                                fr[sh], fr[NSHAPE], fr[sh] / fr[NSHAPE], ov[sh], wk[sh]);
            }
        }
    }
    if (out) fclose(out);
    size_t nh = L * H;
    double *r = malloc(nh * sizeof(double));
    double omean = 0.0;
    for (size_t u = 0; u < nh; u++) omean += frac[u * (NSHAPE + 1) + NSHAPE] / (double)nh;
    printf("# stories260K, %zu positions (%zu heads x %zu layers), pages of %zu tokens, eps %g;\n"
           "# shares of the keys a certified step visits, positions %zu..%zu; oracle mean %.4f\n",
           T, H, L, P, eps, (size_t)T0, T - 1, omean);
    printf("shape,mean_share,mean_ratio,median_ratio,worst_ratio,heads_within_3x,mean_overshoot,"
           "mean_work\n");
    for (int sh = 0; sh < NSHAPE; sh++) {
        double ms = 0.0, mr = 0.0, mo = 0.0, mw = 0.0;
        size_t within = 0;
        for (size_t u = 0; u < nh; u++) {
            const double *fr = frac + u * (NSHAPE + 1);
            r[u] = fr[sh] / fr[NSHAPE];
            ms += fr[sh] / (double)nh, mr += r[u] / (double)nh, mo += over[u * NSHAPE + (size_t)sh] / (double)nh;
            mw += work[u * NSHAPE + (size_t)sh] / (double)nh;
            within += r[u] <= 3.0;
        }
        qsort(r, nh, sizeof(double), cmp_asc);
        printf("%s,%.4f,%.2f,%.2f,%.2f,%zu/%zu,%.2f,%.3f\n", shape_name[sh], ms, mr, r[nh / 2],
               r[nh - 1], within, nh, mo, mw);
    }
    free(r);
    free(pg);
    free(up);
    free(w);
    free(ws);
    free(frac);
    free(over);
    free(work);
    free(tk);
    llm_session_free(s);
    llm_tokenizer_free(tok);
    llm_free(m);
    return 0;
}
