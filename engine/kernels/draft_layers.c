/* A draft's whole decoder stack for a few rows, of one session or several, in one call
 * (engine/native_draft.py).
 *
 * Why: a one-row forward of the Qwen2.5-Coder-0.5B draft with 4-bit weights took ~28 ms on one AVX2
 * core, of which ~20 ms were its linear layers (their weights' read) and ~8 ms the ~20 small torch
 * ops a layer around them (norms, RoPE, the cache's concatenations, SDPA, residual adds), each a
 * few microseconds of dispatch for a few hundred floats of work. Here a forward is one call: per
 * layer the two RMSNorms, the four 4-bit products (dyspec_gemm_q4x8), RoPE, the keys' and values'
 * writes into the session's cache buffers, attention over each row's visible keys
 * (dyspec_row_attention), SiLU-gated MLP and both residual adds.
 *
 * Layer layout (Llama / Qwen2): x = rms_norm(h) * w_in; q|k|v = x W_qkv (+ bias); RoPE on q and k
 * (rotate-half, cos/sin given per row); h += attention(q, cache) W_o; x = rms_norm(h) * w_post;
 * gate|up = x W_gate_up; h += (silu(gate) * up) W_down.
 *
 * For drafts only: the order of some sums differs from torch's (a draft's numerics never change the
 * output; the target verifies every child against the distribution the draft sends).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int dyspec_gemm_q4x8(int isa, const float *x, int64_t ldx, int64_t rows, const uint8_t *panels, int64_t k, int64_t n,
                     const float *bias, float *y, int64_t ldy, int64_t p0, int64_t p1);
int dyspec_row_attention(const float *q, int64_t rows, int64_t heads, int64_t dim, const float *k, const float *v,
                         int64_t kv_heads, int64_t keys, int64_t dv, const int64_t *offsets, const int64_t *cols,
                         float *out);

/* Per layer, in this order, the addresses in `weights` (0 for an absent bias). */
enum { W_QKV, W_QKV_BIAS, W_O, W_O_BIAS, W_GATE_UP, W_GATE_UP_BIAS, W_DOWN, W_DOWN_BIAS, W_INPUT_NORM, W_POST_NORM,
       W_FIELDS };
#define PANEL 16 /* q4x8.c's NR: output columns per panel */

static void rms_norm(const float *x, int64_t rows, int64_t n, const float *w, float eps, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float ss = 0.0f;
        for (int64_t i = 0; i < n; i++) ss += xr[i] * xr[i];
        float inv = 1.0f / sqrtf(ss / (float)n + eps);
        for (int64_t i = 0; i < n; i++) out[r * n + i] = xr[i] * inv * w[i];
    }
}

/* x (one head, dim floats) rotated by rotate-half RoPE with this row's cos / sin, times `scale`, into out. */
static void rope(const float *x, const float *cos, const float *sin, int64_t dim, float scale, float *out) {
    int64_t half = dim / 2;
    for (int64_t i = 0; i < half; i++) {
        out[i] = (x[i] * cos[i] - x[i + half] * sin[i]) * scale;
        out[i + half] = (x[i + half] * cos[i + half] + x[i] * sin[i + half]) * scale;
    }
}

static int product(int isa, const float *x, int64_t rows, int64_t k, int64_t n, const int64_t *w, int panels,
                   int bias, float *y) {
    return dyspec_gemm_q4x8(isa, x, k, rows, (const uint8_t *)(intptr_t)w[panels], k, n,
                            (const float *)(intptr_t)w[bias], y, n, 0, (n + PANEL - 1) / PANEL);
}

/* h: [rows][hidden], updated in place through every layer. The rows are `segments` sessions' rows
 * one after another: segment s has seg_rows[s] rows, written at positions seg_start[s] + i of its
 * own cache, whose buffers for layer l are caches[(l * segments + s) * 2] (keys) and [... + 1]
 * (values), each [kv_heads][seg_capacity[s]][dim]. cos, sin: [rows][dim]. Row r attends to its
 * segment's keys cols[offsets[r] .. offsets[r + 1]) (ascending, < its seg_start + seg_rows).
 * Returns 0, or the first failing kernel's code (-1: this CPU lacks AVX2 + FMA; -2: out of memory). */
