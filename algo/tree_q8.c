/* The bounds tree's int8 leaf centres; see tree.h. A step of a stream
 * scans every leaf centre of the groups it cannot pass whole, and on data
 * with no coarse structure that is every leaf: a pass over memory. Int8
 * centres with a scale per leaf read a quarter of the bytes; the radius
 * about the quantized point (not the float centre) keeps the bounds
 * rigorous, at the price of a radius larger by the rounding (at most half
 * a step, 0.4% of the centre's largest coordinate, per coordinate). */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <math.h>
#include <string.h>

#include "algo/tree.h"
#include "common/alloc.h"

void kmv__tree_q8_leaf(kmv__tree *t, size_t l, const float *c) {
    size_t d = t->d;
    float big = 0.0f;
    for (size_t u = 0; u < d; u++) big = fabsf(c[u]) > big ? fabsf(c[u]) : big;
    float s = big > 0.0f ? big / 127.0f : 1.0f;
    for (size_t u = 0; u < d; u++) {
        float v = roundf(c[u] / s);
        t->lq[l * d + u] = (int8_t)(v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v);
    }
    t->lqs[l] = s;
}

double kmv__tree_q8_cover(const kmv__tree *t, size_t l, const float *k) {
    size_t d = t->d;
    double s = t->lqs[l], e = 0.0, n2 = 0.0;
    for (size_t u = 0; u < d; u++) {
        double c = s * t->lq[l * d + u], v = (double)k[u] - c;
        e += v * v;
        n2 += c * c;
    }
    /* the scan may take s v_u rounded, or fused: 2^-23 of the centre's
     * norm covers either */
    return kmv__tree_radius(sqrt(e) + 0x1p-23 * sqrt(n2));
}

int kmv__tree_q8(kmv__tree *t, const kmv_allocator *a, const kmv__keystore *ks) {
    size_t L = t->l_room ? t->l_room : 1, d = t->d;
    int8_t *lq = kmv__malloc_array(a, L, d);
    float *lqs = kmv__malloc_array(a, L, sizeof(float));
    if (!lq || !lqs) {
        kmv__free(a, lq);
        kmv__free(a, lqs);
        return KMV_ENOMEM;
    }
    t->lq = lq, t->lqs = lqs;
    for (size_t l = 0; l < t->n_leaves; l++) {
        kmv__tree_q8_leaf(t, l, t->lc + l * d);
        double rl = 0.0;
        for (size_t u = 0; u < t->l_cnt[l]; u++) {
            double r = kmv__tree_q8_cover(t, l, kmv__keystore_row(ks, t->ids[t->l_off[l] + u]));
            if (r > rl) rl = r;
        }
        t->lr[l] = rl;
    }
    kmv__free(a, t->lc);
    t->lc = NULL;
    t->bytes = kmv__tree_bytes(t);
    return KMV_OK;
}
