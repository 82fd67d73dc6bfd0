/* Exact top-k inner products, scored and selected in one pass (see fused_topk.py, which builds and calls this).

   For each group g (batch row x KV head) and query row i: the k largest q[g, i] . keys[g, j] over j < limit[i],
   best first, the lower j first among equal scores (also at the k-th place); a row with fewer than k keys gets its
   masked keys of lowest index at -inf. The scores never reach memory as a [rows x keys] block: a register block of
   V x W query rows by R keys is scored (W = SIMD lanes) and each score is compared at once with its row's current
   k-th best; the few that beat it are appended to the row's buffer, which is cut back to about its k best when
   full, and exactly to them at the end.
   Returns 0, or 1 where a score is NaN or a key scored -inf itself (the caller ranks those rows its own way). */
#include "topk_select.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
#define W 16
typedef __m512 vec;
static inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vset1(float x) { return _mm512_set1_ps(x); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
/* Lanes of a not <= t: above the threshold, or NaN. */
static inline uint64_t vpass(vec a, vec t) { return (uint64_t)_mm512_cmp_ps_mask(a, t, _CMP_NLE_UQ); }
static inline void vstore(float *p, vec a) { _mm512_storeu_ps(p, a); }
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define W 8
typedef __m256 vec;
static inline vec vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vset1(float x) { return _mm256_set1_ps(x); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline uint64_t vpass(vec a, vec t) {
    return (uint64_t)_mm256_movemask_ps(_mm256_cmp_ps(a, t, _CMP_NLE_UQ));
}
static inline void vstore(float *p, vec a) { _mm256_storeu_ps(p, a); }
#else
#define W 1
typedef float vec;
static inline vec vload(const float *p) { return *p; }
static inline vec vzero(void) { return 0.0f; }
static inline vec vset1(float x) { return x; }
static inline vec vfma(vec a, vec b, vec c) { return fmaf(a, b, c); }
static inline uint64_t vpass(vec a, vec t) { return !(a <= t); }
static inline void vstore(float *p, vec a) { *p = a; }
#endif

/* A register block: V vectors of query rows (QB = V x W rows, at most 64) by R keys, R x V accumulators. AVX-512
   (32 registers): 4 x 6, 24 accumulators; one thread, FoT's search on the 62M model 12.8 ms, against 14.8 (2 x 8),
   15.5 (2 x 12), 13.2 (4 x 4), 16.9 (1 x 16). AVX2 (16 registers): 2 x 6, 12 accumulators. */
#if W == 16
#define V 4
#define R 6
#elif W == 8
#define V 2
#define R 6
#else
#define V 1
#define R 4
#endif
#define QB (V * W)

/* Cuts a full buffer back while scoring goes on, and returns the score a later key must beat. Not exact: the
   bound t keeps the top 16 bits of the k-th best (sign, exponent, 7 mantissa bits), and every pair >= t stays
   (at least k, a few more), so half the counting passes of `reduce` and a vectorised compaction; a key scoring
   t or less cannot be among the k best (k pairs of lower index score >= t). Ties that keep more than half the
   buffer are cut exactly by `reduce`, so a cut always makes room. One thread, exact cuts -> these, k = 32 of 1,280
   slots: [2 KV heads x 256 queries, dim 40] (the reference model) 1.89 -> 1.41 ms, [8 x 128, dim 64] 4.67 -> 3.41. */
static float cut(float *sc, int32_t *ix, int64_t *count, int64_t k, int64_t cap, int32_t *tmp) {
    int64_t n = *count, kept = 0;
    for (int64_t i = 0; i < n; i++) tmp[i] = ordered(sc[i]);
    int32_t t = kth_bound(tmp, n, k, 16);
    for (int64_t i = 0; i < n; i++) kept += tmp[i] >= t;
    if (kept > cap / 2) {
        reduce(sc, ix, count, k, tmp);
        float least = sc[0];
        for (int64_t i = 1; i < k; i++) least = sc[i] < least ? sc[i] : least;
        return least;  /* the k-th best: a later key must beat it */
    }
    kept = 0;
#if defined(__AVX512F__)
    __m512i bound = _mm512_set1_epi32(t);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __mmask16 keep = _mm512_cmpge_epi32_mask(_mm512_loadu_si512(tmp + i), bound);
        /* Compressed in a register, stored whole: kept <= i, so the 16 lanes written end by i + 16, all read. A
           compressing store to memory is microcoded on AMD Zen 4 (Unlimiformer's search, k = 2,048 of 32,768 slots
           on the 62M model: the cuts took 0.28 of it, 0.7 of that in these two stores). */
        _mm512_storeu_ps(sc + kept, _mm512_maskz_compress_ps(keep, _mm512_loadu_ps(sc + i)));
        _mm512_storeu_si512(ix + kept, _mm512_maskz_compress_epi32(keep, _mm512_loadu_si512(ix + i)));
        kept += __builtin_popcount(keep);
    }
#else
    int64_t i = 0;
#endif
    for (; i < n; i++) {
        sc[kept] = sc[i];
        ix[kept] = ix[i];
        kept += tmp[i] >= t;
    }
    *count = kept;
    return from_ordered(t);  /* a key scoring t ranks below the k kept pairs >= t of lower index */
}

typedef struct {  /* one thread's scratch, for up to SPAN query rows */
    float *packed;    /* [SPAN / QB][d][QB] the rows' queries, transposed a register block at a time */
    float *scores;    /* [SPAN][cap] each row's buffered scores */
    int32_t *index;   /* [SPAN][cap] and their keys */
    int64_t *counts;  /* [SPAN] pairs buffered */
    int64_t *lim;     /* [SPAN] keys each row reads (padding rows: n) */
    float *thr;       /* [SPAN] the score a key must beat (padding rows: +inf, so they take nothing) */
    int32_t *tmp;     /* [RANK_SCRATCH(cap)] */
} scratch;

/* Keys [j0, j1) against the QB rows of register block b (its first row's state at `at`); returns 1 on a NaN. */
static int score_block(const search *s, const float *keys, const float *packed, int64_t j0, int64_t j1, int64_t low,
                       int64_t nq, scratch *w, int64_t at) {
    int64_t d = s->d, k = s->k, cap = s->cap;
    int64_t *lim = w->lim + at, *counts = w->counts + at;
    float *thr = w->thr + at;
    uint64_t live = nq >= 64 ? ~0ull : (1ull << nq) - 1ull;
    int failed = 0;
    for (int64_t jb = j0; jb < j1; jb += R) {
        int64_t nr = j1 - jb < R ? j1 - jb : R;
        const float *krow[R];
        for (int64_t r = 0; r < R; r++) krow[r] = keys + (jb + (r < nr ? r : 0)) * s->k_row;
        vec acc[R][V];  /* acc[r][v]: key jb + r against rows v W .. v W + W - 1 */
        for (int r = 0; r < R; r++)
            for (int v = 0; v < V; v++) acc[r][v] = vzero();
        for (int64_t t = 0; t < d; t++) {
            vec qv[V];
            for (int v = 0; v < V; v++) qv[v] = vload(packed + t * QB + v * W);
            for (int r = 0; r < R; r++) {
                vec kv = vset1(krow[r][t]);
                for (int v = 0; v < V; v++) acc[r][v] = vfma(kv, qv[v], acc[r][v]);
            }
        }
        vec tv[V];
        for (int v = 0; v < V; v++) tv[v] = vload(thr + v * W);
        for (int64_t r = 0; r < nr; r++) {
            int64_t j = jb + r;
            uint64_t hit = 0;
            for (int v = 0; v < V; v++) hit |= vpass(acc[r][v], tv[v]) << (v * W);
            hit &= live;
            if (j >= low)  /* rows whose limit is at or before key j do not read it */
                for (int64_t i = 0; i < QB; i++) hit &= lim[i] <= j ? ~(1ull << i) : ~0ull;
            if (!hit) continue;
            float got[QB];
            for (int v = 0; v < V; v++) vstore(got + v * W, acc[r][v]);
            while (hit) {
                int i = __builtin_ctzll(hit);
                hit &= hit - 1;
                failed |= got[i] != got[i];
                float *sc = w->scores + (at + i) * cap;
                int32_t *ix = w->index + (at + i) * cap;
                sc[counts[i]] = got[i];
                ix[counts[i]++] = (int32_t)j;
                if (counts[i] == cap) thr[i] = cut(sc, ix, counts + i, k, cap, w->tmp);
            }
            for (int v = 0; v < V; v++) tv[v] = vload(thr + v * W);
        }
    }
    return failed;
}

/* Rows [r0, r1) of group g (at most SPAN); returns 1 where a row needs the caller's ranking. */
static int search_rows(const search *s, int64_t g, int64_t r0, int64_t r1, scratch *w) {
    int64_t d = s->d, k = s->k, cap = s->cap, rows = r1 - r0;
    int64_t blocks = (rows + QB - 1) / QB, reach = 0, low[SPAN / QB];
    const float *keys = s->keys + g * s->k_group;
    int failed = 0;
    for (int64_t b = 0; b < blocks; b++) {
        low[b] = s->n;
        for (int64_t i = 0; i < QB; i++) {  /* packed[b][t][i] = row r0 + b QB + i's t-th entry */
            int64_t at = b * QB + i, live = at < rows;
            const float *src = s->q + g * s->q_group + (r0 + (live ? at : 0)) * s->q_row;
            for (int64_t t = 0; t < d; t++) w->packed[(b * d + t) * QB + i] = live ? src[t] : 0.0f;
            w->lim[at] = live ? limit_of(s, r0 + at) : s->n;
            w->counts[at] = 0;
            w->thr[at] = live ? -INFINITY : INFINITY;
            if (live && w->lim[at] > reach) reach = w->lim[at];
            if (w->lim[at] < low[b]) low[b] = w->lim[at];
        }
    }
    for (int64_t j0 = 0; j0 < reach; j0 += KEY_CHUNK) {
        int64_t j1 = reach - j0 < KEY_CHUNK ? reach : j0 + KEY_CHUNK;
        for (int64_t b = 0; b < blocks; b++) {
            int64_t nq = rows - b * QB < QB ? rows - b * QB : QB;
            failed |= score_block(s, keys, w->packed + b * d * QB, j0, j1, low[b], nq, w, b * QB);
        }
    }
    for (int64_t i = 0; i < rows; i++) {
        float *sc = w->scores + i * cap;
        int32_t *ix = w->index + i * cap;
        /* The k best and a few more (a 16-bit cut), then all ranked: the first k are the k best, the lower key
           first among equal scores. The exact 32-bit `reduce` of every buffer before ranking k pairs took 0.84
           of the time at [2 KV heads x 256 queries x 1,280 slots, dim 40], k = 32 (one thread). */
        if (w->counts[i] > 2 * k) cut(sc, ix, w->counts + i, k, cap, w->tmp);
        failed |= finish_row(s, g, r0 + i, sc, ix, w->counts[i], w->lim[i], w->tmp);
    }
    return failed;
}

/* Work items: groups, each split into per_group row spans of at most SPAN rows. */
static int search_items(const search *s, int64_t first, int64_t step, int64_t items) {
    scratch w = {malloc(sizeof(float) * SPAN * s->d), malloc(sizeof(float) * SPAN * s->cap),
                 malloc(sizeof(int32_t) * SPAN * s->cap), malloc(sizeof(int64_t) * SPAN),
                 malloc(sizeof(int64_t) * SPAN), malloc(sizeof(float) * SPAN),
                 malloc(sizeof(int32_t) * RANK_SCRATCH(s->cap))};
    int failed = !w.packed || !w.scores || !w.index || !w.counts || !w.lim || !w.thr || !w.tmp;
    for (int64_t item = first; item < items && !failed; item += step) {
        int64_t g, r0, r1;
        item_rows(s, item, QB, &g, &r0, &r1);
        if (r0 < r1) failed |= search_rows(s, g, r0, r1, &w);
    }
    free(w.packed);
    free(w.scores);
    free(w.index);
    free(w.counts);
    free(w.lim);
    free(w.thr);
    free(w.tmp);
    return failed;
}

/* q [groups, rows, d] and keys [groups, n, d] by element strides (the last dimension contiguous); limit [rows] or
   NULL; out [groups, rows, k] each. Threads: OpenMP's, which in a process running PyTorch are PyTorch's own. */
int topk_inner_products(const float *q, const float *keys, int64_t groups, int64_t rows, int64_t n, int64_t d,
                        int64_t q_group, int64_t q_row, int64_t k_group, int64_t k_row, const int64_t *limit,
                        int64_t k, float *out_scores, int64_t *out_index, int64_t threads, int64_t tiles) {
    if (threads < 1) threads = 1;
    int64_t per_group = groups >= threads ? 1 : (threads + groups - 1) / groups;
    if (per_group > (rows + QB - 1) / QB) per_group = (rows + QB - 1) / QB;
    if (per_group < (rows + SPAN - 1) / SPAN) per_group = (rows + SPAN - 1) / SPAN;
    if (per_group < 1) per_group = 1;
    int64_t items = groups * per_group;
    if (threads > items) threads = items;
    /* The buffer holds 3k pairs (at least k + 32): against 4k (one thread, one process, alternating builds)
       0.83-0.86 of the time at [2 KV heads x 256 queries x 1,280 slots, dim 40], 0.94 at 8,192 slots, the same at
       [8 x 128 x 1,280, dim 64]; 2k is cut too often, 8k and 16k measured slower than 4k. */
    int64_t cap = 3 * k > k + 32 ? 3 * k : k + 32;
    search s = {q, keys, rows, n, d, q_group, q_row, k_group, k_row, k, cap, limit, out_scores, out_index,
                per_group};
    int failed = 0;
    if (tiles && tiles_search(&s, items, threads, &failed)) return failed;
#ifdef _OPENMP
#pragma omp parallel num_threads((int)threads) reduction(| : failed)
    failed |= search_items(&s, omp_get_thread_num(), omp_get_num_threads(), items);
#else
    failed = search_items(&s, 0, 1, items);
#endif
    return failed;
}

/* SIMD lanes of this build: 16 (AVX-512), 8 (AVX2), 1 (plain C, slower than the numpy path). */
int simd_width(void) { return W; }
