/* The llama2.c runner's parts: the tokenizer's encode/decode round trip
 * (byte fallback included), and the checkpoint loader's refusals. The
 * forward pass is pinned end to end by cli_test (the model's own greedy
 * output). */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "llama/llama.h"
#include "llama/tokenizer.h"

#define MODEL "data/stories260K/stories260K.bin"
#define TOK "data/stories260K/tok512.bin"

static void round_trip(void **state) {
    (void)state;
    llm_tokenizer *t;
    char err[256];
    assert_int_equal(llm_tokenizer_load(TOK, 512, &t, err, sizeof err), KMV_OK);
    const char *texts[] = {"Once upon a time", "The cat sat on the mat.", "a", "  two  spaces",
                           "naïve café — 東京 🙂", "Lily's mom said, \"Lily, let's go!\"\n"};
    for (size_t u = 0; u < sizeof texts / sizeof *texts; u++) {
        int *tok;
        size_t n;
        assert_int_equal(llm_encode(t, texts[u], 1, &tok, &n), KMV_OK);
        assert_true(n >= 2);
        assert_int_equal(tok[0], 1); /* BOS */
        char out[256] = "";
        for (size_t i = 1; i < n; i++) {
            assert_true(tok[i] >= 0 && tok[i] < 512);
            strcat(out, llm_decode(t, tok[i - 1], tok[i]));
        }
        assert_string_equal(out, texts[u]);
        /* Merges happened: fewer tokens than bytes for plain English. */
        if (u < 2) assert_true(n < strlen(texts[u]));
        free(tok);
    }
    llm_tokenizer_free(t);
    /* Too small a vocabulary for byte fallback. */
    assert_int_equal(llm_tokenizer_load(TOK, 6, &t, err, sizeof err), KMV_EFORMAT);
    assert_null(t);
    assert_non_null(strstr(err, "no byte tokens"));
}

/* A second reading of the tokenizer file and run.c's encode() as written:
 * linear lookups and a rescan of every pair per merge. The library's heap
 * of candidates must give the same tokens. */
typedef struct ref_vocab {
    int n;
    char **str;
    float *score;
} ref_vocab;

static void ref_load(ref_vocab *v) {
    FILE *f = fopen(TOK, "rb");
    assert_non_null(f);
    int32_t maxlen;
    assert_int_equal(fread(&maxlen, 4, 1, f), 1);
    v->n = 512;
    v->str = calloc(512, sizeof(char *));
    v->score = calloc(512, sizeof(float));
    for (int i = 0; i < 512; i++) {
        int32_t len;
        assert_int_equal(fread(&v->score[i], 4, 1, f), 1);
        assert_int_equal(fread(&len, 4, 1, f), 1);
        v->str[i] = calloc((size_t)len + 1, 1);
        assert_int_equal(fread(v->str[i], 1, (size_t)len, f), (size_t)len);
    }
    fclose(f);
}

static int ref_lookup(const ref_vocab *v, const char *s) {
    for (int i = 0; i < v->n; i++)
        if (strcmp(v->str[i], s) == 0) return i;
    return -1;
}

static size_t ref_encode(const ref_vocab *v, const char *text, int *tok) {
    size_t n = 0;
    char buf[64];
    tok[n++] = 1;
    if (text[0] != '\0') tok[n++] = ref_lookup(v, " ");
    for (const unsigned char *c = (const unsigned char *)text; *c;) {
        size_t len = 1;
        while (len < 4 && (c[len] & 0xC0) == 0x80) len++;
        memcpy(buf, c, len);
        buf[len] = '\0';
        int id = ref_lookup(v, buf);
        if (id >= 0) tok[n++] = id;
        else
            for (size_t i = 0; i < len; i++) tok[n++] = c[i] + 3;
        c += len;
    }
    for (;;) {
        float best = -1e10f;
        int best_id = -1;
        size_t at = 0;
        for (size_t i = 0; i + 1 < n; i++) {
            snprintf(buf, sizeof buf, "%s%s", v->str[tok[i]], v->str[tok[i + 1]]);
            int id = ref_lookup(v, buf);
            if (id >= 0 && v->score[id] > best) {
                best = v->score[id];
                best_id = id;
                at = i;
            }
        }
        if (best_id < 0) break;
        tok[at] = best_id;
        memmove(tok + at + 1, tok + at + 2, (n - at - 2) * sizeof(int));
        n--;
    }
    return n;
}

