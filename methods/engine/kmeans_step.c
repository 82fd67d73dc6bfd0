/* One online k-means step of the Routing Transformer's centroids (buckets.update_centroids), for each group g (a
   batch row's KV head): the segment's points (its queries, then its keys) on the unit sphere, x / max(|x|, 1e-12)
   as F.normalize; each assigned to its nearest centroid (the largest cosine, the first of equal ones, as argmax);
   a centroid with members moved to normalize(decay c + (1 - decay) mean of its members), one without kept. Its
   result is the PyTorch path's up to float32 rounding (other orders of sums; tests/test_buckets.py). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define EPS 1e-12f /* F.normalize's */
#define CB 16      /* cosines accumulated together: a vector register of floats */

static float norm_of(const float *x, int64_t d) {
    float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
    for (int64_t t = 0; t < d; t++) sq += x[t] * x[t];
    const float n = sqrtf(sq);
    return n > EPS ? n : EPS;
}

/* Point x (d floats): unit, into the sums and count of its nearest centroid; ct: the centroids transposed, [d]
   [cpad] (cpad: clusters rounded up to CB, zeros past them), so that CB cosines accumulate at once in registers,
   a dimension at a time; s: cpad floats. */
static void assign(const float *x, const float *restrict ct, int64_t clusters, int64_t cpad, int64_t d,
                   float *restrict unit, float *restrict s, float *restrict sums, int64_t *counts) {
    const float norm = norm_of(x, d);
    for (int64_t t = 0; t < d; t++) unit[t] = x[t] / norm;
    for (int64_t j0 = 0; j0 < cpad; j0 += CB) {
        float a0[CB] = {0.0f}, a1[CB] = {0.0f};  /* even and odd dimensions: two FMA chains in flight */
        int64_t t = 0;
        for (; t + 1 < d; t += 2) {
#pragma omp simd
            for (int jj = 0; jj < CB; jj++) {
                a0[jj] += unit[t] * ct[t * cpad + j0 + jj];
                a1[jj] += unit[t + 1] * ct[(t + 1) * cpad + j0 + jj];
            }
        }
        for (; t < d; t++) {
#pragma omp simd
            for (int jj = 0; jj < CB; jj++) a0[jj] += unit[t] * ct[t * cpad + j0 + jj];
        }
        for (int jj = 0; jj < CB; jj++) s[j0 + jj] = a0[jj] + a1[jj];
    }
    int64_t best = 0;
    for (int64_t j = 1; j < clusters; j++) best = s[j] > s[best] ? j : best;  /* the first of equal cosines */
    counts[best]++;
    for (int64_t t = 0; t < d; t++) sums[best * d + t] += unit[t];
}

/* queries: nq rows of group g at queries + g * q_group + i * q_row (and keys likewise); centroids [groups,
   clusters, d] contiguous in, moved [groups, clusters, d] out; rest: 1 - decay (as the caller rounds it). Returns
   1 when its scratch cannot be had. */
int kmeans_step(const float *queries, int64_t q_group, int64_t q_row, int64_t nq, const float *keys,
                int64_t k_group, int64_t k_row, int64_t nk, const float *centroids, float *moved, int64_t groups,
                int64_t clusters, int64_t d, float decay, float rest, int64_t threads) {
    const int64_t cpad = (clusters + CB - 1) / CB * CB;
    const int64_t per = clusters * d + cpad * d + d + cpad;  /* a group's sums, centroids transposed, unit, cosines */
    float *scratch = malloc(sizeof(float) * (size_t)(groups * per));
    int64_t *counts = calloc((size_t)(groups * clusters), sizeof(int64_t));
    if (!scratch || !counts) {
        free(scratch), free(counts);
        return 1;
    }
    if (threads < 1) threads = 1;
    if (threads > groups) threads = groups;
#pragma omp parallel for num_threads((int)threads) schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        const float *c = centroids + g * clusters * d;
        float *sums = scratch + g * per, *ct = sums + clusters * d, *unit = ct + cpad * d, *s = unit + d;
        int64_t *count = counts + g * clusters;
        memset(sums, 0, sizeof(float) * (size_t)(clusters * d));
        for (int64_t j = 0; j < cpad; j++)
            for (int64_t t = 0; t < d; t++) ct[t * cpad + j] = j < clusters ? c[j * d + t] : 0.0f;
        for (int64_t i = 0; i < nq; i++)
            assign(queries + g * q_group + i * q_row, ct, clusters, cpad, d, unit, s, sums, count);
        for (int64_t i = 0; i < nk; i++)
            assign(keys + g * k_group + i * k_row, ct, clusters, cpad, d, unit, s, sums, count);
        for (int64_t j = 0; j < clusters; j++) {
            float *out = moved + (g * clusters + j) * d;
            if (!count[j]) {
                memcpy(out, c + j * d, sizeof(float) * (size_t)d);
                continue;
            }
            for (int64_t t = 0; t < d; t++) out[t] = decay * c[j * d + t] + rest * (sums[j * d + t] / (float)count[j]);
            const float norm = norm_of(out, d);
            for (int64_t t = 0; t < d; t++) out[t] /= norm;
        }
    }
    free(scratch), free(counts);
    return 0;
}
