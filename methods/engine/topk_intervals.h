/* Score intervals for the tile path (fused_topk_tiles.c, which includes this in its AMX build only): bfloat16
   inputs with their norms, the bound's scale, a block's group bests and thresholds, and a row's buffer of (lower
   end, upper end, key, sure) in key order, scored in float32 where it must be. */
#ifndef TOPK_INTERVALS_H
#define TOPK_INTERVALS_H

#include <immintrin.h>

#include "topk_select.h"

#define LANES 16           /* AVX-512 float lanes */
#define T 16               /* rows of a tile, and its float32 columns */
#define BLOCK (2 * T)      /* query rows scored together: two tiles of queries */
#define DELTA 0x1p-40f     /* covers what flushing to zero loses: 2^-126 ((|q| + |k|) sqrt(d) + kpad) at most */
#define HUGE_NORM 0x1p60f  /* a norm past it makes the bound inf; below it bfloat16 products stay finite */
#define FEW_PICKS 16       /* picks that thresholds from every group so far serve (raise_by_groups) */

/* C of the bound e = C (|q| + DELTA) (|k| + DELTA). */
static float bound_scale(int64_t d, int64_t kpad) {
    double u = 0x1p-8;
    return (float)((2 * u + u * u + (double)(kpad + d + 4) * 0x1p-24) * (1 + 0x1p-10));
}

/* Row x's d entries as kpad bfloat16 (zeros past d) into dst; returns |x| + DELTA (inf past HUGE_NORM). */
static float to_bf16(const float *x, int64_t d, int64_t kpad, uint16_t *dst) {
    __m512 sq = _mm512_setzero_ps();
    for (int64_t t = 0; t < kpad; t += LANES) {
        __mmask16 in = t + LANES <= d ? 0xffff : (t < d ? (__mmask16)((1u << (d - t)) - 1u) : 0);
        __m512 v = _mm512_maskz_loadu_ps(in, x + t);
        sq = _mm512_fmadd_ps(v, v, sq);
        __m256bh b = _mm512_cvtneps_pbh(v);
        memcpy(dst + t, &b, sizeof b);
    }
    float norm = sqrtf(_mm512_reduce_add_ps(sq)) + DELTA;
    return norm > HUGE_NORM ? INFINITY : norm;  /* NaN stays NaN: its bound passes every threshold */
}

/* Scores every unsure pair of a row's n in float32 (lo = hi = s), as the register path does (the products summed
   in the dimension's order, one lane a pair: 16 keys gathered a dimension at a time); returns 1 on a NaN. */
static int make_sure(const search *s, const float *q, const float *keys, float *lo, float *hi, int32_t *ix,
                     uint8_t *sure, int64_t n) {
    int32_t offset[LANES], at[LANES];
    float got[LANES];
    int m = 0, failed = 0;
    for (int64_t i = 0; i <= n; i++) {
        if (i < n && !sure[i]) {
            at[m] = (int32_t)i;
            offset[m++] = ix[i] * (int32_t)s->k_row;  /* tiles_search takes n k_row < 2^31 */
        }
        if (m == LANES || (i == n && m > 0)) {
            const __mmask16 in = m == LANES ? 0xffff : (__mmask16)((1u << m) - 1u);
            const __m512i off = _mm512_maskz_loadu_epi32(in, offset);
            __m512 acc = _mm512_setzero_ps();
            for (int64_t t = 0; t < s->d; t++)
                acc = _mm512_fmadd_ps(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), in, off, keys + t, 4),
                                      _mm512_set1_ps(q[t]), acc);
            _mm512_storeu_ps(got, acc);
            for (int c = 0; c < m; c++) {
                failed |= got[c] != got[c];
                lo[at[c]] = hi[at[c]] = got[c];
                sure[at[c]] = 1;
            }
            m = 0;
        }
    }
    return failed;
}

