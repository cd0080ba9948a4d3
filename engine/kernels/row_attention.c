/* Row-exact attention (engine/row_attention.py): every query row attends to its own visible keys
 * with the same instructions whatever the other rows are, so a tree row is bit-identical to the row
 * decoded alone over the same keys.
 *
 * Why in C: torch needs about seven small calls per row and layer for this (a gather, two matmuls,
 * a softmax, ...), ~20 ms of a 16-node tree's forward of a 28-layer model on one thread; here it is
 * one call per layer. And the order of every sum is written down here, not left to whichever BLAS
 * kernel a shape selects.
 *
 * Per row r, key head g and each of its query heads: s_j = q . k_j over the visible keys j in
 * ascending order (8 float32 lanes of fused multiply-adds over the head dimension, then the lanes
 * summed in a fixed order; four keys at a time, each as it would be alone), m = max s_j, e_j = expf(s_j - m), z = sum of e_j in order, and
 * out = sum over j in order of (e_j / z) v_j. q arrives pre-scaled.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* The lanes of a dot product's accumulator summed in a fixed order, then the tail. */
__attribute__((target("avx2,fma"))) static inline float finish(__m256 acc, const float *a, const float *b,
                                                               int64_t from, int64_t n) {
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    float s = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    for (int64_t i = from; i < n; i++) s = fmaf(a[i], b[i], s);
    return s;
}

/* q . b0..b3: four independent chains (the multiply-add latency is hidden), each computed exactly
 * as dot1 computes it alone. */
__attribute__((target("avx2,fma"))) static void dot4(const float *q, const float *b0, const float *b1, const float *b2,
                                                     const float *b3, int64_t n, float *out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(q + i);
        a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b0 + i), a0);
        a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b1 + i), a1);
        a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b2 + i), a2);
        a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(b3 + i), a3);
    }
    out[0] = finish(a0, q, b0, i, n);
    out[1] = finish(a1, q, b1, i, n);
    out[2] = finish(a2, q, b2, i, n);
    out[3] = finish(a3, q, b3, i, n);
}

__attribute__((target("avx2,fma"))) static float dot1(const float *q, const float *b, int64_t n) {
    __m256 a = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(b + i), a);
    return finish(a, q, b, i, n);
}

__attribute__((target("avx2,fma"))) static void axpy(float *y, float a, const float *x, int64_t n) {
    __m256 av = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] = fmaf(a, x[i], y[i]);
}

/* q: [rows][heads][dim] float32, scaled; k: [kv_heads][keys][dim]; v: [kv_heads][keys][dv];
 * row r sees keys cols[offsets[r] .. offsets[r + 1]) (ascending); out: [rows][heads][dv] (a row
 * that sees no key gets zeros). Returns 0; -1 without AVX2 + FMA; -2 when out of memory. */
int dyspec_row_attention(const float *q, int64_t rows, int64_t heads, int64_t dim, const float *k, const float *v,
                         int64_t kv_heads, int64_t keys, int64_t dv, const int64_t *offsets, const int64_t *cols,
                         float *out) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return -1;
    int64_t most = 0;
    for (int64_t r = 0; r < rows; r++) most = offsets[r + 1] - offsets[r] > most ? offsets[r + 1] - offsets[r] : most;
    float *e = malloc(sizeof(float) * (most > 0 ? most : 1));
    if (!e) return -2;
    int64_t rep = heads / kv_heads;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t *seen = cols + offsets[r];
        int64_t n = offsets[r + 1] - offsets[r];
        for (int64_t h = 0; h < heads; h++) {
            float *o = out + (r * heads + h) * dv;
            for (int64_t d = 0; d < dv; d++) o[d] = 0.0f;
            if (n == 0) continue;
            const float *qh = q + (r * heads + h) * dim;
            const float *kg = k + (h / rep) * keys * dim, *vg = v + (h / rep) * keys * dv;
            int64_t j = 0;
            for (; j + 4 <= n; j += 4)
                dot4(qh, kg + seen[j] * dim, kg + seen[j + 1] * dim, kg + seen[j + 2] * dim, kg + seen[j + 3] * dim,
                     dim, e + j);
            for (; j < n; j++) e[j] = dot1(qh, kg + seen[j] * dim, dim);
            float m = -INFINITY;
            for (j = 0; j < n; j++) m = e[j] > m ? e[j] : m;
            float z = 0.0f;
            for (j = 0; j < n; j++) {
                e[j] = expf(e[j] - m);
                z += e[j];
            }
            for (j = 0; j < n; j++) axpy(o, e[j] / z, vg + seen[j] * dv, dv);
        }
    }
    free(e);
    return 0;
}
