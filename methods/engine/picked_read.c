/* The softmax read of each query's picked memory slots, merged into the local attention's output (picked_read.py).

   For query row i of group g (a batch row's KV head): the picked slots' raw inner products s_j (given, or scored
   here against the bank's keys), scaled, join the local attention's log-sum-exp L in one softmax:
       m = max(L, max_j s_j),  w_0 = exp(L - m),  w_j = exp(s_j - m),  T = w_0 + sum_j w_j
       merged = out * (w_0 / T) + sum_j (w_j / T) * values[g, slot_j]
   Without a local read (lse NULL) w_0 = 0: the picked slots' own softmax (LongMem's memory attention). With
   merged_lse the merged softmax's log-sum-exp m + log T is written too, for a read merged after this one.
   A slot of index < 0 (not found) or a NaN / -inf score takes no weight. One pass per row: its scores, then the
   values of the slots with weight, read straight from the bank (no [rows x k x d] gather written). With AVX-512
   (head dims up to 128) a row's keys are scored 16 at a time, its weights taken by a vectorized exp and
   its sum kept in registers: the same formula, other orders of sums.
   With rotation tables (Unlimiformer's scaled positions) a scored key is first rotated to its slot's position,
   as `kernels.rotate` does: k * cos + rotate_half(k) * sin, rotate_half(k) = [-k[h:], k[:h]], h = d / 2, with
   the tables' row where[slot].
   `read_buckets` reads Reformer's selection the same way, each row's slots listed here: those sharing an LSH bucket
   with it in some round, from bucket ids of the queries' and keys' projections taken here. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
    const float *q;       /* [groups, rows, d] contiguous: read when logits is NULL */
    const float *keys;    /* slot s of group g at keys + g * k_group + s * k_row (NULL when logits are given) */
    const float *values;  /* slot s of group g at values + g * v_group + s * v_row */
    int64_t k_group, k_row, v_group, v_row;
    const int64_t *slots; /* [groups, rows, k] bank slots minus `offset`; < 0: none */
    const float *logits;  /* [groups, rows, k] raw inner products, or NULL */
    const float *out;     /* [groups, rows, d] contiguous: the local attention's output (NULL with lse) */
    const float *lse;     /* [groups, rows]: its log-sum-exp of scaled scores (finite: a query reads itself), or
                             NULL: no local part, the picked slots' own softmax */
    float *merged;        /* [groups, rows, d] */
    float *merged_lse;    /* [groups, rows]: the merged softmax's log-sum-exp of scaled scores, or NULL */
    int64_t rows, k, d, offset;
    float scale;
    const float *cos, *sin; /* [positions, d] contiguous: rotations by position, or NULL: none */
    const int64_t *where;   /* [bank slots]: each slot's position, its row in cos and sin */
} picked;

static float dot(const float *a, const float *b, int64_t d) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t t = 0; t < d; t++) acc += a[t] * b[t];
    return acc;
}

/* a . (b rotated by the table rows c, s); d even. */
static inline float rotated_dot(const float *a, const float *b, const float *c, const float *s, int64_t d) {
    const int64_t h = d / 2;
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t t = 0; t < h; t++)
        acc += a[t] * (b[t] * c[t] - b[t + h] * s[t]) + a[t + h] * (b[t + h] * c[t + h] + b[t] * s[t + h]);
    return acc;
}

/* The raw inner product of row `row`'s query with the key of bank slot `at` of group g. */
static inline float score(const picked *p, int64_t row, int64_t g, int64_t at) {
    const float *q = p->q + row * p->d, *key = p->keys + g * p->k_group + at * p->k_row;
    if (!p->cos) return dot(q, key, p->d);
    const int64_t pos = p->where[at];
    return rotated_dot(q, key, p->cos + pos * p->d, p->sin + pos * p->d, p->d);
}

