/* Internal: the index's layout, for the engine's own files (index.c, its
 * life cycle and tables; batch.c, the product) and for the tests. The
 * layers above use the functions of index.h. */
#ifndef KMV_ENGINE_INDEX_LAYOUT_H
#define KMV_ENGINE_INDEX_LAYOUT_H

#include "algo/costmodel.h"
#include "algo/keystore.h"
#include "algo/lsh.h"
#include "algo/tree.h"
#include "common/alloc.h"
#include "common/params.h"
#include "engine/index.h"

struct kmv_index {
    kmv__params params;
    kmv__meter meter;    /* counts and caps (params.max_bytes) what alloc takes */
    kmv_allocator alloc; /* draws through meter */
    size_t d;
    kmv__keystore ks;
    kmv__lsh lsh;        /* valid when lsh_built */
    int lsh_built;
    size_t lsh_n;        /* keys when the tables were planned */
    double kappa;        /* heavy threshold they were planned for */
    kmv__lsh_plan plan;
    size_t refused_n;    /* 1 + the key count at which the approximate plan
                            last passed params.max_bytes (0: never): products
                            at that count go straight to the exact engine */
    /* Work counters, all time: what "grows in place" is tested by. */
    uint64_t keys_hashed;   /* keys projected into the LSH tables */
    uint64_t table_inserts; /* (key, table) inserts */
    uint64_t table_builds;  /* times the tables were planned and filled */
    kmv__tree tree;      /* the bounds tree, valid when tree_built: a cache
                            over keys 0..tree.n - 1, dropped with the tables */
    int tree_built;
    uint64_t tree_builds;
    int force_approx;    /* params.force_approx (tests set it through
                            kmv__index_set_force_approx() too): skip every
                            cost-model fallback, so the approximate path's
                            guarantee can be measured where exact is
                            cheaper */
};

#endif /* KMV_ENGINE_INDEX_LAYOUT_H */
