/* The randomly ordered key store; see keystore.h for why it is ordered. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "algo/keystore.h"

#include <string.h>

#include "common/alloc.h"
#include "common/rng.h"

void kmv__keystore_init(kmv__keystore *ks, size_t d, uint64_t seed) {
    memset(ks, 0, sizeof *ks);
    ks->d = d;
    ks->rng = kmv__rng_stream(seed, KMV__RNG_SHUFFLE);
}

void kmv__keystore_free(kmv__keystore *ks, const kmv_allocator *a) {
    kmv__free(a, ks->rows);
    kmv__free(a, ks->id_at);
    kmv__free(a, ks->pos_of);
    ks->rows = NULL;
    ks->id_at = ks->pos_of = NULL;
    ks->n = ks->cap = 0;
}

static int grow(kmv__keystore *ks, const kmv_allocator *a, size_t need) {
    size_t cap = ks->cap ? ks->cap : 64;
    while (cap < need) cap = cap > KMV__KEYS_MAX / 2 ? KMV__KEYS_MAX : cap * 2;
    float *rows = kmv__malloc_array(a, cap, ks->d * sizeof(float));
    uint32_t *id_at = kmv__malloc_array(a, cap, sizeof(uint32_t));
    uint32_t *pos_of = kmv__malloc_array(a, cap, sizeof(uint32_t));
    if (rows == NULL || id_at == NULL || pos_of == NULL) {
        kmv__free(a, rows);
        kmv__free(a, id_at);
        kmv__free(a, pos_of);
        return KMV_ENOMEM;
    }
    if (ks->n > 0) {
        memcpy(rows, ks->rows, ks->n * ks->d * sizeof(float));
        memcpy(id_at, ks->id_at, ks->n * sizeof(uint32_t));
        memcpy(pos_of, ks->pos_of, ks->n * sizeof(uint32_t));
    }
    kmv__free(a, ks->rows);
    kmv__free(a, ks->id_at);
    kmv__free(a, ks->pos_of);
    ks->rows = rows;
    ks->id_at = id_at;
    ks->pos_of = pos_of;
    ks->cap = cap;
    return KMV_OK;
}

int kmv__keystore_reserve(kmv__keystore *ks, const kmv_allocator *a, size_t count) {
    if (count > KMV__KEYS_MAX - ks->n) return KMV_EOVERFLOW;
    return ks->n + count > ks->cap ? grow(ks, a, ks->n + count) : KMV_OK;
}

int kmv__keystore_append(kmv__keystore *ks, const kmv_allocator *a, const float *k,
                         size_t count) {
    if (count == 0) return KMV_OK;
    int rc = kmv__keystore_reserve(ks, a, count);
    if (rc != KMV_OK) return rc;
    size_t d = ks->d;
    for (size_t t = 0; t < count; t++) {
        size_t j = ks->n;
        size_t r = (size_t)kmv__rng_below(&ks->rng, (uint64_t)j + 1);
        if (r != j) {
            memcpy(ks->rows + j * d, ks->rows + r * d, d * sizeof(float));
            ks->id_at[j] = ks->id_at[r];
            ks->pos_of[ks->id_at[j]] = (uint32_t)j;
        }
        memcpy(ks->rows + r * d, k + t * d, d * sizeof(float));
        ks->id_at[r] = (uint32_t)j;
        ks->pos_of[j] = (uint32_t)r;
        ks->n = j + 1;
    }
    return KMV_OK;
}

void kmv__keystore_restore(kmv__keystore *ks, const float *rows, const uint32_t *id_at,
                           uint64_t rng) {
    size_t n = ks->n;
    if (n > 0) { /* an empty store has no arrays to copy into */
        memcpy(ks->rows, rows, n * ks->d * sizeof(float));
        memcpy(ks->id_at, id_at, n * sizeof(uint32_t));
    }
    for (size_t pos = 0; pos < n; pos++) ks->pos_of[id_at[pos]] = (uint32_t)pos;
    ks->rng = rng;
}
