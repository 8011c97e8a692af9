/* RIMs and BRIMs (LSTM or GRU cells, one input-attention head): the whole time loop in C.
 *
 * The same computation as RIMsLayer.step / step_backward and RIMsStackCore._run / _backward in
 * rims.py (that Python engine is the reference the tests compare this kernel against). Why C: an
 * agent's minibatch is a few envs run through a long sequence, so every step is a handful of tiny
 * matrix products; driven from Python, each of the ~40 ops per step and layer costs far more in
 * dispatch than in arithmetic. Here a whole sequence is one call, and the products are plain loops
 * over contiguous rows in 8-wide vectors (16-wide, four rows at a time, on AVX-512 hosts: the same
 * chain of multiply-adds per output either way, so the same results to the bit).
 *
 * A stack of L layers (RIMs: L = 1). Layer l reads the slots [null, bottom-up, top-down]:
 * bottom-up is x_t for layer 0 and layer l-1's new h at step t otherwise; top-down is layer l+1's h
 * from step t-1 (none for the top layer). S = the layer's non-null slots (1 or 2).
 *
 * Sizes per layer: K modules of H units, G gates (4H for LSTM [i, f, o, g], 3H for GRU [r, z, n]),
 * Q query/key width, V value width, R = G + Q
 * columns of the recurrent product (W_hh next to the pre-scaled query weights), NC communication
 * heads of key width CK and value width CV, C3 = NC*(2*CK + CV) columns of the communication Q/K/V
 * product (per head [q|k|v]), CX = NC*CV the context width, KV = Q + V.
 *
 * The x slot comes precomputed for all T: x_keys (T, B, Q) and x_values (T, B, V). A per-step
 * slot's keys|values are u @ slot_kv (u the source layer's h, flattened (B, K'*H')). Every layer
 * applies W_ih to the attended value at each step, for the active modules only (the Python engine
 * may instead precompute RIMs' drives v_t @ W_ih[k] for every module and step: the same function).
 *
 * Layouts of the Layer fields (float32, contiguous, row-major; Ts = T when saving, else 1):
 *   Wr (K, H, R)  br (K, R)  Wih (K, V, G)  Wc (K, H, C3)  Wo (K, CX, H)  slot_kv[s] (width_s, KV)
 *   WrT (K, R, H)  WihT (K, G, V)  WcT (K, C3, H)  WoT (K, H, CX)  slot_kvT[s] (KV, width_s)
 *   bih (K, G): GRU's input bias (LSTM has one bias, in br)
 *   h, c (K, B, H): state, in place (c NULL for GRU)   out (T, B, K*H) or NULL   d_out likewise
 *   active (T, K, B) uint8   probs (T, K, B, 1 + S): [null, slots]
 *   hprev, htil (K, Ts, B, H)  ctx (K, Ts, B, CX)  att (K, Ts, B, V): so weight gradients are one bmm
 *   cprev (LSTM), tc (LSTM: tanh(c); GRU: the recurrent n part), upd (Ts, K, B, H)
 *   gates (Ts, K, B, G) as activations   qkv (Ts, K, B, C3)
 *   query (Ts, K, B, Q)  attn (Ts, B, NC, K, K) as [query module i][key module j], zero rows
 *   for inactive i (an inactive module's context is dropped, so its query attends to nothing)
 *   kv (Ts, S, B, KV): each slot's keys|values   u[s] (Ts, B, width_s): per-step slot inputs
 *   backward: dz (K, T, B, R)  dqkv (K, T, B, C3)  dcomm (K, T, B, H)  d_kv (T, S, B, KV), zeroed
 *   dinp (K, T, B, G) for GRU: the cell input's gradient
 *   (LSTM's is dz's first G columns)   gh, gc (K, B, H): in, the final state's gradient; out, the
 *   initial state's (gc NULL for GRU)
 * Entries of inactive modules in gates and tc are never written and never read, and their upd is
 * zero: the cell pre-activations, W_ih, the cells and the residual update run for the active
 * modules only.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline void axpy(float *restrict y, float a, const float *restrict x, int n) {
    for (int j = 0; j < n; j++) y[j] += a * x[j];
}

/* Eight floats in one register (GCC/Clang vector extension; SSE/AVX on x86, NEON on ARM). */
typedef float v8f __attribute__((vector_size(32)));
typedef float v8f_unaligned __attribute__((vector_size(32), aligned(4), may_alias));

static inline v8f load8(const float *p) { return *(const v8f_unaligned *)p; }
static inline void store8(float *p, v8f v) { *(v8f_unaligned *)p = v; }

/* a + s * w (s broadcast), rounded once where the CPU has FMA. The products' multiply-adds are written
 * out rather than left to -ffp-contract: GCC's tuning for AMD Zen (-march=znver2/3, its avoid_fma256_chains)
 * turns some contractible chains into a multiply and an add, rounded twice, and not others, so a row
 * through the products alone (a lone env, an 8-column block) rounded differently from the same row in a
 * pair: an env's results depended on the envs beside it. Without FMA (a portable x86 build) the vector
 * multiply-adds are a multiply and an add, alike in every path. Elsewhere (aarch64) they are left to
 * -ffp-contract, as before. */
#if defined(__FMA__) && defined(__AVX__)
#include <immintrin.h>
static inline v8f madd8(v8f a, float s, v8f w) { return (v8f)_mm256_fmadd_ps(_mm256_set1_ps(s), (__m256)w, (__m256)a); }
#else
static inline v8f madd8(v8f a, float s, v8f w) { return a + s * w; }
#endif

static inline float dot(const float *restrict a, const float *restrict b, int n) {
    v8f acc = {0.0f};
    float s = 0.0f;
    int j = 0;
    for (; j + 8 <= n; j += 8) acc += load8(a + j) * load8(b + j);
    for (; j < n; j++) s += a[j] * b[j];
    return s + (((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7])));
}

/* exp for the cell nonlinearities, written so loops over it vectorise (libm's expf does not):
 * x = n*ln2 + r, e^r by a degree-6 polynomial on [-ln2/2, ln2/2] (Cephes' coefficients), times 2^n.
 * Within 2 ulp of expf; NaN stays NaN (the clamps compare, so a NaN passes them). */
static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    /* n from a NaN-free copy (converting NaN to an integer is undefined); r carries the NaN. */
    const float n = __builtin_rintf((x == x ? x : 0.0f) * 1.44269504088896341f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    union {
        uint32_t i;
        float f;
    } scale = {.i = (uint32_t)((int32_t)n + 127) << 23}; /* n in [-126, 127]: a normal power of two */
    return p * scale.f;
}

