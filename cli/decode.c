/* kmv decode: a llama2.c checkpoint run token by token, its attention
 * through kmv attention streams (llama/). Unless --exact, an exact
 * session runs beside the approximate one on the same tokens, so every
 * position compares the two next-token distributions. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/io.h"
#include "cli/npz.h"
#include "cli/text.h"
#include "llama/llama.h"
#include "llama/tokenizer.h"

#define CMD "decode"

static int argmax(const float *v, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[best]) best = i;
    return best;
}

/* log softmax of v into out (double). */
static void log_softmax(const float *v, int n, double *out) {
    int b = argmax(v, n);
    double mx = v[b], z = 1.0; /* the maximum's own term */
    for (int i = 0; i < n; i++)
        if (i != b) z += exp((double)v[i] - mx);
    double lz = mx + log(z);
    for (int i = 0; i < n; i++) out[i] = (double)v[i] - lz;
}

/* Whether len bytes are UTF-8 text: well-formed sequences (no overlong
 * forms or surrogates) and no NUL, which no text holds. */
static int is_text(const unsigned char *b, size_t len) {
    for (size_t i = 0; i < len;) {
        unsigned c = b[i];
        size_t more = c < 0x80 ? 0 : (c >> 5) == 6 ? 1 : (c >> 4) == 14 ? 2 : (c >> 3) == 30 ? 3 : 9;
        if (c == 0 || more == 9 || (more == 1 && c < 0xc2)) return 0;
        uint32_t cp = more == 0 ? c : c & (0x3fu >> more);
        for (size_t u = 1; u <= more; u++) {
            if (i + u >= len || (b[i + u] & 0xc0) != 0x80) return 0;
            cp = cp << 6 | (b[i + u] & 0x3fu);
        }
        if ((more == 2 && (cp < 0x800 || (cp >= 0xd800 && cp < 0xe000))) ||
            (more == 3 && (cp < 0x10000 || cp > 0x10ffff)))
            return 0;
        i += more + 1;
    }
    return 1;
}

/* The whole file at path as a NUL-terminated string in *out. Returns 0 or
 * EXIT_FAIL (message printed). */
static int read_text(const char *path, char **out) {
    text t = {0};
    FILE *f = fopen(path, "rb");
    *out = NULL;
    if (f == NULL) {
        fprintf(stderr, "kmv " CMD ": %s: cannot open: %s\n", path, strerror(errno));
        return EXIT_FAIL;
    }
    char buf[65536];
    size_t got;
    while ((got = fread(buf, 1, sizeof buf, f)) > 0) text_add(&t, buf, got);
    int bad = ferror(f);
    fclose(f);
    if (bad || t.failed) {
        fprintf(stderr, "kmv " CMD ": %s: %s\n", path, bad ? "read error" : "out of memory");
        text_free(&t);
        return EXIT_FAIL;
    }
    if (!is_text((const unsigned char *)t.s, t.len)) {
        fprintf(stderr, "kmv " CMD ": %s: not UTF-8 text (a NUL byte or an invalid sequence)\n",
                path);
        text_free(&t);
        return EXIT_FAIL;
    }
    text_add(&t, "", 0); /* an empty file still gets its NUL */
    *out = t.s != NULL ? t.s : calloc(1, 1);
    return *out != NULL ? 0 : EXIT_FAIL;
}

/* The exact session's q, k and v of the first pos positions, as an .npz
 * archive on the output of --dump-qk. */
