/* llama2.c's tokenizer; see tokenizer.h. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "llama/tokenizer.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kmv/kmv.h"
#include "llama/fail.h"

typedef struct entry {
    const char *str;
    int id;
} entry;

struct llm_tokenizer {
    int n;
    char **vocab;
    float *score;
    entry *sorted; /* by string, for lookups */
    size_t maxlen;
    char bytes[256][2]; /* what <0xXX> tokens decode to */
};

static int cmp_entry(const void *a, const void *b) {
    return strcmp(((const entry *)a)->str, ((const entry *)b)->str);
}

void llm_tokenizer_free(llm_tokenizer *t) {
    if (t == NULL) return;
    for (int i = 0; t->vocab != NULL && i < t->n; i++) free(t->vocab[i]);
    free(t->vocab);
    free(t->score);
    free(t->sorted);
    free(t);
}

int llm_tokenizer_load(const char *path, int vocab_size, llm_tokenizer **out, char *err,
                       size_t err_len) {
    *out = NULL;
    /* Encoding falls back to byte tokens 3 .. 258. */
    if (vocab_size < 259)
        return llm__fail(err, err_len, KMV_EFORMAT, "%s: a vocabulary of %d tokens has no byte tokens "
                    "(llama2.c tokenizers have at least 259)", path, vocab_size);
    FILE *f = fopen(path, "rb");
    if (f == NULL) return llm__fail(err, err_len, KMV_EIO, "%s: cannot open: %s", path, strerror(errno));
    llm_tokenizer *t = calloc(1, sizeof *t);
    int rc = KMV_ENOMEM;
    if (t == NULL) goto done;
    t->n = vocab_size;
    t->vocab = calloc((size_t)vocab_size, sizeof *t->vocab);
    t->score = malloc((size_t)vocab_size * sizeof(float));
    t->sorted = malloc((size_t)vocab_size * sizeof(entry));
    if (!t->vocab || !t->score || !t->sorted) goto done;
    int32_t maxlen;
    rc = KMV_EFORMAT;
    if (fread(&maxlen, sizeof maxlen, 1, f) != 1 || maxlen <= 0 || maxlen > 1 << 16) {
        llm__fail(err, err_len, rc, "%s: not a llama2.c tokenizer (bad header)", path);
        goto done;
    }
    for (int i = 0; i < vocab_size; i++) {
        int32_t len;
        if (fread(&t->score[i], sizeof(float), 1, f) != 1 || fread(&len, sizeof len, 1, f) != 1 ||
            len < 0 || len > maxlen) {
            llm__fail(err, err_len, rc, "%s: token %d: truncated or malformed (the model has %d tokens)",
                 path, i, vocab_size);
            goto done;
        }
        t->vocab[i] = malloc((size_t)len + 1);
        if (t->vocab[i] == NULL) {
            rc = KMV_ENOMEM;
            goto done;
        }
        if (fread(t->vocab[i], 1, (size_t)len, f) != (size_t)len) {
            llm__fail(err, err_len, rc, "%s: token %d: truncated", path, i);
            goto done;
        }
        t->vocab[i][len] = '\0';
        t->sorted[i] = (entry){t->vocab[i], i};
    }
    qsort(t->sorted, (size_t)vocab_size, sizeof(entry), cmp_entry);
    t->maxlen = (size_t)maxlen;
    for (int b = 0; b < 256; b++) t->bytes[b][0] = (char)b, t->bytes[b][1] = '\0';
    rc = KMV_OK;
done:
    fclose(f);
    if (rc == KMV_ENOMEM) llm__fail(err, err_len, rc, "%s: out of memory", path);
    if (rc != KMV_OK) {
        llm_tokenizer_free(t);
        return rc;
    }
    *out = t;
    return KMV_OK;
}

static int lookup(const llm_tokenizer *t, const char *s) {
    entry key = {s, 0};
    const entry *e = bsearch(&key, t->sorted, (size_t)t->n, sizeof(entry), cmp_entry);
    return e ? e->id : -1;
}

/* A candidate merge of the adjacent tokens at left and right (indices
 * into the text's tokens) into id. Stale once either side has changed:
 * a and b are the tokens it was made for. */
typedef struct pair {
    float score;
    uint32_t left, right;
    int a, b, id;
} pair;

/* Heap order: the higher score first, then the leftmost pair, which is
 * the pair llama2.c's scan picks (the first of the best). */
static int pair_before(const pair *x, const pair *y) {
    return x->score > y->score || (x->score == y->score && x->left < y->left);
}

static void heap_push(pair *h, size_t *len, pair p) {
    size_t i = (*len)++;
    for (; i > 0 && pair_before(&p, &h[(i - 1) / 2]); i = (i - 1) / 2) h[i] = h[(i - 1) / 2];
    h[i] = p;
}

static pair heap_pop(pair *h, size_t *len) {
    pair top = h[0], last = h[--*len];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *len) break;
        if (c + 1 < *len && pair_before(&h[c + 1], &h[c])) c++;
        if (!pair_before(&h[c], &last)) break;
        h[i] = h[c];
        i = c;
    }
    if (*len > 0) h[i] = last;
    return top;
}

