/* The softmax read of each query's picked memory slots, merged into the local attention's output (picked_read.py).

   For query row i of group g (a batch row's KV head): the picked slots' raw inner products s_j (given, or scored
   here against the bank's keys), scaled, join the local attention's log-sum-exp L in one softmax:
       m = max(L, max_j s_j),  w_0 = exp(L - m),  w_j = exp(s_j - m),  T = w_0 + sum_j w_j
       merged = out * (w_0 / T) + sum_j (w_j / T) * values[g, slot_j]
   Without a local read (lse NULL) w_0 = 0: the picked slots' own softmax (LongMem's memory attention).
   A slot of index < 0 (not found) or a NaN / -inf score takes no weight. One pass per row: its scores, then the
   values of the slots with weight, read straight from the bank (no [rows x k x d] gather written).
   With rotation tables (Unlimiformer's scaled positions) a scored key is first rotated to its slot's position,
   as `kernels.rotate` does: k * cos + rotate_half(k) * sin, rotate_half(k) = [-k[h:], k[:h]], h = d / 2, with
   the tables' row where[slot]. */

#include <math.h>
#include <stdint.h>
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

/* One row (flat index `row` = g * rows + i); w: k floats of scratch, acc: d floats. */
static void read_row(const picked *p, int64_t row, float *w, float *acc) {
    const int64_t g = row / p->rows, d = p->d, k = p->k;
    const int64_t *slots = p->slots + row * k;
    const float local = p->lse ? p->lse[row] : -INFINITY;
    float top = local;
    for (int64_t j = 0; j < k; j++) {
        if (j + AHEAD < k && slots[j + AHEAD] >= 0) {
            const int64_t ahead = slots[j + AHEAD] + p->offset;
            prefetch_row(p->values + g * p->v_group + ahead * p->v_row, d);
            if (!p->logits) prefetch_row(p->keys + g * p->k_group + ahead * p->k_row, d);
        }
        float s = -INFINITY;
        if (slots[j] >= 0) {
            const int64_t at = slots[j] + p->offset;
            s = p->scale * (p->logits ? p->logits[row * k + j] : score(p, row, g, at));
            if (!(s > -INFINITY)) s = -INFINITY; /* NaN: not found, as the PyTorch path masks it */
        }
        w[j] = s;
        if (s > top) top = s;
    }
    const float w0 = p->lse ? expf(local - top) : 0.0f;
    float total = w0;
    for (int64_t j = 0; j < k; j++) {
        w[j] = expf(w[j] - top); /* exp(-inf) = 0 */
        total += w[j];
    }
    const float inv = 1.0f / total, keep = w0 * inv;
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
                 const float *lse, float *merged, int64_t groups, int64_t rows, int64_t k, int64_t d,
                 int64_t offset, float scale, const float *cos, const float *sin, const int64_t *where,
                 int64_t threads) {
    picked p = {q, keys, values, k_group, k_row, v_group, v_row, slots, logits, out, lse, merged, rows, k, d,
                offset, scale, cos, sin, where};
    const int64_t total = groups * rows;
    if (threads < 1) threads = 1;
    if (threads > total) threads = total > 0 ? total : 1;
#pragma omp parallel num_threads((int)threads)
    {
        float scratch[k + d];
#pragma omp for schedule(static)
        for (int64_t row = 0; row < total; row++) read_row(&p, row, scratch, scratch + k);
    }
}