int dyspec_draft_layers(int isa, int64_t layers, const int64_t *weights, int64_t segments, const int64_t *seg_rows,
                        const int64_t *seg_start, const int64_t *seg_capacity, const int64_t *caches, int64_t hidden,
                        int64_t heads, int64_t kv_heads, int64_t dim, int64_t intermediate, float eps, float scaling,
                        const float *cos, const float *sin, const int64_t *offsets, const int64_t *cols, float *h) {
    int64_t rows = 0;
    for (int64_t s = 0; s < segments; s++) rows += seg_rows[s];
    int64_t width = (heads + 2 * kv_heads) * dim, q_width = heads * dim;
    size_t floats = (size_t)rows * (size_t)(hidden + width + 2 * q_width + hidden + 3 * intermediate);
    float *scratch = malloc(sizeof(float) * floats);
    if (!scratch) return -2;
    float *x = scratch, *qkv = x + rows * hidden, *q = qkv + rows * width, *att = q + rows * q_width;
    float *delta = att + rows * q_width, *gate_up = delta + rows * hidden, *act = gate_up + rows * 2 * intermediate;
    int code = 0;
    for (int64_t l = 0; l < layers && code == 0; l++) {
        const int64_t *w = weights + l * W_FIELDS;
        rms_norm(h, rows, hidden, (const float *)(intptr_t)w[W_INPUT_NORM], eps, x);
        if ((code = product(isa, x, rows, hidden, width, w, W_QKV, W_QKV_BIAS, qkv))) break;
        for (int64_t s = 0, r0 = 0; s < segments && code == 0; r0 += seg_rows[s], s++) {
            float *key_cache = (float *)(intptr_t)caches[(l * segments + s) * 2];
            float *value_cache = (float *)(intptr_t)caches[(l * segments + s) * 2 + 1];
            for (int64_t r = r0; r < r0 + seg_rows[s]; r++) {
                const float *row = qkv + r * width, *c = cos + r * dim, *sn = sin + r * dim;
                for (int64_t head = 0; head < heads; head++)
                    rope(row + head * dim, c, sn, dim, scaling, q + (r * heads + head) * dim);
                for (int64_t g = 0; g < kv_heads; g++) {
                    int64_t slot = (g * seg_capacity[s] + seg_start[s] + r - r0) * dim;
                    rope(row + (heads + g) * dim, c, sn, dim, 1.0f, key_cache + slot);
                    memcpy(value_cache + slot, row + (heads + kv_heads + g) * dim, sizeof(float) * (size_t)dim);
                }
            }
            code = dyspec_row_attention(q + r0 * q_width, seg_rows[s], heads, dim, key_cache, value_cache, kv_heads,
                                        seg_capacity[s], dim, offsets + r0, cols, att + r0 * q_width);
        }
        if (code) break;
        if ((code = product(isa, att, rows, q_width, hidden, w, W_O, W_O_BIAS, delta))) break;
        for (int64_t i = 0; i < rows * hidden; i++) h[i] += delta[i];
        rms_norm(h, rows, hidden, (const float *)(intptr_t)w[W_POST_NORM], eps, x);
        if ((code = product(isa, x, rows, hidden, 2 * intermediate, w, W_GATE_UP, W_GATE_UP_BIAS, gate_up))) break;
        for (int64_t r = 0; r < rows; r++) {
            const float *g = gate_up + r * 2 * intermediate, *u = g + intermediate;
            for (int64_t i = 0; i < intermediate; i++) act[r * intermediate + i] = g[i] / (1.0f + expf(-g[i])) * u[i];
        }
        if ((code = product(isa, act, rows, intermediate, hidden, w, W_DOWN, W_DOWN_BIAS, delta))) break;
        for (int64_t i = 0; i < rows * hidden; i++) h[i] += delta[i];
    }
    free(scratch);
    return code;
}
