/* Tests for kmv_npy_read / kmv_npy_write. Every malformed file is built byte
 * by byte here, so the tests need neither numpy nor data files. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <math.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "kmv/kmv.h"

#define ERR_LEN 512
#define MAGIC "\x93NUMPY"
#define DICT(descr, fortran, shape) \
    "{'descr': '" descr "', 'fortran_order': " fortran ", 'shape': " shape ", }"

static char g_dir[1024];

/* ---------------------------------------------------------------- helpers */

static void path_of(const char *name, char *path, size_t cap) {
    int n = snprintf(path, cap, "%s/%s", g_dir, name);
    assert_true(n > 0 && (size_t)n < cap);
}

static void put_file(const char *name, const void *bytes, size_t len, char *path, size_t cap) {
    FILE *f;
    path_of(name, path, cap);
    f = fopen(path, "wb");
    assert_non_null(f);
    if (len > 0) assert_int_equal(fwrite(bytes, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
}

static unsigned char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    unsigned char *b;
    long n;
    assert_non_null(f);
    assert_int_equal(fseek(f, 0, SEEK_END), 0);
    n = ftell(f);
    assert_true(n >= 0);
    rewind(f);
    b = malloc((size_t)n + 1);
    assert_non_null(b);
    assert_int_equal(fread(b, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return b;
}

/* Header bytes taken verbatim (so they can be malformed) after a length
 * field that says hlen_field; the caller frees the image. */
static unsigned char *npy_raw(unsigned major, unsigned minor, const char *hdr, size_t hlen,
                              size_t hlen_field, const void *data, size_t dlen, size_t *len) {
    size_t lb = major >= 2 ? 4 : 2, i;
    unsigned char *b = malloc(8 + lb + hlen + dlen);
    assert_non_null(b);
    memcpy(b, MAGIC, 6);
    b[6] = (unsigned char)major;
    b[7] = (unsigned char)minor;
    for (i = 0; i < lb; i++) b[8 + i] = (unsigned char)((hlen_field >> (8 * i)) & 0xff);
    if (hlen > 0) memcpy(b + 8 + lb, hdr, hlen);
    if (dlen > 0) memcpy(b + 8 + lb + hlen, data, dlen);
    *len = 8 + lb + hlen + dlen;
    return b;
}

/* A well-formed image: dict padded with spaces and '\n' as numpy does. */
static unsigned char *npy_image(unsigned major, const char *dict, const void *data, size_t dlen,
                                size_t *len) {
    char hdr[4096];
    size_t lb = major >= 2 ? 4 : 2, dl = strlen(dict), total, hlen;
    unsigned char *b;
    total = (8 + lb + dl + 1 + 63) / 64 * 64;
    hlen = total - 8 - lb;
    assert_true(hlen <= sizeof hdr);
    memcpy(hdr, dict, dl);
    memset(hdr + dl, ' ', hlen - dl - 1);
    hdr[hlen - 1] = '\n';
    b = npy_raw(major, 0, hdr, hlen, hlen, data, dlen, len);
    return b;
}

static void put_npy(const char *name, unsigned major, const char *dict, const void *data,
                    size_t dlen, char *path, size_t cap) {
    size_t len;
    unsigned char *b = npy_image(major, dict, data, dlen, &len);
    put_file(name, b, len, path, cap);
    free(b);
}

static void check_zeroed(const kmv_array *a, int line) {
    if (a->data != NULL || a->rows != 0 || a->cols != 0 || a->ndim != 0 ||
        a->allocator.alloc != NULL || a->allocator.free != NULL || a->allocator.opaque != NULL)
        fail_msg("line %d: *out not zeroed on error", line);
}

/* The code must match, and the message start with "<path>:" and hold kw. */
static void check_err(int rc, int want, const char *err, const char *path, const char *kw,
                      int line) {
    size_t n = strlen(path);
    if (rc != want)
        fail_msg("line %d: got %s, want %s (%s)", line, kmv_errname(rc), kmv_errname(want), err);
    if (strncmp(err, path, n) != 0 || err[n] != ':')
        fail_msg("line %d: message does not start with the path: %s", line, err);
    if (kw != NULL && strstr(err + n, kw) == NULL)
        fail_msg("line %d: message lacks \"%s\": %s", line, kw, err);
}
#define CHECK_ERR(rc, want, err, path, kw) check_err(rc, want, err, path, kw, __LINE__)

static void expect_read_fail(const char *path, int want, const char *kw, int line) {
    kmv_array a;
    char err[ERR_LEN];
    int rc;
    memset(&a, 0x5a, sizeof a);
    rc = kmv_npy_read(path, NULL, &a, err, sizeof err);
    check_err(rc, want, err, path, kw, line);
    check_zeroed(&a, line);
}
#define EXPECT_READ_FAIL(path, want, kw) expect_read_fail(path, want, kw, __LINE__)

/* Writes dict plus dlen bytes of data and expects the read to fail. */
static void expect_dict_fail(const char *dict, size_t dlen, int want, const char *kw, int line) {
    char path[2048];
    unsigned char zeros[64] = {0};
    assert_true(dlen <= sizeof zeros);
    put_npy("dict_fail.npy", 1, dict, zeros, dlen, path, sizeof path);
    expect_read_fail(path, want, kw, line);
}
#define EXPECT_DICT_FAIL(dict, dlen, want, kw) expect_dict_fail(dict, dlen, want, kw, __LINE__)

static void read_ok(const char *path, kmv_array *a) {
    char err[ERR_LEN];
    int rc = kmv_npy_read(path, NULL, a, err, sizeof err);
    if (rc != KMV_OK) fail_msg("read failed: %s: %s", kmv_errname(rc), err);
}

static int dir_has_tmp(const char *dir) {
    DIR *d = opendir(dir);
    struct dirent *e;
    int found = 0;
    assert_non_null(d);
    while ((e = readdir(d)) != NULL)
        if (strstr(e->d_name, ".tmp.") != NULL) found = 1;
    closedir(d);
    return found;
}

static int same_bits(const float *a, const float *b, size_t n) {
    return n == 0 || memcmp(a, b, n * sizeof *a) == 0;
}

static const float k_f6[6] = {1.0f, -2.5f, 0.0f, 3.25f, 1e-30f, -7.0f};

/* --------------------------------------------------------- fixtures */

static int group_setup(void **state) {
    const char *base = getenv("TEST_TMPDIR");
    (void)state;
    if (base == NULL || base[0] == '\0') base = "/tmp";
    snprintf(g_dir, sizeof g_dir, "%s/kmv_npy_test.XXXXXX", base);
    return mkdtemp(g_dir) == NULL ? -1 : 0;
}

static int group_teardown(void **state) {
    DIR *d = opendir(g_dir);
    struct dirent *e;
    char path[2048];
    (void)state;
    if (d == NULL) return -1;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        snprintf(path, sizeof path, "%s/%s", g_dir, e->d_name);
        unlink(path);
    }
    closedir(d);
    return rmdir(g_dir);
}

/* ------------------------------------------------------------ round trips */

static void test_roundtrip_1d(void **state) {
    float in[7] = {0.0f, -0.0f, 1.5f, -FLT_MAX, FLT_MIN / 4, 1e30f, 0.1f};
    char path[2048], err[ERR_LEN];
    kmv_array a;
    (void)state;
    in[6] = NAN;
    path_of("rt1.npy", path, sizeof path);
    assert_int_equal(kmv_npy_write(path, in, 1, 7, 1, err, sizeof err), KMV_OK);
    read_ok(path, &a);
    assert_int_equal(a.ndim, 1);
    assert_int_equal(a.rows, 7);
    assert_int_equal(a.cols, 1);
    assert_true(same_bits(a.data, in, 7));
    kmv_array_free(&a);
}

static void test_roundtrip_2d(void **state) {
    float in[3 * 5], in2[2 * 2] = {9, 8, 7, 6};
    char path[2048], err[ERR_LEN];
    kmv_array a;
    size_t i;
    (void)state;
    for (i = 0; i < 15; i++) in[i] = (float)i * 0.37f - 2.0f;
    path_of("rt2.npy", path, sizeof path);
    assert_int_equal(kmv_npy_write(path, in, 2, 3, 5, err, sizeof err), KMV_OK);
    read_ok(path, &a);
    assert_int_equal(a.ndim, 2);
    assert_int_equal(a.rows, 3);
    assert_int_equal(a.cols, 5);
    assert_true(same_bits(a.data, in, 15));
    kmv_array_free(&a);
    /* Replacing an existing file. */
    assert_int_equal(kmv_npy_write(path, in2, 2, 2, 2, err, sizeof err), KMV_OK);
    read_ok(path, &a);
    assert_int_equal(a.rows, 2);
    assert_int_equal(a.cols, 2);
    assert_true(same_bits(a.data, in2, 4));
    kmv_array_free(&a);
    assert_false(dir_has_tmp(g_dir));
}

static void check_written_header(const char *path, const char *dict, size_t data_bytes) {
    size_t len, hlen;
    unsigned char *b = slurp(path, &len);
    assert_true(len >= 10);
    assert_memory_equal(b, MAGIC, 6);
    assert_int_equal(b[6], 1);
    assert_int_equal(b[7], 0);
    hlen = (size_t)b[8] | (size_t)b[9] << 8;
    assert_int_equal((10 + hlen) % 64, 0);
    assert_int_equal(len, 10 + hlen + data_bytes);
    assert_int_equal(b[10 + hlen - 1], '\n');
    assert_true(hlen > strlen(dict));
    assert_memory_equal(b + 10, dict, strlen(dict));
    for (size_t i = 10 + strlen(dict); i < 10 + hlen - 1; i++) assert_int_equal(b[i], ' ');
    free(b);
}

static void test_written_header_layout(void **state) {
    float in[15] = {0};
    char path[2048], err[ERR_LEN], dict[256];
    kmv_array a;
    (void)state;
    path_of("hdr.npy", path, sizeof path);
    assert_int_equal(kmv_npy_write(path, in, 2, 3, 5, err, sizeof err), KMV_OK);
    check_written_header(path, DICT("<f4", "False", "(3, 5)"), 60);
    assert_int_equal(kmv_npy_write(path, in, 1, 15, 1, err, sizeof err), KMV_OK);
    check_written_header(path, DICT("<f4", "False", "(15,)"), 60);
    /* The longest header the writer can produce still fits and parses. */
    assert_int_equal(kmv_npy_write(path, NULL, 2, 0, SIZE_MAX, err, sizeof err), KMV_OK);
    snprintf(dict, sizeof dict, "{'descr': '<f4', 'fortran_order': False, 'shape': (0, %zu), }",
             (size_t)SIZE_MAX);
    check_written_header(path, dict, 0);
    read_ok(path, &a);
    assert_int_equal(a.rows, 0);
    assert_true(a.cols == SIZE_MAX);
    assert_null(a.data);
    kmv_array_free(&a);
}

static void test_write_mode_follows_umask(void **state) {
    float in[2] = {1, 2};
    char path[2048], err[ERR_LEN];
    struct stat st;
    mode_t old = umask(027);
    (void)state;
    path_of("mode.npy", path, sizeof path);
    assert_int_equal(kmv_npy_write(path, in, 1, 2, 1, err, sizeof err), KMV_OK);
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0640);
    /* A file already there keeps its mode, whatever the umask. */
    umask(022);
    assert_int_equal(chmod(path, 0600), 0);
    assert_int_equal(kmv_npy_write(path, in, 1, 2, 1, err, sizeof err), KMV_OK);
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    assert_int_equal(unlink(path), 0);
    assert_int_equal(kmv_npy_write(path, in, 1, 2, 1, err, sizeof err), KMV_OK);
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0644);
    umask(old);
}

