/* The selection shared by the exact top-k search's two scoring paths (fused_topk.c: SIMD registers in float32;
   fused_topk_tiles.c: AMX tiles in bfloat16 with an error bound, then float32): the order-preserving integer
   view of a score, the k-th best by bits, exact reduction and ranking of a row's buffered pairs, the search's
   arguments, its work items and a finished row's output. */
#ifndef TOPK_SELECT_H
#define TOPK_SELECT_H

#include <math.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* A float's bits as an int32 of the same order. A score is never -0 (its sum starts at +0, and -0 + +0 = +0), and
   a NaN fails the search, so float and integer order agree. */
static inline int32_t ordered(float s) {
    int32_t b;
    memcpy(&b, &s, sizeof b);
    return b ^ ((b >> 31) & 0x7fffffff);
}

/* The inverse of `ordered`. */
static inline float from_ordered(int32_t o) {
    int32_t b = o ^ ((o >> 31) & 0x7fffffff);
    float s;
    memcpy(&s, &b, sizeof s);
    return s;
}

/* The largest t whose low 32 - bits bits are 0 with at least k of tmp[0, n) >= t, found bit by bit from the top:
   counts that the compiler vectorises, no data-dependent branches (a quickselect's mispredictions cost 3x as
   much). With all 32 bits: the k-th largest itself. */
static int32_t kth_bound(const int32_t *tmp, int64_t n, int64_t k, int bits) {
    uint32_t t = 0;  /* the bound's bits, offset by 2^31 */
    for (int bit = 31; bit >= 32 - bits; bit--) {
        int32_t probe = (int32_t)((t | (1u << bit)) ^ 0x80000000u);
        int32_t c = 0;
        for (int64_t i = 0; i < n; i++) c += tmp[i] >= probe;
        if (c >= k) t |= 1u << bit;
    }
    return (int32_t)(t ^ 0x80000000u);
}

/* Keeps exactly the k best of a row's n buffered (score, index) pairs, which are in key order, so the first of
   equal scores at the k-th place wins. */
static void reduce(float *sc, int32_t *ix, int64_t *count, int64_t k, int32_t *tmp) {
    int64_t n = *count;
    for (int64_t i = 0; i < n; i++) tmp[i] = ordered(sc[i]);
    int32_t kth = kth_bound(tmp, n, k, 32);
    int64_t above = 0;
    for (int64_t i = 0; i < n; i++) above += tmp[i] > kth;
    int64_t ties = k - above, kept = 0;
    for (int64_t i = 0; i < n; i++) {
        int take = tmp[i] > kth || (tmp[i] == kth && ties-- > 0);
        sc[kept] = sc[i];
        ix[kept] = ix[i];
        kept += take;
    }
    *count = kept;
}

#define RANK_SCRATCH(n) (4 * (n) + 32)

/* `rank_best_first` for many pairs: a stable LSD radix sort on the scores' order bits, a byte a pass (a pass whose
   byte every pair shares is skipped), so equal scores keep their key order, the lower index first. Its fixed cost
   (four 256-bucket counts) loses below about 256 pairs; from there it wins, linear in n against n^2 (one thread,
   AVX-512, against the broadcast compares below: 256 pairs 3.5 -> 3.4 us, 512 12.6 -> 5.9, 2,048, Unlimiformer's
   k on the 62M model, 182 -> 21). tmp: RANK_SCRATCH(n) int32. */
