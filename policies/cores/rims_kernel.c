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
 *   qkv (Ts, K, B, C3)  attn (Ts, B, NC, K, K) as [key module j][query module i]  query (Ts, K, B, Q)
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

static inline float dot(const float *restrict a, const float *restrict b, int n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int j = 0; j < n; j++) s += a[j] * b[j];
    return s;
}

static inline float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

/* y[k][b] (+)= x[k][b] @ W[k] for every module k and env b: x (K, B, M) with row stride xs,
 * W (K, M, N), y (K, B, N) with row stride ys. Rows of W are reused across the envs. */
static void modules_matmul_acc(float *y, int ys, const float *x, int xs, const float *W, int K, int B, int M, int N,
                               const uint8_t *only /* (K, B) or NULL: skip rows where 0 */) {
    for (int k = 0; k < K; k++)
        for (int i = 0; i < M; i++) {
            const float *w = W + ((size_t)k * M + i) * N;
            for (int b = 0; b < B; b++) {
                if (only && !only[k * B + b]) continue;
                float a = x[((size_t)k * B + b) * xs + i];
                if (a != 0.0f) axpy(y + ((size_t)k * B + b) * ys, a, w, N);
            }
        }
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
        modules_matmul_acc(rec, R, h, H, Wr, K, B, H, R, NULL);

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
                for (int k = 0; k < K; k++)
                    if (!chosen[k] && (best < 0 || score[k * B + b] > score[best * B + b])) best = k;
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
                const float a = p[kb];
                for (int j = 0; j < G; j++) gate[j] = rk[j] + a * dr[j];
                for (int j = 0; j < 3 * H; j++) gate[j] = sigmoidf(gate[j]);
                for (int j = 3 * H; j < G; j++) gate[j] = tanhf(gate[j]);
                for (int j = 0; j < H; j++) {
                    const float cn = gate[H + j] * cr[j] + gate[j] * gate[3 * H + j];
                    const float tcn = tanhf(cn);
                    cr[j] = cn; /* c_prev is saved above; inactive modules' c is never touched */
                    tcr[j] = tcn;
                    ht[j] = gate[2 * H + j] * tcn;
                }
            }
        const float *htil = s_htil + (size_t)ts * B * H; /* module k's rows start at k * Ts * B * H */
        const int htil_stride_k = Ts * B * H;

        /* Communication Q/K/V of every module from h~. */
        float *qkv = s_qkv + (size_t)ts * K * B * C3;
        memset(qkv, 0, sizeof(float) * (size_t)K * B * C3);
        for (int k = 0; k < K; k++)
            modules_matmul_acc(qkv + (size_t)k * B * C3, C3, htil + (size_t)k * htil_stride_k, H,
                               Wc + (size_t)k * H * C3, 1, B, H, C3, NULL);
        /* Attention across modules per env and head; ctx_i = sum_j softmax_j(k_j . q_i) v_j. */
        for (int b = 0; b < B; b++)
            for (int hd = 0; hd < d.NC; hd++) {
                float *A = s_attn + ((((size_t)ts * B + b) * d.NC + hd) * K) * K;
                const int off = hd * (2 * d.CK + d.CV);
                for (int i = 0; i < K; i++) {
                    const float *q = qkv + ((size_t)i * B + b) * C3 + off;
                    float m = -INFINITY, sum = 0.0f;
                    for (int j = 0; j < K; j++) {
                        const float sc = scale * dot(qkv + ((size_t)j * B + b) * C3 + off + d.CK, q, d.CK);
                        A[j * K + i] = sc;
                        m = sc > m ? sc : m;
                    }
                    for (int j = 0; j < K; j++) sum += (A[j * K + i] = expf(A[j * K + i] - m));
                    for (int j = 0; j < K; j++) A[j * K + i] /= sum;
                    float *cx = s_ctx + (((size_t)i * Ts + ts) * B + b) * CX + hd * d.CV;
                    memset(cx, 0, sizeof(float) * d.CV);
                    for (int j = 0; j < K; j++)
                        axpy(cx, A[j * K + i], qkv + ((size_t)j * B + b) * C3 + off + 2 * d.CK, d.CV);
                }
            }
        /* Bounded residual for the active modules: h = h~ + tanh(ctx @ W_out[k]); others keep h, c. */
        for (int k = 0; k < K; k++)
            for (int b = 0; b < B; b++) {
                const size_t kb = (size_t)k * B + b;
                float *hn = hnew + kb * H;
                if (!act[kb]) {
                    memcpy(hn, h + kb * H, sizeof(float) * H);
                    continue;
                }
                float *u = s_upd + (((size_t)ts * K + k) * B + b) * H;
                const float *cx = s_ctx + (((size_t)k * Ts + ts) * B + b) * CX;
                memset(u, 0, sizeof(float) * H);
                for (int i = 0; i < CX; i++) axpy(u, cx[i], Wo + ((size_t)k * CX + i) * H, H);
                const float *ht = htil + (size_t)k * htil_stride_k + (size_t)b * H;
                for (int j = 0; j < H; j++) {
                    u[j] = tanhf(u[j]);
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
    float *dA = malloc(sizeof(float) * (size_t)K * K);
    float *gh_prev = malloc(sizeof(float) * (size_t)K * B * H);
    float *gc_prev = malloc(sizeof(float) * (size_t)K * B * H);
    if (!dctx || !x || !dA || !gh_prev || !gc_prev) {
        free(dctx), free(x), free(dA), free(gh_prev), free(gc_prev);
        return 1;
    }
    for (int t = T - 1; t >= 0; t--) {
        const uint8_t *act = active + (size_t)t * K * B;
        const float *p = probs + (size_t)t * K * B;
        const float *qkv = s_qkv + (size_t)t * K * B * C3;
        for (int k = 0; k < K; k++)
            for (int b = 0; b < B; b++)
                axpy(gh + ((size_t)k * B + b) * H, 1.0f, d_out + ((size_t)t * B + b) * K * H + (size_t)k * H, H);

        /* Residual tanh, then ctx = d_comm @ W_out^T (active modules only use their update). */
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
                for (int j = 0; j < H; j++) axpy(dctx + kb * CX, dc[j], WoT + ((size_t)k * H + j) * CX, CX);
            }
        /* Attention across modules. */
        for (int b = 0; b < B; b++)
            for (int hd = 0; hd < d.NC; hd++) {
                const float *A = s_attn + ((((size_t)t * B + b) * d.NC + hd) * K) * K;
                const int off = hd * (2 * d.CK + d.CV);
                for (int j = 0; j < K; j++) {
                    const float *v = qkv + ((size_t)j * B + b) * C3 + off + 2 * d.CK;
                    for (int i = 0; i < K; i++) dA[j * K + i] = dot(dctx + ((size_t)i * B + b) * CX + hd * d.CV, v, d.CV);
                }
                for (int i = 0; i < K; i++) { /* softmax over the key modules j: dS = A * (dA - sum_j A dA) */
                    float s = 0.0f;
                    for (int j = 0; j < K; j++) s += A[j * K + i] * dA[j * K + i];
                    for (int j = 0; j < K; j++) dA[j * K + i] = A[j * K + i] * (dA[j * K + i] - s) * scale;
                }
                for (int m = 0; m < K; m++) {
                    float *dm = dqkv + (((size_t)m * T + t) * B + b) * C3 + off;
                    memset(dm, 0, sizeof(float) * (2 * d.CK + d.CV));
                    for (int n = 0; n < K; n++) {
                        const float *qn = qkv + ((size_t)n * B + b) * C3 + off;
                        axpy(dm, dA[n * K + m], qn + d.CK, d.CK);            /* d q_m: keys of all modules */
                        axpy(dm + d.CK, dA[m * K + n], qn, d.CK);            /* d k_m: queries of all modules */
                        axpy(dm + 2 * d.CK, A[m * K + n], dctx + ((size_t)n * B + b) * CX + hd * d.CV, d.CV);
                    }
                }
            }
        /* x = dh + dqkv @ W_qkv^T: the gradient w.r.t. h~ (= h_cell if active, h_prev if not). */
        memcpy(x, gh, sizeof(float) * (size_t)K * B * H);
        for (int k = 0; k < K; k++)
            modules_matmul_acc(x + (size_t)k * B * H, H, dqkv + (size_t)k * T * B * C3 + (size_t)t * B * C3, C3,
                               WcT + (size_t)k * C3 * H, 1, B, C3, H, NULL);
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
                for (int r = 0; r < R; r++)
                    if (z[r] != 0.0f) axpy(ghp, z[r], WrT + ((size_t)k * R + r) * H, H);
            }
        for (int b = 0; b < B; b++)
            if (starts[t * B + b]) /* the state entering step t was reset: no gradient before it */
                for (int k = 0; k < K; k++) {
                    memset(gh_prev + ((size_t)k * B + b) * H, 0, sizeof(float) * H);
                    memset(gc_prev + ((size_t)k * B + b) * H, 0, sizeof(float) * H);
                }
        memcpy(gh, gh_prev, sizeof(float) * (size_t)K * B * H);
        memcpy(gc, gc_prev, sizeof(float) * (size_t)K * B * H);
    }
    free(dctx), free(x), free(dA), free(gh_prev), free(gc_prev);
    return 0;
}
