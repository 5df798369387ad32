/* Internal: the product by the bounds tree (algo/tree.h), the backend the
 * cost model tries before the LSH tables: every row certified
 * deterministically within its share eps ||x|| / sqrt(m) of the budget,
 * so that ||Kx - y|| <= eps ||x|| with certainty. */
#ifndef KMV_ENGINE_BATCH_TREE_H
#define KMV_ENGINE_BATCH_TREE_H

#include <stddef.h>

#include "common/params.h"
#include "engine/index.h"

/* Rows the trial searches before the whole product is committed to. */
#define KMV__TREE_TRIAL_ROWS 64

/* The tree's answer to y (m x c) = K x (operands checked, m, c, n >= 1),
 * when params.backend is TREE, or AUTO (without force_approx) and a trial
 * on a few rows predicts it under half of exact_cost: then *answered = 1,
 * y written and S filled. Otherwise *answered = 0 and y untouched.
 * KMV_OK or KMV_ENOMEM (y untouched). */
int kmv__batch_tree(kmv_index *ix, const float *q, size_t m, const float *x, size_t c, float *y,
                    double exact_cost, kmv__stats *S, int *answered);

#endif /* KMV_ENGINE_BATCH_TREE_H */