static void encode_matches_reference(void **state) {
    (void)state;
    static const char *words[] = {"the", "cat", " ", "  ", "sat", "on", "mat", ".", ",",
                                  "Lily", "happy", "\n", "café", "東京", "🙂", "ing", "x",
                                  "\"", "'s", "zzzq", "a", "once", "upon", "time"};
    llm_tokenizer *t;
    char err[256];
    assert_int_equal(llm_tokenizer_load(TOK, 512, &t, err, sizeof err), KMV_OK);
    ref_vocab v;
    ref_load(&v);
    uint64_t s = 7;
    char text[1024];
    int ref[1200];
    for (int round = 0; round < 200; round++) {
        text[0] = '\0';
        size_t words_in = 1 + (size_t)(round % 60);
        for (size_t w = 0; w < words_in; w++) {
            s = s * 6364136223846793005ULL + 1442695040888963407ULL;
            strcat(text, words[(s >> 33) % (sizeof words / sizeof *words)]);
        }
        int *tok;
        size_t n;
        assert_int_equal(llm_encode(t, text, 1, &tok, &n), KMV_OK);
        size_t rn = ref_encode(&v, text, ref);
        assert_int_equal(n, rn);
        assert_memory_equal(tok, ref, n * sizeof(int));
        free(tok);
    }
    for (int i = 0; i < v.n; i++) free(v.str[i]);
    free(v.str);
    free(v.score);
    llm_tokenizer_free(t);
}

static void write_bytes(const char *path, const unsigned char *b, size_t n) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(b, 1, n, f), n);
    fclose(f);
}

static void loader_refusals(void **state) {
    (void)state;
    FILE *f = fopen(MODEL, "rb");
    assert_non_null(f);
    unsigned char *b = malloc(1 << 21);
    size_t n = fread(b, 1, 1 << 21, f);
    fclose(f);
    char path[256], err[512];
    snprintf(path, sizeof path, "%s/m.bin", getenv("TEST_TMPDIR") ? getenv("TEST_TMPDIR") : "/tmp");
    llm_model *m;
    /* The real one loads, with the header README names. */
    assert_int_equal(llm_load(MODEL, &m, err, sizeof err), KMV_OK);
    const llm_config *c = llm_config_of(m);
    assert_int_equal(c->dim, 64);
    assert_int_equal(c->n_layers, 5);
    assert_int_equal(c->n_heads, 8);
    assert_int_equal(c->n_kv_heads, 4);
    assert_int_equal(c->vocab_size, 512);
    assert_int_equal(c->seq_len, 512);
    llm_free(m);
    /* Truncated, padded. */
    write_bytes(path, b, n - 4);
    assert_int_equal(llm_load(path, &m, err, sizeof err), KMV_EFORMAT);
    assert_non_null(strstr(err, "truncated or not a checkpoint"));
    assert_null(m);
    unsigned char *pad = malloc(n + 4);
    memcpy(pad, b, n);
    memset(pad + n, 0, 4);
    write_bytes(path, pad, n + 4);
    assert_int_equal(llm_load(path, &m, err, sizeof err), KMV_EFORMAT);
    free(pad);
    /* Heads that do not divide the width. */
    int32_t h7 = 7;
    memcpy(b + 12, &h7, 4);
    write_bytes(path, b, n);
    assert_int_equal(llm_load(path, &m, err, sizeof err), KMV_EFORMAT);
    assert_non_null(strstr(err, "not a llama2.c checkpoint"));
    int32_t h8 = 8;
    memcpy(b + 12, &h8, 4);
    /* A NaN weight. */
    float nan = NAN;
    memcpy(b + 28 + 400, &nan, 4);
    write_bytes(path, b, n);
    assert_int_equal(llm_load(path, &m, err, sizeof err), KMV_EFORMAT);
    assert_non_null(strstr(err, "NaN"));
    assert_int_equal(llm_load("/nonexistent/m.bin", &m, err, sizeof err), KMV_EIO);
    free(b);
}

static void forward_refusals(void **state) {
    (void)state;
    llm_model *m;
    char err[256];
    assert_int_equal(llm_load(MODEL, &m, err, sizeof err), KMV_OK);
    kmv_params p;
    kmv_params_init(&p);
    p.exact = 1;
    llm_session *s;
    assert_int_equal(llm_session_create(m, &p, 0, 0, &s), KMV_OK);
    const float *lg;
    assert_int_equal(llm_forward(s, -1, &lg), KMV_EINVAL);
    assert_int_equal(llm_forward(s, 512, &lg), KMV_EINVAL);
    for (int pos = 0; pos < 512; pos++) assert_int_equal(llm_forward(s, 1 + pos % 300, &lg), KMV_OK);
    assert_int_equal(llm_forward(s, 1, &lg), KMV_EINVAL); /* past seq_len */
    llm_attn_stats as = llm_attention_stats(s);
    assert_int_equal(as.steps, (size_t)512 * 5 * 8);
    assert_int_equal(as.approx_steps, 0);
    assert_null(llm_dump_q(s, 0)); /* not kept */
    assert_int_equal(llm_position(s), 512);
    llm_session_free(s);
    llm_free(m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(round_trip),
        cmocka_unit_test(encode_matches_reference),
        cmocka_unit_test(loader_refusals),
        cmocka_unit_test(forward_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