/* ------------------------------------------------------ versions, header */

static void test_v2_header(void **state) {
    char path[2048];
    kmv_array a;
    (void)state;
    put_npy("v2.npy", 2, DICT("<f4", "False", "(2, 3)"), k_f6, sizeof k_f6, path, sizeof path);
    read_ok(path, &a);
    assert_int_equal(a.rows, 2);
    assert_int_equal(a.cols, 3);
    assert_true(same_bits(a.data, k_f6, 6));
    kmv_array_free(&a);
}

static void test_v3_header(void **state) {
    char path[2048];
    kmv_array a;
    (void)state;
    put_npy("v3.npy", 3, DICT("<f4", "False", "(6,)"), k_f6, sizeof k_f6, path, sizeof path);
    read_ok(path, &a);
    assert_int_equal(a.ndim, 1);
    assert_int_equal(a.rows, 6);
    assert_int_equal(a.cols, 1);
    assert_true(same_bits(a.data, k_f6, 6));
    kmv_array_free(&a);
}

static void test_header_variants_accepted(void **state) {
    static const char *dicts[] = {
        "{\"descr\": \"<f4\", \"fortran_order\": False, \"shape\": (2, 3)}",
        "{'shape':(2,3),'fortran_order':False,'descr':'<f4'}",
        "  {\n 'descr' : '<f4' ,\n\t'fortran_order':False,'shape':( 2 ,\r\n 3 , ),}  ",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2L, 3L), }",
        "{'fortran_order': False, 'descr': \"<f4\", 'shape': (2, 3,)}",
    };
    char path[2048];
    kmv_array a;
    size_t i;
    (void)state;
    for (i = 0; i < sizeof dicts / sizeof *dicts; i++) {
        put_npy("variant.npy", 1, dicts[i], k_f6, sizeof k_f6, path, sizeof path);
        read_ok(path, &a);
        assert_int_equal(a.ndim, 2);
        assert_int_equal(a.rows, 2);
        assert_int_equal(a.cols, 3);
        assert_true(same_bits(a.data, k_f6, 6));
        kmv_array_free(&a);
    }
    put_npy("variant.npy", 1, "{'descr':'<f4','fortran_order':False,'shape':( 6 , )}", k_f6,
            sizeof k_f6, path, sizeof path);
    read_ok(path, &a);
    assert_int_equal(a.ndim, 1);
    assert_int_equal(a.rows, 6);
    kmv_array_free(&a);
}

