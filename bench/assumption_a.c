/* The paper's Section 4 experiments i and ii, and appendix A.1.3, on real
 * attention: stories260K run over the SQuAD paragraphs, and for every
 * layer and head the Assumption A statistics of the lifted attention
 * kernel (Lemma 4.1) between the first i queries and the first i keys:
 *   c_i = (||K||_1 - a_i) / a_i, a_i the sum of the i largest entries,
 *   the i-th / (i+1)-th and i-th / 2i-th largest entries,
 * at prefix lengths i = 16, 32, 64, ... up to each paragraph's tokens.
 *
 * Writes (to --out DIR, default docs/):
 *   assumption_a_heads.csv   layer, head, max c, median of each ratio
 *   assumption_a_length.csv  i, paragraphs, mean c, standard deviation
 *   assumption_a_{c,next,double}.png and assumption_a_length.png (gnuplot)
 * The paper found c <= 4.6 on BERT. Public API and the llama runner only. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KMV_STATIC_LINKING_ONLY /* Assumption A statistics */
#include "kmv/kmv.h"
#include "kmv/kmv_experimental.h"
#include "llama/llama.h"
#include "llama/tokenizer.h"

#define MAXLEN 10 /* prefix lengths 16 .. 8192 */

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, size_t n) {
    if (n == 0) return NAN;
    qsort(v, n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static void die(const char *what) {
    fprintf(stderr, "assumption_a: %s\n", what);
    exit(1);
}

static int plot(const char *dir, const char *script) {
    FILE *gp = popen("gnuplot", "w");
    if (gp == NULL) return -1;
    fprintf(gp, "cd '%s'\n%s", dir, script);
    return pclose(gp);
}

int main(int argc, char **argv) {
    const char *model_path = "data/stories260K/stories260K.bin";
    const char *tok_path = "data/stories260K/tok512.bin";
    const char *squad = "../shared/data/squad_contexts.txt", *out = "docs";
    size_t max_par = SIZE_MAX;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--squad") && i + 1 < argc) squad = argv[++i];
        else if (!strcmp(argv[i], "--model") && i + 1 < argc) model_path = argv[++i];
        else if (!strcmp(argv[i], "--tokenizer") && i + 1 < argc) tok_path = argv[++i];
        else if (!strcmp(argv[i], "--out") && i + 1 < argc) out = argv[++i];
        else if (!strcmp(argv[i], "--paragraphs") && i + 1 < argc) max_par = strtoull(argv[++i], NULL, 10);
        else {
            fprintf(stderr, "usage: assumption_a [--squad F] [--model M] [--tokenizer T] "
                            "[--out DIR] [--paragraphs N]\n");
            return 2;
        }
    }
    char err[512];
    llm_model *m;
    llm_tokenizer *tok;
    if (llm_load(model_path, &m, err, sizeof err) != KMV_OK) die(err);
    const llm_config *c = llm_config_of(m);
    if (llm_tokenizer_load(tok_path, c->vocab_size, &tok, err, sizeof err) != KMV_OK) die(err);
    FILE *f = fopen(squad, "r");
    if (f == NULL) die("cannot open the SQuAD paragraphs (--squad)");

    size_t L = (size_t)c->n_layers, H = (size_t)c->n_heads, hs = (size_t)(c->dim / c->n_heads);
    size_t kvh = (size_t)c->n_kv_heads, kv_mul = H / kvh, T = (size_t)c->seq_len;
    double scale = 1.0 / sqrt((double)hs);
    kmv_params p;
    kmv_params_init(&p);
    p.exact = 1;
    p.sigma = kmv_attention_sigma(scale, hs);
    kmv_ctx *ctx;
    if (kmv_ctx_create(&p, &ctx) != KMV_OK) die("context");
    /* Per (layer, head): max c, and every prefix's ratios; per length: c. */
    double *cmax = calloc(L * H, sizeof(double));
    /* Ratios per (layer, head), MAXLEN per paragraph at most: grown as
     * paragraphs come. */
    size_t cap = 256 * MAXLEN, *nr = calloc(L * H, sizeof(size_t));
    double *rn = malloc(L * H * cap * sizeof(double)), *rd = malloc(L * H * cap * sizeof(double));
    double csum[MAXLEN] = {0}, csq[MAXLEN] = {0};
    size_t ccount[MAXLEN] = {0}, npar[MAXLEN] = {0};
    float *ql = malloc(T * (hs + 1) * sizeof(float)), *kl = malloc(T * (hs + 1) * sizeof(float));
    float *qh = malloc(T * hs * sizeof(float)), *kh = malloc(T * hs * sizeof(float));
    if (!cmax || !nr || !rn || !rd || !ql || !kl || !qh || !kh) die("out of memory");
    char *line = NULL;
    size_t lcap = 0, pars = 0;
    ssize_t got;
    while (pars < max_par && (got = getline(&line, &lcap, f)) > 0) {
        if (got > 0 && line[got - 1] == '\n') line[got - 1] = '\0';
        int *tk;
        size_t nt;
        if (llm_encode(tok, line, 1, &tk, &nt) != KMV_OK) die("out of memory");
        if (nt > T) nt = T;
        llm_session *s;
        if (llm_session_create(m, &p, 0, 1, &s) != KMV_OK) die("session");
        const float *lg;
        for (size_t u = 0; u < nt; u++)
            if (llm_forward(s, tk[u], &lg) != KMV_OK) die("forward");
        pars++;
        if (pars * MAXLEN > cap) { /* room for this paragraph's ratios */
            size_t nc = 2 * cap;
            double *a = malloc(L * H * nc * sizeof(double)), *b = malloc(L * H * nc * sizeof(double));
            if (a == NULL || b == NULL) die("out of memory");
            for (size_t u = 0; u < L * H; u++) {
                memcpy(a + u * nc, rn + u * cap, nr[u] * sizeof(double));
                memcpy(b + u * nc, rd + u * cap, nr[u] * sizeof(double));
            }
            free(rn);
            free(rd);
            rn = a;
            rd = b;
            cap = nc;
        }
        for (size_t l = 0; l < L; l++) {
            const float *dq = llm_dump_q(s, (int)l), *dk = llm_dump_k(s, (int)l);
            for (size_t h = 0; h < H; h++) {
                size_t g = h / kv_mul;
                for (size_t t = 0; t < nt; t++) {
                    memcpy(qh + t * hs, dq + t * H * hs + h * hs, hs * sizeof(float));
                    memcpy(kh + t * hs, dk + t * kvh * hs + g * hs, hs * sizeof(float));
                }
                for (size_t li = 0, i = 16; li < MAXLEN && i <= nt; li++, i *= 2) {
                    double alpha = kmv_max_sq_norm(kh, i, hs);
                    kmv_tail_stats ts;
                    if (kmv_attention_lift(qh, i, hs, 0, alpha, ql) != KMV_OK ||
                        kmv_attention_lift(kh, i, hs, 1, alpha, kl) != KMV_OK ||
                        kmv_tail_stats_compute(ctx, ql, kl, i, hs + 1, &ts) != KMV_OK)
                        die("statistics");
                    size_t u = l * H + h;
                    if (ts.c > cmax[u]) cmax[u] = ts.c;
                    rn[u * cap + nr[u]] = ts.ratio_next;
                    rd[u * cap + nr[u]] = ts.ratio_double;
                    nr[u]++;
                    csum[li] += ts.c;
                    csq[li] += ts.c * ts.c;
                    ccount[li]++;
                    if (l == 0 && h == 0) npar[li]++;
                }
            }
        }
        llm_session_free(s);
        free(tk);
        if (pars % 20 == 0) fprintf(stderr, "assumption_a: %zu paragraphs\n", pars);
    }
    free(line);
    fclose(f);

    char path[1024];
    snprintf(path, sizeof path, "%s/assumption_a_heads.csv", out);
    FILE *o = fopen(path, "w");
    if (o == NULL) die("cannot write the heads table");
    fprintf(o, "layer,head,max_c,median_ratio_next,median_ratio_double\n");
    double worst = 0.0;
    for (size_t l = 0; l < L; l++)
        for (size_t h = 0; h < H; h++) {
            size_t u = l * H + h;
            fprintf(o, "%zu,%zu,%.4f,%.4f,%.4f\n", l, h, cmax[u], median(rn + u * cap, nr[u]),
                    median(rd + u * cap, nr[u]));
            worst = cmax[u] > worst ? cmax[u] : worst;
        }
    fclose(o);
    snprintf(path, sizeof path, "%s/assumption_a_length.csv", out);
    o = fopen(path, "w");
    if (o == NULL) die("cannot write the length table");
    fprintf(o, "i,paragraphs,mean_c,std_c\n");
    for (size_t li = 0, i = 16; li < MAXLEN; li++, i *= 2) {
        if (ccount[li] == 0) continue;
        double mean = csum[li] / (double)ccount[li];
        double var = csq[li] / (double)ccount[li] - mean * mean;
        fprintf(o, "%zu,%zu,%.4f,%.4f\n", i, npar[li], mean, sqrt(var > 0 ? var : 0));
    }
    fclose(o);
    printf("assumption_a: %zu paragraphs, %zu layers x %zu heads; largest c %.3f (the paper: "
           "<= 4.6 on BERT); tables in %s/\n",
           pars, L, H, worst, out);
    static const char *heat =
        "set terminal pngcairo size 760,440\n"
        "set datafile separator ','\n"
        "set xlabel 'head'\nset ylabel 'layer'\nset yrange [-0.5:%zu.5] reverse\n"
        "set xrange [-0.5:%zu.5]\nset palette rgb 33,13,10\n";
    char script[4096];
    int n = snprintf(script, sizeof script, heat, L - 1, H - 1);
    const char *cols[3] = {"3", "4", "5"}, *names[3] = {"c", "next", "double"};
    const char *titles[3] = {"largest c over paragraphs and prefixes",
                             "median i-th / (i+1)-th largest entry",
                             "median i-th / 2i-th largest entry"};
    for (int w = 0; w < 3; w++)
        n += snprintf(script + n, sizeof script - (size_t)n,
                      "%s"
                      "set output 'assumption_a_%s.png'\nset title 'stories260K on SQuAD: %s'\n"
                      "plot 'assumption_a_heads.csv' every ::1 using 2:1:%s with image notitle, "
                      "'' every ::1 using 2:1:(sprintf('%%.3g', $%s)) with labels notitle\n",
                      w == 2 ? "set logscale cb\n" : "", names[w], titles[w], cols[w], cols[w]);
    snprintf(script + n, sizeof script - (size_t)n,
             "set output 'assumption_a_length.png'\nset title 'c_i against prefix length: mean "
             "and std over paragraphs, layers, heads'\n"
             "unset logscale cb\nunset yrange\nset xrange [12:700]\nset logscale x 2\nset xlabel 'prefix length i'\n"
             "set ylabel 'c_i'\nplot 'assumption_a_length.csv' every ::1 using 1:3:4 with "
             "yerrorlines notitle\n");
    if (plot(out, script) != 0) fprintf(stderr, "assumption_a: gnuplot failed; tables written\n");
    kmv_ctx_free(ctx);
    llm_tokenizer_free(tok);
    llm_free(m);
    return 0;
}
