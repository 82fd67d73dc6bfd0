/* The exact top-k search scored on AMX tiles (Intel Xeon since Sapphire Rapids) where the build, the OS and the
   head dim (at most 64) allow it and the tiles win (`tiles_take`: up to 8,192 slots, k at most 64 and at least 40 k
   slots; past 8,192 slots, k at most 256 and at least 64 k slots); fused_topk.c asks here first and keeps its SIMD
   register path otherwise.

   Queries and keys are rounded to bfloat16 and tile multiplies (TDPBF16PS: exact products, float32 sums) give
   scores s~ = q~ . k~ at a sixteenth of float32 FMAs' instructions. The float32 score s of the register path (the
   products summed in the dimension's order) differs from s~ by at most
       e = C (|q| + DELTA) (|k| + DELTA),
   where C = 2u + u^2 (q and k rounded to bfloat16, u = 2^-8) + (kpad + d + 4) 2^-24 (the two sums' roundings),
   inflated by 2^-10 for the bound's own roundings (norms, e, s~ +- e), and DELTA covers inputs and sums flushed to
   zero (bfloat16 arithmetic flushes denormals): s lies in [s~ - e, s~ + e]. A block of 32 query rows is scored
   against a strip of up to STRIP keys at once. In each group of 16 keys the best lower end L is reached by one key,
   so the k-th largest group best of a row (16 bits of it) is reached by k keys, and a key whose upper end is below
   it cannot be among the k best, whatever its index: the row's threshold. The keys whose upper end beats it join
   the row's buffer as intervals; a full buffer is cut back to the pairs whose upper end reaches the k-th best lower
   end, which k pairs of lower index are sure to reach. At the end the pairs whose upper end reaches the k-th best
   lower end are scored in float32 in the register path's order and ranked: the k best (the first of equal scores
   at the k-th place) are among them, so picks, order and scores are the register path's, bit for bit. A score
   whose bound is not finite (NaN, inf, a norm over 2^60) is scored in float32 when it is met.

   Past one strip the keys pass in strips of FLOOR_STRIP, each met by every block of queries while its keys are in
   L2, the thresholds first from a floor pass over all keys (groups of `floor_group` tiles, about 4k groups, their
   best lower ends taken as above); up to FEW_PICKS picks, from the groups of the strips met so far.

   One thread, registers -> tiles (bench_native.py): FoT's search on the reference model 3.25 -> 2.06 ms, on the
   62M model 4.60 -> 3.28 (2 threads), Memorizing Transformer's 1.00 -> 0.77, Unlimiformer's 17.7 -> 14.6. */
#include "topk_select.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "topk_intervals.h"

#define ARCH_REQ_XCOMP_PERM 0x1023 /* Linux: ask for a state component... */
#define XFEATURE_XTILEDATA 18      /* ...the tiles' data */
#define TK 32                      /* bfloat16 entries of a tile row */
#define LIST 64                    /* keys whose hits are listed before they are buffered */
#define STRIP 8192                 /* the most keys scored for a block of queries before their selection, thresholds
                                      from their own group bests: 1 MiB of scores, within L2 */
#define MAX_DIM (2 * TK)           /* head dims the path takes: a block's queries fit four tiles */
#define MAX_K 64                   /* the most picks the tile path takes within one strip */
#define FLOOR_MAX_K 256            /* the most picks past one strip */
#define FLOOR_PICKS 64             /* slots a pick, at least, past one strip: 4k groups of at least T keys */
#define FLOOR_CHUNK 2048           /* keys of the floor's chunk: 256 KiB in bfloat16 at head dim 64, in L2 */
#define FLOOR_STRIP 2048           /* keys of a strip past one: 256 KiB of keys, 256 KiB of scores */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

int tiles_usable(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0; }

