#define _XOPEN_SOURCE 700 /* POSIX.1-2008 with XSI, before any header: no -D needed */
/* The LSH cost model (algo/costmodel.h) and the collision probability it
 * rests on (kmv__lsh_collision, algo/lsh.h), against direct computations:
 *
 * - kmv__lsh_collision(u) against numerical integration in double of
 *   Datar et al.'s p(r, w) = int_0^w (1/r) f(t/r) (1 - t/w) dt, f the
 *   density of |N(0, 1)|, at u = r / w over five decades;
 * - kmv__lsh_choose: the shape meets the recall requirement
 *   1 - (1 - p1^k)^L >= 1 - miss with p1 = p(r_near / w), with the fewest
 *   tables that do; L <= KMV__LSH_MAX_TABLES; the predicted cost is the
 *   cost formula on the returned shape, steps and candidates; steps and
 *   candidates match a recomputation over the documented sample (every
 *   query when m <= 32, the first 256 keys of the random order) with the
 *   exact p; no shape on the planner's grid (the widths it tries, k up to
 *   24) is cheaper by the same recomputation; deterministic in the seed;
 *   refusal (1) when no shape reaches the recall; allocation failures;
 * - the cost helpers against their formulas. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/alloc.h"
#include "algo/costmodel.h"
#include "algo/keystore.h"
#include "algo/lsh.h"
#include "tests/datagen.h"
#include "tests/testutil.h"

/* kmv__lsh_choose(), 1 when no shape reaches the recall. */
static int choose(const kmv_allocator *al, const kmv__keystore *ks, const float *q, size_t m,
                  double r_near, double miss, double kpq, uint64_t seed, kmv__lsh_plan *out) {
    int found;
    int rc = kmv__lsh_choose(al, ks, q, m, r_near, miss, kpq, seed, out, &found);
    return rc == KMV_OK && !found ? 1 : rc;
}

/* p(u) by composite Simpson over s = t / w in [0, 1]:
 * p = int_0^1 (2 / u) phi(s / u) (1 - s) ds, phi the standard normal
 * density (f = 2 phi on [0, inf)). */
static double collision_numeric(double u) {
    const int N = 200000; /* even; h = 5e-6, fine for u >= 1e-3 */
    double h = 1.0 / N, acc = 0.0;
    for (int i = 0; i <= N; i++) {
        double s = i * h;
        double g = 2.0 / u * exp(-0.5 * (s / u) * (s / u)) / sqrt(2.0 * M_PI) * (1.0 - s);
        acc += g * (i == 0 || i == N ? 1.0 : i % 2 ? 4.0 : 2.0);
    }
    return acc * h / 3.0;
}

static void test_collision(void **state) {
    (void)state;
    const double us[] = {0.001, 0.01, 0.05, 0.1, 0.3, 0.5, 0.7071, 1.0, 1.5, 2.0, 3.0,
                         5.0, 8.0, 15.99, 16.0, 30.0, 100.0};
    for (size_t i = 0; i < sizeof us / sizeof us[0]; i++) {
        double got = kmv__lsh_collision(us[i]), want = collision_numeric(us[i]);
        if (!(fabs(got - want) <= 1e-10 + 1e-8 * want))
            fail_msg("u %g: p %.15g, numeric %.15g", us[i], got, want);
    }
    /* Limits: 1 at distance 0 (and below), 1 - sqrt(2/pi) u for small u,
     * 1 / (sqrt(2 pi) u) for large u; decreasing in between. */
    assert_true(kmv__lsh_collision(0.0) == 1.0);
    assert_true(kmv__lsh_collision(-1.0) == 1.0);
    assert_true(fabs(kmv__lsh_collision(1e-6) - (1.0 - sqrt(2.0 / M_PI) * 1e-6)) <= 1e-12);
    assert_true(fabs(kmv__lsh_collision(1e4) * sqrt(2.0 * M_PI) * 1e4 - 1.0) <= 1e-3);
    double prev = 1.0;
    for (double u = 1e-3; u < 1e3; u *= 1.1) {
        double p = kmv__lsh_collision(u);
        assert_true(p > 0.0 && p < prev);
        prev = p;
    }
}

