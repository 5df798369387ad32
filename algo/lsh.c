/* Euclidean LSH tables; see lsh.h. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "algo/lsh.h"

#include <cblas.h>
#include <math.h>
#include <string.h>
#include <xxhash.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/alloc.h"
#include "algo/kernel.h"
#include "common/rng.h"

double kmv__lsh_collision(double u) {
    if (u <= 0.0) return 1.0;
    /* A distance past float's range (its square overflowed) never
     * collides; the formula would give NaN, which makes every cost NaN. */
    if (!(u < INFINITY)) return 0.0;
    /* p(u) = 1 - 2 Phi(-1/u) - 2u/sqrt(2 pi) (1 - exp(-1/(2u^2))). */
    double t = 1.0 / u;
    double phi = 0.5 * erfc(t / sqrt(2.0));
    double p = 1.0 - 2.0 * phi - 2.0 * u / sqrt(2.0 * 3.141592653589793) * (1.0 - exp(-0.5 * t * t));
    return p < 0.0 ? 0.0 : p;
}

int kmv__lsh_init(kmv__lsh *h, const kmv_allocator *a, size_t d, kmv__lsh_shape shape,
                  uint64_t seed) {
    memset(h, 0, sizeof *h);
    h->d = d;
    h->shape = shape;
    size_t kl = (size_t)shape.k * (size_t)shape.L;
    h->proj = kmv__malloc_array(a, d, kl * sizeof(float));
    h->offs = kmv__malloc_array(a, kl, sizeof(float));
    h->tab = kmv__malloc_array(a, (size_t)shape.L, sizeof(kmv__lsh_table));
    if (h->tab != NULL) memset(h->tab, 0, (size_t)shape.L * sizeof(kmv__lsh_table));
    if (h->proj == NULL || h->offs == NULL || h->tab == NULL) {
        kmv__lsh_free(h, a);
        return KMV_ENOMEM;
    }
    uint64_t rng = kmv__rng_stream(seed, KMV__RNG_LSH);
    for (size_t i = 0; i < d * kl; i++) h->proj[i] = (float)(kmv__rng_normal(&rng) / shape.w);
    for (size_t u = 0; u < kl; u++) h->offs[u] = (float)kmv__rng_unit(&rng);
    return KMV_OK;
}

void kmv__lsh_free(kmv__lsh *h, const kmv_allocator *a) {
    if (h->tab != NULL) {
        for (int t = 0; t < h->shape.L; t++) {
            kmv__free(a, h->tab[t].slot);
            kmv__free(a, h->tab[t].arena);
        }
    }
    kmv__free(a, h->tab);
    kmv__free(a, h->proj);
    kmv__free(a, h->offs);
    memset(h, 0, sizeof *h);
}

/* Codes from projections p (count rows of k ntab). */
static void hash_cells(const kmv__lsh *h, const float *p, size_t count, int ntab, uint64_t *codes) {
    int k = h->shape.k, L = ntab;
    int32_t cell[64];
    for (size_t i = 0; i < count; i++, p += (size_t)k * (size_t)L) {
        for (int t = 0; t < L; t++) {
            kmv__lsh_cells(p + t * k, h->offs + t * k, (size_t)k, cell);
            uint64_t c = XXH3_64bits_withSeed(cell, (size_t)k * sizeof(int32_t), (uint64_t)t + 1);
            codes[i * (size_t)L + (size_t)t] = c ? c : 1; /* 0 marks empty slots */
        }
    }
}

void kmv__lsh_codes(const kmv__lsh *h, const float *v, size_t count, int ntab, float *scratch,
                    uint64_t *codes) {
    int kl = h->shape.k * ntab;
    /* The first ntab tables' projections are the first k ntab columns. */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)count, kl, (int)h->d, 1.0f, v,
                (int)h->d, h->proj, h->shape.k * h->shape.L, 0.0f, scratch, kl);
    hash_cells(h, scratch, count, ntab, codes);
}

void kmv__lsh_query_codes(const kmv__lsh *h, const float *v, float *scratch, uint64_t *codes) {
    size_t kl = (size_t)h->shape.k * (size_t)h->shape.L;
    kmv__project(v, h->proj, h->d, kl, kl, scratch);
    hash_cells(h, scratch, 1, h->shape.L, codes);
}

