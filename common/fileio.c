/* Reading files, and messages that name them; see fileio.h. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "common/fileio.h"

#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "common/alloc.h"

/* Keeps each read(2)/write(2) below SSIZE_MAX and Linux's 2 GiB cap. */
#define IO_MAX ((size_t)1 << 30)

int kmv__read_full(int fd, void *buf, size_t n, size_t *got) {
    char *p = buf;
    size_t done = 0;
    while (done < n) {
        size_t want = n - done < IO_MAX ? n - done : IO_MAX;
        ssize_t r = read(fd, p + done, want);
        if (r < 0) {
            if (errno == EINTR) continue;
            *got = done;
            return -1;
        }
        if (r == 0) break;
        done += (size_t)r;
    }
    *got = done;
    return 0;
}


int kmv__file_error(char *err, size_t err_len, const char *path, int code, const char *fmt, ...) {
    if (err == NULL || err_len == 0) return code;
    int n = snprintf(err, err_len, "%s: ", path != NULL ? path : "(null)");
    if (n >= 0 && (size_t)n < err_len) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err + n, err_len - (size_t)n, fmt, ap);
        va_end(ap);
    }
    return code;
}

int kmv__read_whole(const char *path, const kmv_allocator *a, size_t max, unsigned char **buf,
                    size_t *len) {
    *buf = NULL;
    *len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        errno = EINVAL;
        return -1;
    }
    if ((uintmax_t)st.st_size > (uintmax_t)max) {
        close(fd);
        return -2;
    }
    size_t want = (size_t)st.st_size;
    /* One byte more than the size says, to notice a file that grew. */
    unsigned char *b = kmv__malloc(a, want + 1);
    if (b == NULL) {
        close(fd);
        return -3;
    }
    size_t got;
    if (kmv__read_full(fd, b, want + 1, &got) != 0) {
        int e = errno;
        kmv__free(a, b);
        close(fd);
        errno = e;
        return -1;
    }
    close(fd);
    *buf = b;
    *len = got;
    return 0;
}
