#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "cli/io.h"

#include <errno.h>
#include <signal.h>
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

/* Temporary files to remove if a signal ends the run: copies of the paths,
 * so the handler reads nothing that can be freed under it. A slot is set
 * before its flag and cleared only after its file is renamed or removed
 * (unlinking a name that is gone already is harmless). */
#define SIG_SLOTS 8
static char sig_path[SIG_SLOTS][4200];
static volatile sig_atomic_t sig_live[SIG_SLOTS];

static void on_signal(int sig) {
    for (int u = 0; u < SIG_SLOTS; u++)
        if (sig_live[u]) unlink(sig_path[u]);
    /* SA_RESETHAND restored the default: the signal ends the run as usual. */
    raise(sig);
}

static int sig_register(const char *tmp) {
    static int installed;
    if (!installed) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_signal;
        sa.sa_flags = (int)SA_RESETHAND;
        sigemptyset(&sa.sa_mask);
        const int sigs[] = {SIGINT, SIGTERM, SIGHUP, SIGPIPE};
        for (size_t u = 0; u < sizeof sigs / sizeof sigs[0]; u++) sigaddset(&sa.sa_mask, sigs[u]);
        for (size_t u = 0; u < sizeof sigs / sizeof sigs[0]; u++) {
            struct sigaction old;
            /* A signal the caller set to be ignored stays ignored. */
            if (sigaction(sigs[u], NULL, &old) == 0 && old.sa_handler == SIG_IGN) continue;
            sigaction(sigs[u], &sa, NULL);
        }
        installed = 1;
    }
    if (tmp == NULL || strlen(tmp) >= sizeof sig_path[0]) return -1;
    for (int u = 0; u < SIG_SLOTS; u++) {
        if (sig_live[u]) continue;
        strcpy(sig_path[u], tmp);
        sig_live[u] = 1;
        return u;
    }
    return -1;
}

static void sig_release(int *slot) {
    if (*slot >= 0) sig_live[*slot] = 0;
    *slot = -1;
}

/* What a path names, for telling whether two paths are one file. */
typedef struct file_id {
    int known;  /* 0: cannot tell (its open will say why) */
    int exists;
    dev_t dev;
    ino_t ino;
    char path[4096]; /* resolved, for files not there yet */
} file_id;

static void id_input(const char *path, file_id *id) {
    struct stat st;
    memset(id, 0, sizeof *id);
    if (stat(path, &st) != 0) return;
    id->known = id->exists = 1;
    id->dev = st.st_dev;
    id->ino = st.st_ino;
}

static void id_output(const char *path, file_id *id) {
    struct stat st;
    memset(id, 0, sizeof *id);
    if (kmv_output_target(path, id->path, sizeof id->path, NULL, 0) != KMV_OK) return;
    id->known = 1;
    if (stat(id->path, &st) != 0) return;
    id->exists = 1;
    id->dev = st.st_dev;
    id->ino = st.st_ino;
}

static int same_file(const file_id *a, const file_id *b) {
    if (!a->known || !b->known || a->exists != b->exists) return 0;
    if (a->exists) return a->dev == b->dev && a->ino == b->ino;
    return strcmp(a->path, b->path) == 0;
}

/* The descriptor an output target "/dev/fd/N" names, or -1. */
static int target_fd(const file_id *id) {
    int fd;
    char rest;
    return id->known && sscanf(id->path, "/dev/fd/%d%c", &fd, &rest) == 1 ? fd : -1;
}

static int check_outputs(const char *cmd, const opt *opts, size_t n, const io_outputs *o) {
    file_id out[IO_MAX_OUTPUTS], in;
    for (size_t a = 0; a < o->n; a++) {
        id_output(o->opt[a]->s, &out[a]);
        int fd = target_fd(&out[a]);
        if (fd >= 0 && isatty(fd)) {
            fprintf(stderr, "kmv %s: --%s %s: refusing to write binary data to a terminal\n", cmd,
                    o->opt[a]->name, o->opt[a]->s);
            return EXIT_USAGE;
        }
        for (size_t b = 0; b < a; b++) {
            if (!same_file(&out[a], &out[b])) continue;
            fprintf(stderr, "kmv %s: --%s %s and --%s %s name the same file\n", cmd,
                    o->opt[b]->name, o->opt[b]->s, o->opt[a]->name, o->opt[a]->s);
            return EXIT_USAGE;
        }
        for (size_t i = 0; i < n; i++) {
            if (opts[i].role != ROLE_INPUT || !opts[i].seen) continue;
            id_input(opts[i].s, &in);
            if (!same_file(&out[a], &in)) continue;
            fprintf(stderr,
                    "kmv %s: --%s %s is the same file as the input --%s %s; refusing to "
                    "write over an input\n",
                    cmd, o->opt[a]->name, o->opt[a]->s, opts[i].name, opts[i].s);
            return EXIT_USAGE;
        }
    }
    return EXIT_OK;
}

