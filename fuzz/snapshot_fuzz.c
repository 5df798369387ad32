/* libFuzzer harness for the stream snapshot loader.
 *
 * The first input byte picks how the rest becomes a file: odd, the rest is
 * the file's body and the harness appends its XXH3-64 checksum, so that
 * mutations reach the field checks behind the checksum (random bytes would
 * almost never pass it); even, the rest is the file as is, checksum
 * included. The file is an in-memory one (memfd) read through
 * /proc/self/fd.
 *
 * Checked beyond "no crash, no leak, no undefined behaviour": a refusal is
 * a code kmv names, with a message and no stream; a loaded stream reports
 * a shape the file could hold, answers a decoding step (finite, or a named
 * refusal) and, when small, a product over everything it holds. */
#define _GNU_SOURCE
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <xxhash.h>

#include "kmv/kmv.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static kmv_ctx *ctx;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0) return 0;
    if (ctx == NULL) {
        kmv_params p;
        kmv_params_init(&p);
        p.n_threads = 1;
        p.max_bytes = 64u << 20; /* what a file may make the loader hold */
        if (kmv_ctx_create(&p, &ctx) != KMV_OK) abort();
    }
    int fd = memfd_create("snapshot", 0);
    if (fd < 0) abort();
    const uint8_t *body = data + 1;
    size_t len = size - 1;
    if (len && write(fd, body, len) != (ssize_t)len) abort();
    if (data[0] & 1) {
        uint64_t sum = XXH3_64bits(body, len);
        if (write(fd, &sum, sizeof sum) != (ssize_t)sizeof sum) abort();
        len += sizeof sum;
    }
    char path[64], err[256] = "";
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    kmv_stream *s = (kmv_stream *)&ctx; /* must be reset to NULL on error */
    int rc = kmv_stream_load(ctx, path, &s, err, sizeof err);
    close(fd);
    if (rc != KMV_OK) {
        if (s != NULL || err[0] == '\0') abort();
        if (strcmp(kmv_strerror(rc), "unknown error") == 0) abort();
        return 0;
    }
    kmv_stream_info info;
    if (kmv_stream_get_info(s, &info) != KMV_OK) abort();
    /* Every key and query came from the file's bytes. */
    if (info.dim == 0 || info.n_cols == 0) abort();
    if ((info.n_keys + info.n_queries) > len / 4 / info.dim + 1) abort();
    /* A stream without rows may declare any width; asking it for an
     * answer would take the harness's own memory past the fuzzer's. */
    if (info.dim > 65536 || info.n_cols > 65536) {
        kmv_stream_free(s);
        return 0;
    }
    float *q = calloc(info.dim, sizeof(float)), *y = calloc(info.n_cols, sizeof(float));
    if (q == NULL || y == NULL) abort();
    rc = kmv_stream_decode(s, q, y, NULL);
    if (rc == KMV_OK) {
        for (size_t t = 0; t < info.n_cols; t++)
            if (!isfinite(y[t])) abort();
    } else if (strcmp(kmv_strerror(rc), "unknown error") == 0) {
        abort();
    }
    if (info.n_queries * info.n_keys * info.dim < 200000 && info.n_queries > 0) {
        float *ym = malloc(info.n_queries * info.n_cols * sizeof(float));
        if (ym == NULL) abort();
        rc = kmv_stream_matvec(s, NULL, ym, NULL);
        if (rc != KMV_OK && strcmp(kmv_strerror(rc), "unknown error") == 0) abort();
        free(ym);
    }
    free(q);
    free(y);
    kmv_stream_free(s);
    return 0;
}