/* Picks ahead whose key and value rows are prefetched while a row's scores are taken: a bank past L2 is read at
   random. One thread, k = 256 of 32,768 slots, 2 KV heads x 256 rows, dim 40, random slots: scored here 3.51 ->
   2.88 ms, rotated (Unlimiformer) 5.88 -> 4.40, logits given 1.72 -> 1.70; 4 and 16 ahead measured the same. */
#define AHEAD 8

/* Every cache line of a row of d floats. */
static inline void prefetch_row(const float *row, int64_t d) {
    for (int64_t t = 0; t < d; t += 16) __builtin_prefetch(row + t);
    __builtin_prefetch(row + d - 1);
}

/* The value row and, when keys are scored here, the key row of bank slot `at` of group g, fetched ahead. */
static inline void prefetch_slot(const picked *p, int64_t g, int64_t at) {
    prefetch_row(p->values + g * p->v_group + at * p->v_row, p->d);
    if (!p->logits) prefetch_row(p->keys + g * p->k_group + at * p->k_row, p->d);
}

/* w[j]: pick j's scaled score (-inf where it is not read: no slot, NaN, -inf), one pick at a time; returns the
   largest of them and `top`. */
static float scores(const picked *p, int64_t row, int64_t g, const int64_t *slots, int64_t k, float *w, float top) {
    for (int64_t j = 0; j < k; j++) {
        if (j + AHEAD < k && slots[j + AHEAD] >= 0) prefetch_slot(p, g, slots[j + AHEAD] + p->offset);
        float s = -INFINITY;
        if (slots[j] >= 0) {
            const int64_t at = slots[j] + p->offset;
            s = p->scale * (p->logits ? p->logits[row * p->k + j] : score(p, row, g, at));
            if (!(s > -INFINITY)) s = -INFINITY; /* NaN: not found, as the PyTorch path masks it */
        }
        w[j] = s;
        if (s > top) top = s;
    }
    return top;
}

#ifndef __AVX512F__
/* w[j] = exp(w[j] - top) (0 for a pick not read: it costs no exp); returns their sum. */
static float weights(float *w, int64_t k, float top) {
    float total = 0.0f;
    for (int64_t j = 0; j < k; j++) {
        w[j] = w[j] > -INFINITY ? expf(w[j] - top) : 0.0f;
        total += w[j];
    }
    return total;
}
#endif

#ifdef __AVX512F__
/* The first min(left, 16) lanes; none when left <= 0. */
static inline __mmask16 first_lanes(int64_t left) {
    return left >= 16 ? 0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
}

#define VECTOR_DIM 128 /* the longest query row `vector_scores` holds in registers (8) */

/* Lane u: the sum of v[u]'s 16 lanes (a transpose by shuffles and adds: 45 instructions for 16 sums). */
static inline __m512 lane_sums(const __m512 v[16]) {
    __m512 a[8], b[4];
    for (int i = 0; i < 8; i++)  /* per 128-bit block of pair (x, y): x0 + x2, y0 + y2, x1 + x3, y1 + y3 */
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)  /* per block: the block's sum of v[4i], ..., v[4i + 3] */
        b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
    const __m512 c0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x88), _mm512_shuffle_f32x4(b[0], b[1], 0xDD));
    const __m512 c1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x88), _mm512_shuffle_f32x4(b[2], b[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c0, c1, 0x88), _mm512_shuffle_f32x4(c0, c1, 0xDD));
}

/* `scores` for keys scored here (d <= VECTOR_DIM): 16 picks at a time, each pick's products summed across the head
   dim in one vector, the 16 vectors reduced at once (no horizontal sum per pick). A rotated key (tables given) is
   k * cos + rotate_half(k) * sin, rotate_half(k)[t] = -k[t + h] below h = d / 2, k[t - h] from h on: two masked
   loads of the key at -h and +h (masked-out lanes are not read). */
