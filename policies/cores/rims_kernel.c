/* RIMs with LSTM cells, one input slot and one input-attention head: the whole time loop in C.
 *
 * The same computation as RIMsLayer.step / step_backward in rims.py (that Python code is the
 * reference the tests compare this kernel against). Why C: an agent's minibatch is a few envs run
 * through a long sequence, so every step is a handful of tiny matrix products; driven from Python,
 * each of the ~40 ops per step costs far more in dispatch than in arithmetic. Here a whole sequence
 * is one call, and the products are plain loops over contiguous rows, which the compiler vectorises.
 *
 * Sizes: T steps, B envs, K modules of H units, G = 4H gates, Q query/key width of the input
 * attention, R = G + Q columns of the recurrent matmul (W_hh next to the pre-scaled query weights),
 * NC communication heads of key width CK and value width CV, C3 = NC*(2*CK + CV) columns of the
 * communication Q/K/V matmul (per head [q|k|v]), CX = NC*CV the context width.
 *
 * Layouts (all float32, contiguous, row-major):
 *   Wr (K, H, R)   br (K, R)   Wc (K, H, C3)   Wo (K, CX, H)        forward weights
 *   WrT (K, R, H)  WcT (K, C3, H)  WoT (K, H, CX)                    the same, transposed, for backward
 *   keys (T, B, Q)  drives (T, B, K, G): the input slot's key and drive v_t @ W_ih[k], precomputed
 *   starts (T, B) uint8: reset the env's state to zeros before step t
 *   h, c (K, B, H): state, updated in place
 *   out (T, B, K*H)   active (T, K, B) uint8   probs (T, K, B): attention on the (non-null) slot
 * Saved for the backward, with Ts = T when saving, else 1 (a one-step scratch reused every step):
 *   hprev, htil (K, Ts, B, H)  ctx (K, Ts, B, CX): laid out so the weight gradients are one bmm
 *   cprev, tc, upd (Ts, K, B, H)  gates (Ts, K, B, G) as activations [i, f, o, g]
 *   qkv (Ts, K, B, C3)  attn (Ts, B, NC, K, K) as [query module i][key module j]  query (Ts, K, B, Q)
 * Entries of inactive modules in gates, tc and upd are never written and never read.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int T, B, K, H, Q, k_active, NC, CK, CV;
} Dims;

static inline void axpy(float *restrict y, float a, const float *restrict x, int n) {
    for (int j = 0; j < n; j++) y[j] += a * x[j];
}

/* Eight floats in one register (GCC/Clang vector extension; SSE/AVX on x86, NEON on ARM). */
typedef float v8f __attribute__((vector_size(32)));
typedef float v8f_unaligned __attribute__((vector_size(32), aligned(4), may_alias));

static inline v8f load8(const float *p) { return *(const v8f_unaligned *)p; }
static inline void store8(float *p, v8f v) { *(v8f_unaligned *)p = v; }

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

/* The LSTM cell of one module and env: gate = [i, f, o, g] activations of rec + a * drive,
 * c = f * c + i * g (in place), tc = tanh(c), h = o * tc. */
static void lstm_cell(float *restrict gate, const float *restrict rec, const float *restrict drive, float a,
                      float *restrict c, float *restrict tc, float *restrict h, int H) {
    for (int j = 0; j < 4 * H; j++) gate[j] = rec[j] + a * drive[j];
    for (int j = 0; j < 3 * H; j++) gate[j] = sigmoidf(gate[j]);
    for (int j = 3 * H; j < 4 * H; j++) gate[j] = tanh_approx(gate[j]);
    for (int j = 0; j < H; j++) {
        c[j] = gate[H + j] * c[j] + gate[j] * gate[3 * H + j];
        tc[j] = tanh_approx(c[j]);
        h[j] = gate[2 * H + j] * tc[j];
    }
}

