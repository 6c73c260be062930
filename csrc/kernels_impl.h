// The compute kernels, written once with GCC/Clang vector extensions and compiled once per
// instruction set: isa_base.cpp (the compiler's default target, e.g. SSE2 on x86-64, NEON on
// aarch64), isa_avx2.cpp (-mavx2 -mfma) and isa_avx512.cpp (-mavx512f ...). bindings.cpp picks one
// at run time from what the CPU reports. Before including this file define
//   QK_NS  the namespace of the variant's entry points,
//   QK_VW  the vector width in floats (4, 8 or 16),
//   QK_MR0, QK_NV0  the main GEMM tile (rows, vectors of columns), chosen to fill the register file.
//
// Everything except the entry points has internal linkage (anonymous namespace), and no standard
// library header is included, so nothing compiled here for a wider instruction set can leak into
// the rest of the module.
#include "qk_api.h"

#ifndef QK_NS
#error "define QK_NS, QK_VW, QK_MR0, QK_NV0 before including kernels_impl.h"
#endif

namespace {

using namespace qk;

constexpr int VW = QK_VW;
typedef float vf __attribute__((vector_size(VW * 4)));
typedef int vi __attribute__((vector_size(VW * 4)));

#define QK_INLINE inline __attribute__((always_inline))

QK_INLINE vf ld(const float* p) { vf v; __builtin_memcpy(&v, p, sizeof(vf)); return v; }
QK_INLINE void st(float* p, vf v) { __builtin_memcpy(p, &v, sizeof(vf)); }
QK_INLINE vf bc(float s) { return s - vf{}; }  // s - (+0) == s exactly: folds to a broadcast

#if defined(__clang__)
QK_INLINE vf vsel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
QK_INLINE vf vmin(vf a, vf b) { return vsel(a < b, a, b); }
QK_INLINE vf vmax(vf a, vf b) { return vsel(a > b, a, b); }
#else
QK_INLINE vf vmin(vf a, vf b) { return a < b ? a : b; }
QK_INLINE vf vmax(vf a, vf b) { return a > b ? a : b; }
#endif

// exp(x) for x in [-87, 88] (clamped outside): Cephes' expf polynomial, ~1 ulp.
QK_INLINE vf vexp(vf x) {
    x = vmin(x, bc(88.0f));
    x = vmax(x, bc(-87.0f));
    const vf magic = bc(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    vf t = x * bc(1.44269504088896341f) + magic;
    vf n = t - magic;
    vf r = x - n * bc(0.693359375f);
    r = r - n * bc(-2.12194440e-4f);
    vf p = bc(1.9875691500e-4f);
    p = p * r + bc(1.3981999507e-3f);
    p = p * r + bc(8.3334519073e-3f);
    p = p * r + bc(4.1665795894e-2f);
    p = p * r + bc(1.6666665459e-1f);
    p = p * r + bc(5.0000001201e-1f);
    p = p * (r * r) + r + bc(1.0f);
    vi e = (((vi)t - (vi)magic) + 127) << 23;
    return p * (vf)e;
}

// ---- double precision, for the softmax draw (the reference computes it in float64)
constexpr int VD = VW / 2;  // doubles per vector
typedef double vd __attribute__((vector_size(VW * 4)));
typedef long long vl __attribute__((vector_size(VW * 4)));
QK_INLINE vd bcd(double s) { return s - vd{}; }

// exp(x) for x <= 0 (softmax offsets q / T - max): Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2,
// e^r by its Taylor polynomial to degree 13 (truncation < 1e-17 relative), times 2^n built in the
// exponent bits; within ~2 ulp of libm. Below -708 (2^n would be subnormal) the result is 0, where
// e^x < 3e-308 is 0 next to the largest term (e^0 = 1) of the softmax sum anyway.
QK_INLINE vd vexpd_nonpos(vd x) {
    const vd zero = bcd(0.0);
    vl over = x > zero;  // (callers pass offsets <= 0; a positive one is clamped, never garbage bits)
    x = (vd)(((vl)x & ~over) | ((vl)zero & over));
    const vd lo = bcd(-708.0);
    vl under = x < lo;
    x = (vd)(((vl)x & ~under) | ((vl)lo & under));
    const vd magic = bcd(6755399441055744.0);  // 1.5 * 2^52: adding it rounds to an integer
    vd t = x * bcd(1.4426950408889634) + magic;
    vd n = t - magic;
    vd r = x - n * bcd(6.93147180369123816490e-01);
    r = r - n * bcd(1.90821492927058770002e-10);
    vd p = bcd(1.0 / 6227020800.0);            // 1/13!
    p = p * r + bcd(1.0 / 479001600.0);
    p = p * r + bcd(1.0 / 39916800.0);
    p = p * r + bcd(1.0 / 3628800.0);
    p = p * r + bcd(1.0 / 362880.0);
    p = p * r + bcd(1.0 / 40320.0);
    p = p * r + bcd(1.0 / 5040.0);
    p = p * r + bcd(1.0 / 720.0);
    p = p * r + bcd(1.0 / 120.0);
    p = p * r + bcd(1.0 / 24.0);
    p = p * r + bcd(1.0 / 6.0);
    p = p * r + bcd(0.5);
    p = p * r + bcd(1.0);
    p = p * r + bcd(1.0);
    vl e = (((vl)t - (vl)magic) + 1023) << 52;
    vd y = p * (vd)e;
    return (vd)((vl)y & ~under);
}

// out[i] = exp((x[i] - max x) * scale) for i < n (scale > 0; float64), returning their sum (four
// partial sums: no chain of n dependent adds). The difference is formed first, so that every offset
// is <= 0 and exactly 0 at the max whatever the magnitudes (x * scale - max * scale with a fused
// multiply-add is not). out: n doubles. Shared by the softmax draw and the loss weights.
double exp_offsets(const float* x, long n, double scale, double* out) {
    float xm = x[0];
    for (long i = 1; i < n; ++i) xm = x[i] > xm ? x[i] : xm;
    const double dm = (double)xm;
    const vd vs = bcd(scale), vdm = bcd(dm);
    long k = 0;
    for (; k + VD <= n; k += VD) {
        vd v;
        for (int j = 0; j < VD; ++j) v[j] = (double)x[k + j];
        vd r = vexpd_nonpos((v - vdm) * vs);
        __builtin_memcpy(out + k, &r, sizeof(vd));
    }
    if (k < n) {  // the tail, padded with a harmless 0 offset
        vd v = bcd(0.0);
        for (int j = 0; k + j < n; ++j) v[j] = ((double)x[k + j] - dm) * scale;
        vd r = vexpd_nonpos(v);
        for (int j = 0; k + j < n; ++j) out[k + j] = r[j];
    }
    double s4[4] = {0.0, 0.0, 0.0, 0.0};
    long i = 0;
    for (; i + 4 <= n; i += 4)
        for (int l = 0; l < 4; ++l) s4[l] += out[i + l];
    double sum = (s4[0] + s4[1]) + (s4[2] + s4[3]);
    for (; i < n; ++i) sum += out[i];
    return sum;
}

// The candidate select_action picks from K finite scores q (reference.select.select_index):
// mode 0 argmax, the first largest; mode 1 softmax, the smallest k with cumsum(softmax(q / T))[k] > u
// (at most K - 1), in float64 as the reference, tested as cumsum(e) <= u * sum(e) (no division
// per candidate; the two differ only for a u within ~1e-16 of a boundary). e: K doubles.
int select_one(const float* q, int K, int mode, double T, double u, double* e) {
    if (mode == 0) {
        int idx = 0;
        for (int k = 1; k < K; ++k)
            if (q[k] > q[idx]) idx = k;
        return idx;
    }
    const double sum = exp_offsets(q, K, 1.0 / T, e);  // e = exp((q - max q) / T)
    // the first k with cumsum(e)[k] > u * sum (e >= 0: the cumulative sum never decreases), found a
    // block of 8 at a time: a block's total is added unless the crossing is inside it
    const double us = u * sum;
    double cdf = 0.0;
    int i = 0;
    for (; i + 8 <= K; i += 8) {
        const double blk =
            ((e[i] + e[i + 1]) + (e[i + 2] + e[i + 3])) + ((e[i + 4] + e[i + 5]) + (e[i + 6] + e[i + 7]));
        if (cdf + blk > us) break;
        cdf += blk;
    }
    int cnt = i;
    for (; i < K; ++i) {
        cdf += e[i];
        if (cdf > us) break;
        ++cnt;
    }
    return cnt < K - 1 ? cnt : K - 1;
}

// Activations; every one maps 0 to 0 (the pad lanes stay zero).
template <int ACT>
QK_INLINE vf actf(vf x) {
    if (ACT == ACT_MISH) {  // x tanh(softplus(x)) = x n / (n + 2), n = u (u + 2), u = e^x
        vf u = vexp(vmin(x, bc(20.0f)));
        vf n = u * (u + bc(2.0f));
        return x * n / (n + bc(2.0f));
    } else if (ACT == ACT_SILU) {
        return x / (bc(1.0f) + vexp(-x));
    } else if (ACT == ACT_RELU) {
        return vmax(x, bc(0.0f));
    } else if (ACT == ACT_GELU) {  // 0.5 x (1 + tanh(u)) = x / (1 + e^{-2u})
        vf u = bc(0.7978845608028654f) * (x + bc(0.044715f) * x * x * x);
        return x / (bc(1.0f) + vexp(bc(-2.0f) * u));
    } else if (ACT == ACT_TANH) {
        // small |x|: odd Taylor polynomial (no cancellation); otherwise 1 - 2 / (e^{2x} + 1)
        vf x2 = x * x;
        vf p = bc(-0.0088632355299021f);                 // -1382/155925
        p = p * x2 + bc(0.0218694885361552f);             // 62/2835
        p = p * x2 + bc(-0.0539682539682540f);            // -17/315
        p = p * x2 + bc(0.1333333333333333f);             // 2/15
        p = p * x2 + bc(-0.3333333333333333f);
        vf small = x + x * x2 * p;
        vf xc = vmax(vmin(x, bc(9.0f)), bc(-9.0f));
        vf big = bc(1.0f) - bc(2.0f) / (vexp(bc(2.0f) * xc) + bc(1.0f));
        vi m = (x2 < bc(0.0625f));
        return (vf)(((vi)small & m) | ((vi)big & ~m));
    } else {
        return x;
    }
}

// ---------------------------------------------------------------------------------------------
// GEMM with fused bias + activation: Y[M, Np] = act(X[M, K] W[K, Np] + bias[Np]).
// W is packed in column panels of PANEL (32) floats: panel p holds columns [32p, 32p + w) as a
// contiguous [KP, w] row-major block (w = 32, or 16 for a last half panel), so one panel (32 KB at
// K = 256) is streamed from memory once and reused from cache by every row block.
// A tile of MR rows x NV vectors keeps MR*NV accumulators in registers; each step of k loads NV
// vectors of W and broadcasts MR scalars of X. One-row tiles split k over KU partial sums so that
// enough independent FMA chains are in flight.

template <int ACT, int MR, int NV>
QK_INLINE void tile_store(vf (&acc)[MR][NV], float* Y, long ldy) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
        for (int j = 0; j < NV; ++j) st(Y + i * ldy + j * VW, actf<ACT>(acc[i][j]));
}

template <int MR, int NV>
QK_INLINE void tile_epilogue(vf (&acc)[MR][NV], float* Y, long ldy, int act) {
    switch (act) {
        case ACT_MISH: tile_store<ACT_MISH, MR, NV>(acc, Y, ldy); break;
        case ACT_SILU: tile_store<ACT_SILU, MR, NV>(acc, Y, ldy); break;
        case ACT_RELU: tile_store<ACT_RELU, MR, NV>(acc, Y, ldy); break;
        case ACT_GELU: tile_store<ACT_GELU, MR, NV>(acc, Y, ldy); break;
        case ACT_TANH: tile_store<ACT_TANH, MR, NV>(acc, Y, ldy); break;
        default: tile_store<ACT_IDENTITY, MR, NV>(acc, Y, ldy); break;
    }
}

template <int MR, int NV>
__attribute__((noinline)) void tile(const float* __restrict X, long ldx, int K, const float* __restrict W, long ldw,
                                    const float* __restrict bias, float* __restrict Y, long ldy, int act) {
    vf acc[MR][NV];
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) {
        vf b = bias ? ld(bias + j * VW) : vf{};
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) acc[i][j] = b;
    }
    for (int k = 0; k < K; ++k) {
        const float* w = W + (long)k * ldw;
        vf wv[NV];
#pragma GCC unroll 16
        for (int j = 0; j < NV; ++j) wv[j] = ld(w + j * VW);
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) {
            vf xb = bc(X[i * ldx + k]);
#pragma GCC unroll 16
            for (int j = 0; j < NV; ++j) acc[i][j] += xb * wv[j];
        }
    }
    tile_epilogue<MR, NV>(acc, Y, ldy, act);
}

