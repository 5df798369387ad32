/* The vectorized exp behind every kernel evaluation.
 *
 * The exp is Cephes' expf (range reduction by ln 2 split in two parts, a
 * degree-6 polynomial, exponent bits set directly), written without branches
 * so that `omp simd` turns each row loop into vector code. The row functions
 * are compiled once per instruction set and picked at load time
 * (target_clones), so one binary uses AVX-512 or AVX2 where the CPU has it
 * and SSE2 elsewhere, without -march flags that would tie it to one machine.
 */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "algo/kernel.h"

#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__) && !defined(KMV_NO_CLONES)
#define KMV_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KMV_CLONES
#endif

/* Below this, expf is subnormal; kernel sums never notice the difference
 * from 0 and flushing keeps the exponent arithmetic in range. */
#define KMV_EXP_MIN (-87.33654f)

static inline float exp_nonpos(float x) {
    union {
        int32_t i;
        float f;
    } scale;
    /* NaN (an overflowed distance: inf - inf) takes the clamp too, so the
     * integer conversion below stays defined, and comes out as NaN, which
     * the callers' output check reports. */
    float xc = x >= KMV_EXP_MIN ? x : KMV_EXP_MIN;
    xc = xc > 0.0f ? 0.0f : xc;
    /* Round x / ln 2 to the nearest integer with the 1.5 * 2^23 trick; it
     * vectorizes where lrintf does not. */
    float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    /* ln 2 in two parts so r is exact to float precision. */
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    scale.i = ((int32_t)n + 127) << 23;
    float e = p * scale.f;
    return x >= KMV_EXP_MIN ? e : x < KMV_EXP_MIN ? 0.0f : x;
}

float kmv__expf(float x) { return exp_nonpos(x); }

KMV_CLONES
float kmv__gauss_row(float *s, size_t len, float qn, const float *kn, float c,
                     const float *x) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (size_t j = 0; j < len; j++) {
        float d2 = qn + kn[j] - 2.0f * s[j];
        float e = exp_nonpos(-(d2 > 0.0f ? d2 : 0.0f) * c);
        s[j] = e;
        acc += e * x[j];
    }
    return acc;
}

KMV_CLONES
void kmv__gauss_row_exp(float *s, size_t len, float qn, const float *kn, float c) {
#pragma omp simd
    for (size_t j = 0; j < len; j++) {
        float d2 = qn + kn[j] - 2.0f * s[j];
        s[j] = exp_nonpos(-(d2 > 0.0f ? d2 : 0.0f) * c);
    }
}

KMV_CLONES
float kmv__gauss_row_dist(float *t, size_t len, float c, const float *x) {
    float acc = 0.0f;
    if (x == NULL) {
#pragma omp simd
        for (size_t j = 0; j < len; j++) t[j] = exp_nonpos(-(t[j] > 0.0f ? t[j] : 0.0f) * c);
        return 0.0f;
    }
#pragma omp simd reduction(+ : acc)
    for (size_t j = 0; j < len; j++) {
        float e = exp_nonpos(-(t[j] > 0.0f ? t[j] : 0.0f) * c);
        t[j] = e;
        acc += e * x[j];
    }
    return acc;
}

KMV_CLONES
float kmv__row_max(const float *s, size_t len) {
    float m = s[0];
#pragma omp simd reduction(max : m)
    for (size_t j = 1; j < len; j++) m = s[j] > m ? s[j] : m;
    return m;
}

KMV_CLONES
float kmv__attn_row(float *s, size_t len, float scale, float shift, const float *x,
                    float *dot) {
    float sum = 0.0f;
    if (x == NULL) {
#pragma omp simd reduction(+ : sum)
        for (size_t j = 0; j < len; j++) {
            float e = exp_nonpos(s[j] * scale - shift);
            s[j] = e;
            sum += e;
        }
        return sum;
    }
    float acc = 0.0f;
#pragma omp simd reduction(+ : sum, acc)
    for (size_t j = 0; j < len; j++) {
        float e = exp_nonpos(s[j] * scale - shift);
        s[j] = e;
        sum += e;
        acc += e * x[j];
    }
    *dot = acc;
    return sum;
}

/* Squared distances taken as sums of squared differences: no cancellation
 * at any bandwidth, which the GEMM expansion cannot promise (exact.c pays
 * for float64 dots instead). The approximate engine evaluates few entries
 * per row, so the direct form costs it little. */
KMV_CLONES
float kmv__sqdist(const float *a, const float *b, size_t d) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (size_t t = 0; t < d; t++) {
        float u = a[t] - b[t];
        acc += u * u;
    }
    return acc;
}

KMV_CLONES
void kmv__sqdist_rows(const float *q, const float *rows, size_t count, size_t d, float *out) {
    for (size_t j = 0; j < count; j++) {
        const float *r = rows + j * d;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (size_t t = 0; t < d; t++) {
            float u = q[t] - r[t];
            acc += u * u;
        }
        out[j] = acc;
    }
}

KMV_CLONES
void kmv__project(const float *v, const float *P, size_t d, size_t cols, size_t ld, float *out) {
    for (size_t u = 0; u < cols; u++) out[u] = 0.0f;
    for (size_t i = 0; i < d; i++) {
        const float *row = P + i * ld;
        float vi = v[i];
#pragma omp simd
        for (size_t u = 0; u < cols; u++) out[u] += vi * row[u];
    }
}

KMV_CLONES
void kmv__lsh_cells(const float *p, const float *offs, size_t len, int32_t *cell) {
#pragma omp simd
    for (size_t u = 0; u < len; u++) {
        /* Huge keys (finite, accepted) project past int32; they share the
         * end cells, which verification sorts out. NaN (infinite
         * projections cancelling) goes there too. */
        float f = __builtin_floorf(p[u] + offs[u]);
        cell[u] = f >= -2147483648.0f && f < 2147483648.0f ? (int32_t)f
                  : f > 0.0f                              ? INT32_MAX
                                                          : INT32_MIN;
    }
}