/* One or two rows at once: y_r (N) += x_r (M) @ W (M, N), W's rows ws apart. Blocks of 32
 * outputs (4 registers per row) stay in registers over the whole reduction, and the two rows share
 * every load of W: 8 independent accumulators keep the multiply-add units busy. */
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
                    a0[u] += s0 * wu;
                    a1[u] += s1 * wu;
                }
            }
            for (int u = 0; u < 4; u++) store8(y1 + j0 + 8 * u, a1[u]);
        } else {
            for (int m = 0; m < M; m++) {
                const float *w = W + m * ws + j0, s0 = x0[m];
                for (int u = 0; u < 4; u++) a0[u] += s0 * load8(w + 8 * u);
            }
        }
        for (int u = 0; u < 4; u++) store8(y0 + j0 + 8 * u, a0[u]);
    }
    for (; j0 + 8 <= N; j0 += 8) {
        v8f a0 = load8(y0 + j0), a1 = y1 ? load8(y1 + j0) : a0;
        for (int m = 0; m < M; m++) {
            const v8f wu = load8(W + m * ws + j0);
            a0 += x0[m] * wu;
            if (y1) a1 += x1[m] * wu;
        }
        store8(y0 + j0, a0);
        if (y1) store8(y1 + j0, a1);
    }
    if (j0 < N)
        for (int m = 0; m < M; m++) {
            axpy(y0 + j0, x0[m], W + m * ws + j0, N - j0);
            if (y1) axpy(y1 + j0, x1[m], W + m * ws + j0, N - j0);
        }
}

/* A row of a (module, env) matrix: module k's rows start k * ks apart, env b's rows b * bs apart. */
typedef struct {
    float *p;
    size_t ks, bs;
} Rows;

static inline float *row(Rows r, int k, int b) { return r.p + (size_t)k * r.ks + (size_t)b * r.bs; }

/* y[k][b] += x[k][b] @ W[k] for every module k and env b, W (K, M, N); rows where `only` (K, B)
 * is 0 are skipped. Rows go through the product in pairs, sharing the loads of W[k]. */
static void modules_matmul_acc(Rows y, Rows x, const float *W, int K, int B, int M, int N, const uint8_t *only) {
    for (int k = 0; k < K; k++) {
        const float *Wk = W + (size_t)k * M * N;
        int pending = -1; /* a row waiting for its partner */
        for (int b = 0; b < B; b++) {
            if (only && !only[k * B + b]) continue;
            if (pending < 0) {
                pending = b;
                continue;
            }
            rows_matmul_acc(row(y, k, pending), row(y, k, b), row(x, k, pending), row(x, k, b), Wk, N, M, N);
            pending = -1;
        }
        if (pending >= 0) rows_matmul_acc(row(y, k, pending), NULL, row(x, k, pending), NULL, Wk, N, M, N);
    }
}

/* Y[i] += X[i] @ V for the K rows i of a K x K matrix X (row-major), V's K rows vs apart. */
static void square_matmul_acc(float *Y, size_t ys, const float *X, const float *V, size_t vs, int K, int N) {
    int i = 0;
    for (; i + 2 <= K; i += 2) rows_matmul_acc(Y + i * ys, Y + (i + 1) * ys, X + i * K, X + (i + 1) * K, V, vs, K, N);
    if (i < K) rows_matmul_acc(Y + i * ys, NULL, X + i * K, NULL, V, vs, K, N);
}

static void transpose_square(float *restrict out, const float *restrict in, int K) {
    for (int i = 0; i < K; i++)
        for (int j = 0; j < K; j++) out[j * K + i] = in[i * K + j];
}

