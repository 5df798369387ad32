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

/* *out = a * b; returns 0 on overflow, 1 otherwise. */
int kmv__mul_size(size_t a, size_t b, size_t *out);

#endif /* KMV_ALLOC_H */