// one row, k split over KU partial sums (summed in a fixed order: results do not depend on timing)
template <int NV, int KU>
__attribute__((noinline)) void tile_row(const float* __restrict X, int K, const float* __restrict W, long ldw,
                                        const float* __restrict bias, float* __restrict Y, int act) {
    vf part[KU][NV];
#pragma GCC unroll 16
    for (int u = 0; u < KU; ++u)
#pragma GCC unroll 16
        for (int j = 0; j < NV; ++j) part[u][j] = vf{};
    int k = 0;
    for (; k + KU <= K; k += KU) {
#pragma GCC unroll 16
        for (int u = 0; u < KU; ++u) {
            const float* w = W + (long)(k + u) * ldw;
            vf xb = bc(X[k + u]);
#pragma GCC unroll 16
            for (int j = 0; j < NV; ++j) part[u][j] += xb * ld(w + j * VW);
        }
    }
    for (; k < K; ++k) {
        const float* w = W + (long)k * ldw;
        vf xb = bc(X[k]);
#pragma GCC unroll 16
        for (int j = 0; j < NV; ++j) part[0][j] += xb * ld(w + j * VW);
    }
    vf acc[1][NV];
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) {
        vf s = bias ? ld(bias + j * VW) : vf{};
        vf t = part[0][j];
#pragma GCC unroll 16
        for (int u = 1; u < KU; ++u) t += part[u][j];
        acc[0][j] = s + t;
    }
    tile_epilogue<1, NV>(acc, Y, 1, act);
}

