/* y = x W^T (+ b) for a draft's few-row calls on int8 weights, with int8 activations, on
 * AVX512-VNNI (vpdpbusd: 64 byte products summed into 16 int32 lanes per instruction).
 *
 * Why: the float32-product int8 kernel (small_gemm.c, dyspec_gemm_q8) converts every weight to
 * float32 in registers, two instructions per 16 weights; at one row that conversion, not memory,
 * bounds it (~26 GB/s of weights where one core streams ~40 GB/s on a Zen 5 EPYC). Here a weight
 * is multiplied as it is loaded: one vpdpbusd per 64 weights and row.
 *
 * Numerics: each row of x is rounded to int8 with its own scale (symmetric, absmax / 127), as
 * fbgemm's dynamic quantisation does per tensor; the products and sums are exact integers, so
 * the result depends neither on the summation order nor on the number of rows or threads (batch
 * and thread invariant by construction). vpdpbusd multiplies unsigned by signed bytes, so each
 * activation is stored as q + 128 and 128 * (column sum of the weights) is taken off at the end.
 * A draft's numerics never change the output: the target verifies against the distributions the
 * draft sends.
 *
 * Layout: panel p holds output columns 16p..16p+15 as [k/4][16][4] int8 (k padded to a multiple
 * of 4 with zeros, columns past n zero): one 64-byte load is four k steps of sixteen columns.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define NR_V 16    /* output columns per panel: one zmm of int32 sums */
#define MR_V 4     /* rows per pass over the panels */
#define CHAINS_V 4 /* accumulators per row, over k blocks in turn: hides vpdpbusd's latency */
#ifndef PREFETCH_V_BYTES
#define PREFETCH_V_BYTES 8192 /* measured on a Zen 5 EPYC: 2-8 KB ahead gave 31-35 GB/s at one row, 1 KB 30 */
#endif

int dyspec_has_vnni(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
}

/* Packs q [n][k] int8 into panels (n_panels * 16 * k4 bytes, k4 = k rounded up to 4) and the
 * column sums (n_panels * 16 int32, zero past n). */
void dyspec_pack_q8v(const int8_t *q, int64_t n, int64_t k, int8_t *panels, int32_t *colsum) {
    int64_t k4 = (k + 3) / 4 * 4, blocks = k4 / 4, n_panels = (n + NR_V - 1) / NR_V;
    for (int64_t p = 0; p < n_panels; p++)
        for (int64_t j = 0; j < NR_V; j++) {
            int64_t col = p * NR_V + j;
            int32_t sum = 0;
            for (int64_t b = 0; b < blocks; b++)
                for (int64_t t = 0; t < 4; t++) {
                    int64_t kk = b * 4 + t;
                    int8_t w = col < n && kk < k ? q[col * k + kk] : 0;
                    panels[((p * blocks + b) * NR_V + j) * 4 + t] = w;
                    sum += w;
                }
            colsum[col] = sum;
        }
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static inline __attribute__((always_inline)) void
tile_v(const int mr, const uint8_t *xq, int64_t k4, const int8_t *panel, int64_t blocks, __m512i *sums) {
    __m512i acc[MR_V][CHAINS_V];
#pragma GCC unroll 4
    for (int r = 0; r < MR_V; r++)
        for (int c = 0; c < CHAINS_V; c++) acc[r][c] = _mm512_setzero_si512();
    int64_t b = 0;
    for (; b + CHAINS_V <= blocks; b += CHAINS_V) {
        const int8_t *wb = panel + b * 64;
        _mm_prefetch((const char *)(wb + PREFETCH_V_BYTES), _MM_HINT_T0);
        _mm_prefetch((const char *)(wb + PREFETCH_V_BYTES + 64), _MM_HINT_T0);
        _mm_prefetch((const char *)(wb + PREFETCH_V_BYTES + 128), _MM_HINT_T0);
        _mm_prefetch((const char *)(wb + PREFETCH_V_BYTES + 192), _MM_HINT_T0);
#pragma GCC unroll 4
        for (int c = 0; c < CHAINS_V; c++) {
            __m512i w = _mm512_loadu_si512((const void *)(wb + c * 64));
#pragma GCC unroll 4
            for (int r = 0; r < MR_V; r++)
                if (r < mr) {
                    int32_t a;
                    __builtin_memcpy(&a, xq + r * k4 + (b + c) * 4, 4);
                    acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], _mm512_set1_epi32(a), w);
                }
        }
    }
    for (int c = 0; b < blocks; b++, c++) {
        __m512i w = _mm512_loadu_si512((const void *)(panel + b * 64));
        for (int r = 0; r < mr; r++) {
            int32_t a;
            __builtin_memcpy(&a, xq + r * k4 + b * 4, 4);
            acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], _mm512_set1_epi32(a), w);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < MR_V; r++)
        if (r < mr)
            sums[r] = _mm512_add_epi32(_mm512_add_epi32(acc[r][0], acc[r][1]), _mm512_add_epi32(acc[r][2], acc[r][3]));
}