static int write_dump(const llm_session *s, const llm_config *c, size_t pos,
                      const io_outputs *outs) {
    size_t L = (size_t)c->n_layers, hs = (size_t)(c->dim / c->n_heads);
    npz_entry *e = calloc(3 * L, sizeof *e);
    char(*names)[32] = calloc(3 * L, sizeof *names);
    unsigned char *bytes = NULL;
    size_t len = 0;
    int rc = EXIT_FAIL;
    if (e == NULL || names == NULL || pos == 0) {
        fprintf(stderr, "kmv " CMD ": --dump-qk: %s\n", pos == 0 ? "no tokens to dump" : "out of memory");
        goto out;
    }
    for (size_t l = 0; l < L; l++) {
        const float *src[3] = {llm_dump_q(s, (int)l), llm_dump_k(s, (int)l), llm_dump_v(s, (int)l)};
        for (int w = 0; w < 3; w++) {
            size_t u = 3 * l + (size_t)w;
            snprintf(names[u], sizeof names[u], "%c_%zu", "qkv"[w], l);
            e[u] = (npz_entry){names[u], src[w],
                               {pos, (size_t)(w == 0 ? c->n_heads : c->n_kv_heads), hs, 0}, 3};
        }
    }
    int built = npz_build(e, 3 * L, &bytes, &len);
    if (built != 0) {
        fprintf(stderr, "kmv " CMD ": --dump-qk: %s\n",
                built == -2 ? "past the .npz format's limits (4 GB, 65535 arrays)" : "out of memory");
        goto out;
    }
    rc = io_write(outs, "dump-qk", bytes, len);
out:
    free(bytes);
    free(e);
    free(names);
    return rc;
}

/* Running comparison of the approximate session's next-token
 * distributions with the exact one's. */
typedef struct compare {
    size_t agree, compared;
    double kl, nll_a, nll_e;
} compare;

static void compare_step(compare *cm, const float *lg_e, const float *lg_a, int vocab, int next,
                         double *le, double *la) {
    log_softmax(lg_e, vocab, le);
    cm->nll_e -= le[next];
    if (lg_a == NULL) return;
    log_softmax(lg_a, vocab, la);
    cm->nll_a -= la[next];
    double k = 0.0;
    for (int i = 0; i < vocab; i++) k += exp(le[i]) * (le[i] - la[i]);
    cm->kl += k;
    cm->agree += argmax(lg_a, vocab) == argmax(lg_e, vocab);
    cm->compared++;
}

/* --report: the run cut into context buckets, positions [0, 512),
 * [512, 1024), [1024, 2048), ..., each named by its end. */
#define BUCKETS 24

typedef struct bucket {
    size_t steps, attn_steps, approx_steps;
    double t_exact, t_kmv, worst;
    compare cm;
} bucket;

static size_t bucket_of(size_t pos) {
    size_t b = 0;
    while (b + 1 < BUCKETS && pos >= ((size_t)512 << b)) b++;
    return b;
}

/* The run's totals: the buckets' sums (their largest bound). */
static bucket sum_buckets(const bucket *bk) {
    bucket tot;
    memset(&tot, 0, sizeof tot);
    for (size_t b = 0; b < BUCKETS; b++) {
        tot.steps += bk[b].steps, tot.attn_steps += bk[b].attn_steps;
        tot.approx_steps += bk[b].approx_steps;
        tot.t_exact += bk[b].t_exact, tot.t_kmv += bk[b].t_kmv;
        tot.worst = bk[b].worst > tot.worst ? bk[b].worst : tot.worst;
        tot.cm.agree += bk[b].cm.agree, tot.cm.compared += bk[b].cm.compared;
        tot.cm.kl += bk[b].cm.kl, tot.cm.nll_e += bk[b].cm.nll_e, tot.cm.nll_a += bk[b].cm.nll_a;
    }
    return tot;
}

static void bucket_json(text *t, const bucket *b, size_t context, int approx) {
    double n = b->steps ? (double)b->steps : 1.0, as = b->attn_steps ? (double)b->attn_steps : 1.0;
    text_put(t,
             "{\"context\": %zu, \"steps\": %zu, \"attention_steps\": %zu, \"approx_steps\": %zu, "
             "\"exact_us_per_step\": ",
             context, b->steps, b->attn_steps, b->approx_steps);
    text_num(t, 1e6 * b->t_exact / as);
    text_put(t, ", \"kmv_us_per_step\": ");
    text_num(t, approx ? 1e6 * b->t_kmv / as : NAN);
    text_put(t, ", \"worst_bound\": ");
    text_num(t, approx && b->approx_steps ? b->worst : NAN);
    text_put(t, ", \"top1_agreement\": ");
    text_num(t, approx && b->cm.compared ? (double)b->cm.agree / (double)b->cm.compared : NAN);
    text_put(t, ", \"mean_kl\": ");
    text_num(t, approx && b->cm.compared ? b->cm.kl / (double)b->cm.compared : NAN);
    text_put(t, ", \"log_loss\": ");
    text_num(t, b->cm.nll_e / n);
    text_put(t, ", \"log_loss_kmv\": ");
    text_num(t, approx ? b->cm.nll_a / n : NAN);
    text_put(t, "}");
}

