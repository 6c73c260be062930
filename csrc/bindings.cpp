// qipo_kernels._C: the C++ CPU backend. Takes contiguous float32 numpy buffers (a CPU tensor's
// .numpy() shares its memory); no torch headers, so the build needs only pybind11 and a compiler.
//
// This file (built with the default flags) validates buffers, packs weights, picks the
// instruction-set variant of the kernels at run time and splits large batches over std::threads.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "qk_api.h"

namespace py = pybind11;
using qk::NetDesc;

namespace {

// ---------------------------------------------------------------- instruction-set variants
struct Variant {
    const char* name;
    void (*sample_chunk)(const qk::SampleArgs*, long, long, float*);
    void (*act_chunk)(const qk::ActArgs*, long, long, float*);
    double (*fma_peak)(long);
    void (*gemm)(const float*, long, int, int, const float*, long, int, const float*, float*, long, int);
};

#define QK_VARIANT(NS, NAME) Variant{NAME, NS::sample_chunk, NS::act_chunk, NS::fma_peak_flops, NS::gemm}

bool cpu_has(const std::string& isa) {
    if (isa == "base") return true;
#if defined(QK_BUILD_X86_VARIANTS)
    __builtin_cpu_init();
    if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (isa == "avx512")
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("fma") && __builtin_cpu_supports("avx2");
#endif
    return false;
}

Variant variant_for(const std::string& isa) {
#if defined(QK_BUILD_X86_VARIANTS)
    if (isa == "avx512") return QK_VARIANT(qk_avx512, "avx512");
    if (isa == "avx2") return QK_VARIANT(qk_avx2, "avx2");
#endif
    return QK_VARIANT(qk_base, "base");
}

std::vector<std::string> available_isas() {
    std::vector<std::string> out;
    for (const char* n : {"avx512", "avx2", "base"})
        if (cpu_has(n)) out.push_back(n);
    return out;
}

Variant g_var = variant_for("base");

void set_isa(const std::string& isa) {
    if (isa != "base" && isa != "avx2" && isa != "avx512")
        throw py::value_error("isa must be one of 'avx512', 'avx2', 'base', got '" + isa + "'");
    if (!cpu_has(isa))
        throw py::value_error("this CPU (or this build) does not support isa '" + isa + "'");
    g_var = variant_for(isa);
}

// ---------------------------------------------------------------- buffer checks
std::string shape_str(const py::array& a) {
    std::string s = "[";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
    return s + "]";
}

// Check a float32 (or float64 / int64) C-contiguous array with the given shape (-1 = any).
template <class T>
const T* check(const py::handle& h, const char* name, std::vector<long> shape, bool writable = false) {
    if (!py::isinstance<py::array>(h))
        throw py::type_error(std::string(name) + " must be a numpy array, got " +
                             std::string(py::str(py::type::of(h).attr("__name__"))));
    py::array a = py::reinterpret_borrow<py::array>(h);
    if (!a.dtype().is(py::dtype::of<T>()))
        throw py::type_error(std::string(name) + " must have dtype " + std::string(py::str(py::dtype::of<T>())) +
                             ", got " + std::string(py::str(a.dtype())));
    if (!(a.flags() & py::array::c_style))
        throw py::value_error(std::string(name) + " must be C-contiguous");
    if (writable && !a.writeable()) throw py::value_error(std::string(name) + " must be writable");
    bool ok = a.ndim() == (py::ssize_t)shape.size();
    for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || a.shape(i) == shape[i];
    if (!ok) {
        std::string want = "[";
        for (size_t i = 0; i < shape.size(); ++i)
            want += (i ? ", " : "") + (shape[i] < 0 ? std::string("*") : std::to_string(shape[i]));
        throw py::value_error(std::string(name) + " must have shape " + want + "], got " + shape_str(a));
    }
    return static_cast<const T*>(a.data());
}
template <class T>
T* check_out(const py::handle& h, const char* name, std::vector<long> shape) {
    return const_cast<T*>(check<T>(h, name, shape, true));
}
long dim(const py::handle& h, int i) { return (long)py::reinterpret_borrow<py::array>(h).shape(i); }

// 64-byte aligned float buffer
struct AlignedBuf {
    std::vector<float> v;
    float* p = nullptr;
    long n = 0;
    float* get(long need) {
        if (need > n) {
            v.assign(need + 16, 0.0f);
            uintptr_t u = reinterpret_cast<uintptr_t>(v.data());
            p = v.data() + ((64 - (u & 63)) & 63) / sizeof(float);
            n = need;
        }
        return p;
    }
};

// ---------------------------------------------------------------- threads
// fn(i0, i1, ws) over [0, n) in chunks; chunks are handed out dynamically. The calling thread
// works too. A single chunk (one state, a small batch) never starts a thread.
template <class F>
void run_chunks(long n, long chunk, int n_threads, long ws_floats, F&& fn) {
    if (n <= 0) return;
    const long n_chunks = (n + chunk - 1) / chunk;
    const int nt = (int)std::max(1L, std::min<long>(n_threads, n_chunks));
    if (nt == 1) {
        static thread_local AlignedBuf buf;
        float* ws = buf.get(ws_floats);
        for (long c = 0; c < n_chunks; ++c) fn(c * chunk, std::min(n, (c + 1) * chunk), ws);
        return;
    }
    std::atomic<long> next{0};
    std::exception_ptr err;
    std::mutex mu;
    auto worker = [&]() {
        try {
            AlignedBuf buf;
            float* ws = buf.get(ws_floats);
            for (;;) {
                long c = next.fetch_add(1);
                if (c >= n_chunks) break;
                fn(c * chunk, std::min(n, (c + 1) * chunk), ws);
            }
        } catch (...) {
            std::lock_guard<std::mutex> g(mu);
            if (!err) err = std::current_exception();
            next.store(n_chunks);
        }
    };
    std::vector<std::thread> ts;
    ts.reserve(nt - 1);
    for (int i = 1; i < nt; ++i) ts.emplace_back(worker);
    worker();
    for (auto& t : ts) t.join();
    if (err) std::rethrow_exception(err);
}

// ---------------------------------------------------------------- packed networks
const char* ACT_NAMES[] = {"identity", "mish", "silu", "relu", "gelu", "tanh"};

int act_id(const std::string& s) {
    for (int i = 1; i < 6; ++i)
        if (s == ACT_NAMES[i]) return i;
    throw py::value_error("activation must be one of ('mish', 'silu', 'relu', 'gelu', 'tanh'), got '" + s + "'");
}

// Weights of one MLP (policy network or one critic head), transposed and zero-padded to multiples of 16.
struct Pack {
    NetDesc d{};
    AlignedBuf store;
    std::vector<const float*> wh, bh;

