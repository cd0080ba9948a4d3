/* y = x W^T (+ b) for a draft's few-row calls on int8 weights, with int8 activations: integer
 * products on AVX512-VNNI (vpdpbusd: 64 byte products summed into 16 int32 lanes per instruction)
 * or on AVX2 (vpmaddubsw + vpmaddwd, with the sign trick below).
 *
 * Why: the float32-product int8 kernel this replaced (dyspec_gemm_q8) converted every weight to
 * float32 in registers, two instructions per 8 or 16 weights; at one row that conversion, not
 * memory, bound it (~26 GB/s of weights on a Zen 5 EPYC, where one core streams ~40 GB/s, and
 * worse on AVX2 code). Here a weight is multiplied as it is loaded.
 *
 * Numerics: each row of x is rounded to int8 with its own scale (symmetric, absmax / 127, so
 * never -128), as fbgemm's dynamic quantisation does per tensor; the products and sums are exact
 * integers, so the result depends neither on the summation order, nor on the number of rows or
 * threads, nor on the ISA: AVX2 and AVX-512 give the same bits (batch, thread and ISA invariant
 * by construction). A draft's numerics never change the output: the target verifies against the
 * distributions the draft sends.
 * - AVX512-VNNI multiplies unsigned by signed bytes: each activation goes in as q + 128 (q XOR
 *   0x80) and 128 * (column sum of the weights) is taken off at the end.
 * - AVX2's vpmaddubsw also multiplies unsigned by signed bytes, but saturates its pair sums at
 *   16 bits: it gets |q| and w * sign(q) (vpsignb), whose pair sums stay within 2 * 127 * 127 =
 *   32258, then vpmaddwd adds the pairs into int32.
 *
 * Layout: panel p holds output columns 16p..16p+15 as [k/4][16][4] int8 (k padded to a multiple
 * of 4 with zeros, columns past n zero): one 64-byte block is four k steps of sixteen columns.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define NR_V 16 /* output columns per panel: one zmm (two ymm) of int32 sums */
#define MR_V 8  /* rows per pass over the panels (AVX-512) */
#define MR_A 4  /* rows per pass over the panels (AVX2: two accumulators a row of 16 ymm registers) */
/* Accumulators per row, over k blocks in turn: vpdpbusd's latency needs several independent sums
 * in flight, which few rows only give with several chains each (exact integer sums: the split
 * does not change the result). */
#define CHAINS_FOR(mr) ((mr) <= 4 ? 4 : 2)
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
void dyspec_pack_q8x8(const int8_t *q, int64_t n, int64_t k, int8_t *panels, int32_t *colsum) {
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
tile_v(const int mr, const int8_t *xq, int64_t k4, const int8_t *panel, int64_t blocks, const int32_t *colsum,
       int32_t *sums) {
    const int chains = CHAINS_FOR(mr);
    __m512i acc[MR_V][4];
#pragma GCC unroll 8
    for (int r = 0; r < MR_V; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_si512();
    int64_t b = 0;
    for (; b + chains <= blocks; b += chains) {
        const int8_t *wb = panel + b * 64;
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++)
            if (c < chains) {
                _mm_prefetch((const char *)(wb + PREFETCH_V_BYTES + c * 64), _MM_HINT_T0);
                __m512i w = _mm512_loadu_si512((const void *)(wb + c * 64));
#pragma GCC unroll 8
                for (int r = 0; r < MR_V; r++)
                    if (r < mr) {
                        int32_t a;
                        __builtin_memcpy(&a, xq + r * k4 + (b + c) * 4, 4);
                        acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], _mm512_set1_epi32(a ^ (int32_t)0x80808080u), w);
                    }
            }
    }
    for (int c = 0; b < blocks; b++, c++) { /* fewer than `chains` blocks left: one each */
        __m512i w = _mm512_loadu_si512((const void *)(panel + b * 64));
        for (int r = 0; r < mr; r++) {
            int32_t a;
            __builtin_memcpy(&a, xq + r * k4 + b * 4, 4);
            acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], _mm512_set1_epi32(a ^ (int32_t)0x80808080u), w);
        }
    }
    __m512i offset = _mm512_slli_epi32(_mm512_loadu_si512((const void *)colsum), 7); /* the +128 of each activation */