static size_t slot_of(const kmv__lsh_slot *slot, size_t slots, uint64_t code) {
    size_t mask = slots - 1;
    size_t s = (size_t)(code ^ (code >> 29)) & mask;
    while (slot[s].code != 0 && slot[s].code != code) s = (s + 1) & mask;
    return s;
}

const uint32_t *kmv__lsh_bucket(const kmv__lsh *h, int t, uint64_t code, size_t *len) {
    const kmv__lsh_table *tb = &h->tab[t];
    *len = 0;
    if (tb->slots == 0) return NULL;
    const kmv__lsh_slot *sl = &tb->slot[slot_of(tb->slot, tb->slots, code)];
    if (sl->code != code) return NULL;
    *len = sl->len;
    return tb->arena + sl->off;
}

static int slots_grow(kmv__lsh_table *tb, const kmv_allocator *a, size_t need) {
    size_t slots = tb->slots ? tb->slots : 256;
    while (4 * need > 3 * slots) slots *= 2;
    if (slots == tb->slots) return KMV_OK;
    kmv__lsh_slot *slot = kmv__malloc_array(a, slots, sizeof *slot);
    if (slot == NULL) return KMV_ENOMEM;
    memset(slot, 0, slots * sizeof *slot);
    for (size_t s = 0; s < tb->slots; s++) {
        if (tb->slot[s].code == 0) continue;
        slot[slot_of(slot, slots, tb->slot[s].code)] = tb->slot[s];
    }
    kmv__free(a, tb->slot);
    tb->slot = slot;
    tb->slots = slots;
    return KMV_OK;
}

/* Room for `more` more ids in the arena; doubles, so amortized O(1). */
static int arena_reserve(kmv__lsh_table *tb, const kmv_allocator *a, size_t more) {
    size_t need = tb->arena_used + more;
    if (need <= tb->arena_cap) return KMV_OK;
    if (need > UINT32_MAX) return KMV_ENOMEM; /* offsets are 32-bit */
    size_t cap = tb->arena_cap ? tb->arena_cap : 1024;
    while (cap < need) cap *= 2;
    uint32_t *ar = kmv__malloc_array(a, cap, sizeof(uint32_t));
    if (ar == NULL) return KMV_ENOMEM;
    if (tb->arena_used) memcpy(ar, tb->arena, tb->arena_used * sizeof(uint32_t));
    kmv__free(a, tb->arena);
    tb->arena = ar;
    tb->arena_cap = cap;
    return KMV_OK;
}

/* Undo a failed append: ids are appended in increasing order, so each
 * bucket's ids from first on are at its end. Emptied buckets stay as empty
 * slots, which lookups treat as misses. */
static void trim(kmv__lsh *h, size_t first) {
    for (int t = 0; t < h->shape.L; t++) {
        kmv__lsh_table *tb = &h->tab[t];
        for (size_t s = 0; s < tb->slots; s++) {
            kmv__lsh_slot *sl = &tb->slot[s];
            while (sl->code != 0 && sl->len > 0 && tb->arena[sl->off + sl->len - 1] >= first)
                sl->len--;
        }
    }
}

/* A bucket's capacity is implicit: the power of two at or above its
 * length (0 for an empty one), so a bucket is full when its length is 0 or
 * a power of two. After trim() shortens a bucket that under-reads its true
 * room, which only moves it a little early. */
static int bucket_full(uint32_t len) { return (len & (len - 1)) == 0; }

static int insert(kmv__lsh_table *tb, const kmv_allocator *a, uint64_t c, uint32_t id) {
    /* Slots grow with the buckets, not with the keys: clustered keys share
     * buckets, and sizing for one bucket per key cost more than the ids. */
    if (4 * (tb->used + 1) > 3 * tb->slots && slots_grow(tb, a, tb->used + 1) != KMV_OK)
        return KMV_ENOMEM;
    kmv__lsh_slot *sl = &tb->slot[slot_of(tb->slot, tb->slots, c)];
    if (sl->code == 0) {
        if (arena_reserve(tb, a, 1) != KMV_OK) return KMV_ENOMEM;
        *sl = (kmv__lsh_slot){c, (uint32_t)tb->arena_used, 0};
        tb->arena_used += 1;
        tb->used++;
    } else if (bucket_full(sl->len)) {
        /* The bucket moves to the arena's end at twice the size. */
        size_t cap = sl->len ? 2 * (size_t)sl->len : 1;
        if (arena_reserve(tb, a, cap) != KMV_OK) return KMV_ENOMEM;
        size_t off = tb->arena_used;
        memcpy(tb->arena + off, tb->arena + sl->off, sl->len * sizeof(uint32_t));
        sl->off = (uint32_t)off;
        tb->arena_used += cap;
    }
    tb->arena[sl->off + sl->len++] = id;
    return KMV_OK;
}