constexpr int MR0 = QK_MR0, NV0 = QK_NV0;
constexpr int PANEL = 32;
static_assert(PANEL % (NV0 * VW) == 0, "a tile must not straddle two panels");

// rows [0, M) x the w columns of one panel
QK_INLINE void panel_rows(const float* X, long ldx, int M, int K, const float* Wp, int w, const float* bias,
                          float* Y, long ldy, int act) {
    for (int j = 0; j < w;) {
        const bool wide = j + NV0 * VW <= w;
        const float* Wj = Wp + j;
        const float* bj = bias ? bias + j : nullptr;
        int i = 0;
        if (wide) {
            for (; i + MR0 <= M; i += MR0) tile<MR0, NV0>(X + i * ldx, ldx, K, Wj, w, bj, Y + i * ldy + j, ldy, act);
            if (M - i >= 4) { tile<4, NV0>(X + i * ldx, ldx, K, Wj, w, bj, Y + i * ldy + j, ldy, act); i += 4; }
            if (M - i >= 2) { tile<2, NV0>(X + i * ldx, ldx, K, Wj, w, bj, Y + i * ldy + j, ldy, act); i += 2; }
            if (M - i >= 1) { tile_row<NV0, 4>(X + i * ldx, K, Wj, w, bj, Y + i * ldy + j, act); i += 1; }
            j += NV0 * VW;
        } else {
            for (; i + MR0 <= M; i += MR0) tile<MR0, 1>(X + i * ldx, ldx, K, Wj, w, bj, Y + i * ldy + j, ldy, act);
            if (M - i >= 4) { tile<4, 1>(X + i * ldx, ldx, K, Wj, w, bj, Y + i * ldy + j, ldy, act); i += 4; }
            if (M - i >= 2) { tile<2, 1>(X + i * ldx, ldx, K, Wj, w, bj, Y + i * ldy + j, ldy, act); i += 2; }
            if (M - i >= 1) { tile_row<1, 4>(X + i * ldx, K, Wj, w, bj, Y + i * ldy + j, act); i += 1; }
            j += VW;
        }
    }
}

