/* y = x W^T (+ b) for few rows of x, fp32, over weights packed once into 16-column panels.
 *
 * Why a kernel of our own: speculative verification multiplies 1-64 rows by every weight of the
 * target. One row is bound by memory (each weight is read once); up to ~16 rows it should stay
 * close to that, since a weight loaded from memory can serve every row while it is in a register.
 * Stock BLAS calls treat few-row products as small GEMMs and cost 2.5-6x one row at 16 rows on
 * these CPUs (benchmarks/reports/verify_cost).
 *
 * Layout: panel p holds output columns 16p..16p+15 as [K][16] floats, zero-padded past N, so a
 * micro-kernel streams one panel front to back and uses each 16-float load for up to MR rows. The
 * rows of x are repacked per call as [K][rows of the group], so the broadcasts read one stream too.
 *
 * Batch invariance: every output y[m][n] is accumulated as one fused multiply-add chain over
 * k = 0..K-1 in order, starting from 0, with the bias added last, whatever the number of rows, the
 * row's place in its group, the vector width (AVX2 or AVX-512) or the split of panels over threads.
 * Row m of a 16-row product is therefore bit-identical to the same row multiplied alone: tree rows
 * and one-token decode rows of the target see the same linear layers.
 *
 * Prefetch on AVX2. Six rows fill the 16 registers, so 17 rows (a 16-node tree and its root) take
 * three passes over each panel slice: the first streams it from memory, the others reread it from
 * L1. Prefetching a fixed distance ahead in the slice being read left memory idle during the
 * rereads, and the first pass then waited on it: 24 of the 1.5B target's MLP weights cost 156 ms
 * at 17 rows against 80 at one row (2-core AVX2 Zen 3 EPYC, one thread). Each group now prefetches
 * its share of the next slice while it computes, so the stream runs through the rereads: 125 ms at
 * 17 rows (~90% of the core's measured multiply-add peak), and 9 rows cost what one row costs (77
 * against 106 ms before; benchmarks/reports/kernel_ab/avx2_zen3). Prefetch changes no arithmetic.
 *
 * int8 weights (the draft's) have their own kernel, q8x8.c (int8 x int8 integer products).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define NR 16
#define MR_AVX2 6     /* 6 rows x 2 ymm = 12 accumulators of 16 ymm registers */
#ifndef MR_AVX512
#define MR_AVX512 24  /* 24 rows x 1 zmm = 24 accumulators of 32 zmm registers: a 16-node tree + root in one pass */
#endif
#define MR_LIMIT_AVX512 32 /* specialisations exist up to here */
#define BLOCK_ROWS 128       /* most rows per pass over the panels ... */
#define BLOCK_X_BYTES (1 << 20) /* ... fewer where their packed copy would not stay in L2 */
#ifndef BLOCK_K
#define BLOCK_K 256 /* k steps per pass of the row groups: the panel's 16 KB slice stays in L1 */
#endif
#ifndef PREFETCH_FLOATS
#define PREFETCH_FLOATS 2048 /* AVX-512 tiles: 8 KB ahead in the panel (DRAM latency at one 64-byte line per k step) */
#endif

void dyspec_pack(const float *w, float *panels, int64_t n, int64_t k) {
    int64_t n_panels = (n + NR - 1) / NR;
    for (int64_t p = 0; p < n_panels; p++) {
        float *dst = panels + p * k * NR;
        for (int64_t kk = 0; kk < k; kk++) {
            for (int64_t j = 0; j < NR; j++) {
                int64_t col = p * NR + j;
                dst[kk * NR + j] = col < n ? w[col * k + kk] : 0.0f;
            }
        }
    }
}

/* Adds x_group . panel over k steps onto acc (mr x 16 running sums). xp: [k][mr] floats of one row
 * group; panel: [k][16]. The AVX2 tiles also prefetch pf + kk * pf_step at step kk: their group's
 * share of the slice read next (gemm_panels). The AVX-512 tiles prefetch PREFETCH_FLOATS ahead in
 * their own panel and ignore pf. */
typedef void (*tile_fn)(const float *xp, const void *panel, int64_t k, float *acc_out, const char *pf, int64_t pf_step);

