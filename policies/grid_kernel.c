/* The MiniGrid grid encoder (GridEncoder in encoders.py), forward and backward, in C.
 *
 * The same function as GridEncoder's torch path: per-channel index embeddings, a 2x2 convolution,
 * ReLU, an optional 2x2 max-pool (floor), two more 2x2 convolutions with ReLU, flattened channel
 * first. Why C: an update runs it on minibatches of 256 tiny 7x7 grids and a rollout on 16 at every
 * step; in torch each of its ~10 ops costs more in dispatch and layout changes than in arithmetic
 * (the encoder was about half of a DoorKey run's time). Here one call does the whole batch.
 *
 * The embedding and the first convolution are both linear, so they are folded into one table:
 * table[s][c][v] (O1 floats) = sum_e emb[c*V + v][e] * w1[o][c*E + e][dy][dx] for shift s = 2*dy + dx.
 * The first layer's pre-activation at (i, j) is then b1 plus the sum of 12 table rows, picked by the
 * indices of the 2x2 cells under it: the same function as embedding-then-convolution, rounded
 * differently. Its gradient comes back through the table (d_table -> d_emb, d_w1).
 *
 * Sizes: N observations of H x W cells x 3 channels (uint8 indices, clamped to V - 1), E embedding
 * width, V rows per channel, O1, O2, O3 the convolutions' output channels. After the first
 * convolution the grid is H1 x W1 = (H-1) x (W-1); pooled, HP x WP = H1/2 x W1/2, else H1 x W1; then
 * H2 x W2 = (HP-1) x (WP-1) and H3 x W3 = (H2-1) x (W2-1).
 *
 * Layouts (float32 unless said, contiguous, row-major; torch's own layouts for the parameters):
 *   obs (N, H, W, 3) uint8   emb (3V, E)   w1 (O1, 3E, 2, 2)   w2 (O2, O1, 2, 2)   w3 (O3, O2, 2, 2)
 *   out (N, O3*H3*W3), channel first as torch's Flatten of (N, O3, H3, W3)
 *   saved, written by forward and read by backward: r1 (N, H1, W1, O1) the first ReLU's output;
 *   p (N, HP, WP, O1) the pooled grid and arg (N, HP, WP, O1) uint8 which of the 2x2 cells won
 *   (pooled only); r2 (N, H2, W2, O2); r3 (N, H3, W3, O3)
 *   backward: d_out like out; gradients d_emb, d_w1, d_b1, ... in the parameters' layouts, zeroed
 *   by the caller and accumulated into.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int N, H, W, E, V, O1, O2, O3, pooled;
} GridShape;

/* Spatial sizes after each layer. */
typedef struct {
    int H1, W1, HP, WP, H2, W2, H3, W3;
} GridSizes;

static GridSizes sizes_of(const GridShape *g) {
    GridSizes z;
    z.H1 = g->H - 1;
    z.W1 = g->W - 1;
    z.HP = g->pooled ? z.H1 / 2 : z.H1;
    z.WP = g->pooled ? z.W1 / 2 : z.W1;
    z.H2 = z.HP - 1;
    z.W2 = z.WP - 1;
    z.H3 = z.H2 - 1;
    z.W3 = z.W2 - 1;
    return z;
}

/* A 2x2 convolution's weights (O, C, 2, 2) as (4, C, O): per shift and input channel a contiguous
 * row of outputs, so the inner loops run over outputs. */
static void shift_major(const float *w, float *wt, int O, int C) {
    for (int o = 0; o < O; o++)
        for (int c = 0; c < C; c++)
            for (int s = 0; s < 4; s++) wt[((size_t)s * C + c) * O + o] = w[((size_t)o * C + c) * 4 + s];
}

/* The same weights as (4, O, C): per shift and output channel a contiguous row of inputs. */
static void output_major(const float *w, float *wo, int O, int C) {
    for (int o = 0; o < O; o++)
        for (int c = 0; c < C; c++)
            for (int s = 0; s < 4; s++) wo[((size_t)s * O + o) * C + c] = w[((size_t)o * C + c) * 4 + s];
}