static float vector_scores(const picked *p, int64_t row, int64_t g, const int64_t *slots, int64_t k, float *w,
                           float top) {
    const int64_t d = p->d, h = d / 2, chunks = (d + 15) / 16;
    __m512 q[VECTOR_DIM / 16];
    __mmask16 live[VECTOR_DIM / 16], low[VECTOR_DIM / 16];  /* chunk c's lanes within d, and those below h */
    for (int64_t c = 0; c < chunks; c++) {
        live[c] = first_lanes(d - 16 * c), low[c] = live[c] & first_lanes(h - 16 * c);
        q[c] = _mm512_maskz_loadu_ps(live[c], p->q + row * d + 16 * c);
    }
    const float *keys = p->keys + g * p->k_group;
    __m512 best = _mm512_set1_ps(top);
    for (int64_t j0 = 0; j0 < k; j0 += 16) {
        __m512 part[16];
        __mmask16 found = 0;
        for (int u = 0; u < 16; u++) {
            const int64_t j = j0 + u;
            part[u] = _mm512_setzero_ps();
            if (j + AHEAD < k && slots[j + AHEAD] >= 0) prefetch_slot(p, g, slots[j + AHEAD] + p->offset);
            if (j >= k || slots[j] < 0) continue;
            const float *key = keys + (slots[j] + p->offset) * p->k_row;
            if (!p->cos) {
                for (int64_t c = 0; c < chunks; c++)
                    part[u] = _mm512_fmadd_ps(q[c], _mm512_maskz_loadu_ps(live[c], key + 16 * c), part[u]);
            } else {
                const int64_t pos = p->where[slots[j] + p->offset];
                const float *cos = p->cos + pos * d, *sin = p->sin + pos * d;
                for (int64_t c = 0; c < chunks; c++) {
                    const __m512 turned = _mm512_sub_ps(_mm512_maskz_loadu_ps(live[c] & ~low[c], key + 16 * c - h),
                                                        _mm512_maskz_loadu_ps(low[c], key + 16 * c + h));
                    part[u] = _mm512_fmadd_ps(_mm512_mul_ps(q[c], _mm512_maskz_loadu_ps(live[c], key + 16 * c)),
                                              _mm512_maskz_loadu_ps(live[c], cos + 16 * c), part[u]);
                    part[u] = _mm512_fmadd_ps(_mm512_mul_ps(q[c], turned),
                                              _mm512_maskz_loadu_ps(live[c], sin + 16 * c), part[u]);
                }
            }
            found |= (__mmask16)(1u << u);
        }
        __m512 s = _mm512_mul_ps(_mm512_set1_ps(p->scale), lane_sums(part));
        /* NaN and -inf: not read, as in `scores` */
        const __mmask16 read = found & _mm512_cmp_ps_mask(s, _mm512_set1_ps(-INFINITY), _CMP_GT_OQ);
        s = _mm512_mask_blend_ps(read, _mm512_set1_ps(-INFINITY), s);
        _mm512_mask_storeu_ps(w + j0, first_lanes(k - j0), s);
        best = _mm512_max_ps(best, s);
    }
    return _mm512_reduce_max_ps(best);
}

/* exp(x) for x <= 0 (Cephes' expf: a degree-6 polynomial on x - n ln 2, then 2^n): within 1 ulp of glibc's expf
   and 1.2e-7 relative of exp in double on every float in [-104, 0]; x below -127 (-inf, NaN) gives 0. */
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-127.0f)); /* NaN -> -127; 2^-183 rounds to 0 */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(_mm512_mul_ps(y, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
}

/* `weights` 16 at a time. */
static float vector_weights(float *w, int64_t k, float top) {
    __m512 total = _mm512_setzero_ps();
    for (int64_t j0 = 0; j0 < k; j0 += 16) {
        const __mmask16 live = first_lanes(k - j0);
        const __m512 e = _mm512_maskz_mov_ps(live, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, w + j0),
                                                                                 _mm512_set1_ps(top))));
        _mm512_mask_storeu_ps(w + j0, live, e);
        total = _mm512_add_ps(total, e);
    }
    return _mm512_reduce_add_ps(total);
}

