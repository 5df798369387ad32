/* Internal: the bounds tree, FindHeavy's second backend and a
 * deterministic certificate for the light keys.
 *
 * Keys are grouped under a two-level k-means tree: groups of leaves, leaves
 * of tens of keys. Every node keeps a centre and a radius covering its keys,
 * so for any query the kernel value of each of its keys lies in
 * [exp(-hi^2 / 2 sigma^2), exp(-lo^2 / 2 sigma^2)] with lo, hi the
 * distance from the query to the centre minus and plus the radius. A query
 * visits nodes best first (the largest half-width times the node's mass of
 * |x| first), sums the leaves it opens exactly, and stops once what is left
 * unvisited, estimated at each node's midpoint, is certified to be within
 * its budget: no probability, no sampling. Where the kernel is not sparse
 * enough for that, the search gives up early and the caller answers the
 * row otherwise.
 *
 * The tree covers keys 0..n-1 of a key store. A batch product's tree is a
 * cache of the index, rebuilt (bit for bit, from the seed) when asked at a
 * new key count; a stream's grows instead (tree_grow.c): keys appended
 * after the build go to the leaf nearest them, whose radius grows to
 * cover them. */
#ifndef KMV_ALGO_TREE_H
#define KMV_ALGO_TREE_H

#include <stddef.h>
#include <stdint.h>

#include "algo/keystore.h"
#include "kmv/kmv.h"

/* Keys per leaf the build aims at. */
#define KMV__TREE_LEAF 12

typedef struct kmv__tree {
    size_t d, n;              /* key dimension, keys covered (ids 0..n-1) */
    size_t n_groups, n_leaves;
    float *gc, *lc;           /* centres: n_groups x d, n_leaves x d */
    double *gr, *lr;          /* radii, rounded up */
    uint32_t *g_off;          /* n_groups + 1: group g's leaves */
    uint32_t *l_off;          /* n_leaves + 1: leaf l's keys start at
                                 ids[l_off[l]] */
    uint32_t *l_cnt, *l_cap;  /* n_leaves: keys in leaf l, and its room */
    uint32_t *ids;            /* key ids, leaf by leaf: ids_len used of
                                 ids_cap (a leaf that outgrows its room
                                 moves to the end) */
    size_t ids_len, ids_cap;
    size_t l_wide;            /* the most keys in one leaf */
    /* Growth (tree_grow.c): room in the node arrays, and the groups the
     * build made (those past them were opened by inserts) */
    size_t l_room, g_room, g_built;
    uint32_t *g_lo, *g_hi;    /* smallest and largest key id under a node */
    uint32_t *l_lo, *l_hi;
    /* Int8 leaf centres (tree_q8.c; NULL unless asked): when set, they
     * replace lc (then NULL): leaf l's centre is lqs[l] lq[l d ..], and
     * lr[l] its radius about that point */
    int8_t *lq;
    float *lqs;
    double r_med;             /* the median leaf radius */
    double gr_med;            /* the median group radius at build */
    size_t bytes;             /* what the arrays above take */
} kmv__tree;

/* The predicted cost of building a tree over n keys of dimension d, in
 * the cost model's units (costmodel.h). */
double kmv__tree_build_cost(size_t n, size_t d);

/* Build the tree over the store's keys with id < n (n <= ks->n),
 * deterministically from seed (the same tree for any thread count and
 * whatever keys past n the store holds). KMV_OK or KMV_ENOMEM (t is then
 * empty). */
int kmv__tree_build(kmv__tree *t, const kmv_allocator *a, const kmv__keystore *ks, size_t n,
                    uint64_t seed, int threads);

/* Key id (== t->n, held by ks) into the leaf nearest it within the group
 * nearest it, when within twice the median leaf radius of its centre (or
 * within its radius): the leaf's and the group's radii grow to cover it.
 * A key farther from every leaf starts a leaf of its own, in the last
 * group when an insert opened it and its centre is within a built group's
 * median radius, else in a new group centred on the key: keys that drift
 * from what the build saw (a sorted stream, a new topic) make leaves and
 * groups of their own rather than widen old ones. Its leaf and group into *leaf, *group
 * (n_leaves and n_groups may have grown). KMV_OK or KMV_ENOMEM (t holds
 * the same keys). */
