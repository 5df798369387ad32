/* Internal: an index of keys for the layers above the engine: the key
 * store's random order, the heavy search's tables over it, its params and
 * metered allocator, and ApproxKMV's product over it (batch.c). Its layout
 * is the engine's own (index_layout.h): callers go through these
 * functions. */
#ifndef KMV_ENGINE_INDEX_H
#define KMV_ENGINE_INDEX_H

#include <stddef.h>
#include <stdint.h>

#include "algo/costmodel.h"
#include "algo/heavy.h"
#include "algo/keystore.h"
#include "algo/tree.h"
#include "common/alloc.h"
#include "common/params.h"

/* Below this many kernel entries (about 10 ms of exact work) planning and
 * building tables cost more than approximation can save: exact runs. */
#define KMV__APPROX_MIN_ENTRIES 8388608.0

/* An empty index of dim-dimensional keys under p, its memory drawn from
 * base through a meter capped at p->max_bytes. KMV_OK or KMV_ENOMEM. */
int kmv__index_new(const kmv__params *p, const kmv_allocator *base, size_t dim, kmv_index **out);

/* What the index holds and runs under. */
const kmv__keystore *kmv__index_keys(const kmv_index *ix);
/* The keys for rewriting a coordinate in place (an attention stream's
 * lift); the caller drops the tables, which hashed the old rows. */
kmv__keystore *kmv__index_keys_mut(kmv_index *ix);
const kmv__params *kmv__index_params(const kmv_index *ix);
const kmv_allocator *kmv__index_alloc(const kmv_index *ix); /* metered */
kmv__meter *kmv__index_meter(kmv_index *ix);
int kmv__index_force_approx(const kmv_index *ix);
void kmv__index_set_force_approx(kmv_index *ix, int on);

/* Append n_keys keys past their checks; with tables = 0 the tables are
 * left alone (the caller drops them once the append has succeeded). On
 * error the keys and tables are as they were. */
int kmv__index_append_keys(kmv_index *ix, const float *keys, size_t n_keys, int tables);

/* The product; see kmv_index_matvec(). Operands checked by the caller. */
int kmv__index_matvec_checked(kmv_index *ix, const float *q, size_t m, const float *x, size_t c,
                              float *y, kmv__stats *stats);

/* ------------------------------------------------------- the heavy search */

/* What a plan is asked: tables whose search finds each key with
 * K >= kappa with probability >= 1 - miss, costing the m queries q (or
 * stand-ins for them) at most cap; keys_per_query is the share of the build
 * each query pays (n / m for one product, about 1 for a decoding loop,
 * which appends a key per query). */
typedef struct kmv__plan_req {
    const float *q;
    size_t m;
    double kappa, miss, cap, keys_per_query;
} kmv__plan_req;

/* Plan and fill the tables for rq, unless those held were planned for a
 * threshold at most twice as fine at no less than half the keys. KMV_OK
 * (*refused: no shape fits the cap; nothing built or dropped then) or
 * KMV_ENOMEM. */
int kmv__index_plan(kmv_index *ix, const kmv__plan_req *rq, int *refused);

/* Whether tables are held, and then the heavy search over them, the
 * threshold they serve and the key count they were planned at. */
int kmv__index_has_tables(const kmv_index *ix);
kmv__heavy_src kmv__index_heavy(const kmv_index *ix);
double kmv__index_kappa(const kmv_index *ix);
size_t kmv__index_planned_keys(const kmv_index *ix);
kmv__lsh_shape kmv__index_shape(const kmv_index *ix);

/* Drop the tables and the bounds tree (caches: made again when asked). */
void kmv__index_drop_tables(kmv_index *ix);

/* ------------------------------------------------------ the bounds tree */

/* The bounds tree over every key held, built first (from params.seed)
 * unless one over the same keys is held; *seconds: the build's time (0
 * when held). KMV_OK or KMV_ENOMEM (no tree held then). */
int kmv__index_tree(kmv_index *ix, const kmv__tree **out, double *seconds);

/* Whether a tree over every key held is there. */
int kmv__index_has_tree(const kmv_index *ix);

/* Work counters, all time. */
typedef struct kmv__index_counts {
    uint64_t keys_hashed, table_inserts, table_builds;
} kmv__index_counts;
kmv__index_counts kmv__index_get_counts(const kmv_index *ix);

/* Everything a snapshot needs beyond the keys, to rebuild the index bit
 * for bit. */
typedef struct kmv__index_state {
    uint64_t shuffle_rng;
    int lsh_built;
    kmv__lsh_plan plan; /* plan.shape: the tables' */
    double kappa;
    size_t lsh_n, refused_n;
    kmv__index_counts counts;
} kmv__index_state;

void kmv__index_get_state(const kmv_index *ix, kmv__index_state *st);

/* After the keys were appended in id order: put them in the saved store
 * order (rows[pos], id_at[pos]), take the saved state and refill the
 * saved tables. KMV_OK or KMV_ENOMEM. */
int kmv__index_restore(kmv_index *ix, const float *rows, const uint32_t *id_at,
                       const kmv__index_state *st);

#endif /* KMV_ENGINE_INDEX_H */