#pragma GCC unroll 8
    for (int r = 0; r < MR_V; r++)
        if (r < mr) {
            __m512i sum = _mm512_add_epi32(_mm512_add_epi32(acc[r][0], acc[r][1]), _mm512_add_epi32(acc[r][2], acc[r][3]));
            _mm512_storeu_si512((void *)(sums + r * NR_V), _mm512_sub_epi32(sum, offset));
        }
}

/* A tile: the exact sums x . q of up to MR rows (xq, k4 bytes a row) over one panel, [row][16] int32. */
typedef void (*tile_fn)(const int8_t *, int64_t, const int8_t *, int64_t, const int32_t *, int32_t *);

#define TILE_V(R)                                                                                             \
    __attribute__((target("avx512f,avx512bw,avx512vnni"))) static void tile_v_##R(                          \
        const int8_t *xq, int64_t k4, const int8_t *panel, int64_t blocks, const int32_t *colsum, int32_t *sums) { \
        tile_v(R, xq, k4, panel, blocks, colsum, sums);                                                     \
    }
TILE_V(1) TILE_V(2) TILE_V(3) TILE_V(4) TILE_V(5) TILE_V(6) TILE_V(7) TILE_V(8)
static const tile_fn VNNI_TILES[MR_V + 1] = {0, tile_v_1, tile_v_2, tile_v_3, tile_v_4, tile_v_5, tile_v_6, tile_v_7,
                                             tile_v_8};

/* The AVX2 tile: per 64-byte block and row, two vpsignb + vpmaddubsw + vpmaddwd + vpaddd (one per
 * 8 columns); vpaddd's one-cycle latency needs no extra chains. No offset: colsum is not needed. */
__attribute__((target("avx2"))) static inline __attribute__((always_inline)) void
tile_a(const int mr, const int8_t *xq, int64_t k4, const int8_t *panel, int64_t blocks, int32_t *sums) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[MR_A][2];
#pragma GCC unroll 4
    for (int r = 0; r < MR_A; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (int64_t b = 0; b < blocks; b++) {
        const int8_t *wb = panel + b * 64;
        _mm_prefetch((const char *)(wb + PREFETCH_V_BYTES), _MM_HINT_T0);
        __m256i w0 = _mm256_loadu_si256((const __m256i *)wb), w1 = _mm256_loadu_si256((const __m256i *)(wb + 32));
#pragma GCC unroll 4
        for (int r = 0; r < MR_A; r++)
            if (r < mr) {
                int32_t a;
                __builtin_memcpy(&a, xq + r * k4 + b * 4, 4);
                __m256i xb = _mm256_set1_epi32(a), xabs = _mm256_abs_epi8(xb);
                acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(
                    _mm256_maddubs_epi16(xabs, _mm256_sign_epi8(w0, xb)), ones));
                acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(
                    _mm256_maddubs_epi16(xabs, _mm256_sign_epi8(w1, xb)), ones));
            }
    }
#pragma GCC unroll 4
    for (int r = 0; r < MR_A; r++)
        if (r < mr) {
            _mm256_storeu_si256((__m256i *)(sums + r * NR_V), acc[r][0]);
            _mm256_storeu_si256((__m256i *)(sums + r * NR_V + 8), acc[r][1]);
        }
}

#define TILE_A(R)                                                                                         \
    __attribute__((target("avx2"))) static void tile_a_##R(const int8_t *xq, int64_t k4, const int8_t *panel, \
                                                          int64_t blocks, const int32_t *colsum, int32_t *sums) { \
        (void)colsum;                                                                                   \
        tile_a(R, xq, k4, panel, blocks, sums);                                                         \
    }
TILE_A(1) TILE_A(2) TILE_A(3) TILE_A(4)
static const tile_fn AVX2_TILES[MR_A + 1] = {0, tile_a_1, tile_a_2, tile_a_3, tile_a_4};