// W packed in panels with KP rows each; K <= KP rows are used (the rest are zero padding).
void gemm_impl(const float* X, long ldx, int M, int K, const float* W, int KP, int Np, const float* bias, float* Y,
               long ldy, int act) {
    for (int p0 = 0; p0 < Np; p0 += PANEL) {
        const int w = Np - p0 < PANEL ? Np - p0 : PANEL;
        panel_rows(X, ldx, M, K, W + (long)p0 * KP, w, bias ? bias + p0 : nullptr, Y + p0, ldy, act);
    }
}

// ---------------------------------------------------------------------------------------------
// First layer: y[r] = act(cs[state(r)] + x[r] Wx); cs already holds c Wc + b1 (+ time share).

template <int ACT>
void layer1_t(const NetDesc* n, const float* x, long ldx, int m, const float* cs, long r0, int K, long s0,
              float* y, long ldy) {
    const int Hp = n->Hp, nx = n->nx;
    for (int r = 0; r < m; ++r) {
        const float* c = cs + ((r0 + r) / K - s0) * Hp;
        const float* xr = x + r * ldx;
        float* yr = y + r * ldy;
        for (int j = 0; j < Hp; j += VW) {
            vf acc = ld(c + j);
            for (int a = 0; a < nx; ++a) acc += bc(xr[a]) * ld(n->wx + (long)a * Hp + j);
            st(yr + j, actf<ACT>(acc));
        }
    }
}

