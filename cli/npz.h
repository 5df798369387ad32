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

/* The archive of n entries in *out (malloc'ed) and *len. Returns 0, -1
 * when out of memory, or -2 past the format's limits (4 GB, 65535
 * entries, names of 255 bytes). */
int npz_build(const npz_entry *e, size_t n, unsigned char **out, size_t *len);

#endif /* KMV_CLI_NPZ_H */