/* merged[row] = out[row] * keep + sum_j w[j] * inv * values[slot j], the sums held in registers (d <= VECTOR_DIM). */
static void vector_sum(const picked *p, int64_t row, int64_t g, const int64_t *slots, int64_t k, const float *w,
                       float inv, float keep) {
    const int64_t d = p->d, chunks = (d + 15) / 16;
    __m512 acc[VECTOR_DIM / 16];
    for (int64_t c = 0; c < chunks; c++)
        acc[c] = p->lse ? _mm512_mul_ps(_mm512_set1_ps(keep),
                                        _mm512_maskz_loadu_ps(first_lanes(d - 16 * c), p->out + row * d + 16 * c))
                        : _mm512_setzero_ps();
    const float *values = p->values + g * p->v_group;
    for (int64_t j = 0; j < k; j++) {
        if (w[j] == 0.0f) continue;
        const __m512 share = _mm512_set1_ps(w[j] * inv);
        const float *v = values + (slots[j] + p->offset) * p->v_row;
        for (int64_t c = 0; c < chunks; c++)
            acc[c] = _mm512_fmadd_ps(share, _mm512_maskz_loadu_ps(first_lanes(d - 16 * c), v + 16 * c), acc[c]);
    }
    for (int64_t c = 0; c < chunks; c++)
        _mm512_mask_storeu_ps(p->merged + row * d + 16 * c, first_lanes(d - 16 * c), acc[c]);
}
#endif

/* One row (flat index `row` = g * rows + i) reading its k slots from `slots`; w: k floats of scratch, acc: d. */
static void read_row(const picked *p, int64_t row, const int64_t *slots, int64_t k, float *w, float *acc) {
    const int64_t g = row / p->rows, d = p->d;
    const float local = p->lse ? p->lse[row] : -INFINITY;
#ifdef __AVX512F__
    const float top = !p->logits && d <= VECTOR_DIM ? vector_scores(p, row, g, slots, k, w, local)
                                                    : scores(p, row, g, slots, k, w, local);
    const float w0 = p->lse ? expf(local - top) : 0.0f, total = w0 + vector_weights(w, k, top);
#else
    const float top = scores(p, row, g, slots, k, w, local);
    const float w0 = p->lse ? expf(local - top) : 0.0f, total = w0 + weights(w, k, top);
#endif
    if (p->merged_lse) p->merged_lse[row] = top + logf(total);
    const float inv = 1.0f / total, keep = w0 * inv;
#ifdef __AVX512F__
    if (d <= VECTOR_DIM) {
        vector_sum(p, row, g, slots, k, w, inv, keep);
        return;
    }
#endif
    if (p->lse) {
        const float *out = p->out + row * d;
#pragma omp simd
        for (int64_t t = 0; t < d; t++) acc[t] = out[t] * keep;
    } else {
        for (int64_t t = 0; t < d; t++) acc[t] = 0.0f;
    }
    for (int64_t j = 0; j < k; j++) {
        if (w[j] == 0.0f) continue;
        const float share = w[j] * inv;
        const float *v = p->values + g * p->v_group + (slots[j] + p->offset) * p->v_row;
#pragma omp simd
        for (int64_t t = 0; t < d; t++) acc[t] += share * v[t];
    }
    float *dst = p->merged + row * d;
#pragma omp simd
    for (int64_t t = 0; t < d; t++) dst[t] = acc[t];
}

/* Element strides as in `picked`; cos, sin, where: rotation tables and their rows by slot, or NULL; threads:
   OpenMP's (PyTorch's own in its process). k + d floats of scratch per thread on its stack (picked_read.py keeps
   k + d <= MAX_SCRATCH). */