static void test_header_malformed(void **state) {
    static const struct {
        const char *dict;
        const char *kw;
    } cases[] = {
        {DICT("<f4", "False", "(6)"), "not a tuple"},
        {DICT("<f4", "False", "(2 3)"), "',' or ')'"},
        {DICT("<f4", "False", "(6,,)"), "a dimension"},
        {DICT("<f4", "False", "(-6,)"), "negative dimension"},
        {DICT("<f4", "False", "[6]"), "a tuple"},
        {DICT("<f4", "false", "(6,)"), "True or False"},
        {DICT("<f4", "0", "(6,)"), "True or False"},
        {DICT("<f\\x34", "False", "(6,)"), "escape"},
        {DICT("<f\xc3\xa4" "4", "False", "(6,)"), "non-ASCII"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (6,), 'extra': 1}", "unknown key"},
        {"{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (6,)}",
         "duplicate key 'descr'"},
        {"{'descr' '<f4', 'fortran_order': False, 'shape': (6,)}", "':'"},
        {"{'descr': '<f4' 'fortran_order': False, 'shape': (6,)}", "',' or '}'"},
        {"{,}", "a quoted string"},
        {"{'descr': b'<f4', 'fortran_order': False, 'shape': (6,)}", "a quoted string"},
        {"{descr: '<f4', 'fortran_order': False, 'shape': (6,)}", "a quoted string"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (6,)} x", "after the header dict"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (6,)}}", "after the header dict"},
        {"('descr', '<f4')", "'{'"},
        {"{'descr': '<f4, 'fortran_order': False, 'shape': (6,)}", "unsupported dtype '<f4, '"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (6,), 'x", "control byte 0x0a"},
        {"", "'{'"},
    };
    size_t i;
    (void)state;
    for (i = 0; i < sizeof cases / sizeof *cases; i++)
        EXPECT_DICT_FAIL(cases[i].dict, 24, KMV_EFORMAT, cases[i].kw);
}

static void test_header_empty(void **state) {
    char path[2048];
    size_t len;
    unsigned char *b = npy_raw(1, 0, "", 0, 0, k_f6, sizeof k_f6, &len);
    (void)state;
    put_file("empty_hdr.npy", b, len, path, sizeof path);
    free(b);
    EXPECT_READ_FAIL(path, KMV_EFORMAT, "empty");
}

static void test_header_unterminated_string(void **state) {
    static const char hdr[] = "{'descr': '<f4', 'fortran_order': False, 'shape': (6,), 'x";
    char path[2048];
    size_t len;
    unsigned char *b = npy_raw(1, 0, hdr, sizeof hdr - 1, sizeof hdr - 1, k_f6, 0, &len);
    (void)state;
    put_file("unterminated.npy", b, len, path, sizeof path);
    free(b);
    EXPECT_READ_FAIL(path, KMV_EFORMAT, "unterminated string");
}

static void test_header_nul_byte(void **state) {
    static const char hdr[] = "{'descr': '<f4', 'fortran_order': False, 'shape': (6,)}\0       \n";
    char path[2048];
    size_t len;
    unsigned char *b = npy_raw(1, 0, hdr, sizeof hdr - 1, sizeof hdr - 1, k_f6, sizeof k_f6, &len);
    (void)state;
    put_file("nul_hdr.npy", b, len, path, sizeof path);
    free(b);
    EXPECT_READ_FAIL(path, KMV_EFORMAT, "byte 0x00");
}

static void test_header_no_closing_brace(void **state) {
    (void)state;
    EXPECT_DICT_FAIL("{'descr': '<f4', 'fortran_order': False, 'shape': (6,), ", 24, KMV_EFORMAT,
                     "no closing '}'");
    EXPECT_DICT_FAIL("{'descr': '<f4', 'fortran_order': False, 'shape': (6,", 24, KMV_EFORMAT,
                     "no closing '}'");
}