typedef struct {  /* one thread's scratch, for up to SPAN query rows */
    uint16_t *queries; /* [SPAN / T][steps][T pairs][T queries][2]: bfloat16, the tiles' B layout */
    uint16_t *keys;    /* [n rounded up to BLOCK][kpad]: the group's keys in bfloat16, the tiles' A rows */
    float *qn;         /* [SPAN] C (|q| + DELTA); padding rows 0 */
    float *kn;         /* [n rounded up to BLOCK] |k| + DELTA; padding keys 0 */
    int32_t *lim;      /* [SPAN] keys each row reads */
    float *thr;        /* [SPAN] the upper end a key must beat (padding rows: +inf) */
    float *strip;      /* [STRIP keys][BLOCK queries] s~ of a strip of keys against a block of queries */
    int32_t *best;     /* [groups][BLOCK] each group's best lower end, `ordered` (the floor: for every block) */
    int32_t *top;      /* [SPAN / BLOCK][FEW_PICKS][BLOCK] each block's best group bests so far (raise_by_groups) */
    float *lo, *hi;    /* [SPAN][cap] each row's buffered intervals, in key order */
    int32_t *index;    /* [SPAN][cap] their keys */
    uint8_t *sure;     /* [SPAN][cap] 1 where lo = hi = the float32 score */
    int64_t *counts;   /* [SPAN] */
    int32_t *tmp;      /* [RANK_SCRATCH(cap)] */
    const float *held; /* the keys in `keys` (this search's), NULL: none yet */
    int64_t held_reach;
} tile_scratch;

/* Keys j0 .. j0 + nk - 1 (their s~ rows from `scores`, norms from `kn`) against the BLOCK queries from span row
   `at` (nq of them live): each key whose upper end beats a row's threshold joins that row's buffer. Returns 1 on a
   NaN. */
static int select_keys(const search *s, tile_scratch *w, const float *q0, const float *keys, const float *scores,
                       const float *kn, int64_t at, int64_t nq, int64_t j0, int64_t nk, int64_t low) {
    const int64_t cap = s->cap;
    float *restrict lo = w->lo, *restrict hi = w->hi;
    int32_t *restrict index = w->index;
    uint8_t *restrict sure = w->sure;
    int64_t *restrict counts = w->counts;
    float ends[2 * BLOCK];  /* a key's lower ends, then its upper ends, for the block's rows */
    int failed = 0;
    uint32_t live = nq >= BLOCK ? ~0u : (1u << nq) - 1u;
    const __m512 qn0 = _mm512_loadu_ps(w->qn + at), qn1 = _mm512_loadu_ps(w->qn + at + T);
    const __m512 inf = _mm512_set1_ps(INFINITY);
    __m512 t0 = _mm512_loadu_ps(w->thr + at), t1 = _mm512_loadu_ps(w->thr + at + T);
    const __m512i l0 = _mm512_loadu_si512(w->lim + at), l1 = _mm512_loadu_si512(w->lim + at + T);
    int32_t found[LIST];   /* keys of a run of LIST that some row takes, and those rows */
    uint32_t takers[LIST];
    for (int64_t r0 = 0; r0 < nk; r0 += LIST) {
        int64_t r1 = nk - r0 < LIST ? nk : r0 + LIST, m = 0;
        for (int64_t r = r0; r < r1; r++) {  /* no branch on the hits: the list grows by one where a row takes key r */
            const __m512 norm = _mm512_set1_ps(kn[r]);
            const __m512 h0 = _mm512_fmadd_ps(qn0, norm, _mm512_loadu_ps(scores + r * BLOCK));
            const __m512 h1 = _mm512_fmadd_ps(qn1, norm, _mm512_loadu_ps(scores + r * BLOCK + T));
            uint32_t hit = ((uint32_t)_mm512_cmp_ps_mask(h0, t0, _CMP_NLE_UQ) |
                            (uint32_t)_mm512_cmp_ps_mask(h1, t1, _CMP_NLE_UQ) << T) & live;
            if (j0 + r >= low) {  /* rows whose limit is at or before key j0 + r do not read it */
                __m512i jv = _mm512_set1_epi32((int32_t)(j0 + r));
                hit &= (uint32_t)_mm512_cmpgt_epi32_mask(l0, jv) | (uint32_t)_mm512_cmpgt_epi32_mask(l1, jv) << T;
            }
            found[m] = (int32_t)r;
            takers[m] = hit;
            m += hit != 0;
        }
        for (int64_t f = 0; f < m; f++) {
            const int64_t j = found[f];
            uint32_t hit = takers[f];
            const __m512 norm = _mm512_set1_ps(kn[j]), s0 = _mm512_loadu_ps(scores + j * BLOCK),
                         s1 = _mm512_loadu_ps(scores + j * BLOCK + T);
            const __m512 h0 = _mm512_fmadd_ps(qn0, norm, s0), h1 = _mm512_fmadd_ps(qn1, norm, s1);
            const __m512 e0 = _mm512_fnmadd_ps(qn0, norm, s0), e1 = _mm512_fnmadd_ps(qn1, norm, s1);
            _mm512_storeu_ps(ends, e0);
            _mm512_storeu_ps(ends + T, e1);
            _mm512_storeu_ps(ends + BLOCK, h0);
            _mm512_storeu_ps(ends + BLOCK + T, h1);
            /* rows whose interval is not finite (NaN, inf, a norm over 2^60): the float32 score decides at once */
            uint32_t odd = hit & ~((uint32_t)_mm512_cmp_ps_mask(_mm512_sub_ps(h0, e0), inf, _CMP_LT_OQ) |
                                   (uint32_t)_mm512_cmp_ps_mask(_mm512_sub_ps(h1, e1), inf, _CMP_LT_OQ) << T);
            for (uint32_t left = odd; left; left &= left - 1) {
                const int i = __builtin_ctz(left);
                const float *q = q0 + i * s->q_row;
                float s32 = 0.0f;
                for (int64_t t = 0; t < s->d; t++) s32 = fmaf(keys[(j0 + j) * s->k_row + t], q[t], s32);
                failed |= s32 != s32;
                ends[i] = ends[BLOCK + i] = s32;
                if (!(s32 > w->thr[at + i])) hit &= ~(1u << i);
            }
            while (hit) {
                const int i = __builtin_ctz(hit);
                hit &= hit - 1;
                const int64_t a = at + i, c = counts[a]++;
                lo[a * cap + c] = ends[i];
                hi[a * cap + c] = ends[BLOCK + i];
                index[a * cap + c] = (int32_t)(j0 + j);
                sure[a * cap + c] = (uint8_t)(odd >> i & 1u);
                if (c + 1 == cap) {
                    float cutoff = cut_intervals(s, q0 + i * s->q_row, keys, lo + a * cap, hi + a * cap,
                                                 index + a * cap, sure + a * cap, counts + a, w->tmp, &failed);
                    w->thr[a] = cutoff > w->thr[a] ? cutoff : w->thr[a];  /* both are bounds; the higher serves */
                }
            }
        }
        t0 = _mm512_loadu_ps(w->thr + at);  /* raised by the cuts, if any */
        t1 = _mm512_loadu_ps(w->thr + at + T);
    }
    return failed;
}