#define RADIX_FROM 256
static void radix_best_first(float *sc, int32_t *ix, int64_t n, int32_t *tmp) {
    uint32_t *key = (uint32_t *)tmp, *key2 = key + n;
    int32_t *at = tmp + 2 * n, *at2 = at + n;  /* each key's pair */
    uint32_t count[4][256];
    memset(count, 0, sizeof count);
    for (int64_t i = 0; i < n; i++) {
        const uint32_t u = (uint32_t)ordered(sc[i]) ^ 0x7fffffffu;  /* ascending u: descending score */
        key[i] = u;
        at[i] = (int32_t)i;
        for (int b = 0; b < 4; b++) count[b][u >> (8 * b) & 255]++;
    }
    for (int b = 0; b < 4; b++) {
        uint32_t *c = count[b];
        const int shift = 8 * b;
        if (c[key[0] >> shift & 255] == (uint32_t)n) continue;
        uint32_t sum = 0;
        for (int v = 0; v < 256; v++) {
            const uint32_t here = c[v];
            c[v] = sum;
            sum += here;
        }
        for (int64_t i = 0; i < n; i++) {
            const uint32_t to = c[key[i] >> shift & 255]++;
            key2[to] = key[i];
            at2[to] = at[i];
        }
        uint32_t *swap_key = key;
        key = key2;
        key2 = swap_key;
        int32_t *swap_at = at;
        at = at2;
        at2 = swap_at;
    }
    float *score = (float *)key2;  /* the buffers the last pass left free */
    int32_t *index = at2;
    for (int64_t t = 0; t < n; t++) {
        score[t] = sc[at[t]];
        index[t] = ix[at[t]];
    }
    memcpy(sc, score, sizeof(float) * n);
    memcpy(ix, index, sizeof(int32_t) * n);
}

/* Sorts n pairs in key order best first, the lower index first among equal scores: each pair's place is the
   number of pairs ahead of it, counted branch-free (n^2 compares: a third of qsort's time through a comparator at
   n = 32). The scores are counted from a copy padded with -inf to whole vectors (a padding entry is never ahead:
   it is not above -inf and follows every pair), so the pairs before pair i count where they score as much and
   those after where they score more, no index compare. AVX-512: 16 pairs at once against each pair broadcast
   (against pair by pair: 41 pairs 254 -> 116 ns, 96 pairs 863 -> 321, 256 pairs 4,283 -> 1,745); elsewhere pair
   by pair (AVX2, 41 pairs: 351 ns with an index compare, 240 without). From RADIX_FROM pairs: `radix_best_first`.
   tmp: RANK_SCRATCH(n) int32. */
static void rank_best_first(float *sc, int32_t *ix, int64_t n, int32_t *tmp) {
    if (n >= RADIX_FROM) {
        radix_best_first(sc, ix, n, tmp);
        return;
    }
    const int64_t padded = (n + 15) / 16 * 16;
    float *pad = (float *)tmp;
    int32_t *at = tmp + padded, *index = at + padded;
    float *score = (float *)(index + n);
    memcpy(pad, sc, sizeof(float) * n);
    for (int64_t j = n; j < padded; j++) pad[j] = -INFINITY;
#if defined(__AVX512F__)
    const __m512i one = _mm512_set1_epi32(1);
    for (int64_t i0 = 0; i0 < padded; i0 += 16) {  /* pairs i0 .. i0 + 15 (lanes past n: not used) */
        const __m512 v = _mm512_loadu_ps(pad + i0);
        __m512i ahead = _mm512_setzero_si512();
        for (int64_t j = 0; j < i0; j++)
            ahead = _mm512_mask_add_epi32(ahead, _mm512_cmp_ps_mask(_mm512_set1_ps(pad[j]), v, _CMP_GE_OQ), ahead, one);
        for (int64_t j = i0; j < i0 + 16; j++) {  /* within the block: lanes after j count >=, lanes up to j > */
            const __m512 u = _mm512_set1_ps(pad[j]);
            const __mmask16 after = (__mmask16)(0xfffeu << (j - i0));
            const __mmask16 m = (_mm512_cmp_ps_mask(u, v, _CMP_GE_OQ) & after) |
                                (_mm512_cmp_ps_mask(u, v, _CMP_GT_OQ) & (__mmask16)~after);
            ahead = _mm512_mask_add_epi32(ahead, m, ahead, one);
        }
        for (int64_t j = i0 + 16; j < padded; j++)
            ahead = _mm512_mask_add_epi32(ahead, _mm512_cmp_ps_mask(_mm512_set1_ps(pad[j]), v, _CMP_GT_OQ), ahead, one);
        _mm512_storeu_si512(at + i0, ahead);
    }
#else
    for (int64_t i = 0; i < n; i++) {  /* ahead of pair i: the pairs before it scoring as much, those after above */
        const float v = sc[i];
        int32_t ahead = 0;
        for (int64_t j = 0; j < i; j++) ahead += pad[j] >= v;
        for (int64_t j = i; j < padded; j++) ahead += pad[j] > v;
        at[i] = ahead;
    }
#endif
    for (int64_t i = 0; i < n; i++) {
        score[at[i]] = sc[i];
        index[at[i]] = ix[i];
    }
    memcpy(sc, score, sizeof(float) * n);
    memcpy(ix, index, sizeof(int32_t) * n);
}

