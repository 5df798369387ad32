/* LSH shape selection by predicted cost; see costmodel.h. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "algo/costmodel.h"

#include <math.h>

#include "common/alloc.h"
#include "algo/kernel.h"
#include "common/rng.h"

#define PLAN_QUERIES KMV__PLAN_QUERIES
#define PLAN_KEYS KMV__PLAN_KEYS
#define N_WIDTHS 8
#define MAX_K 24

#define TAB 1024
#define TAB_MAX 16.0

/* p(u) by linear interpolation (error below 1e-5 on this grid); exact
 * beyond the table, where p decays like 1/u. */
static double collision(const double *tab, double u) {
    if (u >= TAB_MAX) return kmv__lsh_collision(u);
    if (!(u >= 0.0)) return 0.0; /* NaN: a distance past float's range, far */
    double f = u * (TAB / TAB_MAX);
    int i = (int)f;
    return tab[i] + (f - i) * (tab[i + 1] - tab[i]);
}

int kmv__lsh_choose(const kmv_allocator *al, const kmv__keystore *ks, const float *q, size_t m,
                    double r_near, double miss, double keys_per_query, uint64_t seed,
                    kmv__lsh_plan *out, int *found) {
    *found = 0;
    size_t n = ks->n, d = ks->d;
    size_t pq = m < PLAN_QUERIES ? m : PLAN_QUERIES;
    size_t pk = n < PLAN_KEYS ? n : PLAN_KEYS;
    size_t pairs = pq * pk;
    static const double wmul[N_WIDTHS] = {0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0, 5.6};
    /* p[w][pair]: one projection's collision probability. */
    double *pw = kmv__malloc_array(al, N_WIDTHS * pairs, sizeof(double));
    double *pk_pow = kmv__malloc_array(al, pairs, sizeof(double));
    float *dist = kmv__malloc_array(al, pk, sizeof(float));
    if (pw == NULL || pk_pow == NULL || dist == NULL) {
        kmv__free(al, pw);
        kmv__free(al, pk_pow);
        kmv__free(al, dist);
        return KMV_ENOMEM;
    }
    /* The collision probability tabulated once: planning must stay a small
     * fraction of even a small product, and erfc per pair and width is not. */
    double tab[TAB + 1];
    for (int i = 0; i <= TAB; i++) tab[i] = kmv__lsh_collision(TAB_MAX * i / TAB);
    uint64_t rng = kmv__rng_stream(seed, KMV__RNG_PLAN);
    for (size_t a = 0; a < pq; a++) {
        size_t qi = pq == m ? a : (size_t)kmv__rng_below(&rng, m);
        kmv__sqdist_rows(q + qi * d, ks->rows, pk, d, dist);
        for (size_t b = 0; b < pk; b++) {
            double r = sqrt((double)dist[b]);
            for (int w = 0; w < N_WIDTHS; w++)
                pw[(size_t)w * pairs + a * pk + b] = collision(tab, r / (wmul[w] * r_near));
        }
    }
    double best = INFINITY;
    double scale = (double)n / (double)pk; /* pairs per query in the full data */
    for (int w = 0; w < N_WIDTHS; w++) {
        double p1 = kmv__lsh_collision(1.0 / wmul[w]);
        const double *pr = pw + (size_t)w * pairs;
        for (size_t i = 0; i < pairs; i++) pk_pow[i] = 1.0;
        double pnear = 1.0;
        for (int k = 1; k <= MAX_K; k++) {
            pnear *= p1;
            double steps = 0.0, cands = 0.0;
            /* L tables with near-collision pnear each miss with (1-pnear)^L. */
            double L = ceil(log(miss) / log1p(-pnear));
            if (pnear >= 1.0) L = 1.0;
            for (size_t i = 0; i < pairs; i++) {
                pk_pow[i] *= pr[i];
                steps += pk_pow[i];
                double u = L * pk_pow[i];
                cands += u < 1.0 ? u : 1.0;
            }
            if (L > KMV__LSH_MAX_TABLES) continue;
            steps *= L * scale / (double)pq;
            cands *= scale / (double)pq;
            kmv__lsh_shape sh = {k, (int)L, wmul[w] * r_near};
            double cost = kmv__cost_hash(&sh, (double)d) +
                          kmv__cost_insert(&sh, (double)d) * keys_per_query +
                          KMV__COST_STEP * steps + kmv__cost_cand((double)d) * cands;
            if (cost < best) {
                best = cost;
                out->shape = sh;
                out->steps_per_query = steps;
                out->cands_per_query = cands;
                out->cost_per_query = cost;
            }
        }
    }
    kmv__free(al, pw);
    kmv__free(al, pk_pow);
    kmv__free(al, dist);
    *found = isfinite(best);
    return KMV_OK;
}
