/* The rules every kmv output follows (kmv_output_open() in kmv.h), through
 * the raw calls, kmv_npy_write() and kmv_stream_save(): devices and FIFOs
 * written in place and kept, symbolic links followed and kept, an existing
 * file's mode kept, a missing directory refused at open, and no temporary
 * file left by any failure. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "kmv/kmv.h"
#include "tests/testutil.h"

static char g_dir[1024];

static void path_of(const char *name, char *buf, size_t len) {
    snprintf(buf, len, "%s/%s", g_dir, name);
}

/* Whether the test directory holds a temporary file of an output. */
static int dir_has_tmp(void) {
    DIR *d = opendir(g_dir);
    struct dirent *e;
    int found = 0;
    assert_non_null(d);
    while ((e = readdir(d)) != NULL)
        if (strstr(e->d_name, ".tmp.") != NULL) found = 1;
    closedir(d);
    return found;
}

static size_t slurp(const char *path, unsigned char *buf, size_t cap) {
    int fd = open(path, O_RDONLY);
    assert_true(fd >= 0);
    size_t got = 0;
    ssize_t r;
    while (got < cap && (r = read(fd, buf + got, cap - got)) > 0) got += (size_t)r;
    close(fd);
    return got;
}

static void spill(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
}

/* The .npy bytes kmv writes for in[0..count), as a reference. */
static size_t npy_bytes(const float *in, size_t count, unsigned char *buf, size_t cap) {
    char path[2048], err[256];
    path_of("reference.npy", path, sizeof path);
    assert_int_equal(kmv_npy_write(path, in, 1, count, 1, err, sizeof err), KMV_OK);
    size_t len = slurp(path, buf, cap);
    unlink(path);
    return len;
}

/* A child that copies the FIFO at path to out (cat, without a shell). */
static pid_t fifo_reader(const char *path, const char *out) {
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int in = open(path, O_RDONLY), o = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        char b[4096];
        ssize_t r;
        while (in >= 0 && o >= 0 && (r = read(in, b, sizeof b)) > 0)
            if (write(o, b, (size_t)r) != r) break;
        _exit(in >= 0 && o >= 0 ? 0 : 1);
    }
    return pid;
}

static void test_fifo(void **state) {
    (void)state;
    float in[64];
    for (int i = 0; i < 64; i++) in[i] = (float)i;
    unsigned char want[1024], got[1024];
    size_t wl = npy_bytes(in, 64, want, sizeof want);
    char fifo[2048], out[2048], err[256];
    path_of("fifo", fifo, sizeof fifo);
    path_of("fifo.copy", out, sizeof out);
    assert_int_equal(mkfifo(fifo, 0600), 0);
    pid_t pid = fifo_reader(fifo, out);
    assert_int_equal(kmv_npy_write(fifo, in, 1, 64, 1, err, sizeof err), KMV_OK);
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    struct stat st;
    assert_int_equal(lstat(fifo, &st), 0);
    assert_true(S_ISFIFO(st.st_mode)); /* still a FIFO, not a file in its place */
    assert_int_equal(slurp(out, got, sizeof got), wl);
    assert_memory_equal(got, want, wl);
    assert_false(dir_has_tmp());
    unlink(fifo);
    unlink(out);
}

static void test_dev_null(void **state) {
    (void)state;
    float in[4] = {1, 2, 3, 4};
    char err[256];
    struct stat before, after;
    assert_int_equal(stat("/dev/null", &before), 0);
    assert_int_equal(kmv_npy_write("/dev/null", in, 1, 4, 1, err, sizeof err), KMV_OK);
    assert_int_equal(lstat("/dev/null", &after), 0);
    assert_true(S_ISCHR(after.st_mode));
    assert_true(before.st_rdev == after.st_rdev && before.st_ino == after.st_ino);
}

/* /dev/fd/N names an open descriptor: the bytes go down it (a pipe here). */
static void test_named_descriptor(void **state) {
    (void)state;
    int p[2];
    assert_int_equal(pipe(p), 0);
    char path[64], err[256];
    snprintf(path, sizeof path, "/dev/fd/%d", p[1]);
    kmv_output *o;
    assert_int_equal(kmv_output_open(path, NULL, &o, err, sizeof err), KMV_OK);
    assert_null(kmv_output_temp_path(o));
    assert_int_equal(kmv_output_write(o, "hello", 5, err, sizeof err), KMV_OK);
    assert_int_equal(kmv_output_commit(o, err, sizeof err), KMV_OK);
    close(p[1]); /* the output closed its own copy */
    char buf[16];
    assert_int_equal(read(p[0], buf, sizeof buf), 5);
    assert_memory_equal(buf, "hello", 5);
    close(p[0]);
    char t[4096];
    assert_int_equal(kmv_output_target("-", t, sizeof t, err, sizeof err), KMV_OK);
    assert_string_equal(t, "/dev/fd/1");
}

