/* Output files written whole or not at all, by the rules kmv_output_open()
 * states in kmv.h. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "common/output.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "common/alloc.h"
#include "common/fileio.h"

/* Room for a resolved path and for its temporary's suffix. Linux's
 * PATH_MAX is 4096: a longer path cannot be opened anyway. */
#define PATH_CAP 4096
#define TMP_SUFFIX ".tmp.XXXXXX"
/* Symbolic links followed before giving up, as the kernel's own limit. */
#define MAX_HOPS 40
/* Keeps each write(2) below SSIZE_MAX and Linux's 2 GiB cap. */
#define IO_MAX ((size_t)1 << 30)

typedef enum { OUT_TEMP, OUT_DIRECT } out_kind;

struct kmv_output {
    kmv_allocator alloc;
    out_kind kind;
    int fd;
    int failed;             /* a write failed: commit refuses */
    int keep_owner;         /* an existing file: give its owner and mode back */
    struct stat old;        /* the existing file's, when keep_owner */
    char target[PATH_CAP];  /* what is written: path with its links followed */
    char tmp[PATH_CAP + sizeof TMP_SUFFIX];
};

/* A descriptor the path names without a file behind it that a rename could
 * replace: "-" and the /dev and /proc names of the process's descriptors.
 * Returns the descriptor, or -1. */
static int named_fd(const char *path) {
    static const char *const prefix[] = {"/dev/fd/", "/proc/self/fd/"};
    if (strcmp(path, "-") == 0 || strcmp(path, "/dev/stdout") == 0) return 1;
    if (strcmp(path, "/dev/stderr") == 0) return 2;
    for (size_t u = 0; u < sizeof prefix / sizeof prefix[0]; u++) {
        size_t len = strlen(prefix[u]);
        if (strncmp(path, prefix[u], len) != 0 || path[len] == '\0') continue;
        long fd = 0;
        const char *p = path + len;
        for (; *p >= '0' && *p <= '9' && fd <= INT_MAX / 10; p++) fd = fd * 10 + (*p - '0');
        if (*p == '\0' && fd <= INT_MAX) return (int)fd;
    }
    return -1;
}

/* dir (the part of path up to its last slash, "." without one) and the
 * name after it. */
static void split(const char *path, char *dir, size_t cap, const char **base) {
    const char *slash = strrchr(path, '/');
    if (slash == NULL) {
        snprintf(dir, cap, ".");
        *base = path;
    } else if (slash == path) {
        snprintf(dir, cap, "/");
        *base = slash + 1;
    } else {
        snprintf(dir, cap, "%.*s", (int)(slash - path), path);
        *base = slash + 1;
    }
}

/* A reason for errno that says what went wrong with an output path. */
static const char *why(int errnum) {
    switch (errnum) {
    case ENOENT:
        return "its directory does not exist";
    case ENOTDIR:
        return "a part of the path is not a directory";
    case ELOOP:
        return "too many symbolic links";
    default:
        return strerror(errnum);
    }
}

/* path with every symbolic link followed, into buf (cap bytes), and
 * whether that file exists (*st its lstat then). A name not yet taken
 * resolves inside its directory, which must exist. Returns 0, or -1 with
 * errno set. */
static int resolve(const char *path, char *buf, size_t cap, int *exists, struct stat *st) {
    char cur[PATH_CAP], link[PATH_CAP], dir[PATH_CAP];
    const char *base;
    if (strlen(path) >= sizeof cur) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(cur, path);
    for (int hop = 0; hop <= MAX_HOPS; hop++) {
        if (lstat(cur, st) == 0) {
            if (!S_ISLNK(st->st_mode)) {
                /* Every link on the way is followed too. */
                char *real = realpath(cur, NULL);
                if (real == NULL) return -1;
                int fits = strlen(real) < cap;
                if (fits) strcpy(buf, real);
                free(real);
                if (!fits) {
                    errno = ENAMETOOLONG;
                    return -1;
                }
                *exists = 1;
                return 0;
            }
            ssize_t len = readlink(cur, link, sizeof link - 1);
            if (len < 0) return -1;
            link[len] = '\0';
            if (link[0] == '/') {
                strcpy(cur, link);
            } else {
                split(cur, dir, sizeof dir, &base);
                if (snprintf(cur, sizeof cur, "%s/%s", dir, link) >= (int)sizeof cur) {
                    errno = ENAMETOOLONG;
                    return -1;
                }
            }
            continue;
        }
        if (errno != ENOENT) return -1;
        /* A name not yet taken (perhaps at the end of a dangling link): it
         * lands in its directory, which must exist. */
        split(cur, dir, sizeof dir, &base);
        if (*base == '\0') return -1; /* "dir/" of a missing dir: ENOENT */
        char *real = realpath(dir, NULL);
        if (real == NULL) return -1;
        int n = snprintf(buf, cap, "%s/%s", strcmp(real, "/") == 0 ? "" : real, base);
        free(real);
        if (n < 0 || (size_t)n >= cap) {
            errno = ENAMETOOLONG;
            return -1;
        }
        *exists = 0;
        return 0;
    }
    errno = ELOOP;
    return -1;
}

