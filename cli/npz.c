/* .npz archives; see npz.h. The ZIP layout (APPNOTE 4.3): per entry a
 * local header and the bytes, then the central directory and its end
 * record; every entry "stored" (method 0), so np.load reads it as is. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "cli/npz.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

/* Little-endian fields into a growing buffer. */
typedef struct buf {
    unsigned char *p;
    size_t len, cap;
    int failed;
} buf;

static void put(buf *b, const void *src, size_t n) {
    if (b->failed || n == 0) return;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n) cap *= 2;
        unsigned char *p = realloc(b->p, cap);
        if (p == NULL) {
            b->failed = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, src, n);
    b->len += n;
}

static void u16(buf *b, unsigned v) {
    unsigned char x[2] = {(unsigned char)v, (unsigned char)(v >> 8)};
    put(b, x, 2);
}

static void u32(buf *b, uint32_t v) {
    unsigned char x[4] = {(unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16),
                          (unsigned char)(v >> 24)};
    put(b, x, 4);
}

/* The .npy v1.0 header for a float32 array of this shape, padded so the
 * data starts at a multiple of 64 bytes. */
size_t npy_header(const char *descr, const size_t *shape, int ndim, char *h, size_t cap) {
    char dims[128];
    size_t at = 0;
    dims[0] = '\0';
    for (int u = 0; u < ndim && at < sizeof dims; u++)
        at += (size_t)snprintf(dims + at, sizeof dims - at, u == 0 ? "%zu" : ", %zu", shape[u]);
    if (ndim == 1 && at < sizeof dims) snprintf(dims + at, sizeof dims - at, ",");
    char dict[256];
    int dl = snprintf(dict, sizeof dict, "{'descr': '%s', 'fortran_order': False, 'shape': (%s), }",
                      descr, dims);
    size_t total = 10 + (size_t)dl + 1, pad = (64 - total % 64) % 64;
    if (total + pad > cap) return 0;
    memcpy(h, "\x93NUMPY\x01\x00", 8);
    size_t hl = (size_t)dl + pad + 1;
    h[8] = (char)(hl & 0xff);
    h[9] = (char)(hl >> 8);
    memcpy(h + 10, dict, (size_t)dl);
    memset(h + 10 + dl, ' ', pad);
    h[10 + (size_t)dl + pad] = '\n';
    return total + pad;
}

int npz_build(const npz_entry *e, size_t n, unsigned char **out, size_t *len) {
    buf b = {0}, cd = {0};
    for (size_t i = 0; i < n; i++) {
        char name[256], h[512];
        int nl = snprintf(name, sizeof name, "%s.npy", e[i].name);
        size_t hl = npy_header("<f4", e[i].shape, e[i].ndim, h, sizeof h), count = 1;
        for (int u = 0; u < e[i].ndim; u++) count *= e[i].shape[u];
        size_t bytes = hl + count * sizeof(float);
        /* Offsets and sizes are 32-bit: the whole archive, headers and
         * directory included, must stay below 4 GB. */
        size_t after = 30 + (size_t)nl + bytes + (46 + (size_t)nl) * (n - i) + 22;
        if (hl == 0 || nl <= 0 || (size_t)nl >= sizeof name || n > 0xFFFF ||
            after > 0xFFFFFFFFu - b.len - cd.len) {
            free(b.p);
            free(cd.p);
            return -2;
        }
        uLong crc = crc32(0L, Z_NULL, 0);
        crc = crc32(crc, (const Bytef *)h, (uInt)hl);
        crc = crc32(crc, (const Bytef *)e[i].data, (uInt)(count * sizeof(float)));
        uint32_t off = (uint32_t)b.len;
        /* Local header: version 2.0, no flags, stored, 1980-01-01 00:00. */
        u32(&b, 0x04034b50u), u16(&b, 20), u16(&b, 0), u16(&b, 0), u16(&b, 0), u16(&b, 0x21);
        u32(&b, (uint32_t)crc), u32(&b, (uint32_t)bytes), u32(&b, (uint32_t)bytes);
        u16(&b, (unsigned)nl), u16(&b, 0);
        put(&b, name, (size_t)nl);
        put(&b, h, hl);
        put(&b, e[i].data, count * sizeof(float));
        u32(&cd, 0x02014b50u), u16(&cd, 20), u16(&cd, 20), u16(&cd, 0), u16(&cd, 0), u16(&cd, 0);
        u16(&cd, 0x21), u32(&cd, (uint32_t)crc), u32(&cd, (uint32_t)bytes), u32(&cd, (uint32_t)bytes);
        u16(&cd, (unsigned)nl), u16(&cd, 0), u16(&cd, 0), u16(&cd, 0), u16(&cd, 0), u32(&cd, 0);
        u32(&cd, off);
        put(&cd, name, (size_t)nl);
    }
    uint32_t cd_off = (uint32_t)b.len;
    put(&b, cd.p, cd.len);
    u32(&b, 0x06054b50u), u16(&b, 0), u16(&b, 0), u16(&b, (unsigned)n), u16(&b, (unsigned)n);
    u32(&b, (uint32_t)cd.len), u32(&b, cd_off), u16(&b, 0);
    free(cd.p);
    if (b.failed || cd.failed) {
        free(b.p);
        return -1;
    }
    *out = b.p;
    *len = b.len;
    return 0;
}