static void test_symlinks(void **state) {
    (void)state;
    float in[3] = {1, 2, 3};
    char target[2048], link[2048], link2[2048], err[256], t[4096];
    path_of("linked.npy", target, sizeof target);
    path_of("link.npy", link, sizeof link);
    path_of("link2.npy", link2, sizeof link2);
    spill(target, "old");
    assert_int_equal(symlink("linked.npy", link), 0); /* relative, as users make them */
    assert_int_equal(symlink(link, link2), 0);        /* and a chain */
    assert_int_equal(kmv_output_target(link2, t, sizeof t, err, sizeof err), KMV_OK);
    char real[4096];
    assert_non_null(realpath(target, real));
    assert_string_equal(t, real);
    assert_int_equal(kmv_npy_write(link2, in, 1, 3, 1, err, sizeof err), KMV_OK);
    struct stat st;
    assert_int_equal(lstat(link, &st), 0);
    assert_true(S_ISLNK(st.st_mode));
    assert_int_equal(lstat(link2, &st), 0);
    assert_true(S_ISLNK(st.st_mode));
    kmv_array a;
    assert_int_equal(kmv_npy_read(target, NULL, &a, err, sizeof err), KMV_OK);
    assert_int_equal(a.rows, 3);
    kmv_array_free(&a);
    /* A dangling link: the file is made where it points. */
    unlink(target);
    assert_int_equal(kmv_npy_write(link, in, 1, 3, 1, err, sizeof err), KMV_OK);
    assert_int_equal(lstat(link, &st), 0);
    assert_true(S_ISLNK(st.st_mode));
    assert_int_equal(lstat(target, &st), 0);
    assert_true(S_ISREG(st.st_mode));
    assert_false(dir_has_tmp());
    unlink(link2);
    unlink(link);
    unlink(target);
}

static void test_mode_kept(void **state) {
    (void)state;
    float in[2] = {1, 2};
    char path[2048], err[256];
    struct stat st;
    path_of("private.npy", path, sizeof path);
    spill(path, "old");
    assert_int_equal(chmod(path, 0600), 0);
    assert_int_equal(kmv_npy_write(path, in, 1, 2, 1, err, sizeof err), KMV_OK);
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 07777, 0600);
    assert_int_equal(chmod(path, 0640), 0);
    assert_int_equal(kmv_npy_write(path, in, 1, 2, 1, err, sizeof err), KMV_OK);
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 07777, 0640);
    unlink(path);
}

/* The temporary file exists from open, the target keeps its old content
 * until commit, and discard removes the temporary. */
static void test_staging(void **state) {
    (void)state;
    char path[2048], err[256];
    unsigned char buf[64];
    path_of("staged.txt", path, sizeof path);
    spill(path, "old");
    kmv_output *o;
    assert_int_equal(kmv_output_open(path, NULL, &o, err, sizeof err), KMV_OK);
    const char *tmp = kmv_output_temp_path(o);
    assert_non_null(tmp);
    assert_int_equal(access(tmp, F_OK), 0);
    assert_int_equal(kmv_output_write(o, "new!", 4, err, sizeof err), KMV_OK);
    assert_int_equal(slurp(path, buf, sizeof buf), 3);
    kmv_output_discard(o);
    assert_false(dir_has_tmp());
    assert_int_equal(slurp(path, buf, sizeof buf), 3);
    assert_memory_equal(buf, "old", 3);
    assert_int_equal(kmv_output_open(path, NULL, &o, err, sizeof err), KMV_OK);
    assert_int_equal(kmv_output_write(o, "new!", 4, err, sizeof err), KMV_OK);
    assert_int_equal(kmv_output_commit(o, err, sizeof err), KMV_OK);
    assert_int_equal(slurp(path, buf, sizeof buf), 4);
    assert_memory_equal(buf, "new!", 4);
    assert_false(dir_has_tmp());
    unlink(path);
}

/* A missing directory fails at open, before any work; so do targets that
 * are not files or character devices. */
static void test_refused(void **state) {
    (void)state;
    char path[2048], err[256];
    kmv_output *o = (kmv_output *)&o;
    path_of("no_dir/x.npy", path, sizeof path);
    assert_int_equal(kmv_output_open(path, NULL, &o, err, sizeof err), KMV_EIO);
    assert_null(o);
    assert_non_null(strstr(err, "its directory does not exist"));
    path_of("a_dir", path, sizeof path);
    assert_int_equal(mkdir(path, 0755), 0);
    assert_int_equal(kmv_output_open(path, NULL, &o, err, sizeof err), KMV_EIO);
    assert_non_null(strstr(err, "is a directory"));
    rmdir(path);
    /* A socket: refused by name, not replaced by a file. */
    path_of("sock", path, sizeof path);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    if (fd >= 0 && strlen(path) < sizeof sa.sun_path) {
        strcpy(sa.sun_path, path);
        assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
        assert_int_equal(kmv_output_open(path, NULL, &o, err, sizeof err), KMV_EIO);
        assert_non_null(strstr(err, "socket"));
        struct stat st;
        assert_int_equal(lstat(path, &st), 0);
        assert_true(S_ISSOCK(st.st_mode));
        unlink(path);
    }
    if (fd >= 0) close(fd);
    assert_int_equal(kmv_output_open("", NULL, &o, err, sizeof err), KMV_EINVAL);
    assert_int_equal(kmv_output_open(NULL, NULL, &o, err, sizeof err), KMV_EINVAL);
    assert_false(dir_has_tmp());
}