/* The embedding folded into the first convolution: table (4, 3, V, O1). */
static void build_table(const GridShape *g, const float *emb, const float *w1, float *table) {
    const int E = g->E, V = g->V, O1 = g->O1;
    for (int s = 0; s < 4; s++)
        for (int c = 0; c < 3; c++)
            for (int v = 0; v < V; v++) {
                float *row = table + (((size_t)s * 3 + c) * V + v) * O1;
                const float *e_row = emb + ((size_t)c * V + v) * E;
                for (int o = 0; o < O1; o++) {
                    float acc = 0.0f;
                    for (int e = 0; e < E; e++) acc += e_row[e] * w1[((size_t)o * 3 * E + c * E + e) * 4 + s];
                    row[o] = acc;
                }
            }
}

/* Eight floats in one register (GCC/Clang vector extension; SSE/AVX on x86, NEON on ARM). Every
 * channel count here is a multiple of 8 (GridEncoder checks before it calls). */
typedef float v8f __attribute__((vector_size(32)));
typedef float v8f_unaligned __attribute__((vector_size(32), aligned(4), may_alias));

static inline v8f load8(const float *p) { return *(const v8f_unaligned *)p; }
static inline void store8(float *p, v8f v) { *(v8f_unaligned *)p = v; }
typedef int32_t v8i __attribute__((vector_size(32)));
/* v where keep's lanes are positive, else 0 (a lane compare gives all ones or zeros). */
static inline v8f where_positive(v8f keep, v8f v) { return (v8f)((v8i)v & (keep > (v8f){0})); }
static inline v8f relu8(v8f v) { return where_positive(v, v); }

/* y (Hi-1, Wi-1, O) = relu(b + conv2x2(x (Hi, Wi, C))), wt (4, C, O) shift-major. Four blocks of 8
 * outputs at a time: four independent sums keep the multiply-add unit busy (one sum would wait out
 * each multiply-add's latency). */
static void conv_relu(const float *restrict x, int Hi, int Wi, int C, const float *restrict wt,
                      const float *restrict b, int O, float *restrict y) {
    for (int i = 0; i < Hi - 1; i++)
        for (int j = 0; j < Wi - 1; j++) {
            float *out = y + ((size_t)i * (Wi - 1) + j) * O;
            int o = 0;
            for (; o + 32 <= O; o += 32) {
                v8f a0 = load8(b + o), a1 = load8(b + o + 8), a2 = load8(b + o + 16), a3 = load8(b + o + 24);
                for (int s = 0; s < 4; s++) {
                    const float *xin = x + ((size_t)(i + (s >> 1)) * Wi + j + (s & 1)) * C;
                    const float *ws = wt + (size_t)s * C * O + o;
                    for (int c = 0; c < C; c++) {
                        const float *w = ws + (size_t)c * O;
                        const float xv = xin[c];
                        a0 += xv * load8(w), a1 += xv * load8(w + 8), a2 += xv * load8(w + 16), a3 += xv * load8(w + 24);
                    }
                }
                store8(out + o, relu8(a0)), store8(out + o + 8, relu8(a1));
                store8(out + o + 16, relu8(a2)), store8(out + o + 24, relu8(a3));
            }
            for (; o < O; o += 8) {
                v8f acc = load8(b + o);
                for (int s = 0; s < 4; s++) {
                    const float *xin = x + ((size_t)(i + (s >> 1)) * Wi + j + (s & 1)) * C;
                    const float *ws = wt + (size_t)s * C * O + o;
                    for (int c = 0; c < C; c++) acc += xin[c] * load8(ws + (size_t)c * O);
                }
                store8(out + o, relu8(acc));
            }
        }
}

/* Backward of conv_relu. dy in place becomes the pre-activation gradient; adds the weight gradient
 * (shift-major, like wt) to dwt, the bias gradient to db and, when dx is not NULL, the input
 * gradient to dx, using wo (4, O, C), the weights output-major (four blocks of 8 inputs at a time,
 * as in conv_relu). */
