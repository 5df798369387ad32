/* Internal: Euclidean LSH tables (p-stable projections, Datar et al. 2004)
 * over the keys, growing in place.
 *
 * Table t hashes v to the bucket of the k integers floor(<a_u, v>/w + b_u),
 * u = t k .. t k + k - 1, with a_u standard normal and b_u uniform in [0, 1);
 * the k integers are named by their XXH3 hash. All k L projections of a block
 * of points are one GEMM. A bucket's ids are contiguous (scanning one is a
 * sequential read, not a pointer chase: the scan is the engine's hot loop),
 * kept in a per-table arena where a full bucket moves to a block twice its
 * size (so a table holds up to about 2^30 keys: arena offsets are 32-bit).
 * Appending a key is O(k L d) for its projections plus O(L) amortized for
 * the inserts, independent of the keys already stored (slots and arena
 * double when full). Buckets are found again by the same hash, so two
 * distinct buckets sharing a 64-bit name would merely merge: candidates are
 * always verified with the exact kernel. */
#ifndef KMV_LSH_H
#define KMV_LSH_H

#include <stddef.h>
#include <stdint.h>

#include "kmv/kmv.h"

typedef struct kmv__lsh_shape {
    int k;   /* projections per table, >= 1 */
    int L;   /* tables, >= 1 */
    double w; /* bucket width, > 0 */
} kmv__lsh_shape;

typedef struct kmv__lsh_slot {
    uint64_t code; /* bucket name, 0 = empty slot */
    uint32_t off;  /* the bucket's ids start at arena[off] */
    uint32_t len;  /* room: the power of two at or above len */
} kmv__lsh_slot;

typedef struct kmv__lsh_table {
    kmv__lsh_slot *slot; /* open addressing, linear probing */
    size_t slots;        /* power of two */
    size_t used;
    uint32_t *arena;     /* every bucket's ids, contiguous per bucket */
    size_t arena_used, arena_cap;
} kmv__lsh_table;

typedef struct kmv__lsh {
    size_t d;
    kmv__lsh_shape shape;
    float *proj;          /* d x (k L), row-major, already divided by w */
    float *offs;          /* k L offsets in [0, 1) */
    kmv__lsh_table *tab;  /* L tables */
    size_t n;             /* keys inserted */
} kmv__lsh;

/* Probability that two points at distance r share a bucket of one
 * projection of width w (Datar et al., Gaussian projections); u = r / w. */
double kmv__lsh_collision(double u);

/* Empty tables of the given shape; projections drawn from seed. */
int kmv__lsh_init(kmv__lsh *h, const kmv_allocator *a, size_t d, kmv__lsh_shape shape,
                  uint64_t seed);

/* Insert count keys (count x d) as ids h->n .. h->n + count - 1, on up to
 * nt threads (tables are split among them; each table still takes its ids
 * in order, so the result does not depend on nt). Returns KMV_OK or
 * KMV_ENOMEM, which leaves the tables' content unchanged. */
int kmv__lsh_append(kmv__lsh *h, const kmv_allocator *a, const float *k, size_t count, int nt);

/* Bucket names of count points (count x d) in the first ntab tables
 * (1 <= ntab <= L): codes[i * ntab + t]. scratch holds count * k * ntab
 * floats. Thread-safe (reads only); runs BLAS on the calling thread's
 * OpenMP setting. */
void kmv__lsh_codes(const kmv__lsh *h, const float *v, size_t count, int ntab, float *scratch,
                    uint64_t *codes);

/* One query's codes in every table (scratch: k L floats), for lookups
 * only: the projections may differ from kmv__lsh_codes()' in the last bit,
 * so what is inserted must be hashed by that. Thread-safe (reads only). */
void kmv__lsh_query_codes(const kmv__lsh *h, const float *v, float *scratch, uint64_t *codes);

/* Where table t's lookup of code starts: prefetching it before a batch
 * of lookups overlaps their cache misses. */
static inline void kmv__lsh_prefetch(const kmv__lsh *h, int t, uint64_t code) {
    const kmv__lsh_table *tb = &h->tab[t];
    if (tb->slots) __builtin_prefetch(&tb->slot[(size_t)(code ^ (code >> 29)) & (tb->slots - 1)]);
}

/* Table t's bucket named code: *len ids (ascending, the order they were
 * inserted in), or *len = 0. The pointer is valid until the next append. */
const uint32_t *kmv__lsh_bucket(const kmv__lsh *h, int t, uint64_t code, size_t *len);

void kmv__lsh_free(kmv__lsh *h, const kmv_allocator *a);

#endif /* KMV_LSH_H */