static void test_header_missing_keys(void **state) {
    (void)state;
    EXPECT_DICT_FAIL("{'fortran_order': False, 'shape': (6,), }", 24, KMV_EFORMAT,
                     "missing key 'descr'");
    EXPECT_DICT_FAIL("{'descr': '<f4', 'shape': (6,), }", 24, KMV_EFORMAT,
                     "missing key 'fortran_order'");
    EXPECT_DICT_FAIL("{'descr': '<f4', 'fortran_order': False, }", 24, KMV_EFORMAT,
                     "missing key 'shape'");
    EXPECT_DICT_FAIL("{}", 24, KMV_EFORMAT, "missing key");
}

static void test_header_length_past_eof(void **state) {
    static const char dict[] = DICT("<f4", "False", "(6,)");
    char path[2048];
    size_t len;
    unsigned char *b = npy_raw(1, 0, dict, sizeof dict - 1, 60000, k_f6, sizeof k_f6, &len);
    (void)state;
    put_file("hlen_past.npy", b, len, path, sizeof path);
    free(b);
    EXPECT_READ_FAIL(path, KMV_EFORMAT, "header length 60000 runs past the end");
    b = npy_raw(2, 0, dict, sizeof dict - 1, 500000, k_f6, sizeof k_f6, &len);
    put_file("hlen_past2.npy", b, len, path, sizeof path);
    free(b);
    EXPECT_READ_FAIL(path, KMV_EFORMAT, "truncated");
}

static void test_header_length_over_limit(void **state) {
    static const char dict[] = DICT("<f4", "False", "(6,)");
    char path[2048];
    size_t len;
    unsigned char *b = npy_raw(2, 0, dict, sizeof dict - 1, 0xffffffffu, k_f6, sizeof k_f6, &len);
    (void)state;
    put_file("hlen_big.npy", b, len, path, sizeof path);
    free(b);
    EXPECT_READ_FAIL(path, KMV_EFORMAT, "exceeds the limit");
}

static void test_bad_magic(void **state) {
    static const unsigned char zip[] = "PK\x03\x04 this is an npz, not an npy file";
    unsigned char bad[128];
    char path[2048];
    size_t len;
    unsigned char *b = npy_image(1, DICT("<f4", "False", "(6,)"), k_f6, sizeof k_f6, &len);
    (void)state;
    memcpy(bad, b, len < sizeof bad ? len : sizeof bad);
    free(b);
    bad[5] = 'X';
    put_file("magic1.npy", bad, sizeof bad, path, sizeof path);
    EXPECT_READ_FAIL(path, KMV_EFORMAT, "bad magic");
    put_file("magic2.npy", zip, sizeof zip - 1, path, sizeof path);
    EXPECT_READ_FAIL(path, KMV_EFORMAT, "bad magic");
    put_file("magic3.npy", "\x93", 1, path, sizeof path);
    EXPECT_READ_FAIL(path, KMV_EFORMAT, "truncated");
    put_file("magic4.npy", "x", 1, path, sizeof path);
    EXPECT_READ_FAIL(path, KMV_EFORMAT, "bad magic");
}

static void test_unsupported_version(void **state) {
    static const char dict[] = DICT("<f4", "False", "(6,)");
    static const unsigned versions[][2] = {{4, 0}, {1, 1}, {0, 0}, {2, 1}, {255, 255}};
    char path[2048], kw[64];
    size_t i, len;
    (void)state;
    for (i = 0; i < sizeof versions / sizeof *versions; i++) {
        unsigned char *b = npy_raw(versions[i][0], versions[i][1], dict, sizeof dict - 1,
                                   sizeof dict - 1, k_f6, sizeof k_f6, &len);
        put_file("version.npy", b, len, path, sizeof path);
        free(b);
        snprintf(kw, sizeof kw, "version %u.%u", versions[i][0], versions[i][1]);
        EXPECT_READ_FAIL(path, KMV_EFORMAT, kw);
    }
}

/* ------------------------------------------------------------------ dtypes */

static void test_f8_conversion(void **state) {
    double in[12] = {0.0, -1.5, 1e-50, 3.0e38, (double)FLT_MAX, -(double)FLT_MAX,
                     1e-40, 0.1, -0.0, 123456789.123, 0, 0};
    char path[2048];
    kmv_array a;
    size_t i;
    (void)state;
    in[10] = NAN;
    in[11] = -INFINITY;
    put_npy("f8.npy", 1, DICT("<f8", "False", "(2, 6)"), in, sizeof in, path, sizeof path);
    read_ok(path, &a);
    assert_int_equal(a.rows, 2);
    assert_int_equal(a.cols, 6);
    for (i = 0; i < 10; i++) {
        float want = (float)in[i];
        assert_memory_equal(&a.data[i], &want, sizeof want);
    }
    assert_true(isnan(a.data[10]));
    assert_true(isinf(a.data[11]) && a.data[11] < 0);
    kmv_array_free(&a);
}

static void test_f8_out_of_range(void **state) {
    double in[3] = {1.0, 2.0, 3.5e38};
    double above;
    uint64_t bits;
    char path[2048];
    (void)state;
    put_npy("f8_range.npy", 1, DICT("<f8", "False", "(3,)"), in, sizeof in, path, sizeof path);
    EXPECT_READ_FAIL(path, KMV_EFORMAT, "out of float32 range at index 2");
    in[0] = -1e300;
    put_npy("f8_range.npy", 1, DICT("<f8", "False", "(3,)"), in, sizeof in, path, sizeof path);
    EXPECT_READ_FAIL(path, KMV_EFORMAT, "out of float32 range at index 0");
    /* The smallest double above FLT_MAX, which float rounding would keep. */
    above = (double)FLT_MAX;
    memcpy(&bits, &above, sizeof bits);
    bits++;
    memcpy(&above, &bits, sizeof bits);
    in[0] = 0.0;
    in[1] = above;
    put_npy("f8_range.npy", 1, DICT("<f8", "False", "(3,)"), in, sizeof in, path, sizeof path);
    EXPECT_READ_FAIL(path, KMV_EFORMAT, "out of float32 range at index 1");
}