void layer1(const NetDesc* n, int act, const float* x, long ldx, int m, const float* cs, long r0, int K, long s0, float* y,
            long ldy) {
    switch (act) {
        case ACT_MISH: layer1_t<ACT_MISH>(n, x, ldx, m, cs, r0, K, s0, y, ldy); break;
        case ACT_SILU: layer1_t<ACT_SILU>(n, x, ldx, m, cs, r0, K, s0, y, ldy); break;
        case ACT_RELU: layer1_t<ACT_RELU>(n, x, ldx, m, cs, r0, K, s0, y, ldy); break;
        case ACT_GELU: layer1_t<ACT_GELU>(n, x, ldx, m, cs, r0, K, s0, y, ldy); break;
        case ACT_TANH: layer1_t<ACT_TANH>(n, x, ldx, m, cs, r0, K, s0, y, ldy); break;
        default: layer1_t<ACT_IDENTITY>(n, x, ldx, m, cs, r0, K, s0, y, ldy); break;
    }
}

// LayerNorm + activation in place on rows y [m, ldy] (hidden layer l): over the H real columns,
// two-pass mean / biased variance in float32, y = act((y - mean) rstd gamma + beta). Pad lanes have
// gamma = beta = 0, so they stay 0.
template <int ACT>
void ln_act_t(const NetDesc* n, int l, float* y, int m, long ldy) {
    const int Hp = n->Hp, H = n->H;
    const float* g = n->ln + 2L * l * Hp;
    const float* be = g + Hp;
    const float eps = n->ln_eps[l];
    static const int iota[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    vi lane;
    __builtin_memcpy(&lane, iota, sizeof(vi));
    const float invH = 1.0f / (float)H;
    for (int r = 0; r < m; ++r) {
        float* yr = y + r * ldy;
        vf s = vf{};
        for (int j = 0; j < Hp; j += VW) s += ld(yr + j);  // pad lanes are 0
        float sum = 0.0f;
        for (int i = 0; i < VW; ++i) sum += s[i];
        const float mean = sum * invH;
        const vf mv = bc(mean);
        vf q = vf{};
        for (int j = 0; j < Hp; j += VW) {
            vf d = ld(yr + j) - mv;
            vi keep = (lane + j) < H;
            d = (vf)((vi)d & keep);
            q += d * d;
        }
        float ss = 0.0f;
        for (int i = 0; i < VW; ++i) ss += q[i];
        const float rstd = 1.0f / __builtin_sqrtf(ss * invH + eps);
        const vf rv = bc(rstd);
        for (int j = 0; j < Hp; j += VW)
            st(yr + j, actf<ACT>((ld(yr + j) - mv) * rv * ld(g + j) + ld(be + j)));
    }
}

void ln_act(const NetDesc* n, int l, float* y, int m, long ldy) {
    switch (n->act) {
        case ACT_MISH: ln_act_t<ACT_MISH>(n, l, y, m, ldy); break;
        case ACT_SILU: ln_act_t<ACT_SILU>(n, l, y, m, ldy); break;
        case ACT_RELU: ln_act_t<ACT_RELU>(n, l, y, m, ldy); break;
        case ACT_GELU: ln_act_t<ACT_GELU>(n, l, y, m, ldy); break;
        case ACT_TANH: ln_act_t<ACT_TANH>(n, l, y, m, ldy); break;
        default: ln_act_t<ACT_IDENTITY>(n, l, y, m, ldy); break;
    }
}

// f[m, Ap] = net(x [m, nx]) for rows r0.. (global), with per-state first-layer bias cs (state s0 first).
void net_eval(const NetDesc* n, const float* x, long ldx, int m, const float* cs, long r0, int K, long s0,
              float* ha, float* hb, float* f) {
    const int Hp = n->Hp;
    const bool ln = n->ln != nullptr;
    const int act = ln ? (int)ACT_IDENTITY : n->act;  // with LayerNorm the activation follows the norm
    layer1(n, act, x, ldx, m, cs, r0, K, s0, ha, Hp);
    if (ln) ln_act(n, 0, ha, m, Hp);
    float* cur = ha;
    float* nxt = hb;
    for (int l = 0; l < n->depth - 1; ++l) {
        gemm_impl(cur, Hp, m, n->H, n->wh[l], Hp, Hp, n->bh[l], nxt, Hp, act);
        if (ln) ln_act(n, l + 1, nxt, m, Hp);
        float* t = cur; cur = nxt; nxt = t;
    }
    gemm_impl(cur, Hp, m, n->H, n->wo, Hp, n->Ap, n->bo, f, n->Ap, ACT_IDENTITY);
}

QK_INLINE float* take(float*& p, long n) {
    float* r = p;
    p += (n + 15) & ~15L;
    return r;
}

QK_INLINE float clampf(float v) { return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); }

