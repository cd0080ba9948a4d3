/* y = x W^T (+ b) for a draft on 4-bit weights with int8 activations, for any row count: integer
 * products on AVX512-VNNI (vpdpbusd) or AVX2 (vpmaddubsw + vpmaddwd), float32 per group of 32.
 *
 * Why: a draft forward at a few rows is bound by the bytes of its weights. The int8 x int8 kernel
 * (q8x8.c) streams one byte a weight; here a weight is half a byte plus a float16 scale and zero
 * per 32 weights (0.625 bytes a weight, 1.6x fewer), and the draft's numerics never change the
 * output: the target verifies against the distributions the draft sends.
 *
 * Weights: per output column and group of 32 inputs, w ~ s * q + z with q in 0..15 (unsigned,
 * asymmetric: the GGUF Q4_K grid that the Qwen drafts here come from is of this form, so they
 * re-round almost without loss). Activations: each row rounded to int8 with its own scale (absmax /
 * 127), as in q8x8.c. Per group the integer sum q . xq is exact; then, in float32, the same
 * operations in the same order on either ISA and for any number of rows:
 *     t = fma((float)isum, s, (float)xsum * z); acc += t   (groups in order)
 *     y = acc * row_scale (+ bias)
 * where xsum is the group's sum of xq. So a row's result depends neither on its batch-mates, nor on
 * the thread split, nor on the ISA (tested).
 * - VNNI: vpdpbusd multiplies unsigned bytes (the weights, 0..15) by signed ones (activations): no
 *   offset trick is needed.
 * - AVX2: vpmaddubsw's 16-bit pair sums (at most 2 * 15 * 127) of a group's 8 blocks add up to at
 *   most 30480 < 32767, so they are summed in 16 bits and widened once a group (vpmaddwd).
 *
 * Layout: panel p holds columns 16p..16p+15; per group g of 32 inputs, 320 bytes: four 64-byte
 * vectors of nibbles, vector v holding k-block 2v (low nibbles) and 2v+1 (high nibbles) as
 * [16 columns][4 k] bytes, then 16 float16 scales and 16 float16 zeros. k is padded to 32 with
 * q = 0 (and xq = 0, so padding adds nothing).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define NR 16       /* output columns per panel */
#define GROUP 32    /* inputs per scale and zero */
#define GBYTES 320  /* bytes per (panel, group): 256 of nibbles, 32 of scales, 32 of zeros */
#define MR_V 8      /* rows per pass (AVX-512) */
#define MR_A 4      /* rows per pass (AVX2) */
#ifndef PREFETCH_Q4_BYTES
#define PREFETCH_Q4_BYTES 4096
#endif

/* Packs q [n][kg] (kg = groups * 32, values 0..15), scale and zero [n][groups] (float16 bits) into
 * panels (n_panels * groups * 320 bytes); columns past n get q = 0, scale = zero = 0. */
void dyspec_pack_q4x8(const uint8_t *q, const uint16_t *scale, const uint16_t *zero, int64_t n, int64_t groups,
                      uint8_t *panels) {
    int64_t kg = groups * GROUP, n_panels = (n + NR - 1) / NR;
    for (int64_t p = 0; p < n_panels; p++)
        for (int64_t g = 0; g < groups; g++) {
            uint8_t *out = panels + (p * groups + g) * GBYTES;
            uint16_t *sz = (uint16_t *)(out + 256);
            for (int64_t j = 0; j < NR; j++) {
                int64_t col = p * NR + j;
                for (int v = 0; v < 4; v++)
                    for (int t = 0; t < 4; t++) {
                        uint8_t lo = 0, hi = 0;
                        if (col < n) {
                            lo = q[col * kg + g * GROUP + (2 * v) * 4 + t] & 0x0F;
                            hi = q[col * kg + g * GROUP + (2 * v + 1) * 4 + t] & 0x0F;
                        }
                        out[v * 64 + j * 4 + t] = (uint8_t)(lo | (hi << 4));
                    }
                sz[j] = col < n ? scale[col * groups + g] : 0;
                sz[NR + j] = col < n ? zero[col * groups + g] : 0;
            }
        }
}

/* The five cache lines of the group PREFETCH_Q4_BYTES ahead. */
static inline __attribute__((always_inline)) void prefetch_group(const uint8_t *gb) {
    for (int line = 0; line < GBYTES; line += 64) _mm_prefetch((const char *)(gb + PREFETCH_Q4_BYTES + line), _MM_HINT_T0);
}

/* One group's 8 k-blocks of activation bytes for row r, as 32-bit words. */
#define XWORD(xq, r, kg, g, b) (*(const int32_t *)((xq) + (r) * (kg) + (g) * GROUP + (b) * 4))

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static inline __attribute__((always_inline)) void
tile_v(const int mr, const int8_t *xq, const int32_t *xsum, int64_t kg, int64_t groups, const uint8_t *panel,
       float *out) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[MR_V];