static void test_f8_many_chunks(void **state) {
    enum { N = 20000 }; /* 160 kB: several conversion chunks */
    double *in = malloc(N * sizeof *in);
    char path[2048];
    kmv_array a;
    size_t i;
    (void)state;
    assert_non_null(in);
    for (i = 0; i < N; i++) in[i] = (double)i * 0.5 - 1000.0;
    put_npy("f8_big.npy", 1, DICT("<f8", "False", "(100, 200)"), in, N * sizeof *in, path,
            sizeof path);
    read_ok(path, &a);
    assert_int_equal(a.rows, 100);
    assert_int_equal(a.cols, 200);
    for (i = 0; i < N; i++) assert_true(a.data[i] == (float)in[i]);
    kmv_array_free(&a);
    in[19000] = 1e39;
    put_npy("f8_big.npy", 1, DICT("<f8", "False", "(100, 200)"), in, N * sizeof *in, path,
            sizeof path);
    EXPECT_READ_FAIL(path, KMV_EFORMAT, "at index 19000");
    free(in);
}

static void test_fortran_2d_refused(void **state) {
    (void)state;
    EXPECT_DICT_FAIL(DICT("<f4", "True", "(2, 3)"), 24, KMV_EFORMAT, "fortran_order");
}

static void test_fortran_1d_accepted(void **state) {
    char path[2048];
    kmv_array a;
    (void)state;
    put_npy("fortran1.npy", 1, DICT("<f4", "True", "(6,)"), k_f6, sizeof k_f6, path, sizeof path);
    read_ok(path, &a);
    assert_int_equal(a.ndim, 1);
    assert_int_equal(a.rows, 6);
    assert_true(same_bits(a.data, k_f6, 6));
    kmv_array_free(&a);
}

static void test_big_endian_refused(void **state) {
    (void)state;
    EXPECT_DICT_FAIL(DICT(">f4", "False", "(6,)"), 24, KMV_EFORMAT, "big-endian dtype '>f4'");
    EXPECT_DICT_FAIL(DICT(">f8", "False", "(3,)"), 24, KMV_EFORMAT, "big-endian dtype '>f8'");
}

static void test_object_dtype_refused(void **state) {
    (void)state;
    EXPECT_DICT_FAIL(DICT("|O", "False", "(3,)"), 24, KMV_EFORMAT, "object dtype '|O'");
}

static void test_int_dtype_refused(void **state) {
    static const char *dicts[][2] = {
        {DICT("<i4", "False", "(6,)"), "'<i4'"}, {DICT("<i8", "False", "(3,)"), "'<i8'"},
        {DICT("<u4", "False", "(6,)"), "'<u4'"}, {DICT("|u1", "False", "(24,)"), "'|u1'"},
        {DICT("<f2", "False", "(12,)"), "'<f2'"}, {DICT("<c8", "False", "(3,)"), "'<c8'"},
        {DICT("|b1", "False", "(24,)"), "'|b1'"}, {DICT("=f4", "False", "(6,)"), "'=f4'"},
        {DICT("|f4", "False", "(6,)"), "'|f4'"},  {DICT("", "False", "(6,)"), "''"},
    };
    size_t i;
    char kw[64];
    (void)state;
    for (i = 0; i < sizeof dicts / sizeof *dicts; i++) {
        snprintf(kw, sizeof kw, "unsupported dtype %s", dicts[i][1]);
        EXPECT_DICT_FAIL(dicts[i][0], 24, KMV_EFORMAT, kw);
    }
}

static void test_structured_dtype_refused(void **state) {
    (void)state;
    EXPECT_DICT_FAIL("{'descr': [('x', '<f4'), ('y', '<f4')], 'fortran_order': False, "
                     "'shape': (3,), }",
                     24, KMV_EFORMAT, "structured dtype");
}

/* ------------------------------------------------------------------ shapes */

static void test_0d_refused(void **state) {
    (void)state;
    EXPECT_DICT_FAIL(DICT("<f4", "False", "()"), 4, KMV_EFORMAT, "0-D");
}

static void test_3d_refused(void **state) {
    (void)state;
    EXPECT_DICT_FAIL(DICT("<f4", "False", "(1, 2, 3)"), 24, KMV_EFORMAT, "3-D");
    /* Rank is reported even when a dimension also overflows. */
    EXPECT_DICT_FAIL(DICT("<f4", "False", "(1, 2, 99999999999999999999999)"), 24, KMV_EFORMAT,
                     "3-D");
}

static void test_shape_overflow(void **state) {
    (void)state;
    EXPECT_DICT_FAIL(DICT("<f4", "False", "(4611686018427387904, 16)"), 24, KMV_EOVERFLOW,
                     "overflows");
    EXPECT_DICT_FAIL(DICT("<f4", "False", "(4611686018427387904,)"), 24, KMV_EOVERFLOW,
                     "overflows");
    EXPECT_DICT_FAIL(DICT("<f8", "False", "(2305843009213693952, 1)"), 24, KMV_EOVERFLOW,
                     "overflows");
    EXPECT_DICT_FAIL(DICT("<f4", "False", "(99999999999999999999999, 1)"), 24, KMV_EOVERFLOW,
                     "overflows");
    EXPECT_DICT_FAIL(DICT("<f4", "False", "(18446744073709551616,)"), 24, KMV_EOVERFLOW,
                     "overflows");
}