static void test_cost_helpers(void **state) {
    (void)state;
    const double ds[] = {1.0, 64.0, 100.0};
    for (int i = 0; i < 3; i++) {
        double d = ds[i];
        assert_true(kmv__cost_exact(d) == 0.5 + 0.025 * d);
        assert_true(kmv__cost_cand(d) == 20.0 + 0.15 * d);
        assert_true(kmv__cost_window(d) == 1.5 + 0.07 * d);
        const kmv__lsh_shape sh[] = {{1, 1, 1.0}, {7, 40, 2.5}, {24, 160, 0.3}};
        for (int j = 0; j < 3; j++) {
            double kl = (double)sh[j].k * sh[j].L;
            assert_true(fabs(kmv__cost_hash(&sh[j], d) - (0.03 * kl * d + 140.0 * sh[j].L)) <=
                        1e-12 * kmv__cost_hash(&sh[j], d));
            assert_true(fabs(kmv__cost_insert(&sh[j], d) - (0.03 * kl * d + 190.0 * sh[j].L)) <=
                        1e-12 * kmv__cost_insert(&sh[j], d));
            /* An insert costs more than a lookup: the difference is the
             * bucket growth, per table. */
            assert_true(fabs(kmv__cost_insert(&sh[j], d) - kmv__cost_hash(&sh[j], d) -
                             50.0 * sh[j].L) <= 1e-9);
        }
    }
    assert_true(KMV__COST_STEP == 2.0 && KMV__COST_LOOKUP == 140.0 && KMV__COST_INSERT == 190.0);
    assert_true(KMV__COST_PROJ == 0.03 && KMV__COST_WIDE == 1.9);
}

/* Clustered keys (Assumption A data) in a random-order store, and queries
 * from the same clusters. */
typedef struct data {
    kmv__keystore ks;
    float *keys, *q;
    size_t n, m, d;
} data;

static void data_make(data *g, const kmv_allocator *a, size_t n, size_t m, size_t d, uint64_t seed) {
    g->n = n, g->m = m, g->d = d;
    g->keys = malloc(n * d * sizeof(float));
    g->q = malloc(m * d * sizeof(float));
    dg_clustered(g->keys, n, g->q, m, d, 16, 1.0, seed);
    kmv__keystore_init(&g->ks, d, seed);
    assert_int_equal(kmv__keystore_append(&g->ks, a, g->keys, n), KMV_OK);
}

static void data_free(data *g, const kmv_allocator *a) {
    kmv__keystore_free(&g->ks, a);
    free(g->keys), free(g->q);
}

/* A shape's steps, candidates and cost per query recomputed over the
 * documented sample with the exact p (m <= 32 queries: all of them).
 * dist holds the sample's pair distances, in double. */
typedef struct recomputed {
    double steps, cands, cost;
} recomputed;

static double *pair_distances(const data *g, size_t *pairs) {
    size_t pk = g->n < KMV__PLAN_KEYS ? g->n : KMV__PLAN_KEYS;
    double *dist = malloc(g->m * pk * sizeof(double));
    for (size_t a = 0; a < g->m; a++)
        for (size_t b = 0; b < pk; b++) {
            double d2 = 0.0;
            for (size_t t = 0; t < g->d; t++) {
                double u = (double)g->q[a * g->d + t] - g->ks.rows[b * g->d + t];
                d2 += u * u;
            }
            dist[a * pk + b] = sqrt(d2);
        }
    *pairs = g->m * pk;
    return dist;
}

static recomputed recompute(const data *g, const double *dist, size_t pairs, kmv__lsh_shape sh,
                            double keys_per_query) {
    double steps = 0.0, cands = 0.0;
    for (size_t i = 0; i < pairs; i++) {
        double pkk = pow(kmv__lsh_collision(dist[i] / sh.w), sh.k);
        steps += sh.L * pkk;
        cands += sh.L * pkk < 1.0 ? sh.L * pkk : 1.0;
    }
    /* Pairs per query in the full data: n / (sample keys) per sampled pair. */
    double scale = (double)g->n / (double)pairs;
    recomputed r = {steps * scale, cands * scale, 0.0};
    r.cost = kmv__cost_hash(&sh, (double)g->d) + kmv__cost_insert(&sh, (double)g->d) * keys_per_query +
             KMV__COST_STEP * r.steps + kmv__cost_cand((double)g->d) * r.cands;
    return r;
}

/* The fewest tables with near-collision probability p1^k that miss with
 * probability <= miss (in double, by counting up). */