#pragma GCC unroll 8
    for (int r = 0; r < MR_V; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *gb = panel + g * GBYTES;
        prefetch_group(gb);
        __m512i w[8];
#pragma GCC unroll 4
        for (int v = 0; v < 4; v++) {
            __m512i packed = _mm512_loadu_si512((const void *)(gb + v * 64));
            w[2 * v] = _mm512_and_si512(packed, low);
            w[2 * v + 1] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
        }
        __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(gb + 256)));
        __m512 z = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(gb + 288)));
#pragma GCC unroll 8
        for (int r = 0; r < MR_V; r++)
            if (r < mr) {
                /* two chains: exact integers, so the split does not change the sum */
                __m512i c0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], _mm512_set1_epi32(XWORD(xq, r, kg, g, 0)));
                __m512i c1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], _mm512_set1_epi32(XWORD(xq, r, kg, g, 1)));
#pragma GCC unroll 3
                for (int b = 2; b < 8; b += 2) {
                    c0 = _mm512_dpbusd_epi32(c0, w[b], _mm512_set1_epi32(XWORD(xq, r, kg, g, b)));
                    c1 = _mm512_dpbusd_epi32(c1, w[b + 1], _mm512_set1_epi32(XWORD(xq, r, kg, g, b + 1)));
                }
                __m512 isum = _mm512_cvtepi32_ps(_mm512_add_epi32(c0, c1));
                __m512 t = _mm512_mul_ps(_mm512_set1_ps((float)xsum[r * groups + g]), z);
                acc[r] = _mm512_add_ps(acc[r], _mm512_fmadd_ps(isum, s, t));
            }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR_V; r++)
        if (r < mr) _mm512_storeu_ps(out + r * NR, acc[r]);
}

/* A tile: the float32 group sums (before the row scale) of up to MR rows over one panel, [row][16]. */
typedef void (*tile_fn)(const int8_t *, const int32_t *, int64_t, int64_t, const uint8_t *, float *);

#define TILE_V(R)                                                                                              \
    __attribute__((target("avx512f,avx512bw,avx512vnni"))) static void tile_v_##R(                           \
        const int8_t *xq, const int32_t *xsum, int64_t kg, int64_t groups, const uint8_t *panel, float *out) { \
        tile_v(R, xq, xsum, kg, groups, panel, out);                                                         \
    }
TILE_V(1) TILE_V(2) TILE_V(3) TILE_V(4) TILE_V(5) TILE_V(6) TILE_V(7) TILE_V(8)
static const tile_fn VNNI_TILES[MR_V + 1] = {0, tile_v_1, tile_v_2, tile_v_3, tile_v_4, tile_v_5, tile_v_6, tile_v_7,
                                             tile_v_8};

/* The AVX2 tile: both 8-column halves of the panel at once, the same per-lane float32 steps as the
 * VNNI tile (so the same bits). Each activation word is broadcast right where it is used, once
 * for both halves: hoisting a group's broadcasts for several rows overflows AVX2's 16 registers
 * (the compiler spilled them to the stack and the tile ran 4x under its multiply bound). */
__attribute__((target("avx2,fma,f16c"))) static inline __attribute__((always_inline)) void
tile_a(const int mr, const int8_t *xq, const int32_t *xsum, int64_t kg, int64_t groups, const uint8_t *panel,
       float *out) {
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc[MR_A][2];
#pragma GCC unroll 4
    for (int r = 0; r < MR_A; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *gb = panel + g * GBYTES;
        prefetch_group(gb);
        __m256i part[MR_A][2];
#pragma GCC unroll 4
        for (int r = 0; r < MR_A; r++) part[r][0] = part[r][1] = _mm256_setzero_si256();
#pragma GCC unroll 1 /* unrolled, the compiler ran every product of the group first and spilled them */
        for (int v = 0; v < 4; v++) {
            __m256i p0 = _mm256_loadu_si256((const __m256i *)(gb + v * 64));
            __m256i p1 = _mm256_loadu_si256((const __m256i *)(gb + v * 64 + 32));
            __m256i lo0 = _mm256_and_si256(p0, low), hi0 = _mm256_and_si256(_mm256_srli_epi16(p0, 4), low);
            __m256i lo1 = _mm256_and_si256(p1, low), hi1 = _mm256_and_si256(_mm256_srli_epi16(p1, 4), low);
#pragma GCC unroll 4
            for (int r = 0; r < MR_A; r++)
                if (r < mr) {
                    __m256i xa = _mm256_set1_epi32(XWORD(xq, r, kg, g, 2 * v));
                    __m256i xb = _mm256_set1_epi32(XWORD(xq, r, kg, g, 2 * v + 1));
                    part[r][0] = _mm256_add_epi16(part[r][0], _mm256_add_epi16(_mm256_maddubs_epi16(lo0, xa),
                                                                               _mm256_maddubs_epi16(hi0, xb)));
                    part[r][1] = _mm256_add_epi16(part[r][1], _mm256_add_epi16(_mm256_maddubs_epi16(lo1, xa),
                                                                               _mm256_maddubs_epi16(hi1, xb)));
                }
        }
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(gb + 256 + h * 16)));
            __m256 z = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(gb + 288 + h * 16)));