// Sample rows [r0, r1) into out_rows ([r1 - r0, A], contiguous). ws: sample_ws_floats floats, 64-B aligned.
void sample_rows(const SampleArgs* a, long r0, long r1, float* ws, float* out_rows) {
    const NetDesc* n = a->net;
    const int A = n->nout, Hp = n->Hp, Ap = n->Ap, H = n->H, S = n->nc, K = a->K;
    const int m = (int)(r1 - r0);
    const long s0 = r0 / K, s1 = (r1 - 1) / K + 1;
    const int ns = (int)(s1 - s0);
    float* p = ws;
    float* cobs = take(p, (long)ns * Hp);
    float* cs = take(p, (long)ns * Hp);
    float* ha = take(p, (long)m * Hp);
    float* hb = take(p, (long)m * Hp);
    float* k1 = take(p, (long)m * Ap);
    float* k2 = take(p, (long)m * Ap);
    float* k3 = take(p, (long)m * Ap);
    float* k4 = take(p, (long)m * Ap);
    float* x = take(p, (long)m * A);
    float* xs = take(p, (long)m * A);
    float* x0t = take(p, (long)m * A);

    // observation share of layer 1, once per state: obs Wc + b1
    gemm_impl(a->obs + s0 * S, S, ns, S, n->wc, S, Hp, n->b1, cobs, Hp, ACT_IDENTITY);

    auto eval = [&](int e, const float* xin, float* f) {
        const float* tv = a->ttab + (long)e * H;
        for (int s = 0; s < ns; ++s) {
            const float* c = cobs + (long)s * Hp;
            float* d = cs + (long)s * Hp;
            for (int j = 0; j < H; ++j) d[j] = c[j] + tv[j];
            for (int j = H; j < Hp; ++j) d[j] = 0.0f;
        }
        net_eval(n, xin, A, m, cs, r0, K, s0, ha, hb, f);
    };
    const long RA = a->R * A;
    const float* x0 = a->x0 + r0 * A;
    const int mA = m * A;
    const float* c = a->coef;

    if (a->kind == KIND_CONSISTENCY) {
        const float* z = x0;
        for (int e = 0; e < a->n_evals; ++e) {
            const float* ce = c + (long)e * NCOEF_CONS;
            const float xsc = ce[0], cin = ce[1], cskip = ce[2], cout = ce[3];
            if (e == 0) {
                for (int i = 0; i < mA; ++i) x[i] = xsc * z[i];
            } else {
                const float* zk = a->step_noise + (long)(e - 1) * RA + r0 * A;
                for (int i = 0; i < mA; ++i) x[i] = out_rows[i] + xsc * zk[i];
            }
            for (int i = 0; i < mA; ++i) xs[i] = cin * x[i];
            eval(e, xs, k1);
            for (int r = 0; r < m; ++r)
                for (int j = 0; j < A; ++j) {
                    float v = cskip * x[r * A + j] + cout * k1[r * Ap + j];
                    out_rows[r * A + j] = a->clip ? clampf(v) : v;
                }
        }
        return;
    }

    if (a->kind == KIND_DDPM) {
        // Diffusion-QL's ancestral step (reference.ddpm): x0_hat from eps (or the output), clamped;
        // posterior mean; + std z except at the last step; the result clamped to +-bound
        for (int i = 0; i < mA; ++i) x[i] = x0[i];
        const bool eps = a->solver != 0;
        for (int e = 0; e < a->n_evals; ++e) {
            const float* ce = c + (long)e * NCOEF_DDPM;
            const float cr = ce[0], crm1 = ce[1], c1 = ce[2], c2 = ce[3], sd = ce[4], lo = ce[5], hi = ce[6];
            const bool last = e == a->n_evals - 1;
            const float* zk = last ? nullptr : a->step_noise + (long)e * RA + r0 * A;
            eval(e, x, k1);
            for (int r = 0; r < m; ++r)
                for (int j = 0; j < A; ++j) {
                    const float xv = x[r * A + j], f = k1[r * Ap + j];
                    float x0h = eps ? cr * xv - crm1 * f : f;
                    x0h = x0h < lo ? lo : (x0h > hi ? hi : x0h);  // (NaN stays NaN, as torch.clamp)
                    const float mean = c1 * x0h + c2 * xv;
                    x[r * A + j] = last ? mean : mean + sd * zk[r * A + j];
                }
        }
        const float bd = c[(long)(a->n_evals - 1) * NCOEF_DDPM + 7];
        for (int i = 0; i < mA; ++i) {
            const float v = x[i];
            out_rows[i] = v < -bd ? -bd : (v > bd ? bd : v);
        }
        return;
    }

    for (int i = 0; i < mA; ++i) x[i] = x0[i];
    if (a->traj)
        for (int i = 0; i < mA; ++i) a->traj[r0 * A + i] = x[i];
    const int st = a->kind == KIND_VELOCITY ? (a->solver == V_EULER ? 1 : a->solver == V_RK4 ? 4 : 2)
                                            : (a->solver == N_DPM2 ? 2 : 1);
#define QK_ROWS for (int r = 0; r < m; ++r) for (int j = 0; j < A; ++j)
#define X_ x[r * A + j]
#define XS_ xs[r * A + j]
    for (int step = 0; step < a->steps; ++step) {
        const int e0 = step * st;
        if (a->kind == KIND_VELOCITY) {
            const float h = c[0], hh = c[1], h6 = c[2];
            switch (a->solver) {
                case V_EULER:
                    eval(e0, x, k1);
                    QK_ROWS X_ = X_ + h * k1[r * Ap + j];
                    break;
                case V_MIDPOINT:
                    eval(e0, x, k1);
                    QK_ROWS XS_ = X_ + hh * k1[r * Ap + j];
                    eval(e0 + 1, xs, k2);
                    QK_ROWS X_ = X_ + h * k2[r * Ap + j];
                    break;
                case V_HEUN:
                    eval(e0, x, k1);
                    QK_ROWS XS_ = X_ + h * k1[r * Ap + j];
                    eval(e0 + 1, xs, k2);
                    QK_ROWS X_ = X_ + hh * (k1[r * Ap + j] + k2[r * Ap + j]);
                    break;
                default:  // rk4
                    eval(e0, x, k1);
                    QK_ROWS XS_ = X_ + hh * k1[r * Ap + j];
                    eval(e0 + 1, xs, k2);
                    QK_ROWS XS_ = X_ + hh * k2[r * Ap + j];
                    eval(e0 + 2, xs, k3);
                    QK_ROWS XS_ = X_ + h * k3[r * Ap + j];
                    eval(e0 + 3, xs, k4);
                    QK_ROWS {
                        const long q = r * Ap + j;
                        X_ = X_ + h6 * (((k1[q] + 2.0f * k2[q]) + 2.0f * k3[q]) + k4[q]);
                    }
                    break;
            }
        } else {
            const float* cc = c + (long)step * NCOEF_NOISE;
            const float s_t = cc[0], a_t = cc[1], cx = cc[2], c0 = cc[3];
            eval(e0, x, k1);
            QK_ROWS x0t[r * A + j] = (X_ - s_t * k1[r * Ap + j]) / a_t;
            if (a->solver == N_DPM2) {
                const float s_m = cc[4], a_m = cc[5], cxm = cc[6], c0m = cc[7];
                QK_ROWS XS_ = cxm * X_ - c0m * x0t[r * A + j];
                eval(e0 + 1, xs, k2);
                QK_ROWS {
                    const float x0m = (XS_ - s_m * k2[r * Ap + j]) / a_m;
                    const float x0 = x0t[r * A + j];
                    X_ = cx * X_ - c0 * x0 - c0 * (x0m - x0);
                }
            } else {
                QK_ROWS X_ = cx * X_ + c0 * x0t[r * A + j];
            }
        }
        if (a->traj) {
            float* tr = a->traj + (long)(step + 1) * RA + r0 * A;
            for (int i = 0; i < mA; ++i) tr[i] = x[i];
        }
    }
#undef QK_ROWS
#undef X_
#undef XS_
    for (int i = 0; i < mA; ++i) out_rows[i] = x[i];
}

}  // namespace

