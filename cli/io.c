#include "cli/io.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/args.h"

int io_load(const char *cmd, const char *path, const char *what, int allow_1d, kmv_array *out) {
    char err[512];
    int rc = kmv_npy_read(path, NULL, out, err, sizeof err);
    if (rc != KMV_OK) {
        fprintf(stderr, "kmv %s: cannot read %s: %s\n", cmd, what, err);
        return EXIT_FAIL;
    }
    if (out->ndim == 1 && !allow_1d) {
        fprintf(stderr, "kmv %s: %s: %s must be a 2-D array (rows x dim), got 1-D of length %zu\n",
                cmd, path, what, out->rows);
        kmv_array_free(out);
        return EXIT_FAIL;
    }
    size_t where;
    if (kmv_find_nonfinite(out->data, out->rows * out->cols, &where) != KMV_OK) {
        fprintf(stderr, "kmv %s: %s: %s contain %s at row %zu, column %zu\n", cmd, path, what,
                isnan(out->data[where]) ? "NaN" : "infinity", where / out->cols,
                where % out->cols);
        kmv_array_free(out);
        return EXIT_FAIL;
    }
    return 0;
}

int io_stage_text(const char *cmd, const char *path, const char *text, size_t len,
                  char **staged) {
    size_t plen = strlen(path);
    char *tmp = malloc(plen + 16);
    *staged = NULL;
    if (tmp == NULL) {
        fprintf(stderr, "kmv %s: %s: out of memory\n", cmd, path);
        return EXIT_FAIL;
    }
    snprintf(tmp, plen + 16, "%s.tmp.XXXXXX", path);
    int fd = mkstemp(tmp);
    if (fd < 0) {
        fprintf(stderr, "kmv %s: cannot write %s: %s\n", cmd, path, strerror(errno));
        free(tmp);
        return EXIT_FAIL;
    }
    /* mkstemp makes the file 0600; give the result the usual permissions. */
    mode_t mask = umask(0);
    umask(mask);
    int ok = fchmod(fd, 0666 & ~mask) == 0;
    for (size_t done = 0; ok && done < len;) {
        ssize_t w = write(fd, text + done, len - done);
        if (w < 0 && errno == EINTR) continue;
        ok = w > 0;
        if (ok) done += (size_t)w;
    }
    ok = ok && fsync(fd) == 0;
    int saved = errno;
    ok = (close(fd) == 0) && ok;
    if (!ok) {
        fprintf(stderr, "kmv %s: cannot write %s: %s\n", cmd, path, strerror(saved ? saved : EIO));
        unlink(tmp);
        free(tmp);
        return EXIT_FAIL;
    }
    *staged = tmp;
    return 0;
}

int io_commit(const char *cmd, char **staged, const char *path) {
    char *tmp = *staged;
    *staged = NULL;
    if (rename(tmp, path) != 0) {
        fprintf(stderr, "kmv %s: cannot write %s: %s\n", cmd, path, strerror(errno));
        unlink(tmp);
        free(tmp);
        return EXIT_FAIL;
    }
    /* Make the rename durable too (best effort, as for .npy outputs). */
    char *slash = strrchr(tmp, '/');
    if (slash != NULL) *slash = '\0';
    int dfd = open(slash != NULL ? (*tmp ? tmp : "/") : ".", O_RDONLY | O_DIRECTORY);
    if (dfd >= 0) {
        (void)fsync(dfd);
        close(dfd);
    }
    free(tmp);
    return 0;
}

void io_discard(char **staged) {
    if (*staged != NULL) unlink(*staged);
    free(*staged);
    *staged = NULL;
}

static int readable(const char *path) { return access(path, R_OK) == 0; }

int io_find_data(const char *cmd, const char *argv0, const char *name, char *out, size_t len) {
    const char *env = getenv("KMV_DATA_DIR");
    if (env != NULL && *env != '\0') {
        snprintf(out, len, "%s/%s", env, name);
        if (readable(out)) return 0;
    }
    snprintf(out, len, "data/%s", name);
    if (readable(out)) return 0;
    /* `bazel run` and `bazel-bin/kmv` keep the data in the runfiles tree. */
    const char *rf = getenv("RUNFILES_DIR");
    if (rf != NULL) {
        snprintf(out, len, "%s/kmv/data/%s", rf, name);
        if (readable(out)) return 0;
    }
    snprintf(out, len, "%s.runfiles/kmv/data/%s", argv0, name);
    if (readable(out)) return 0;
    fprintf(stderr,
            "kmv %s: cannot find data/%s (looked in $KMV_DATA_DIR, ./data and the runfiles of "
            "%s); run from the repository root or set KMV_DATA_DIR\n",
            cmd, name, argv0);
    return EXIT_FAIL;
}
