/* NumPy .npy reading and writing, so data can move between kmv and Python
 * without a conversion step. Header parsing is kept apart from file I/O so
 * that it can be fuzzed on its own. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "common/alloc.h"
#include "common/fileio.h"
#include "common/output.h"
#include "kmv/kmv.h"

/* Floats move between file and memory as raw bytes, which is only right when
 * the host is little-endian like the only dtypes accepted. */
#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__) && \
    __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "kmv/npy.c supports little-endian hosts only"
#endif


#define NPY_MAGIC "\x93NUMPY"
#define NPY_MAGIC_LEN 6
/* numpy never writes headers near this size; the cap keeps a corrupt length
 * field from turning into a huge allocation. */
#define NPY_MAX_HEADER ((size_t)1 << 20)
#define NPY_CHUNK ((size_t)64 * 1024)
#define NPY_ALIGN 64
/* Longest piece of a file's text quoted back in a message. */
#define NPY_SHOWN 32

typedef struct npy_header {
    size_t itemsize; /* 4 for '<f4', 8 for '<f8' */
    int fortran_order;
    int ndim; /* 1 or 2 */
    size_t shape[2];
} npy_header;

typedef struct cursor {
    const char *buf;
    size_t len;
    size_t pos;
} cursor;

enum { KEY_DESCR = 1, KEY_FORTRAN = 2, KEY_SHAPE = 4 };

/* ------------------------------------------------------------ messages */

/* Messages are formatted in place, never allocated, so they still work after
 * an allocation has failed. */

static int say(char *why, size_t why_len, int code, const char *fmt, ...) KMV__PRINTF(4, 5);

static int say(char *why, size_t why_len, int code, const char *fmt, ...) {
    va_list ap;
    if (why != NULL && why_len > 0) {
        va_start(ap, fmt);
        vsnprintf(why, why_len, fmt, ap);
        va_end(ap);
    }
    return code;
}

static int shown(size_t n) { return (int)(n < NPY_SHOWN ? n : NPY_SHOWN); }

/* -------------------------------------------------------- header parsing */

static int at_end(const cursor *c) { return c->pos >= c->len; }

static int peek(const cursor *c) { return at_end(c) ? -1 : (unsigned char)c->buf[c->pos]; }

static int is_digit(int ch) { return ch >= '0' && ch <= '9'; }

static int is_ident(int ch) {
    return is_digit(ch) || ch == '_' || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z');
}

/* Python's whitespace set: the header is a Python literal, not JSON. */
static void skip_ws(cursor *c) {
    for (;;) {
        int ch = peek(c);
        if (ch != ' ' && ch != '\t' && ch != '\n' && ch != '\r' && ch != '\f' && ch != '\v') return;
        c->pos++;
    }
}

static int unexpected(const cursor *c, const char *wanted, char *why, size_t why_len) {
    int ch = peek(c);
    if (ch < 0)
        return say(why, why_len, KMV_EFORMAT,
                   "malformed header: dict is cut short (no closing '}'); expected %s", wanted);
    if (ch >= 0x20 && ch < 0x7f)
        return say(why, why_len, KMV_EFORMAT,
                   "malformed header: expected %s at offset %zu, found '%c'", wanted, c->pos, ch);
    return say(why, why_len, KMV_EFORMAT,
               "malformed header: expected %s at offset %zu, found byte 0x%02x", wanted, c->pos,
               (unsigned)ch);
}

static int expect(cursor *c, int ch, const char *wanted, char *why, size_t why_len) {
    skip_ws(c);
    if (peek(c) != ch) return unexpected(c, wanted, why, why_len);
    c->pos++;
    return KMV_OK;
}

/* A Python string literal without prefixes or escapes: numpy's keys and
 * the dtypes accepted here never need them. */
