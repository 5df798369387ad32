/* Internal: the light mass a query's sample budget rests on (Algorithm 2,
 * lines 3 to 7, the query's side): W = sum over light keys of
 * x_j^2 K(q, k_j)^2, from the density sketch's current draws (sketch.h).
 * K^2 is a Gaussian of bandwidth sigma / sqrt 2. Heavy keys the search
 * found are summed exactly, so they leave W; missed ones stay. */
#ifndef KMV_ALGO_DENSITY_H
#define KMV_ALGO_DENSITY_H

#include <stddef.h>
#include <stdint.h>

#include "algo/sketch.h"

/* What a query's estimate leaves out besides its heavy keys: keys with
 * w[id] >= whi (summed exactly as columns) when w is not NULL. */
typedef struct kmv__density_req {
    const float *q;   /* dim, as the sketch's rows */
    size_t dim;
    float shift;      /* subtracted from squared distances, as the heavy
                         search's (kmv__heavy_req) */
    float inv2s2;     /* 1 / (2 sigma^2) of K */
    float kappa;      /* the heavy threshold */
    const uint32_t *heavy; /* the query's heavy ids, ascending */
    size_t n_heavy;
    const double *w;
    double whi;
} kmv__density_req;

/* The estimate of W (0 without draws); scratch holds sk->r floats. */
double kmv__density(const kmv__sketch *sk, const kmv__density_req *rq, float *scratch);

#endif /* KMV_ALGO_DENSITY_H */
