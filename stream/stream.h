/* Internal: the stream's layout, shared by the incremental engine's files:
 * stream.c (life cycle, appends, batch products), step*.c (the decoding
 * step), attention.c (attention streams), attention_batch.c (batch
 * attention as a stream's steps) and snapshot.c (save and load). The
 * index under it is reached through engine/index.h's functions. */
#ifndef KMV_STREAM_H
#define KMV_STREAM_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "algo/sketch.h"
#include "algo/tree.h"
#include "common/params.h"
#include "engine/index.h"

/* Windows an attention step may draw before it runs the exact row. */
#define KMV__ATTN_ROUNDS 4

struct kmv__step_kind;

/* What a stream's bounds tree does for its steps. */
enum kmv__tree_mode {
    TREE_NONE = 0,    /* none held */
    TREE_STANDBY = 1, /* held; serves where the LSH plan is refused (the
                         plan's cap is the tree's cost) */
    TREE_SERVES = 2   /* held, and the steps take it */
};

struct kmv_stream {
    kmv_index *ix;   /* keys in the store's random order, the tables, the
                        params and the metered allocator */
    const struct kmv__step_kind *kind; /* what its decoding steps do */
    size_t d, c;
    /* Per key, rows allocated: cap. */
    float *x;        /* n x c, id order: the values given at append */
    float *xs;       /* n x c, store order: what the steps' windows read */
    double *ws;      /* n weights ||x_j||^2, store order */
    double *wid;     /* n weights, id order */
    size_t cap;
    double nx2;      /* sum of the weights, added in id order */
    kmv__sketch sk;  /* every key of positive weight, added in id order */
    uint64_t sketch_inserts;
    /* The sketch's current draws were made at drawn_n keys below drawn_w. */
    size_t drawn_n;
    double drawn_w;
    /* Queries, id order. */
    float *q;
    size_t m, qcap;
    size_t decode_refused_n; /* keys when the steps' plan was last refused */
    int decode_refused_cap;  /* ... because it did not fit params.max_bytes */
    /* Attention streams (kmv_stream_attention_create): d and c above are
     * the lifted dim + 1 and n_cols + 1 (x holds [v, 1]). */
    int attn;
    double scale;     /* logit scale s; sigma = 1 / sqrt(s) */
    double key_bound; /* the lift's alpha: max ||k||^2 so far */
    double *kn2;      /* kn2cap, id order: ||k||^2 of each key before lifting */
    size_t kn2cap;
    double wmax;      /* max ||x_j||^2 = 1 + R^2 */
    /* The empirical budget's normal quantiles: the row sum's lower bound
     * (one-sided) and the error's (two-sided), each at delta / 4 over the
     * KMV__ATTN_ROUNDS windows a step may draw. */
    double z_sum, z_err;
    uint64_t relifts;
    /* The Gaussian steps' bounds tree (step_tree.c): built over the first
     * tree_nb keys (a power of two), grown key by key since. */
    kmv__tree tree;
    kmv__tree_mass tmass;  /* la, ga and ls over the tree's keys */
    size_t tree_nb;        /* 0: no tree tried at this size */
    double tree_nx2;       /* sum of the weights of the tree's keys */
    double tree_cost;      /* a step through it, in the cost model's units */
    int tree_mode;         /* a kmv__tree_mode */
    uint64_t tree_builds, tree_inserts;
    double tree_seconds_insert; /* inserting keys since the builds */
    /* The steps' backoff (step.c): after KMV__BACKOFF_FAILS steps in a
     * row tried the approximate path and ran exact, the next `skip` steps
     * go straight to the exact row (the same row they would have ended
     * with), the span doubling while retries fail. Atomics: steps run
     * concurrently under the read lock. */
    atomic_uint fails, skip, span;
    atomic_int skip_reason;
    atomic_ulong steps_taken; /* kmv_stream_decode calls: the monitor's count */
    /* Decoding steps read under it and write (tables, draws, refusals)
     * under its write side; every other call has the stream to itself. */
    pthread_rwlock_t lock;
};

/* A Gaussian stream for dim x n_cols under params (checked), drawing from
 * base. */
int kmv__stream_new(const kmv__params *params, const kmv_allocator *base, size_t dim,
                    size_t n_cols, kmv_stream **out);

/* An attention stream of dim-dimensional keys and n_cols values, past
 * kmv_stream_attention_create()'s checks. */
int kmv__stream_attention_new(const kmv__params *params, const kmv_allocator *base, size_t dim,
                              size_t n_cols, kmv_stream **out);

/* Append keys (d) with values (c) past validation; tables = 0 leaves the
 * index's tables alone (they are about to be dropped). On error the
 * stream is as it was. */
int kmv__stream_append_keys(kmv_stream *s, const float *keys, const float *x, size_t count,
                            int tables);
int kmv__stream_append_queries(kmv_stream *s, const float *q, size_t count);

/* Attention keys (count x (d - 1)) with V (count x (c - 1)), lifted. */
int kmv__stream_attn_append(kmv_stream *s, const float *keys, const float *v, size_t count);

/* How a step is asked for. DEFER: a step that would compute the exact row
 * returns at once with st->mode not KMV_MODE_APPROX and y untouched, for a
 * caller that sums such rows together (batch attention, on the exact
 * engine). VERIFY: the exact row is computed too, and its error reported
 * as the monitor's (params.verify_every). */
#define KMV__STEP_DEFER 1u
#define KMV__STEP_VERIFY 2u

/* kmv_stream_decode() past validation (step.c); for an attention stream, q
 * is lifted and y (c) comes out normalized, with y[c - 1] = 1. */
int kmv__stream_decode(kmv_stream *s, const float *q, float *y, kmv__stats *st, unsigned flags);

/* The same on an attention stream, from the caller's query (d - 1). */
int kmv__stream_attn_decode(kmv_stream *s, const float *query, float *y, kmv__stats *st,
                            unsigned flags);

/* Room for need rows of elem bytes in an array holding have rows, its
 * capacity *cap doubling to fit. KMV_OK or KMV_ENOMEM (unchanged). */
int kmv__stream_grow(const kmv_allocator *a, void **p, size_t have, size_t *cap, size_t need,
                     size_t elem);

#endif /* KMV_STREAM_H */