static int parse_string(cursor *c, const char **s, size_t *n, char *why, size_t why_len) {
    int q = peek(c);
    size_t start;
    if (q != '\'' && q != '"') return unexpected(c, "a quoted string", why, why_len);
    start = ++c->pos;
    for (;;) {
        int ch = peek(c);
        if (ch < 0)
            return say(why, why_len, KMV_EFORMAT,
                       "malformed header: unterminated string at offset %zu", start - 1);
        if (ch == q) break;
        if (ch == '\\')
            return say(why, why_len, KMV_EFORMAT,
                       "malformed header: escape sequence in a string at offset %zu", c->pos);
        if (ch < 0x20 || ch >= 0x7f)
            return say(why, why_len, KMV_EFORMAT,
                       "malformed header: non-ASCII or control byte 0x%02x in a string at offset %zu",
                       (unsigned)ch, c->pos);
        c->pos++;
    }
    *s = c->buf + start;
    *n = c->pos - start;
    c->pos++;
    return KMV_OK;
}

static int same(const char *s, size_t n, const char *lit) {
    return n == strlen(lit) && memcmp(s, lit, n) == 0;
}

static int parse_descr(cursor *c, npy_header *h, char *why, size_t why_len) {
    const char *s;
    size_t n;
    int rc;
    if (peek(c) == '[')
        return say(why, why_len, KMV_EFORMAT,
                   "structured dtype (descr is a list) is not supported; only '<f4' and '<f8' are");
    if ((rc = parse_string(c, &s, &n, why, why_len)) != KMV_OK) return rc;
    if (same(s, n, "<f4")) {
        h->itemsize = 4;
    } else if (same(s, n, "<f8")) {
        h->itemsize = 8;
    } else if (n > 0 && s[0] == '>') {
        return say(why, why_len, KMV_EFORMAT,
                   "big-endian dtype '%.*s' is not supported; only little-endian '<f4' and '<f8' are",
                   shown(n), s);
    } else if (same(s, n, "|O") || same(s, n, "O")) {
        return say(why, why_len, KMV_EFORMAT,
                   "object dtype '%.*s' is not supported; only '<f4' and '<f8' are", shown(n), s);
    } else {
        return say(why, why_len, KMV_EFORMAT,
                   "unsupported dtype '%.*s'; only '<f4' and '<f8' are supported", shown(n), s);
    }
    return KMV_OK;
}

static int parse_bool(cursor *c, int *v, char *why, size_t why_len) {
    size_t start = c->pos;
    /* Take the whole word, so that "Falsey" is not read as False. */
    while (is_ident(peek(c))) c->pos++;
    if (same(c->buf + start, c->pos - start, "True")) {
        *v = 1;
    } else if (same(c->buf + start, c->pos - start, "False")) {
        *v = 0;
    } else {
        c->pos = start;
        return unexpected(c, "True or False for 'fortran_order'", why, why_len);
    }
    return KMV_OK;
}

/* Overflow is recorded, not returned, so that a rank error in the same
 * shape is still reported as the format problem it is. */
static int parse_dim(cursor *c, size_t *v, int *overflow, char *why, size_t why_len) {
    size_t x = 0;
    if (peek(c) == '-')
        return say(why, why_len, KMV_EFORMAT, "malformed header: negative dimension in 'shape'");
    if (!is_digit(peek(c))) return unexpected(c, "a dimension in 'shape'", why, why_len);
    while (is_digit(peek(c))) {
        size_t d = (size_t)(peek(c) - '0');
        if (x > (SIZE_MAX - d) / 10)
            *overflow = 1;
        else
            x = x * 10 + d;
        c->pos++;
    }
    /* Python 2 wrote longs as 3L; numpy still reads such files. */
    if (peek(c) == 'L' || peek(c) == 'l') c->pos++;
    *v = x;
    return KMV_OK;
}

