/* Internal: the statistics every product starts from (the public ones are
 * kmv_stats and kmv_stats_x; common/params.h holds them flat). */
#ifndef KMV_ALGO_STATS_H
#define KMV_ALGO_STATS_H

#include <stddef.h>

#include "algo/lsh.h"
#include "common/params.h"

/* What a call over n keys, m queries of dimension d and c columns reports
 * before it has done anything: the approximate mode, the bound it
 * promises, nothing measured. */
void kmv__stats_start(kmv__stats *S, size_t n, size_t m, size_t d, size_t c, int threads,
                      double bound);

/* The heavy search's tables: their threshold and shape. */
void kmv__stats_tables(kmv__stats *S, double kappa, kmv__lsh_shape shape);

/* The monitor's figures (params.verify_every) from the errors of the nv
 * rows it computed exactly (nv >= 1; err is sorted in place). */
void kmv__stats_verified(kmv__stats *S, double *err, size_t nv);

/* The exact engine answered in the approximate engine's place, for
 * reason (a kmv_fallback), after evals kernel entries. */
void kmv__stats_fallback(kmv__stats *S, kmv_fallback reason, uint64_t evals);

#endif /* KMV_ALGO_STATS_H */