int rims_lstm_forward(const int *dims, int save, const float *Wr, const float *br, const float *Wc, const float *Wo,
                      const float *keys, const float *drives, const uint8_t *starts, float *h, float *c, float *out,
                      uint8_t *active, float *probs, float *s_hprev, float *s_cprev, float *s_gates, float *s_tc,
                      float *s_htil, float *s_qkv, float *s_attn, float *s_ctx, float *s_upd, float *s_query) {
    const Dims d = {dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6], dims[7], dims[8]};
    const int T = d.T, B = d.B, K = d.K, H = d.H, Q = d.Q, G = 4 * H, R = G + Q;
    const int C3 = d.NC * (2 * d.CK + d.CV), CX = d.NC * d.CV, Ts = save ? T : 1;
    const float scale = 1.0f / sqrtf((float)d.CK);
    float *rec = malloc(sizeof(float) * (size_t)K * B * R);
    float *score = malloc(sizeof(float) * (size_t)K * B);
    float *hnew = malloc(sizeof(float) * (size_t)K * B * H);
    uint8_t *chosen = malloc((size_t)K);
    if (!rec || !score || !hnew || !chosen) {
        free(rec), free(score), free(hnew), free(chosen);
        return 1;
    }
    for (int t = 0; t < T; t++) {
        const int ts = save ? t : 0;
        for (int b = 0; b < B; b++)
            if (starts[t * B + b])
                for (int k = 0; k < K; k++) {
                    memset(h + ((size_t)k * B + b) * H, 0, sizeof(float) * H);
                    memset(c + ((size_t)k * B + b) * H, 0, sizeof(float) * H);
                }
        for (int k = 0; k < K; k++) {
            memcpy(s_hprev + ((size_t)k * Ts + ts) * B * H, h + (size_t)k * B * H, sizeof(float) * B * H);
            memcpy(s_cprev + ((size_t)ts * K + k) * B * H, c + (size_t)k * B * H, sizeof(float) * B * H);
            for (int b = 0; b < B; b++) memcpy(rec + ((size_t)k * B + b) * R, br + (size_t)k * R, sizeof(float) * R);
        }
        /* Cell pre-activations from h and the (pre-scaled) queries, for every module: one product. */
        modules_matmul_acc((Rows){rec, (size_t)B * R, R}, (Rows){h, (size_t)B * H, H}, Wr, K, B, H, R, NULL);

        /* Input attention over [null, slot]: softmax([0, s]) = [sigmoid(-s), sigmoid(s)]. */
        uint8_t *act = active + (size_t)t * K * B;
        float *p = probs + (size_t)t * K * B;
        for (int k = 0; k < K; k++)
            for (int b = 0; b < B; b++) {
                const float *q = rec + ((size_t)k * B + b) * R + G;
                memcpy(s_query + (((size_t)ts * K + k) * B + b) * Q, q, sizeof(float) * Q);
                float s = dot(q, keys + ((size_t)t * B + b) * Q, Q);
                score[k * B + b] = s;
                p[k * B + b] = sigmoidf(s);
            }
        /* Top-k: the k_active modules with the least null attention, i.e. the largest score
         * (ties: the lower index). */
        for (int b = 0; b < B; b++) {
            memset(chosen, 0, (size_t)K);
            for (int n = 0; n < d.k_active; n++) {
                int best = -1;
                for (int k = 0; k < K; k++) /* a NaN score ranks last, as in the Python engine's sort */
                    if (!chosen[k] && (best < 0 || score[k * B + b] > score[best * B + b] ||
                                       (score[best * B + b] != score[best * B + b] && score[k * B + b] == score[k * B + b])))
                        best = k;
                chosen[best] = 1;
            }
            for (int k = 0; k < K; k++) act[k * B + b] = chosen[k];
        }

        /* Cells of the active modules; inactive ones carry h_{t-1} into communication. */
        for (int k = 0; k < K; k++)
            for (int b = 0; b < B; b++) {
                const size_t kb = (size_t)k * B + b;
                float *ht = s_htil + (((size_t)k * Ts + ts) * B + b) * H;
                if (!act[kb]) {
                    memcpy(ht, h + kb * H, sizeof(float) * H);
                    continue;
                }
                const size_t row = ((size_t)ts * K + k) * B + b;
                float *gate = s_gates + row * G, *tcr = s_tc + row * H, *cr = c + kb * H;
                const float *rk = rec + kb * R, *dr = drives + (((size_t)t * B + b) * K + k) * G;
                lstm_cell(gate, rk, dr, p[kb], cr, tcr, ht, H); /* c_prev was saved above */
            }
        const float *htil = s_htil + (size_t)ts * B * H; /* module k's rows start at k * Ts * B * H */
        const int htil_stride_k = Ts * B * H;

        /* Communication Q/K/V of every module from h~. */
        float *qkv = s_qkv + (size_t)ts * K * B * C3;
        memset(qkv, 0, sizeof(float) * (size_t)K * B * C3);
        modules_matmul_acc((Rows){qkv, (size_t)B * C3, C3}, (Rows){(float *)htil, (size_t)Ts * B * H, H}, Wc, K, B,
                           H, C3, NULL);
        /* Attention across modules per env and head; ctx_i = sum_j softmax_j(k_j . q_i) v_j. */
        for (int b = 0; b < B; b++)
            for (int hd = 0; hd < d.NC; hd++) {
                float *A = s_attn + ((((size_t)ts * B + b) * d.NC + hd) * K) * K;
                const float *base = qkv + (size_t)b * C3 + hd * (2 * d.CK + d.CV); /* module j: + j * B * C3 */
                const size_t ms = (size_t)B * C3;
                for (int i = 0; i < K; i++) {
                    float *Ai = A + i * K, m = -INFINITY, sum = 0.0f;
                    for (int j = 0; j < K; j++) {
                        Ai[j] = scale * dot(base + j * ms + d.CK, base + i * ms, d.CK);
                        m = Ai[j] > m ? Ai[j] : m;
                    }
                    for (int j = 0; j < K; j++) sum += (Ai[j] = exp_approx(Ai[j] - m));
                    for (int j = 0; j < K; j++) Ai[j] /= sum;
                }
                float *cx = s_ctx + ((size_t)ts * B + b) * CX + hd * d.CV; /* module i: + i * Ts * B * CX */
                const size_t cs = (size_t)Ts * B * CX;
                for (int i = 0; i < K; i++) memset(cx + i * cs, 0, sizeof(float) * d.CV);
                square_matmul_acc(cx, cs, A, base + 2 * d.CK, ms, K, d.CV);
            }
        /* Bounded residual for the active modules: h = h~ + tanh(ctx @ W_out[k]); others keep h, c. */
        float *upd = s_upd + (size_t)ts * K * B * H;
        memset(upd, 0, sizeof(float) * (size_t)K * B * H);
        modules_matmul_acc((Rows){upd, (size_t)B * H, H}, (Rows){s_ctx + (size_t)ts * B * CX, (size_t)Ts * B * CX, CX},
                           Wo, K, B, CX, H, act);
        for (int k = 0; k < K; k++)
            for (int b = 0; b < B; b++) {
                const size_t kb = (size_t)k * B + b;
                float *hn = hnew + kb * H, *u = upd + kb * H;
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
        memcpy(h, hnew, sizeof(float) * (size_t)K * B * H);
        for (int b = 0; b < B; b++)
            for (int k = 0; k < K; k++)
                memcpy(out + ((size_t)t * B + b) * K * H + (size_t)k * H, h + ((size_t)k * B + b) * H,
                       sizeof(float) * H);
    }
    free(rec), free(score), free(hnew), free(chosen);
    return 0;
}

