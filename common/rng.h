/* Internal: the random numbers behind every random choice.
 *
 * Everything random derives from params.seed through splitmix64, split into
 * named streams so that one part drawing more numbers never shifts another
 * part's draws; per-row draws are hashed from (seed, stream, row) so they do
 * not depend on which thread handles the row. */
#ifndef KMV_RNG_H
#define KMV_RNG_H

#include <math.h>
#include <stdint.h>

/* Streams: one per part that draws. */
enum {
    KMV__RNG_SHUFFLE = 1, /* key store's random order */
    KMV__RNG_LSH = 2,     /* projections and offsets */
    KMV__RNG_SKETCH = 3,  /* KDE sketch draws */
    KMV__RNG_WINDOW = 4,  /* per-row sample windows */
    KMV__RNG_PLAN = 5,    /* planner's pair sample */
    KMV__RNG_DECODE = 6,  /* decoding steps' windows */
    KMV__RNG_TREE = 7,    /* the bounds tree's seeding */
    KMV__RNG_REGRESS = 8, /* GRAM and AGRAM's CountSketch */
    KMV__RNG_NYSTROM = 9  /* EXP's Nystrom pivots */
};

static inline uint64_t kmv__mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* splitmix64: advances *state and returns the next 64 random bits. */
static inline uint64_t kmv__rng_next(uint64_t *state) {
    *state += 0x9e3779b97f4a7c15ULL;
    return kmv__mix64(*state);
}

/* A generator state for one stream of one seed. */
static inline uint64_t kmv__rng_stream(uint64_t seed, uint64_t stream) {
    return kmv__mix64(seed ^ kmv__mix64(stream * 0xd1b54a32d192ed03ULL));
}

/* Uniform integer in [0, bound), bound >= 1 (Lemire's multiply-shift; the
 * bias is below 2^-32 for the sizes used here, bound < 2^32). */
static inline uint64_t kmv__rng_below(uint64_t *state, uint64_t bound) {
    return (uint64_t)(((unsigned __int128)kmv__rng_next(state) * bound) >> 64);
}

/* Uniform double in [0, 1). */
static inline double kmv__rng_unit(uint64_t *state) {
    return (double)(kmv__rng_next(state) >> 11) * 0x1p-53;
}

/* Standard normal by Box-Muller (one of the pair; simplicity over speed:
 * only the LSH projections draw normals). */
static inline double kmv__rng_normal(uint64_t *state) {
    double u = 1.0 - kmv__rng_unit(state); /* (0, 1] */
    double v = kmv__rng_unit(state);
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

#endif /* KMV_RNG_H */
