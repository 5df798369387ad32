/* kmv decode: a llama2.c checkpoint run token by token, its attention
 * through kmv attention streams (llama/). Unless --exact, an exact
 * session runs beside the approximate one on the same tokens, so every
 * position compares the two next-token distributions. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/io.h"
#include "cli/npz.h"
#include "llama/llama.h"
#include "llama/tokenizer.h"

#define CMD "decode"
/* --text-file is read whole; a text longer than this is not a context
 * this runner's models take anyway. */
#define TEXT_MAX (1 << 20)

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

static char *read_text(const char *path) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) return NULL;
    char *buf = malloc(TEXT_MAX + 1);
    size_t len = buf ? fread(buf, 1, TEXT_MAX, f) : 0;
    int more = buf && fgetc(f) != EOF;
    fclose(f);
    if (buf == NULL || more) {
        free(buf);
        return NULL;
    }
    buf[len] = '\0';
    return buf;
}

/* The exact session's q, k and v of the first pos positions, whole or not
 * at all. */
static int write_dump(const llm_session *s, const llm_config *c, size_t pos, const char *path) {
    size_t L = (size_t)c->n_layers, hs = (size_t)(c->dim / c->n_heads);
    npz_entry *e = calloc(3 * L, sizeof *e);
    char(*names)[32] = calloc(3 * L, sizeof *names);
    unsigned char *bytes = NULL;
    size_t len = 0;
    int rc = EXIT_FAIL;
    if (e == NULL || names == NULL || pos == 0) {
        fprintf(stderr, "kmv " CMD ": %s: %s\n", path, pos == 0 ? "no tokens to dump" : "out of memory");
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
        fprintf(stderr, "kmv " CMD ": %s: %s\n", path,
                built == -2 ? "past the .npz format's limits (4 GB, 65535 arrays)" : "out of memory");
        goto out;
    }
    char *staged = NULL;
    if (io_stage_text(CMD, path, (const char *)bytes, len, &staged) == 0 &&
        io_commit(CMD, &staged, path) == 0)
        rc = 0;
out:
    free(bytes);
    free(e);
    free(names);
    return rc;
}

