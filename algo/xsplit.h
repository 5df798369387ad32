/* Internal: preprocessing x (the paper's Lemma 3.2, Definition 3.1).
 *
 * With weights w_j = x_j^2 (for a matrix V, the row norms ||v_j||^2) and
 * their mean wbar = ||x||^2 / n, keys split three ways:
 *   H1: w_j >= hi wbar, summed exactly for every query (few: at most n/hi);
 *   H2: w_j <= n^-4 wbar, dropped; each row then errs by at most
 *       sum_{H2} ||x_j|| (kernel values are <= 1), which is counted;
 *   T:  the rest, handled by heavy-key search and sampling.
 * The paper's hi is n^gamma; the driver may lower it when the LSH tables
 * were planned for lighter weights (see approx.c). */
#ifndef KMV_XSPLIT_H
#define KMV_XSPLIT_H

#include <stddef.h>
#include <stdint.h>

#include "algo/keystore.h"

typedef struct kmv__xsplit {
    double nx2;      /* ||x||^2 (Frobenius for V), in double */
    double wbar;     /* nx2 / n */
    double w_max_t;  /* largest weight in T */
    uint32_t *h1;    /* ids of H1, ascending */
    size_t n_h1, n_drop, n_t;
    double drop_l1;  /* sum over H2 of ||x_j||_2 */
    float *xp;       /* n x c in store order, x_j for j in T, 0 elsewhere */
    double *wp;      /* n weights in store order, w_j for j in T, 0 elsewhere */
} kmv__xsplit;

/* Split x (n x c, ids in arrival order) for the keys of ks, with H1 at
 * weights >= hi * wbar (hi >= 1). Returns KMV_OK or KMV_ENOMEM (nothing to
 * free). nx2 = 0 gives everything in H2 (y = 0 exactly). */
int kmv__xsplit_run(kmv__xsplit *xs, const kmv_allocator *a, const kmv__keystore *ks,
                    const float *x, size_t c, double hi);

void kmv__xsplit_free(kmv__xsplit *xs, const kmv_allocator *a);

#endif /* KMV_XSPLIT_H */