/* The outputs given, in table order, none open yet. */
static int collect(const char *cmd, const opt *opts, size_t n, io_outputs *o) {
    memset(o, 0, sizeof *o);
    o->cmd = cmd;
    for (size_t i = 0; i < n; i++) {
        if (opts[i].role != ROLE_OUTPUT || !opts[i].seen) continue;
        if (o->n == IO_MAX_OUTPUTS) {
            fprintf(stderr, "kmv %s: too many outputs\n", cmd);
            return EXIT_FAIL;
        }
        o->slot[o->n] = -1;
        o->opt[o->n++] = &opts[i];
    }
    return EXIT_OK;
}

int io_outputs_check(const char *cmd, const opt *opts, size_t n) {
    io_outputs o;
    int rc = collect(cmd, opts, n, &o);
    return rc != EXIT_OK ? rc : check_outputs(cmd, opts, n, &o);
}

int io_outputs_open(const char *cmd, const opt *opts, size_t n, io_outputs *o) {
    int rc = collect(cmd, opts, n, o);
    if (rc == EXIT_OK) rc = check_outputs(cmd, opts, n, o);
    if (rc != EXIT_OK) return rc;
    for (size_t a = 0; a < o->n; a++) {
        char err[512];
        if (kmv_output_open(o->opt[a]->s, NULL, &o->out[a], err, sizeof err) != KMV_OK) {
            fprintf(stderr, "kmv %s: --%s %s\n", cmd, o->opt[a]->name, err);
            io_outputs_discard(o);
            return EXIT_FAIL;
        }
        const char *tmp = kmv_output_temp_path(o->out[a]);
        if (tmp != NULL) o->slot[a] = sig_register(tmp);
    }
    return EXIT_OK;
}

static size_t find(const io_outputs *o, const char *name) {
    for (size_t a = 0; a < o->n; a++)
        if (strcmp(o->opt[a]->name, name) == 0) return a;
    return o->n;
}

kmv_output *io_output(const io_outputs *o, const char *name) {
    size_t a = find(o, name);
    return a < o->n ? o->out[a] : NULL;
}

int io_outputs_use_stdout(const io_outputs *o) {
    file_id a, out;
    id_output("-", &a);
    for (size_t u = 0; u < o->n; u++) {
        id_output(o->opt[u]->s, &out);
        if (same_file(&a, &out) || target_fd(&out) == 1) return 1;
    }
    return 0;
}

int io_write(const io_outputs *o, const char *name, const void *data, size_t len) {
    char err[512];
    kmv_output *out = io_output(o, name);
    if (out != NULL && kmv_output_write(out, data, len, err, sizeof err) == KMV_OK) return 0;
    fprintf(stderr, "kmv %s: --%s: %s\n", o->cmd, name, out != NULL ? err : "not open");
    return EXIT_FAIL;
}

int io_write_npy(const io_outputs *o, const char *name, const float *data, int ndim,
                 size_t rows, size_t cols) {
    char err[512];
    kmv_output *out = io_output(o, name);
    if (out != NULL && kmv_npy_write_output(out, data, ndim, rows, cols, err, sizeof err) == KMV_OK)
        return 0;
    fprintf(stderr, "kmv %s: --%s: %s\n", o->cmd, name, out != NULL ? err : "not open");
    return EXIT_FAIL;
}

int io_outputs_commit(io_outputs *o) {
    for (size_t a = 0; a < o->n; a++) {
        char err[512];
        kmv_output *out = o->out[a];
        o->out[a] = NULL;
        int rc = kmv_output_commit(out, err, sizeof err);
        sig_release(&o->slot[a]);
        if (rc != KMV_OK) {
            fprintf(stderr, "kmv %s: --%s %s\n", o->cmd, o->opt[a]->name, err);
            io_outputs_discard(o);
            return EXIT_FAIL;
        }
    }
    return 0;
}

void io_outputs_discard(io_outputs *o) {
    for (size_t a = 0; a < o->n; a++) {
        kmv_output_discard(o->out[a]);
        o->out[a] = NULL;
        sig_release(&o->slot[a]);
    }
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