__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) void
tile_avx2(const int mr, const float *xp, const float *panel, int64_t k, float *acc_out, const char *pf,
          int64_t pf_step) {
    __m256 acc[MR_AVX2][2];
#pragma GCC unroll 6
    for (int r = 0; r < MR_AVX2; r++) {
        acc[r][0] = r < mr ? _mm256_loadu_ps(acc_out + r * NR) : _mm256_setzero_ps();
        acc[r][1] = r < mr ? _mm256_loadu_ps(acc_out + r * NR + 8) : _mm256_setzero_ps();
    }
    for (int64_t kk = 0; kk < k; kk++) {
        const float *wk = panel + kk * NR;
        _mm_prefetch(pf + kk * pf_step, _MM_HINT_T0);
        __m256 w0 = _mm256_loadu_ps(wk), w1 = _mm256_loadu_ps(wk + 8);
#pragma GCC unroll 6
        for (int r = 0; r < MR_AVX2; r++) {
            if (r < mr) {
                __m256 xb = _mm256_broadcast_ss(xp + kk * mr + r);
                acc[r][0] = _mm256_fmadd_ps(xb, w0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(xb, w1, acc[r][1]);
            }
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < MR_AVX2; r++) {
        if (r < mr) {
            _mm256_storeu_ps(acc_out + r * NR, acc[r][0]);
            _mm256_storeu_ps(acc_out + r * NR + 8, acc[r][1]);
        }
    }
}

__attribute__((target("avx512f"))) static inline __attribute__((always_inline)) void
tile_avx512(const int mr, const float *xp, const float *panel, int64_t k, float *acc_out) {
    __m512 acc[MR_LIMIT_AVX512];
#pragma GCC unroll 32
    for (int r = 0; r < MR_LIMIT_AVX512; r++) acc[r] = r < mr ? _mm512_loadu_ps(acc_out + r * NR) : _mm512_setzero_ps();
    for (int64_t kk = 0; kk < k; kk++) {
        _mm_prefetch((const char *)(panel + kk * NR + PREFETCH_FLOATS), _MM_HINT_T0);
        __m512 w = _mm512_loadu_ps(panel + kk * NR);
#pragma GCC unroll 32
        for (int r = 0; r < MR_LIMIT_AVX512; r++) {
            if (r < mr) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(xp[kk * mr + r]), w, acc[r]);
        }
    }
#pragma GCC unroll 32
    for (int r = 0; r < MR_LIMIT_AVX512; r++) {
        if (r < mr) _mm512_storeu_ps(acc_out + r * NR, acc[r]);
    }
}

#define TILE_CALL_avx2(R, xp, panel, k, acc, pf, pf_step) tile_avx2(R, xp, panel, k, acc, pf, pf_step)
#define TILE_CALL_avx512(R, xp, panel, k, acc, pf, pf_step) ((void)pf, (void)pf_step, tile_avx512(R, xp, panel, k, acc))
#define TILE_CALL_bf16(R, xp, panel, k, acc, pf, pf_step) ((void)pf, (void)pf_step, tile_bf16(R, xp, panel, k, acc))
/* One specialisation per row count, so each loop body holds exactly its rows' instructions. */
#define TILE(ISA, TARGET, R)                                                                              \
    __attribute__((target(TARGET))) static void tile_##ISA##_##R(const float *xp, const void *panel,      \
                                                                 int64_t k, float *acc, const char *pf,   \
                                                                 int64_t pf_step) {                       \
        TILE_CALL_##ISA(R, xp, panel, k, acc, pf, pf_step);                                               \
    }
TILE(avx2, "avx2,fma", 1) TILE(avx2, "avx2,fma", 2) TILE(avx2, "avx2,fma", 3)
TILE(avx2, "avx2,fma", 4) TILE(avx2, "avx2,fma", 5) TILE(avx2, "avx2,fma", 6)
static const tile_fn AVX2_TILES[MR_AVX2 + 1] = {0, tile_avx2_1, tile_avx2_2, tile_avx2_3,
                                                tile_avx2_4, tile_avx2_5, tile_avx2_6};
