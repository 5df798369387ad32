#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
/* The randomly ordered key store (algo/keystore.h): id_at and pos_of are
 * inverse permutations of 0..n-1 and row p holds key id_at[p] bit for bit;
 * the order is the same whether keys arrive in one block or many, and
 * depends on the seed alone; reserve then append cannot fail; failures
 * leave the store as it was; and the order is uniformly random: over fixed
 * lists of seeds the position of a key, and the whole permutation of a
 * small store, fit the uniform law (chi-square, with bounds a uniform
 * shuffle exceeds with probability below 1e-9; fixed seeds make the test
 * deterministic). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/alloc.h"
#include "algo/keystore.h"
#include "tests/testutil.h"

/* The store's invariants against the keys appended so far (arrival
 * order): a permutation, its inverse, and the rows. */
static void check_store(const kmv__keystore *ks, const float *keys, size_t n) {
    assert_int_equal(ks->n, n);
    assert_true(ks->cap >= n);
    size_t d = ks->d;
    unsigned char *seen = calloc(n ? n : 1, 1);
    for (size_t p = 0; p < n; p++) {
        uint32_t id = ks->id_at[p];
        assert_true(id < n);
        assert_false(seen[id]);
        seen[id] = 1;
        assert_int_equal(ks->pos_of[id], p);
        assert_memory_equal(ks->rows + p * d, keys + (size_t)id * d, d * sizeof(float));
        assert_ptr_equal(kmv__keystore_row(ks, id), ks->rows + p * d);
    }
    free(seen);
}

/* Keys whose every bit matters: random floats with a key's id stamped in
 * its first coordinate, so a swapped or torn row cannot pass. */
static float *keys_for(size_t n, size_t d, uint64_t seed) {
    float *k = tu_random(n * d, seed, 1000.0f);
    for (size_t j = 0; j < n; j++) k[j * d] = (float)j;
    return k;
}

static void test_permutation(void **state) {
    (void)state;
    tu_alloc_state st = {0, 0, 0};
    kmv_allocator a = tu_allocator(&st);
    size_t n = 3000, d = 5;
    float *k = keys_for(n, d, 1);
    kmv__keystore ks;
    kmv__keystore_init(&ks, d, 42);
    assert_int_equal(ks.n, 0);
    assert_int_equal(st.calls, 0); /* init allocates nothing */
    /* Grown one key at a time through several doublings, checked along
     * the way. */
    for (size_t j = 0; j < n; j++) {
        assert_int_equal(kmv__keystore_append(&ks, &a, k + j * d, 1), KMV_OK);
        if (j % 97 == 0 || j == n - 1) check_store(&ks, k, j + 1);
    }
    /* A random order: not the identity, nor close to it. */
    size_t fixed = 0;
    for (size_t p = 0; p < n; p++) fixed += ks.id_at[p] == p;
    assert_true(fixed < 10); /* about 1 expected */
    /* Appending nothing changes nothing. */
    assert_int_equal(kmv__keystore_append(&ks, &a, NULL, 0), KMV_OK);
    check_store(&ks, k, n);
    kmv__keystore_free(&ks, &a);
    assert_int_equal(st.live, 0);
    assert_null(ks.rows);
    assert_int_equal(ks.n, 0);
    /* d = 1 and a single key. */
    kmv__keystore_init(&ks, 1, 7);
    assert_int_equal(kmv__keystore_append(&ks, &a, k, 1), KMV_OK);
    check_store(&ks, k, 1);
    assert_int_equal(ks.id_at[0], 0);
    kmv__keystore_free(&ks, &a);
    free(k);
}

/* The same seed and keys give the same store, bit for bit, for any split
 * of the keys into blocks (the inside-out shuffle's promise); another seed
 * gives another order. */
