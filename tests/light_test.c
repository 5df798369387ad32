#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
/* The light-key window sampler (algo/light.h) against float64 loops over
 * the store: the exact sum at s = n; (n / s) times the sum over positions
 * [off, off + s) mod n otherwise, wrapping and across the 256-key chunks;
 * the shift; heavy keys skipped only when their kernel value reaches kappa;
 * keys outside a kmv__keymask counted as 0; the returned variance against
 * the without-replacement formula; and, over many random orders, that the
 * estimate is unbiased with the variance it reports. Also the helpers:
 * kmv__normal_upper against tabulated normal quantiles, kmv__contains,
 * kmv__cmp_u32 and kmv__window_offset.
 *
 * The statistical check runs a fixed list of seeds (deterministic); its
 * tolerances are ones a correct sampler passes with probability above
 * 1 - 1e-6 were the seeds random. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/alloc.h"
#include "algo/keystore.h"
#include "algo/light.h"
#include "tests/datagen.h"
#include "tests/testutil.h"

/* kmv__window() with its request spelled out, as the checks below read. */
static double window(const kmv__keystore *ks, const float *xp, size_t c, const float *q,
                     float inv2s2, float shift, float kappa, const uint32_t *heavy, size_t n_heavy,
                     const kmv__keymask *mask, size_t off, size_t s, float *scratch, double *acc,
                     double *est) {
    kmv__light l = {ks, xp, c, q, inv2s2, shift, kappa, heavy, n_heavy, mask};
    kmv__light_buf b = {scratch, acc, est};
    return kmv__window(&l, off, s, &b);
}

/* One query against a random store, with x already in store order. */
typedef struct fixture {
    kmv_allocator a;
    tu_alloc_state st;
    kmv__keystore ks;
    size_t n, d, c;
    float *keys; /* n x d, arrival order */
    float *x;    /* n x c, arrival order */
    float *xp;   /* n x c, store order */
    float q[16];
    float inv2s2;
} fixture;

static void fixture_make(fixture *f, size_t n, size_t d, size_t c, uint64_t seed) {
    memset(f, 0, sizeof *f);
    f->a = tu_allocator(&f->st);
    f->n = n, f->d = d, f->c = c;
    /* Amplitude 0.4 in d = 6 puts squared distances around 0.6 and kernel
     * values (sigma = 0.5) spread over (0.01, 1): every key matters. */
    f->keys = tu_random(n * d, seed, 0.4f);
    f->x = tu_random(n * c, seed + 1, 1.0f);
    /* Some zero rows, as outside T. */
    for (size_t j = 0; j < n; j += 7)
        for (size_t u = 0; u < c; u++) f->x[j * c + u] = 0.0f;
    float *q = tu_random(d, seed + 2, 0.4f);
    memcpy(f->q, q, d * sizeof(float));
    free(q);
    f->inv2s2 = 2.0f; /* sigma = 0.5 */
    kmv__keystore_init(&f->ks, d, seed + 3);
    assert_int_equal(kmv__keystore_append(&f->ks, &f->a, f->keys, n), KMV_OK);
    f->xp = malloc(n * c * sizeof(float));
    for (size_t p = 0; p < n; p++)
        memcpy(f->xp + p * c, f->x + (size_t)f->ks.id_at[p] * c, c * sizeof(float));
}

static void fixture_free(fixture *f) {
    kmv__keystore_free(&f->ks, &f->a);
    assert_int_equal(f->st.live, 0);
    free(f->keys), free(f->x), free(f->xp);
}

/* Squared distance from the query to key id, in double. */
static double d2_of(const fixture *f, size_t id) {
    double s = 0.0;
    for (size_t t = 0; t < f->d; t++) {
        double u = (double)f->q[t] - f->keys[id * f->d + t];
        s += u * u;
    }
    return s;
}

static double k_of(const fixture *f, size_t id, double shift) {
    double t = d2_of(f, id) - shift;
    return exp(-(t > 0.0 ? t : 0.0) * f->inv2s2);
}