/* Specialisations up to 32 rows; MR_AVX512 says how many are used. */
TILE(avx512, "avx512f", 1) TILE(avx512, "avx512f", 2) TILE(avx512, "avx512f", 3) TILE(avx512, "avx512f", 4)
 TILE(avx512, "avx512f", 5) TILE(avx512, "avx512f", 6) TILE(avx512, "avx512f", 7) TILE(avx512, "avx512f", 8)
 TILE(avx512, "avx512f", 9) TILE(avx512, "avx512f", 10) TILE(avx512, "avx512f", 11) TILE(avx512, "avx512f", 12)
 TILE(avx512, "avx512f", 13) TILE(avx512, "avx512f", 14) TILE(avx512, "avx512f", 15) TILE(avx512, "avx512f", 16)
 TILE(avx512, "avx512f", 17) TILE(avx512, "avx512f", 18) TILE(avx512, "avx512f", 19) TILE(avx512, "avx512f", 20)
 TILE(avx512, "avx512f", 21) TILE(avx512, "avx512f", 22) TILE(avx512, "avx512f", 23) TILE(avx512, "avx512f", 24)
 TILE(avx512, "avx512f", 25) TILE(avx512, "avx512f", 26) TILE(avx512, "avx512f", 27) TILE(avx512, "avx512f", 28)
 TILE(avx512, "avx512f", 29) TILE(avx512, "avx512f", 30) TILE(avx512, "avx512f", 31) TILE(avx512, "avx512f", 32)

static const tile_fn AVX512_TILES[33] = {0, tile_avx512_1, tile_avx512_2, tile_avx512_3, tile_avx512_4, tile_avx512_5, tile_avx512_6, tile_avx512_7, tile_avx512_8, tile_avx512_9, tile_avx512_10, tile_avx512_11, tile_avx512_12, tile_avx512_13, tile_avx512_14, tile_avx512_15, tile_avx512_16, tile_avx512_17, tile_avx512_18, tile_avx512_19, tile_avx512_20, tile_avx512_21, tile_avx512_22, tile_avx512_23, tile_avx512_24, tile_avx512_25, tile_avx512_26, tile_avx512_27, tile_avx512_28, tile_avx512_29, tile_avx512_30, tile_avx512_31, tile_avx512_32};

/* bf16 panels (AVX512-BF16): panel p holds columns 16p..16p+15 as [K/2][16] pairs of bf16 (w[k][j],
 * w[k+1][j]) in one 32-bit word, so one 64-byte load is a k-pair of 16 columns. The rows of x are
 * bf16 too and are packed the same way, a pair per 32-bit word, so the shared loop moves them as
 * if they were floats and the tile broadcasts a pair. vdpbf16ps adds both products of a pair to a
 * column's float32 sum: each output is one chain over the pairs in k order, as for float32. */
__attribute__((target("avx512f,avx512bf16"))) static inline __attribute__((always_inline)) void
tile_bf16(const int mr, const float *xp, const float *panel, int64_t k, float *acc_out) {
    __m512 acc[MR_LIMIT_AVX512];
#pragma GCC unroll 32
    for (int r = 0; r < MR_LIMIT_AVX512; r++) acc[r] = r < mr ? _mm512_loadu_ps(acc_out + r * NR) : _mm512_setzero_ps();
    for (int64_t kk = 0; kk < k; kk++) {
        _mm_prefetch((const char *)(panel + kk * NR + PREFETCH_FLOATS), _MM_HINT_T0);
        __m512bh w = (__m512bh)_mm512_loadu_si512(panel + kk * NR);
#pragma GCC unroll 32
        for (int r = 0; r < MR_LIMIT_AVX512; r++) {
            if (r < mr) acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(((const int32_t *)xp)[kk * mr + r]), w);
        }
    }
