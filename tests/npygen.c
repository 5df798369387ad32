/* Test helper for cli_test.sh: writes small .npy inputs and reads outputs
 * back, through the public API only.
 *
 *   npygen write OUT ROWS COLS SEED [ndim=1|2] [bad=nan|inf ROW COL] [fill=VALUE]
 *   npygen stat FILE        prints "ndim rows cols spread first": the max
 *                           |value - first| and the first value; fails on
 *                           NaN or infinity
 *   npygen dump FILE        prints the values, one row per line
 */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kmv/kmv.h"

static int write_cmd(int argc, char **argv) {
    if (argc < 6) return 2;
    size_t rows = strtoull(argv[3], NULL, 10), cols = strtoull(argv[4], NULL, 10);
    uint64_t s = strtoull(argv[5], NULL, 10);
    int ndim = 2;
    float *v = malloc(rows * cols * sizeof(float) + 1);
    for (size_t i = 0; i < rows * cols; i++) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        v[i] = (float)((double)(s >> 11) * 0x1.0p-53 * 2.0 - 1.0);
    }
    for (int a = 6; a < argc; a++) {
        if (strcmp(argv[a], "ndim=1") == 0) ndim = 1;
        if (strncmp(argv[a], "fill=", 5) == 0) {
            float f = strtof(argv[a] + 5, NULL);
            for (size_t i = 0; i < rows * cols; i++) v[i] = f;
        }
        if (strncmp(argv[a], "bad=", 4) == 0 && a + 2 < argc) {
            size_t r = strtoull(argv[a + 1], NULL, 10), c = strtoull(argv[a + 2], NULL, 10);
            v[r * cols + c] = strcmp(argv[a] + 4, "nan") == 0 ? NAN : INFINITY;
        }
    }
    char err[256];
    int rc = kmv_npy_write(argv[2], v, ndim, rows, cols, err, sizeof err);
    free(v);
    if (rc != KMV_OK) fprintf(stderr, "npygen: %s\n", err);
    return rc == KMV_OK ? 0 : 1;
}

static int stat_cmd(const char *path) {
    kmv_array a;
    char err[256];
    if (kmv_npy_read(path, NULL, &a, err, sizeof err) != KMV_OK) {
        fprintf(stderr, "npygen: %s\n", err);
        return 1;
    }
    double spread = 0.0;
    size_t where;
    if (kmv_find_nonfinite(a.data, a.rows * a.cols, &where) != KMV_OK) {
        fprintf(stderr, "npygen: %s: non-finite value at %zu\n", path, where);
        kmv_array_free(&a);
        return 1;
    }
    for (size_t i = 0; i < a.rows * a.cols; i++)
        spread = fmax(spread, fabs((double)a.data[i] - a.data[0]));
    printf("%d %zu %zu %.9g %.9g\n", a.ndim, a.rows, a.cols, spread,
           a.rows * a.cols != 0 ? (double)a.data[0] : 0.0);
    kmv_array_free(&a);
    return 0;
}

static int dump_cmd(const char *path) {
    kmv_array a;
    char err[256];
    if (kmv_npy_read(path, NULL, &a, err, sizeof err) != KMV_OK) {
        fprintf(stderr, "npygen: %s\n", err);
        return 1;
    }
    for (size_t i = 0; i < a.rows; i++)
        for (size_t j = 0; j < a.cols; j++)
            printf("%.9g%c", (double)a.data[i * a.cols + j], j + 1 < a.cols ? ' ' : '\n');
    kmv_array_free(&a);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 3 && strcmp(argv[1], "write") == 0) return write_cmd(argc, argv);
    if (argc == 3 && strcmp(argv[1], "stat") == 0) return stat_cmd(argv[2]);
    if (argc == 3 && strcmp(argv[1], "dump") == 0) return dump_cmd(argv[2]);
    fprintf(stderr, "usage: npygen write OUT ROWS COLS SEED [...] | npygen stat|dump FILE\n");
    return 2;
}