static int parse_shape(cursor *c, npy_header *h, size_t *ndim, int *overflow, char *why,
                       size_t why_len) {
    int rc;
    *ndim = 0;
    if (peek(c) != '(') return unexpected(c, "a tuple for 'shape'", why, why_len);
    c->pos++;
    skip_ws(c);
    if (peek(c) == ')') {
        c->pos++;
        return KMV_OK;
    }
    for (;;) {
        size_t d = 0;
        if ((rc = parse_dim(c, &d, overflow, why, why_len)) != KMV_OK) return rc;
        if (*ndim < 2) h->shape[*ndim] = d;
        ++*ndim;
        skip_ws(c);
        if (peek(c) == ',') {
            c->pos++;
            skip_ws(c);
            if (peek(c) == ')') break;
            continue;
        }
        if (peek(c) == ')' && *ndim > 1) break;
        /* In Python (5) is the integer 5, not a tuple, and numpy refuses it. */
        if (peek(c) == ')')
            return say(why, why_len, KMV_EFORMAT,
                       "malformed header: 'shape' (n) is not a tuple; a 1-D shape is (n,)");
        return unexpected(c, "',' or ')' in 'shape'", why, why_len);
    }
    c->pos++;
    return KMV_OK;
}

static unsigned key_bit(const char *s, size_t n) {
    if (same(s, n, "descr")) return KEY_DESCR;
    if (same(s, n, "fortran_order")) return KEY_FORTRAN;
    if (same(s, n, "shape")) return KEY_SHAPE;
    return 0;
}

/* Parse the header dict buf[0..len) (the bytes after the length field).
 * Returns KMV_OK, KMV_EFORMAT or KMV_EOVERFLOW, with the reason in why.
 * Never reads outside buf and needs no terminating NUL. */
static int parse_header(const char *buf, size_t len, npy_header *h, char *why, size_t why_len) {
    cursor c;
    unsigned seen = 0;
    size_t ndim = 0;
    int overflow = 0;
    int rc;

    c.buf = buf;
    c.len = len;
    c.pos = 0;
    memset(h, 0, sizeof *h);
    if ((rc = expect(&c, '{', "'{' opening the header dict", why, why_len)) != KMV_OK) return rc;
    for (;;) {
        const char *key;
        size_t klen;
        unsigned bit;

        skip_ws(&c);
        if (peek(&c) == '}') break;
        if ((rc = parse_string(&c, &key, &klen, why, why_len)) != KMV_OK) return rc;
        bit = key_bit(key, klen);
        if (bit == 0)
            return say(why, why_len, KMV_EFORMAT, "malformed header: unknown key '%.*s'",
                       shown(klen), key);
        if (seen & bit)
            return say(why, why_len, KMV_EFORMAT, "malformed header: duplicate key '%.*s'",
                       shown(klen), key);
        seen |= bit;
        if ((rc = expect(&c, ':', "':' after a key", why, why_len)) != KMV_OK) return rc;
        skip_ws(&c);
        if (bit == KEY_DESCR)
            rc = parse_descr(&c, h, why, why_len);
        else if (bit == KEY_FORTRAN)
            rc = parse_bool(&c, &h->fortran_order, why, why_len);
        else
            rc = parse_shape(&c, h, &ndim, &overflow, why, why_len);
        if (rc != KMV_OK) return rc;
        skip_ws(&c);
        if (peek(&c) == ',') {
            c.pos++;
            continue;
        }
        if (peek(&c) == '}') break;
        return unexpected(&c, "',' or '}' after a value", why, why_len);
    }
    c.pos++;
    /* numpy pads with spaces and a final '\n'; anything else is not ours. */
    skip_ws(&c);
    if (!at_end(&c)) return unexpected(&c, "only padding after the header dict", why, why_len);

    if (!(seen & KEY_DESCR))
        return say(why, why_len, KMV_EFORMAT, "malformed header: missing key 'descr'");
    if (!(seen & KEY_FORTRAN))
        return say(why, why_len, KMV_EFORMAT, "malformed header: missing key 'fortran_order'");
    if (!(seen & KEY_SHAPE))
        return say(why, why_len, KMV_EFORMAT, "malformed header: missing key 'shape'");
    /* Rank before overflow: a huge dimension in a 3-D shape is still a file
     * we cannot read, whatever its size. */
    if (ndim == 0)
        return say(why, why_len, KMV_EFORMAT,
                   "0-D (scalar) arrays are not supported; only 1-D and 2-D are");
    if (ndim > 2)
        return say(why, why_len, KMV_EFORMAT,
                   "%zu-D arrays are not supported; only 1-D and 2-D are", ndim);
    if (overflow)
        return say(why, why_len, KMV_EOVERFLOW, "a dimension in 'shape' overflows size_t");
    if (h->fortran_order && ndim == 2)
        return say(why, why_len, KMV_EFORMAT,
                   "fortran_order (column-major) 2-D arrays are not supported; save in C order");
    h->ndim = (int)ndim;
    /* n reads as n x 1 so callers can treat every array as a matrix. */
    if (ndim == 1) h->shape[1] = 1;
    return KMV_OK;
}