static int min_tables(double pk, double miss) {
    double fail = 1.0;
    for (int L = 1; L <= 100000; L++) {
        fail *= 1.0 - pk;
        if (fail <= miss) return L;
    }
    return 100001;
}

static void close_rel(double got, double want, double rel, double abs, const char *what) {
    if (!(fabs(got - want) <= rel * fabs(want) + abs))
        fail_msg("%s: got %.12g, want %.12g", what, got, want);
}

/* The widths the planner tries, as multiples of r_near (costmodel.c). */
static const double WMUL[8] = {0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0, 5.6};

static void check_plan(const data *g, const kmv_allocator *a, double r_near, double miss,
                       double kpq, uint64_t seed) {
    kmv__lsh_plan plan;
    assert_int_equal(choose(a, &g->ks, g->q, g->m, r_near, miss, kpq, seed, &plan), KMV_OK);
    kmv__lsh_shape sh = plan.shape;
    assert_true(sh.k >= 1 && sh.L >= 1 && sh.L <= KMV__LSH_MAX_TABLES);
    assert_true(sh.w > 0.0 && isfinite(sh.w));
    /* Recall at distance r_near (closer keys collide more often). */
    double p1 = kmv__lsh_collision(r_near / sh.w), pk = pow(p1, sh.k);
    double fail = pow(1.0 - pk, sh.L);
    if (!(fail <= miss * (1.0 + 1e-9)))
        fail_msg("k %d L %d w %g: miss probability %.6g > %.6g", sh.k, sh.L, sh.w, fail, miss);
    /* ... with no table to spare: one fewer would miss too often. */
    assert_int_equal(sh.L, min_tables(pk, miss));
    /* The predicted cost is the formula on the plan's own counts. */
    double cost = kmv__cost_hash(&sh, (double)g->d) + kmv__cost_insert(&sh, (double)g->d) * kpq +
                  KMV__COST_STEP * plan.steps_per_query +
                  kmv__cost_cand((double)g->d) * plan.cands_per_query;
    close_rel(plan.cost_per_query, cost, 1e-12, 0.0, "cost formula");
    assert_true(plan.steps_per_query >= 0.0 && plan.cands_per_query >= 0.0);
    assert_true(plan.cands_per_query <= (double)g->n * (1.0 + 1e-12));
    assert_true(plan.cands_per_query <= plan.steps_per_query * (1.0 + 1e-12));
    if (g->m > KMV__PLAN_QUERIES) return; /* the query sample is random */
    /* Steps and candidates over the documented sample: the planner
     * interpolates p from a table (to 1e-5), hence the tolerance. */
    size_t pairs;
    double *dist = pair_distances(g, &pairs);
    recomputed rc = recompute(g, dist, pairs, sh, kpq);
    close_rel(plan.steps_per_query, rc.steps, 2e-3, 1e-6 * (double)g->n, "steps");
    close_rel(plan.cands_per_query, rc.cands, 2e-3, 1e-6 * (double)g->n, "candidates");
    /* No shape of the grid is cheaper (by the same recomputation; each
     * width's p per pair once, then its powers). */
    double best = INFINITY;
    int bk = 0, bL = 0;
    double bw = 0.0;
    double *pw = malloc(pairs * sizeof(double)), *pkk = malloc(pairs * sizeof(double));
    for (int w = 0; w < 8; w++) {
        double width = WMUL[w] * r_near, p1w = kmv__lsh_collision(1.0 / WMUL[w]);
        for (size_t i = 0; i < pairs; i++) pw[i] = kmv__lsh_collision(dist[i] / width), pkk[i] = 1.0;
        for (int k = 1; k <= 24; k++) {
            double steps = 0.0, cands = 0.0;
            int L = min_tables(pow(p1w, k), miss);
            for (size_t i = 0; i < pairs; i++) {
                pkk[i] *= pw[i];
                steps += L * pkk[i];
                cands += L * pkk[i] < 1.0 ? L * pkk[i] : 1.0;
            }
            if (L > KMV__LSH_MAX_TABLES) continue;
            kmv__lsh_shape s2 = {k, L, width};
            double scale = (double)g->n / (double)pairs;
            double c2 = kmv__cost_hash(&s2, (double)g->d) + kmv__cost_insert(&s2, (double)g->d) * kpq +
                        KMV__COST_STEP * steps * scale + kmv__cost_cand((double)g->d) * cands * scale;
            if (c2 < best) best = c2, bk = k, bL = L, bw = width;
        }
    }
    free(pw), free(pkk), free(dist);
    if (!(rc.cost <= best * (1.0 + 2e-3)))
        fail_msg("chosen k %d L %d w %g costs %.6g; k %d L %d w %g costs %.6g", sh.k, sh.L, sh.w,
                 rc.cost, bk, bL, bw, best);
}