/* The queries of register block b into tiles 2 and 3 (their first TK dims), 4 and 5 (the next TK): they stay
   while the block's keys pass, so that a key tile is the one load per tile multiply pair. Loading both operands
   at every step took 2.5x as long (60 ns against 22 for four multiplies, one thread). */
static void hold_queries(const tile_scratch *w, int64_t b, int64_t steps) {
    const uint16_t *qa = w->queries + 2 * b * steps * T * TK, *qb = qa + steps * T * TK;
    _tile_loadd(2, qa, TK * 2);
    _tile_loadd(3, qb, TK * 2);
    if (steps == 2) {
        _tile_loadd(4, qa + T * TK, TK * 2);
        _tile_loadd(5, qb + T * TK, TK * 2);
    }
}

/* s~ of the T keys from `ka` (kpad bfloat16 each) against the held queries into out[T][BLOCK]; `odd` alternates
   the key tile's register between consecutive calls, so a load need not wait for the last multiply. */
static inline void score_tile(const uint16_t *ka, int64_t kpad, int64_t steps, int odd, float *out) {
    _tile_zero(0);  /* [T keys x queries 0-15] */
    _tile_zero(1);  /* [T keys x queries 16-31] */
    if (steps == 2 || !odd) {
        _tile_loadd(6, ka, kpad * 2);
        _tile_dpbf16ps(0, 6, 2);
        _tile_dpbf16ps(1, 6, 3);
    }
    if (steps == 2) {
        _tile_loadd(7, ka + TK, kpad * 2);
        _tile_dpbf16ps(0, 7, 4);
        _tile_dpbf16ps(1, 7, 5);
    } else if (odd) {
        _tile_loadd(7, ka, kpad * 2);
        _tile_dpbf16ps(0, 7, 2);
        _tile_dpbf16ps(1, 7, 3);
    }
    _tile_stored(0, out, BLOCK * 4);
    _tile_stored(1, out + T, BLOCK * 4);
}

/* The s~ of keys [j0, j0 + nk) (zero keys past the end up to a whole tile) against the queries of register block
   b into w->strip, and with `bests` each tile of T keys' best lower end into w->best. */