int kmv__tree_insert(kmv__tree *t, const kmv_allocator *a, const kmv__keystore *ks, uint32_t id,
                     uint32_t *leaf, uint32_t *group);

void kmv__tree_free(kmv__tree *t, const kmv_allocator *a);

/* What a product's x puts under each leaf: the mass sum_j ||x_j||_2, the
 * column sums sum_j x_j (c per leaf), and the squared distance past which
 * the leaf is negligible for a query: its keys' values times its mass
 * stay under cut = KMV__TREE_CUT budget / n_leaves. */
typedef struct kmv__tree_mass {
    size_t c;
    size_t l_room, g_room; /* leaves and groups the arrays hold */
    double budget, inv2s2, cut;
    double *la;  /* masses */
    double *ga;  /* n_groups: the masses of each group's leaves, summed */
    double *ls;  /* column sums */
    float *thr;  /* negligible from this squared distance on */
    float *s;    /* sqrt(thr), rounded up */
    float *h;    /* the same as a test on a dot product: leaf l is
                    negligible for q when <q, c_l> <= h[l] + ||q||^2 g / 2,
                    g = 1 - 2 kmv__tree_slack(d), rounding included */
} kmv__tree_mass;

/* A radius from a distance measured in double: rounded up, so that a
 * bound taken from it holds for every key whatever the last bits of the
 * sums behind the distance. Every node radius goes through it. */
static inline double kmv__tree_radius(double dist) { return dist * (1.0 + 1e-9) + 1e-30; }

/* The relative rounding allowed for a float sum of d products (each
 * product and sum rounds once: (d + 2) 2^-24, taken twice over). */
static inline double kmv__tree_slack(size_t d) { return 2.0 * ((double)d + 4.0) * 0x1p-24; }

/* The share of a row's budget all negligible leaves together may take. */
#define KMV__TREE_CUT 0.01

/* t's leaf centres in int8, in place of the float ones: scans read a
 * quarter of the bytes (a stream's single-row steps, which are bound by
 * memory), and the tree takes less room. Each centre is quantized with a
 * scale of its own, and each leaf's radius measured again about the
 * quantized point, so bounds taken from it hold for every key. Inserts
 * keep the form. KMV_OK or KMV_ENOMEM (t unchanged). */
int kmv__tree_q8(kmv__tree *t, const kmv_allocator *a, const kmv__keystore *ks);
/* Leaf l's int8 centre from the point c (d floats). */
void kmv__tree_q8_leaf(kmv__tree *t, size_t l, const float *c);
/* The distance from k to leaf l's int8 centre, rounded up (with the
 * product's rounding). */
double kmv__tree_q8_cover(const kmv__tree *t, size_t l, const float *k);

/* What t's arrays take, in bytes. */
size_t kmv__tree_bytes(const kmv__tree *t);

/* ms->ga from ms->la (each rounded up). */
void kmv__tree_group_mass(const kmv__tree *t, kmv__tree_mass *ms);

/* x: n x c in id order; budget: each row's; inv2s2 = 1 / (2 sigma^2).
 * KMV_OK or KMV_ENOMEM. */
int kmv__tree_mass_new(const kmv__tree *t, const kmv_allocator *a, const float *x, size_t c,
                       double budget, double inv2s2, kmv__tree_mass *ms);
void kmv__tree_mass_free(kmv__tree_mass *ms, const kmv_allocator *a);

/* kmv__tree_mass_new() in steps, for a growing tree (a stream's): the
 * sums (la, ga, ls) over the keys the tree covers, x in id order, with
 * thr, s and h allocated; then every leaf's limits for a budget; then one
 * leaf's again (for ms's budget, cut and inv2s2) after
 * kmv__tree_mass_add() put a key inserted since into it. A threshold
 * computed under a smaller cut than a row's is larger than it need be:
 * still a valid test, so a growing stream only refreshes the leaf that
 * changed. KMV_OK or KMV_ENOMEM. */