/* The report's JSON on the output named "report". */
static int write_report(const bucket *bk, const llm_config *c, size_t context, double eps,
                        int approx, const io_outputs *outs) {
    text t = {0};
    text_put(&t, "{\n  \"context\": %zu,\n  \"trained_context\": %d,\n  \"eps\": ", context,
             c->seq_len);
    text_num(&t, eps);
    text_put(&t, ",\n  \"attention_steps_per_position\": %d,\n  \"buckets\": [",
             c->n_layers * c->n_heads);
    int first = 1;
    for (size_t b = 0; b < BUCKETS; b++) {
        if (bk[b].steps == 0) continue;
        text_put(&t, "%s\n    ", first ? "" : ",");
        first = 0;
        bucket_json(&t, &bk[b], (size_t)512 << b, approx);
    }
    bucket tot = sum_buckets(bk);
    text_put(&t, "\n  ],\n  \"totals\": ");
    bucket_json(&t, &tot, tot.steps, approx);
    text_put(&t, "\n}\n");
    int rc = EXIT_FAIL;
    if (t.failed) fprintf(stderr, "kmv " CMD ": --report: out of memory\n");
    else rc = io_write(outs, "report", t.s, t.len);
    text_free(&t);
    return rc;
}

static void report(const compare *cm, size_t pos, const llm_session *se, const llm_session *sa,
                   double eps) {
    size_t scored = pos > 0 ? pos : 1;
    fprintf(stderr, "kmv " CMD ": %zu positions; exact attention: %.1f%% of forward time, "
                    "mean log-loss %.4f\n",
            pos, 100.0 * llm_attention_seconds(se) / llm_forward_seconds(se),
            cm->nll_e / (double)scored);
    if (sa == NULL) return;
    llm_attn_stats as = llm_attention_stats(sa);
    static const char *why[KMV_FALLBACK_TREE + 1] = {
        "", "no LSH plan", "heavy search", "sample budget", "columns", "budget", "small context",
        "memory", "bounds tree"};
    int top = 1;
    for (int r = 1; r <= KMV_FALLBACK_TREE; r++)
        if (as.exact_why[r] > as.exact_why[top]) top = r;
    fprintf(stderr,
            "kmv " CMD ": approximate attention (eps %g): %.1f%% of forward time, "
            "%zu of %zu steps approximate (of the exact ones, most for: %s), worst bound %.3g; "
            "top-1 agreement with exact %.4f, mean KL(exact || approx) %.3g nats, "
            "mean log-loss %.4f\n",
            eps, 100.0 * llm_attention_seconds(sa) / llm_forward_seconds(sa), as.approx_steps,
            as.steps, as.approx_steps < as.steps ? why[top] : "none", as.worst_bound,
            cm->compared ? (double)cm->agree / (double)cm->compared : 1.0,
            cm->compared ? cm->kl / (double)cm->compared : 0.0, cm->nll_a / (double)scored);
}