static void conv_relu_backward(const float *restrict x, int Hi, int Wi, int C, const float *restrict wo,
                               int O, const float *restrict y, float *restrict dy, float *restrict dwt,
                               float *restrict db, float *restrict dx) {
    for (int i = 0; i < Hi - 1; i++)
        for (int j = 0; j < Wi - 1; j++) {
            const size_t at = ((size_t)i * (Wi - 1) + j) * O;
            float *d = dy + at;
            for (int o = 0; o < O; o += 8) {
                const v8f dv = where_positive(load8(y + at + o), load8(d + o));
                store8(d + o, dv);
                store8(db + o, load8(db + o) + dv);
            }
            for (int s = 0; s < 4; s++) {
                const size_t cell = ((size_t)(i + (s >> 1)) * Wi + j + (s & 1)) * C;
                const float *xin = x + cell;
                float *dws = dwt + (size_t)s * C * O;
                for (int c = 0; c < C; c++) {
                    const float xv = xin[c];
                    if (xv == 0.0f) continue; /* ReLU/pool zeros: nothing to add */
                    float *dwrow = dws + (size_t)c * O;
                    for (int o = 0; o < O; o += 8) store8(dwrow + o, load8(dwrow + o) + xv * load8(d + o));
                }
                if (!dx) continue;
                const float *wos = wo + (size_t)s * O * C;
                float *dxc = dx + cell;
                int c = 0;
                for (; c + 32 <= C; c += 32) {
                    v8f a0 = load8(dxc + c), a1 = load8(dxc + c + 8), a2 = load8(dxc + c + 16), a3 = load8(dxc + c + 24);
                    for (int o = 0; o < O; o++) {
                        const float *w = wos + (size_t)o * C + c;
                        const float dv = d[o];
                        a0 += dv * load8(w), a1 += dv * load8(w + 8), a2 += dv * load8(w + 16), a3 += dv * load8(w + 24);
                    }
                    store8(dxc + c, a0), store8(dxc + c + 8, a1), store8(dxc + c + 16, a2), store8(dxc + c + 24, a3);
                }
                for (; c < C; c += 8) {
                    v8f acc = load8(dxc + c);
                    for (int o = 0; o < O; o++) acc += d[o] * load8(wos + (size_t)o * C + c);
                    store8(dxc + c, acc);
                }
            }
        }
}

static int scratch_size(const GridShape *g, const GridSizes *z) {
    (void)z;
    return 4 * 3 * g->V * g->O1 + 4 * g->O1 * g->O2 + 4 * g->O2 * g->O3;
}