    Pack(py::array wx, py::array wc, py::array b1, py::list hidden_w, py::list hidden_b, py::array wo, py::array bo,
         const std::string& activation, py::object ln_w, py::object ln_b, py::object ln_eps) {
        const long H = dim(wx, 0);
        if (py::reinterpret_borrow<py::array>(wx).ndim() != 2) throw py::value_error("wx must be [H, nx]");
        const long nx = dim(wx, 1);
        check<float>(wc, "wc", {H, -1});
        const long nc = dim(wc, 1);
        check<float>(wx, "wx", {H, nx});
        check<float>(b1, "b1", {H});
        if (hidden_w.size() != hidden_b.size()) throw py::value_error("hidden_w and hidden_b must have equal length");
        check<float>(wo, "wo", {-1, H});
        const long nout = dim(wo, 0);
        check<float>(bo, "bo", {nout});
        if (H < 1 || nx < 1 || nc < 1 || nout < 1) throw py::value_error("every packed dimension must be >= 1");
        const int Hp = qk::round_up((int)H, qk::PAD), Ap = qk::round_up((int)nout, qk::PAD);
        const long depth = (long)hidden_w.size() + 1;
        // optional LayerNorm after every hidden Linear: ln_w, ln_b lists of depth [H] arrays, ln_eps depth floats
        const bool has_ln = !ln_w.is_none() || !ln_b.is_none() || !ln_eps.is_none();
        std::vector<double> eps;
        if (has_ln) {
            if (ln_w.is_none() || ln_b.is_none() || ln_eps.is_none())
                throw py::value_error("ln_w, ln_b and ln_eps must be given together");
            py::list lw = ln_w.cast<py::list>(), lb = ln_b.cast<py::list>(), le = ln_eps.cast<py::list>();
            if ((long)lw.size() != depth || (long)lb.size() != depth || (long)le.size() != depth)
                throw py::value_error("ln_w, ln_b and ln_eps must have one entry per hidden layer (" +
                                      std::to_string(depth) + ")");
            for (long l = 0; l < depth; ++l) {
                const double e = le[l].cast<double>();
                if (!(e >= 0.0) || !std::isfinite(e)) throw py::value_error("ln_eps must be finite and >= 0");
                eps.push_back(e);
            }
        }
        const long ln_floats = has_ln ? depth * 2L * Hp + depth + 16 : 0;
        const long total = nx * Hp + nc * Hp + Hp + (depth - 1) * ((long)Hp * Hp + Hp) + (long)Hp * Ap + Ap + ln_floats;
        float* p = store.get(total + 16 * (4 + 2 * depth));
        std::memset(p, 0, sizeof(float) * (total + 16 * (4 + 2 * depth)));
        auto take = [&](long n) { float* r = p; p += (n + 15) / 16 * 16; return r; };
        // transpose [out, in] (torch layout) into [in, out_padded] row-major (ld = padded width)
        auto put_t = [](float* dst, const float* src, long out, long in, long ld) {
            for (long o = 0; o < out; ++o)
                for (long i = 0; i < in; ++i) dst[i * ld + o] = src[o * in + i];
        };
        // transpose [out, in] into column panels: panel p (columns [32p, 32p + w)) is a [in, w] block
        // (kp >= in rows per panel, the rows past in stay zero)
        auto put_p = [](float* dst, const float* src, long out, long in, long kp, long np) {
            for (long o = 0; o < out; ++o) {
                const long p0 = o / qk::PANEL * qk::PANEL, w = std::min<long>(qk::PANEL, np - p0);
                for (long i = 0; i < in; ++i) dst[p0 * kp + i * w + (o - p0)] = src[o * in + i];
            }
        };
        float* pwx = take(nx * Hp);
        put_t(pwx, check<float>(wx, "wx", {H, nx}), H, nx, Hp);
        float* pwc = take(nc * Hp);
        put_p(pwc, check<float>(wc, "wc", {H, nc}), H, nc, nc, Hp);
        float* pb1 = take(Hp);
        std::memcpy(pb1, check<float>(b1, "b1", {H}), sizeof(float) * H);
        for (long l = 0; l < depth - 1; ++l) {
            std::string wn = "hidden_w[" + std::to_string(l) + "]", bn = "hidden_b[" + std::to_string(l) + "]";
            float* w = take((long)Hp * Hp);
            put_p(w, check<float>(hidden_w[l], wn.c_str(), {H, H}), H, H, Hp, Hp);
            float* b = take(Hp);
            std::memcpy(b, check<float>(hidden_b[l], bn.c_str(), {H}), sizeof(float) * H);
            wh.push_back(w);
            bh.push_back(b);
        }
        float* pwo = take((long)Hp * Ap);
        put_p(pwo, check<float>(wo, "wo", {nout, H}), nout, H, Hp, Ap);
        float* pbo = take(Ap);
        std::memcpy(pbo, check<float>(bo, "bo", {nout}), sizeof(float) * nout);
        if (has_ln) {
            py::list lw = ln_w.cast<py::list>(), lb = ln_b.cast<py::list>();
            float* pln = take(depth * 2L * Hp);
            float* peps = take(depth);
            for (long l = 0; l < depth; ++l) {
                std::string wn = "ln_w[" + std::to_string(l) + "]", bn = "ln_b[" + std::to_string(l) + "]";
                std::memcpy(pln + 2L * l * Hp, check<float>(lw[l], wn.c_str(), {H}), sizeof(float) * H);
                std::memcpy(pln + 2L * l * Hp + Hp, check<float>(lb[l], bn.c_str(), {H}), sizeof(float) * H);
                peps[l] = (float)eps[l];
            }
            d.ln = pln;
            d.ln_eps = peps;
        }
        d.nx = (int)nx; d.nc = (int)nc; d.H = (int)H; d.Hp = Hp; d.nout = (int)nout; d.Ap = Ap;
        d.depth = (int)depth; d.act = act_id(activation);
        d.wx = pwx; d.wc = pwc; d.b1 = pb1; d.wh = wh.data(); d.bh = bh.data(); d.wo = pwo; d.bo = pbo;
    }
};

// ---------------------------------------------------------------- sampling
struct SamplerIn {
    qk::SampleArgs a{};
};


// Fill SampleArgs from the Python arguments, checking every buffer. A = the pack's output width.
qk::SampleArgs make_sample_args(const Pack& net, py::handle obs, py::handle x0, int K, const std::string& kind,
                                int solver, int steps, py::handle ttab, py::handle coef, py::handle step_noise,
                                bool clip) {
    qk::SampleArgs a{};
    const NetDesc& d = net.d;
    if (net.d.nx != net.d.nout)
        throw py::value_error("the policy pack must have as many inputs x as outputs (the action dimension)");
    const long A = d.nout, S = d.nc;
    if (K < 1) throw py::value_error("K must be >= 1");
    a.obs = check<float>(obs, "obs", {-1, S});
    const long B = dim(obs, 0);
    a.x0 = check<float>(x0, "x0", {B * K, A});
    a.R = B * K;
    a.K = K;
    if (kind == "velocity") {
        a.kind = qk::KIND_VELOCITY;
        if (solver < 0 || solver > 3) throw py::value_error("velocity solver id must be 0..3");
    } else if (kind == "noise") {
        a.kind = qk::KIND_NOISE;
        if (solver < 0 || solver > 1) throw py::value_error("noise solver id must be 0 (ddim/dpm1) or 1 (dpm2)");
    } else if (kind == "consistency") {
        a.kind = qk::KIND_CONSISTENCY;
    } else {
        throw py::value_error("kind must be 'velocity', 'noise' or 'consistency', got '" + kind + "'");
    }
    a.solver = solver;
    if (steps < 1) throw py::value_error("steps must be >= 1");
    a.steps = steps;
    int n_evals;
    if (a.kind == qk::KIND_VELOCITY) {
        n_evals = steps * (solver == qk::V_EULER ? 1 : solver == qk::V_RK4 ? 4 : 2);
        a.coef = check<float>(coef, "coef", {3});
    } else if (a.kind == qk::KIND_NOISE) {
        n_evals = steps * (solver == qk::N_DPM2 ? 2 : 1);
        a.coef = check<float>(coef, "coef", {steps, qk::NCOEF_NOISE});
    } else {
        n_evals = steps;  // consistency: steps = number of denoiser evaluations
        a.coef = check<float>(coef, "coef", {steps, qk::NCOEF_CONS});
        if (steps > 1) a.step_noise = check<float>(step_noise, "step_noise", {steps - 1, B * K, A});
    }
    a.n_evals = n_evals;
    a.ttab = check<float>(ttab, "ttab", {n_evals, d.H});
    a.clip = clip ? 1 : 0;
    a.net = &net.d;
    return a;
}

const long CHUNK_ROWS = 64;

void sample(const Pack& net, py::handle obs, py::handle x0, int K, const std::string& kind, int solver, int steps,
            py::handle ttab, py::handle coef, py::handle step_noise, bool clip, py::handle out, py::handle traj,
            int n_threads, long chunk_rows) {
    qk::SampleArgs a = make_sample_args(net, obs, x0, K, kind, solver, steps, ttab, coef, step_noise, clip);
    const long A = net.d.nout;
    a.out = check_out<float>(out, "out", {a.R, A});
    if (!traj.is_none()) {
        if (a.kind == qk::KIND_CONSISTENCY) throw py::value_error("traj is only for the ODE solvers");
        a.traj = check_out<float>(traj, "traj", {steps + 1, a.R, A});
    }
    if (chunk_rows <= 0) chunk_rows = CHUNK_ROWS;
    const long ws = qk::sample_ws_floats(&net.d, chunk_rows, chunk_rows) + 256;
    const Variant v = g_var;
    py::gil_scoped_release nogil;
    run_chunks(a.R, chunk_rows, n_threads, ws, [&](long r0, long r1, float* w) { v.sample_chunk(&a, r0, r1, w); });
}

void act(const Pack& net, const Pack& q1, const Pack& q2, py::handle obs, py::handle x0, int K,
         const std::string& kind, int solver, int steps, py::handle ttab, py::handle coef, py::handle step_noise,
         bool clip, const std::string& mode, double temperature, py::handle uniform, py::handle act_out,
         py::handle q_out, py::handle idx_out, py::handle cand_out, int n_threads, long chunk_rows) {
    qk::ActArgs a{};
    a.s = make_sample_args(net, obs, x0, K, kind, solver, steps, ttab, coef, step_noise,
                           kind == "consistency");
    const long A = net.d.nout, S = net.d.nc, B = a.s.R / K;
    for (const Pack* q : {&q1, &q2}) {
        if (q->d.nout != 1) throw py::value_error("critic heads must have one output");
        if (q->d.nx != A || q->d.nc != S)
            throw py::value_error("critic heads must take the policy's obs_dim and act_dim");
    }
    a.q1 = &q1.d;
    a.q2 = &q2.d;
    a.clip = clip ? 1 : 0;
    if (mode == "argmax") {
        a.mode = 0;
    } else if (mode == "softmax") {
        a.mode = 1;
        if (!(temperature > 0.0) || !std::isfinite(temperature))
            throw py::value_error("temperature must be > 0 and finite");
        a.uniform = check<double>(uniform, "uniform", {B});
        for (long b = 0; b < B; ++b)
            if (!(a.uniform[b] >= 0.0 && a.uniform[b] < 1.0)) throw py::value_error("uniform must lie in [0, 1)");
    } else {
        throw py::value_error("mode must be 'argmax' or 'softmax', got '" + mode + "'");
    }
    a.temperature = temperature;
    a.act_out = check_out<float>(act_out, "act_out", {B, A});
    if (!q_out.is_none()) a.q_out = check_out<float>(q_out, "q_out", {B * K});
    if (!idx_out.is_none()) a.idx_out = check_out<int64_t>(idx_out, "idx_out", {B});
    if (!cand_out.is_none()) a.s.out = check_out<float>(cand_out, "cand_out", {B * K, A});
    if (chunk_rows <= 0) chunk_rows = CHUNK_ROWS;
    const long states = std::max(1L, chunk_rows / K);
    const long m = states * K;
    const NetDesc* wide = q1.d.Hp >= q2.d.Hp ? &q1.d : &q2.d;
    const long ws = qk::act_ws_floats(&net.d, wide, m, states) + 512;
    const Variant v = g_var;
    py::gil_scoped_release nogil;
    run_chunks(B, states, n_threads, ws, [&](long b0, long b1, float* w) { v.act_chunk(&a, b0, b1, w); });
}

// ---------------------------------------------------------------- weighted flow-matching loss
// loss = sum_{b,m} wn[b,m] lambda[b,m] |pred - tgt|^2, tgt = target (or target - noise when given),
// wn: 1/(B M) without energy; softmax_m(beta energy)/B ("support"); softmax_{b,m}(beta energy) ("batch").
// grad = 2 (pred - tgt) wn lambda. Accumulated in double.
double fm_loss(py::handle pred, py::handle target, py::handle noise, py::handle energy, double beta,
               const std::string& normalize, py::handle pair_weight, py::handle grad, py::handle sq_out,
               py::handle w_out, int n_threads) {
    const float* P = check<float>(pred, "pred", {-1, -1, -1});
    const long B = dim(pred, 0), M = dim(pred, 1), D = dim(pred, 2);
    if (B < 1 || M < 1 || D < 1) throw py::value_error("pred must be non-empty [B, M, D]");
    const float* T = check<float>(target, "target", {B, M, D});
    const float* Z = noise.is_none() ? nullptr : check<float>(noise, "noise", {B, M, D});
    const float* E = energy.is_none() ? nullptr : check<float>(energy, "energy", {B, M});
    const float* L = pair_weight.is_none() ? nullptr : check<float>(pair_weight, "pair_weight", {B, M});
    float* G = grad.is_none() ? nullptr : check_out<float>(grad, "grad", {B, M, D});
    float* SQ = sq_out.is_none() ? nullptr : check_out<float>(sq_out, "sq_out", {B, M});
    float* WO = w_out.is_none() ? nullptr : check_out<float>(w_out, "w_out", {B, M});
    int norm;
    if (normalize == "support") norm = 0;
    else if (normalize == "batch") norm = 1;
    else throw py::value_error("normalize must be 'support' or 'batch', got '" + normalize + "'");
    if (E && !(beta > 0.0 && std::isfinite(beta))) throw py::value_error("beta must be > 0 and finite");
    const long n = B * M;
    std::vector<double> wn(n), part(B, 0.0);
    {
        py::gil_scoped_release nogil;
        if (!E) {
            std::fill(wn.begin(), wn.end(), 1.0 / (double)n);
        } else if (norm == 0) {
            for (long b = 0; b < B; ++b) {
                double mx = -INFINITY, s = 0.0;
                for (long m = 0; m < M; ++m) mx = std::max(mx, beta * (double)E[b * M + m]);
                for (long m = 0; m < M; ++m) s += (wn[b * M + m] = std::exp(beta * (double)E[b * M + m] - mx));
                for (long m = 0; m < M; ++m) wn[b * M + m] /= s * (double)B;
            }
        } else {
            double mx = -INFINITY, s = 0.0;
            for (long i = 0; i < n; ++i) mx = std::max(mx, beta * (double)E[i]);
            for (long i = 0; i < n; ++i) s += (wn[i] = std::exp(beta * (double)E[i] - mx));
            for (long i = 0; i < n; ++i) wn[i] /= s;
        }
        for (long i = 0; i < n; ++i) {
            if (!std::isfinite(wn[i])) throw std::runtime_error("non-finite loss weight");
        }
        const long per_b = M * D;
        const long chunk = std::max(1L, (1L << 16) / std::max(1L, per_b));
        run_chunks(B, chunk, (n * D >= (1L << 18)) ? n_threads : 1, 16, [&](long b0, long b1, float*) {
            for (long b = b0; b < b1; ++b) {
                double acc = 0.0;
                for (long m = 0; m < M; ++m) {
                    const long i = b * M + m, o = i * D;
                    float s = 0.0f;
                    for (long d = 0; d < D; ++d) {
                        const float t = Z ? T[o + d] - Z[o + d] : T[o + d];
                        const float df = P[o + d] - t;
                        s += df * df;
                    }
                    const double lam = L ? (double)L[i] : 1.0;
                    const double c = wn[i] * lam;
                    acc += c * (double)s;
                    if (SQ) SQ[i] = s;
                    if (WO) WO[i] = (float)wn[i];
                    if (G) {
                        const float g = (float)(2.0 * c);
                        for (long d = 0; d < D; ++d) {
                            const float t = Z ? T[o + d] - Z[o + d] : T[o + d];
                            G[o + d] = g * (P[o + d] - t);
                        }
                    }
                }
                part[b] = acc;
            }
        });
    }
    double loss = 0.0;
    for (long b = 0; b < B; ++b) loss += part[b];
    return loss;
}

// (sum of ._version, FNV-1a hash of data_ptr()) over the tensors d[name] for (d, name) in slots:
// the cache key of a packed module, computed in one call (it runs on every sampler call).
py::tuple fingerprint(py::list slots) {
    long long versions = 0;
    uint64_t h = 1469598103934665603ULL;
    // interned once and never released (a static py::object would be released after finalization)
    static PyObject* version_attr = PyUnicode_InternFromString("_version");
    static PyObject* ptr_attr = PyUnicode_InternFromString("data_ptr");
    for (py::handle s : slots) {
        if (!PyTuple_Check(s.ptr()) || PyTuple_GET_SIZE(s.ptr()) != 2 || !PyDict_Check(PyTuple_GET_ITEM(s.ptr(), 0)))
            throw py::type_error("slots must be a list of (dict, name) tuples");
        PyObject* d = PyTuple_GET_ITEM(s.ptr(), 0);
        PyObject* n = PyTuple_GET_ITEM(s.ptr(), 1);
        PyObject* t = PyDict_GetItemWithError(d, n);
        if (!t) {
            if (PyErr_Occurred()) throw py::error_already_set();
            throw py::key_error("missing tensor");
        }
        py::handle th(t);
        versions += th.attr(py::handle(version_attr)).cast<long long>();
        const uint64_t p = th.attr(py::handle(ptr_attr))().cast<uint64_t>();
        h = (h ^ p) * 1099511628211ULL;
    }
    return py::make_tuple(versions, h);
}

double fma_peak(double seconds) {
    const Variant v = g_var;
    py::gil_scoped_release nogil;
    long iters = 1 << 16;
    double best = 0.0;
    auto t0 = std::chrono::steady_clock::now();
    for (;;) {
        auto a = std::chrono::steady_clock::now();
        double flops = v.fma_peak(iters);
        auto b = std::chrono::steady_clock::now();
        double dt = std::chrono::duration<double>(b - a).count();
        if (dt < 1e-3) { iters *= 4; continue; }
        best = std::max(best, flops / dt);
        if (std::chrono::duration<double>(b - t0).count() > seconds) break;
    }
    return best;
}

void gemm(py::handle x, const Pack& net, py::handle y) {
    // y = act(x W_2 + b_2) with the pack's first hidden layer (tests / benchmarks of the GEMM alone)
    if (net.d.depth < 2) throw py::value_error("the pack has no hidden layer");
    const long H = net.d.H, Hp = net.d.Hp;
    const float* X = check<float>(x, "x", {-1, Hp});
    const long M = dim(x, 0);
    float* Y = check_out<float>(y, "y", {M, Hp});
    const Variant v = g_var;
    py::gil_scoped_release nogil;
    v.gemm(X, Hp, (int)M, (int)H, net.d.wh[0], Hp, (int)Hp, net.d.bh[0], Y, Hp, net.d.act);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "qipo_kernels C++ CPU kernels (float32 numpy buffers in, results written into given buffers)";
    {
        const char* env = std::getenv("QIPO_KERNELS_ISA");
        std::string want = env && *env ? env : "";
        auto isas = available_isas();
        if (!want.empty() && std::find(isas.begin(), isas.end(), want) != isas.end()) g_var = variant_for(want);
        else g_var = variant_for(isas.front());
    }
    py::class_<Pack, std::shared_ptr<Pack>>(m, "Pack")
        .def(py::init<py::array, py::array, py::array, py::list, py::list, py::array, py::array, const std::string&,
                      py::object, py::object, py::object>(),
             py::arg("wx"), py::arg("wc"), py::arg("b1"), py::arg("hidden_w"), py::arg("hidden_b"), py::arg("wo"),
             py::arg("bo"), py::arg("activation"), py::arg("ln_w") = py::none(), py::arg("ln_b") = py::none(),
             py::arg("ln_eps") = py::none(),
             "Pack an MLP: first layer split into x part wx [H, nx] and condition part wc [H, nc] (torch "
             "[out, in] layout), bias b1 [H], hidden layers [H, H] + [H], output wo [nout, H] + bo [nout]; "
             "optionally a LayerNorm after every hidden Linear (before the activation): ln_w, ln_b lists of "
             "depth [H] arrays (gamma, beta) and ln_eps a list of depth floats.")
        .def_property_readonly("layer_norm", [](const Pack& p) { return p.d.ln != nullptr; })
        .def_property_readonly("hidden", [](const Pack& p) { return p.d.H; })
        .def_property_readonly("hidden_padded", [](const Pack& p) { return p.d.Hp; })
        .def_property_readonly("depth", [](const Pack& p) { return p.d.depth; })
        .def_property_readonly("nx", [](const Pack& p) { return p.d.nx; })
        .def_property_readonly("nc", [](const Pack& p) { return p.d.nc; })
        .def_property_readonly("nout", [](const Pack& p) { return p.d.nout; })
        .def_property_readonly("activation", [](const Pack& p) { return std::string(ACT_NAMES[p.d.act]); });
    m.def("sample", &sample, py::arg("net"), py::arg("obs"), py::arg("x0"), py::arg("K"), py::arg("kind"),
          py::arg("solver"), py::arg("steps"), py::arg("ttab"), py::arg("coef"), py::arg("step_noise"),
          py::arg("clip"), py::arg("out"), py::arg("traj"), py::arg("n_threads") = 1, py::arg("chunk_rows") = 0,
          "ODE or consistency sampling of R = B*K rows into out [R, A] (and traj [steps+1, R, A]).");
    m.def("act", &act, py::arg("net"), py::arg("q1"), py::arg("q2"), py::arg("obs"), py::arg("x0"), py::arg("K"),
          py::arg("kind"), py::arg("solver"), py::arg("steps"), py::arg("ttab"), py::arg("coef"),
          py::arg("step_noise"), py::arg("clip"), py::arg("mode"), py::arg("temperature"), py::arg("uniform"),
          py::arg("act_out"), py::arg("q_out") = py::none(), py::arg("idx_out") = py::none(),
          py::arg("cand_out") = py::none(), py::arg("n_threads") = 1, py::arg("chunk_rows") = 0,
          "Sample K candidates per state, score by min(Q1, Q2), select one per state into act_out [B, A].");
    m.def("fm_loss", &fm_loss, py::arg("pred"), py::arg("target"), py::arg("noise"), py::arg("energy"),
          py::arg("beta"), py::arg("normalize"), py::arg("pair_weight"), py::arg("grad"), py::arg("sq_out"),
          py::arg("w_out"), py::arg("n_threads") = 1,
          "Weighted flow-matching loss (returned, float64) and its gradient w.r.t. pred (into grad).");
    m.def("fingerprint", &fingerprint, py::arg("slots"),
          "(sum of versions, hash of data pointers) of d[name] for (d, name) in slots (pack cache key).");
    m.def("fma_peak", &fma_peak, py::arg("seconds") = 0.2,
          "Measured single-thread peak FLOP/s of a tight FMA loop in the active variant.");
    m.def("gemm", &gemm, py::arg("x"), py::arg("net"), py::arg("y"));
    m.def("isa", []() { return std::string(g_var.name); }, "The active instruction-set variant.");
    m.def("available_isas", &available_isas, "Variants this CPU and build can run, best first.");
    m.def("set_isa", &set_isa, py::arg("isa"), "Switch the active variant (tests run every one).");
}