static void test_empty_array(void **state) {
    char path[2048];
    kmv_array a;
    (void)state;
    put_npy("empty.npy", 1, DICT("<f4", "False", "(0, 5)"), NULL, 0, path, sizeof path);
    read_ok(path, &a);
    assert_int_equal(a.ndim, 2);
    assert_int_equal(a.rows, 0);
    assert_int_equal(a.cols, 5);
    assert_null(a.data);
    kmv_array_free(&a);
    put_npy("empty.npy", 1, DICT("<f8", "False", "(0,)"), NULL, 0, path, sizeof path);
    read_ok(path, &a);
    assert_int_equal(a.ndim, 1);
    assert_int_equal(a.rows, 0);
    assert_int_equal(a.cols, 1);
    assert_null(a.data);
    kmv_array_free(&a);
    put_npy("empty.npy", 1, DICT("<f4", "False", "(5, 0)"), NULL, 0, path, sizeof path);
    read_ok(path, &a);
    assert_int_equal(a.rows, 5);
    assert_int_equal(a.cols, 0);
    kmv_array_free(&a);
    put_npy("empty.npy", 1, DICT("<f4", "False", "(0, 5)"), "x", 1, path, sizeof path);
    EXPECT_READ_FAIL(path, KMV_EFORMAT, "trailing bytes");
}

/* ------------------------------------------------------------- file sizes */

static void truncate_all(const unsigned char *b, size_t len, size_t data_start) {
    char path[2048], kw[128];
    size_t cut;
    for (cut = 0; cut < len; cut++) {
        put_file("trunc.npy", b, cut, path, sizeof path);
        if (cut > data_start) {
            snprintf(kw, sizeof kw, "truncated: header says %zu bytes of data, file has %zu",
                     len - data_start, cut - data_start);
            EXPECT_READ_FAIL(path, KMV_EFORMAT, kw);
        } else {
            EXPECT_READ_FAIL(path, KMV_EFORMAT, "truncated");
        }
    }
}

static void test_truncated_every_length(void **state) {
    double d[3] = {1, 2, 3};
    size_t len;
    unsigned char *b;
    (void)state;
    b = npy_image(1, DICT("<f4", "False", "(2, 3)"), k_f6, sizeof k_f6, &len);
    truncate_all(b, len, len - sizeof k_f6);
    free(b);
    b = npy_image(2, DICT("<f4", "False", "(6,)"), k_f6, sizeof k_f6, &len);
    truncate_all(b, len, len - sizeof k_f6);
    free(b);
    b = npy_image(3, DICT("<f8", "False", "(3,)"), d, sizeof d, &len);
    truncate_all(b, len, len - sizeof d);
    free(b);
}

static void test_trailing_bytes(void **state) {
    unsigned char data[24 + 100] = {0};
    char path[2048];
    (void)state;
    put_npy("trail.npy", 1, DICT("<f4", "False", "(2, 3)"), data, 25, path, sizeof path);
    EXPECT_READ_FAIL(path, KMV_EFORMAT, "header says 24 bytes of data but file has 25");
    put_npy("trail.npy", 1, DICT("<f8", "False", "(3,)"), data, sizeof data, path, sizeof path);
    EXPECT_READ_FAIL(path, KMV_EFORMAT, "trailing bytes");
}

/* ------------------------------------------------------------ file errors */

static void test_nonexistent_file(void **state) {
    char path[2048];
    (void)state;
    path_of("does_not_exist.npy", path, sizeof path);
    EXPECT_READ_FAIL(path, KMV_EIO, "cannot open");
}

static void test_directory_input(void **state) {
    (void)state;
    EXPECT_READ_FAIL(g_dir, KMV_EIO, "directory");
}

/* A FIFO has no size up front: checks rely on the reads alone. */
static void read_through_fifo(const unsigned char *b, size_t len, int want, const char *kw,
                              int line) {
    char path[2048];
    pid_t pid;
    int status;
    kmv_array a;
    char err[ERR_LEN];
    int rc;

    path_of("fifo.npy", path, sizeof path);
    unlink(path);
    assert_int_equal(mkfifo(path, 0600), 0);
    pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int fd = open(path, O_WRONLY);
        size_t off = 0;
        signal(SIGPIPE, SIG_IGN);
        while (fd >= 0 && off < len) {
            ssize_t w = write(fd, b + off, len - off);
            if (w <= 0) break;
            off += (size_t)w;
        }
        if (fd >= 0) close(fd);
        _exit(0);
    }
    memset(&a, 0x5a, sizeof a);
    rc = kmv_npy_read(path, NULL, &a, err, sizeof err);
    assert_int_equal(waitpid(pid, &status, 0), pid);
    unlink(path);
    if (want == KMV_OK) {
        if (rc != KMV_OK) fail_msg("line %d: fifo read failed: %s", line, err);
        assert_true(same_bits(a.data, k_f6, 6));
        kmv_array_free(&a);
    } else {
        check_err(rc, want, err, path, kw, line);
        check_zeroed(&a, line);
    }
}

static void test_fifo_input(void **state) {
    unsigned char data[64] = {0};
    double d[6];
    size_t len, i;
    unsigned char *b;
    (void)state;
    b = npy_image(1, DICT("<f4", "False", "(2, 3)"), k_f6, sizeof k_f6, &len);
    read_through_fifo(b, len, KMV_OK, NULL, __LINE__);
    read_through_fifo(b, len - 1, KMV_EFORMAT, "header says 24 bytes of data, file has 23",
                      __LINE__);
    read_through_fifo(b, 40, KMV_EFORMAT, "runs past the end", __LINE__);
    free(b);
    for (i = 0; i < 6; i++) d[i] = (double)k_f6[i];
    b = npy_image(1, DICT("<f8", "False", "(6,)"), d, sizeof d, &len);
    read_through_fifo(b, len, KMV_OK, NULL, __LINE__);
    read_through_fifo(b, len - 9, KMV_EFORMAT, "header says 48 bytes of data, file has 39",
                      __LINE__);
    free(b);
    b = npy_image(1, DICT("<f4", "False", "(2, 3)"), data, 25, &len);
    read_through_fifo(b, len, KMV_EFORMAT, "trailing bytes", __LINE__);
    free(b);
}