int kmv_output_target(const char *path, char *buf, size_t len, char *err, size_t err_len) {
    if (err != NULL && err_len > 0) err[0] = '\0';
    if (path == NULL || buf == NULL || len == 0)
        return kmv__file_error(err, err_len, path, KMV_EINVAL, "path or buffer is NULL");
    if (*path == '\0') return kmv__file_error(err, err_len, path, KMV_EINVAL, "empty path");
    int fd = named_fd(path);
    if (fd >= 0) {
        int n = snprintf(buf, len, "/dev/fd/%d", fd);
        return n >= 0 && (size_t)n < len ? KMV_OK
                                         : kmv__file_error(err, err_len, path, KMV_EINVAL,
                                                           "buffer too small");
    }
    int exists;
    struct stat st;
    if (resolve(path, buf, len, &exists, &st) != 0)
        return kmv__file_error(err, err_len, path, KMV_EIO, "%s", why(errno));
    return KMV_OK;
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

static int fail(kmv_output *o, char *err, size_t err_len, const char *path, int code,
                const char *what, int errnum) {
    if (o != NULL) kmv_output_discard(o);
    return kmv__file_error(err, err_len, path, code, "%s: %s", what, why(errnum));
}

/* Why an existing target of this kind is refused, or NULL. */
static const char *refused_kind(mode_t mode) {
    if (S_ISREG(mode) || S_ISCHR(mode) || S_ISFIFO(mode)) return NULL;
    return S_ISDIR(mode)    ? "is a directory"
           : S_ISBLK(mode)  ? "is a block device (refused: kmv writes files, character "
                              "devices and pipes)"
           : S_ISSOCK(mode) ? "is a socket (write to a pipe instead)"
                            : "is not a regular file";
}

/* The temporary beside o->target, made now (rename(2) is atomic only
 * within a file system, and a directory that is missing or not writable
 * fails here, before the caller computes anything), with the mode and
 * owner the file will have. Returns 0, or -1 with errno and *step. */
static int open_temp(kmv_output *o, const char **step) {
    o->kind = OUT_TEMP;
    snprintf(o->tmp, sizeof o->tmp, "%s" TMP_SUFFIX, o->target);
    o->fd = mkstemp(o->tmp);
    if (o->fd < 0) {
        o->tmp[0] = '\0';
        *step = "cannot create a temporary file";
        return -1;
    }
    /* mkostemp would close the fork window too, but it is not POSIX. */
    (void)fcntl(o->fd, F_SETFD, FD_CLOEXEC);
    int ok;
    if (o->keep_owner) {
        /* Owner first: chown clears set-id bits that the mode then restores.
         * Only a privileged caller may give a file away; others keep what
         * they may (the group, if they belong to it). */
        if (fchown(o->fd, o->old.st_uid, o->old.st_gid) != 0 &&
            fchown(o->fd, (uid_t)-1, o->old.st_gid) != 0) {
            /* Neither: the file stays the caller's, as a new one would. */
        }
        ok = fchmod(o->fd, o->old.st_mode & 07777) == 0;
    } else {
        /* mkstemp makes the file 0600; give it the mode open(2) would. */
        ok = fchmod(o->fd, (mode_t)(0666 & ~process_umask())) == 0;
    }
    *step = "cannot set permissions";
    return ok ? 0 : -1;
}

/* Open o for path by the rules of kmv.h. Returns 0, or -1 with errno and
 * *step (or *refusal, errno unset, for a target of a refused kind). */
static int open_output(kmv_output *o, const char *path, const char **step,
                       const char **refusal) {
    int fd = named_fd(path);
    *step = "cannot write";
    if (fd >= 0) {
        /* Our own descriptor, so commit can close it like any other. */
        o->kind = OUT_DIRECT;
        o->fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
        snprintf(o->target, sizeof o->target, "/dev/fd/%d", fd);
        return o->fd < 0 ? -1 : 0;
    }
    int exists;
    struct stat st;
    if (resolve(path, o->target, sizeof o->target, &exists, &st) != 0) return -1;
    if (exists && (*refusal = refused_kind(st.st_mode)) != NULL) return -1;
    if (exists && (S_ISCHR(st.st_mode) || S_ISFIFO(st.st_mode))) {
        /* A device or pipe: streamed as it is (a rename would replace the
         * node with a regular file). A FIFO's open waits for its reader. */
        o->kind = OUT_DIRECT;
        *step = "cannot open";
        do {
            o->fd = open(o->target, O_WRONLY | O_NOCTTY | O_CLOEXEC);
        } while (o->fd < 0 && errno == EINTR);
        return o->fd < 0 ? -1 : 0;
    }
    if (exists && access(o->target, W_OK) != 0) return -1;
    if (exists) {
        o->keep_owner = 1;
        o->old = st;
    }
    return open_temp(o, step);
}

int kmv_output_open(const char *path, const kmv_allocator *alloc, kmv_output **out, char *err,
                    size_t err_len) {
    kmv_allocator a;
    if (err != NULL && err_len > 0) err[0] = '\0';
    if (out == NULL) return kmv__file_error(err, err_len, path, KMV_EINVAL, "out is NULL");
    *out = NULL;
    if (path == NULL) return kmv__file_error(err, err_len, path, KMV_EINVAL, "path is NULL");
    if (*path == '\0') return kmv__file_error(err, err_len, path, KMV_EINVAL, "empty path");
    if (kmv__allocator_resolve(alloc, &a) != KMV_OK)
        return kmv__file_error(err, err_len, path, KMV_EINVAL,
                               "allocator must set both alloc and free, or neither");
    kmv_output *o = kmv__malloc(&a, sizeof *o);
    if (o == NULL) return kmv__file_error(err, err_len, path, KMV_ENOMEM, "out of memory");
    memset(o, 0, sizeof *o);
    o->alloc = a;
    o->fd = -1;
    const char *step, *refusal = NULL;
    if (open_output(o, path, &step, &refusal) == 0) {
        *out = o;
        return KMV_OK;
    }
    if (refusal != NULL) {
        kmv_output_discard(o);
        return kmv__file_error(err, err_len, path, KMV_EIO, "%s", refusal);
    }
    return fail(o, err, err_len, path, KMV_EIO, step, errno);
}

int kmv_output_write(kmv_output *o, const void *data, size_t len, char *err, size_t err_len) {
    if (err != NULL && err_len > 0) err[0] = '\0';
    if (o == NULL || (data == NULL && len > 0))
        return kmv__file_error(err, err_len, NULL, KMV_EINVAL, "output or data is NULL");
    const char *p = data;
    while (len > 0 && !o->failed) {
        ssize_t w = write(o->fd, p, len < IO_MAX ? len : IO_MAX);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            int e = w < 0 ? errno : EIO;
            o->failed = 1;
            return kmv__file_error(err, err_len, o->target, KMV_EIO, "write failed: %s",
                                   strerror(e));
        }
        p += w;
        len -= (size_t)w;
    }
    return o->failed ? kmv__file_error(err, err_len, o->target, KMV_EIO, "an earlier write failed")
                     : KMV_OK;
}