#define TILE_V(R)                                                                                             \
    __attribute__((target("avx512f,avx512bw,avx512vnni"))) static void tile_v_##R(                          \
        const uint8_t *xq, int64_t k4, const int8_t *panel, int64_t blocks, __m512i *sums) {                \
        tile_v(R, xq, k4, panel, blocks, sums);                                                             \
    }
TILE_V(1) TILE_V(2) TILE_V(3) TILE_V(4)
typedef void (*tile_v_fn)(const uint8_t *, int64_t, const int8_t *, int64_t, __m512i *);

/* y[m, n] for m < rows and the columns of panels [p0, p1); x: rows x k float32 (row stride ldx);
 * scale: the weights' column scales; colsum: from dyspec_pack_q8v; y: rows x n (row stride ldy);
 * bias: n floats or NULL. Returns 0; -1 without AVX512-VNNI; -2 when out of memory. */
__attribute__((target("avx512f,avx512bw,avx512vnni"))) int
dyspec_gemm_q8v(const float *x, int64_t ldx, int64_t rows, const int8_t *panels, const float *scale,
                const int32_t *colsum, int64_t k, int64_t n, const float *bias, float *y, int64_t ldy, int64_t p0,
                int64_t p1) {
    static const tile_v_fn tiles[MR_V + 1] = {0, tile_v_1, tile_v_2, tile_v_3, tile_v_4};
    if (!dyspec_has_vnni()) return -1;
    int64_t k4 = (k + 3) / 4 * 4, blocks = k4 / 4;
    uint8_t *xq = malloc((size_t)(rows * k4));
    float *xs = malloc(sizeof(float) * (size_t)rows);
    if (!xq || !xs) {
        free(xq);
        free(xs);
        return -2;
    }
    for (int64_t r = 0; r < rows; r++) { /* each row to int8 with its own scale, stored + 128 */
        const float *xr = x + r * ldx;
        float amax = 0.0f;
        for (int64_t kk = 0; kk < k; kk++) amax = fmaxf(amax, fabsf(xr[kk]));
        float s = amax > 0.0f ? amax / 127.0f : 1.0f, inv = 1.0f / s;
        for (int64_t kk = 0; kk < k4; kk++) {
            long v = kk < k ? lrintf(xr[kk] * inv) : 0;
            v = v > 127 ? 127 : v < -127 ? -127 : v;
            xq[r * k4 + kk] = (uint8_t)(v + 128);
        }
        xs[r] = s;
    }
    __m512i sums[MR_V];
    for (int64_t r0 = 0; r0 < rows; r0 += MR_V) {
        int mr = rows - r0 < MR_V ? (int)(rows - r0) : MR_V;
        for (int64_t p = p0; p < p1; p++) {
            tiles[mr](xq + r0 * k4, k4, panels + p * blocks * 64, blocks, sums);
            __m512i offset = _mm512_slli_epi32(_mm512_loadu_si512((const void *)(colsum + p * NR_V)), 7);
            __m512 col_scale = _mm512_loadu_ps(scale + p * NR_V);
            int64_t width = n - p * NR_V < NR_V ? n - p * NR_V : NR_V;
            __mmask16 valid = (__mmask16)((1u << width) - 1u);
            __m512 b = bias ? _mm512_maskz_loadu_ps(valid, bias + p * NR_V) : _mm512_setzero_ps();
            for (int r = 0; r < mr; r++) {
                __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(sums[r], offset));
                v = _mm512_mul_ps(_mm512_mul_ps(v, col_scale), _mm512_set1_ps(xs[r0 + r]));
                _mm512_mask_storeu_ps(y + (r0 + r) * ldy + p * NR_V, valid, _mm512_add_ps(v, b));
            }
        }
    }
    free(xq);
    free(xs);
    return 0;
}