typedef struct {
    const float *q, *keys;
    int64_t rows, n, d, q_group, q_row, k_group, k_row, k, cap;
    const int64_t *limit;
    float *out_scores;
    int64_t *out_index;
    int64_t per_group;
} search;

/* Query rows an item holds at most: its scratch stays small whatever the segment (256 rows x cap 4k pairs). */
#define SPAN 256
/* Keys scored against every query block of an item before the next: a chunk (128 KiB at dim 32, 256 KiB at 64)
   is read from memory once and from the core's L2 cache for each further block (the keys of one KV head, 2 MiB
   on the 62M model, do not stay in a 2 MiB L2 between blocks). */
#define KEY_CHUNK 1024

static inline int64_t limit_of(const search *s, int64_t row) {
    int64_t lim = s->limit ? s->limit[row] : s->n;
    return lim < 0 ? 0 : (lim > s->n ? s->n : lim);
}


/* Rows [r0, r1) of group g that work item `item` holds: each group's rows in per_group spans of whole register
   blocks of `block` rows where the last span, which takes the rest, stays within SPAN: 264 rows in two spans of
   132 made six blocks of 64 lanes, the last two with 4 live rows; 128 + 136 make five. */
static inline void item_rows(const search *s, int64_t item, int64_t block, int64_t *g, int64_t *r0, int64_t *r1) {
    int64_t span = (s->rows + s->per_group - 1) / s->per_group, whole = span / block * block;
    if (whole > 0 && s->rows - (s->per_group - 1) * whole <= SPAN) span = whole;
    *g = item / s->per_group;
    *r0 = item % s->per_group * span;
    *r1 = item % s->per_group == s->per_group - 1 || *r0 + span > s->rows ? s->rows : *r0 + span;
}

/* Writes row `row` of group g from its n exactly scored pairs in key order, at least its k best among them
   (fewer than k keys: its masked keys of lowest index join at -inf); returns 1 where a key scored -inf itself. */
static inline int finish_row(const search *s, int64_t g, int64_t row, float *sc, int32_t *ix, int64_t n,
                             int64_t lim, int32_t *tmp) {
    int64_t k = s->k;
    int failed = 0;
    if (n < k) {
        failed = n < lim;  /* a key scored -inf itself */
        for (int64_t j = lim; n < k; j++) {
            sc[n] = -INFINITY;
            ix[n++] = (int32_t)j;
        }
    }
    if ((n - k) * (n + k) > 64 * n) reduce(sc, ix, &n, k, tmp);
    rank_best_first(sc, ix, n, tmp);
    float *os = s->out_scores + (g * s->rows + row) * k;
    int64_t *oi = s->out_index + (g * s->rows + row) * k;
    for (int64_t t = 0; t < k; t++) {
        os[t] = sc[t];
        oi[t] = ix[t];
    }
    return failed;
}

/* The tile path (fused_topk_tiles.c): 1 where this build has it and the kernel grants the process AMX tile
   state, then the search of all items on `threads` threads into `failed`; 0 where it does not run. */
int tiles_usable(void);
int tiles_search(const search *s, int64_t items, int64_t threads, int *failed);
/* 1 where the tile path takes a search of n slots, head dim d and k picks (where the tiles win; 0 without AMX). */
int tiles_take(int64_t n, int64_t d, int64_t k);

#endif