#pragma GCC unroll 32
    for (int r = 0; r < MR_LIMIT_AVX512; r++) {
        if (r < mr) _mm512_storeu_ps(acc_out + r * NR, acc[r]);
    }
}
#define BF16 "avx512f,avx512bf16"
TILE(bf16, BF16, 1) TILE(bf16, BF16, 2) TILE(bf16, BF16, 3) TILE(bf16, BF16, 4) TILE(bf16, BF16, 5) TILE(bf16, BF16, 6)
 TILE(bf16, BF16, 7) TILE(bf16, BF16, 8) TILE(bf16, BF16, 9) TILE(bf16, BF16, 10) TILE(bf16, BF16, 11) TILE(bf16, BF16, 12)
 TILE(bf16, BF16, 13) TILE(bf16, BF16, 14) TILE(bf16, BF16, 15) TILE(bf16, BF16, 16) TILE(bf16, BF16, 17)
 TILE(bf16, BF16, 18) TILE(bf16, BF16, 19) TILE(bf16, BF16, 20) TILE(bf16, BF16, 21) TILE(bf16, BF16, 22)
 TILE(bf16, BF16, 23) TILE(bf16, BF16, 24)
static const tile_fn BF16_TILES[MR_AVX512 + 1] = {0, tile_bf16_1, tile_bf16_2, tile_bf16_3, tile_bf16_4, tile_bf16_5,
    tile_bf16_6, tile_bf16_7, tile_bf16_8, tile_bf16_9, tile_bf16_10, tile_bf16_11, tile_bf16_12, tile_bf16_13,
    tile_bf16_14, tile_bf16_15, tile_bf16_16, tile_bf16_17, tile_bf16_18, tile_bf16_19, tile_bf16_20, tile_bf16_21,
    tile_bf16_22, tile_bf16_23, tile_bf16_24};

/* 1 where this CPU has AVX512-BF16 (vdpbf16ps), else 0. */
int dyspec_has_bf16(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
}

/* Packs a bf16 weight [n][k] (raw 16-bit words, k even) into bf16 panels, zero past n. */
void dyspec_pack_bf16(const uint16_t *w, uint16_t *panels, int64_t n, int64_t k) {
    int64_t n_panels = (n + NR - 1) / NR, pairs = k / 2;
    for (int64_t p = 0; p < n_panels; p++) {
        uint16_t *dst = panels + p * k * NR;
        for (int64_t kp = 0; kp < pairs; kp++)
            for (int64_t j = 0; j < NR; j++) {
                int64_t col = p * NR + j;
                dst[(kp * NR + j) * 2] = col < n ? w[col * k + 2 * kp] : 0;
                dst[(kp * NR + j) * 2 + 1] = col < n ? w[col * k + 2 * kp + 1] : 0;
            }
    }
}

/* The widest ISA this CPU runs: 2 = AVX-512F, 1 = AVX2 + FMA, 0 = neither (callers fall back). */
int dyspec_best_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
}

static void store_tile(float *y, int64_t ldy, int64_t col0, int64_t n, int64_t rows, int64_t nr, const float *acc,
                       const float *bias) {
    /* Writes the valid columns (a last panel may be partial) and adds the bias last. */
    int64_t width = n - col0 < nr ? n - col0 : nr;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < width; j++) y[r * ldy + col0 + j] = bias ? acc[r * nr + j] + bias[col0 + j] : acc[r * nr + j];
}

/* The loop both weight formats (float32 and bf16 pairs) share: row blocks, balanced row groups packed as [k][rows of the
 * group], then each panel in [p0, p1) with k outermost, so every output's chain runs in k order. */
