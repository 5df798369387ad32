/* llama2.c's tokenizer; see tokenizer.h. */
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
    /* Merge the best-scoring adjacent pair until none is in the vocabulary. */
    for (;;) {
        float best = -1e10f;
        int best_id = -1;
        size_t best_at = 0;
        for (size_t i = 0; i + 1 < n; i++) {
            const char *a = t->vocab[tok[i]], *b = t->vocab[tok[i + 1]];
            size_t la = strlen(a), lb = strlen(b);
            memcpy(buf, a, la);
            memcpy(buf + la, b, lb + 1);
            int id = lookup(t, buf);
            if (id >= 0 && t->score[id] > best) {
                best = t->score[id];
                best_id = id;
                best_at = i;
            }
        }
        if (best_id < 0) break;
        tok[best_at] = best_id;
        memmove(tok + best_at + 1, tok + best_at + 2, (n - best_at - 2) * sizeof(int));
        n--;
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
