/* Internal: the context's layout, shared by the files that run operations. */
#ifndef KMV_CONTEXT_H
#define KMV_CONTEXT_H

#include "kmv/kmv.h"

struct kmv_ctx {
    kmv_params params;
    kmv_allocator alloc; /* params.allocator with defaults resolved */
};

/* Threads a call runs on: params.n_threads, or OpenMP's default for 0. */
int kmv__threads(const kmv_params *p);

#endif /* KMV_CONTEXT_H */