void read_picked(const float *q, const float *keys, const float *values, int64_t k_group, int64_t k_row,
                 int64_t v_group, int64_t v_row, const int64_t *slots, const float *logits, const float *out,
                 const float *lse, float *merged, float *merged_lse, int64_t groups, int64_t rows, int64_t k,
                 int64_t d, int64_t offset, float scale, const float *cos, const float *sin, const int64_t *where,
                 int64_t threads) {
    picked p = {q, keys, values, k_group, k_row, v_group, v_row, slots, logits, out, lse, merged, merged_lse, rows,
                k, d, offset, scale, cos, sin, where};
    const int64_t total = groups * rows;
    if (threads < 1) threads = 1;
    if (threads > total) threads = total > 0 ? total : 1;
#pragma omp parallel num_threads((int)threads)
    {
        float scratch[k + d];
#pragma omp for schedule(static)
        for (int64_t row = 0; row < total; row++) read_row(&p, row, slots + row * k, k, scratch, scratch + k);
    }
}

/* Reformer's LSH bucket ids (buckets.lsh_hash) in one round of n vectors from their projections x [half][n] (slot
   fastest) into ids [n]: the argmax of [xR ; -xR], i.e. the first largest of xR, or half + the first smallest where
   -min beats max (a tie stays in the first half), as `buckets.bucket_ids_numpy`. A NaN projection gives some
   bucket. With AVX-512 a lane per vector, BLOCK vectors at once (independent max/min chains). */
static void lsh_ids(const float *x, int64_t n, int64_t half, int32_t *ids) {
    int64_t j = 0;
#ifdef __AVX512F__
#define BLOCK 4
    const __m512i second = _mm512_set1_epi32((int)half);
    for (; j < n; j += 16 * BLOCK) {
        __mmask16 live[BLOCK];
        __m512 most[BLOCK], least[BLOCK];
        __m512i high[BLOCK], low[BLOCK];
        for (int u = 0; u < BLOCK; u++) {
            live[u] = first_lanes(n - j - 16 * u);
            most[u] = least[u] = _mm512_maskz_loadu_ps(live[u], x + j + 16 * u);
            high[u] = low[u] = _mm512_setzero_si512();
        }
        for (int64_t t = 1; t < half; t++) {
            const __m512i at = _mm512_set1_epi32((int)t);
            for (int u = 0; u < BLOCK; u++) {
                const __m512 v = _mm512_maskz_loadu_ps(live[u], x + t * n + j + 16 * u);
                const __mmask16 up = _mm512_cmp_ps_mask(v, most[u], _CMP_GT_OQ);
                const __mmask16 down = _mm512_cmp_ps_mask(v, least[u], _CMP_LT_OQ);
                most[u] = _mm512_mask_mov_ps(most[u], up, v), high[u] = _mm512_mask_mov_epi32(high[u], up, at);
                least[u] = _mm512_mask_mov_ps(least[u], down, v), low[u] = _mm512_mask_mov_epi32(low[u], down, at);
            }
        }
        for (int u = 0; u < BLOCK; u++) {
            const __mmask16 flip = _mm512_cmp_ps_mask(_mm512_add_ps(most[u], least[u]), _mm512_setzero_ps(),
                                                      _CMP_LT_OQ);
            _mm512_mask_storeu_epi32(ids + j + 16 * u, live[u], _mm512_mask_add_epi32(high[u], flip, low[u], second));
        }
    }
#undef BLOCK
#endif
    for (; j < n; j++) {
        float most = x[j], least = most;
        int32_t high = 0, low = 0;
        for (int64_t t = 1; t < half; t++) {
            const float v = x[t * n + j];
            if (v > most) most = v, high = (int32_t)t;
            if (v < least) least = v, low = (int32_t)t;
        }
        ids[j] = most + least < 0 ? low + (int32_t)half : high;
    }
}

/* The n slots of one round by bucket (a counting sort of their ids): bucket b's slots, in slot order, are
   order[first[b] .. first[b + 1]). */
