/* Internal: reading files whole or in full, and "path: message" errors.
 * Writing is output.c's (kmv_output_open() in kmv.h). */
#ifndef KMV_FILEIO_H
#define KMV_FILEIO_H

#include <stddef.h>

#include "kmv/kmv.h"

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

#endif /* KMV_FILEIO_H */
