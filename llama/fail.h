/* Internal to llama/: the one formatter of the runner's error messages. */
#ifndef KMV_LLAMA_FAIL_H
#define KMV_LLAMA_FAIL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>

/* Write the message into err (when there is room for one) and return rc. */
static inline int llm__fail(char *err, size_t len, int rc, const char *fmt, ...) {
    if (err != NULL && len > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, len, fmt, ap);
        va_end(ap);
    }
    return rc;
}

#endif /* KMV_LLAMA_FAIL_H */