const char *kmv_output_temp_path(const kmv_output *o) {
    return o != NULL && o->kind == OUT_TEMP && o->tmp[0] != '\0' ? o->tmp : NULL;
}

/* Make the rename itself durable: until the directory is synced, a crash
 * could bring back the old entry. Best effort: the file is complete either
 * way, and some file systems refuse fsync on directories. */
static void sync_parent(const char *target) {
    char dir[PATH_CAP];
    const char *base;
    split(target, dir, sizeof dir, &base);
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        (void)fsync(dfd);
        close(dfd);
    }
}

static void release(kmv_output *o) {
    kmv_allocator a = o->alloc;
    kmv__free(&a, o);
}

int kmv_output_commit(kmv_output *o, char *err, size_t err_len) {
    if (err != NULL && err_len > 0) err[0] = '\0';
    if (o == NULL) return kmv__file_error(err, err_len, NULL, KMV_EINVAL, "output is NULL");
    const char *step = o->failed ? "an earlier write failed" : NULL;
    int saved = o->failed ? EIO : 0;
    /* Data must be on disk before the rename, or a crash could leave the
     * target naming a file whose blocks never arrived. A device or pipe
     * is not synced: there is nothing to replace. */
    if (step == NULL && o->kind == OUT_TEMP && fsync(o->fd) != 0) {
        step = "fsync failed";
        saved = errno;
    }
    /* Delayed write errors (NFS, quotas) can surface only at close. */
    if (close(o->fd) != 0 && step == NULL && o->kind == OUT_TEMP) {
        step = "close failed";
        saved = errno;
    }
    o->fd = -1;
    if (step == NULL && o->kind == OUT_TEMP && rename(o->tmp, o->target) != 0) {
        step = "cannot rename the temporary file into place";
        saved = errno;
    }
    if (step != NULL) {
        if (o->kind == OUT_TEMP) unlink(o->tmp);
        int rc = kmv__file_error(err, err_len, o->target, KMV_EIO, "%s: %s", step,
                                 strerror(saved));
        release(o);
        return rc;
    }
    if (o->kind == OUT_TEMP) sync_parent(o->target);
    release(o);
    return KMV_OK;
}

void kmv_output_discard(kmv_output *o) {
    if (o == NULL) return;
    if (o->fd >= 0) close(o->fd);
    if (o->kind == OUT_TEMP && o->tmp[0] != '\0') unlink(o->tmp);
    release(o);
}

int kmv__write_parts(const char *path, const kmv_allocator *alloc, const kmv__part *parts,
                     size_t nparts, char *err, size_t err_len) {
    kmv_output *o;
    int rc = kmv_output_open(path, alloc, &o, err, err_len);
    for (size_t u = 0; rc == KMV_OK && u < nparts; u++)
        rc = kmv_output_write(o, parts[u].data, parts[u].len, err, err_len);
    if (rc != KMV_OK) {
        kmv_output_discard(o);
        return rc;
    }
    return kmv_output_commit(o, err, err_len);
}