namespace QK_NS {

void gemm(const float* X, long ldx, int M, int K, const float* W, long ldw, int Np, const float* bias, float* Y,
          long ldy, int act) {
    gemm_impl(X, ldx, M, K, W, (int)ldw, Np, bias, Y, ldy, act);
}

// out[r, m] = scale exp(beta e[r, m] - max_m beta e[r, :]) / sum_m exp(...), rows r of M, float64
// (the weights of the energy-weighted loss; beta > 0).
void softmax_rows(const float* E, long rows, long M, double beta, double scale, double* out) {
    for (long r = 0; r < rows; ++r) {
        double* o = out + r * M;
        const double sum = exp_offsets(E + r * M, M, beta, o);
        const double f = scale / sum;
        for (long k = 0; k < M; ++k) o[k] *= f;
    }
}

void select_rows(const float* Q, long B, int K, int mode, double T, const double* U, int64_t* idx, double* scratch) {
    for (long b = 0; b < B; ++b) idx[b] = select_one(Q + b * K, K, mode, T, mode == 1 ? U[b] : 0.0, scratch);
}

void sample_chunk(const SampleArgs* a, long r0, long r1, float* ws) {
    sample_rows(a, r0, r1, ws, a->out + r0 * a->net->nout);
}

void act_chunk(const ActArgs* a, long b0, long b1, float* ws) {
    const SampleArgs* s = &a->s;
    const NetDesc* n = s->net;
    const int A = n->nout, K = s->K, S = n->nc;
    const long r0 = b0 * K, r1 = b1 * K;
    const int m = (int)(r1 - r0), ns = (int)(b1 - b0);
    float* p = ws;
    float* sws = take(p, sample_ws_floats(n, m, ns));
    float* cand = s->out ? s->out + r0 * A : take(p, (long)m * A);
    sample_rows(s, r0, r1, sws, cand);
    if (a->clip)
        for (int i = 0; i < m * A; ++i) cand[i] = clampf(cand[i]);
    // twin critic on (obs, candidate): the obs share of layer 1 once per state
    const NetDesc* qs[2] = {a->q1, a->q2};
    float* qv[2];
    const int Hq = a->q1->Hp > a->q2->Hp ? a->q1->Hp : a->q2->Hp;
    const int Aq = a->q1->Ap > a->q2->Ap ? a->q1->Ap : a->q2->Ap;
    float* cq = take(p, (long)ns * Hq);
    float* ha = take(p, (long)m * Hq);
    float* hb = take(p, (long)m * Hq);
    float* qo = take(p, (long)m * Aq);
    qv[0] = take(p, m);
    qv[1] = take(p, m);
    double* esc = reinterpret_cast<double*>(take(p, 2L * (K + VD)));  // (take keeps 64-byte alignment)
    for (int h = 0; h < 2; ++h) {
        const NetDesc* q = qs[h];
        gemm_impl(s->obs + b0 * S, S, ns, S, q->wc, S, q->Hp, q->b1, cq, q->Hp, ACT_IDENTITY);
        net_eval(q, cand, A, m, cq, r0, K, b0, ha, hb, qo);
        for (int r = 0; r < m; ++r) qv[h][r] = qo[(long)r * q->Ap];
    }
    for (long b = b0; b < b1; ++b) {
        const int off = (int)((b - b0) * K);
        float* q = qv[0] + off;
        const float* q2 = qv[1] + off;
        bool finite = true;
        for (int k = 0; k < K; ++k) {
            float u = q[k], v = q2[k];
            q[k] = (u != u || u < v) ? u : v;  // torch.minimum (NaN propagates)
            finite = finite && __builtin_isfinite(q[k]);
        }
        if (a->q_out)
            for (int k = 0; k < K; ++k) a->q_out[b * K + k] = q[k];
        // a NaN / inf score cannot be ranked: index -1 and a NaN action, which the caller reports
        const int idx = finite ? select_one(q, K, a->mode, a->temperature, a->mode == 1 ? a->uniform[b] : 0.0, esc) : -1;
        if (a->idx_out) a->idx_out[b] = idx;
        for (int j = 0; j < A; ++j) a->act_out[b * A + j] = idx >= 0 ? cand[(off + idx) * A + j] : __builtin_nanf("");
    }
}

double fma_peak_flops(long iters) {
    // NACC independent chains hide the FMA latency; fewer with 16 vector registers (AVX2, SSE,
    // which would spill 16 accumulators + 2 operands). 2 * VW * NACC flops per iteration.
    constexpr int NACC = VW >= 16 ? 16 : 12;
    // opaque start values, so that the compiler cannot fold the recurrence
    volatile float v0 = 0.5f, vm = 0.999f, va = 0.0005f;
    vf acc[NACC];
    for (int i = 0; i < NACC; ++i) acc[i] = bc(v0 + 0.001f * i);
    vf mlt = bc(vm), add = bc(va);
    for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 16
        for (int i = 0; i < NACC; ++i) acc[i] = acc[i] * mlt + add;
    }
    vf s = vf{};
    for (int i = 0; i < NACC; ++i) s += acc[i];
    volatile float sink = 0.0f;
    for (int i = 0; i < VW; ++i) sink = sink + s[i];
    (void)sink;
    return 2.0 * VW * NACC * (double)iters;
}

}  // namespace QK_NS