static void test_choose(void **state) {
    (void)state;
    tu_alloc_state st = {0, 0, 0};
    kmv_allocator a = tu_allocator(&st);
    data g;
    /* d = 16: cluster mates about 1.4 apart, other clusters about 5.7. */
    data_make(&g, &a, 3000, 24, 16, 1);
    const double kappas[] = {0.3, 0.05, 0.005};
    /* 1e-12 pushes the cheapest k's past 160 tables: the limit binds. */
    const double misses[] = {0.1, 1e-3, 1e-6, 1e-12};
    const double kpqs[] = {0.0, 125.0};
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 4; j++)
            for (int t = 0; t < 2; t++)
                check_plan(&g, &a, sqrt(2.0 * log(1.0 / kappas[i])), misses[j], kpqs[t], 7);
    data_free(&g, &a);
    /* Fewer keys than the sample (all of them used), one query. */
    data_make(&g, &a, 100, 1, 8, 2);
    check_plan(&g, &a, 1.5, 0.01, 100.0, 3);
    data_free(&g, &a);
    /* More queries than the sample: the checks that do not need it. */
    data_make(&g, &a, 2000, 200, 16, 3);
    check_plan(&g, &a, 2.0, 0.01, 10.0, 4);
    data_free(&g, &a);
    assert_int_equal(st.live, 0);
}

/* The same seed gives the same plan, bit for bit; inserting keys costs,
 * so a higher keys_per_query never gives more tables. */
static void test_deterministic(void **state) {
    (void)state;
    tu_alloc_state st = {0, 0, 0};
    kmv_allocator a = tu_allocator(&st);
    data g;
    data_make(&g, &a, 2000, 200, 16, 5);
    kmv__lsh_plan p1, p2, p3;
    assert_int_equal(choose(&a, &g.ks, g.q, g.m, 2.0, 0.01, 0.0, 11, &p1), KMV_OK);
    assert_int_equal(choose(&a, &g.ks, g.q, g.m, 2.0, 0.01, 0.0, 11, &p2), KMV_OK);
    assert_int_equal(p1.shape.k, p2.shape.k);
    assert_int_equal(p1.shape.L, p2.shape.L);
    assert_memory_equal(&p1.shape.w, &p2.shape.w, sizeof(double));
    assert_memory_equal(&p1.steps_per_query, &p2.steps_per_query, sizeof(double));
    assert_memory_equal(&p1.cands_per_query, &p2.cands_per_query, sizeof(double));
    assert_memory_equal(&p1.cost_per_query, &p2.cost_per_query, sizeof(double));
    /* Another seed samples other queries: other counts (the shape may
     * well agree). */
    assert_int_equal(choose(&a, &g.ks, g.q, g.m, 2.0, 0.01, 0.0, 12, &p3), KMV_OK);
    assert_true(p3.steps_per_query != p1.steps_per_query);
    /* Costlier inserts: no more tables than before. */
    double prevL = INFINITY;
    const double kpqs[] = {0.0, 10.0, 100.0, 1e4};
    for (int t = 0; t < 4; t++) {
        assert_int_equal(choose(&a, &g.ks, g.q, g.m, 2.0, 0.01, kpqs[t], 11, &p3), KMV_OK);
        assert_true(p3.shape.L <= prevL);
        prevL = p3.shape.L;
    }
    data_free(&g, &a);
    assert_int_equal(st.live, 0);
}

/* With more than 32 queries the planner samples them uniformly: half the
 * queries here are far from every key (they collide with nothing), half
 * from the clusters, so a sample biased to either half shows. Over seeds
 * 1..20 the planned steps per query, divided by the same shape's steps
 * recomputed over all queries, average to 1: each seed's ratio is twice
 * the near fraction of 32 draws (standard deviation about 0.18), so the
 * mean of 20 has 0.04, and 0.25 is six of those. */
