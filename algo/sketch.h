/* Internal: the kernel-density sketch that sets each row's sample budget
 * (Algorithm 2, lines 3 to 7).
 *
 * The budget of row i rests on W_i = sum over light keys of x_j^2 K_ij^2,
 * a weighted density of the squared kernel K^2 (a Gaussian of bandwidth
 * sigma / sqrt 2). As in the paper, keys of T are grouped by x_j^2 rounded
 * up to a power of (1 + eps), so that within a group the weight is one
 * number xbar_m^2 and the weighted density is xbar_m^2 times an unweighted
 * one. The estimator per group is random sampling: a query's estimate is
 *
 *     W_i ~ (Wbar / r) sum over r draws of K^2(q_i, k_draw),
 *
 * with draws taken from group m with probability |B_m| xbar_m^2 / Wbar,
 * Wbar = sum_m |B_m| xbar_m^2, and uniformly inside the group; that is an
 * unbiased estimate of sum_j xbar_j^2 K_ij^2 >= W_i. Random sampling has a
 * relative-error bound only down to densities near Wbar / r: below that
 * the estimate is 0 more often than not. The driver therefore never trusts
 * it alone: every row takes at least a floor of samples, and the empirical
 * variance of those samples is checked after the fact (approx.c).
 *
 * Groups grow in place: adding a key is O(log groups) amortized; the draws
 * are redrawn per product in O(r (log groups + d)). */
#ifndef KMV_SKETCH_H
#define KMV_SKETCH_H

#include <stddef.h>
#include <stdint.h>

#include "algo/keystore.h"

typedef struct kmv__sketch_group {
    int64_t m;       /* weights in ((1+eps)^(m-1), (1+eps)^m] */
    double wround;   /* (1+eps)^m */
    uint32_t *ids;
    size_t len, cap;
} kmv__sketch_group;

typedef struct kmv__sketch {
    double log_base;          /* ln(1 + eps) */
    kmv__sketch_group *g;     /* sorted by m */
    size_t ng, capg;
    double wbar;              /* sum_m |B_m| xbar_m^2 */
    /* The current draws. */
    size_t r;
    float *rows;              /* r x d */
    uint32_t *ids;            /* r key ids */
    double scale;             /* wbar / r */
} kmv__sketch;

void kmv__sketch_init(kmv__sketch *sk, double eps);

/* Add key id with weight w > 0 to its group. KMV_OK or KMV_ENOMEM (the
 * sketch is then unchanged). */
int kmv__sketch_add(kmv__sketch *sk, const kmv_allocator *a, uint32_t id, double w);

/* Remove the key added last with weight w (undoing a failed block). */
void kmv__sketch_pop(kmv__sketch *sk, double w);

/* Draw r keys as described above (r >= 1), from seed; gathers their rows
 * from ks. Groups whose weights all exceed w_below are left out (INFINITY:
 * none), so that a sketch over every key can serve a product whose
 * heaviest keys are summed exactly: the caller then counts a draw of such
 * a key (possible only from the group straddling w_below) as 0. With no
 * keys to draw from, draws nothing (r = 0, scale = 0). */
int kmv__sketch_draw(kmv__sketch *sk, const kmv_allocator *a, const kmv__keystore *ks,
                     size_t r, uint64_t seed, double w_below);

void kmv__sketch_free(kmv__sketch *sk, const kmv_allocator *a);

#endif /* KMV_SKETCH_H */