/* What a window should see at position p: its value f = K x per column,
 * or 0 when skipped. */
typedef struct rule {
    double shift, kappa;
    const uint32_t *heavy;
    size_t n_heavy;
    const kmv__keymask *mask;
} rule;

static int counted(const fixture *f, const rule *r, size_t p) {
    uint32_t id = f->ks.id_at[p];
    if (r->n_heavy > 0 && kmv__contains(r->heavy, r->n_heavy, id) &&
        k_of(f, id, r->shift) >= r->kappa)
        return 0;
    if (r->mask != NULL && (id > r->mask->id_lim ||
                            (r->mask->wp != NULL && r->mask->wp[p] >= r->mask->whi)))
        return 0;
    return 1;
}

/* The reference: est[col] = (n/s) sum of the window's values, var = sum
 * over columns of n^2 (1 - s/n) S^2 / s, S^2 the window's sample variance,
 * all in double; tol[col] bounds the float error: 1e-5 of sum |f|. */
static double reference(const fixture *f, const rule *r, size_t off, size_t s, double *est,
                        double *tol, double *sum_out, double *sq_out) {
    size_t n = f->n, c = f->c;
    double var = 0.0;
    for (size_t col = 0; col < c; col++) {
        double sum = 0.0, sq = 0.0, abs_sum = 0.0;
        for (size_t u = 0; u < s; u++) {
            size_t p = (off + u) % n;
            if (!counted(f, r, p)) continue;
            double v = k_of(f, f->ks.id_at[p], r->shift) * f->xp[p * c + col];
            sum += v;
            sq += v * v;
            abs_sum += fabs(v);
        }
        est[col] = (double)n / (double)s * sum;
        tol[col] = 1e-5 * (double)n / (double)s * abs_sum + 1e-30;
        if (sum_out) sum_out[col] = sum, sq_out[col] = sq;
        if (s > 1 && s < n) {
            double s2 = (sq - sum * sum / (double)s) / (double)(s - 1);
            double nd = (double)n, sd = (double)s;
            var += nd * nd * (1.0 - sd / nd) * (s2 > 0.0 ? s2 : 0.0) / sd;
        }
    }
    return var;
}

/* Runs kmv__window and compares everything with the reference. */
static void check_window(const fixture *f, const rule *r, size_t off, size_t s) {
    size_t c = f->c;
    float scratch[256];
    double acc[32], est[16], want[16], tol[16], sum[16], sq[16];
    assert_true(c <= 16);
    double var = window(&f->ks, f->xp, c, f->q, f->inv2s2, (float)r->shift, (float)r->kappa,
                             r->heavy, r->n_heavy, r->mask, off, s, scratch, acc, est);
    double var_want = reference(f, r, off, s, want, tol, sum, sq);
    for (size_t col = 0; col < c; col++) {
        if (!(fabs(est[col] - want[col]) <= tol[col]))
            fail_msg("off %zu s %zu col %zu: est %.9g, want %.9g", off, s, col, est[col],
                     want[col]);
        /* acc holds the window's sums (before the n/s scale). */
        assert_true(fabs(acc[col] - sum[col]) <= tol[col] * (double)s / (double)f->n);
    }
    if (s == 1 || s == f->n) {
        assert_true(var == 0.0);
    } else if (!(fabs(var - var_want) <= 1e-4 * var_want + 1e-12)) {
        fail_msg("off %zu s %zu: variance %.9g, want %.9g", off, s, var, var_want);
    }
    /* The per-column helper reads what the window left in acc, and the
     * return value is its sum over columns. */
    double by_col = 0.0;
    for (size_t col = 0; col < c; col++) {
        double vc = kmv__window_var_col(acc, c, col, f->n, s);
        double s2 = s > 1 ? (acc[c + col] - acc[col] * acc[col] / (double)s) / (double)(s - 1) : 0.0;
        double nd = (double)f->n, sd = (double)s;
        double direct = s > 1 && s < f->n ? nd * nd * (1.0 - sd / nd) * (s2 > 0 ? s2 : 0) / sd : 0.0;
        assert_true(fabs(vc - direct) <= 1e-12 * direct);
        by_col += vc;
    }
    assert_true(fabs(by_col - var) <= 1e-12 * var);
}

