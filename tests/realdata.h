/* The real samples shipped in data/ (data/README.md), as the tests read
 * them from the runfiles or the source tree. Header-only. */
#ifndef KMV_REALDATA_H
#define KMV_REALDATA_H

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kmv/kmv.h"

/* data/<name>, read into *a; KMV_OK or the reader's error (err filled). */
static inline int rd_read(const char *name, kmv_array *a, char *err, size_t err_len) {
    char path[256];
    int rc = KMV_EIO;
    const char *dirs[] = {"data/", "../data/"};
    for (size_t i = 0; i < 2 && rc != KMV_OK; i++) {
        snprintf(path, sizeof path, "%s%s", dirs[i], name);
        rc = kmv_npy_read(path, NULL, a, err, err_len);
    }
    return rc;
}

/* Every `every`-th U.S. postal code's (latitude, longitude), both columns
 * standardized over the rows taken: real low-dimensional kernel-density
 * data. *n rows of *d; NULL when the file cannot be read (err filled). */
static inline float *rd_zipcodes(size_t every, size_t *n, size_t *d, char *err, size_t err_len) {
    kmv_array a;
    if (rd_read("zipcodes_latlon.npy", &a, err, err_len) != KMV_OK) return NULL;
    size_t m = a.rows / every, dd = a.cols;
    float *k = malloc(m * dd * sizeof(float));
    for (size_t i = 0; i < m; i++) memcpy(k + i * dd, a.data + every * i * dd, dd * sizeof(float));
    for (size_t u = 0; u < dd; u++) {
        double s = 0.0, s2 = 0.0;
        for (size_t i = 0; i < m; i++) s += k[i * dd + u];
        for (size_t i = 0; i < m; i++) s2 += (k[i * dd + u] - s / (double)m) * (k[i * dd + u] - s / (double)m);
        for (size_t i = 0; i < m; i++) k[i * dd + u] = (float)((k[i * dd + u] - s / (double)m) / sqrt(s2 / (double)m));
    }
    kmv_array_free(&a);
    *n = m;
    *d = dd;
    return k;
}

#endif /* KMV_REALDATA_H */