static void test_query_sample(void **state) {
    (void)state;
    tu_alloc_state st = {0, 0, 0};
    kmv_allocator a = tu_allocator(&st);
    data g;
    data_make(&g, &a, 2000, 200, 16, 8);
    for (size_t i = 0; i < 100; i++)
        for (size_t t = 0; t < g.d; t++) g.q[i * g.d + t] += 100.0f;
    data all = g;
    double ratio = 0.0;
    for (uint64_t seed = 1; seed <= 20; seed++) {
        kmv__lsh_plan p;
        assert_int_equal(choose(&a, &g.ks, g.q, g.m, 2.0, 0.01, 0.0, seed, &p), KMV_OK);
        size_t pairs;
        double *dist = pair_distances(&all, &pairs);
        recomputed rc = recompute(&all, dist, pairs, p.shape, 0.0);
        free(dist);
        ratio += p.steps_per_query / rc.steps;
    }
    ratio /= 20.0;
    if (!(fabs(ratio - 1.0) <= 0.25)) fail_msg("planned / actual steps %.3f", ratio);
    data_free(&g, &a);
    assert_int_equal(st.live, 0);
}

/* Keys so far away that their squared distance overflows float (3e19 in a
 * coordinate) never collide: they used to give NaN and every cost NaN, so
 * no shape was ever chosen and the engine ran exact, even when forced. */
static void test_far_keys(void **state) {
    (void)state;
    assert_true(kmv__lsh_collision(INFINITY) == 0.0);
    assert_true(kmv__lsh_collision(NAN) == 0.0);
    tu_alloc_state st = {0, 0, 0};
    kmv_allocator a = tu_allocator(&st);
    data g;
    data_make(&g, &a, 1000, 40, 8, 6);
    kmv__lsh_plan p, far;
    assert_int_equal(choose(&a, &g.ks, g.q, g.m, 2.0, 0.01, 0.0, 1, &p), KMV_OK);
    g.ks.rows[0] = 3e19f;
    assert_int_equal(choose(&a, &g.ks, g.q, g.m, 2.0, 0.01, 0.0, 1, &far), KMV_OK);
    assert_true(isfinite(far.cost_per_query) && far.shape.L >= 1);
    data_free(&g, &a);
    assert_int_equal(st.live, 0);
}

/* No shape reaches the recall with at most 160 tables: 1 (at miss =
 * 1e-300 even k = 1 at the widest width needs 355). Allocation
 * failures: KMV_ENOMEM and nothing held. */
static void test_refusal_and_failures(void **state) {
    (void)state;
    tu_alloc_state st = {0, 0, 0};
    kmv_allocator a = tu_allocator(&st);
    data g;
    data_make(&g, &a, 500, 10, 8, 6);
    kmv__lsh_plan p;
    assert_int_equal(choose(&a, &g.ks, g.q, g.m, 2.0, 1e-300, 0.0, 1, &p), 1);
    /* Just past the limit: 237 tables at k = 1, width 5.6 r_near (the
     * widest the planner tries, where p1 is largest), refused too. */
    double p1 = kmv__lsh_collision(1.0 / 5.6);
    assert_int_equal(min_tables(p1, 1e-200), 237);
    assert_int_equal(choose(&a, &g.ks, g.q, g.m, 2.0, 1e-200, 0.0, 1, &p), 1);
    /* ... and at 1e-60 (k = 1 needs 71 tables) it is not. */
    assert_int_equal(choose(&a, &g.ks, g.q, g.m, 2.0, 1e-60, 0.0, 1, &p), KMV_OK);
    assert_true(p.shape.L <= KMV__LSH_MAX_TABLES);
    long held = st.live;
    for (long f = 1; f <= 3; f++) {
        st.fail_at = st.calls + f;
        assert_int_equal(choose(&a, &g.ks, g.q, g.m, 2.0, 0.01, 0.0, 1, &p), KMV_ENOMEM);
        st.fail_at = 0;
        assert_int_equal(st.live, held);
    }
    data_free(&g, &a);
    assert_int_equal(st.live, 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_collision),
        cmocka_unit_test(test_cost_helpers),
        cmocka_unit_test(test_choose),
        cmocka_unit_test(test_deterministic),
        cmocka_unit_test(test_query_sample),
        cmocka_unit_test(test_far_keys),
        cmocka_unit_test(test_refusal_and_failures),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
