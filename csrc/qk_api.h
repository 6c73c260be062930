// Plain-C interface between the dispatcher (bindings.cpp, built with the default flags) and the
// compute kernels (kernels_impl.h, compiled once per instruction set in isa_*.cpp).
//
// Nothing here instantiates a C++ standard-library template: the ISA translation units are built
// with -mavx2 / -mavx512f, and an inline library function emitted there could be picked by the
// linker for the whole module and then run on a CPU without that instruction set.
#pragma once
#include <stdint.h>

namespace qk {

// Padding of every packed width (hidden H, output width): a multiple of the widest vector (16 floats).
static const int PAD = 16;
static const int PANEL = 32;
static inline int round_up(int n, int m) { return (n + m - 1) / m * m; }

enum Act { ACT_IDENTITY = 0, ACT_MISH = 1, ACT_SILU = 2, ACT_RELU = 3, ACT_GELU = 4, ACT_TANH = 5 };

// An MLP whose first layer is split into a per-row input part x [nx] and a per-state condition part
// c [nc] (the observation):
//     h_1 = act(x Wx + (c Wc + b1) [+ time share])      Wx [nx, Hp] (row-major), Wc [nc, Hp]
//     h_k = act(h_{k-1} Wh_k + bh_k)                      Wh_k [Hp, Hp], k = 2..depth
//     y   = h_depth Wo + bo                              Wo [Hp, Ap]
// Wc, Wh_k and Wo are transposed, zero-padded and stored in column panels of PANEL floats (see
// pack_panels): panel p = columns [32p, 32p + w) as a contiguous [rows, w] block.
// Pad rows/columns are zero, and every activation maps 0 to 0, so the pad lanes stay 0.
// Optional LayerNorm (critic heads of DoubleCritic(layer_norm=True)): when ln is not null, every
// hidden layer k = 1..depth is h_k = act(LN_k(pre-activation)), LN_k over the H real columns with
// eps ln_eps[k-1], biased variance, then gamma/beta: ln + 2 (k-1) Hp holds gamma [Hp], then beta
// [Hp] (pad lanes zero, so the pad lanes of h_k stay 0).
struct NetDesc {
    int nx, nc, H, Hp, nout, Ap, depth, act;
    const float* wx;
    const float* wc;
    const float* b1;
    const float* const* wh;  // depth - 1 pointers
    const float* const* bh;
    const float* wo;
    const float* bo;
    const float* ln;      // [depth, 2, Hp] gamma, beta per hidden layer, or null (no LayerNorm)
    const float* ln_eps;  // [depth] or null
};

enum Kind { KIND_VELOCITY = 0, KIND_NOISE = 1, KIND_CONSISTENCY = 2, KIND_DDPM = 3 };
enum VelSolver { V_EULER = 0, V_MIDPOINT = 1, V_HEUN = 2, V_RK4 = 3 };
enum NoiseSolver { N_DDIM = 0, N_DPM2 = 1 };

// Sampling R = B*K rows (row r belongs to state r / K). Coefficient layouts (float32, computed in
// Python in float64 exactly as the reference does, then rounded as torch rounds a Python scalar):
//   velocity:    coef = [h, 0.5 h, h / 6]
//   noise:       coef[step] = [s_t, a_t, cx, c0, s_m, a_m, cxm, c0m]   (NCOEF_NOISE per step)
//   consistency: coef[eval] = [x_scale, c_in, c_skip, c_out]           (NCOEF_CONS per evaluation)
//   ddpm:        coef[eval] = [c_recip, c_recipm1, c1, c2, std, lo, hi, bound]   (NCOEF_DDPM; eval e is
//                step i = steps-1-e; std is 0 at the last step; [lo, hi] the x0 clamp (+-inf: none);
//                bound the clamp of the result (inf: none)); solver = 1 predict eps, 0 predict x0;
//                step_noise [steps - 1, R, A] for the steps i = steps-1 .. 1
static const int NCOEF_NOISE = 8;
static const int NCOEF_CONS = 4;
static const int NCOEF_DDPM = 8;
struct SampleArgs {
    const NetDesc* net;
    const float* obs;        // [B, S]
    const float* x0;         // [R, A]
    long R;
    int K;
    int kind, solver, steps, n_evals;
    const float* ttab;       // [n_evals, H] time share W1_t e(t) per network evaluation
    const float* coef;
    const float* step_noise; // consistency / ddpm: [n_evals - 1, R, A] or null
    int clip;                // consistency: clamp every denoised output to [-1, 1]
    float* out;              // [R, A]
    float* traj;             // [steps + 1, R, A] or null
};

struct ActArgs {
    SampleArgs s;            // s.out may be null (candidates are kept in the workspace)
    const NetDesc* q1;
    const NetDesc* q2;
    int clip;                // clamp candidates to [-1, 1] before scoring
    int mode;                // 0 argmax, 1 softmax
    double temperature;
    const double* uniform;   // [B] (softmax)
    float* act_out;          // [B, A]
    float* q_out;            // [R] min(Q1, Q2) of every candidate, or null
    int64_t* idx_out;        // [B] chosen index (-1: a candidate's min(Q1, Q2) is NaN / inf), or null
};

// Floats of workspace one chunk of m rows covering ns states needs.
static inline long sample_ws_floats(const NetDesc* n, long m, long ns) {
    long A = n->nout, Hp = n->Hp, Ap = n->Ap;
    return 2 * ns * Hp + 2 * m * Hp + 5 * m * Ap + 3 * m * A + 64;
}
static inline long act_ws_floats(const NetDesc* n, const NetDesc* q, long m, long ns) {
    long a = sample_ws_floats(n, m, ns);
    long Hq = q->Hp;
    // + the softmax scratch: K + 8 doubles (K = m / ns candidates per state)
    return a + ns * Hq + 2 * m * Hq + m * q->Ap + 3 * m + m * n->nout + 2 * (m / (ns > 0 ? ns : 1) + 8) + 80;
}

}  // namespace qk

// Entry points of one instruction-set variant.
#define QK_DECLARE_VARIANT(NS)                                                                \
    namespace NS {                                                                            \
    void sample_chunk(const qk::SampleArgs* a, long r0, long r1, float* ws);                  \
    void act_chunk(const qk::ActArgs* a, long b0, long b1, float* ws);                         \
    double fma_peak_flops(long iters);                                                        \
    void gemm(const float* X, long ldx, int M, int K, const float* W, long ldw, int Np,       \
              const float* bias, float* Y, long ldy, int act);                                \
    void select_rows(const float* Q, long B, int K, int mode, double T, const double* U,      \
                     int64_t* idx, double* scratch);                                          \
    void softmax_rows(const float* E, long rows, long M, double beta, double scale, double* out); \
    }

QK_DECLARE_VARIANT(qk_base)
QK_DECLARE_VARIANT(qk_avx2)
QK_DECLARE_VARIANT(qk_avx512)
