/* The run statistics of `kmv matvec` and `kmv attention` as JSON; the
 * schema is docs/stats.md. */
#ifndef KMV_CLI_STATS_H
#define KMV_CLI_STATS_H

#include "cli/text.h"
#define KMV_STATIC_LINKING_ONLY /* the engine's counters */
#include "kmv/kmv.h"
#include "kmv/kmv_experimental.h"

/* Append the JSON object for one call: p its params, attn whether it was
 * attention, t_load the seconds spent loading its inputs. */
void stats_json(text *t, const char *cmd, const kmv_params *p, int attn, const kmv_stats *st,
                double t_load);

/* "exact", "approx" or "fallback". */
const char *stats_mode_name(int mode);

#endif /* KMV_CLI_STATS_H */
