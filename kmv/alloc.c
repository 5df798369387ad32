#include "kmv/alloc.h"

#include <stdint.h>
#include <stdlib.h>

static void *default_alloc(void *opaque, size_t size) {
    (void)opaque;
    return malloc(size);
}

static void default_free(void *opaque, void *ptr) {
    (void)opaque;
    free(ptr);
}

int kmv__allocator_resolve(const kmv_allocator *a, kmv_allocator *out) {
    if (a == NULL || (a->alloc == NULL && a->free == NULL)) {
        out->alloc = default_alloc;
        out->free = default_free;
        out->opaque = NULL;
        return KMV_OK;
    }
    /* Memory from one allocator must never reach the other's free. */
    if (a->alloc == NULL || a->free == NULL) return KMV_EINVAL;
    *out = *a;
    return KMV_OK;
}

void *kmv__malloc(const kmv_allocator *a, size_t size) {
    if (size == 0) return NULL;
    return a->alloc(a->opaque, size);
}

void *kmv__malloc_array(const kmv_allocator *a, size_t count, size_t size) {
    size_t bytes;
    if (!kmv__mul_size(count, size, &bytes)) return NULL;
    return kmv__malloc(a, bytes);
}

void kmv__free(const kmv_allocator *a, void *ptr) {
    if (ptr != NULL) a->free(a->opaque, ptr);
}

int kmv__mul_size(size_t a, size_t b, size_t *out) {
    if (b != 0 && a > SIZE_MAX / b) return 0;
    *out = a * b;
    return 1;
}
