/* Internal: the kernel's arithmetic on one block of dot products.
 *
 * Both kernels start from a block S = Q_b K_b^T of dot products (one GEMM)
 * and turn each row into kernel values with one vectorized exp per entry.
 * These row functions are the only place the exp is evaluated, so accuracy
 * and speed of every engine rest on them. */
#ifndef KMV_KERNEL_H
#define KMV_KERNEL_H

#include <stddef.h>
#include <stdint.h>

/* exp(x) for x <= 0 to within 2 ulp; x < -87.3 (where expf is subnormal or
 * zero) gives 0. Scalar version of what the row functions compute. */
float kmv__expf(float x);

/* Gaussian row: e_j = exp(min(0, 2 s_j - qn - kn_j) * c) where qn = ||q||^2,
 * kn_j = ||k_j||^2 and c = 1/(2 sigma^2), in place over s[0..len).
 * The min(0, .) undoes float cancellation that could make a squared distance
 * negative. Returns sum_j e_j x_j, accumulated in float over the row. */
float kmv__gauss_row(float *s, size_t len, float qn, const float *kn, float c,
                     const float *x);

/* Same as kmv__gauss_row without the weighted sum (for n_cols > 1, where the
 * products with V are one GEMM afterwards). */
void kmv__gauss_row_exp(float *s, size_t len, float qn, const float *kn, float c);

/* From squared distances: e_j = exp(-max(0, t_j) * c), in place over
 * t[0..len). Returns sum_j e_j x_j when x is not NULL, else 0. */
float kmv__gauss_row_dist(float *t, size_t len, float c, const float *x);

/* max_j s_j over s[0..len), len >= 1. */
float kmv__row_max(const float *s, size_t len);

/* Attention row: e_j = exp(scale * s_j - shift) in place, where shift is at
 * least scale * max_j s_j so every e_j <= 1. Returns sum_j e_j, and when x
 * is not NULL stores sum_j e_j x_j in *dot. */
float kmv__attn_row(float *s, size_t len, float scale, float shift, const float *x,
                    float *dot);

/* ||a - b||^2 as a sum of squared differences (exact to float rounding of
 * each term, whatever the norms). */
float kmv__sqdist(const float *a, const float *b, size_t d);

/* out[j] = ||q - rows_j||^2 for count contiguous rows of dimension d. */
void kmv__sqdist_rows(const float *q, const float *rows, size_t count, size_t d, float *out);

/* The same for rows stored as int8 with a scale each: row j is
 * s[j] v[j d .. j d + d) (a quarter of the bytes a float row reads). Each
 * entry within the float sum's slack of ||q - c||^2 for a point c within
 * 2^-23 ||s_j v_j|| of s_j v_j (the product s_j v_ju may be fused). */
void kmv__sqdist_q8_rows(const float *q, const int8_t *v, const float *s, size_t count, size_t d,
                         float *out);

/* out[u] = sum_i v_i P[i ld + u] for u < cols (P: d rows of stride ld),
 * summed over i in order: one vector against many projections, where a
 * one-row BLAS call would pack all of P first. */
void kmv__project(const float *v, const float *P, size_t d, size_t cols, size_t ld, float *out);

/* cell[u] = floor(p[u] + offs[u]) as int32 for u < len, with values past
 * the int32 range (and NaN) clamped to its ends: the cells of an LSH hash. */
void kmv__lsh_cells(const float *p, const float *offs, size_t len, int32_t *cell);

#endif /* KMV_KERNEL_H */
