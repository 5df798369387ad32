#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
/* The H1 / H2 / T split of x (algo/xsplit.h) against a direct computation:
 * with w_j = ||x_j||^2 (in double) and wbar = sum_j w_j / n, key j is in
 * H1 when w_j >= hi wbar (and w_j > 0), in H2 when w_j <= n^-4 wbar, else
 * in T. Checked: each key's set, the counts, nx2, wbar, w_max_t, drop_l1 =
 * sum over H2 of ||x_j||, h1 ascending, xp / wp holding x_j and w_j at
 * pos_of[j] for T and 0 elsewhere; both boundaries hit exactly (data built
 * from dyadic values, so the sums are exact); x = 0; allocation failures.
 * x comes in arrival order and xp / wp are in the store's random order, so
 * a mix-up between the two shows. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/alloc.h"
#include "algo/keystore.h"
#include "algo/xsplit.h"
#include "tests/datagen.h"
#include "tests/testutil.h"

enum { SET_H1, SET_H2, SET_T };

static void store(kmv__keystore *ks, const kmv_allocator *a, size_t n, uint64_t seed) {
    float *k = tu_random(n * 2, seed, 1.0f);
    kmv__keystore_init(ks, 2, seed);
    assert_int_equal(kmv__keystore_append(ks, a, k, n), KMV_OK);
    free(k);
}

/* Runs the split and checks all of it against the direct computation;
 * returns the counts (h1, h2, t) through cnt when not NULL. */
static void check_split(const kmv__keystore *ks, const float *x, size_t c, double hi, size_t *cnt) {
    tu_alloc_state st = {0, 0, 0};
    kmv_allocator a = tu_allocator(&st);
    size_t n = ks->n;
    double *w = malloc(n * sizeof(double));
    double nx2 = 0.0;
    for (size_t j = 0; j < n; j++) {
        w[j] = 0.0;
        for (size_t u = 0; u < c; u++) w[j] += (double)x[j * c + u] * x[j * c + u];
        nx2 += w[j];
    }
    double wbar = nx2 / (double)n;
    double nd = (double)n, lo = wbar / (nd * nd * nd * nd), whi = hi * wbar;

    kmv__xsplit xs;
    assert_int_equal(kmv__xsplit_run(&xs, &a, ks, x, c, hi), KMV_OK);
    assert_true(fabs(xs.nx2 - nx2) <= 1e-14 * nx2);
    assert_true(fabs(xs.wbar - wbar) <= 1e-14 * wbar);

    size_t n_h1 = 0, n_h2 = 0, n_t = 0, h = 0;
    double drop = 0.0, wmax = 0.0;
    for (size_t j = 0; j < n; j++) {
        int set = (w[j] >= whi && w[j] > 0.0) ? SET_H1 : w[j] <= lo ? SET_H2 : SET_T;
        size_t p = ks->pos_of[j];
        const float *xr = xs.xp + p * c;
        if (set == SET_H1) {
            n_h1++;
            /* h1 lists H1 in ascending id order: the next one is j. */
            assert_true(h < xs.n_h1);
            assert_int_equal(xs.h1[h], j);
            h++;
        } else if (set == SET_H2) {
            n_h2++;
            drop += sqrt(w[j]);
        } else {
            n_t++;
            wmax = w[j] > wmax ? w[j] : wmax;
        }
        if (set == SET_T) {
            assert_memory_equal(xr, x + j * c, c * sizeof(float));
            assert_true(xs.wp[p] == w[j]);
        } else {
            for (size_t u = 0; u < c; u++) assert_true(xr[u] == 0.0f);
            assert_true(xs.wp[p] == 0.0);
        }
    }
    assert_int_equal(xs.n_h1, n_h1);
    assert_int_equal(xs.n_drop, n_h2);
    assert_int_equal(xs.n_t, n_t);
    assert_int_equal(n_h1 + n_h2 + n_t, n);
    for (size_t i = 1; i < xs.n_h1; i++) assert_true(xs.h1[i - 1] < xs.h1[i]);
    assert_true(fabs(xs.drop_l1 - drop) <= 1e-12 * drop);
    assert_true(xs.w_max_t == wmax);
    if (n_h1 == 0) assert_null(xs.h1);
    if (cnt) cnt[0] = n_h1, cnt[1] = n_h2, cnt[2] = n_t;
    kmv__xsplit_free(&xs, &a);
    assert_int_equal(st.live, 0);
    free(w);
}

