/* Internal: single rows of the product computed exactly over the index's
 * keys, for the rows an approximate backend gives up on and for the
 * monitor (params.verify_every), which checks every N-th approximated row
 * against its exact value. */
#ifndef KMV_ENGINE_ROWS_H
#define KMV_ENGINE_ROWS_H

#include <stddef.h>
#include <stdint.h>

#include "algo/keystore.h"
#include "common/params.h"

/* y[0..c) = sum over keys with id <= lim of K(q, k_j) x_j (x: n x c in id
 * order), in double, over the store's contiguous rows. */
void kmv__exact_row(const kmv__keystore *ks, const float *q, const float *x, size_t c,
                    double inv2s2, uint32_t lim, double *y);

/* The monitor: rows 0, every, 2 every, ... of y (m x c) against their
 * exact values; S->verified and S->verify_mean/p99/max get the errors
 * sqrt(m) ||y_i - (Kx)_i|| / ||x|| (||x|| over all of x). lim_of_row:
 * causal products (row i sees ids <= i). KMV_OK or KMV_ENOMEM (S
 * untouched). */
int kmv__verify_rows(const kmv_allocator *a, const kmv__keystore *ks, const float *q, size_t m,
                     const float *x, size_t c, const float *y, double inv2s2, int causal,
                     size_t every, int threads, kmv__stats *S);

#endif /* KMV_ENGINE_ROWS_H */
