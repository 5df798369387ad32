#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "common/alloc.h"

#include <stdalign.h>
#include <stdatomic.h>
#include <stddef.h>
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

/* The header before each metered block: its size, padded to malloc's
 * alignment so the block after it keeps that alignment. */
#define METER_HDR (alignof(max_align_t) > sizeof(size_t) ? alignof(max_align_t) : sizeof(size_t))

static _Thread_local unsigned long refused_here;

static void *meter_alloc(void *opaque, size_t size) {
    kmv__meter *m = opaque;
    if (size > SIZE_MAX - METER_HDR) return NULL;
    size_t total = size + METER_HDR;
    size_t cur = atomic_load_explicit(&m->live, memory_order_relaxed);
    do {
        if (m->cap != 0 && (total > m->cap || cur > m->cap - total)) {
            atomic_fetch_add(&m->refused, 1);
            refused_here++;
            return NULL;
        }
    } while (!atomic_compare_exchange_weak(&m->live, &cur, cur + total));
    unsigned char *p = m->base.alloc(m->base.opaque, total);
    if (p == NULL) {
        atomic_fetch_sub(&m->live, total);
        return NULL;
    }
    size_t now = cur + total, peak = atomic_load_explicit(&m->peak, memory_order_relaxed);
    while (now > peak && !atomic_compare_exchange_weak(&m->peak, &peak, now)) {
    }
    *(size_t *)(void *)p = total;
    return p + METER_HDR;
}

static void meter_free(void *opaque, void *ptr) {
    kmv__meter *m = opaque;
    if (ptr == NULL) return;
    unsigned char *p = (unsigned char *)ptr - METER_HDR;
    atomic_fetch_sub(&m->live, *(size_t *)(void *)p);
    m->base.free(m->base.opaque, p);
}

void kmv__meter_init(kmv__meter *m, const kmv_allocator *base, size_t cap) {
    m->base = *base;
    m->cap = cap;
    atomic_init(&m->live, 0);
    atomic_init(&m->peak, 0);
    atomic_init(&m->refused, 0);
}

kmv_allocator kmv__meter_allocator(kmv__meter *m) {
    return (kmv_allocator){meter_alloc, meter_free, m};
}

int kmv__meter_code(kmv__meter *m, int rc) {
    return rc == KMV_ENOMEM && atomic_load(&m->refused) != 0 ? KMV_ELIMIT : rc;
}

void kmv__meter_reset(kmv__meter *m) { atomic_store(&m->refused, 0); }

unsigned long kmv__meter_refusals(kmv__meter *m) { return atomic_load(&m->refused); }

unsigned long kmv__meter_refusals_here(void) { return refused_here; }