/* Keeps the pairs whose upper end reaches `bound` (at least k pairs have lower ends >= bound), in order. */
static int64_t keep_reaching(float *lo, float *hi, int32_t *ix, uint8_t *sure, int64_t n, float bound) {
    int64_t kept = 0;
    for (int64_t i = 0; i < n; i++) {
        lo[kept] = lo[i];
        hi[kept] = hi[i];
        ix[kept] = ix[i];
        sure[kept] = sure[i];
        kept += hi[i] >= bound;
    }
    return kept;
}

/* Cuts a full buffer back and returns the value a later key's upper end must beat: 16 bits of the k-th best lower
   end, as fused_topk.c's `cut`; where that keeps over half the buffer (intervals that overlap), every pair is
   scored in float32 and exactly the k best stay. Sets *failed on a NaN. */
static float cut_intervals(const search *s, const float *q, const float *keys, float *lo, float *hi, int32_t *ix,
                           uint8_t *sure, int64_t *count, int32_t *tmp, int *failed) {
    int64_t n = *count, k = s->k;
    for (int64_t i = 0; i < n; i++) tmp[i] = ordered(lo[i]);
    float bound = from_ordered(kth_bound(tmp, n, k, 16));
    int64_t kept = 0;
    for (int64_t i = 0; i < n; i++) kept += hi[i] >= bound;
    if (kept <= s->cap / 2) {
        *count = keep_reaching(lo, hi, ix, sure, n, bound);
        return bound;
    }
    *failed |= make_sure(s, q, keys, lo, hi, ix, sure, n);
    reduce(lo, ix, count, k, tmp);
    float least = lo[0];
    for (int64_t i = 0; i < k; i++) {
        hi[i] = lo[i];
        sure[i] = 1;
        least = lo[i] < least ? lo[i] : least;
    }
    return least;
}

static inline __m512i ordered16(__m512 x) {  /* `ordered` on 16 lanes */
    __m512i b = _mm512_castps_si512(x);
    return _mm512_xor_si512(b, _mm512_and_si512(_mm512_srai_epi32(b, 31), _mm512_set1_epi32(0x7fffffff)));
}

/* A lower end of the best score of each of a block's queries (bound scales qn) over the T keys from `scores`
   (norms `kn`), `ordered`, into best[0, BLOCK): the best s~ less the bound at the largest norm, reached by the key
   of that s~ (one max a score, not a bound a score: FoT's search 2.1 -> 2.0 ms). A NaN s~ is passed over; a bound
   that is not finite gives -inf. */
static void group_best(const float *qn, const float *scores, const float *kn, int32_t *best) {
    float norm = 0.0f;
    for (int64_t r = 0; r < T; r++) norm = kn[r] > norm ? kn[r] : norm;
    const __m512 none = _mm512_set1_ps(-INFINITY);
    for (int h = 0; h < 2; h++) {
        __m512 m = none;
        for (int64_t r = 0; r < T; r++) m = _mm512_max_ps(_mm512_loadu_ps(scores + r * BLOCK + h * T), m);
        const __m512 lower = _mm512_fnmadd_ps(_mm512_loadu_ps(qn + h * T), _mm512_set1_ps(norm), m);
        _mm512_storeu_si512(best + h * T, ordered16(_mm512_max_ps(lower, none)));
    }
}

/* Raises the thresholds thr[0, BLOCK) of a block's rows by the first `groups` groups of `best` (keys every row
   reads): a group of T keys whose best lower end is L holds a key scoring at least L, so with the k-th largest
   group best of a row (16 bits of it) k keys score at least that, and a key whose upper end is below it cannot be
   among the k best, whatever its index. A strip's bound keeps the buffer to about the keys that end in it: FoT's
   [2 KV heads x 256 queries x 8,192 slots], k = 32, buffered 372 keys a row with thresholds rising from -inf. */
