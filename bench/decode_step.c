/* One decoding step through the C API, timed: the baseline the Python
 * binding's overhead is measured against (bench/binding_overhead.py runs
 * this and the binding on the same data in one run).
 *
 *   decode_step KEYS.npy N STEPS REPS gaussian|attention SIGMA
 *
 * Keys are rows 0..N-1 of KEYS.npy, values x_j = sin(j) (attention: two
 * columns, sin(j) and cos(j)); the queries are rows 0, 1, ... cycling over
 * the first 512 rows. Prints the median over REPS of the seconds per step,
 * in microseconds, and the mode of the last step.
 *
 * Linked with malloc, not jemalloc as kmv's other binaries: inside Python
 * the library allocates through the interpreter's malloc, and the
 * comparison is of the binding alone. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: clock_gettime */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kmv/kmv.h"
#include "tools/clock.h"

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int fail(const char *what, int rc) {
    fprintf(stderr, "decode_step: %s: %s\n", what, kmv_strerror(rc));
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: decode_step KEYS.npy N STEPS REPS gaussian|attention SIGMA\n");
        return 2;
    }
    size_t n = strtoul(argv[2], NULL, 10), steps = strtoul(argv[3], NULL, 10);
    size_t reps = strtoul(argv[4], NULL, 10);
    int attn = strcmp(argv[5], "attention") == 0;
    kmv_array a;
    char err[512];
    int rc = kmv_npy_read(argv[1], NULL, &a, err, sizeof err);
    if (rc != KMV_OK) {
        fprintf(stderr, "decode_step: %s\n", err);
        return 1;
    }
    if (a.rows < n || n == 0 || steps == 0 || reps == 0 || reps > 64) {
        fprintf(stderr, "decode_step: need 0 < N <= rows (%zu), STEPS > 0, 0 < REPS <= 64\n", a.rows);
        return 2;
    }
    size_t d = a.cols, c = attn ? 2 : 1, nq = n < 512 ? n : 512;
    float *x = malloc(n * c * sizeof(float)), y[2];
    for (size_t j = 0; j < n; j++) {
        x[j * c] = (float)sin((double)j);
        if (attn) x[j * c + 1] = (float)cos((double)j);
    }
    kmv_params p;
    kmv_params_init(&p);
    p.sigma = atof(argv[6]);
    kmv_ctx *ctx;
    kmv_stream *s;
    if ((rc = kmv_ctx_create(&p, &ctx)) != KMV_OK) return fail("context", rc);
    rc = attn ? kmv_stream_attention_create(ctx, d, c, &s) : kmv_stream_create(ctx, d, c, &s);
    if (rc != KMV_OK) return fail("stream", rc);
    if ((rc = kmv_stream_append_keys(s, a.data, x, n)) != KMV_OK) return fail("append", rc);
    kmv_stats st;
    memset(&st, 0, sizeof st);
    double t[64] = {0};
    for (size_t r = 0; r < reps; r++) {
        double t0 = tool_now();
        for (size_t i = 0; i < steps; i++)
            if ((rc = kmv_stream_decode(s, a.data + (i % nq) * d, y, &st)) != KMV_OK)
                return fail("decode", rc);
        t[r] = (tool_now() - t0) / (double)steps;
    }
    qsort(t, reps, sizeof *t, cmp);
    printf("%.3f %d\n", 1e6 * t[reps / 2], st.mode);
    kmv_stream_free(s);
    kmv_ctx_free(ctx);
    kmv_array_free(&a);
    free(x);
    return 0;
}