/* Rows of random direction and norms spread over 16 decades, so all three
 * sets are well filled, for several hi and column counts. */
static void test_random(void **state) {
    (void)state;
    tu_alloc_state st = {0, 0, 0};
    kmv_allocator a = tu_allocator(&st);
    size_t n = 1000;
    kmv__keystore ks;
    store(&ks, &a, n, 7);
    const size_t cs[] = {1, 3, 8};
    for (size_t ci = 0; ci < 3; ci++) {
        size_t c = cs[ci];
        float *x = tu_random(n * c, 100 + c, 1.0f);
        uint64_t s = 200 + c;
        for (size_t j = 0; j < n; j++) {
            double sc = pow(10.0, -14.0 + 16.0 * dg_unit(&s));
            for (size_t u = 0; u < c; u++) x[j * c + u] = (float)(x[j * c + u] * sc);
        }
        const double his[] = {1.0, 4.0, 30.0, 1e9};
        for (size_t hi = 0; hi < 4; hi++) {
            size_t cnt[3];
            check_split(&ks, x, c, his[hi], cnt);
            /* The data reach every set (H1 empty only at hi = 1e9). */
            assert_true(cnt[1] > 0 && cnt[2] > 0);
            assert_true(his[hi] > 1e6 ? cnt[0] == 0 : cnt[0] > 0);
        }
        free(x);
    }
    kmv__keystore_free(&ks, &a);
    assert_int_equal(st.live, 0);
}

/* Both boundaries are inclusive: w = hi wbar is H1, w = n^-4 wbar is H2.
 * n = 4, c = 2, values in 1/16ths: weights 1010/256, 1/256, 13/256, 0 sum
 * to 4 exactly, so wbar = 1, n^-4 wbar = 1/256 and, at hi = 1010/256,
 * hi wbar = 1010/256, all exact. */
static void test_boundaries(void **state) {
    (void)state;
    tu_alloc_state st = {0, 0, 0};
    kmv_allocator a = tu_allocator(&st);
    kmv__keystore ks;
    store(&ks, &a, 4, 3);
    const float x[8] = {31.0f / 16, 7.0f / 16, 1.0f / 16, 0.0f, 3.0f / 16, 2.0f / 16, 0.0f, 0.0f};
    size_t cnt[3];
    check_split(&ks, x, 2, 1010.0 / 256.0, cnt);
    kmv__xsplit xs;
    assert_int_equal(kmv__xsplit_run(&xs, &a, &ks, x, 2, 1010.0 / 256.0), KMV_OK);
    assert_true(xs.nx2 == 4.0 && xs.wbar == 1.0);
    assert_int_equal(xs.n_h1, 1);
    assert_int_equal(xs.h1[0], 0);  /* at hi wbar: H1 */
    assert_int_equal(xs.n_drop, 2); /* 1/256 (at the edge) and 0 */
    assert_true(xs.drop_l1 == 1.0 / 16.0);
    assert_int_equal(xs.n_t, 1);
    assert_true(xs.wp[ks.pos_of[2]] == 13.0 / 256.0);
    assert_true(xs.w_max_t == 13.0 / 256.0);
    kmv__xsplit_free(&xs, &a);
    /* Just past each edge: hi a little higher puts key 0 in T. */
    assert_int_equal(kmv__xsplit_run(&xs, &a, &ks, x, 2, 1010.0 / 256.0 * (1.0 + 1e-15)), KMV_OK);
    assert_int_equal(xs.n_h1, 0);
    assert_int_equal(xs.n_t, 2);
    assert_null(xs.h1);
    assert_true(xs.w_max_t == 1010.0 / 256.0);
    kmv__xsplit_free(&xs, &a);
    kmv__keystore_free(&ks, &a);
    assert_int_equal(st.live, 0);
}

