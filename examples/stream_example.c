/*
 * An attention stream through kmv's public API: append keys with their
 * values, take a decoding step, save the stream, load it back, take the
 * same step, and check that the two rows agree bit for bit.
 *
 * Against an installed kmv (scripts/install):
 *
 *     cc stream_example.c $(pkg-config --cflags --libs kmv) -o stream_example
 *     ./stream_example /tmp/context.kmvs
 *
 * For a prefix the loader does not search, add -Wl,-rpath,PREFIX/lib (or
 * run with LD_LIBRARY_PATH=PREFIX/lib). To link the static archive, which
 * -lkmv would not choose over the shared library beside it:
 *
 *     cc stream_example.c $(pkg-config --static --cflags --libs kmv |
 *                           sed 's/-lkmv/-l:libkmv.a/') -o stream_example
 */
#include <kmv/kmv.h>

#include <stdio.h>
#include <string.h>

enum { N_KEYS = 3000, DIM = 16, N_VALUES = 4 };

static float keys[N_KEYS * DIM], values[N_KEYS * N_VALUES], query[DIM];

/* Any numbers will do: a small generator keeps the run reproducible. */
static float next_value(unsigned *state)
{
    *state = *state * 1664525u + 1013904223u;
    return (float)(*state >> 8) / (float)(1u << 24) - 0.5f;
}

static int failed(const char *call, int rc, const char *detail)
{
    fprintf(stderr, "stream_example: %s: %s%s%s\n", call, kmv_strerror(rc),
            detail[0] ? ": " : "", detail);
    return 1;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s SNAPSHOT\n", argv[0]);
        return 2;
    }
    const char *path = argv[1];

    unsigned state = 1;
    for (size_t i = 0; i < N_KEYS * DIM; i++) keys[i] = next_value(&state);
    for (size_t i = 0; i < N_KEYS * N_VALUES; i++) values[i] = next_value(&state);
    for (size_t i = 0; i < DIM; i++) query[i] = next_value(&state);

    kmv_params params;
    kmv_params_init(&params); /* approximate steps, eps 0.1, delta 0.01 */
    kmv_ctx *ctx = NULL;
    kmv_stream *stream = NULL, *loaded = NULL;
    kmv_stats stats;
    float row[N_VALUES], row_loaded[N_VALUES];
    char err[256] = "";
    int status = 1, rc;

    if ((rc = kmv_ctx_create(&params, &ctx)) != KMV_OK) {
        failed("kmv_ctx_create", rc, "");
    } else if ((rc = kmv_stream_attention_create(ctx, DIM, N_VALUES, &stream)) != KMV_OK) {
        failed("kmv_stream_attention_create", rc, "");
    } else if ((rc = kmv_stream_append_keys(stream, keys, values, N_KEYS)) != KMV_OK) {
        failed("kmv_stream_append_keys", rc, "");
    } else if ((rc = kmv_stream_decode(stream, query, row, &stats)) != KMV_OK) {
        failed("kmv_stream_decode", rc, "");
    } else if ((rc = kmv_stream_save(stream, path, err, sizeof err)) != KMV_OK) {
        failed("kmv_stream_save", rc, err);
    } else if ((rc = kmv_stream_load(ctx, path, &loaded, err, sizeof err)) != KMV_OK) {
        failed("kmv_stream_load", rc, err);
    } else if ((rc = kmv_stream_decode(loaded, query, row_loaded, NULL)) != KMV_OK) {
        failed("kmv_stream_decode (loaded)", rc, "");
    } else if (memcmp(row, row_loaded, sizeof row) != 0) {
        fprintf(stderr, "stream_example: the loaded stream's row differs\n");
    } else {
        /* Where approximating would cost more, the exact row answers and
         * the stats say why (the fallback reason). */
        printf("kmv %s, %d keys: a decoding step (%s, fallback %s) gives %.6f %.6f %.6f %.6f\n",
               kmv_version_string(), N_KEYS, stats.mode == KMV_MODE_APPROX ? "approximate" : "exact",
               kmv_fallback_name(stats.fallback_reason), (double)row[0], (double)row[1],
               (double)row[2], (double)row[3]);
        printf("saved to %s and loaded back: the same row, bit for bit\n", path);
        status = 0;
    }
    kmv_stream_free(loaded);
    kmv_stream_free(stream);
    kmv_ctx_free(ctx);
    return status;
}