static void score_strip(tile_scratch *w, int64_t b, int64_t steps, int64_t kpad, int64_t j0, int64_t nk,
                        int bests) {
    hold_queries(w, b, steps);
    for (int64_t kt = 0; kt * T < nk; kt++) {
        float *out = w->strip + kt * T * BLOCK;
        score_tile(w->keys + (j0 + kt * T) * kpad, kpad, steps, (int)(kt & 1), out);
        if (bests) group_best(w->qn + b * BLOCK, out, w->kn + j0 + kt * T, w->best + kt * BLOCK);
    }
}

/* Rows [r0, r1) of group g into w: their queries in bfloat16 (the tiles' B layout), bound norms, limits and
   thresholds (-inf; padding rows +inf), empty buffers; the keys up to the furthest limit in bfloat16 with their
   norms (zero keys to a whole block). Returns that limit; low[b]: the least limit of block b's rows. */
static int64_t prepare(const search *s, int64_t g, int64_t r0, int64_t r1, tile_scratch *w, int64_t *low) {
    const int64_t d = s->d, rows = r1 - r0, steps = (d + TK - 1) / TK, kpad = steps * TK;
    const int64_t blocks = (rows + BLOCK - 1) / BLOCK;
    const float *keys = s->keys + g * s->k_group, *q0 = s->q + g * s->q_group + r0 * s->q_row;
    const float scale = bound_scale(d, kpad);
    int64_t reach = 0;
    uint16_t one[MAX_DIM];
    for (int64_t i = 0; i < blocks * BLOCK; i++) {
        int live = i < rows;
        if (i % BLOCK == 0) low[i / BLOCK] = s->n;
        w->qn[i] = live ? scale * to_bf16(q0 + i * s->q_row, d, kpad, one) : 0.0f;
        if (!live) memset(one, 0, sizeof(uint16_t) * kpad);
        w->lim[i] = live ? (int32_t)limit_of(s, r0 + i) : 0;
        w->thr[i] = live ? -INFINITY : INFINITY;
        w->counts[i] = 0;
        if (live && w->lim[i] > reach) reach = w->lim[i];
        if (live && w->lim[i] < low[i / BLOCK]) low[i / BLOCK] = w->lim[i];
        uint32_t *pairs = (uint32_t *)w->queries, *src = (uint32_t *)one;  /* B[tile][step][pair][query] */
        for (int64_t p = 0; p < kpad / 2; p++) pairs[((i / T * steps + p / T) * T + p % T) * T + i % T] = src[p];
    }
    if (w->held == keys && w->held_reach == reach) return reach;  /* the last item's keys: rows past SPAN */
    w->held = keys, w->held_reach = reach;
    for (int64_t j = 0; j < (reach + BLOCK - 1) / BLOCK * BLOCK; j++) {
        if (j < reach) {
            w->kn[j] = to_bf16(keys + j * s->k_row, d, kpad, w->keys + j * kpad);
        } else {
            w->kn[j] = 0.0f;
            memset(w->keys + j * kpad, 0, sizeof(uint16_t) * kpad);
        }
    }
    return reach;
}

/* Tiles in a group of the floor: about 4k groups, so that the k-th best group reaches near the k-th best key
   (k = 256 of 32,768: 1,024 groups of 32 keys). */
static int64_t floor_group(const search *s) { return s->n / (4 * s->k * T) > 1 ? s->n / (4 * s->k * T) : 1; }

/* Every block's thresholds from the floor: groups of floor_group tiles over the keys every row of a block reads,
   each group's best lower end the best of its tiles' (group_best), the k-th best of them by raise_thresholds. */
static void floor_pass(const search *s, tile_scratch *w, int64_t blocks, const int64_t *low) {
    const int64_t steps = (s->d + TK - 1) / TK, kpad = steps * TK, per = floor_group(s), size = T * per;
    const int64_t chunk = FLOOR_CHUNK / size > 1 ? FLOOR_CHUNK / size : 1, all = s->n / size;
    int32_t tile[BLOCK];
    /* A chunk of keys meets every block's queries before the next chunk, so the keys are read from memory once
       (block by block over all keys, 32,768 slots streamed 4 MiB of keys per block). */
    for (int64_t g0 = 0; g0 < all; g0 += chunk) {
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t g1 = low[b] / size < g0 + chunk ? low[b] / size : g0 + chunk;
            if (g0 < g1) hold_queries(w, b, steps);
            for (int64_t gr = g0; gr < g1; gr++) {
                int32_t *best = w->best + (b * all + gr) * BLOCK;
                for (int64_t kt = gr * per; kt < (gr + 1) * per; kt++) {
                    score_tile(w->keys + kt * T * kpad, kpad, steps, (int)(kt & 1), w->strip);
                    group_best(w->qn + b * BLOCK, w->strip, w->kn + kt * T, kt == gr * per ? best : tile);
                    for (int h = 0; kt > gr * per && h < 2; h++)
                        _mm512_storeu_si512(best + h * T, _mm512_max_epi32(_mm512_loadu_si512(best + h * T),
                                                                           _mm512_loadu_si512(tile + h * T)));
                }
            }
        }
    }
    for (int64_t b = 0; b < blocks; b++)
        raise_thresholds(s, w->best + b * all * BLOCK, low[b] / size, w->thr + b * BLOCK);
}

