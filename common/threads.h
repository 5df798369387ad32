/* Internal: the OpenMP helpers every parallel loop of kmv uses, defined
 * once, and harmless in a build without OpenMP. */
#ifndef KMV_COMMON_THREADS_H
#define KMV_COMMON_THREADS_H

#ifdef _OPENMP
#include <omp.h>
#endif

/* The calling thread's number in its team (0 outside one). */
static inline int kmv__thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* Inside one of kmv's parallel regions: BLAS calls from this thread run on
 * this thread alone. OpenBLAS's OpenMP build sizes its team from this
 * setting, which inside a region is the region's own, so the caller's is
 * untouched; results then do not depend on the thread count, and no BLAS
 * team starts on a thread the caller owns (see exact.c). */
static inline void kmv__blas_single(void) {
#ifdef _OPENMP
    omp_set_num_threads(1);
#endif
}

#endif /* KMV_COMMON_THREADS_H */