/* x = 0: everything in H2, nothing to sum (y = 0 exactly), no NaN from
 * 0 / 0 anywhere; one nonzero row among zeros is H1 at any hi <= n. */
static void test_zero_and_single(void **state) {
    (void)state;
    tu_alloc_state st = {0, 0, 0};
    kmv_allocator a = tu_allocator(&st);
    size_t n = 50, c = 3;
    kmv__keystore ks;
    store(&ks, &a, n, 11);
    float *x = calloc(n * c, sizeof(float));
    kmv__xsplit xs;
    assert_int_equal(kmv__xsplit_run(&xs, &a, &ks, x, c, 4.0), KMV_OK);
    assert_true(xs.nx2 == 0.0 && xs.wbar == 0.0);
    assert_int_equal(xs.n_h1, 0);
    assert_int_equal(xs.n_drop, n);
    assert_int_equal(xs.n_t, 0);
    assert_true(xs.drop_l1 == 0.0);
    assert_true(xs.w_max_t == 0.0);
    assert_null(xs.h1);
    for (size_t p = 0; p < n; p++) assert_true(xs.wp[p] == 0.0);
    for (size_t i = 0; i < n * c; i++) assert_true(xs.xp[i] == 0.0f);
    kmv__xsplit_free(&xs, &a);
    check_split(&ks, x, c, 1.0, NULL);

    /* One nonzero row: its weight is n wbar. */
    x[17 * c + 1] = -3.0f;
    assert_int_equal(kmv__xsplit_run(&xs, &a, &ks, x, c, (double)n), KMV_OK);
    assert_int_equal(xs.n_h1, 1);
    assert_int_equal(xs.h1[0], 17);
    assert_int_equal(xs.n_drop, n - 1);
    assert_int_equal(xs.n_t, 0);
    kmv__xsplit_free(&xs, &a);
    assert_int_equal(kmv__xsplit_run(&xs, &a, &ks, x, c, (double)n * 1.5), KMV_OK);
    assert_int_equal(xs.n_h1, 0);
    assert_int_equal(xs.n_t, 1);
    assert_true(xs.xp[ks.pos_of[17] * c + 1] == -3.0f);
    kmv__xsplit_free(&xs, &a);
    free(x);
    kmv__keystore_free(&ks, &a);
    assert_int_equal(st.live, 0);
}

/* Each allocation failing: KMV_ENOMEM, nothing left allocated, and the
 * struct zeroed (xsplit_free on it is then harmless). */
static void test_alloc_failures(void **state) {
    (void)state;
    tu_alloc_state st = {0, 0, 0};
    kmv_allocator a = tu_allocator(&st);
    size_t n = 40;
    kmv__keystore ks;
    store(&ks, &a, n, 5);
    float *x = tu_random(n, 9, 1.0f);
    x[3] = 100.0f; /* an H1 key, so h1 is allocated too */
    long held = st.live;
    for (long k = 1; k <= 3; k++) {
        kmv__xsplit xs;
        st.fail_at = st.calls + k;
        assert_int_equal(kmv__xsplit_run(&xs, &a, &ks, x, 1, 4.0), KMV_ENOMEM);
        st.fail_at = 0;
        assert_int_equal(st.live, held);
        assert_null(xs.xp);
        assert_null(xs.wp);
        assert_null(xs.h1);
        kmv__xsplit_free(&xs, &a);
    }
    free(x);
    kmv__keystore_free(&ks, &a);
    assert_int_equal(st.live, 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_random),
        cmocka_unit_test(test_boundaries),
        cmocka_unit_test(test_zero_and_single),
        cmocka_unit_test(test_alloc_failures),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