/* s = n and no heavy list: the exact sum over the store, whatever the
 * offset, with variance 0; with a shift, the shifted kernel. */
static void test_full_window(void **state) {
    (void)state;
    fixture f;
    fixture_make(&f, 700, 6, 3, 1);
    rule r = {0.0, 2.0, NULL, 0, NULL};
    check_window(&f, &r, 0, f.n);
    check_window(&f, &r, 123, f.n);
    check_window(&f, &r, f.n - 1, f.n);
    /* The full sum against a direct loop in arrival order, too: the store
     * order must not lose or repeat a key. */
    float scratch[256];
    double acc[6], est[3];
    window(&f.ks, f.xp, 3, f.q, f.inv2s2, 0.0f, 2.0f, NULL, 0, NULL, 0, f.n, scratch, acc, est);
    for (size_t col = 0; col < 3; col++) {
        double y = 0.0, ya = 0.0;
        for (size_t j = 0; j < f.n; j++) {
            y += k_of(&f, j, 0.0) * f.x[j * 3 + col];
            ya += k_of(&f, j, 0.0) * fabs(f.x[j * 3 + col]);
        }
        assert_true(fabs(est[col] - y) <= 1e-5 * ya);
    }
    /* A shift of at most the smallest squared distance. */
    double dmin = INFINITY;
    for (size_t j = 0; j < f.n; j++) dmin = d2_of(&f, j) < dmin ? d2_of(&f, j) : dmin;
    rule sh = {(double)(float)(0.9 * dmin), 2.0, NULL, 0, NULL};
    check_window(&f, &sh, 5, f.n);
    fixture_free(&f);
    /* One key, one column. */
    fixture_make(&f, 1, 6, 1, 2);
    check_window(&f, &r, 0, 1);
    fixture_free(&f);
}

/* s < n: (n/s) times the sum over [off, off + s) mod n, for windows inside
 * the order, wrapping past its end, spanning chunk edges, s = 1 and
 * s = n - 1; and the mean over all n offsets is the full sum (every
 * position is covered by exactly s windows). */
static void test_partial_windows(void **state) {
    (void)state;
    fixture f;
    fixture_make(&f, 700, 6, 3, 3);
    rule r = {0.0, 2.0, NULL, 0, NULL};
    const size_t offs[] = {0, 1, 255, 256, 300, 600, 699};
    const size_t ss[] = {1, 2, 37, 255, 256, 257, 513, 699};
    for (size_t a = 0; a < sizeof offs / sizeof offs[0]; a++)
        for (size_t b = 0; b < sizeof ss / sizeof ss[0]; b++) check_window(&f, &r, offs[a], ss[b]);
    fixture_free(&f);

    fixture_make(&f, 300, 6, 2, 4);
    float scratch[256];
    double acc[4], est[2], full[2], tot[2] = {0.0, 0.0};
    window(&f.ks, f.xp, 2, f.q, f.inv2s2, 0.0f, 2.0f, NULL, 0, NULL, 0, f.n, scratch, acc, full);
    for (size_t off = 0; off < f.n; off++) {
        window(&f.ks, f.xp, 2, f.q, f.inv2s2, 0.0f, 2.0f, NULL, 0, NULL, off, 41, scratch, acc,
                    est);
        tot[0] += est[0], tot[1] += est[1];
    }
    for (size_t col = 0; col < 2; col++) {
        double scale = 0.0;
        for (size_t j = 0; j < f.n; j++) scale += k_of(&f, j, 0.0) * fabs(f.x[j * 2 + col]);
        assert_true(fabs(tot[col] / (double)f.n - full[col]) <= 1e-5 * scale);
    }
    fixture_free(&f);
}