/* ------------------------------------------------------------- reading */

/* read(2) may stop short on pipes, signals and large counts: loop until n
 * bytes or end of file. Returns -1 with errno set on a read error. */
static int truncated_data(char *err, size_t err_len, const char *path, size_t want,
                          uintmax_t have) {
    return kmv__file_error(err, err_len, path, KMV_EFORMAT,
                "truncated: header says %zu bytes of data, file has %ju", want, have);
}

static int read_f4(int fd, const char *path, float *data, size_t nbytes, char *err,
                   size_t err_len) {
    size_t got;
    if (kmv__read_full(fd, data, nbytes, &got) != 0)
        return kmv__file_error(err, err_len, path, KMV_EIO, "read error: %s", strerror(errno));
    if (got < nbytes) return truncated_data(err, err_len, path, nbytes, got);
    return KMV_OK;
}

/* Converts through a bounded buffer so a float64 file never needs a second
 * full-size copy. */
static int read_f8(int fd, const char *path, const kmv_allocator *a, float *data, size_t nbytes,
                   char *err, size_t err_len) {
    size_t cap = nbytes < NPY_CHUNK ? nbytes : NPY_CHUNK;
    unsigned char *buf = kmv__malloc(a, cap);
    size_t done = 0, idx = 0;
    int rc = KMV_OK;

    if (buf == NULL)
        return kmv__file_error(err, err_len, path, KMV_ENOMEM,
                    "out of memory (%zu bytes for float64 conversion)", cap);
    while (done < nbytes) {
        size_t want = nbytes - done < cap ? nbytes - done : cap;
        size_t got, j;
        if (kmv__read_full(fd, buf, want, &got) != 0) {
            rc = kmv__file_error(err, err_len, path, KMV_EIO, "read error: %s", strerror(errno));
            break;
        }
        if (got < want) {
            rc = truncated_data(err, err_len, path, nbytes, done + got);
            break;
        }
        for (j = 0; j < got; j += 8, idx++) {
            double v;
            memcpy(&v, buf + j, sizeof v);
            /* Rounding to infinity would hide the problem; NaN and infinity
             * themselves are the caller's to check, as for float32 files. */
            if (isfinite(v) && (v > (double)FLT_MAX || v < -(double)FLT_MAX)) {
                rc = kmv__file_error(err, err_len, path, KMV_EFORMAT,
                          "value %g out of float32 range at index %zu", v, idx);
                break;
            }
            data[idx] = (float)v;
        }
        if (rc != KMV_OK) break;
        done += got;
    }
    kmv__free(a, buf);
    return rc;
}

/* The file being read, for the messages that name it. */
typedef struct src {
    int fd;
    const char *path;
    char *err;
    size_t err_len;
    int regular;     /* a regular file, whose size can be trusted up front */
    uintmax_t fsize; /* its size */
} src;

static int read_error(const src *f) {
    return kmv__file_error(f->err, f->err_len, f->path, KMV_EIO, "read error: %s", strerror(errno));
}

/* The magic, the version and the header's length; *hend is where the data
 * start. */