/* Each row of x rounded to int8 with its own scale; k padded with zeros to k4. */
static void quantise_rows(const float *x, int64_t ldx, int64_t rows, int64_t k, int64_t k4, int8_t *xq, float *xs) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * ldx;
        float amax = 0.0f;
        for (int64_t kk = 0; kk < k; kk++) amax = fmaxf(amax, fabsf(xr[kk]));
        float s = amax > 0.0f ? amax / 127.0f : 1.0f, inv = 1.0f / s;
        for (int64_t kk = 0; kk < k4; kk++) {
            long v = kk < k ? lrintf(xr[kk] * inv) : 0;
            xq[r * k4 + kk] = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v);
        }
        xs[r] = s;
    }
}

/* (sum * column scale) * row scale + bias, for the valid columns of one panel: the same float32
 * operations in the same order on either ISA. */
static void store_row(const int32_t *sum, const float *scale, float row_scale, const float *bias, float *y, int64_t width) {
    for (int64_t j = 0; j < width; j++) {
        float v = ((float)sum[j] * scale[j]) * row_scale;
        y[j] = bias ? v + bias[j] : v;
    }
}

/* Row groups of up to mr_max, then each panel in [p0, p1): one tile's sums, then the float32 steps. */
static void gemm_tiles(const tile_fn *tiles, int mr_max, const int8_t *xq, const float *xs, int64_t rows, int64_t k4,
                       const int8_t *panels, const float *scale, const int32_t *colsum, int64_t n, const float *bias,
                       float *y, int64_t ldy, int64_t p0, int64_t p1) {
    int64_t blocks = k4 / 4;
    int32_t sums[MR_V * NR_V];
    for (int64_t r0 = 0; r0 < rows; r0 += mr_max) {
        int mr = rows - r0 < mr_max ? (int)(rows - r0) : mr_max;
        for (int64_t p = p0; p < p1; p++) {
            tiles[mr](xq + r0 * k4, k4, panels + p * blocks * 64, blocks, colsum + p * NR_V, sums);
            int64_t width = n - p * NR_V < NR_V ? n - p * NR_V : NR_V;
            for (int r = 0; r < mr; r++)
                store_row(sums + r * NR_V, scale + p * NR_V, xs[r0 + r], bias ? bias + p * NR_V : 0,
                          y + (r0 + r) * ldy + p * NR_V, width);
        }
    }
}

/* y[m, n] for m < rows and the columns of panels [p0, p1); isa: 1 = AVX2, 2 = AVX512-VNNI (the
 * same bits); x: rows x k float32 (row stride ldx); scale: the weights' column scales (padded to
 * whole panels); colsum: from dyspec_pack_q8x8; y: rows x n (row stride ldy); bias: n floats or
 * NULL. Returns 0; -1 for an ISA this CPU cannot run; -2 when out of memory. */
int dyspec_gemm_q8x8(int isa, const float *x, int64_t ldx, int64_t rows, const int8_t *panels, const float *scale,
                     const int32_t *colsum, int64_t k, int64_t n, const float *bias, float *y, int64_t ldy,
                     int64_t p0, int64_t p1) {
    __builtin_cpu_init();
    if (isa == 2 ? !dyspec_has_vnni() : isa == 1 ? !__builtin_cpu_supports("avx2") : 1) return -1;
    int64_t k4 = (k + 3) / 4 * 4;
    int8_t *xq = malloc((size_t)(rows * k4));
    float *xs = malloc(sizeof(float) * (size_t)rows);
    if (!xq || !xs) {
        free(xq);
        free(xs);
        return -2;
    }
    quantise_rows(x, ldx, rows, k, k4, xq, xs);
    gemm_tiles(isa == 2 ? VNNI_TILES : AVX2_TILES, isa == 2 ? MR_V : MR_A, xq, xs, rows, k4, panels, scale, colsum, n,
               bias, y, ldy, p0, p1);
    free(xq);
    free(xs);
    return 0;
}