static void raise_thresholds(const search *s, const int32_t *best, int64_t groups, float *thr) {
    if (groups < s->k) return;
    for (int h = 0; h < 2; h++) {
        __m512i t = _mm512_setzero_si512(), k = _mm512_set1_epi32((int32_t)s->k);
        for (int bit = 31; bit >= 16; bit--) {  /* kth_bound's 16 bits on 16 rows at once */
            __m512i probe = _mm512_xor_si512(_mm512_or_si512(t, _mm512_set1_epi32((int32_t)(1u << bit))),
                                             _mm512_set1_epi32((int32_t)0x80000000u));
            __m512i count = _mm512_setzero_si512();
            for (int64_t gr = 0; gr < groups; gr++) {
                __mmask16 ge = _mm512_cmpge_epi32_mask(_mm512_loadu_si512(best + gr * BLOCK + h * T), probe);
                count = _mm512_mask_add_epi32(count, ge, count, _mm512_set1_epi32(1));
            }
            t = _mm512_mask_or_epi32(t, _mm512_cmpge_epi32_mask(count, k), t,
                                     _mm512_set1_epi32((int32_t)(1u << bit)));
        }
        __m512 bound = _mm512_castsi512_ps(ordered16(_mm512_castsi512_ps(
            _mm512_xor_si512(t, _mm512_set1_epi32((int32_t)0x80000000u)))));
        /* strictly below the bound, so that a key reaching it passes; a NaN bound (k groups at -inf) gives none */
        __m512 below = _mm512_sub_ps(bound, _mm512_fmadd_ps(_mm512_abs_ps(bound), _mm512_set1_ps(0x1p-20f),
                                                            _mm512_set1_ps(0x1p-100f)));
        _mm512_storeu_ps(thr + h * T, _mm512_max_ps(below, _mm512_loadu_ps(thr + h * T)));
    }
}

/* Keeps in top (each block row's best group bests so far, `ordered`, best first: `width` vectors of BLOCK rows)
   the best of those and `groups` more from `best`, and raises the rows' thresholds to the k-th: the groups are
   disjoint, each reached by one of its keys, so k keys score at least it. */
static inline __attribute__((always_inline)) void keep_best(const int32_t *best, int64_t groups, int64_t k,
                                                             int width, int32_t *top, float *thr) {
    for (int h = 0; h < 2; h++) {
        __m512i t[FEW_PICKS];
        for (int i = 0; i < width; i++) t[i] = _mm512_loadu_si512(top + i * BLOCK + h * T);
        for (int64_t gr = 0; gr < groups; gr++) {  /* a network of max-min pairs: each group enters in order */
            __m512i v = _mm512_loadu_si512(best + gr * BLOCK + h * T);
            for (int i = 0; i < width; i++) {
                const __m512i up = _mm512_max_epi32(t[i], v);
                v = _mm512_min_epi32(t[i], v);
                t[i] = up;
            }
        }
        for (int i = 0; i < width; i++) _mm512_storeu_si512(top + i * BLOCK + h * T, t[i]);
        const __m512 bound = _mm512_castsi512_ps(ordered16(_mm512_castsi512_ps(t[k - 1])));
        /* strictly below the bound, as raise_thresholds; -inf (fewer than k groups above it) raises nothing */
        __m512 below = _mm512_sub_ps(bound, _mm512_fmadd_ps(_mm512_abs_ps(bound), _mm512_set1_ps(0x1p-20f),
                                                            _mm512_set1_ps(0x1p-100f)));
        _mm512_storeu_ps(thr + h * T, _mm512_max_ps(below, _mm512_loadu_ps(thr + h * T)));
    }
}

/* Raises a block's thresholds by `groups` more group bests from `best`: up to FEW_PICKS picks by the exact k-th of
   every group seen so far (top: [FEW_PICKS][BLOCK], ordered(-inf) before the first), which keeps the strips before
   (a network of k max-min pairs a group, of width 8 or 16: 32 lost to raise_thresholds); more picks by 16 bits of
   the k-th of these groups alone (raise_thresholds). */
static void raise_by_groups(const search *s, const int32_t *best, int64_t groups, int32_t *top, float *thr) {
    if (s->k <= FEW_PICKS / 2) keep_best(best, groups, s->k, FEW_PICKS / 2, top, thr);
    else if (s->k <= FEW_PICKS) keep_best(best, groups, s->k, FEW_PICKS, top, thr);
    else raise_thresholds(s, best, groups, thr);
}

#endif