int cmd_decode(int argc, char **argv) {
    opt o[] = {
        INPUT("model", 1, "M.bin", "llama2.c checkpoint"),
        INPUT("tokenizer", 1, "T.bin", "llama2.c tokenizer"),
        OPTION("prompt", OPT_STRING, "TEXT", "generate (greedy) after TEXT (\"\": from BOS alone)"),
        INPUT("text-file", 0, "F", "score the UTF-8 text in F instead"),
        OPTION("steps", OPT_INT, "N", "positions to run, prompt included (default: the context)"),
        OPTION("context", OPT_INT, "N", "positions the sessions hold (default: the model's "
                                        "seq_len; past it the model runs outside its trained "
                                        "range, rotary angles computed per position)"),
        FLAG("exact", "exact attention only (no comparison)"),
        OPTION("eps", OPT_DOUBLE, "E", "attention error target, in (0, 1) (default 0.1)"),
        OPTION("delta", OPT_DOUBLE, "P", "failure probability per step, in (0, 1) (default 0.01)"),
        OPT_SEED,
        OUTPUT("dump-qk", 0, "out.npz", "per layer l, q_l, k_l and v_l of the tokens run "
                                        "(positions x heads x head size; q and k after the rotary "
                                        "embedding; exact attention's)"),
        OUTPUT("report", 0, "FILE.json", "per context bucket (positions up to 512, 1024, 2048, "
                                         "...) and in total: steps, approximate attention steps, "
                                         "attention microseconds per step exact and kmv, worst "
                                         "bound, top-1 agreement, mean KL, log-loss"),
        EXPERIMENTAL_FLAG("force-approx", "approximate steps even where the cost model runs exact "
                                          "(below 2048 keys: every context of a small model)"),
        OPT_EMPIRICAL,
    };
    size_t no = sizeof o / sizeof o[0];
    int rc = args_parse(CMD,
                        "Run a llama2.c model token by token with kmv attention streams: "
                        "generate after a prompt, or score a text; report top-1 agreement and "
                        "KL divergence against exact attention.",
                        o, no, argc, argv);
    if (rc != 0) return rc < 0 ? EXIT_OK : rc;
    const char *prompt = args_get(o, no, "prompt")->s, *tfile = args_get(o, no, "text-file")->s;
    if ((prompt != NULL) == (tfile != NULL)) {
        fprintf(stderr, "kmv " CMD ": give exactly one of --prompt and --text-file\n");
        return EXIT_USAGE;
    }
    kmv_params p;
    kmv_params_init(&p);
    if (args_common_params(CMD, o, no, &p) != EXIT_OK) return EXIT_USAGE;
    int exact_only = p.exact;
    p.exact = 0;
    opt *st = args_get(o, no, "steps"), *ctxo = args_get(o, no, "context");
    if (st->seen && st->i < 1) {
        fprintf(stderr, "kmv " CMD ": --steps must be >= 1\n");
        return EXIT_USAGE;
    }
    if (ctxo->seen && (ctxo->i < 1 || ctxo->i > 1 << 24)) {
        fprintf(stderr, "kmv " CMD ": --context must be in [1, %d]\n", 1 << 24);
        return EXIT_USAGE;
    }

    io_outputs outs;
    if ((rc = io_outputs_open(CMD, o, no, &outs)) != EXIT_OK) return rc;
    if (prompt != NULL && io_outputs_use_stdout(&outs)) {
        fprintf(stderr, "kmv " CMD ": standard output carries the generated text; write the "
                        "outputs to files\n");
        io_outputs_discard(&outs);
        return EXIT_USAGE;
    }
    char err[512];
    llm_model *model = NULL;
    llm_tokenizer *tok = NULL;
    llm_session *sa = NULL, *se = NULL;
    int *tokens = NULL;
    size_t ntok = 0;
    char *story = NULL;
    double *la = NULL, *le = NULL;
    int status = EXIT_FAIL;
    if ((rc = llm_load(args_get(o, no, "model")->s, &model, err, sizeof err)) != KMV_OK) {
        fprintf(stderr, "kmv " CMD ": %s\n", err);
        goto done;
    }
    const llm_config *c = llm_config_of(model);
    if ((rc = llm_tokenizer_load(args_get(o, no, "tokenizer")->s, c->vocab_size, &tok, err,
                                 sizeof err)) != KMV_OK) {
        fprintf(stderr, "kmv " CMD ": %s\n", err);
        goto done;
    }
    if (tfile != NULL && read_text(tfile, &story)) goto done;
    if (llm_encode(tok, prompt ? prompt : story, 1, &tokens, &ntok) != KMV_OK) {
        fprintf(stderr, "kmv " CMD ": out of memory\n");
        goto done;
    }
    size_t context = ctxo->seen ? (size_t)ctxo->i : (size_t)c->seq_len;
    if (context > (size_t)c->seq_len)
        fprintf(stderr, "kmv " CMD ": --context %zu is past the model's trained context (%d): from "
                        "position %d on it runs outside its training range\n",
                context, c->seq_len, c->seq_len);
    size_t steps = st->seen ? (size_t)st->i : context;
    if (steps > context) steps = context;
    /* Scoring: each position predicts the next token, so the last token
     * runs no forward pass. */
    if (tfile != NULL && ntok > steps + 1) {
        fprintf(stderr, "kmv " CMD ": scoring the first %zu of %zu tokens (the context)\n",
                steps + 1, ntok);
        ntok = steps + 1;
    }
    if (tfile != NULL) steps = ntok > 0 ? ntok - 1 : 0;

    kmv_params pe = p;
    pe.exact = 1; /* which runs exact whatever the experimental knobs say */
    int dump = io_output(&outs, "dump-qk") != NULL;
    if (llm_session_create(model, &pe, (int)context, dump, &se) != KMV_OK) {
        fprintf(stderr, "kmv " CMD ": cannot create the exact session\n");
        goto done;
    }
    if (!exact_only && llm_session_create(model, &p, (int)context, 0, &sa) != KMV_OK) {
        fprintf(stderr, "kmv " CMD ": cannot create the approximate session\n");
        goto done;
    }
    la = malloc((size_t)c->vocab_size * sizeof(double));
    le = malloc((size_t)c->vocab_size * sizeof(double));
    if (la == NULL || le == NULL) {
        fprintf(stderr, "kmv " CMD ": out of memory\n");
        goto done;
    }

    /* The approximate session drives generation when it runs: its text is
     * what a user of it would get; the exact one follows the same tokens. */
    int token = tokens[0];
    size_t pos = 0;
    bucket bk[BUCKETS];
    memset(bk, 0, sizeof bk);
    while (pos < steps) {
        const float *lg_e, *lg_a = NULL;
        bucket *b = &bk[bucket_of(pos)];
        if (sa != NULL && b->steps == 0) llm_attention_reset_worst(sa);
        double te = llm_attention_seconds(se), ta = sa ? llm_attention_seconds(sa) : 0.0;
        size_t ap = sa ? llm_attention_stats(sa).approx_steps : 0;
        if ((rc = llm_forward(se, token, &lg_e)) != KMV_OK ||
            (sa != NULL && (rc = llm_forward(sa, token, &lg_a)) != KMV_OK)) {
            fprintf(stderr, "kmv " CMD ": position %zu: %s\n", pos, kmv_strerror(rc));
            goto done;
        }
        int next = pos + 1 < ntok ? tokens[pos + 1] : argmax(lg_a ? lg_a : lg_e, c->vocab_size);
        compare_step(&b->cm, lg_e, lg_a, c->vocab_size, next, le, la);
        b->steps++;
        b->attn_steps += (size_t)(c->n_layers * c->n_heads);
        b->t_exact += llm_attention_seconds(se) - te;
        if (sa != NULL) {
            llm_attn_stats as = llm_attention_stats(sa);
            b->t_kmv += llm_attention_seconds(sa) - ta;
            b->approx_steps += as.approx_steps - ap;
            b->worst = as.worst_bound;
        }
        pos++;
        if (next == 1) break; /* BOS ends a story */
        if (prompt != NULL) {
            fputs(llm_decode(tok, token, next), stdout);
            fflush(stdout);
        }
        token = next;
    }
    if (prompt != NULL) fputc('\n', stdout);
    bucket tot = sum_buckets(bk);
    report(&tot.cm, pos, se, sa, p.eps);
    if (dump && write_dump(se, c, (size_t)llm_position(se), &outs) != 0) goto done;
    if (io_output(&outs, "report") != NULL &&
        write_report(bk, c, context, p.eps, sa != NULL, &outs) != 0)
        goto done;
    if (io_outputs_commit(&outs)) goto done;
    status = EXIT_OK;
done:
    io_outputs_discard(&outs);
    free(la);
    free(le);
    free(tokens);
    free(story);
    llm_session_free(sa);
    llm_session_free(se);
    llm_tokenizer_free(tok);
    llm_free(model);
    return status;
}