#pragma GCC unroll 4
            for (int r = 0; r < MR_A; r++)
                if (r < mr) {
                    __m256 isum = _mm256_cvtepi32_ps(_mm256_madd_epi16(part[r][h], ones));
                    __m256 t = _mm256_mul_ps(_mm256_set1_ps((float)xsum[r * groups + g]), z);
                    acc[r][h] = _mm256_add_ps(acc[r][h], _mm256_fmadd_ps(isum, s, t));
                }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < MR_A; r++)
        if (r < mr) {
            _mm256_storeu_ps(out + r * NR, acc[r][0]);
            _mm256_storeu_ps(out + r * NR + 8, acc[r][1]);
        }
}

#define TILE_A(R)                                                                                              \
    __attribute__((target("avx2,fma,f16c"))) static void tile_a_##R(                                          \
        const int8_t *xq, const int32_t *xsum, int64_t kg, int64_t groups, const uint8_t *panel, float *out) { \
        tile_a(R, xq, xsum, kg, groups, panel, out);                                                         \
    }
TILE_A(1) TILE_A(2) TILE_A(3) TILE_A(4)
static const tile_fn AVX2_TILES[MR_A + 1] = {0, tile_a_1, tile_a_2, tile_a_3, tile_a_4};

/* Each row of x rounded to int8 with its own scale (absmax / 127); k padded with zeros to kg; the
 * sum of each group's int8 values. */
static void quantise_rows(const float *x, int64_t ldx, int64_t rows, int64_t k, int64_t groups, int8_t *xq,
                          int32_t *xsum, float *xs) {
    int64_t kg = groups * GROUP;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * ldx;
        float amax = 0.0f;
        for (int64_t kk = 0; kk < k; kk++) amax = fmaxf(amax, fabsf(xr[kk]));
        float s = amax > 0.0f ? amax / 127.0f : 1.0f, inv = 1.0f / s;
        for (int64_t g = 0; g < groups; g++) {
            int32_t sum = 0;
            for (int64_t kk = g * GROUP; kk < (g + 1) * GROUP; kk++) {
                long v = kk < k ? lrintf(xr[kk] * inv) : 0;
                int8_t b = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v);
                xq[r * kg + kk] = b;
                sum += b;
            }
            xsum[r * groups + g] = sum;
        }
        xs[r] = s;
    }
}

/* y[m, n] for m < rows and the columns of panels [p0, p1); isa: 1 = AVX2, 2 = AVX512-VNNI (the
 * same bits); x: rows x k float32 (row stride ldx); y: rows x n (row stride ldy); bias: n floats or
 * NULL. Returns 0; -1 for an ISA this CPU cannot run; -2 when out of memory. */
int dyspec_gemm_q4x8(int isa, const float *x, int64_t ldx, int64_t rows, const uint8_t *panels, int64_t k, int64_t n,
                     const float *bias, float *y, int64_t ldy, int64_t p0, int64_t p1) {
    __builtin_cpu_init();
    int vnni = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vnni");
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (isa == 2 ? !vnni : isa == 1 ? !avx2 : 1) return -1;
    int64_t groups = (k + GROUP - 1) / GROUP, kg = groups * GROUP;
    int8_t *xq = malloc((size_t)(rows * kg));
    int32_t *xsum = malloc(sizeof(int32_t) * (size_t)(rows * groups));
    float *xs = malloc(sizeof(float) * (size_t)rows);
    if (!xq || !xsum || !xs) {
        free(xq);
        free(xsum);
        free(xs);
        return -2;
    }
    quantise_rows(x, ldx, rows, k, groups, xq, xsum, xs);
    const tile_fn *tiles = isa == 2 ? VNNI_TILES : AVX2_TILES;
    int mr_max = isa == 2 ? MR_V : MR_A;
    float sums[MR_V * NR];
    for (int64_t r0 = 0; r0 < rows; r0 += mr_max) {
        int mr = rows - r0 < mr_max ? (int)(rows - r0) : mr_max;
        for (int64_t p = p0; p < p1; p++) {
            tiles[mr](xq + r0 * kg, xsum + r0 * groups, kg, groups, panels + p * groups * GBYTES, sums);
            int64_t width = n - p * NR < NR ? n - p * NR : NR;
            for (int r = 0; r < mr; r++) {
                float *yr = y + (r0 + r) * ldy + p * NR;
                for (int64_t j = 0; j < width; j++) {
                    float v = sums[r * NR + j] * xs[r0 + r];
                    yr[j] = bias ? v + bias[p * NR + j] : v;
                }
            }
        }
    }
    free(xq);
    free(xsum);
    free(xs);
    return 0;
}
