/* Internal: the decoding step, one query against every key a stream holds
 * (kmv_stream_decode() in kmv.h). It is ApproxKMV at m = 1 over the shared
 * pipeline of algo/ (heavy search, light mass, budget, windows); what
 * differs between a Gaussian stream and an attention stream (the shift,
 * how the light keys are sampled and certified, the exact row, the
 * normalized answer) is a kmv__step_kind, so step.c has no branch on the
 * kind. Nothing in a step may cost O(n): x and its weights are kept in the
 * store's order at append time, the exactly summed keys are found from the
 * top groups of the x^2-grouped sketch, and the sketch's draws are kept
 * until keys arrive. */
#ifndef KMV_STREAM_STEP_H
#define KMV_STREAM_STEP_H

#include <stddef.h>
#include <stdint.h>

#include "algo/heavy.h"
#include "algo/light.h"
#include "stream/stream.h"

/* Below this many keys an exact row costs microseconds: no tables. */
#define KMV__DECODE_MIN_KEYS 2048

/* One step's state and scratch. */
typedef struct kmv__step {
    const kmv_stream *s;
    const kmv_index *ix;
    const kmv__params *pa;
    const kmv_allocator *a;
    const kmv__keystore *ks;
    const float *q;
    size_t n, d, c;
    float inv2s2;
    float shift;        /* subtracted from squared distances (the kind's) */
    float kappa;        /* the heavy threshold of the tables searched */
    double whi;         /* keys with weight >= whi are exact columns (H1) */
    int use_tables;     /* a heavy search runs */
    kmv__stats *S;
    /* scratch */
    kmv__heavy_scratch *ht;
    kmv__light_buf lb;  /* chunk, acc (2 c), est (c) */
    double *sum;        /* c: heavy keys and exact columns */
    float *skd;         /* sketch_size */
    uint32_t *heavy;    /* the heavy ids found, ascending */
    size_t nh;
    double W;           /* the light mass */
    kmv__keymask mask;  /* what windows leave to the exact columns */
} kmv__step;

/* What the light part of a step found: samples drawn, the variance (or
 * deviation bound) of the kept window, and for attention the lower bound
 * on the row sum it was measured against. */
typedef struct kmv__step_light {
    size_t samples;
    double v, lo;
    int resampled;
} kmv__step_light;

/* What differs between the kinds of stream. */
typedef struct kmv__step_kind {
    /* A plan refused for its cost, or a search costing more than it can
     * save, leaves the step sampling the whole row (attention: its budget is
     * relative to the row sum, and spread rows need no heavy keys) rather
     * than exact (Gaussian). */
    int sample_without_tables;
    /* The probability each heavy key may be missed with. */
    double (*miss)(const kmv_stream *s);
    /* A stored key as a stand-in query for a plan (row: dim floats). */
    void (*stand_in)(const kmv_stream *s, float *row);
    /* What every squared distance of the step's query loses. */
    float (*shift)(const kmv_stream *s, const float *q);
    /* The light part into t->lb.est; 0, or the kmv_fallback that makes the
     * row exact. */
    int (*light)(kmv__step *t, kmv__step_light *out);
    /* t->lb.est (the light part plus t->sum) as the answer, its error
     * estimate into the stats. */
    void (*answer)(kmv__step *t, const kmv__step_light *l);
    /* The exact row into t->lb.est, as answer() would leave it. */
    void (*exact_row)(kmv__step *t);
    /* The error of est against the exact ye, as the stats report it. */
    double (*error)(const kmv__step *t, const double *ye);
    /* The stats in the caller's shapes, with the bound the step claims. */
    void (*report)(kmv__step *t);
} kmv__step_kind;

extern const kmv__step_kind kmv__gauss_step;
extern const kmv__step_kind kmv__attention_step;

/* The bounds tree of a Gaussian stream's steps (step_tree.c). Whether it
 * must change before a step at the stream's size (a build at a new power
 * of two of the keys, or keys to insert): decided from the stream alone. */
int kmv__stream_tree_stale(const kmv_stream *s);
/* Whether the steps take the tree now (held, covering every key). */
int kmv__stream_tree_serves(const kmv_stream *s);
/* Build, try and grow the tree for the stream's size: the tree's state
 * is a function of the keys, the values and the seed alone, whenever the
 * steps ran (so a loaded snapshot grows the same tree). Under the write
 * lock. A tree out of memory, or one the trial finds costing more than a
 * quarter of the exact row, is dropped until the keys double; KMV_OK. */
void kmv__stream_tree_prepare(kmv_stream *s, double *seconds);
/* One step by the tree into est (c values) when it certifies the row
 * within a quarter of the exact row's work: *answered 1 and the stats
 * filled; else *answered 0. KMV_OK or KMV_ENOMEM (the step's scratch). */
int kmv__stream_tree_row(const kmv_stream *s, const float *q, double *est, kmv__stats *S,
                         int *answered);
void kmv__stream_tree_free(kmv_stream *s);

/* The Gaussian step's exact row: a window covering every key. */
void kmv__step_exact_window(kmv__step *t);

#endif /* KMV_STREAM_STEP_H */
