/* A growing text buffer (tables, JSON), for the kmv tool. */
#ifndef KMV_CLI_TEXT_H
#define KMV_CLI_TEXT_H

#include <stddef.h>

typedef struct text {
    char *s;
    size_t len, cap;
    int failed; /* out of memory: the text is incomplete */
} text;

/* Append printf-style; on allocation failure sets failed and drops the rest. */
void text_put(text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Append len bytes as they are (NUL bytes included). */
void text_add(text *t, const void *data, size_t len);

/* A JSON number, or null for NaN and infinity (which JSON lacks). */
void text_num(text *t, double v);

void text_free(text *t);

#endif /* KMV_CLI_TEXT_H */
