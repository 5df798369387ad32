/* Internal: the one place the library allocates. Every allocation goes
 * through the caller's kmv_allocator so hosts can account for, cap or fail
 * allocations; sizes are overflow-checked here so callers need not be. */
#ifndef KMV_ALLOC_H
#define KMV_ALLOC_H

#include <stddef.h>

#include "kmv/kmv.h"

/* Fill unset hook pointers with malloc/free. a may be NULL (the defaults).
 * A hook with only one of alloc/free set is invalid: returns KMV_EINVAL. */
int kmv__allocator_resolve(const kmv_allocator *a, kmv_allocator *out);

/* size bytes, or NULL on failure or size == 0 (callers treat 0 as nothing
 * to allocate and never call). */
void *kmv__malloc(const kmv_allocator *a, size_t size);

/* count * size bytes, or NULL when the product overflows or allocation
 * fails. */
void *kmv__malloc_array(const kmv_allocator *a, size_t count, size_t size);

/* Release memory from kmv__malloc*; NULL is a no-op. */
void kmv__free(const kmv_allocator *a, void *ptr);

/* A meter between the library and the caller's allocator: it counts the
 * bytes live through it and refuses an allocation that would take them past
 * a cap, which is how params.max_bytes is kept. Counting is atomic, so the
 * engine's worker threads may share one meter. Each block carries a
 * header with its size, as long as malloc's alignment (16 bytes on x86-64),
 * so blocks keep that alignment, though no more than it. */
typedef struct kmv__meter {
    kmv_allocator base;
    size_t cap;             /* 0: no cap */
    _Atomic size_t live;    /* bytes held now, headers included */
    _Atomic size_t peak;
    _Atomic unsigned long refused; /* allocations the cap refused */
} kmv__meter;

void kmv__meter_init(kmv__meter *m, const kmv_allocator *base, size_t cap);

/* An allocator drawing through m; m must outlive every block it hands out. */
kmv_allocator kmv__meter_allocator(kmv__meter *m);

/* rc, or KMV_ELIMIT when rc is KMV_ENOMEM and the cap refused an
 * allocation since the last kmv__meter_reset(). */
int kmv__meter_code(kmv__meter *m, int rc);

/* Forget earlier refusals (at the start of each API call). */
void kmv__meter_reset(kmv__meter *m);

/* Allocations refused so far: calls that may overlap on one meter (the
 * stream's decoding steps) compare this before and after, rather than
 * resetting what another call is still to read. */
unsigned long kmv__meter_refusals(kmv__meter *m);

/* Allocations any meter refused on the calling thread so far: a call
 * that allocates only on its own thread tells its refusals from those of
 * calls running beside it on the same meter. */
unsigned long kmv__meter_refusals_here(void);

/* *out = a * b; returns 0 on overflow, 1 otherwise. */
int kmv__mul_size(size_t a, size_t b, size_t *out);

#endif /* KMV_ALLOC_H */