static void test_blocks_and_seed(void **state) {
    (void)state;
    tu_alloc_state st = {0, 0, 0};
    kmv_allocator a = tu_allocator(&st);
    size_t n = 2500, d = 3;
    float *k = keys_for(n, d, 2);
    kmv__keystore one;
    kmv__keystore_init(&one, d, 99);
    assert_int_equal(kmv__keystore_append(&one, &a, k, n), KMV_OK);
    check_store(&one, k, n);
    const size_t splits[][6] = {
        {1, 2, 3, 500, 1994, 0},  /* ragged blocks summing to n */
        {64, 64, 1, 1000, 1371, 0}, /* across the first growth at 64 */
        {2499, 1, 0, 0, 0, 0},
    };
    for (size_t sp = 0; sp < 3; sp++) {
        kmv__keystore many;
        kmv__keystore_init(&many, d, 99);
        size_t done = 0;
        for (size_t b = 0; b < 6 && splits[sp][b]; b++) {
            assert_int_equal(kmv__keystore_append(&many, &a, k + done * d, splits[sp][b]), KMV_OK);
            done += splits[sp][b];
        }
        assert_int_equal(done, n);
        assert_memory_equal(many.id_at, one.id_at, n * sizeof(uint32_t));
        assert_memory_equal(many.pos_of, one.pos_of, n * sizeof(uint32_t));
        assert_memory_equal(many.rows, one.rows, n * d * sizeof(float));
        assert_true(many.rng == one.rng); /* the next append goes alike too */
        kmv__keystore_free(&many, &a);
    }
    /* With a reservation up front: same order (allocation never touches
     * the shuffle stream). */
    kmv__keystore res;
    kmv__keystore_init(&res, d, 99);
    assert_int_equal(kmv__keystore_reserve(&res, &a, n), KMV_OK);
    assert_int_equal(kmv__keystore_append(&res, &a, k, n), KMV_OK);
    assert_memory_equal(res.id_at, one.id_at, n * sizeof(uint32_t));
    kmv__keystore_free(&res, &a);
    /* Another seed: another order (equal by chance with probability 1/n!). */
    kmv__keystore other;
    kmv__keystore_init(&other, d, 100);
    assert_int_equal(kmv__keystore_append(&other, &a, k, n), KMV_OK);
    check_store(&other, k, n);
    size_t same = 0;
    for (size_t p = 0; p < n; p++) same += other.id_at[p] == one.id_at[p];
    assert_true(same < 10);
    kmv__keystore_free(&other, &a);
    kmv__keystore_free(&one, &a);
    assert_int_equal(st.live, 0);
    free(k);
}

/* After reserve(count), appends totalling count allocate nothing, so even
 * an allocator that fails every call cannot make them fail; a failed
 * reserve or append leaves the store exactly as it was; overflow is
 * refused. */
static void test_reserve_and_failures(void **state) {
    (void)state;
    tu_alloc_state st = {0, 0, 0};
    kmv_allocator a = tu_allocator(&st);
    size_t d = 4, n = 1500;
    float *k = keys_for(n, d, 3);
    kmv__keystore ks;
    kmv__keystore_init(&ks, d, 5);
    assert_int_equal(kmv__keystore_append(&ks, &a, k, 100), KMV_OK);
    assert_int_equal(kmv__keystore_reserve(&ks, &a, 500), KMV_OK);
    assert_true(ks.cap >= 600);
    long calls = st.calls;
    st.fail_at = calls + 1; /* the next allocation would fail */
    assert_int_equal(kmv__keystore_append(&ks, &a, k + 100 * d, 250), KMV_OK);
    assert_int_equal(kmv__keystore_append(&ks, &a, k + 350 * d, 250), KMV_OK);
    assert_int_equal(st.calls, calls); /* nothing allocated */
    check_store(&ks, k, 600);
    /* Past the capacity (1024 after the doublings), growing fails, and
     * leaves the store as it was, for each of the three arrays failing. */
    assert_true(ks.cap < n);
    uint32_t *id_at = malloc(600 * sizeof(uint32_t));
    memcpy(id_at, ks.id_at, 600 * sizeof(uint32_t));
    uint64_t rng = ks.rng;
    size_t cap = ks.cap;
    for (long f = 1; f <= 3; f++) {
        st.fail_at = st.calls + f;
        assert_int_equal(kmv__keystore_append(&ks, &a, k + 600 * d, n - 600), KMV_ENOMEM);
        st.fail_at = 0;
        assert_int_equal(ks.cap, cap);
        assert_true(ks.rng == rng);
        assert_memory_equal(ks.id_at, id_at, 600 * sizeof(uint32_t));
        check_store(&ks, k, 600);
        st.fail_at = st.calls + f;
        assert_int_equal(kmv__keystore_reserve(&ks, &a, n - 600), KMV_ENOMEM);
        st.fail_at = 0;
        assert_int_equal(ks.cap, cap);
        check_store(&ks, k, 600);
    }
    /* Past KMV__KEYS_MAX: refused before any allocation. */
    calls = st.calls;
    assert_int_equal(kmv__keystore_reserve(&ks, &a, KMV__KEYS_MAX), KMV_EOVERFLOW);
    assert_int_equal(kmv__keystore_reserve(&ks, &a, SIZE_MAX), KMV_EOVERFLOW);
    assert_int_equal(kmv__keystore_append(&ks, &a, k, SIZE_MAX / 2), KMV_EOVERFLOW);
    assert_int_equal(st.calls, calls);
    check_store(&ks, k, 600);
    /* And the failures did not disturb the order to come: finishing the
     * keys gives the store a fresh one would have. */
    assert_int_equal(kmv__keystore_append(&ks, &a, k + 600 * d, n - 600), KMV_OK);
    check_store(&ks, k, n);
    kmv__keystore fresh;
    kmv__keystore_init(&fresh, d, 5);
    assert_int_equal(kmv__keystore_append(&fresh, &a, k, n), KMV_OK);
    assert_memory_equal(ks.id_at, fresh.id_at, n * sizeof(uint32_t));
    kmv__keystore_free(&fresh, &a);
    kmv__keystore_free(&ks, &a);
    assert_int_equal(st.live, 0);
    free(id_at), free(k);
}