/* Backward through time of rims_lstm_forward (run with save=1). gh, gc (K, B, H) hold the
 * gradient w.r.t. the final state on entry and w.r.t. the initial state on return.
 * Writes d_keys (T, B, Q) and d_drives (T, B, K, G), and the per-step factors of the weight
 * gradients, each (K, T, B, .): dz = d[rec] (R), dqkv (C3), dcomm = d[ctx @ W_out] (H);
 * rows of inactive modules are zeros there (d_keys must come zeroed). */
int rims_lstm_backward(const int *dims, const float *WrT, const float *WcT, const float *WoT, const float *keys,
                       const float *drives, const uint8_t *starts, const uint8_t *active, const float *probs,
                       const float *s_cprev, const float *s_gates, const float *s_tc, const float *s_qkv,
                       const float *s_attn, const float *s_upd, const float *s_query, const float *d_out, float *gh,
                       float *gc, float *d_keys, float *d_drives, float *dz, float *dqkv, float *dcomm) {
    const Dims d = {dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6], dims[7], dims[8]};
    const int T = d.T, B = d.B, K = d.K, H = d.H, Q = d.Q, G = 4 * H, R = G + Q;
    const int C3 = d.NC * (2 * d.CK + d.CV), CX = d.NC * d.CV;
    const float scale = 1.0f / sqrtf((float)d.CK);
    float *dctx = malloc(sizeof(float) * (size_t)K * B * CX);
    float *x = malloc(sizeof(float) * (size_t)K * B * H);
    float *dA = malloc(sizeof(float) * (size_t)K * K), *dAT = malloc(sizeof(float) * (size_t)K * K);
    float *gh_prev = malloc(sizeof(float) * (size_t)K * B * H);
    float *gc_prev = malloc(sizeof(float) * (size_t)K * B * H);
    if (!dctx || !x || !dA || !dAT || !gh_prev || !gc_prev) {
        free(dctx), free(x), free(dA), free(dAT), free(gh_prev), free(gc_prev);
        return 1;
    }
    for (int t = T - 1; t >= 0; t--) {
        const uint8_t *act = active + (size_t)t * K * B;
        const float *p = probs + (size_t)t * K * B;
        const float *qkv = s_qkv + (size_t)t * K * B * C3;
        for (int k = 0; k < K; k++)
            for (int b = 0; b < B; b++)
                axpy(gh + ((size_t)k * B + b) * H, 1.0f, d_out + ((size_t)t * B + b) * K * H + (size_t)k * H, H);

        /* Residual tanh, then d_ctx = d_comm @ W_out^T (active modules only use their update). */
        memset(dctx, 0, sizeof(float) * (size_t)K * B * CX);
        for (int k = 0; k < K; k++)
            for (int b = 0; b < B; b++) {
                const size_t kb = (size_t)k * B + b;
                float *dc = dcomm + (((size_t)k * T + t) * B + b) * H;
                if (!act[kb]) {
                    memset(dc, 0, sizeof(float) * H);
                    continue;
                }
                const float *u = s_upd + (((size_t)t * K + k) * B + b) * H, *g = gh + kb * H;
                for (int j = 0; j < H; j++) dc[j] = g[j] * (1.0f - u[j] * u[j]);
            }
        modules_matmul_acc((Rows){dctx, (size_t)B * CX, CX}, (Rows){dcomm + (size_t)t * B * H, (size_t)T * B * H, H},
                           WoT, K, B, H, CX, act);
        /* Attention across modules, per env and head: A[i][j] = softmax_j(scale * q_i . k_j). */
        for (int b = 0; b < B; b++)
            for (int hd = 0; hd < d.NC; hd++) {
                const float *A = s_attn + ((((size_t)t * B + b) * d.NC + hd) * K) * K;
                const int off = hd * (2 * d.CK + d.CV);
                const float *base = qkv + (size_t)b * C3 + off, *dcx = dctx + (size_t)b * CX + hd * d.CV;
                const size_t ms = (size_t)B * C3, cs = (size_t)B * CX; /* module strides */
                for (int i = 0; i < K; i++) { /* dS = A * (dA - sum_j A dA), times the score scale */
                    float *dSi = dA + i * K, s = 0.0f;
                    for (int j = 0; j < K; j++) dSi[j] = dot(dcx + i * cs, base + j * ms + 2 * d.CK, d.CV);
                    for (int j = 0; j < K; j++) s += A[i * K + j] * dSi[j];
                    for (int j = 0; j < K; j++) dSi[j] = A[i * K + j] * (dSi[j] - s) * scale;
                }
                float *dm = dqkv + ((size_t)t * B + b) * C3 + off; /* module m: + m * T * B * C3 */
                const size_t ds = (size_t)T * B * C3;
                for (int m = 0; m < K; m++) memset(dm + m * ds, 0, sizeof(float) * (2 * d.CK + d.CV));
                square_matmul_acc(dm, ds, dA, base + d.CK, ms, K, d.CK); /* d q_i = sum_j dS[i][j] k_j */
                transpose_square(dAT, dA, K);
                square_matmul_acc(dm + d.CK, ds, dAT, base, ms, K, d.CK); /* d k_j = sum_i dS[i][j] q_i */
                transpose_square(dAT, A, K);
                square_matmul_acc(dm + 2 * d.CK, ds, dAT, dcx, cs, K, d.CV); /* d v_j = sum_i A[i][j] d ctx_i */
            }
        /* x = dh + dqkv @ W_qkv^T: the gradient w.r.t. h~ (= h_cell if active, h_prev if not). */
        memcpy(x, gh, sizeof(float) * (size_t)K * B * H);
        modules_matmul_acc((Rows){x, (size_t)B * H, H}, (Rows){dqkv + (size_t)t * B * C3, (size_t)T * B * C3, C3}, WcT,
                           K, B, C3, H, NULL);
        /* Cells, input attention, and the recurrent product back to h_prev. */
        for (int k = 0; k < K; k++)
            for (int b = 0; b < B; b++) {
                const size_t kb = (size_t)k * B + b, row = ((size_t)t * K + k) * B + b;
                const size_t drive_row = ((size_t)t * B + b) * K + k;
                float *z = dz + (((size_t)k * T + t) * B + b) * R, *dd = d_drives + drive_row * G;
                float *ghp = gh_prev + kb * H, *gcp = gc_prev + kb * H;
                const float *xk = x + kb * H, *gck = gc + kb * H;
                if (!act[kb]) {
                    memcpy(ghp, xk, sizeof(float) * H);
                    memcpy(gcp, gck, sizeof(float) * H);
                    memset(z, 0, sizeof(float) * R);
                    memset(dd, 0, sizeof(float) * G);
                    continue;
                }
                const float *gate = s_gates + row * G, *tcr = s_tc + row * H, *cp = s_cprev + row * H;
                for (int j = 0; j < H; j++) {
                    const float ig = gate[j], fg = gate[H + j], og = gate[2 * H + j], gg = gate[3 * H + j];
                    const float tcn = tcr[j], dhc = xk[j];
                    const float dcc = dhc * og * (1.0f - tcn * tcn) + gck[j];
                    z[j] = dcc * gg * ig * (1.0f - ig);
                    z[H + j] = dcc * cp[j] * fg * (1.0f - fg);
                    z[2 * H + j] = dhc * tcn * og * (1.0f - og);
                    z[3 * H + j] = dcc * ig * (1.0f - gg * gg);
                    gcp[j] = dcc * fg;
                }
                const float a = p[kb];
                const float *dr = drives + drive_row * G;
                const float dp = dot(z, dr, G);
                for (int j = 0; j < G; j++) dd[j] = a * z[j];
                const float ds = dp * a * (1.0f - a);
                const float *key = keys + ((size_t)t * B + b) * Q, *q = s_query + row * Q;
                float *dk = d_keys + ((size_t)t * B + b) * Q;
                for (int m = 0; m < Q; m++) {
                    z[G + m] = ds * key[m];
                    dk[m] += ds * q[m];
                }
                memset(ghp, 0, sizeof(float) * H);
            }
        /* Active modules' h_prev gets its gradient through the recurrent product only. */
        modules_matmul_acc((Rows){gh_prev, (size_t)B * H, H}, (Rows){dz + (size_t)t * B * R, (size_t)T * B * R, R}, WrT,
                           K, B, R, H, act);
        for (int b = 0; b < B; b++)
            if (starts[t * B + b]) /* the state entering step t was reset: no gradient before it */
                for (int k = 0; k < K; k++) {
                    memset(gh_prev + ((size_t)k * B + b) * H, 0, sizeof(float) * H);
                    memset(gc_prev + ((size_t)k * B + b) * H, 0, sizeof(float) * H);
                }
        memcpy(gh, gh_prev, sizeof(float) * (size_t)K * B * H);
        memcpy(gc, gc_prev, sizeof(float) * (size_t)K * B * H);
    }
    free(dctx), free(x), free(dA), free(dAT), free(gh_prev), free(gc_prev);
    return 0;
}
