/* Score intervals for the tile path (fused_topk_tiles.c, which includes this in its AMX build only): bfloat16
   inputs with their norms, the bound's scale, and a row's buffer of (lower end, upper end, key, sure) in key order,
   scored in float32 where it must be. */
#ifndef TOPK_INTERVALS_H
#define TOPK_INTERVALS_H

#include <immintrin.h>

#include "topk_select.h"

#define LANES 16           /* AVX-512 float lanes */
#define DELTA 0x1p-40f     /* covers what flushing to zero loses: 2^-126 ((|q| + |k|) sqrt(d) + kpad) at most */
#define HUGE_NORM 0x1p60f  /* a norm past it makes the bound inf; below it bfloat16 products stay finite */

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

#endif