int kmv__tree_mass_init(const kmv__tree *t, const kmv_allocator *a, const float *x, size_t c,
                        kmv__tree_mass *ms);
void kmv__tree_mass_limits(const kmv__tree *t, kmv__tree_mass *ms, double budget, double inv2s2);
void kmv__tree_leaf_limit(const kmv__tree *t, kmv__tree_mass *ms, size_t l);
void kmv__tree_mass_add(kmv__tree_mass *ms, uint32_t leaf, uint32_t group, const float *xj);
/* Room in ms for t's leaves and groups after inserts made new ones (their
 * sums zero). KMV_OK or KMV_ENOMEM (ms as it was). */
int kmv__tree_mass_fit(kmv__tree_mass *ms, const kmv_allocator *a, const kmv__tree *t);

/* Queries one search takes at most: their distances to every leaf centre
 * are one GEMM. */
#define KMV__TREE_BLOCK 64

/* A block of rows: sum_j K(q, k_j) x_j over keys with id <= lim[i], each
 * within the mass's budget in the 2-norm over the columns. */
typedef struct kmv__tree_req {
    const kmv__tree *t;
    const kmv__tree_mass *ms;
    const kmv__keystore *ks;
    const float *x;        /* n x c, id order */
    const float *q;        /* count x d */
    size_t count;          /* 1 .. KMV__TREE_BLOCK */
    const uint32_t *lim;   /* per query, the largest visible id; NULL: all */
    double max_work;       /* keys summed past which a row gives up */
} kmv__tree_req;

typedef struct kmv__tree_out {
    double tail;       /* the certified bound on the row's error */
    uint64_t bounded;  /* leaves whose bounds were computed in full */
    uint64_t visited;  /* keys summed exactly */
    int gave_up;       /* max_work passed: the row is not written */
} kmv__tree_out;

typedef struct kmv__tree_scratch kmv__tree_scratch;

/* Scratch for kmv__tree_rows (block 1: room for a block of rows) or for
 * single rows only (block 0: kmv__tree_row_walk, kmv__tree_row_from). */
int kmv__tree_scratch_new(const kmv__tree *t, const kmv_allocator *a, int block,
                          kmv__tree_scratch **out);
void kmv__tree_scratch_free(kmv__tree_scratch *s);

/* Search; row i's estimate into y[i c .. i c + c) unless out[i].gave_up. */
void kmv__tree_rows(const kmv__tree_req *rq, kmv__tree_scratch *s, double *y, kmv__tree_out *out);

/* Rows near one point z share a scan: with zdot[l] = <z, c_l> (a GEMM of
 * the caller's) and every query of the group within rho of z, the leaves
 * that may matter to any of them (the others are negligible for all) go
 * to cands; returns how many. */
size_t kmv__tree_group_cands(const kmv__tree *t, const kmv__tree_mass *ms, const float *zdot,
                             double zn, double rho, uint32_t *cands);

/* One row (rq->q, rq->count 1, no causal limit) by the tree's two levels:
 * a group whose bound times its mass is negligible (under cut per leaf it
 * holds) is passed whole, the leaves of the others are tested against
 * their thresholds (thr, computed under a cut at most rq->ms->cut) by one
 * pass over their centres, and the row settles as kmv__tree_rows' do. */
void kmv__tree_row_walk(const kmv__tree_req *rq, kmv__tree_scratch *s, double *y,
                        kmv__tree_out *o);

/* One row (rq->q, rq->count 1, no causal limit) from its group's
 * candidates: the others are negligible for it. y: c values. */
void kmv__tree_row_from(const kmv__tree_req *rq, kmv__tree_scratch *s, const uint32_t *cands,
                        size_t n_cands, double *y, kmv__tree_out *o);

#endif /* KMV_ALGO_TREE_H */
