/* The x^2-grouped kernel-density sketch; see sketch.h. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "algo/sketch.h"

#include <math.h>
#include <string.h>

#include "common/alloc.h"
#include "common/rng.h"

/* Groups hold weights within a factor 1 + eps. For eps below 1e-6 the
 * base stays at 1 + 1e-6: a spread that small is immaterial next to the
 * sampling error, and a finer base would take the group index, log(w) over
 * log(base), past int64 (the fuzzer found eps = 1e-300 doing it). */
#define MIN_GROUP_SPREAD 1e-6

void kmv__sketch_init(kmv__sketch *sk, double eps) {
    memset(sk, 0, sizeof *sk);
    sk->log_base = log1p(eps > MIN_GROUP_SPREAD ? eps : MIN_GROUP_SPREAD);
}

void kmv__sketch_free(kmv__sketch *sk, const kmv_allocator *a) {
    for (size_t b = 0; b < sk->ng; b++) kmv__free(a, sk->g[b].ids);
    kmv__free(a, sk->g);
    kmv__free(a, sk->rows);
    kmv__free(a, sk->ids);
    double lb = sk->log_base;
    memset(sk, 0, sizeof *sk);
    sk->log_base = lb;
}

/* Index of the first group with m >= key. */
static size_t lower_bound(const kmv__sketch *sk, int64_t key) {
    size_t lo = 0, hi = sk->ng;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (sk->g[mid].m < key) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

int kmv__sketch_add(kmv__sketch *sk, const kmv_allocator *a, uint32_t id, double w) {
    int64_t m = (int64_t)ceil(log(w) / sk->log_base);
    size_t b = lower_bound(sk, m);
    if (b == sk->ng || sk->g[b].m != m) {
        if (sk->ng == sk->capg) {
            size_t cap = sk->capg ? sk->capg * 2 : 16;
            kmv__sketch_group *g = kmv__malloc_array(a, cap, sizeof *g);
            if (g == NULL) return KMV_ENOMEM;
            if (sk->ng) memcpy(g, sk->g, sk->ng * sizeof *g);
            kmv__free(a, sk->g);
            sk->g = g;
            sk->capg = cap;
        }
        memmove(sk->g + b + 1, sk->g + b, (sk->ng - b) * sizeof *sk->g);
        sk->g[b] = (kmv__sketch_group){m, exp((double)m * sk->log_base), NULL, 0, 0};
        sk->ng++;
    }
    kmv__sketch_group *gr = &sk->g[b];
    if (gr->len == gr->cap) {
        size_t cap = gr->cap ? gr->cap * 2 : 8;
        uint32_t *ids = kmv__malloc_array(a, cap, sizeof(uint32_t));
        if (ids == NULL) return KMV_ENOMEM; /* an empty new group is harmless */
        if (gr->len) memcpy(ids, gr->ids, gr->len * sizeof(uint32_t));
        kmv__free(a, gr->ids);
        gr->ids = ids;
        gr->cap = cap;
    }
    gr->ids[gr->len++] = id;
    sk->wbar += gr->wround;
    return KMV_OK;
}

void kmv__sketch_pop(kmv__sketch *sk, double w) {
    int64_t m = (int64_t)ceil(log(w) / sk->log_base);
    size_t b = lower_bound(sk, m);
    if (b == sk->ng || sk->g[b].m != m || sk->g[b].len == 0) return;
    /* An emptied group stays: it has no mass, so draws never land on it. */
    sk->g[b].len--;
    sk->wbar -= sk->g[b].wround;
}

int kmv__sketch_draw(kmv__sketch *sk, const kmv_allocator *a, const kmv__keystore *ks,
                     size_t r, uint64_t seed, double w_below) {
    kmv__free(a, sk->rows);
    kmv__free(a, sk->ids);
    sk->rows = NULL;
    sk->ids = NULL;
    sk->r = 0;
    sk->scale = 0.0;
    if (sk->ng == 0 || r == 0) return KMV_OK;
    double *cum = kmv__malloc_array(a, sk->ng, sizeof(double));
    if (cum == NULL) return KMV_ENOMEM;
    /* Recomputed here rather than trusting the running sum's rounding. */
    double total = 0.0;
    for (size_t b = 0; b < sk->ng; b++) {
        const kmv__sketch_group *gr = &sk->g[b];
        if (gr->wround / exp(sk->log_base) < w_below) total += (double)gr->len * gr->wround;
        cum[b] = total;
    }
    if (total > 0.0) {
        sk->rows = kmv__malloc_array(a, r, ks->d * sizeof(float));
        sk->ids = kmv__malloc_array(a, r, sizeof(uint32_t));
    }
    if (total <= 0.0 || sk->rows == NULL || sk->ids == NULL) {
        kmv__free(a, cum);
        kmv__free(a, sk->rows);
        kmv__free(a, sk->ids);
        sk->rows = NULL;
        sk->ids = NULL;
        return total <= 0.0 ? KMV_OK : KMV_ENOMEM;
    }
    uint64_t rng = kmv__rng_stream(seed, KMV__RNG_SKETCH);
    for (size_t t = 0; t < r; t++) {
        double u = kmv__rng_unit(&rng) * total;
        size_t lo = 0, hi = sk->ng - 1;
        while (lo < hi) {
            size_t mid = lo + (hi - lo) / 2;
            if (cum[mid] <= u) lo = mid + 1;
            else hi = mid;
        }
        /* Only u rounding up to total could land past the last group
         * drawn from, or on an empty one: step back to one that counts. */
        while (lo > 0 && !(cum[lo] > cum[lo - 1])) lo--;
        const kmv__sketch_group *gr = &sk->g[lo];
        uint32_t id = gr->ids[kmv__rng_below(&rng, gr->len)];
        sk->ids[t] = id;
        memcpy(sk->rows + t * ks->d, kmv__keystore_row(ks, id), ks->d * sizeof(float));
    }
    kmv__free(a, cum);
    sk->r = r;
    sk->scale = total / (double)r;
    return KMV_OK;
}
