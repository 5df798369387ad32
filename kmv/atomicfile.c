/* Whole-or-nothing files; see atomicfile.h. */
#include "kmv/atomicfile.h"

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

#include "kmv/alloc.h"

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


static int write_full(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(fd, p, n < IO_MAX ? n : IO_MAX);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (w == 0) {
            errno = EIO;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}


/* umask(2) can only be read by changing it, which races with other threads
 * creating files; Linux >= 4.7 reports it in /proc/self/status instead. */
static mode_t process_umask(void) {
    char buf[4096];
    size_t got = 0;
    const char *u;
    mode_t m;
    int fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC);

    if (fd >= 0) {
        int ok = kmv__read_full(fd, buf, sizeof buf - 1, &got) == 0;
        close(fd);
        buf[ok ? got : 0] = '\0';
        u = strstr(buf, "\nUmask:");
        if (u != NULL) {
            u += 7;
            while (*u == ' ' || *u == '\t') u++;
            if (*u >= '0' && *u <= '7') {
                m = 0;
                while (*u >= '0' && *u <= '7') m = (mode_t)(m * 8 + (mode_t)(*u++ - '0'));
                return m & 0777;
            }
        }
    }
    m = umask(022);
    umask(m);
    return m;
}

/* Make the rename itself durable: until the directory is synced, a crash
 * could bring back the old entry. Best effort: the file is complete either
 * way, and some file systems refuse fsync on directories. name holds the
 * path in its first len bytes and may be overwritten. */
static void sync_parent(char *name, size_t len) {
    size_t cut = len;
    while (cut > 0 && name[cut - 1] != '/') cut--;
    if (cut == 0) {
        name[0] = '.';
        cut = 1;
    }
    name[cut] = '\0';
    int dfd = open(name, O_RDONLY | O_DIRECTORY);
    if (dfd >= 0) {
        (void)fsync(dfd);
        close(dfd);
    }
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

int kmv__write_atomic(const char *path, const kmv__part *parts, size_t nparts,
                      const char **step_out, int *errnum) {
    static const char suffix[] = ".tmp.XXXXXX";
    /* No allocator here, so the name lives on the stack; a longer path
     * would exceed Linux's PATH_MAX anyway. */
    char tmp[4096 + sizeof suffix];
    const char *step = NULL;
    int saved = 0;
    size_t len = strlen(path);
    if (len > sizeof tmp - sizeof suffix) {
        *step_out = "cannot create temporary file";
        *errnum = ENAMETOOLONG;
        return -1;
    }
    memcpy(tmp, path, len);
    memcpy(tmp + len, suffix, sizeof suffix);
    int fd = mkstemp(tmp);
    if (fd < 0) {
        *step_out = "cannot create temporary file";
        *errnum = errno;
        return -1;
    }
    /* mkostemp would close the fork window too, but it is not POSIX. */
    (void)fcntl(fd, F_SETFD, FD_CLOEXEC);

    /* mkstemp makes the file 0600; give it the mode open(2) would have. */
    if (fchmod(fd, (mode_t)(0644 & ~process_umask())) != 0) step = "cannot set permissions";
    for (size_t u = 0; step == NULL && u < nparts; u++)
        if (write_full(fd, parts[u].data, parts[u].len) != 0) step = "write failed";
    /* Data must be on disk before the rename, or a crash could leave path
     * naming a file whose blocks never arrived. */
    if (step == NULL && fsync(fd) != 0) step = "fsync failed";
    if (step != NULL) saved = errno;
    /* Delayed write errors (NFS, quotas) can surface only at close. */
    if (close(fd) != 0 && step == NULL) {
        step = "close failed";
        saved = errno;
    }
    if (step == NULL && rename(tmp, path) != 0) {
        step = "cannot rename the temporary file into place";
        saved = errno;
    }
    if (step != NULL) {
        unlink(tmp);
        *step_out = step;
        *errnum = saved;
        return -1;
    }
    sync_parent(tmp, len);
    return 0;
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