static void by_bucket(const int32_t *ids, int64_t n, int64_t buckets, int32_t *first, int32_t *order) {
    for (int64_t b = 0; b <= buckets; b++) first[b] = 0;
    for (int64_t j = 0; j < n; j++) first[ids[j] + 1]++;
    for (int64_t b = 0; b < buckets; b++) first[b + 1] += first[b];
    for (int64_t j = 0; j < n; j++) order[first[ids[j]]++] = (int32_t)j;  /* first[b] ends at bucket b's end */
    for (int64_t b = buckets; b > 0; b--) first[b] = first[b - 1];
    first[0] = 0;
}

/* The read of the slots sharing an LSH bucket with each query (Reformer, buckets.merge_buckets): as read_picked,
   each row's slots the bank slots j (from `offset`) of n below limit[i] (limit NULL: all n) whose bucket equals
   the row's in some round, listed from each round's slots of the row's bucket (a slot listed once: `seen`);
   projections q_proj [groups, rounds * half, rows] and k_proj [groups, rounds * half, n] contiguous (vector
   fastest). Returns 1 when its scratch cannot be had (nothing written), else 0. */
int read_buckets(const float *q, const float *keys, const float *values, int64_t k_group, int64_t k_row,
                 int64_t v_group, int64_t v_row, const float *q_proj, const float *k_proj, int64_t rounds,
                 int64_t half, const int64_t *limit, const float *out, const float *lse, float *merged,
                 float *merged_lse, int64_t groups, int64_t rows, int64_t n, int64_t d, int64_t offset, float scale,
                 int64_t threads) {
    picked p = {q, keys, values, k_group, k_row, v_group, v_row, NULL, NULL, out, lse, merged, merged_lse, rows, n,
                d, offset, scale, NULL, NULL, NULL};
    const int64_t buckets = 2 * half, lists = groups * rounds, total = groups * rows;
    int32_t *kid = malloc(sizeof(int32_t) * (size_t)(lists * n + 1));               /* [groups][rounds][n] */
    int32_t *qid = malloc(sizeof(int32_t) * (size_t)(lists * rows + 1));            /* [groups][rounds][rows] */
    int32_t *order = malloc(sizeof(int32_t) * (size_t)(lists * n + 1));             /* [groups][rounds][n] */
    int32_t *first = malloc(sizeof(int32_t) * (size_t)(lists * (buckets + 1)));     /* [groups][rounds][b + 1] */
    if (!kid || !qid || !order || !first) {
        free(kid), free(qid), free(order), free(first);
        return 1;
    }
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads((int)threads)
    {
#pragma omp for schedule(static)
        for (int64_t list = 0; list < lists; list++) {  /* list = g * rounds + r: its projections' rows */
            lsh_ids(k_proj + list * half * n, n, half, kid + list * n);
            lsh_ids(q_proj + list * half * rows, rows, half, qid + list * rows);
            by_bucket(kid + list * n, n, buckets, first + list * (buckets + 1), order + list * n);
        }
        float scratch[n + d];
        int64_t picks[n + 1], seen[n + 1];
        for (int64_t j = 0; j < n; j++) seen[j] = -1;
#pragma omp for schedule(static)
        for (int64_t row = 0; row < total; row++) {
            const int64_t g = row / rows, i = row % rows, end = limit && limit[i] < n ? limit[i] : n;
            int64_t m = 0;
            for (int64_t r = 0; r < rounds; r++) {
                const int64_t list = g * rounds + r;
                const int32_t *f = first + list * (buckets + 1), *o = order + list * n, b = qid[list * rows + i];
                for (int32_t e = f[b]; e < f[b + 1]; e++) {
                    const int64_t j = o[e];
                    if (j < end && seen[j] != row) {
                        seen[j] = row;
                        picks[m++] = j;
                    }
                }
            }
            read_row(&p, row, picks, m, scratch, scratch + n);
        }
    }
    free(kid), free(qid), free(order), free(first);
    return 0;
}