static int gemm_panels(const tile_fn *tiles, int64_t mr_max, int64_t nr, int64_t elem_bytes, const float *x,
                       int64_t ldx, int64_t rows, const char *panels, int64_t k, int64_t n,
                       const float *bias, float *y, int64_t ldy, int64_t p0, int64_t p1) {
    float *xp = malloc(sizeof(float) * BLOCK_ROWS * k);
    if (!xp) return -2;
    float acc[BLOCK_ROWS * NR];
    int64_t group_rows[BLOCK_ROWS];
    /* Balanced row blocks (65 rows run as 33 + 32, not 64 + 1: each block streams every weight). */
    int64_t most = BLOCK_X_BYTES / (int64_t)sizeof(float) / k;
    most = most < mr_max ? mr_max : most > BLOCK_ROWS ? BLOCK_ROWS : most;
    int64_t n_blocks = (rows + most - 1) / most;
    for (int64_t b = 0, m0 = 0; b < n_blocks; b++) {
        int64_t block = (rows - m0) / (n_blocks - b);
        /* Balanced groups (16 rows on AVX2 run as 5+5+6, not 6+6+4): a small group has fewer
         * independent accumulators and waits on the multiply-add latency. */
        int64_t groups = (block + mr_max - 1) / mr_max, r0 = 0;
        for (int64_t g = 0; g < groups; g++) {
            int64_t mr = (block - r0) / (groups - g);
            float *dst = xp + r0 * k;
            for (int64_t kk = 0; kk < k; kk++)
                for (int64_t r = 0; r < mr; r++) dst[kk * mr + r] = x[(m0 + r0 + r) * ldx + kk];
            group_rows[g] = mr;
            r0 += mr;
        }
        for (int64_t p = p0; p < p1; p++) {
            const char *panel = panels + p * k * nr * elem_bytes;
            for (int64_t i = 0; i < block * nr; i++) acc[i] = 0.0f;
            /* k outermost within a panel: each row group continues its own chains in k order. */
            for (int64_t k0 = 0; k0 < k; k0 += BLOCK_K) {
                int64_t kc = k - k0 < BLOCK_K ? k - k0 : BLOCK_K;
                int64_t step_bytes = nr * elem_bytes; /* one k step of a panel */
                const char *slice = panel + k0 * step_bytes;
                /* The slice read after this one: the panel's next k block, else the next panel's
                 * first (after the range's last, this one again: a harmless re-touch). */
                const char *next = slice;
                int64_t next_steps = kc;
                if (k0 + kc < k) {
                    next = slice + kc * step_bytes;
                    next_steps = k - k0 - kc < BLOCK_K ? k - k0 - kc : BLOCK_K;
                } else if (p + 1 < p1) {
                    next = panel + k * step_bytes;
                    next_steps = k < BLOCK_K ? k : BLOCK_K;
                }
                int64_t share = next_steps * step_bytes / groups;
                r0 = 0;
                for (int64_t g = 0; g < groups; g++) {
                    int64_t mr = group_rows[g];
                    /* group g prefetches its share of the next slice, spread over its kc steps */
                    tiles[mr](xp + r0 * k + k0 * mr, slice, kc, acc + r0 * nr, next + g * share, share / kc);
                    r0 += mr;
                }
            }
            store_tile(y + m0 * ldy, ldy, p * nr, n, block, nr, acc, bias);
        }
        m0 += block;
    }
    free(xp);
    return 0;
}

/* y[m, n] for m < rows and the columns of panels [p0, p1). x: rows x k (row stride ldx); y: rows
 * x n (row stride ldy); bias: n floats or NULL. Returns 0; -1 for an ISA this CPU cannot run; -2
 * when out of memory. */
int dyspec_gemm(int isa, const float *x, int64_t ldx, int64_t rows, const float *panels, int64_t k, int64_t n,
                const float *bias, float *y, int64_t ldy, int64_t p0, int64_t p1) {
    const tile_fn *tiles = isa == 2 ? AVX512_TILES : isa == 1 ? AVX2_TILES : 0;
    if (!tiles || isa > dyspec_best_isa()) return -1;
    return gemm_panels(tiles, isa == 2 ? MR_AVX512 : MR_AVX2, NR, sizeof(float), x, ldx, rows, (const char *)panels,
                       k, n, bias, y, ldy, p0, p1);
}

/* y (float32) = x W^T (+ b) for bf16 rows x (rows x k, row stride ldx, k and ldx even) over bf16
 * panels; the caller rounds y to bf16. Returns -1 without AVX512-BF16. */
int dyspec_gemm_bf16(const uint16_t *x, int64_t ldx, int64_t rows, const uint16_t *panels, int64_t k, int64_t n,
                     const float *bias, float *y, int64_t ldy, int64_t p0, int64_t p1) {
    if (!dyspec_has_bf16() || k % 2 || ldx % 2) return -1;
    /* a pair of bf16 is moved as one 32-bit word: k/2 "floats" per row */
    return gemm_panels(BF16_TILES, MR_AVX512, NR, sizeof(float), (const float *)x, ldx / 2, rows,
                       (const char *)panels, k / 2, n, bias, y, ldy, p0, p1);
}
