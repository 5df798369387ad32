/* The peer estimators of normalized attention that bench/attention_bench
 * runs beside kmv: O = D^-1 A V with A = exp(scale Q K^T) and D = diag(A 1).
 * Each keeps its logits in the log domain (a row's largest subtracted
 * before the exp), draws from its own seed, and computes its logits with
 * one CBLAS sgemm per block, so that their times are those of the same
 * machine's GEMM as the exact engine's. They are baselines for a
 * benchmark, not part of the library: no allocator hook, no error codes
 * beyond -1 for a failed allocation. */
#ifndef KMV_BENCH_PEERS_H
#define KMV_BENCH_PEERS_H

#include <stddef.h>
#include <stdint.h>

typedef struct peer_problem {
    const float *q; /* m x d */
    size_t m;
    const float *k; /* n x d */
    size_t n;
    size_t d;
    const float *v; /* n x c */
    size_t c;
    double scale;   /* the logit scale s */
} peer_problem;

/* Uniform column sampling: s keys drawn uniformly with replacement, and
 * each row's softmax over them, D_S^-1 A_S V_S. out: m x c. */
int peer_uniform(const peer_problem *p, size_t s, uint64_t seed, float *out);

/* KDEformer-style (Zandieh, Han, Daliri and Karbasi 2023): an angular LSH
 * (SimHash on `bits` random hyperplanes) sorts the queries and the keys,
 * and each query's block of the sorted keys (m / block blocks) is summed
 * exactly: the heavy entries, where the hash put near directions
 * together. The rest of the row is estimated from s keys sampled with
 * probability proportional to ||A_{:,j}|| ||[v_j, 1]||, the column norms
 * estimated from `probe` uniformly drawn queries (column-norm sampling:
 * the variance-optimal choice for a product A [V, 1]); sampled keys in the
 * query's own block are skipped, so nothing is counted twice. */
int peer_kdeformer(const peer_problem *p, size_t block, int bits, size_t probe, size_t s,
                   uint64_t seed, float *out);

/* Backurs, Indyk, Musco and Wagner (2021): Kx for x >= 0 as one weighted
 * kernel density query per row, answered by sampling keys in proportion to
 * x (the random-sampling density estimator, which their reduction admits;
 * its hashing-based estimators pay off only at densities far below
 * attention's), with a relative error eps ||Kx|| where the density is
 * bounded below. Attention needs A 1 (x = 1: uniform keys) and A V; a
 * signed value column is split as v = v+ - v-, each part with its own s
 * samples. out: m x c. */
int peer_bimw(const peer_problem *p, size_t s, uint64_t seed, float *out);

/* Quest-style page selection for decoding steps (Tang et al. 2024): keys
 * in pages of P consecutive tokens, each page keeping its per-coordinate
 * minimum and maximum. A step scores every page by the upper bound
 * sum_u max(q_u lo_u, q_u hi_u) on its logits, keeps the topk best pages,
 * and takes the softmax over their keys only. The bound ranks; nothing
 * bounds what the unkept pages hold. keys (n x d) must outlive the
 * pages. */
typedef struct peer_pages peer_pages;
peer_pages *peer_pages_new(const float *k, size_t n, size_t d, size_t P);
void peer_pages_free(peer_pages *pp);
/* One query's row (c values) into out; -1 when out of memory. */
int peer_pages_step(const peer_pages *pp, const float *q, size_t topk, const float *v, size_t c,
                    double scale, float *out);

#endif /* KMV_BENCH_PEERS_H */