/* Forward for the whole batch. Returns 0, or -1 when out of memory. */
int grid_forward(const GridShape *g, const uint8_t *obs, const float *emb, const float *w1, const float *b1,
                 const float *w2, const float *b2, const float *w3, const float *b3, float *out, float *r1, float *p,
                 uint8_t *arg, float *r2, float *r3) {
    const GridSizes z = sizes_of(g);
    const int V = g->V, O1 = g->O1, O2 = g->O2, O3 = g->O3, H = g->H, W = g->W;
    float *scratch = malloc(sizeof(float) * scratch_size(g, &z));
    if (!scratch) return -1;
    float *table = scratch, *w2t = table + 4 * 3 * V * O1, *w3t = w2t + 4 * O1 * O2;
    build_table(g, emb, w1, table);
    shift_major(w2, w2t, O2, O1);
    shift_major(w3, w3t, O3, O2);
    const size_t n1 = (size_t)z.H1 * z.W1 * O1, np_ = (size_t)z.HP * z.WP * O1;
    const size_t n2 = (size_t)z.H2 * z.W2 * O2, n3 = (size_t)z.H3 * z.W3 * O3;
    for (int n = 0; n < g->N; n++) {
        const uint8_t *o_n = obs + (size_t)n * H * W * 3;
        float *r1_n = r1 + n * n1;
        for (int i = 0; i < z.H1; i++)
            for (int j = 0; j < z.W1; j++) {
                /* The 12 table rows under this position, then their sums 8 outputs at a time. */
                const float *rows[12];
                for (int s = 0; s < 4; s++) {
                    const uint8_t *cell = o_n + ((size_t)(i + (s >> 1)) * W + j + (s & 1)) * 3;
                    for (int c = 0; c < 3; c++) {
                        const int v = cell[c] < V ? cell[c] : V - 1;
                        rows[s * 3 + c] = table + (((size_t)s * 3 + c) * V + v) * O1;
                    }
                }
                float *acc = r1_n + ((size_t)i * z.W1 + j) * O1;
                for (int o = 0; o < O1; o += 8) {
                    v8f sum = load8(b1 + o);
                    for (int r = 0; r < 12; r++) sum += load8(rows[r] + o);
                    store8(acc + o, relu8(sum));
                }
            }
        const float *p_n = r1_n;
        if (g->pooled) {
            float *pp = p + n * np_;
            uint8_t *aa = arg + n * np_;
            for (int i = 0; i < z.HP; i++)
                for (int j = 0; j < z.WP; j++)
                    for (int o = 0; o < O1; o++) {
                        /* torch's max_pool2d: the first of the 2x2 cells (row by row) holding the maximum. */
                        float best = r1_n[((size_t)(2 * i) * z.W1 + 2 * j) * O1 + o];
                        int which = 0;
                        for (int s = 1; s < 4; s++) {
                            const float v = r1_n[((size_t)(2 * i + (s >> 1)) * z.W1 + 2 * j + (s & 1)) * O1 + o];
                            if (v > best) best = v, which = s;
                        }
                        pp[((size_t)i * z.WP + j) * O1 + o] = best;
                        aa[((size_t)i * z.WP + j) * O1 + o] = (uint8_t)which;
                    }
            p_n = pp;
        }
        float *r2_n = r2 + n * n2, *r3_n = r3 + n * n3;
        conv_relu(p_n, z.HP, z.WP, O1, w2t, b2, O2, r2_n);
        conv_relu(r2_n, z.H2, z.W2, O2, w3t, b3, O3, r3_n);
        float *out_n = out + n * n3;
        for (int i = 0; i < z.H3 * z.W3; i++)
            for (int o = 0; o < O3; o++) out_n[(size_t)o * z.H3 * z.W3 + i] = r3_n[(size_t)i * O3 + o];
    }
    free(scratch);
    return 0;
}