/* Blocks bound the scratch: 1024 keys' projections at a time, hashed in
 * slices of 64 by whichever thread is free. */
#define LSH_BLOCK 1024
#define SLICE 64
/* How far ahead an insert prefetches its slot. */
#define AHEAD 8

/* Table t takes block ids first .. first + bi - 1. */
static int insert_block(kmv__lsh_table *tb, const kmv_allocator *a, const uint64_t *codes,
                        int L, int t, size_t bi, uint32_t first) {
    for (size_t i = 0; i < bi; i++) {
        /* Two stages ahead: the slot of key i + 2 AHEAD, then through the
         * (by now cached) slot of key i + AHEAD, the place its id goes. */
        if (i + 2 * AHEAD < bi && tb->slots) {
            uint64_t c = codes[(i + 2 * AHEAD) * (size_t)L + (size_t)t];
            __builtin_prefetch(&tb->slot[(size_t)(c ^ (c >> 29)) & (tb->slots - 1)]);
        }
        if (i + AHEAD < bi && tb->slots) {
            uint64_t c = codes[(i + AHEAD) * (size_t)L + (size_t)t];
            const kmv__lsh_slot *sl = &tb->slot[slot_of(tb->slot, tb->slots, c)];
            if (sl->code == c) __builtin_prefetch(tb->arena + sl->off + sl->len, 1);
        }
        int rc = insert(tb, a, codes[i * (size_t)L + (size_t)t], first + (uint32_t)i);
        if (rc != KMV_OK) return rc;
    }
    return KMV_OK;
}

int kmv__lsh_append(kmv__lsh *h, const kmv_allocator *a, const float *k, size_t count, int nt) {
    if (count == 0) return KMV_OK;
    int L = h->shape.L;
    size_t kl = (size_t)h->shape.k * (size_t)L;
    size_t blk = count < LSH_BLOCK ? count : LSH_BLOCK;
    if (nt < 1) nt = 1;
    float *scratch = kmv__malloc_array(a, blk, kl * sizeof(float));
    uint64_t *codes = kmv__malloc_array(a, blk, (size_t)L * sizeof(uint64_t));
    int failed = !scratch || !codes;
    /* A failure midway is undone by trim(). */
#pragma omp parallel num_threads(nt) if (nt > 1 && !failed)
    {
#ifdef _OPENMP
        omp_set_num_threads(1); /* BLAS inside the slices: one thread each */
#endif
        for (size_t i0 = 0; i0 < count; i0 += LSH_BLOCK) {
            int stop;
            /* Read after the barrier that ends the last block: every thread
             * sees the same value, so all leave the loop together. */
#pragma omp atomic read
            stop = failed;
            if (stop) break;
            size_t bi = count - i0 < LSH_BLOCK ? count - i0 : LSH_BLOCK;
            size_t nsl = (bi + SLICE - 1) / SLICE;
#pragma omp for schedule(static)
            for (size_t u = 0; u < nsl; u++) {
                size_t j0 = u * SLICE, len = bi - j0 < SLICE ? bi - j0 : SLICE;
                kmv__lsh_codes(h, k + (i0 + j0) * h->d, len, L, scratch + j0 * kl,
                               codes + j0 * (size_t)L);
            }
            uint32_t first = (uint32_t)(h->n + i0);
#pragma omp for schedule(static)
            for (int t = 0; t < L; t++) {
                if (insert_block(&h->tab[t], a, codes, L, t, bi, first) != KMV_OK) {
#pragma omp atomic write
                    failed = 1;
                }
            }
        }
    }
    if (!failed) h->n += count;
    else trim(h, h->n);
    kmv__free(a, scratch);
    kmv__free(a, codes);
    return failed ? KMV_ENOMEM : KMV_OK;
}
