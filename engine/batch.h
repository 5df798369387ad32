/* Internal: ApproxKMV (Algorithm 3) for a block of queries over an index:
 * the steps of algo/ in order, and the exact engine wherever the cost
 * model finds it cheaper. The guarantee and its argument:
 * docs/guarantee-gaussian.md. */
#ifndef KMV_ENGINE_BATCH_H
#define KMV_ENGINE_BATCH_H

#include <stddef.h>

#include "common/params.h"
#include "engine/index.h"

/* y (m x c) = K x over the index's keys (x: n x c in id order), operands
 * checked by the caller. KMV_OK, KMV_ENOMEM (y untouched: everything that
 * can fail is taken before the first write to y). */
int kmv__batch_matvec(kmv_index *ix, const float *q, size_t m, const float *x, size_t c,
                      float *y, kmv__stats *st);

/* The exact engine in the product's place, reported as a fallback for
 * reason (plans that did not fit params.max_bytes). */
int kmv__batch_fallback(kmv_index *ix, const float *q, size_t m, const float *x, size_t c,
                        float *y, kmv_fallback reason, kmv__stats *st);

#endif /* KMV_ENGINE_BATCH_H */