/* Rows [r0, r1) of group g (at most SPAN); returns 1 where a row needs the caller's ranking. */
static int tile_rows(const search *s, int64_t g, int64_t r0, int64_t r1, tile_scratch *w) {
    const int64_t k = s->k, cap = s->cap, rows = r1 - r0, steps = (s->d + TK - 1) / TK, kpad = steps * TK;
    const int64_t blocks = (rows + BLOCK - 1) / BLOCK;
    const float *keys = s->keys + g * s->k_group, *q0 = s->q + g * s->q_group + r0 * s->q_row;
    int64_t low[SPAN / BLOCK];
    const int64_t reach = prepare(s, g, r0, r1, w, low);
    int failed = 0;
    /* Up to FEW_PICKS picks no floor: the groups so far set thresholds near the k-th best key, and a second scoring
       costs more than it saves (one thread, LongMem's chunk search [4 x 512 x 16,384, dim 64] k 8 13.4 -> 10.3). */
    const int many = s->n > STRIP, floored = many && k > FEW_PICKS;
    for (int64_t i = 0; k <= FEW_PICKS && i < blocks * FEW_PICKS * BLOCK; i++) w->top[i] = ordered(-INFINITY);
    if (floored) floor_pass(s, w, blocks, low);
    for (int64_t j0 = 0, strip = many ? FLOOR_STRIP : STRIP; j0 < reach; j0 += strip) {
        const int64_t nk = reach - j0 < strip ? reach - j0 : strip;
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t at = b * BLOCK, nq = rows - at < BLOCK ? rows - at : BLOCK;
            const int64_t own = (low[b] - j0 < nk ? low[b] - j0 : nk) / T;  /* whole groups all rows read */
            score_strip(w, b, steps, kpad, j0, nk, !floored);
            if (!floored && own > 0) raise_by_groups(s, w->best, own, w->top + at * FEW_PICKS, w->thr + at);
            failed |= select_keys(s, w, q0 + at * s->q_row, keys, w->strip, w->kn + j0, at, nq, j0, nk, low[b]);
        }
    }
    for (int64_t i = 0; i < rows; i++) {
        float *lo = w->lo + i * cap, *hi = w->hi + i * cap;
        int32_t *ix = w->index + i * cap;
        uint8_t *sure = w->sure + i * cap;
        int64_t n = w->counts[i];
        if (n >= k) {  /* the pairs reaching the k-th best lower end hold the k best */
            for (int64_t c = 0; c < n; c++) w->tmp[c] = ordered(lo[c]);
            n = keep_reaching(lo, hi, ix, sure, n, from_ordered(kth_bound(w->tmp, n, k, 16)));
        }
        failed |= make_sure(s, q0 + i * s->q_row, keys, lo, hi, ix, sure, n);
        failed |= finish_row(s, g, r0 + i, lo, ix, n, w->lim[i], w->tmp);
    }
    return failed;
}

/* A thread's scratch memory, kept for its next search: a fresh allocation of a few MiB is mapped and faulted in
   page by page on every call (glibc gives it back to the OS when it is freed). FoT's search on the reference model
   alternating with the numpy path (bench_native's part 1): 2 threads 2.19 -> 1.28 ms, one thread 2.53 -> 2.44. */
static _Thread_local struct {
    char *block;
    int64_t size;
} kept;