/* Heavy ids are skipped when their kernel value is >= kappa (a 0.1% slack
 * below kappa absorbs rounding), counted otherwise; keys outside the mask
 * (id > id_lim, or wp[p] >= whi) count as 0; both combine. */
static void test_heavy_and_mask(void **state) {
    (void)state;
    fixture f;
    fixture_make(&f, 600, 6, 2, 5);
    size_t n = f.n;
    /* kappa near 0.3, inside the spread of kernel values, moved off every
     * key's value by a margin so that float and double agree on which
     * side each key is. */
    double *kv = malloc(n * sizeof(double));
    for (size_t j = 0; j < n; j++) kv[j] = k_of(&f, j, 0.0);
    double kappa = 0.3;
    for (int tries = 0;; tries++) {
        int clear = 1;
        for (size_t j = 0; j < n; j++)
            if (fabs(kv[j] - kappa) < 2e-3 * kappa) clear = 0;
        if (clear) break;
        assert_true(tries < 100);
        kappa *= 1.0037;
    }
    /* Heavy list: every third id, above and below kappa alike. */
    uint32_t heavy[600];
    size_t nh = 0, above = 0, below = 0;
    for (uint32_t j = 0; j < n; j += 3) {
        heavy[nh++] = j;
        above += kv[j] >= kappa;
        below += kv[j] < kappa;
    }
    assert_true(above > 10 && below > 10); /* both cases exercised */
    rule r = {0.0, kappa, heavy, nh, NULL};
    check_window(&f, &r, 0, n);
    check_window(&f, &r, 450, 200);
    /* A listed key just below kappa, within the slack, is skipped; the
     * kernel value computed elsewhere may differ in the last bits. */
    uint32_t one = 1;
    float scratch[256];
    double acc[4], est[2], base[2];
    window(&f.ks, f.xp, 2, f.q, f.inv2s2, 0.0f, 2.0f, NULL, 0, NULL, 0, n, scratch, acc, base);
    double k1 = kv[1];
    window(&f.ks, f.xp, 2, f.q, f.inv2s2, 0.0f, (float)(k1 / 0.9995), &one, 1, NULL, 0, n,
                scratch, acc, est);
    for (size_t col = 0; col < 2; col++)
        assert_true(fabs((base[col] - est[col]) - k1 * f.x[2 + col]) <= 1e-5 * (1.0 + fabs(base[col])));
    /* ... and one well below is counted. */
    window(&f.ks, f.xp, 2, f.q, f.inv2s2, 0.0f, (float)(k1 / 0.99), &one, 1, NULL, 0, n,
                scratch, acc, est);
    for (size_t col = 0; col < 2; col++) assert_true(est[col] == base[col]);
    /* kappa above 1: nothing is ever skipped. */
    window(&f.ks, f.xp, 2, f.q, f.inv2s2, 0.0f, 2.0f, heavy, nh, NULL, 0, n, scratch, acc, est);
    for (size_t col = 0; col < 2; col++) assert_true(est[col] == base[col]);

    /* Masks: a causal row, then weights, then both with the heavy list. */
    kmv__keymask causal = {(uint32_t)(n / 3), NULL, 0.0};
    rule rc = {0.0, 2.0, NULL, 0, &causal};
    check_window(&f, &rc, 0, n);
    check_window(&f, &rc, 100, 300);
    double *wp = malloc(n * sizeof(double));
    uint64_t s = 9;
    for (size_t p = 0; p < n; p++) wp[p] = dg_unit(&s);
    wp[0] = 0.5; /* exactly at whi: excluded */
    kmv__keymask wm = {UINT32_MAX, wp, 0.5};
    rule rw = {0.0, 2.0, NULL, 0, &wm};
    check_window(&f, &rw, 0, n);
    check_window(&f, &rw, 580, 77);
    kmv__keymask both = {(uint32_t)(2 * n / 3), wp, 0.7};
    rule rb = {0.0, kappa, heavy, nh, &both};
    check_window(&f, &rb, 0, n);
    check_window(&f, &rb, 333, 400);
    /* id_lim = 1: ids 0 and 1 alone count (ids <= id_lim), variance 0 at
     * s = n. */
    kmv__keymask two = {1, NULL, 0.0};
    double v = window(&f.ks, f.xp, 2, f.q, f.inv2s2, 0.0f, 2.0f, NULL, 0, &two, 0, n, scratch,
                           acc, est);
    for (size_t col = 0; col < 2; col++)
        assert_true(fabs(est[col] - (kv[0] * f.x[col] + kv[1] * f.x[2 + col])) <= 1e-6);
    assert_true(est[0] != 0.0);
    assert_true(v == 0.0);
    free(wp), free(kv);
    fixture_free(&f);
}

