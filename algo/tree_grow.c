/* A stream's bounds tree grows between builds; see tree.h. A key appended
 * after the build goes to the leaf nearest it within the group nearest it
 * (no split: the stream builds the tree again each time its keys double,
 * so a leaf takes in about as many keys as it was built with). Centres
 * stay where the build put them; radii grow to cover the newcomer, so
 * every bound the search takes from them still holds for every key. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <math.h>
#include <string.h>

#include "algo/kernel.h"
#include "algo/tree.h"
#include "common/alloc.h"

/* The nearest of count centres (rows of d) to k; ties to the first. */
static size_t nearest(const float *k, const float *centres, size_t count, size_t d) {
    size_t arg = 0;
    float best = INFINITY;
    for (size_t u = 0; u < count; u++) {
        float v = kmv__sqdist(k, centres + u * d, d);
        if (v < best) best = v, arg = u;
    }
    return arg;
}

/* The distance from k to a centre in double, rounded up as fit_node's. */
static double cover(const float *k, const float *centre, size_t d) {
    double s = 0.0;
    for (size_t u = 0; u < d; u++) {
        double v = (double)k[u] - centre[u];
        s += v * v;
    }
    return sqrt(s) * (1.0 + 1e-9) + 1e-30;
}

/* Room for one more key in leaf l: a full leaf moves to the end of ids
 * with twice the room. */
static int room(kmv__tree *t, const kmv_allocator *a, size_t l) {
    if (t->l_cnt[l] < t->l_cap[l]) return KMV_OK;
    size_t cap = 2 * (size_t)t->l_cnt[l] > 4 ? 2 * (size_t)t->l_cnt[l] : 4;
    if (cap > UINT32_MAX || t->ids_len + cap > UINT32_MAX) return KMV_ENOMEM;
    if (t->ids_len + cap > t->ids_cap) {
        size_t ncap = 2 * t->ids_cap > t->ids_len + cap ? 2 * t->ids_cap : t->ids_len + cap;
        uint32_t *ids = kmv__malloc_array(a, ncap, sizeof(uint32_t));
        if (ids == NULL) return KMV_ENOMEM;
        memcpy(ids, t->ids, t->ids_len * sizeof(uint32_t));
        kmv__free(a, t->ids);
        t->ids = ids;
        t->ids_cap = ncap;
    }
    memcpy(t->ids + t->ids_len, t->ids + t->l_off[l], t->l_cnt[l] * sizeof(uint32_t));
    t->l_off[l] = (uint32_t)t->ids_len;
    t->l_cap[l] = (uint32_t)cap;
    t->ids_len += cap;
    return KMV_OK;
}

int kmv__tree_insert(kmv__tree *t, const kmv_allocator *a, const kmv__keystore *ks, uint32_t id,
                     uint32_t *leaf, uint32_t *group) {
    if (t->n_groups == 0 || id != t->n) return KMV_EINVAL;
    size_t d = t->d;
    const float *k = kmv__keystore_row(ks, id);
    size_t g = nearest(k, t->gc, t->n_groups, d);
    size_t l0 = t->g_off[g], l = l0 + nearest(k, t->lc + l0 * d, t->g_off[g + 1] - l0, d);
    int rc = room(t, a, l);
    if (rc != KMV_OK) return rc;
    t->ids[t->l_off[l] + t->l_cnt[l]++] = id;
    if (t->l_cnt[l] > t->l_wide) t->l_wide = t->l_cnt[l];
    double rl = cover(k, t->lc + l * d, d), rg = cover(k, t->gc + g * d, d);
    if (rl > t->lr[l]) t->lr[l] = rl;
    if (rg > t->gr[g]) t->gr[g] = rg;
    t->l_hi[l] = t->g_hi[g] = id; /* ids arrive in order */
    t->n++;
    t->bytes = kmv__tree_bytes(t);
    *leaf = (uint32_t)l;
    *group = (uint32_t)g;
    return KMV_OK;
}

void kmv__tree_mass_add(kmv__tree_mass *ms, uint32_t leaf, uint32_t group, const float *xj) {
    double s2 = 0.0;
    for (size_t col = 0; col < ms->c; col++) {
        ms->ls[(size_t)leaf * ms->c + col] += xj[col];
        s2 += (double)xj[col] * xj[col];
    }
    /* Rounded up at every addition, so that the running sums stay above
     * the exact ones however many keys arrive. */
    double m = sqrt(s2) * (1.0 + 1e-12);
    ms->la[leaf] = nextafter(ms->la[leaf] + m, INFINITY);
    ms->ga[group] = nextafter(ms->ga[group] + m, INFINITY);
}
