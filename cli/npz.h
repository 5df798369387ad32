/* NumPy .npz archives (a ZIP of .npy files, stored uncompressed), built in
 * memory for the tool to write whole. */
#ifndef KMV_CLI_NPZ_H
#define KMV_CLI_NPZ_H

#include <stddef.h>

typedef struct npz_entry {
    const char *name;    /* without ".npy" */
    const float *data;   /* C order */
    size_t shape[4];
    int ndim;            /* 1 to 4 */
} npz_entry;

/* A .npy (version 1.0) header for a C-order array of dtype descr ("<f4",
 * "<f8") and the given shape, into h; its length (a multiple of 64), or 0
 * when cap is too small. */
size_t npy_header(const char *descr, const size_t *shape, int ndim, char *h, size_t cap);

/* The archive of n entries in *out (malloc'ed) and *len. Returns 0, -1
 * when out of memory, or -2 past the format's limits (4 GB, 65535
 * entries, names of 255 bytes). */
int npz_build(const npz_entry *e, size_t n, unsigned char **out, size_t *len);

#endif /* KMV_CLI_NPZ_H */