/* Over fixed seeds of the key store's random order, with a fixed offset,
 * the estimate averages to the full sum and its spread matches the exact
 * without-replacement variance n^2 (1 - s/n) S_n^2 / s of the population,
 * which is also what the returned variance averages to. */
#define ORDERS 3000

static void test_unbiased_over_orders(void **state) {
    (void)state;
    size_t n = 200, s = 20, d = 6;
    float *keys = tu_random(n * d, 71, 0.4f), *x = tu_random(n, 72, 1.0f);
    float *q = tu_random(d, 73, 0.4f);
    tu_alloc_state st = {0, 0, 0};
    kmv_allocator a = tu_allocator(&st);
    double *v = malloc(n * sizeof(double));
    double tot = 0.0, m2 = 0.0;
    for (size_t j = 0; j < n; j++) {
        double d2 = 0.0;
        for (size_t t = 0; t < d; t++) d2 += ((double)q[t] - keys[j * d + t]) * ((double)q[t] - keys[j * d + t]);
        v[j] = exp(-2.0 * d2) * x[j];
        tot += v[j];
    }
    double nd = (double)n, sd = (double)s;
    for (size_t j = 0; j < n; j++) m2 += (v[j] - tot / nd) * (v[j] - tot / nd);
    double sn2 = m2 / (nd - 1.0);
    double var_true = nd * nd * (1.0 - sd / nd) * sn2 / sd;
    float *xp = malloc(n * sizeof(float)), scratch[256];
    double acc[2], est = 0.0, mean = 0.0, sqdev = 0.0, mean_var = 0.0;
    for (uint64_t seed = 1; seed <= ORDERS; seed++) {
        kmv__keystore ks;
        kmv__keystore_init(&ks, d, seed);
        assert_int_equal(kmv__keystore_append(&ks, &a, keys, n), KMV_OK);
        for (size_t p = 0; p < n; p++) xp[p] = x[ks.id_at[p]];
        mean_var += window(&ks, xp, 1, q, 2.0f, 0.0f, 2.0f, NULL, 0, NULL, 17, s, scratch,
                                acc, &est);
        mean += est;
        sqdev += (est - tot) * (est - tot);
        kmv__keystore_free(&ks, &a);
    }
    mean /= ORDERS;
    mean_var /= ORDERS;
    double emp_var = sqdev / ORDERS;
    /* The mean: within 5 standard errors. */
    double se = sqrt(var_true / ORDERS);
    if (!(fabs(mean - tot) <= 5.0 * se)) fail_msg("mean %.9g, want %.9g +- 5 x %.3g", mean, tot, se);
    /* The spread and the reported variance: sample variances of 3000 runs
     * have relative standard error near sqrt(2 / 3000) = 2.6% (a little
     * more for these tails); 15% is about 5 of those. A sampler that
     * forgot the finite-population factor (1 - s/n = 0.9) would still
     * pass this, so that factor is checked exactly in check_window(). */
    if (!(fabs(emp_var - var_true) <= 0.15 * var_true))
        fail_msg("spread %.9g, want %.9g", emp_var, var_true);
    if (!(fabs(mean_var - var_true) <= 0.15 * var_true))
        fail_msg("mean reported variance %.9g, want %.9g", mean_var, var_true);
    assert_int_equal(st.live, 0);
    free(keys), free(x), free(q), free(v), free(xp);
}