/* A write that fails (a full device) fails the commit; a file output's
 * allocation failure leaves nothing. */
static void test_failures(void **state) {
    (void)state;
    char err[256], path[2048];
    static char big[1 << 16];
    kmv_output *o;
    if (access("/dev/full", W_OK) == 0) {
        assert_int_equal(kmv_output_open("/dev/full", NULL, &o, err, sizeof err), KMV_OK);
        assert_int_equal(kmv_output_write(o, big, sizeof big, err, sizeof err), KMV_EIO);
        assert_int_equal(kmv_output_commit(o, err, sizeof err), KMV_EIO);
    }
    tu_alloc_state as = {0, 0, 1};
    kmv_allocator a = tu_allocator(&as);
    path_of("never.npy", path, sizeof path);
    assert_int_equal(kmv_output_open(path, &a, &o, err, sizeof err), KMV_ENOMEM);
    assert_int_equal(as.live, 0);
    assert_int_equal(access(path, F_OK), -1);
    assert_false(dir_has_tmp());
}

/* kmv_stream_save() by the same rules: a FIFO, a symlink, a kept mode, a
 * missing directory. */
static void test_stream_save(void **state) {
    (void)state;
    const size_t n = 100, d = 4;
    float *k = tu_random(n * d, 5, 1.0f), *x = tu_random(n, 6, 1.0f);
    kmv_ctx *ctx;
    kmv_stream *s, *t;
    assert_int_equal(kmv_ctx_create(NULL, &ctx), KMV_OK);
    assert_int_equal(kmv_stream_create(ctx, d, 1, &s), KMV_OK);
    assert_int_equal(kmv_stream_append_keys(s, k, x, n), KMV_OK);
    char path[2048], link[2048], fifo[2048], copy[2048], err[256];
    path_of("snap.kmvs", path, sizeof path);
    path_of("snap.link", link, sizeof link);
    path_of("snap.fifo", fifo, sizeof fifo);
    path_of("snap.copy", copy, sizeof copy);
    spill(path, "old");
    assert_int_equal(chmod(path, 0600), 0);
    assert_int_equal(symlink("snap.kmvs", link), 0);
    assert_int_equal(kmv_stream_save(s, link, err, sizeof err), KMV_OK);
    struct stat st;
    assert_int_equal(lstat(link, &st), 0);
    assert_true(S_ISLNK(st.st_mode));
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 07777, 0600);
    assert_int_equal(kmv_stream_load(ctx, path, &t, err, sizeof err), KMV_OK);
    kmv_stream_info info;
    assert_int_equal(kmv_stream_get_info(t, &info), KMV_OK);
    assert_int_equal(info.n_keys, n);
    kmv_stream_free(t);
    /* Through a FIFO: the bytes read back are the file's. */
    assert_int_equal(mkfifo(fifo, 0600), 0);
    pid_t pid = fifo_reader(fifo, copy);
    assert_int_equal(kmv_stream_save(s, fifo, err, sizeof err), KMV_OK);
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_int_equal(kmv_stream_load(ctx, copy, &t, err, sizeof err), KMV_OK);
    kmv_stream_free(t);
    assert_int_equal(lstat(fifo, &st), 0);
    assert_true(S_ISFIFO(st.st_mode));
    path_of("gone/snap.kmvs", path, sizeof path);
    assert_int_equal(kmv_stream_save(s, path, err, sizeof err), KMV_EIO);
    assert_non_null(strstr(err, "its directory does not exist"));
    assert_false(dir_has_tmp());
    path_of("snap.kmvs", path, sizeof path);
    unlink(path);
    unlink(link);
    unlink(fifo);
    unlink(copy);
    kmv_stream_free(s);
    kmv_ctx_free(ctx);
    free(k);
    free(x);
}

static int setup(void **state) {
    (void)state;
    const char *base = getenv("TEST_TMPDIR");
    snprintf(g_dir, sizeof g_dir, "%s/kmv_output.XXXXXX", base ? base : "/tmp");
    return mkdtemp(g_dir) != NULL ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    return rmdir(g_dir);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fifo),
        cmocka_unit_test(test_dev_null),
        cmocka_unit_test(test_named_descriptor),
        cmocka_unit_test(test_symlinks),
        cmocka_unit_test(test_mode_kept),
        cmocka_unit_test(test_staging),
        cmocka_unit_test(test_refused),
        cmocka_unit_test(test_failures),
        cmocka_unit_test(test_stream_save),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