/* Uniformity over fixed seeds 1..SEEDS:
 * - in a store of 10 keys, the positions of the first key, the last key
 *   and a middle one are each uniform over 10 places (9 df each);
 * - in a store of 4 keys, the 24 permutations are equally likely (23 df).
 * A shuffle that skipped the swap, or drew r from [0, n) instead of
 * [0, n], misses these bounds by orders of magnitude. */
#define SEEDS 24000

static int perm_index4(const uint32_t *id_at) {
    /* Lehmer code of a permutation of 0..3. */
    int idx = 0;
    for (int i = 0; i < 4; i++) {
        int smaller = 0;
        for (int j = i + 1; j < 4; j++) smaller += id_at[j] < id_at[i];
        idx = idx * (4 - i) + smaller;
    }
    return idx;
}

static double chi2(const unsigned long *count, size_t cells, double total) {
    double e = total / (double)cells, s = 0.0;
    for (size_t i = 0; i < cells; i++) s += ((double)count[i] - e) * ((double)count[i] - e) / e;
    return s;
}

static void test_uniform(void **state) {
    (void)state;
    tu_alloc_state st = {0, 0, 0};
    kmv_allocator a = tu_allocator(&st);
    float k[10];
    for (int j = 0; j < 10; j++) k[j] = (float)j;
    unsigned long first[10] = {0}, last[10] = {0}, mid[10] = {0}, perm[24] = {0};
    for (uint64_t seed = 1; seed <= SEEDS; seed++) {
        kmv__keystore ks;
        kmv__keystore_init(&ks, 1, seed);
        /* In two blocks, so the test covers appends to a non-empty store. */
        assert_int_equal(kmv__keystore_append(&ks, &a, k, 4), KMV_OK);
        perm[perm_index4(ks.id_at)]++;
        assert_int_equal(kmv__keystore_append(&ks, &a, k + 4, 6), KMV_OK);
        first[ks.pos_of[0]]++;
        mid[ks.pos_of[4]]++;
        last[ks.pos_of[9]]++;
        kmv__keystore_free(&ks, &a);
    }
    /* Bounds df + 10 sqrt(2 df): 9 df -> 51.4, 23 df -> 90.8; by
     * Wilson-Hilferty each is exceeded with probability below 1e-9. */
    double b9 = 9.0 + 10.0 * sqrt(18.0), b23 = 23.0 + 10.0 * sqrt(46.0);
    double c1 = chi2(first, 10, SEEDS), c2 = chi2(mid, 10, SEEDS), c3 = chi2(last, 10, SEEDS);
    double c4 = chi2(perm, 24, SEEDS);
    if (!(c1 <= b9 && c2 <= b9 && c3 <= b9))
        fail_msg("positions: chi-square %.1f, %.1f, %.1f on 9 df", c1, c2, c3);
    if (!(c4 <= b23)) fail_msg("permutations of 4: chi-square %.1f on 23 df", c4);
    assert_int_equal(st.live, 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_permutation),
        cmocka_unit_test(test_blocks_and_seed),
        cmocka_unit_test(test_reserve_and_failures),
        cmocka_unit_test(test_uniform),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
