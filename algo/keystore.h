/* Internal: the keys, kept in a uniformly random order that grows in place.
 *
 * The light-key sampler reads contiguous windows of this order (a dense
 * distance loop instead of a gather), which is a uniform sample without
 * replacement only because the order is a uniformly random permutation.
 * Appending key number n swaps it into a random position in [0, n]
 * (Durstenfeld's "inside-out" shuffle), which keeps the permutation uniform
 * at O(dim) cost per key however many keys are stored, and gives the same
 * order whether the keys arrive in one block or many. */
#ifndef KMV_KEYSTORE_H
#define KMV_KEYSTORE_H

#include <stddef.h>
#include <stdint.h>

#include "kmv/kmv.h"

typedef struct kmv__keystore {
    size_t d;         /* dimension */
    size_t n;         /* keys stored; ids 0..n-1 in arrival order */
    size_t cap;       /* rows allocated */
    float *rows;      /* cap x d: row p holds key id_at[p] */
    uint32_t *id_at;  /* position -> key id */
    uint32_t *pos_of; /* key id -> position */
    uint64_t rng;     /* shuffle stream */
} kmv__keystore;

/* The most keys one store holds: ids are 32-bit. */
#define KMV__KEYS_MAX ((size_t)UINT32_MAX - 1)

/* An empty store for dim-d keys. Allocates nothing until the first append. */
void kmv__keystore_init(kmv__keystore *ks, size_t d, uint64_t seed);

/* Room for count more keys without allocating. KMV_OK, KMV_EOVERFLOW or
 * KMV_ENOMEM (the store is then unchanged). */
int kmv__keystore_reserve(kmv__keystore *ks, const kmv_allocator *a, size_t count);

/* Append count keys (count x d, row-major; finite, checked by the caller).
 * Amortized O(count d): storage doubles when full. Returns KMV_OK,
 * KMV_EOVERFLOW (more than KMV__KEYS_MAX keys) or KMV_ENOMEM, in which case
 * the store is unchanged; after a successful kmv__keystore_reserve() of at
 * least count, KMV_OK. */
int kmv__keystore_append(kmv__keystore *ks, const kmv_allocator *a, const float *k,
                         size_t count);

/* Put the n keys held in a saved order (rows[pos] is key id_at[pos]'s
 * row) and continue the shuffle from rng: what the appends that made that
 * order left. */
void kmv__keystore_restore(kmv__keystore *ks, const float *rows, const uint32_t *id_at,
                           uint64_t rng);

void kmv__keystore_free(kmv__keystore *ks, const kmv_allocator *a);

/* Key id's row. */
static inline const float *kmv__keystore_row(const kmv__keystore *ks, size_t id) {
    return ks->rows + (size_t)ks->pos_of[id] * ks->d;
}

#endif /* KMV_KEYSTORE_H */