static void test_write_missing_dir(void **state) {
    float in[2] = {1, 2};
    char dir[1024], path[2048], err[ERR_LEN];
    struct stat st;
    (void)state;
    path_of("no_such_dir", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/out.npy", dir);
    CHECK_ERR(kmv_npy_write(path, in, 1, 2, 1, err, sizeof err), KMV_EIO, err, path,
              "its directory does not exist");
    assert_int_equal(stat(dir, &st), -1);
    assert_false(dir_has_tmp(g_dir));
}

static void test_write_parent_is_file(void **state) {
    float in[2] = {1, 2};
    char file[1024], path[2048], err[ERR_LEN];
    (void)state;
    put_file("plain_file", "x", 1, file, sizeof file);
    snprintf(path, sizeof path, "%s/out.npy", file);
    CHECK_ERR(kmv_npy_write(path, in, 1, 2, 1, err, sizeof err), KMV_EIO, err, path,
              "not a directory");
    assert_false(dir_has_tmp(g_dir));
}

static void test_write_target_is_directory(void **state) {
    float in[2] = {1, 2};
    char path[2048], err[ERR_LEN];
    struct stat st;
    (void)state;
    path_of("a_dir", path, sizeof path);
    assert_int_equal(mkdir(path, 0755), 0);
    CHECK_ERR(kmv_npy_write(path, in, 1, 2, 1, err, sizeof err), KMV_EIO, err, path,
              "is a directory");
    assert_int_equal(stat(path, &st), 0);
    assert_true(S_ISDIR(st.st_mode));
    assert_false(dir_has_tmp(g_dir));
    assert_int_equal(rmdir(path), 0);
}

/* A file-size limit makes the write itself fail, even for root. */
static void test_write_failure_keeps_old_file(void **state) {
    enum { N = 1000 };
    float old[4] = {4, 3, 2, 1}, *big = calloc(N, sizeof(float));
    char path[2048], err[ERR_LEN];
    struct rlimit saved, lim;
    void (*prev)(int);
    kmv_array a;
    int rc;
    (void)state;
    assert_non_null(big);
    path_of("keep.npy", path, sizeof path);
    assert_int_equal(kmv_npy_write(path, old, 1, 4, 1, err, sizeof err), KMV_OK);
    assert_int_equal(getrlimit(RLIMIT_FSIZE, &saved), 0);
    lim = saved;
    lim.rlim_cur = 1000;
    prev = signal(SIGXFSZ, SIG_IGN);
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);
    rc = kmv_npy_write(path, big, 2, N / 10, 10, err, sizeof err);
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &saved), 0);
    signal(SIGXFSZ, prev);
    CHECK_ERR(rc, KMV_EIO, err, path, "write failed");
    assert_false(dir_has_tmp(g_dir));
    read_ok(path, &a);
    assert_int_equal(a.rows, 4);
    assert_true(same_bits(a.data, old, 4));
    kmv_array_free(&a);
    free(big);
}

/* ----------------------------------------------------- arguments, buffers */

static void test_write_invalid_args(void **state) {
    float in[4] = {1, 2, 3, 4};
    char path[2048], err[ERR_LEN];
    kmv_array a;
    (void)state;
    path_of("args.npy", path, sizeof path);
    assert_int_equal(kmv_npy_write(NULL, in, 1, 4, 1, err, sizeof err), KMV_EINVAL);
    assert_non_null(strstr(err, "path is NULL"));
    CHECK_ERR(kmv_npy_write(path, in, 0, 4, 1, err, sizeof err), KMV_EINVAL, err, path, "ndim");
    CHECK_ERR(kmv_npy_write(path, in, 3, 4, 1, err, sizeof err), KMV_EINVAL, err, path, "ndim");
    CHECK_ERR(kmv_npy_write(path, in, 1, 2, 2, err, sizeof err), KMV_EINVAL, err, path, "cols");
    CHECK_ERR(kmv_npy_write(path, NULL, 2, 2, 2, err, sizeof err), KMV_EINVAL, err, path,
              "data is NULL");
    CHECK_ERR(kmv_npy_write(path, in, 2, SIZE_MAX / 2, 2, err, sizeof err), KMV_EOVERFLOW, err,
              path, "overflows");
    CHECK_ERR(kmv_npy_write(path, in, 2, SIZE_MAX, SIZE_MAX, err, sizeof err), KMV_EOVERFLOW, err,
              path, "overflows");
    assert_int_equal(access(path, F_OK), -1);
    assert_int_equal(kmv_npy_write(path, NULL, 1, 0, 1, err, sizeof err), KMV_OK);
    read_ok(path, &a);
    assert_int_equal(a.ndim, 1);
    assert_int_equal(a.rows, 0);
    kmv_array_free(&a);
}

static void plain_free(void *opaque, void *ptr) {
    (void)opaque;
    free(ptr);
}

static void test_read_invalid_args(void **state) {
    char path[2048], err[ERR_LEN];
    kmv_array a;
    kmv_allocator half = {NULL, NULL, NULL};
    (void)state;
    put_npy("args_r.npy", 1, DICT("<f4", "False", "(6,)"), k_f6, sizeof k_f6, path, sizeof path);
    memset(&a, 0x5a, sizeof a);
    assert_int_equal(kmv_npy_read(NULL, NULL, &a, err, sizeof err), KMV_EINVAL);
    assert_non_null(strstr(err, "path is NULL"));
    check_zeroed(&a, __LINE__);
    CHECK_ERR(kmv_npy_read(path, NULL, NULL, err, sizeof err), KMV_EINVAL, err, path,
              "out is NULL");
    half.free = plain_free;
    memset(&a, 0x5a, sizeof a);
    CHECK_ERR(kmv_npy_read(path, &half, &a, err, sizeof err), KMV_EINVAL, err, path, "allocator");
    check_zeroed(&a, __LINE__);
}

