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
#include <string.h>

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

/* Sixteen lanes in GCC's generic vectors: one zmm register under
 * AVX-512, two ymm under AVX2, four xmm otherwise. */
typedef float kmv__f16v __attribute__((vector_size(64)));
typedef float kmv__f8v __attribute__((vector_size(32)));
typedef float kmv__f4v __attribute__((vector_size(16)));
typedef int8_t kmv__b16v __attribute__((vector_size(16)));
typedef int32_t kmv__i16v __attribute__((vector_size(64)));

/* The lanes' sum by halves: a few shuffles, where `omp simd reduction`
 * adds sixteen lanes one after another. */
static inline float hsum16(kmv__f16v v) {
    kmv__f8v a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    kmv__f4v b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

/* Squared distances taken as sums of squared differences: no cancellation
 * at any bandwidth, which the GEMM expansion cannot promise (exact.c pays
 * for float64 dots instead). The approximate engine evaluates few entries
 * per row, so the direct form costs it little. */
/* Sixteen lanes at a time, summed by halves at the end (see hsum16). */
static inline float sqdist16(const float *a, const float *b, size_t d) {
    size_t d16 = d & ~(size_t)15;
    kmv__f16v vacc = {0};
    for (size_t t = 0; t < d16; t += 16) {
        kmv__f16v av, bv;
        memcpy(&av, a + t, sizeof av);
        memcpy(&bv, b + t, sizeof bv);
        kmv__f16v u = av - bv;
        vacc += u * u;
    }
    float acc = 0.0f;
    for (size_t t = d16; t < d; t++) {
        float u = a[t] - b[t];
        acc += u * u;
    }
    return hsum16(vacc) + acc;
}

KMV_CLONES
float kmv__sqdist(const float *a, const float *b, size_t d) { return sqdist16(a, b, d); }

KMV_CLONES
void kmv__sqdist_rows(const float *q, const float *rows, size_t count, size_t d, float *out) {
    for (size_t j = 0; j < count; j++) out[j] = sqdist16(q, rows + j * d, d);
}

/* The int8 rows through intrinsics where the CPU has AVX-512 or AVX2:
 * GCC's generic vectors widen int8 to float one lane at a time. Each
 * product s_j v_ju is rounded to float before the subtraction, as in the
 * portable loop. */
static float q8_row(const float *q, const int8_t *r, float sj, size_t from, size_t d) {
    float acc = 0.0f;
    for (size_t t = from; t < d; t++) {
        float u = q[t] - sj * (float)r[t];
        acc += u * u;
    }
    return acc;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

__attribute__((target("avx512f"))) static void q8_rows_avx512(const float *q, const int8_t *v,
                                                                const float *s, size_t count,
                                                                size_t d, float *out) {
    size_t d16 = d & ~(size_t)15;
    for (size_t j = 0; j < count; j++) {
        const int8_t *r = v + j * d;
        __m512 acc = _mm512_setzero_ps(), sj = _mm512_set1_ps(s[j]);
        for (size_t t = 0; t < d16; t += 16) {
            __m512 c = _mm512_mul_ps(sj, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                             _mm_loadu_si128((const __m128i *)(r + t)))));
            __m512 u = _mm512_sub_ps(_mm512_loadu_ps(q + t), c);
            acc = _mm512_add_ps(acc, _mm512_mul_ps(u, u));
        }
        out[j] = _mm512_reduce_add_ps(acc) + q8_row(q, r, s[j], d16, d);
    }
}

__attribute__((target("avx2"))) static void q8_rows_avx2(const float *q, const int8_t *v,
                                                           const float *s, size_t count, size_t d,
                                                           float *out) {
    size_t d8 = d & ~(size_t)7;
    for (size_t j = 0; j < count; j++) {
        const int8_t *r = v + j * d;
        __m256 acc = _mm256_setzero_ps(), sj = _mm256_set1_ps(s[j]);
        for (size_t t = 0; t < d8; t += 8) {
            __m256 c = _mm256_mul_ps(sj, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                             _mm_loadl_epi64((const __m128i *)(r + t)))));
            __m256 u = _mm256_sub_ps(_mm256_loadu_ps(q + t), c);
            acc = _mm256_add_ps(acc, _mm256_mul_ps(u, u));
        }
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
        out[j] = _mm_cvtss_f32(h) + q8_row(q, r, s[j], d8, d);
    }
}
#endif

void kmv__sqdist_q8_rows(const float *q, const int8_t *v, const float *s, size_t count, size_t d,
                         float *out) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx512f")) {
        q8_rows_avx512(q, v, s, count, d, out);
        return;
    }
    if (__builtin_cpu_supports("avx2")) {
        q8_rows_avx2(q, v, s, count, d, out);
        return;
    }
#endif
    for (size_t j = 0; j < count; j++) out[j] = q8_row(q, v + j * d, s[j], 0, d);
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