/* kmv__window_var_col at the edges: s <= 1 and s >= n have no variance,
 * and a window of equal values none either (S^2 = 0, never negative). */
static void test_var_col(void **state) {
    (void)state;
    double acc[4] = {6.0, 1.0, 18.0, 1.0}; /* sums (6, 1), squares (18, 1) */
    assert_true(kmv__window_var_col(acc, 2, 0, 10, 1) == 0.0);
    assert_true(kmv__window_var_col(acc, 2, 0, 10, 10) == 0.0);
    assert_true(kmv__window_var_col(acc, 2, 0, 10, 11) == 0.0);
    /* Column 0: two values 3, 3 (sum 6, squares 18): S^2 = 0. */
    assert_true(kmv__window_var_col(acc, 2, 0, 10, 2) == 0.0);
    /* Column 1: values 1, 0 (sum 1, squares 1): S^2 = 0.5, variance
     * 10^2 (1 - 2/10) 0.5 / 2 = 20. */
    assert_true(fabs(kmv__window_var_col(acc, 2, 1, 10, 2) - 20.0) <= 1e-12);
    /* Three equal values 0.1 summed in double: sq - sum^2 / s is a
     * rounding error either side of 0; the variance is never negative. */
    double eq[2] = {0.1 + 0.1 + 0.1, 0.01 + 0.01 + 0.01};
    double ve = kmv__window_var_col(eq, 1, 0, 10, 3);
    assert_true(ve >= 0.0 && ve <= 1e-12);
}

/* Upper-tail normal quantiles, z with P(Z > z) = p: values from mpmath
 * at 30 digits (the header promises 1e-12; 1e-9 leaves room for erfc's
 * own rounding), and the defining relation. */
static void test_normal_upper(void **state) {
    (void)state;
    const struct {
        double p, z;
    } tab[] = {
        {0.5, 0.0},
        {0.15865525393145705141, 1.0},
        {0.1, 1.281551565544600467},
        {0.05, 1.6448536269514727149},
        {0.025, 1.9599639845400542355},
        {0.01, 2.3263478740408411009},
        {0.005, 2.575829303548900761},
        {0.001, 3.0902323061678135415},
        {1e-6, 4.7534243088228989482},
        {1e-10, 6.3613409024040562047},
    };
    for (size_t i = 0; i < sizeof tab / sizeof tab[0]; i++) {
        double z = kmv__normal_upper(tab[i].p);
        if (!(fabs(z - tab[i].z) <= 1e-9)) fail_msg("p %g: z %.15g, want %.15g", tab[i].p, z, tab[i].z);
    }
    /* The defining relation and monotonicity on a grid. */
    double prev = INFINITY;
    for (double p = 1e-15; p <= 0.5; p *= 1.7) {
        double z = kmv__normal_upper(p);
        assert_true(z < prev);
        prev = z;
        double tail = 0.5 * erfc(z / sqrt(2.0));
        /* d tail / dz = -phi(z): a z error of 1e-12 moves the tail by at
         * most 0.4e-12 times phi's peak, relative to p about z 1e-12. */
        if (!(fabs(tail - p) <= 1e-9 * p + 1e-14)) fail_msg("p %g: tail at z %.17g is %.17g", p, z, tail);
    }
}

/* Ascending sort by kmv__cmp_u32 (with values more than INT_MAX apart,
 * where a subtracting comparator would fail) and kmv__contains. */