/* One thread's scratch carved from its kept memory (64-byte aligned parts); 0 when it cannot be had. */
static int scratch_of(const search *s, tile_scratch *w) {
    const int64_t kpad = (s->d + TK - 1) / TK * TK, cap = s->cap, keys = (s->n + BLOCK - 1) / BLOCK * BLOCK;
    const int64_t strip = keys < STRIP ? keys : STRIP;
    /* group bests: the tile path's, a strip's groups of T keys; the floor's, every block's groups */
    const int64_t path = strip / T * BLOCK, floor = SPAN / BLOCK * (s->n / (T * floor_group(s))) * BLOCK;
    const int64_t best = path > floor ? path : floor;
    void **part[] = {(void **)&w->queries, (void **)&w->keys, (void **)&w->qn, (void **)&w->kn, (void **)&w->lim,
                     (void **)&w->thr, (void **)&w->strip, (void **)&w->best, (void **)&w->lo, (void **)&w->hi,
                     (void **)&w->index, (void **)&w->sure, (void **)&w->counts, (void **)&w->tmp, (void **)&w->top};
    const int64_t size[] = {2 * SPAN * kpad, 2 * keys * kpad, 4 * SPAN, 4 * keys, 4 * SPAN, 4 * SPAN,
                            4 * strip * BLOCK, 4 * best, 4 * SPAN * cap, 4 * SPAN * cap, 4 * SPAN * cap,
                            SPAN * cap, 8 * SPAN, 4 * RANK_SCRATCH(cap), 4 * SPAN * FEW_PICKS};
    int64_t total = 0;
    for (size_t i = 0; i < sizeof size / sizeof *size; i++) total += (size[i] + 63) / 64 * 64;
    if (kept.size < total) {
        free(kept.block);
        kept.block = aligned_alloc(64, (size_t)total);
        kept.size = kept.block ? total : 0;
    }
    char *base = kept.block;
    for (size_t i = 0; base && i < sizeof size / sizeof *size; i++) {
        *part[i] = base;
        base += (size[i] + 63) / 64 * 64;
    }
    return base != NULL;
}

/* Eight tiles of T rows x TK bfloat16 for this thread. */
static void configure_tiles(void) {
    tile_config config = {.palette = 1};
    for (int t = 0; t < 8; t++) {
        config.colsb[t] = TK * 2;
        config.rows[t] = T;
    }
    _tile_loadconfig(&config);
}

static int tile_items(const search *s, int64_t first, int64_t step, int64_t items) {
    tile_scratch w = {.held = NULL};
    if (!scratch_of(s, &w)) return 1;
    configure_tiles();
    int failed = 0;
    for (int64_t item = first; item < items && !failed; item += step) {
        int64_t g, r0, r1;
        item_rows(s, item, BLOCK, &g, &r0, &r1);
        if (r0 < r1) failed |= tile_rows(s, g, r0, r1, &w);
    }
    _tile_release();
    return failed;
}

/* Where the tiles win (one thread, registers -> tiles; benchmarks/README.md, s15 and s16): in one strip, k 32 of
   8,192 slots 3.35 -> 2.39 ms, k 64 3.97 -> 3.23, but k 128 9.43 -> 10.80; past one strip, from the floor, k 32 of
   32,768 9.74 -> 7.11, k 256 18.5 -> 15.2, but k 512 27.1 -> 27.8 and at dim 64 k 2,048 of 32,768 (Unlimiformer on
   the 62M model) 129 -> 167: the floor's groups thin out and each pick is scored twice ([2 x 256 queries, dim 40]
   unless said). Elsewhere the registers run. */
int tiles_take(int64_t n, int64_t d, int64_t k) {
    return d <= MAX_DIM && (n <= STRIP ? k <= MAX_K && n >= 40 * k : k <= FLOOR_MAX_K && n >= FLOOR_PICKS * k);
}

int tiles_search(const search *s, int64_t items, int64_t threads, int *failed) {
    if (!tiles_take(s->n, s->d, s->k) || s->n * s->k_row >= ((int64_t)1 << 31) || !tiles_usable()) return 0;
    int bad = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads((int)threads) reduction(| : bad)
    bad |= tile_items(s, omp_get_thread_num(), omp_get_num_threads(), items);
#else
    bad = tile_items(s, 0, 1, items);
#endif
    *failed = bad;
    return 1;
}

#else  /* no AMX in this build */
int tiles_usable(void) { return 0; }
int tiles_take(int64_t n, int64_t d, int64_t k) { return (void)n, (void)d, (void)k, 0; }
int tiles_search(const search *s, int64_t items, int64_t threads, int *failed) {
    return (void)s, (void)items, (void)threads, (void)failed, 0;
}
#endif