static int read_preamble(const src *f, size_t *hlen, size_t *hend) {
    unsigned char pre[12];
    size_t got;
    if (kmv__read_full(f->fd, pre, 8, &got) != 0) return read_error(f);
    /* Comparing only what was read tells a cut-short .npy from another
     * kind of file. */
    if (memcmp(pre, NPY_MAGIC, got < NPY_MAGIC_LEN ? got : NPY_MAGIC_LEN) != 0)
        return kmv__file_error(f->err, f->err_len, f->path, KMV_EFORMAT, "not a .npy file (bad magic)");
    if (got < 8)
        return kmv__file_error(f->err, f->err_len, f->path, KMV_EFORMAT,
                    "truncated: file ends inside the .npy preamble (%zu bytes)", got);
    unsigned major = pre[6], minor = pre[7];
    if (major < 1 || major > 3 || minor != 0)
        return kmv__file_error(f->err, f->err_len, f->path, KMV_EFORMAT,
                    "unsupported .npy format version %u.%u; only 1.0, 2.0 and 3.0 are", major,
                    minor);
    size_t lenbytes = major == 1 ? 2 : 4;
    if (kmv__read_full(f->fd, pre + 8, lenbytes, &got) != 0) return read_error(f);
    if (got < lenbytes)
        return kmv__file_error(f->err, f->err_len, f->path, KMV_EFORMAT,
                    "truncated: file ends inside the .npy preamble (%zu bytes)", 8 + got);
    *hlen = (size_t)pre[8] | (size_t)pre[9] << 8;
    if (lenbytes == 4) *hlen |= (size_t)pre[10] << 16 | (size_t)pre[11] << 24;
    if (*hlen > NPY_MAX_HEADER)
        return kmv__file_error(f->err, f->err_len, f->path, KMV_EFORMAT,
                    "header length %zu exceeds the limit of %zu bytes", *hlen, NPY_MAX_HEADER);
    *hend = 8 + lenbytes + *hlen;
    /* Sizes are checked before anything is allocated, so a corrupt length
     * or shape is reported as such rather than as KMV_ENOMEM. */
    if (f->regular && f->fsize < *hend)
        return kmv__file_error(f->err, f->err_len, f->path, KMV_EFORMAT,
                    "truncated: header length %zu runs past the end of the file (%ju bytes)", *hlen,
                    f->fsize);
    if (*hlen == 0)
        return kmv__file_error(f->err, f->err_len, f->path, KMV_EFORMAT, "malformed header: it is empty");
    return KMV_OK;
}

/* The header dictionary (hlen bytes, ending at hend) into *h. */
static int read_header(const src *f, const kmv_allocator *a, size_t hlen, size_t hend,
                       npy_header *h) {
    char why[256];
    size_t got;
    /* Up to NPY_MAX_HEADER: too big for the stack. */
    char *hbuf = kmv__malloc(a, hlen);
    if (hbuf == NULL)
        return kmv__file_error(f->err, f->err_len, f->path, KMV_ENOMEM,
                               "out of memory (%zu bytes for the header)", hlen);
    int rc;
    if (kmv__read_full(f->fd, hbuf, hlen, &got) != 0) {
        rc = read_error(f);
    } else if (got < hlen) {
        rc = kmv__file_error(f->err, f->err_len, f->path, KMV_EFORMAT,
                  "truncated: header length %zu runs past the end of the file (%zu bytes)", hlen,
                  hend - hlen + got);
    } else {
        rc = parse_header(hbuf, hlen, h, why, sizeof why);
        if (rc != KMV_OK) rc = kmv__file_error(f->err, f->err_len, f->path, rc, "%s", why);
    }
    kmv__free(a, hbuf);
    return rc;
}

