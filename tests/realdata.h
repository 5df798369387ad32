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

/* Each of p's d columns (n rows) to mean 0 and variance 1. */
static inline void rd_standardize(float *p, size_t n, size_t d) {
    for (size_t a = 0; a < d; a++) {
        double s = 0.0, s2 = 0.0;
        for (size_t i = 0; i < n; i++) s += p[i * d + a];
        double mean = s / (double)n;
        for (size_t i = 0; i < n; i++) s2 += (p[i * d + a] - mean) * (p[i * d + a] - mean);
        double sd = sqrt(s2 / (double)n);
        for (size_t i = 0; i < n; i++) p[i * d + a] = (float)((p[i * d + a] - mean) / sd);
    }
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
    rd_standardize(k, m, dd);
    kmv_array_free(&a);
    *n = m;
    *d = dd;
    return k;
}

#endif /* KMV_REALDATA_H */