static void test_err_buffer(void **state) {
    char path[2048], err[ERR_LEN], small[8];
    kmv_array a;
    (void)state;
    path_of("missing.npy", path, sizeof path);
    assert_int_equal(kmv_npy_read(path, NULL, &a, NULL, 0), KMV_EIO);
    check_zeroed(&a, __LINE__);
    memset(err, 'z', sizeof err);
    assert_int_equal(kmv_npy_read(path, NULL, &a, err, 0), KMV_EIO);
    assert_int_equal(err[0], 'z');
    memset(small, 'z', sizeof small);
    assert_int_equal(kmv_npy_read(path, NULL, &a, small, sizeof small), KMV_EIO);
    assert_int_equal(strlen(small), sizeof small - 1);
    assert_memory_equal(small, path, sizeof small - 1);
    /* Success leaves an empty message. */
    put_npy("ok.npy", 1, DICT("<f4", "False", "(6,)"), k_f6, sizeof k_f6, path, sizeof path);
    strcpy(err, "stale");
    assert_int_equal(kmv_npy_read(path, NULL, &a, err, sizeof err), KMV_OK);
    assert_string_equal(err, "");
    kmv_array_free(&a);
}

static void test_array_free(void **state) {
    kmv_array a;
    (void)state;
    kmv_array_free(NULL);
    memset(&a, 0, sizeof a);
    kmv_array_free(&a);
    assert_null(a.data);
    /* Default allocator when none is recorded. */
    a.data = malloc(16);
    a.rows = 4;
    a.cols = 1;
    a.ndim = 1;
    kmv_array_free(&a);
    check_zeroed(&a, __LINE__);
}

/* ------------------------------------------------------------- allocation */

typedef struct counting {
    int calls;
    int fail_at; /* 1-based call that returns NULL; 0: never */
    size_t allocs;
    size_t frees;
} counting;

static void *counting_alloc(void *opaque, size_t size) {
    counting *c = opaque;
    if (++c->calls == c->fail_at) return NULL;
    c->allocs++;
    return malloc(size);
}

static void counting_free(void *opaque, void *ptr) {
    counting *c = opaque;
    if (ptr != NULL) c->frees++;
    free(ptr);
}

static void alloc_failures(const char *path, const float *want, size_t count) {
    counting c;
    kmv_allocator al = {counting_alloc, counting_free, &c};
    kmv_array a;
    char err[ERR_LEN];
    int k, rc;
    for (k = 1; k < 100; k++) {
        memset(&c, 0, sizeof c);
        c.fail_at = k;
        memset(&a, 0x5a, sizeof a);
        rc = kmv_npy_read(path, &al, &a, err, sizeof err);
        if (rc == KMV_OK) break;
        check_err(rc, KMV_ENOMEM, err, path, "out of memory", k);
        check_zeroed(&a, k);
        assert_int_equal(c.allocs, c.frees);
    }
    assert_int_equal(rc, KMV_OK);
    assert_true(k > 1);
    assert_true(a.allocator.opaque == &c);
    assert_int_equal(a.rows * a.cols, count);
    assert_true(same_bits(a.data, want, count));
    kmv_array_free(&a);
    check_zeroed(&a, __LINE__);
    assert_int_equal(c.allocs, c.frees);
}

static void test_alloc_failure_f4(void **state) {
    char path[2048];
    (void)state;
    put_npy("alloc4.npy", 1, DICT("<f4", "False", "(2, 3)"), k_f6, sizeof k_f6, path,
            sizeof path);
    alloc_failures(path, k_f6, 6);
}

static void test_alloc_failure_f8(void **state) {
    double d[6];
    char path[2048];
    size_t i;
    (void)state;
    for (i = 0; i < 6; i++) d[i] = (double)k_f6[i];
    put_npy("alloc8.npy", 2, DICT("<f8", "False", "(6,)"), d, sizeof d, path, sizeof path);
    alloc_failures(path, k_f6, 6);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip_1d),
        cmocka_unit_test(test_roundtrip_2d),
        cmocka_unit_test(test_written_header_layout),
        cmocka_unit_test(test_write_mode_follows_umask),
        cmocka_unit_test(test_v2_header),
        cmocka_unit_test(test_v3_header),
        cmocka_unit_test(test_header_variants_accepted),
        cmocka_unit_test(test_header_malformed),
        cmocka_unit_test(test_header_empty),
        cmocka_unit_test(test_header_unterminated_string),
        cmocka_unit_test(test_header_nul_byte),
        cmocka_unit_test(test_header_no_closing_brace),
        cmocka_unit_test(test_header_missing_keys),
        cmocka_unit_test(test_header_length_past_eof),
        cmocka_unit_test(test_header_length_over_limit),
        cmocka_unit_test(test_bad_magic),
        cmocka_unit_test(test_unsupported_version),
        cmocka_unit_test(test_f8_conversion),
        cmocka_unit_test(test_f8_out_of_range),
        cmocka_unit_test(test_f8_many_chunks),
        cmocka_unit_test(test_fortran_2d_refused),
        cmocka_unit_test(test_fortran_1d_accepted),
        cmocka_unit_test(test_big_endian_refused),
        cmocka_unit_test(test_object_dtype_refused),
        cmocka_unit_test(test_int_dtype_refused),
        cmocka_unit_test(test_structured_dtype_refused),
        cmocka_unit_test(test_0d_refused),
        cmocka_unit_test(test_3d_refused),
        cmocka_unit_test(test_shape_overflow),
        cmocka_unit_test(test_empty_array),
        cmocka_unit_test(test_truncated_every_length),
        cmocka_unit_test(test_trailing_bytes),
        cmocka_unit_test(test_nonexistent_file),
        cmocka_unit_test(test_directory_input),
        cmocka_unit_test(test_fifo_input),
        cmocka_unit_test(test_write_missing_dir),
        cmocka_unit_test(test_write_parent_is_file),
        cmocka_unit_test(test_write_target_is_directory),
        cmocka_unit_test(test_write_failure_keeps_old_file),
        cmocka_unit_test(test_write_invalid_args),
        cmocka_unit_test(test_read_invalid_args),
        cmocka_unit_test(test_err_buffer),
        cmocka_unit_test(test_array_free),
        cmocka_unit_test(test_alloc_failure_f4),
        cmocka_unit_test(test_alloc_failure_f8),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