/* The merge of tok[l] and tok[r] when the vocabulary has it. */
static void offer(const llm_tokenizer *t, const int *tok, uint32_t l, uint32_t r, char *buf,
                  pair *h, size_t *len) {
    const char *a = t->vocab[tok[l]], *b = t->vocab[tok[r]];
    size_t la = strlen(a), lb = strlen(b);
    memcpy(buf, a, la);
    memcpy(buf + la, b, lb + 1);
    int id = lookup(t, buf);
    if (id >= 0) heap_push(h, len, (pair){t->score[id], l, r, tok[l], tok[r], id});
}

/* Merge the best-scoring adjacent pair until none is in the vocabulary, as
 * llama2.c does, in O(n log n) rather than its O(n^2) rescans (a long text
 * took minutes): candidates wait in a heap, each merge offers its two new
 * neighbours, and a candidate whose tokens have changed since is skipped.
 * tok[0..*n) is rewritten in place. buf holds two tokens. */
static int merge_pairs(const llm_tokenizer *t, int *tok, size_t *n, char *buf) {
    size_t cnt = *n, hlen = 0;
    if (cnt < 2) return KMV_OK;
    uint32_t *next = malloc(cnt * sizeof *next), *prev = malloc(cnt * sizeof *prev);
    /* Each merge offers at most two candidates: 3 n in all. */
    pair *h = malloc(3 * cnt * sizeof *h);
    if (next == NULL || prev == NULL || h == NULL) {
        free(next);
        free(prev);
        free(h);
        return KMV_ENOMEM;
    }
    const uint32_t none = UINT32_MAX;
    for (size_t i = 0; i < cnt; i++) {
        next[i] = i + 1 < cnt ? (uint32_t)(i + 1) : none;
        prev[i] = i > 0 ? (uint32_t)(i - 1) : none;
    }
    for (size_t i = 0; i + 1 < cnt; i++) offer(t, tok, (uint32_t)i, (uint32_t)(i + 1), buf, h, &hlen);
    while (hlen > 0) {
        pair p = heap_pop(h, &hlen);
        if (next[p.left] != p.right || tok[p.left] != p.a || tok[p.right] != p.b) continue;
        tok[p.left] = p.id;
        tok[p.right] = -1;
        next[p.left] = next[p.right];
        if (next[p.right] != none) prev[next[p.right]] = p.left;
        next[p.right] = none; /* a dead token ends no pair */
        if (prev[p.left] != none) offer(t, tok, prev[p.left], p.left, buf, h, &hlen);
        if (next[p.left] != none) offer(t, tok, p.left, next[p.left], buf, h, &hlen);
    }
    size_t out = 0;
    for (size_t i = 0; i < cnt; i++)
        if (tok[i] >= 0) tok[out++] = tok[i];
    *n = out;
    free(next);
    free(prev);
    free(h);
    return KMV_OK;
}

int llm_encode(const llm_tokenizer *t, const char *text, int bos, int **tokens, size_t *count) {
    /* At most a token per byte, BOS and the leading space; merged pairs
     * are at most two tokens long. */
    size_t len = strlen(text), n = 0, bcap = 2 * t->maxlen + 8;
    int *tok = malloc((len + 3) * sizeof(int));
    char *buf = malloc(bcap);
    if (tok == NULL || buf == NULL) {
        free(tok);
        free(buf);
        return KMV_ENOMEM;
    }
    if (bos) tok[n++] = 1;
    if (text[0] != '\0') {
        int sp = lookup(t, " ");
        if (sp >= 0) tok[n++] = sp;
    }
    /* Code points whole when the vocabulary has them, else their bytes. */
    size_t bl = 0;
    for (const unsigned char *c = (const unsigned char *)text; *c != '\0'; c++) {
        if ((*c & 0xC0) != 0x80) bl = 0;
        buf[bl++] = (char)*c;
        buf[bl] = '\0';
        if ((*(c + 1) & 0xC0) == 0x80 && bl < 4) continue;
        int id = lookup(t, buf);
        if (id >= 0) {
            tok[n++] = id;
        } else {
            for (size_t i = 0; i < bl; i++) tok[n++] = (unsigned char)buf[i] + 3;
        }
        bl = 0;
    }
    int rc = merge_pairs(t, tok, &n, buf);
    if (rc != KMV_OK) {
        free(tok);
        free(buf);
        return rc;
    }
    free(buf);
    *tokens = tok;
    *count = n;
    return KMV_OK;
}

const char *llm_decode(const llm_tokenizer *t, int prev, int token) {
    if (token < 0 || token >= t->n) return "";
    const char *p = t->vocab[token];
    if (prev == 1 && p[0] == ' ') p++;
    unsigned char b;
    if (strlen(p) == 6 && sscanf(p, "<0x%02hhX>", &b) == 1) return t->bytes[b];
    return p;
}
