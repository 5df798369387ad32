/* Internal: files that appear whole or not at all, and reading a file whole.
 *
 * A writer fills a temporary file beside the target (rename(2) is atomic
 * only within one file system), syncs it, renames it over the target and
 * syncs the directory, so a crash at any point leaves the old file or the
 * complete new one. Shared by the .npy writer and stream snapshots. */
#ifndef KMV_ATOMICFILE_H
#define KMV_ATOMICFILE_H

#include <stddef.h>

#include "kmv/kmv.h"

typedef struct kmv__part {
    const void *data;
    size_t len;
} kmv__part;

/* Write the concatenation of parts[0..nparts) to path as above, with the
 * mode open(2) would give (0644 less the umask). Returns 0, or -1 with
 * *step naming what failed and *errnum its errno (nothing is left behind:
 * the temporary file is removed). */
int kmv__write_atomic(const char *path, const kmv__part *parts, size_t nparts,
                      const char **step, int *errnum);

#if defined(__GNUC__)
#define KMV__PRINTF(fmt, args) __attribute__((format(printf, fmt, args)))
#else
#define KMV__PRINTF(fmt, args)
#endif

/* Format "path: message" into err (err_len bytes, NUL-terminated,
 * truncated; nothing when err is NULL or err_len is 0) and return code.
 * Formats in place, never allocates, so it works after an allocation
 * failed. */
int kmv__file_error(char *err, size_t err_len, const char *path, int code, const char *fmt, ...)
    KMV__PRINTF(5, 6);

/* Read up to n bytes, retrying short reads and EINTR; *got says how many
 * arrived (fewer only at end of file). Returns 0, or -1 with errno set. */
int kmv__read_full(int fd, void *buf, size_t n, size_t *got);

/* Read the whole regular file at path, up to max bytes, into a buffer from
 * a (free it with kmv__free). Returns 0; -1 with errno set (open or read
 * failed); -2 when the file is larger than max; -3 when a is out of memory. */
int kmv__read_whole(const char *path, const kmv_allocator *a, size_t max, unsigned char **buf,
                    size_t *len);

#endif /* KMV_ATOMICFILE_H */
