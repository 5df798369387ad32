/* A stream's bounds tree grows between builds; see tree.h. A key appended
 * after the build goes to the leaf nearest it within the group nearest it
 * when that leaf is near, else it starts a leaf of its own (the stream
 * builds the tree again each time its keys double, so a leaf takes in
 * about as many keys as it was built with). Centres stay where they were
 * put; radii grow to cover the newcomer, so every bound the search takes
 * from them still holds for every key. */
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
    return kmv__tree_radius(sqrt(s));
}

/* The leaf nearest k among l0 .. l1 (its float or int8 centre). */
static size_t nearest_leaf(const kmv__tree *t, const float *k, size_t l0, size_t l1) {
    if (t->lc != NULL) return l0 + nearest(k, t->lc + l0 * t->d, l1 - l0, t->d);
    size_t arg = l0;
    float best = INFINITY;
    for (size_t l = l0; l < l1; l++) {
        float v;
        kmv__sqdist_q8_rows(k, t->lq + l * t->d, t->lqs + l, 1, t->d, &v);
        if (v < best) best = v, arg = l;
    }
    return arg;
}

/* The distance from k to leaf l's centre, rounded up. */
static double leaf_cover(const kmv__tree *t, size_t l, const float *k) {
    return t->lc != NULL ? cover(k, t->lc + l * t->d, t->d) : kmv__tree_q8_cover(t, l, k);
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

/* *p (have elements of size elem) moved into room for want. */
static int regrow(const kmv_allocator *a, void **p, size_t have, size_t want, size_t elem) {
    void *q = kmv__malloc_array(a, want, elem);
    if (q == NULL) return KMV_ENOMEM;
    if (have) memcpy(q, *p, have * elem);
    kmv__free(a, *p);
    *p = q;
    return KMV_OK;
}

/* Room for one more leaf and one more group in the node arrays. */
static int node_room(kmv__tree *t, const kmv_allocator *a) {
    size_t d = t->d, L = t->n_leaves, G = t->n_groups;
    if (L + 1 > t->l_room) {
        size_t r = 2 * t->l_room + 1;
        int rc = t->lc ? regrow(a, (void **)&t->lc, L * d, r * d, sizeof(float)) : KMV_OK;
        if (rc == KMV_OK) rc = regrow(a, (void **)&t->lr, L, r, sizeof(double));
        if (rc == KMV_OK) rc = regrow(a, (void **)&t->l_off, L + 1, r + 1, sizeof(uint32_t));
        if (rc == KMV_OK) rc = regrow(a, (void **)&t->l_cnt, L, r, sizeof(uint32_t));
        if (rc == KMV_OK) rc = regrow(a, (void **)&t->l_cap, L, r, sizeof(uint32_t));
        if (rc == KMV_OK) rc = regrow(a, (void **)&t->l_lo, L, r, sizeof(uint32_t));
        if (rc == KMV_OK) rc = regrow(a, (void **)&t->l_hi, L, r, sizeof(uint32_t));
        if (rc == KMV_OK && t->lq != NULL) {
            rc = regrow(a, (void **)&t->lq, L * d, r * d, 1);
            if (rc == KMV_OK) rc = regrow(a, (void **)&t->lqs, L, r, sizeof(float));
        }
        if (rc != KMV_OK) return rc; /* arrays grown so far keep their keys */
        t->l_room = r;
    }
    if (G + 1 > t->g_room) {
        size_t r = 2 * t->g_room + 1;
        int rc = regrow(a, (void **)&t->gc, G * d, r * d, sizeof(float));
        if (rc == KMV_OK) rc = regrow(a, (void **)&t->gr, G, r, sizeof(double));
        if (rc == KMV_OK) rc = regrow(a, (void **)&t->g_off, G + 1, r + 1, sizeof(uint32_t));
        if (rc == KMV_OK) rc = regrow(a, (void **)&t->g_lo, G, r, sizeof(uint32_t));
        if (rc == KMV_OK) rc = regrow(a, (void **)&t->g_hi, G, r, sizeof(uint32_t));
        if (rc != KMV_OK) return rc;
        t->g_room = r;
    }
    return KMV_OK;
}

/* A leaf of its own for key id at k: in the last group when an insert
 * opened it, its centre is within a built group's median radius of k and
 * it is not yet as wide as a built group; else in a new group centred on
 * k. (Only the last group can take a leaf: a group's leaves are
 * contiguous.) Later keys near k then find the group by its centre. */
static int new_leaf(kmv__tree *t, const kmv_allocator *a, const float *k, uint32_t id,
                    size_t *leaf, size_t *group) {
    size_t d = t->d, L = t->n_leaves, G = t->n_groups;
    int rc = node_room(t, a);
    if (rc != KMV_OK) return rc;
    size_t last = G - 1, width = (size_t)ceil(sqrt((double)L));
    int join = last >= t->g_built && t->g_off[G] - t->g_off[last] < width &&
               cover(k, t->gc + last * d, d) <= t->gr_med;
    if (!join) {
        memcpy(t->gc + G * d, k, d * sizeof(float));
        t->gr[G] = 0.0;
        t->g_lo[G] = t->g_hi[G] = id;
        t->g_off[G + 1] = (uint32_t)L;
        last = G;
        t->n_groups = G + 1;
    }
    if (t->lq != NULL) kmv__tree_q8_leaf(t, L, k);
    else memcpy(t->lc + L * d, k, d * sizeof(float));
    t->lr[L] = 0.0;
    t->l_off[L] = (uint32_t)t->ids_len;
    t->l_cnt[L] = t->l_cap[L] = 0;
    t->l_lo[L] = t->l_hi[L] = id;
    t->n_leaves = L + 1;
    t->g_off[last + 1] = (uint32_t)(L + 1);
    *leaf = L;
    *group = last;
    return KMV_OK;
}

int kmv__tree_insert(kmv__tree *t, const kmv_allocator *a, const kmv__keystore *ks, uint32_t id,
                     uint32_t *leaf, uint32_t *group) {
    if (t->n_groups == 0 || id != t->n) return KMV_EINVAL;
    size_t d = t->d;
    const float *k = kmv__keystore_row(ks, id);
    size_t g = nearest(k, t->gc, t->n_groups, d);
    size_t l0 = t->g_off[g], l = nearest_leaf(t, k, l0, t->g_off[g + 1]);
    int rc = KMV_OK;
    double rl = leaf_cover(t, l, k);
    if (rl > t->lr[l] && rl > 2.0 * t->r_med) rc = new_leaf(t, a, k, id, &l, &g);
    if (rc == KMV_OK) rc = room(t, a, l);
    if (rc != KMV_OK) return rc;
    t->ids[t->l_off[l] + t->l_cnt[l]++] = id;
    if (t->l_cnt[l] > t->l_wide) t->l_wide = t->l_cnt[l];
    rl = leaf_cover(t, l, k);
    double rg = cover(k, t->gc + g * d, d);
    if (rl > t->lr[l]) t->lr[l] = rl;
    if (rg > t->gr[g]) t->gr[g] = rg;
    t->l_hi[l] = t->g_hi[g] = id; /* ids arrive in order */
    t->n++;
    t->bytes = kmv__tree_bytes(t);
    *leaf = (uint32_t)l;
    *group = (uint32_t)g;
    return KMV_OK;
}

int kmv__tree_mass_fit(kmv__tree_mass *ms, const kmv_allocator *a, const kmv__tree *t) {
    size_t L = t->n_leaves, G = t->n_groups, c = ms->c;
    if (L > ms->l_room) {
        size_t r = t->l_room, have = ms->l_room;
        double *la = kmv__malloc_array(a, r, sizeof(double)), *ls = kmv__malloc_array(a, r, c * sizeof(double));
        float *thr = kmv__malloc_array(a, r, sizeof(float)), *sv = kmv__malloc_array(a, r, sizeof(float));
        float *h = kmv__malloc_array(a, r, sizeof(float));
        if (!la || !ls || !thr || !sv || !h) {
            void *p[] = {la, ls, thr, sv, h};
            for (size_t u = 0; u < 5; u++) kmv__free(a, p[u]);
            return KMV_ENOMEM;
        }
        memcpy(la, ms->la, have * sizeof(double));
        memcpy(ls, ms->ls, have * c * sizeof(double));
        memcpy(thr, ms->thr, have * sizeof(float));
        memcpy(sv, ms->s, have * sizeof(float));
        memcpy(h, ms->h, have * sizeof(float));
        for (size_t l = have; l < r; l++) {
            la[l] = 0.0, thr[l] = 0.0f, sv[l] = 0.0f, h[l] = -INFINITY;
            for (size_t col = 0; col < c; col++) ls[l * c + col] = 0.0;
        }
        void *old[] = {ms->la, ms->ls, ms->thr, ms->s, ms->h};
        for (size_t u = 0; u < 5; u++) kmv__free(a, old[u]);
        ms->la = la, ms->ls = ls, ms->thr = thr, ms->s = sv, ms->h = h;
        ms->l_room = r;
    }
    if (G > ms->g_room) {
        double *ga = kmv__malloc_array(a, t->g_room, sizeof(double));
        if (ga == NULL) return KMV_ENOMEM;
        memcpy(ga, ms->ga, ms->g_room * sizeof(double));
        for (size_t g = ms->g_room; g < t->g_room; g++) ga[g] = 0.0;
        kmv__free(a, ms->ga);
        ms->ga = ga;
        ms->g_room = t->g_room;
    }
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