/* The data the header describes, and nothing after them. */
static int read_data(const src *f, const kmv_allocator *a, const npy_header *h, size_t hend,
                     float **out) {
    size_t count, nbytes, got;
    unsigned char probe;
    int rc = KMV_OK;
    *out = NULL;
    if (!kmv__mul_size(h->shape[0], h->shape[1], &count) ||
        !kmv__mul_size(count, h->itemsize, &nbytes))
        return kmv__file_error(f->err, f->err_len, f->path, KMV_EOVERFLOW,
                    "size of shape (%zu, %zu) with %zu-byte items overflows size_t", h->shape[0],
                    h->shape[1], h->itemsize);
    if (f->regular && f->fsize - hend < nbytes)
        return truncated_data(f->err, f->err_len, f->path, nbytes, f->fsize - hend);
    if (f->regular && f->fsize - hend > nbytes)
        return kmv__file_error(f->err, f->err_len, f->path, KMV_EFORMAT,
                    "header says %zu bytes of data but file has %ju (trailing bytes)", nbytes,
                    f->fsize - hend);
    float *data = NULL;
    if (count > 0) {
        data = kmv__malloc_array(a, count, sizeof *data);
        if (data == NULL)
            return kmv__file_error(f->err, f->err_len, f->path, KMV_ENOMEM,
                                   "out of memory (%zu floats for the data)", count);
        rc = h->itemsize == 4 ? read_f4(f->fd, f->path, data, nbytes, f->err, f->err_len)
                              : read_f8(f->fd, f->path, a, data, nbytes, f->err, f->err_len);
    }
    /* Catches trailing bytes the size check cannot see: a pipe, or a file
     * that grew after fstat. */
    if (rc == KMV_OK && (kmv__read_full(f->fd, &probe, 1, &got) != 0 || got != 0))
        rc = got != 0 ? kmv__file_error(f->err, f->err_len, f->path, KMV_EFORMAT,
                             "header says %zu bytes of data but file has more (trailing bytes)",
                             nbytes)
                      : read_error(f);
    if (rc != KMV_OK) {
        kmv__free(a, data);
        return rc;
    }
    *out = data;
    return KMV_OK;
}

static int read_fd(int fd, const char *path, const kmv_allocator *a, kmv_array *out, char *err,
                   size_t err_len) {
    struct stat st;
    if (fstat(fd, &st) != 0)
        return kmv__file_error(err, err_len, path, KMV_EIO, "cannot stat: %s", strerror(errno));
    if (S_ISDIR(st.st_mode)) return kmv__file_error(err, err_len, path, KMV_EIO, "is a directory");
    /* Only a regular file's size can be trusted up front; pipes and devices
     * are checked by reading alone. */
    int regular = S_ISREG(st.st_mode) && st.st_size >= 0;
    src f = {fd, path, err, err_len, regular, regular ? (uintmax_t)st.st_size : 0};
    size_t hlen = 0, hend = 0;
    npy_header h;
    float *data = NULL;
    int rc = read_preamble(&f, &hlen, &hend);
    if (rc == KMV_OK) rc = read_header(&f, a, hlen, hend, &h);
    if (rc == KMV_OK) rc = read_data(&f, a, &h, hend, &data);
    if (rc != KMV_OK) return rc;
    out->data = data;
    out->rows = h.shape[0];
    out->cols = h.shape[1];
    out->ndim = h.ndim;
    out->allocator = *a;
    return KMV_OK;
}

int kmv_npy_read(const char *path, const kmv_allocator *alloc, kmv_array *out, char *err,
                 size_t err_len) {
    kmv_allocator a;
    int fd, rc;

    if (err != NULL && err_len > 0) err[0] = '\0';
    if (out != NULL) memset(out, 0, sizeof *out);
    if (path == NULL) return kmv__file_error(err, err_len, path, KMV_EINVAL, "path is NULL");
    if (out == NULL) return kmv__file_error(err, err_len, path, KMV_EINVAL, "out is NULL");
    if (kmv__allocator_resolve(alloc, &a) != KMV_OK)
        return kmv__file_error(err, err_len, path, KMV_EINVAL,
                    "allocator must set both alloc and free, or neither");
    /* O_CLOEXEC: a host that forks and execs concurrently must not leak the
     * descriptor into the child. */
    do {
        fd = open(path, O_RDONLY | O_CLOEXEC);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) return kmv__file_error(err, err_len, path, KMV_EIO, "cannot open: %s", strerror(errno));
    rc = read_fd(fd, path, &a, out, err, err_len);
    close(fd); /* read-only: a close error cannot lose data */
    return rc;
}

void kmv_array_free(kmv_array *a) {
    kmv_allocator al;
    if (a == NULL) return;
    /* A hand-made array with a half-set allocator leaks rather than handing
     * the block to a free that did not allocate it. */
    if (a->data != NULL && kmv__allocator_resolve(&a->allocator, &al) == KMV_OK)
        kmv__free(&al, a->data);
    memset(a, 0, sizeof *a);
}

