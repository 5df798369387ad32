#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "cli/text.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Room for need more bytes and a NUL; 0 (failed set) when out of memory. */
static int room(text *t, size_t need) {
    if (t->failed) return 0;
    if (t->s != NULL && need < t->cap - t->len) return 1;
    size_t cap = 2 * t->cap + need + 64;
    char *s = realloc(t->s, cap);
    if (s == NULL) {
        t->failed = 1;
        return 0;
    }
    t->s = s;
    t->cap = cap;
    return 1;
}

void text_put(text *t, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = t->failed ? -1 : vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || !room(t, (size_t)n)) {
        t->failed = 1;
        return;
    }
    va_start(ap, fmt);
    vsnprintf(t->s + t->len, t->cap - t->len, fmt, ap);
    va_end(ap);
    t->len += (size_t)n;
}

void text_add(text *t, const void *data, size_t len) {
    if (!room(t, len)) return;
    memcpy(t->s + t->len, data, len);
    t->len += len;
    t->s[t->len] = '\0';
}

void text_num(text *t, double v) {
    if (isfinite(v)) text_put(t, "%.9g", v);
    else text_put(t, "null");
}

void text_free(text *t) {
    free(t->s);
    t->s = NULL;
    t->len = t->cap = 0;
}