static void test_ids(void **state) {
    (void)state;
    uint32_t ids[500];
    uint64_t s = 3;
    for (size_t i = 0; i < 500; i++) ids[i] = (uint32_t)tu_next(&s);
    ids[0] = 0, ids[1] = UINT32_MAX, ids[2] = 0x80000000u, ids[3] = 0x7fffffffu, ids[4] = 1;
    qsort(ids, 500, sizeof(uint32_t), kmv__cmp_u32);
    for (size_t i = 1; i < 500; i++) assert_true(ids[i - 1] <= ids[i]);
    assert_int_equal(ids[0], 0);
    assert_int_equal(ids[499], UINT32_MAX);
    uint32_t a = 5, b = 0xffffff00u;
    assert_true(kmv__cmp_u32(&a, &b) < 0);
    assert_true(kmv__cmp_u32(&b, &a) > 0);
    assert_true(kmv__cmp_u32(&a, &a) == 0);
    for (size_t i = 0; i < 500; i++) assert_true(kmv__contains(ids, 500, ids[i]));
    /* Absent values: checked against a linear scan. */
    for (int t = 0; t < 2000; t++) {
        uint32_t v = (uint32_t)tu_next(&s);
        if (t % 4 == 0) v = ids[t % 500] + 1;
        int lin = 0;
        for (size_t i = 0; i < 500; i++) lin |= ids[i] == v;
        assert_int_equal(kmv__contains(ids, 500, v), lin);
    }
    assert_false(kmv__contains(ids, 0, ids[0]));
    assert_false(kmv__contains(NULL, 0, 7));
    uint32_t one[1] = {7};
    assert_true(kmv__contains(one, 1, 7));
    assert_false(kmv__contains(one, 1, 6));
    assert_false(kmv__contains(one, 1, 8));
}

/* Offsets lie in [0, n), repeat for the same arguments, change with each
 * of seed, stream, row and round, and spread evenly over [0, n). */
static void test_window_offset(void **state) {
    (void)state;
    assert_int_equal(kmv__window_offset(1, KMV__RNG_WINDOW, 0, 0, 1), 0);
    size_t n = 37, rows = 37000;
    unsigned long count[37] = {0};
    size_t diff_seed = 0, diff_stream = 0, diff_round = 0, diff_row = 0;
    for (uint64_t i = 0; i < rows; i++) {
        size_t o = kmv__window_offset(42, KMV__RNG_WINDOW, i, 0, n);
        assert_true(o < n);
        assert_int_equal(o, kmv__window_offset(42, KMV__RNG_WINDOW, i, 0, n));
        count[o]++;
        diff_seed += o != kmv__window_offset(43, KMV__RNG_WINDOW, i, 0, n);
        diff_stream += o != kmv__window_offset(42, KMV__RNG_DECODE, i, 0, n);
        diff_round += o != kmv__window_offset(42, KMV__RNG_WINDOW, i, 1, n);
        diff_row += o != kmv__window_offset(42, KMV__RNG_WINDOW, i + 1, 0, n);
    }
    /* Independent offsets differ 36 times in 37. */
    size_t want = rows * 36 / 37, slack = rows / 50;
    assert_true(diff_seed + slack > want && diff_stream + slack > want);
    assert_true(diff_round + slack > want && diff_row + slack > want);
    /* Chi-square on 36 df; df + 10 sqrt(2 df) = 121 is exceeded with
     * probability below 1e-9. */
    double chi2 = 0.0, e = (double)rows / (double)n;
    for (size_t o = 0; o < n; o++) chi2 += ((double)count[o] - e) * ((double)count[o] - e) / e;
    if (!(chi2 <= 36.0 + 10.0 * sqrt(72.0))) fail_msg("chi-square %.1f on 36 df", chi2);
    /* Large n: the top of the range is reached too. */
    size_t big = (size_t)1 << 31, hi = 0;
    for (uint64_t i = 0; i < 1000; i++) {
        size_t o = kmv__window_offset(7, KMV__RNG_WINDOW, i, 0, big);
        assert_true(o < big);
        hi = o > hi ? o : hi;
    }
    assert_true(hi > big / 2);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_full_window),
        cmocka_unit_test(test_partial_windows),
        cmocka_unit_test(test_heavy_and_mask),
        cmocka_unit_test(test_unbiased_over_orders),
        cmocka_unit_test(test_var_col),
        cmocka_unit_test(test_normal_upper),
        cmocka_unit_test(test_ids),
        cmocka_unit_test(test_window_offset),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