/* ------------------------------------------------------------- writing */

/* Magic, version 1.0, length and dict, padded with spaces to NPY_ALIGN as
 * numpy does so the data can be memory-mapped aligned. Returns its length;
 * cap must hold two 20-digit dimensions. */
static size_t npy_preamble(unsigned char *buf, size_t cap, int ndim, size_t rows, size_t cols) {
    char *dict = (char *)buf + 10;
    size_t dlen, total, hlen;
    int n;

    if (ndim == 1)
        n = snprintf(dict, cap - 10, "{'descr': '<f4', 'fortran_order': False, 'shape': (%zu,), }",
                     rows);
    else
        n = snprintf(dict, cap - 10,
                     "{'descr': '<f4', 'fortran_order': False, 'shape': (%zu, %zu), }", rows,
                     cols);
    dlen = (size_t)n;
    total = (10 + dlen + 1 + NPY_ALIGN - 1) / NPY_ALIGN * NPY_ALIGN;
    hlen = total - 10;
    memcpy(buf, NPY_MAGIC, NPY_MAGIC_LEN);
    buf[6] = 1;
    buf[7] = 0;
    buf[8] = (unsigned char)(hlen & 0xffu);
    buf[9] = (unsigned char)(hlen >> 8);
    memset(buf + 10 + dlen, ' ', total - 1 - 10 - dlen);
    buf[total - 1] = '\n';
    return total;
}

/* The preamble and the byte count of an array, after checking its shape;
 * path only names the file in messages. */
static int npy_frame(const char *path, const float *data, int ndim, size_t rows, size_t cols,
                     unsigned char *pre, size_t cap, kmv__part parts[2], char *err,
                     size_t err_len) {
    size_t count, nbytes;
    if (ndim != 1 && ndim != 2)
        return kmv__file_error(err, err_len, path, KMV_EINVAL, "ndim must be 1 or 2, not %d", ndim);
    if (ndim == 1 && cols != 1)
        return kmv__file_error(err, err_len, path, KMV_EINVAL, "a 1-D array needs cols = 1, not %zu", cols);
    if (!kmv__mul_size(rows, cols, &count) || !kmv__mul_size(count, sizeof(float), &nbytes))
        return kmv__file_error(err, err_len, path, KMV_EOVERFLOW, "shape (%zu, %zu) overflows size_t",
                               rows, cols);
    if (data == NULL && nbytes > 0) return kmv__file_error(err, err_len, path, KMV_EINVAL, "data is NULL");
    parts[0] = (kmv__part){pre, npy_preamble(pre, cap, ndim, rows, cols)};
    parts[1] = (kmv__part){data, nbytes};
    return KMV_OK;
}

int kmv_npy_write(const char *path, const float *data, int ndim, size_t rows, size_t cols,
                  char *err, size_t err_len) {
    unsigned char pre[256];
    kmv__part parts[2];
    if (err != NULL && err_len > 0) err[0] = '\0';
    if (path == NULL) return kmv__file_error(err, err_len, path, KMV_EINVAL, "path is NULL");
    int rc = npy_frame(path, data, ndim, rows, cols, pre, sizeof pre, parts, err, err_len);
    if (rc != KMV_OK) return rc;
    return kmv__write_parts(path, NULL, parts, 2, err, err_len);
}

int kmv_npy_write_output(kmv_output *o, const float *data, int ndim, size_t rows, size_t cols,
                         char *err, size_t err_len) {
    unsigned char pre[256];
    kmv__part parts[2];
    if (err != NULL && err_len > 0) err[0] = '\0';
    if (o == NULL) return kmv__file_error(err, err_len, NULL, KMV_EINVAL, "output is NULL");
    int rc = npy_frame(NULL, data, ndim, rows, cols, pre, sizeof pre, parts, err, err_len);
    for (int u = 0; rc == KMV_OK && u < 2; u++)
        rc = kmv_output_write(o, parts[u].data, parts[u].len, err, err_len);
    return rc;
}