int cmd_decode(int argc, char **argv) {
    opt o[] = {
        {"model", OPT_STRING, 1, "M.bin", "llama2.c checkpoint", 0, 0, 0, 0, 0},
        {"tokenizer", OPT_STRING, 1, "T.bin", "llama2.c tokenizer", 0, 0, 0, 0, 0},
        {"prompt", OPT_STRING, 0, "TEXT", "generate (greedy) after TEXT", 0, 0, 0, 0, 0},
        {"text-file", OPT_STRING, 0, "F", "score the text in F instead (UTF-8)", 0, 0, 0, 0, 0},
        {"steps", OPT_INT, 0, "N", "positions to run, prompt included (default: the model's seq_len)", 0, 0, 0, 0, 0},
        {"exact", OPT_FLAG, 0, "", "exact attention only (no comparison)", 0, 0, 0, 0, 0},
        {"eps", OPT_DOUBLE, 0, "E", "attention error target, in (0, 1) (default 0.1)", 0, 0, 0, 0, 0},
        {"delta", OPT_DOUBLE, 0, "P", "failure probability per step, in (0, 1) (default 0.01)", 0, 0, 0, 0, 0},
        {"seed", OPT_U64, 0, "N", "random seed (default 1)", 0, 0, 0, 0, 0},
        {"dump-qk", OPT_STRING, 0, "out.npz", "per layer l, q_l, k_l and v_l of the tokens run "
                                              "(positions x heads x head size; q and k after the "
                                              "rotary embedding; exact attention's)", 0, 0, 0, 0, 0},
        {"force-approx", OPT_FLAG, 0, "", "approximate steps even where the cost model runs exact "
                                          "(below 2048 keys: every context of a small model)", 0, 0, 0, 0, 0},
        {"empirical", OPT_FLAG, 0, "", "size samples by their own variance (the paper's A.1.4; "
                                       "no error bound)", 0, 0, 0, 0, 0},
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
    int exact_only = args_get(o, no, "exact")->seen;
    opt *st = args_get(o, no, "steps");
    if (st->seen && st->i < 1) {
        fprintf(stderr, "kmv " CMD ": --steps must be >= 1\n");
        return EXIT_USAGE;
    }

    char err[512];
    llm_model *model = NULL;
    llm_tokenizer *tok = NULL;
    llm_session *sa = NULL, *se = NULL;
    int *tokens = NULL;
    size_t ntok = 0;
    char *text = NULL;
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
    if (tfile != NULL && (text = read_text(tfile)) == NULL) {
        fprintf(stderr, "kmv " CMD ": %s: cannot read, or longer than %d bytes\n", tfile, TEXT_MAX);
        goto done;
    }
    if (llm_encode(tok, prompt ? prompt : text, 1, &tokens, &ntok) != KMV_OK) {
        fprintf(stderr, "kmv " CMD ": out of memory\n");
        goto done;
    }
    size_t steps = st->seen ? (size_t)st->i : (size_t)c->seq_len;
    if (steps > (size_t)c->seq_len) steps = (size_t)c->seq_len;
    if (tfile != NULL && ntok > steps) {
        fprintf(stderr, "kmv " CMD ": scoring the first %zu of %zu tokens (the model's context)\n",
                steps, ntok);
        ntok = steps;
    }
    if (tfile != NULL) steps = ntok;

    p.force_approx = args_get(o, no, "force-approx")->seen;
    if (args_get(o, no, "empirical")->seen) p.attn_budget = KMV_BUDGET_EMPIRICAL;
    kmv_params pe = p;
    pe.exact = 1;
    pe.force_approx = 0;
    const char *dump = args_get(o, no, "dump-qk")->s;
    if (llm_session_create(model, &pe, dump != NULL, &se) != KMV_OK) {
        fprintf(stderr, "kmv " CMD ": cannot create the exact session\n");
        goto done;
    }
    if (!exact_only) {
        if (llm_session_create(model, &p, 0, &sa) != KMV_OK) {
            fprintf(stderr, "kmv " CMD ": cannot create the approximate session\n");
            goto done;
        }
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
    size_t pos = 0, agree = 0, compared = 0;
    double kl = 0.0, nll_a = 0.0, nll_e = 0.0;
    while (pos < steps) {
        const float *lg_e, *lg_a = NULL;
        if ((rc = llm_forward(se, token, &lg_e)) != KMV_OK ||
            (sa != NULL && (rc = llm_forward(sa, token, &lg_a)) != KMV_OK)) {
            fprintf(stderr, "kmv " CMD ": position %zu: %s\n", pos, kmv_strerror(rc));
            goto done;
        }
        const float *lg = lg_a ? lg_a : lg_e;
        int next;
        if (pos + 1 < ntok) next = tokens[pos + 1];
        else if (tfile != NULL) break;
        else next = argmax(lg, c->vocab_size);
        log_softmax(lg_e, c->vocab_size, le);
        nll_e -= le[next];
        if (lg_a != NULL) {
            log_softmax(lg_a, c->vocab_size, la);
            nll_a -= la[next];
            double k = 0.0;
            for (int i = 0; i < c->vocab_size; i++) k += exp(le[i]) * (le[i] - la[i]);
            kl += k;
            agree += argmax(lg_a, c->vocab_size) == argmax(lg_e, c->vocab_size);
            compared++;
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
    size_t scored = pos > 0 ? pos : 1;
    fprintf(stderr, "kmv " CMD ": %zu positions; exact attention: %.1f%% of forward time, "
                    "mean log-loss %.4f\n",
            pos, 100.0 * llm_attention_seconds(se) / llm_forward_seconds(se), nll_e / (double)scored);
    if (sa != NULL) {
        llm_attn_stats as = llm_attention_stats(sa);
        static const char *why[8] = {"", "no LSH plan", "heavy search", "sample budget", "columns",
                                     "budget", "small context", "memory"};
        int top = 1;
        for (int r = 1; r < 8; r++)
            if (as.exact_why[r] > as.exact_why[top]) top = r;
        fprintf(stderr,
                "kmv " CMD ": approximate attention (eps %g): %.1f%% of forward time, "
                "%zu of %zu steps approximate (of the exact ones, most for: %s), worst bound %.3g; "
                "top-1 agreement with exact %.4f, mean KL(exact || approx) %.3g nats, "
                "mean log-loss %.4f\n",
                p.eps, 100.0 * llm_attention_seconds(sa) / llm_forward_seconds(sa),
                as.approx_steps, as.steps, as.approx_steps < as.steps ? why[top] : "none",
                as.worst_bound, compared ? (double)agree / (double)compared : 1.0,
                compared ? kl / (double)compared : 0.0, nll_a / (double)scored);
    }
    if (dump != NULL && write_dump(se, c, (size_t)llm_position(se), dump) != 0) goto done;
    status = EXIT_OK;
done:
    free(la);
    free(le);
    free(tokens);
    free(text);
    llm_session_free(sa);
    llm_session_free(se);
    llm_tokenizer_free(tok);
    llm_free(model);
    return status;
}
