/* Internal: what attention's callers check beside Lemma 4.1's lift
 * (lift.c; the lift itself is public, kmv.h). */
#ifndef KMV_ALGO_LIFT_H
#define KMV_ALGO_LIFT_H

/* Whether logits fit float: attention computes dot products and logits in
 * float, and by Cauchy-Schwarz no |<q, k>| exceeds max ||q|| max ||k||;
 * when that bound, times scale, or scale itself comes within 2^-10 of
 * float's range, callers refuse (KMV_EOVERFLOW) rather than return
 * infinities or NaN. max_q2, max_k2: the largest squared norms. */
int kmv__logits_fit(double max_q2, double max_k2, double scale);

#endif /* KMV_ALGO_LIFT_H */