static inline float sigmoidf(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

/* tanh(x) = 2 * sigmoid(2x) - 1, as the Python engine computes it. */
static inline float tanh_approx(float x) { return 2.0f / (1.0f + exp_approx(-2.0f * x)) - 1.0f; }

/* The LSTM cell of one module and env: gate = [i, f, o, g] activations of the pre-activations pre,
 * c = f * c + i * g (in place), tc = tanh(c), h = o * tc. */
static void lstm_cell(float *restrict gate, const float *restrict pre, float *restrict c, float *restrict tc,
                      float *restrict h, int H) {
    for (int j = 0; j < 3 * H; j++) gate[j] = sigmoidf(pre[j]);
    for (int j = 3 * H; j < 4 * H; j++) gate[j] = tanh_approx(pre[j]);
    for (int j = 0; j < H; j++) {
        c[j] = gate[H + j] * c[j] + gate[j] * gate[3 * H + j];
        tc[j] = tanh_approx(c[j]);
        h[j] = gate[2 * H + j] * tc[j];
    }
}

/* Backward of lstm_cell: from dh (the gradient of h) and dc_next (of c, from the next step), the
 * gradients dz of the [i, f, o, g] pre-activations and dc_prev of c_prev. The pointers never alias,
 * which lets the compiler vectorise the loop. */
static void lstm_cell_backward(float *restrict dz, float *restrict dc_prev, const float *restrict gate,
                               const float *restrict tc, const float *restrict c_prev, const float *restrict dh,
                               const float *restrict dc_next, int H) {
    for (int j = 0; j < H; j++) {
        const float ig = gate[j], fg = gate[H + j], og = gate[2 * H + j], gg = gate[3 * H + j];
        const float tcn = tc[j], dhc = dh[j];
        const float dcc = dhc * og * (1.0f - tcn * tcn) + dc_next[j];
        dz[j] = dcc * gg * ig * (1.0f - ig);
        dz[H + j] = dcc * c_prev[j] * fg * (1.0f - fg);
        dz[2 * H + j] = dhc * tcn * og * (1.0f - og);
        dz[3 * H + j] = dcc * ig * (1.0f - gg * gg);
        dc_prev[j] = dcc * fg;
    }
}

/* The GRU cell of one module and env: pin (the input part, b_ih + W_ih v) and rec (b_hh + W_hh h)
 * give gate = [r, z, n], h_n = rec's n part, and h = n + z * (h_prev - n), with tanh computed as
 * 2 * sigmoid(2x) - 1 like the Python engine. */
static void gru_cell(float *restrict gate, const float *restrict rec, const float *restrict pin,
                     const float *restrict h_prev, float *restrict h_n, float *restrict h, int H) {
    for (int j = 0; j < 2 * H; j++) gate[j] = sigmoidf(pin[j] + rec[j]);
    for (int j = 0; j < H; j++) {
        h_n[j] = rec[2 * H + j];
        gate[2 * H + j] = tanh_approx(pin[2 * H + j] + gate[j] * h_n[j]);
        h[j] = gate[2 * H + j] + gate[H + j] * (h_prev[j] - gate[2 * H + j]);
    }
}

/* One or two rows at once: y_r (N) += x_r (M) @ W (M, N), W's rows ws apart. Blocks of 32
 * outputs (4 registers per row) stay in registers over the whole reduction, and the two rows share
 * every load of W: 8 independent accumulators keep the multiply-add units busy. A lone row (y1
 * NULL) takes its own copy of the loops; each output is still the same chain of multiply-adds
 * over m in order, so an env's results do not depend on which rows it pairs with (the batch, the
 * active modules, the thread split): tests/test_rims_kernel.py checks that to the bit. */
static void rows_matmul_acc(float *restrict y0, float *restrict y1, const float *restrict x0,
                            const float *restrict x1, const float *restrict W, size_t ws, int M, int N) {
    int j0 = 0;
    for (; j0 + 32 <= N; j0 += 32) {
        v8f a0[4], a1[4];
        for (int u = 0; u < 4; u++) a0[u] = load8(y0 + j0 + 8 * u);
        if (y1) {
            for (int u = 0; u < 4; u++) a1[u] = load8(y1 + j0 + 8 * u);
            for (int m = 0; m < M; m++) {
                const float *w = W + m * ws + j0, s0 = x0[m], s1 = x1[m];
                for (int u = 0; u < 4; u++) {
                    const v8f wu = load8(w + 8 * u);
                    a0[u] = madd8(a0[u], s0, wu);
                    a1[u] = madd8(a1[u], s1, wu);
                }
            }
            for (int u = 0; u < 4; u++) store8(y1 + j0 + 8 * u, a1[u]);
        } else {
            for (int m = 0; m < M; m++) {
                const float *w = W + m * ws + j0, s0 = x0[m];
                for (int u = 0; u < 4; u++) a0[u] = madd8(a0[u], s0, load8(w + 8 * u));
            }
        }
        for (int u = 0; u < 4; u++) store8(y0 + j0 + 8 * u, a0[u]);
    }
    for (; j0 + 8 <= N; j0 += 8) {
        v8f a0 = load8(y0 + j0), a1 = y1 ? load8(y1 + j0) : a0;
        for (int m = 0; m < M; m++) {
            const v8f wu = load8(W + m * ws + j0);
            a0 = madd8(a0, x0[m], wu);
            if (y1) a1 = madd8(a1, x1[m], wu);
        }
        store8(y0 + j0, a0);
        if (y1) store8(y1 + j0, a1);
    }
    /* The last N % 8 columns, each a running sum kept in a register. fmaf, not `a += x * w`: the
     * compiler may vectorise such a loop over m as separate multiplies and adds in order (rounded
     * twice), differently for a lone row than for a pair; fmaf keeps every output one fused chain. */
    for (; j0 < N; j0++) {
        float a0 = y0[j0], a1 = y1 ? y1[j0] : 0.0f;
        for (int m = 0; m < M; m++) {
            const float wm = W[m * ws + j0];
            a0 = fmaf(x0[m], wm, a0);
            if (y1) a1 = fmaf(x1[m], wm, a1);
        }
        y0[j0] = a0;
        if (y1) y1[j0] = a1;
    }
}

/* A row of a (module, env) matrix: module k's rows start k * ks apart, env b's rows b * bs apart. */
typedef struct {
    float *p;
    size_t ks, bs;
} Rows;

static inline float *row(Rows r, int k, int b) { return r.p + (size_t)k * r.ks + (size_t)b * r.bs; }

/* The envs [b0, b1) that one thread works on: envs never interact inside the kernel, so threads
 * split the batch and run the whole sequence without waiting for each other. */
typedef struct {
    int b0, b1;
} Envs;

/* Rows [b0, b1) of a (B, n) block: cleared, or copied from another. */
static inline void clear_envs(float *block, int n, Envs e) {
    memset(block + (size_t)e.b0 * n, 0, sizeof(float) * (size_t)(e.b1 - e.b0) * n);
}
static inline void copy_envs(float *to, const float *from, int n, Envs e) {
    memcpy(to + (size_t)e.b0 * n, from + (size_t)e.b0 * n, sizeof(float) * (size_t)(e.b1 - e.b0) * n);
}

#if defined(__AVX512F__) && defined(__FMA__) /* with madd8 fused too, rows in fours and rows left over alike */
#include <immintrin.h>
/* Sixteen floats in one register: on AVX-512 hosts the products take four rows at once. */
typedef float v16f __attribute__((vector_size(64)));
typedef float v16f_unaligned __attribute__((vector_size(64), aligned(4), may_alias));

static inline v16f load16(const float *p) { return *(const v16f_unaligned *)p; }
static inline void store16(float *p, v16f v) { *(v16f_unaligned *)p = v; }
/* a + s * w in one rounding, as madd8 (AVX-512 has FMA). */
static inline v16f madd16(v16f a, float s, v16f w) {
    return (v16f)_mm512_fmadd_ps(_mm512_set1_ps(s), (__m512)w, (__m512)a);
}

/* Four rows r at once: y_r[j0 : j0 + 16U] += x_r @ W[:, j0 : j0 + 16U] (U = 1 or 2 registers per
 * row). The outputs stay in registers over the whole reduction and the four rows share every load of
 * W (U = 2: 8 independent accumulators, as rows_matmul_acc keeps with 8-wide ones). Each output is
 * the same chain of multiply-adds over m in order as in rows_matmul_acc, so it rounds the same.
 * Always inlined, so that each call site is compiled for its constant U (a variable U leaves the
 * accumulators in memory: 3x slower). */
static inline __attribute__((always_inline)) void rows4_block(float *const y[4], const float *const x[4],
                                                              const float *restrict W, size_t ws, int M, int j0,
                                                              int U) {
    v16f a[4][2];
    for (int r = 0; r < 4; r++)
        for (int u = 0; u < U; u++) a[r][u] = load16(y[r] + j0 + 16 * u);
    for (int m = 0; m < M; m++) {
        v16f w[2];
        for (int u = 0; u < U; u++) w[u] = load16(W + m * ws + j0 + 16 * u);
        for (int r = 0; r < 4; r++) {
            const float s = x[r][m];
            for (int u = 0; u < U; u++) a[r][u] = madd16(a[r][u], s, w[u]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int u = 0; u < U; u++) store16(y[r] + j0 + 16 * u, a[r][u]);
}

/* Y_i += X_i @ W (W (M, N), its rows ws apart) for the rows i < n picked by pick[i * ps] == want
 * (every row when pick is NULL). Picked rows go through the product in fours that share the loads
 * of W (16-wide blocks of columns); the last N % 16 columns and the rows left over go in pairs or
 * alone through rows_matmul_acc. Every output rounds as it would there (forward and backward of a
 * 16-step minibatch of the embedded default 1.10-1.12x as fast as with pairs of 8-wide rows). */
static void picked_matmul_acc(float *Y, size_t ys, const float *X, size_t xs, int n, const uint8_t *pick, size_t ps,
                              int want, const float *W, size_t ws, int M, int N) {
    enum { ROUND = 64 }; /* rows gathered per round */
    const int N16 = N - N % 16;
    for (int i0 = 0; i0 < n;) {
        int picked[ROUND], P = 0;
        for (; i0 < n && P < ROUND; i0++)
            if (!pick || pick[i0 * ps] == want) picked[P++] = i0;
        const int grouped = P - P % 4;
        for (int g = 0; g < grouped; g += 4) {
            const int *q = picked + g;
            float *const y[4] = {Y + q[0] * ys, Y + q[1] * ys, Y + q[2] * ys, Y + q[3] * ys};
            const float *const x[4] = {X + q[0] * xs, X + q[1] * xs, X + q[2] * xs, X + q[3] * xs};
            int j0 = 0;
            for (; j0 + 32 <= N16; j0 += 32) rows4_block(y, x, W, ws, M, j0, 2);
            if (j0 < N16) rows4_block(y, x, W, ws, M, j0, 1);
            if (N16 < N)
                for (int r = 0; r < 4; r += 2)
                    rows_matmul_acc(y[r] + N16, y[r + 1] + N16, x[r], x[r + 1], W + N16, ws, M, N - N16);
        }
        int r = grouped;
        for (; r + 2 <= P; r += 2)
            rows_matmul_acc(Y + picked[r] * ys, Y + picked[r + 1] * ys, X + picked[r] * xs, X + picked[r + 1] * xs, W, ws,
                            M, N);
        if (r < P) rows_matmul_acc(Y + picked[r] * ys, NULL, X + picked[r] * xs, NULL, W, ws, M, N);
    }
}
#else
/* Y_i += X_i @ W (W (M, N), its rows ws apart) for the rows i < n picked by pick[i * ps] == want
 * (every row when pick is NULL). Picked rows go through the product in pairs, sharing the loads of W. */
static void picked_matmul_acc(float *Y, size_t ys, const float *X, size_t xs, int n, const uint8_t *pick, size_t ps,
                              int want, const float *W, size_t ws, int M, int N) {
    int pending = -1; /* a row waiting for its partner */
    for (int i = 0; i < n; i++) {
        if (pick && pick[i * ps] != want) continue;
        if (pending < 0) {
            pending = i;
            continue;
        }
        rows_matmul_acc(Y + pending * ys, Y + i * ys, X + pending * xs, X + i * xs, W, ws, M, N);
        pending = -1;
    }
    if (pending >= 0) rows_matmul_acc(Y + pending * ys, NULL, X + pending * xs, NULL, W, ws, M, N);
}
#endif

/* A block of per-module weights: module k's (M, N) block starts at p + k * ks, its rows rs apart
 * (a block may be some columns of a wider matrix). */
typedef struct {
    const float *p;
    size_t ks, rs;
} Weights;

static inline Weights dense(const float *W, int M, int N) { return (Weights){W, (size_t)M * N, (size_t)N}; }

/* y[k][b] += x[k][b] @ W[k] (M, N) for every module k and env b in e whose only[k][b] (K, B) is
 * `want` (every one when only is NULL). */
static void modules_matmul_acc(Rows y, Rows x, Weights W, int K, int B, Envs e, int M, int N, const uint8_t *only,
                               int want) {
    for (int k = 0; k < K; k++)
        picked_matmul_acc(row(y, k, e.b0), y.bs, row(x, k, e.b0), x.bs, e.b1 - e.b0, only ? only + k * B + e.b0 : NULL, 1,
                          want, W.p + k * W.ks, W.rs, M, N);
}

static void transpose_square(float *restrict out, const float *restrict in, int K) {
    for (int i = 0; i < K; i++)
        for (int j = 0; j < K; j++) out[j * K + i] = in[i * K + j];
}

#define MAX_SLOTS 2

/* One layer: mirrored field for field by KernelLayer (a ctypes.Structure) in rims.py. */
typedef struct {
    int K, H, Q, V, k_active, NC, CK, CV, S, gru;
    int width[MAX_SLOTS];
    const float *Wr, *br, *Wih, *Wc, *Wo, *slot_kv[MAX_SLOTS];
    const float *WrT, *WihT, *WcT, *WoT, *slot_kvT[MAX_SLOTS];
    float *h, *c, *out;
    const float *d_out;
    uint8_t *active;
    float *probs;
    float *hprev, *htil, *ctx, *att, *cprev, *gates, *tc, *upd, *qkv, *query, *attn, *kv, *u[MAX_SLOTS];
    float *dz, *dqkv, *dcomm, *d_kv, *gh, *gc;
    const float *bih; /* GRU: the input bias (K, G) */
    float *dinp;      /* GRU: (K, T, B, G), the gradient of the cell input (LSTM's is dz's first G columns) */
} Layer;

/* Gate width: LSTM [i, f, o, g], GRU [r, z, n]. */
static inline int gates_of(const Layer *L) { return (L->gru ? 3 : 4) * L->H; }

/* Per-layer scratch of one step. */
typedef struct {
    Envs e;
    float *rec, *pin, *rank, *hnew, *dctx, *x, *dA, *dAT, *datt, *gh_prev, *gc_prev;
    uint8_t *chosen;
} Scratch;

static int scratch_alloc(Scratch *w, const Layer *L, int B) {
    const int K = L->K, H = L->H, G = gates_of(L), R = G + L->Q, CX = L->NC * L->CV;
    w->rec = malloc(sizeof(float) * (size_t)K * B * R);
    w->pin = malloc(sizeof(float) * (size_t)K * B * G);
    w->rank = malloc(sizeof(float) * (size_t)K * B);
    w->hnew = malloc(sizeof(float) * (size_t)K * B * H);
    w->dctx = malloc(sizeof(float) * (size_t)K * B * CX);
    w->x = malloc(sizeof(float) * (size_t)K * B * H);
    w->dA = malloc(sizeof(float) * (size_t)K * K);
    w->dAT = malloc(sizeof(float) * (size_t)K * K);
    w->datt = malloc(sizeof(float) * (size_t)K * B * (L->V > 0 ? L->V : 1));
    w->gh_prev = malloc(sizeof(float) * (size_t)K * B * H);
    w->gc_prev = malloc(sizeof(float) * (size_t)K * B * H);
    w->chosen = malloc((size_t)K);
    return w->rec && w->pin && w->rank && w->hnew && w->dctx && w->x && w->dA && w->dAT && w->datt && w->gh_prev &&
           w->gc_prev && w->chosen;
}

static void scratch_free(Scratch *w) {
    free(w->rec), free(w->pin), free(w->rank), free(w->hnew), free(w->dctx), free(w->x), free(w->dA), free(w->dAT);
    free(w->datt), free(w->gh_prev), free(w->gc_prev), free(w->chosen);
}

/* Keys|values of slot s of layer l at step t into kv[ts][s]: from x for layer 0's first slot, else
 * u @ slot_kv with u the source layer's h flattened to (B, K'*H') (kept in u[s] for the backward). */
static void fill_slot(Layer *layers, int l, int s, int t, int ts, int B, Envs e, const float *x_keys,
                      const float *x_values) {
    Layer *L = &layers[l];
    const int KV = L->Q + L->V;
    float *kv = L->kv + ((size_t)ts * L->S + s) * B * KV;
    if (l == 0 && s == 0) {
        for (int b = e.b0; b < e.b1; b++) {
            memcpy(kv + (size_t)b * KV, x_keys + ((size_t)t * B + b) * L->Q, sizeof(float) * L->Q);
            memcpy(kv + (size_t)b * KV + L->Q, x_values + ((size_t)t * B + b) * L->V, sizeof(float) * L->V);
        }
        return;
    }
    const Layer *src = &layers[s == 0 ? l - 1 : l + 1];
    const int width = L->width[s];
    float *u = L->u[s] + (size_t)ts * B * width;
    for (int b = e.b0; b < e.b1; b++)
        for (int k = 0; k < src->K; k++)
            memcpy(u + (size_t)b * width + (size_t)k * src->H, src->h + ((size_t)k * B + b) * src->H,
                   sizeof(float) * src->H);
    clear_envs(kv, KV, e);
    picked_matmul_acc(kv + (size_t)e.b0 * KV, KV, u + (size_t)e.b0 * width, width, e.b1 - e.b0, NULL, 0, 1, L->slot_kv[s],
                      KV, width, KV);
}

static inline int ranks_before(float a, float b) { /* a NaN rank comes last, as in the Python engine's sort */
    return a > b || (b != b && a == a);
}

static void layer_forward(Layer *L, Scratch *w, int t, int ts, int Ts, int B) {
    const int K = L->K, H = L->H, Q = L->Q, V = L->V, S = L->S, G = gates_of(L), R = G + Q, KV = Q + V;
    const int C3 = L->NC * (2 * L->CK + L->CV), CX = L->NC * L->CV;
    const float scale = 1.0f / sqrtf((float)L->CK);
    float *h = L->h, *c = L->c, *rec = w->rec;
    for (int k = 0; k < K; k++) {
        const size_t first = (size_t)w->e.b0 * H, n = sizeof(float) * (size_t)(w->e.b1 - w->e.b0) * H;
        memcpy(L->hprev + ((size_t)k * Ts + ts) * B * H + first, h + (size_t)k * B * H + first, n);
        if (c) memcpy(L->cprev + ((size_t)ts * K + k) * B * H + first, c + (size_t)k * B * H + first, n);
        for (int b = w->e.b0; b < w->e.b1; b++) memcpy(rec + ((size_t)k * B + b) * R, L->br + (size_t)k * R, sizeof(float) * R);
    }
    /* The (pre-scaled) input-attention queries of every module, from h (rec's last Q columns). */
    const Rows rec_rows = {rec, (size_t)B * R, R}, h_rows = {h, (size_t)B * H, H};
    modules_matmul_acc((Rows){rec + G, rec_rows.ks, R}, h_rows, (Weights){L->Wr + G, (size_t)H * R, R}, K, B, w->e, H,
                       Q, NULL, 1);

    /* Input attention over [null, slots]; the null key is zero, so its score is exactly 0. */
    uint8_t *act = L->active + (size_t)t * K * B;
    const float *kv = L->kv + (size_t)ts * S * B * KV;
    for (int k = 0; k < K; k++)
        for (int b = w->e.b0; b < w->e.b1; b++) {
            const size_t kb = (size_t)k * B + b;
            const float *q = rec + kb * R + G;
            float *p = L->probs + ((size_t)t * K * B + kb) * (1 + S), sc[MAX_SLOTS];
            memcpy(L->query + (((size_t)ts * K + k) * B + b) * Q, q, sizeof(float) * Q);
            for (int s = 0; s < S; s++) sc[s] = dot(q, kv + ((size_t)s * B + b) * KV, Q);
            if (S == 1) { /* softmax([0, s]) = [sigmoid(-s), sigmoid(s)]; rank by the score itself */
                p[0] = sigmoidf(-sc[0]);
                p[1] = sigmoidf(sc[0]);
                w->rank[kb] = sc[0];
            } else {
                float m = 0.0f, total;
                for (int s = 0; s < S; s++) m = sc[s] > m ? sc[s] : m;
                total = p[0] = exp_approx(-m);
                for (int s = 0; s < S; s++) total += (p[1 + s] = exp_approx(sc[s] - m));
                for (int s = 0; s <= S; s++) p[s] /= total;
                /* least null attention first, ranked by the log-sum-exp of the slot scores (the null
                 * probability itself rounds to exactly 1 once every score is below about -16.6) */
                float top = sc[0], sum = 0.0f;
                for (int s = 1; s < S; s++) top = sc[s] > top ? sc[s] : top;
                for (int s = 0; s < S; s++) sum += expf(sc[s] - top);
                w->rank[kb] = top + logf(sum);
            }
        }
    /* Top-k per env (ties: the lower module index). */
    for (int b = w->e.b0; b < w->e.b1; b++) {
        memset(w->chosen, 0, (size_t)K);
        for (int n = 0; n < L->k_active; n++) {
            int best = -1;
            for (int k = 0; k < K; k++)
                if (!w->chosen[k] && (best < 0 || ranks_before(w->rank[k * B + b], w->rank[best * B + b]))) best = k;
            w->chosen[best] = 1;
        }
        for (int k = 0; k < K; k++) act[k * B + b] = w->chosen[k];
    }
    /* The cell's recurrent pre-activations, of the active modules only (rec's first G columns). */
    modules_matmul_acc(rec_rows, h_rows, (Weights){L->Wr, (size_t)H * R, R}, K, B, w->e, H, G, act, 1);
    /* The cell input: LSTM adds it to rec's gate columns; GRU keeps it apart (pin = b_ih + ...),
     * since its n gate multiplies only the recurrent part by r. */
    float *pre = rec;
    size_t pre_stride = R;
    if (L->gru) {
        pre = w->pin, pre_stride = G;
        for (int k = 0; k < K; k++)
            for (int b = w->e.b0; b < w->e.b1; b++) memcpy(pre + ((size_t)k * B + b) * G, L->bih + (size_t)k * G, sizeof(float) * G);
    }
    /* The attended value att = sum_s p_s v_s (every module: the weight gradient reads it), and W_ih
     * on it for the active modules. */
    for (int k = 0; k < K; k++)
        for (int b = w->e.b0; b < w->e.b1; b++) {
            const size_t kb = (size_t)k * B + b;
            const float *p = L->probs + ((size_t)t * K * B + kb) * (1 + S);
            float *a = L->att + (((size_t)k * Ts + ts) * B + b) * V;
            memset(a, 0, sizeof(float) * V);
            for (int s = 0; s < S; s++) axpy(a, p[1 + s], kv + ((size_t)s * B + b) * KV + Q, V);
        }
    modules_matmul_acc((Rows){pre, (size_t)B * pre_stride, pre_stride},
                       (Rows){L->att + (size_t)ts * B * V, (size_t)Ts * B * V, V}, dense(L->Wih, V, G), K, B, w->e, V, G,
                       act, 1);
    /* Cells of the active modules; inactive ones carry h_{t-1} into communication. */
    for (int k = 0; k < K; k++)
        for (int b = w->e.b0; b < w->e.b1; b++) {
            const size_t kb = (size_t)k * B + b;
            float *ht = L->htil + (((size_t)k * Ts + ts) * B + b) * H;
            if (!act[kb]) {
                memcpy(ht, h + kb * H, sizeof(float) * H);
                continue;
            }
            const size_t row = ((size_t)ts * K + k) * B + b;
            if (L->gru) /* tc keeps GRU's h_n */
                gru_cell(L->gates + row * G, rec + kb * R, pre + kb * G, h + kb * H, L->tc + row * H, ht, H);
            else
                lstm_cell(L->gates + row * G, rec + kb * R, c + kb * H, L->tc + row * H, ht, H);
        }
    const float *htil = L->htil + (size_t)ts * B * H; /* module k's rows start at k * Ts * B * H */
    const size_t htil_stride_k = (size_t)Ts * B * H;

    /* Communication Q/K/V of every module from h~ (an inactive module's query is unused, but
     * skipping it would break the groups of envs that share the loads of W_qkv: slower at small batches). */
    float *qkv = L->qkv + (size_t)ts * K * B * C3;
    const int head = 2 * L->CK + L->CV;
    for (int k = 0; k < K; k++) clear_envs(qkv + (size_t)k * B * C3, C3, w->e);
    modules_matmul_acc((Rows){qkv, (size_t)B * C3, C3}, (Rows){(float *)htil, htil_stride_k, H}, dense(L->Wc, H, C3), K,
                       B, w->e, H, C3, NULL, 1);
    /* Attention across modules per env and head, for the active modules' queries (an inactive
     * module's context would be dropped; its row of A is zero): A[i][j] = softmax_j(scale * q_i . k_j),
     * ctx_i = sum_j A[i][j] v_j. */
    for (int b = w->e.b0; b < w->e.b1; b++)
        for (int hd = 0; hd < L->NC; hd++) {
            float *A = L->attn + ((((size_t)ts * B + b) * L->NC + hd) * K) * K;
            const float *base = qkv + (size_t)b * C3 + hd * head; /* module j: + j * B * C3 */
            const size_t ms = (size_t)B * C3;
            for (int i = 0; i < K; i++) {
                float *Ai = A + i * K, m = -INFINITY, sum = 0.0f;
                if (!act[i * B + b]) {
                    memset(Ai, 0, sizeof(float) * K);
                    continue;
                }
                for (int j = 0; j < K; j++) {
                    Ai[j] = scale * dot(base + j * ms + L->CK, base + i * ms, L->CK);
                    m = Ai[j] > m ? Ai[j] : m;
                }
                for (int j = 0; j < K; j++) sum += (Ai[j] = exp_approx(Ai[j] - m));
                for (int j = 0; j < K; j++) Ai[j] /= sum;
            }
            float *cx = L->ctx + ((size_t)ts * B + b) * CX + hd * L->CV; /* module i: + i * Ts * B * CX */
            const size_t cs = (size_t)Ts * B * CX;
            for (int i = 0; i < K; i++) memset(cx + i * cs, 0, sizeof(float) * L->CV);
            picked_matmul_acc(cx, cs, A, K, K, act + b, B, 1, base + 2 * L->CK, ms, K, L->CV);
        }
    /* Bounded residual for the active modules: h = h~ + tanh(ctx @ W_out[k]); others keep h, c. */
    float *upd = L->upd + (size_t)ts * K * B * H;
    for (int k = 0; k < K; k++) clear_envs(upd + (size_t)k * B * H, H, w->e);
    modules_matmul_acc((Rows){upd, (size_t)B * H, H}, (Rows){L->ctx + (size_t)ts * B * CX, (size_t)Ts * B * CX, CX},
                       dense(L->Wo, CX, H), K, B, w->e, CX, H, act, 1);
    for (int k = 0; k < K; k++)
        for (int b = w->e.b0; b < w->e.b1; b++) {
            const size_t kb = (size_t)k * B + b;
            float *hn = w->hnew + kb * H, *u = upd + kb * H;
            if (!act[kb]) {
                memcpy(hn, h + kb * H, sizeof(float) * H);
                continue;
            }
            const float *ht = htil + (size_t)k * htil_stride_k + (size_t)b * H;
            for (int j = 0; j < H; j++) {
                u[j] = tanh_approx(u[j]);
                hn[j] = ht[j] + u[j];
            }
        }
    for (int k = 0; k < K; k++) copy_envs(h + (size_t)k * B * H, w->hnew + (size_t)k * B * H, H, w->e);
    if (L->out)
        for (int b = w->e.b0; b < w->e.b1; b++)
            for (int k = 0; k < K; k++)
                memcpy(L->out + ((size_t)t * B + b) * K * H + (size_t)k * H, h + ((size_t)k * B + b) * H,
                       sizeof(float) * H);
}

/* Gradients of one layer's step t: gh_prev/gc_prev (w) for the state entering it, d_kv of its
 * slots, and the per-step weight-gradient factors dz, dqkv, dcomm (and GRU's dinp). */
static void layer_backward(Layer *L, Scratch *w, int t, int T, int B) {
    const int K = L->K, H = L->H, Q = L->Q, V = L->V, S = L->S, G = gates_of(L), R = G + Q, KV = Q + V;
    const int C3 = L->NC * (2 * L->CK + L->CV), CX = L->NC * L->CV;
    const float scale = 1.0f / sqrtf((float)L->CK);
    const uint8_t *act = L->active + (size_t)t * K * B;
    const float *qkv = L->qkv + (size_t)t * K * B * C3, *kv = L->kv + (size_t)t * S * B * KV;
    float *gh = L->gh, *gc = L->gc, *x = w->x, *dctx = w->dctx;

    /* Residual tanh, then d_ctx = d_comm @ W_out^T (active modules only use their update). */
    for (int k = 0; k < K; k++) clear_envs(dctx + (size_t)k * B * CX, CX, w->e);
    for (int k = 0; k < K; k++)
        for (int b = w->e.b0; b < w->e.b1; b++) {
            const size_t kb = (size_t)k * B + b;
            float *dc = L->dcomm + (((size_t)k * T + t) * B + b) * H;
            if (!act[kb]) {
                memset(dc, 0, sizeof(float) * H);
                continue;
            }
            const float *u = L->upd + (((size_t)t * K + k) * B + b) * H, *g = gh + kb * H;
            for (int j = 0; j < H; j++) dc[j] = g[j] * (1.0f - u[j] * u[j]);
        }
    modules_matmul_acc((Rows){dctx, (size_t)B * CX, CX}, (Rows){L->dcomm + (size_t)t * B * H, (size_t)T * B * H, H},
                       dense(L->WoT, H, CX), K, B, w->e, H, CX, act, 1);
    /* Attention across modules, per env and head: A[i][j] = softmax_j(scale * q_i . k_j) for the
     * active modules i (an inactive module's context was dropped: its rows of A, dA and dS are zero). */
    const int head = 2 * L->CK + L->CV;
    for (int b = w->e.b0; b < w->e.b1; b++)
        for (int hd = 0; hd < L->NC; hd++) {
            const float *A = L->attn + ((((size_t)t * B + b) * L->NC + hd) * K) * K;
            const int off = hd * head;
            const float *base = qkv + (size_t)b * C3 + off, *dcx = dctx + (size_t)b * CX + hd * L->CV;
            const size_t ms = (size_t)B * C3, cs = (size_t)B * CX; /* module strides */
            for (int i = 0; i < K; i++) { /* dS = A * (dA - sum_j A dA), times the score scale */
                float *dSi = w->dA + i * K, s = 0.0f;
                if (!act[i * B + b]) {
                    memset(dSi, 0, sizeof(float) * K);
                    continue;
                }
                for (int j = 0; j < K; j++) dSi[j] = dot(dcx + i * cs, base + j * ms + 2 * L->CK, L->CV);
                for (int j = 0; j < K; j++) s += A[i * K + j] * dSi[j];
                for (int j = 0; j < K; j++) dSi[j] = A[i * K + j] * (dSi[j] - s) * scale;
            }
            float *dm = L->dqkv + ((size_t)t * B + b) * C3 + off; /* module m: + m * T * B * C3 */
            const size_t ds = (size_t)T * B * C3;
            for (int m = 0; m < K; m++) memset(dm + m * ds, 0, sizeof(float) * head);
            /* d q_i = sum_j dS[i][j] k_j (zero for inactive i) */
            picked_matmul_acc(dm, ds, w->dA, K, K, act + b, B, 1, base + L->CK, ms, K, L->CK);
            transpose_square(w->dAT, w->dA, K);
            picked_matmul_acc(dm + L->CK, ds, w->dAT, K, K, NULL, 0, 1, base, ms, K, L->CK); /* d k_j = sum_i dS[i][j] q_i */
            transpose_square(w->dAT, A, K);
            picked_matmul_acc(dm + 2 * L->CK, ds, w->dAT, K, K, NULL, 0, 1, dcx, cs, K, L->CV); /* d v_j = sum_i A[i][j] d ctx_i */
        }
    /* x = dh + dqkv @ W_qkv^T: the gradient w.r.t. h~ (= h_cell if active, h_prev if not). */
    for (int k = 0; k < K; k++) copy_envs(x + (size_t)k * B * H, gh + (size_t)k * B * H, H, w->e);
    modules_matmul_acc((Rows){x, (size_t)B * H, H}, (Rows){L->dqkv + (size_t)t * B * C3, (size_t)T * B * C3, C3},
                       dense(L->WcT, C3, H), K, B, w->e, C3, H, NULL, 1);
    /* Cells: d pre (the first G columns of dz) and the gradient of c_prev. */
    for (int k = 0; k < K; k++)
        for (int b = w->e.b0; b < w->e.b1; b++) {
            const size_t kb = (size_t)k * B + b, row = ((size_t)t * K + k) * B + b;
            float *z = L->dz + (((size_t)k * T + t) * B + b) * R;
            float *ghp = w->gh_prev + kb * H, *gcp = w->gc_prev + kb * H;
            const float *xk = x + kb * H, *gck = gc ? gc + kb * H : NULL;
            float *di = L->gru ? L->dinp + (((size_t)k * T + t) * B + b) * G : NULL;
            if (!act[kb]) {
                memcpy(ghp, xk, sizeof(float) * H);
                if (gc) memcpy(gcp, gck, sizeof(float) * H);
                memset(z, 0, sizeof(float) * R);
                if (di) memset(di, 0, sizeof(float) * G);
                continue;
            }
            if (L->gru) { /* d of [r, z, n] pre-activations: di for the input part, z for the recurrent */
                const float *gate = L->gates + row * G, *hn = L->tc + row * H;
                const float *hp = L->hprev + (((size_t)k * T + t) * B + b) * H;
                for (int j = 0; j < H; j++) {
                    const float r = gate[j], zg = gate[H + j], n = gate[2 * H + j], dhc = xk[j];
                    const float dpn = dhc * (1.0f - zg) * (1.0f - n * n);
                    const float dr = dpn * hn[j] * r * (1.0f - r), dzg = dhc * (hp[j] - n) * zg * (1.0f - zg);
                    di[j] = z[j] = dr;
                    di[H + j] = z[H + j] = dzg;
                    di[2 * H + j] = dpn;
                    z[2 * H + j] = dpn * r;
                    ghp[j] = dhc * zg; /* h = n + z (h_prev - n); the recurrent product adds the rest */
                }
                continue;
            }
            lstm_cell_backward(z, gcp, L->gates + row * G, L->tc + row * H, L->cprev + row * H, xk, gck, H);
            memset(ghp, 0, sizeof(float) * H); /* filled by the recurrent product below */
        }
    /* d att = d pre @ W_ih^T, d pre being the cell input's gradient. */
    for (int k = 0; k < K; k++) clear_envs(w->datt + (size_t)k * B * V, V, w->e);
    const Rows dpre = L->gru ? (Rows){L->dinp + (size_t)t * B * G, (size_t)T * B * G, G}
                             : (Rows){L->dz + (size_t)t * B * R, (size_t)T * B * R, R};
    modules_matmul_acc((Rows){w->datt, (size_t)B * V, V}, dpre, dense(L->WihT, G, V), K, B, w->e, G, V, act, 1);
    /* Input attention: d of the slot probabilities, then of the scores, queries and keys|values. */
    float *dkv = L->d_kv + (size_t)t * S * B * KV;
    for (int k = 0; k < K; k++)
        for (int b = w->e.b0; b < w->e.b1; b++) {
            const size_t kb = (size_t)k * B + b;
            if (!act[kb]) continue;
            float *z = L->dz + (((size_t)k * T + t) * B + b) * R;
            const float *p = L->probs + ((size_t)t * K * B + kb) * (1 + S);
            const float *q = L->query + (((size_t)t * K + k) * B + b) * Q;
            float dp[MAX_SLOTS], dsc[MAX_SLOTS];
            const float *da = w->datt + kb * V;
            for (int s = 0; s < S; s++) { /* att = sum_s p_s v_s */
                dp[s] = dot(da, kv + ((size_t)s * B + b) * KV + Q, V);
                axpy(dkv + ((size_t)s * B + b) * KV + Q, p[1 + s], da, V);
            }
            if (S == 1) {
                dsc[0] = dp[0] * p[1] * (1.0f - p[1]);
            } else { /* softmax over [null, slots], the null slot feeding nothing */
                float mean = 0.0f;
                for (int s = 0; s < S; s++) mean += p[1 + s] * dp[s];
                for (int s = 0; s < S; s++) dsc[s] = p[1 + s] * (dp[s] - mean);
            }
            memset(z + G, 0, sizeof(float) * Q);
            for (int s = 0; s < S; s++) {
                axpy(z + G, dsc[s], kv + ((size_t)s * B + b) * KV, Q);       /* d query */
                axpy(dkv + ((size_t)s * B + b) * KV, dsc[s], q, Q);          /* d key */
            }
        }
    /* Active modules' h_prev gets its gradient through the recurrent product only. */
    modules_matmul_acc((Rows){w->gh_prev, (size_t)B * H, H}, (Rows){L->dz + (size_t)t * B * R, (size_t)T * B * R, R},
                       dense(L->WrT, R, H), K, B, w->e, R, H, act, 1);
}

/* Adds d u = d_kv[s] @ slot_kv^T of a per-step slot to its source layer's h gradient (target). */
static void slot_input_backward(const Layer *L, int s, int t, int B, Envs e, const Layer *src, float *target,
                                float *du) {
    const int KV = L->Q + L->V, width = L->width[s];
    const float *dkv = L->d_kv + ((size_t)t * L->S + s) * B * KV;
    clear_envs(du, width, e);
    picked_matmul_acc(du + (size_t)e.b0 * width, width, dkv + (size_t)e.b0 * KV, KV, e.b1 - e.b0, NULL, 0, 1,
                      L->slot_kvT[s], width, KV, width);
    for (int k = 0; k < src->K; k++)
        for (int b = e.b0; b < e.b1; b++)
            axpy(target + ((size_t)k * B + b) * src->H, 1.0f, du + (size_t)b * width + (size_t)k * src->H, src->H);
}

/* One thread's share of a call: the envs e of the whole sequence (envs never interact here). */
typedef struct {
    int T, B, L, save;
    const uint8_t *starts;
    const float *x_keys, *x_values;
    Layer *layers;
    Envs e;
    int status;
} Job;

#define MAX_LAYERS 8
#define MAX_THREADS 16

static int scratch_all(Scratch *w, const Job *j) {
    int ok = 1;
    for (int l = 0; l < j->L; l++) {
        ok &= scratch_alloc(&w[l], &j->layers[l], j->B);
        w[l].e = j->e;
    }
    return ok;
}

/* Zero the rows (state, or its gradient) of this job's envs whose episode starts at step t. */
static void reset_envs(const Job *j, int t, float *const *h, float *const *c) {
    for (int l = 0; l < j->L; l++) {
        const Layer *Ll = &j->layers[l];
        for (int b = j->e.b0; b < j->e.b1; b++)
            if (j->starts[t * j->B + b])
                for (int k = 0; k < Ll->K; k++) {
                    memset(h[l] + ((size_t)k * j->B + b) * Ll->H, 0, sizeof(float) * Ll->H);
                    if (c[l]) memset(c[l] + ((size_t)k * j->B + b) * Ll->H, 0, sizeof(float) * Ll->H);
                }
    }
}

static void *forward_job(void *arg) {
    Job *j = arg;
    Scratch w[MAX_LAYERS];
    float *h[MAX_LAYERS], *c[MAX_LAYERS];
    int ok = scratch_all(w, j);
    for (int l = 0; l < j->L; l++) h[l] = j->layers[l].h, c[l] = j->layers[l].c;
    const int Ts = j->save ? j->T : 1;
    for (int t = 0; ok && t < j->T; t++) {
        const int ts = j->save ? t : 0;
        reset_envs(j, t, h, c);
        for (int l = 0; l < j->L; l++) {
            for (int s = 0; s < j->layers[l].S; s++) fill_slot(j->layers, l, s, t, ts, j->B, j->e, j->x_keys, j->x_values);
            layer_forward(&j->layers[l], &w[l], t, ts, Ts, j->B);
        }
    }
    for (int l = 0; l < j->L; l++) scratch_free(&w[l]);
    j->status = ok ? 0 : 1;
    return NULL;
}

static void *backward_job(void *arg) {
    Job *j = arg;
    Layer *layers = j->layers;
    const int B = j->B, L = j->L;
    Scratch w[MAX_LAYERS];
    float *gh_prev[MAX_LAYERS], *gc_prev[MAX_LAYERS];
    int ok = scratch_all(w, j);
    size_t widest = 1;
    for (int l = 0; l < L; l++) {
        gh_prev[l] = w[l].gh_prev, gc_prev[l] = layers[l].gc ? w[l].gc_prev : NULL;
        for (int s = 0; s < layers[l].S; s++)
            widest = (size_t)layers[l].width[s] > widest ? (size_t)layers[l].width[s] : widest;
    }
    float *du = malloc(sizeof(float) * (size_t)B * widest);
    ok &= du != NULL;
    for (int t = j->T - 1; ok && t >= 0; t--) {
        for (int l = 0; l < L; l++)
            if (layers[l].d_out) {
                const Layer *Ll = &layers[l];
                for (int k = 0; k < Ll->K; k++)
                    for (int b = j->e.b0; b < j->e.b1; b++)
                        axpy(Ll->gh + ((size_t)k * B + b) * Ll->H, 1.0f,
                             Ll->d_out + ((size_t)t * B + b) * Ll->K * Ll->H + (size_t)k * Ll->H, Ll->H);
            }
        for (int l = L - 1; l >= 0; l--) { /* the upper layers used the lower ones' results of this step */
            layer_backward(&layers[l], &w[l], t, j->T, B);
            for (int s = 0; s < layers[l].S; s++) {
                if (l == 0 && s == 0) continue; /* x's slot: d_kv is the caller's */
                if (s == 0) /* bottom-up read layer l-1's h at this step */
                    slot_input_backward(&layers[l], s, t, B, j->e, &layers[l - 1], layers[l - 1].gh, du);
                else /* top-down read layer l+1's h from step t-1 */
                    slot_input_backward(&layers[l], s, t, B, j->e, &layers[l + 1], w[l + 1].gh_prev, du);
            }
        }
        reset_envs(j, t, gh_prev, gc_prev); /* the state entering step t was reset: no gradient before it */
        for (int l = 0; l < L; l++)
            for (int k = 0; k < layers[l].K; k++) {
                const size_t block = (size_t)k * B * layers[l].H;
                copy_envs(layers[l].gh + block, gh_prev[l] + block, layers[l].H, j->e);
                if (layers[l].gc) copy_envs(layers[l].gc + block, gc_prev[l] + block, layers[l].H, j->e);
            }
    }
    for (int l = 0; l < L; l++) scratch_free(&w[l]);
    free(du);
    j->status = ok ? 0 : 1;
    return NULL;
}

/* Runs `job` over the envs split among `threads` threads (the caller's thread takes the first
 * share; a thread that cannot be started runs its share on the caller's). */
static int run_split(void *(*job)(void *), Job base, int threads) {
    if (base.L < 1 || base.L > MAX_LAYERS) return 2;
    for (int l = 0; l < base.L; l++) { /* the wiring this engine knows (rims.py's kernel_for checks it too) */
        const Layer *Ll = &base.layers[l], *below = &base.layers[l - (l > 0)], *above = &base.layers[l + (l < base.L - 1)];
        if (Ll->S != (l < base.L - 1 ? 2 : 1)) return 2;
        if (l > 0 && Ll->width[0] != below->K * below->H) return 2;
        if (l < base.L - 1 && Ll->width[1] != above->K * above->H) return 2;
    }
    threads = threads < 1 ? 1 : threads;
    threads = threads > MAX_THREADS ? MAX_THREADS : threads;
    threads = threads > base.B ? (base.B > 0 ? base.B : 1) : threads;
    Job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0}, status = 0;
    for (int i = 0; i < threads; i++) {
        jobs[i] = base;
        jobs[i].e = (Envs){(int)((long)base.B * i / threads), (int)((long)base.B * (i + 1) / threads)};
    }
    for (int i = 1; i < threads; i++) started[i] = pthread_create(&ids[i], NULL, job, &jobs[i]) == 0;
    job(&jobs[0]);
    for (int i = 1; i < threads; i++) {
        if (started[i])
            pthread_join(ids[i], NULL);
        else
            job(&jobs[i]);
    }
    for (int i = 0; i < threads; i++) status = jobs[i].status > status ? jobs[i].status : status;
    return status;
}

/* Runs the stack over T steps; with save, keeps every step's intermediates for the backward.
 * Returns 0, 1 if scratch memory could not be allocated, 2 for a layer count or wiring it does not know. */
int rims_stack_forward(int T, int B, int L, int save, const uint8_t *starts, const float *x_keys, const float *x_values,
                       Layer *layers, int threads) {
    return run_split(forward_job, (Job){T, B, L, save, starts, x_keys, x_values, layers, {0, B}, 0}, threads);
}

/* Backward through time of rims_stack_forward (run with save=1): see the layouts above. */
int rims_stack_backward(int T, int B, int L, const uint8_t *starts, Layer *layers, int threads) {
    return run_split(backward_job, (Job){T, B, L, 1, starts, NULL, NULL, layers, {0, B}, 0}, threads);
}