/* Backward for the whole batch, from forward's saved tensors. Returns 0, or -1 when out of memory. */
int grid_backward(const GridShape *g, const uint8_t *obs, const float *emb, const float *w1, const float *w2,
                  const float *w3, const float *r1, const float *p, const uint8_t *arg, const float *r2,
                  const float *r3, const float *d_out, float *d_emb, float *d_w1, float *d_b1, float *d_w2,
                  float *d_b2, float *d_w3, float *d_b3) {
    const GridSizes z = sizes_of(g);
    const int E = g->E, V = g->V, O1 = g->O1, O2 = g->O2, O3 = g->O3, H = g->H, W = g->W;
    const size_t n1 = (size_t)z.H1 * z.W1 * O1, np_ = (size_t)z.HP * z.WP * O1;
    const size_t n2 = (size_t)z.H2 * z.W2 * O2, n3 = (size_t)z.H3 * z.W3 * O3;
    const size_t n_params = (size_t)scratch_size(g, &z);
    /* weights (table slot unused), their gradients (table's included), and per-observation buffers. */
    float *scratch = calloc(2 * n_params + n1 + np_ + n2 + n3, sizeof(float));
    if (!scratch) return -1;
    float *w2o = scratch + 4 * 3 * V * O1, *w3o = w2o + 4 * O1 * O2;
    float *d_table = scratch + n_params, *d_w2t = d_table + 4 * 3 * V * O1, *d_w3t = d_w2t + 4 * O1 * O2;
    float *g1 = d_table + n_params, *gp = g1 + n1, *g2 = gp + np_, *g3 = g2 + n2;
    output_major(w2, w2o, O2, O1);
    output_major(w3, w3o, O3, O2);
    for (int n = 0; n < g->N; n++) {
        const float *d_n = d_out + n * n3;
        for (int i = 0; i < z.H3 * z.W3; i++)
            for (int o = 0; o < O3; o++) g3[(size_t)i * O3 + o] = d_n[(size_t)o * z.H3 * z.W3 + i];
        const float *r1_n = r1 + n * n1, *r2_n = r2 + n * n2;
        const float *p_n = g->pooled ? p + n * np_ : r1_n;
        memset(g2, 0, sizeof(float) * n2);
        conv_relu_backward(r2_n, z.H2, z.W2, O2, w3o, O3, r3 + n * n3, g3, d_w3t, d_b3, g2);
        memset(gp, 0, sizeof(float) * np_);
        conv_relu_backward(p_n, z.HP, z.WP, O1, w2o, O2, r2_n, g2, d_w2t, d_b2, gp);
        /* Max-pool backward: each pooled gradient goes to the cell that won; then the first ReLU. */
        if (g->pooled) {
            memset(g1, 0, sizeof(float) * n1);
            const uint8_t *a_n = arg + n * np_;
            for (int i = 0; i < z.HP; i++)
                for (int j = 0; j < z.WP; j++)
                    for (int o = 0; o < O1; o++) {
                        const size_t at = ((size_t)i * z.WP + j) * O1 + o;
                        const int s = a_n[at];
                        g1[((size_t)(2 * i + (s >> 1)) * z.W1 + 2 * j + (s & 1)) * O1 + o] = gp[at];
                    }
        } else {
            memcpy(g1, gp, sizeof(float) * n1);
        }
        const uint8_t *o_n = obs + (size_t)n * H * W * 3;
        for (int i = 0; i < z.H1; i++)
            for (int j = 0; j < z.W1; j++) {
                const size_t at = ((size_t)i * z.W1 + j) * O1;
                float *restrict d = g1 + at;
                for (int o = 0; o < O1; o++) {
                    d[o] = r1_n[at + o] > 0.0f ? d[o] : 0.0f;
                    d_b1[o] += d[o];
                }
                for (int s = 0; s < 4; s++) {
                    const uint8_t *cell = o_n + ((size_t)(i + (s >> 1)) * W + j + (s & 1)) * 3;
                    for (int c = 0; c < 3; c++) {
                        const int v = cell[c] < V ? cell[c] : V - 1;
                        float *row = d_table + (((size_t)s * 3 + c) * V + v) * O1;
                        for (int o = 0; o < O1; o += 8) store8(row + o, load8(row + o) + load8(d + o));
                    }
                }
            }
    }
    /* The table's gradient back to the embedding and the first convolution's weights. */
    for (int s = 0; s < 4; s++)
        for (int c = 0; c < 3; c++)
            for (int v = 0; v < V; v++) {
                const float *row = d_table + (((size_t)s * 3 + c) * V + v) * O1;
                const float *e_row = emb + ((size_t)c * V + v) * E;
                float *de_row = d_emb + ((size_t)c * V + v) * E;
                for (int o = 0; o < O1; o++) {
                    if (row[o] == 0.0f) continue;
                    for (int e = 0; e < E; e++) {
                        const size_t wi = ((size_t)o * 3 * E + c * E + e) * 4 + s;
                        de_row[e] += row[o] * w1[wi];
                        d_w1[wi] += row[o] * e_row[e];
                    }
                }
            }
    for (int o = 0; o < O2; o++)
        for (int c = 0; c < O1; c++)
            for (int s = 0; s < 4; s++) d_w2[((size_t)o * O1 + c) * 4 + s] += d_w2t[((size_t)s * O1 + c) * O2 + o];
    for (int o = 0; o < O3; o++)
        for (int c = 0; c < O2; c++)
            for (int s = 0; s < 4; s++) d_w3[((size_t)o * O2 + c) * 4 + s] += d_w3t[((size_t)s * O2 + c) * O3 + o];
    free(scratch);
    return 0;
}
