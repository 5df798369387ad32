/* Lemma 4.1's reduction of attention to the Gaussian kernel (contract in
 * kmv.h). Norms are taken in double so that the bound from
 * kmv_max_sq_norm() and the check here agree exactly: the key with the
 * largest norm gets an extra coordinate of 0, never a refusal. */
#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
#include "algo/lift.h"

#include <float.h>
#include <math.h>

#include "kmv/kmv.h"

static double sq_norm(const float *v, size_t d) {
    double s = 0.0;
    for (size_t t = 0; t < d; t++) s += (double)v[t] * v[t];
    return s;
}

double kmv_max_sq_norm(const float *rows, size_t count, size_t dim) {
    double best = 0.0;
    for (size_t i = 0; rows != NULL && i < count; i++) {
        double s = sq_norm(rows + i * dim, dim);
        best = s > best ? s : best;
    }
    return best;
}

int kmv_attention_lift(const float *rows, size_t count, size_t dim, int is_key, double alpha,
                       float *out) {
    if (dim == 0 || dim == SIZE_MAX || (count > 0 && (rows == NULL || out == NULL)))
        return KMV_EINVAL;
    if (!(alpha >= 0.0) || !isfinite(alpha)) return KMV_EINVAL;
    if (count > SIZE_MAX / (dim + 1) / sizeof(float)) return KMV_EOVERFLOW;
    if (kmv_find_nonfinite(rows, count * dim, NULL) != KMV_OK) return KMV_ENONFINITE;
    /* Check every key before writing anything: outputs stay untouched on
     * error. */
    if (is_key) {
        for (size_t i = 0; i < count; i++)
            if (sq_norm(rows + i * dim, dim) > alpha) return KMV_EINVAL;
    }
    for (size_t i = 0; i < count; i++) {
        const float *r = rows + i * dim;
        float *o = out + i * (dim + 1);
        for (size_t t = 0; t < dim; t++) o[t] = r[t];
        o[dim] = is_key ? (float)sqrt(alpha - sq_norm(r, dim)) : 0.0f;
    }
    return KMV_OK;
}

double kmv_attention_sigma(double scale, size_t dim) {
    if (dim == 0 || !(scale >= 0.0) || !isfinite(scale)) return 0.0;
    double s = scale > 0.0 ? scale : 1.0 / sqrt((double)dim);
    return 1.0 / sqrt(s);
}

int kmv__logits_fit(double max_q2, double max_k2, double scale) {
    double bound = sqrt(max_q2) * sqrt(max_k2), limit = 0x1p-10 * FLT_MAX;
    return bound <= limit && bound * scale <= limit && scale <= limit;
}
