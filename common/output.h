/* Internal: the writer behind kmv_output_open() (kmv.h), for the library's
 * own outputs (.npy files, stream snapshots). */
#ifndef KMV_OUTPUT_H
#define KMV_OUTPUT_H

#include <stddef.h>

#include "kmv/kmv.h"

typedef struct kmv__part {
    const void *data;
    size_t len;
} kmv__part;

/* Write the concatenation of parts[0..nparts) to path by kmv_output_open()'s
 * rules: whole or not at all. Returns KMV_OK or the code of the first
 * failure, with err as for kmv_npy_read(). */
int kmv__write_parts(const char *path, const kmv_allocator *alloc, const kmv__part *parts,
                     size_t nparts, char *err, size_t err_len);

#endif /* KMV_OUTPUT_H */
