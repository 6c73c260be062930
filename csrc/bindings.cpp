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
#include <stdexcept>
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
    void (*select_rows)(const float*, long, int, int, double, const double*, int64_t*, double*);
    void (*softmax_rows)(const float*, long, long, double, double, double*);
};

#define QK_VARIANT(NS, NAME) \
    Variant{NAME, NS::sample_chunk, NS::act_chunk, NS::fma_peak_flops, NS::gemm, NS::select_rows, NS::softmax_rows}

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
// A tensor of the right dtype, device and shape whose elements are not plain memory (a ZeroTensor,
// a negative view): the reference handles it. Raised as a subclass of qipo_kernels.backends.Fallback,
// so that ops runs the reference (backend="auto") or says why (backend="cpp").
struct UnreadableBuffer : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// A buffer argument is a numpy array or a CPU torch.Tensor (dense, contiguous, no neg bit), read
// through the tensor's Python attributes: no torch headers, and no .numpy() round trip (~0.8 us a
// tensor, a fifth of a one-state sampler call). The tensor stays referenced by the caller while
// the kernels run, as the numpy array does.
template <class T> const char* dtype_name();
template <> const char* dtype_name<float>() { return "float32"; }
template <> const char* dtype_name<double>() { return "float64"; }
template <> const char* dtype_name<int64_t>() { return "int64"; }

struct TorchRefs {
    PyObject* tensor_type;
    PyObject *f32, *f64, *i64, *strided;
    PyObject *s_dtype, *s_is_cpu, *s_shape, *s_is_contiguous, *s_is_neg, *s_data_ptr, *s_requires_grad,
        *s_device, *s_layout;
};

// torch's objects, looked up once torch has been imported (before that nothing can be a tensor).
// The references are kept for the life of the process (never released at finalization).
const TorchRefs* torch_refs() {
    static TorchRefs* refs = nullptr;
    if (refs) return refs;
    PyObject* mod = PyImport_GetModule(py::str("torch").ptr());
    if (!mod) {
        PyErr_Clear();
        return nullptr;
    }
    py::object torch = py::reinterpret_steal<py::object>(mod);
    auto keep = [](py::object o) { return o.release().ptr(); };
    auto intern = [](const char* n) { return PyUnicode_InternFromString(n); };
    TorchRefs* r = new TorchRefs{keep(torch.attr("Tensor")), keep(torch.attr("float32")), keep(torch.attr("float64")),
                                 keep(torch.attr("int64")), keep(torch.attr("strided")), intern("dtype"),
                                 intern("is_cpu"), intern("shape"), intern("is_contiguous"), intern("is_neg"),
                                 intern("data_ptr"), intern("requires_grad"), intern("device"), intern("layout")};
    refs = r;
    return refs;
}
template <class T> PyObject* torch_dtype(const TorchRefs* r);
template <> PyObject* torch_dtype<float>(const TorchRefs* r) { return r->f32; }
template <> PyObject* torch_dtype<double>(const TorchRefs* r) { return r->f64; }
template <> PyObject* torch_dtype<int64_t>(const TorchRefs* r) { return r->i64; }

py::object get_attr(py::handle h, PyObject* name) {
    PyObject* o = PyObject_GetAttr(h.ptr(), name);
    if (!o) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(o);
}
py::object call0(py::handle h, PyObject* name) {
    PyObject* o = PyObject_CallMethodNoArgs(h.ptr(), name);
    if (!o) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(o);
}

struct View {
    void* ptr = nullptr;
    int nd = 0;
    long shape[8];
    void push(long n, const char* name) {
        if (nd == 8) throw py::value_error(std::string(name) + " has more than 8 dimensions");
        shape[nd++] = n;
    }
};

std::string shape_str(const View& v) {
    std::string out = "[";
    for (int i = 0; i < v.nd; ++i) out += (i ? ", " : "") + std::to_string(v.shape[i]);
    return out + "]";
}

// The data pointer and shape of a C-contiguous buffer of element type T (numpy array or CPU tensor).
template <class T>
View view(py::handle h, const char* name, bool writable) {
    View v;
    if (py::isinstance<py::array>(h)) {
        py::array a = py::reinterpret_borrow<py::array>(h);
        if (!a.dtype().is(py::dtype::of<T>()))
            throw py::type_error(std::string(name) + " must have dtype " + dtype_name<T>() + ", got " +
                                 std::string(py::str(a.dtype())));
        if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + " must be C-contiguous");
        if (writable && !a.writeable()) throw py::value_error(std::string(name) + " must be writable");
        for (py::ssize_t i = 0; i < a.ndim(); ++i) v.push((long)a.shape(i), name);
        v.ptr = const_cast<void*>(a.data());
        return v;
    }
    const TorchRefs* r = torch_refs();
    if (!r || !PyObject_TypeCheck(h.ptr(), (PyTypeObject*)r->tensor_type))
        throw py::type_error(std::string(name) + " must be a numpy array or a CPU torch.Tensor, got " +
                             std::string(py::str(py::type::of(h).attr("__name__"))));
    py::object dt = get_attr(h, r->s_dtype);
    if (dt.ptr() != torch_dtype<T>(r))
        throw py::type_error(std::string(name) + " must have dtype torch." + dtype_name<T>() + ", got " +
                             std::string(py::str(dt)));
    if (get_attr(h, r->s_is_cpu).ptr() != Py_True)
        throw py::value_error(std::string(name) + " must be on the CPU, got a tensor on " +
                              std::string(py::str(get_attr(h, r->s_device))));
    // (the layout is looked at only when this fails: some sparse layouts raise here, others say False)
    PyObject* c = PyObject_CallMethodNoArgs(h.ptr(), r->s_is_contiguous);
    if (!c) {
        PyErr_Clear();
        throw py::value_error(std::string(name) + " must be a dense (strided) tensor");
    }
    const bool contiguous = c == Py_True;
    Py_DECREF(c);
    if (!contiguous) {
        if (get_attr(h, r->s_layout).ptr() != r->strided)
            throw py::value_error(std::string(name) + " must be a dense (strided) tensor");
        throw py::value_error(std::string(name) + " must be contiguous (call .contiguous() first)");
    }
    if (writable) {
        // outputs: the caller made them (fresh, never a negative view); they must not be autograd leaves
        if (get_attr(h, r->s_requires_grad).ptr() != Py_False)
            throw py::value_error(std::string(name) + " is an output buffer and must not require grad");
    } else if (call0(h, r->s_is_neg).ptr() != Py_False) {
        throw UnreadableBuffer(std::string(name) + " has its negative bit set (call .resolve_neg() first)");
    }
    py::object shp = get_attr(h, r->s_shape);
    const Py_ssize_t nd = PyTuple_Size(shp.ptr());
    if (nd < 0) throw py::error_already_set();
    for (Py_ssize_t i = 0; i < nd; ++i) v.push(PyLong_AsLong(PyTuple_GET_ITEM(shp.ptr(), i)), name);
    py::object p = call0(h, r->s_data_ptr);
    v.ptr = PyLong_AsVoidPtr(p.ptr());
    if (PyErr_Occurred()) throw py::error_already_set();
    long numel = 1;
    for (int i = 0; i < v.nd; ++i) numel *= v.shape[i];
    if (numel > 0 && !v.ptr)  // e.g. a ZeroTensor: no memory behind its elements
        throw UnreadableBuffer(std::string(name) + " has no data behind its elements (a ZeroTensor?); "
                               "materialise it first (e.g. .clone())");
    return v;
}

// Check a buffer with the given shape (-1 = any size, filled in with the actual size).
template <class T>
T* check_buf(const py::handle& h, const char* name, std::vector<long>& shape, bool writable) {
    View v = view<T>(h, name, writable);
    bool ok = v.nd == (int)shape.size();
    for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || v.shape[i] == shape[i];
    if (!ok) {
        std::string want = "[";
        for (size_t i = 0; i < shape.size(); ++i)
            want += (i ? ", " : "") + (shape[i] < 0 ? std::string("*") : std::to_string(shape[i]));
        throw py::value_error(std::string(name) + " must have shape " + want + "], got " + shape_str(v));
    }
    for (size_t i = 0; i < shape.size(); ++i) shape[i] = v.shape[i];
    return static_cast<T*>(v.ptr);
}
template <class T>
const T* check(const py::handle& h, const char* name, std::vector<long> shape) {
    return check_buf<T>(h, name, shape, false);
}
template <class T>
T* check_out(const py::handle& h, const char* name, std::vector<long> shape) {
    return check_buf<T>(h, name, shape, true);
}
// A [rows, cols] buffer in any row-major shape whose last dimension is cols and whose other
// dimensions multiply to rows (e.g. x0 [B, K, A] for rows = B K): no reshape needed on the caller's side.
template <class T>
T* check_rows(const py::handle& h, const char* name, long rows, long cols, bool writable = false) {
    View v = view<T>(h, name, writable);
    long lead = 1;
    for (int i = 0; i + 1 < v.nd; ++i) lead *= v.shape[i];
    if (v.nd < 2 || v.shape[v.nd - 1] != cols || lead != rows)
        throw py::value_error(std::string(name) + " must have shape [" + std::to_string(rows) + ", " +
                              std::to_string(cols) + "] (or leading dimensions multiplying to " +
                              std::to_string(rows) + "), got " + shape_str(v));
    return static_cast<T*>(v.ptr);
}

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

    Pack(py::object wx, py::object wc, py::object b1, py::list hidden_w, py::list hidden_b, py::object wo,
         py::object bo, const std::string& activation, py::object ln_w, py::object ln_b, py::object ln_eps) {
        std::vector<long> sx{-1, -1};
        check_buf<float>(wx, "wx", sx, false);
        const long H = sx[0], nx = sx[1];
        std::vector<long> sc{H, -1};
        check_buf<float>(wc, "wc", sc, false);
        const long nc = sc[1];
        check<float>(b1, "b1", {H});
        if (hidden_w.size() != hidden_b.size()) throw py::value_error("hidden_w and hidden_b must have equal length");
        std::vector<long> so{-1, H};
        check_buf<float>(wo, "wo", so, false);
        const long nout = so[0];
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

// ---------------------------------------------------------------- change detection
// Watches the tensors a pack was built from (and the submodules holding them, by identity:
// `net.out = nn.Linear(...)` leaves the old layer's tensors untouched). changed() is true once any
// tensor was
//   - modified in place through autograd-visible ops (optimizer steps, copy_ under no_grad,
//     load_state_dict): its ._version moved;
//   - replaced (`p.data = other`, a new Parameter in the same slot): its data_ptr() moved;
//   - written through `.data` (`p.data.copy_(...)`, the usual soft target update), which bypasses
//     the version counter: caught by comparing four sampled elements (first, 1/3, 2/3, last) with
//     their values when the watch was made. A `.data` write that leaves all four unchanged (a
//     few elements edited by hand) is not seen: cpp.refresh(module) drops the pack then.
// Plain C API calls (pybind's attr()/cast() cost ~3x as much): this runs on every sampler call.
class Watch {
  public:
    explicit Watch(py::list slots) {
        const TorchRefs* r = torch_refs();
        if (!r) throw py::type_error("Watch needs torch tensors (torch is not imported)");
        try {
            record(slots, r);
        } catch (...) {
            release();
            throw;
        }
    }
    ~Watch() {
        if (Py_IsInitialized()) release();
    }

  private:
    void record(py::list slots, const TorchRefs* r) {
        for (py::handle s : slots) {
            if (!PyTuple_Check(s.ptr()) || PyTuple_GET_SIZE(s.ptr()) != 2 || !PyDict_Check(PyTuple_GET_ITEM(s.ptr(), 0)))
                throw py::type_error("slots must be a list of (dict, name) tuples");
            Item it;
            it.dict = PyTuple_GET_ITEM(s.ptr(), 0);
            it.name = PyTuple_GET_ITEM(s.ptr(), 1);
            PyObject* t = lookup(it);
            if (!PyObject_TypeCheck(t, (PyTypeObject*)r->tensor_type)) {
                // not a tensor (a submodule): watched by identity, a reference held so that its
                // address cannot be reused by a replacement
                it.ident = t;
                it.dict_size = PyDict_Size(it.dict);  // a layer appended to a ModuleList adds a key
                Py_INCREF(t);
                Py_INCREF(it.dict);
                Py_INCREF(it.name);
                items_.push_back(it);
                continue;
            }
            it.version = version(t);
            it.ptr = data_ptr(t);
            // sampled only from a dense float32 CPU tensor; while data_ptr is unchanged it is that same buffer
            it.n = 0;
            py::handle th(t);
            if (PyObject_TypeCheck(t, (PyTypeObject*)r->tensor_type) && get_attr(th, r->s_dtype).ptr() == r->f32 &&
                get_attr(th, r->s_is_cpu).ptr() == Py_True && call0(th, r->s_is_contiguous).ptr() == Py_True) {
                it.n = PyLong_AsLong(call0(th, py::str("numel").ptr()).ptr());
                if (it.n < 0) throw py::error_already_set();
                if (it.ptr == 0) it.n = 0;  // no memory behind the elements (a ZeroTensor): nothing to sample
                if (it.n > 0) {
                    read_samples(it, it.sample);
                    // keep the buffer allocated (an alias of the tensor, sharing its storage): while the
                    // watch lives no other tensor can be given this address, so "same data_ptr" means
                    // "this very buffer" and the sampled reads stay inside it
                    it.keep = call0(th, py::str("detach").ptr()).release().ptr();
                }
            }
            Py_INCREF(it.dict);
            Py_INCREF(it.name);
            items_.push_back(it);  // (from here on release() owns the three references)
        }
    }
    void release() {
        for (Item& it : items_) {
            Py_XDECREF(it.dict);
            Py_XDECREF(it.name);
            Py_XDECREF(it.keep);
            Py_XDECREF(it.ident);
        }
        items_.clear();
    }

  public:
    Watch(const Watch&) = delete;
    Watch& operator=(const Watch&) = delete;

    // Never raises: a tensor that is gone or no longer a tensor (a parameter set to None) counts as a
    // change, and the caller's re-pack then says what is wrong.
    bool changed() const {
        try {
            for (const Item& it : items_) {
                PyObject* t = lookup(it);
                if (it.ident) {
                    if (t != it.ident || PyDict_Size(it.dict) != it.dict_size) return true;
                    continue;
                }
                if (data_ptr(t) != it.ptr || version(t) != it.version) return true;
                if (it.n > 0) {
                    float now[4];
                    read_samples(it, now);
                    if (std::memcmp(now, it.sample, sizeof(now)) != 0) return true;
                }
            }
        } catch (py::error_already_set&) {
            return true;  // (the error_already_set took the Python error indicator with it)
        } catch (py::key_error&) {
            return true;
        }
        return false;
    }
    size_t size() const { return items_.size(); }

  private:
    struct Item {
        PyObject* dict = nullptr;
        PyObject* name = nullptr;
        long long version = 0;
        uintptr_t ptr = 0;
        long n = 0;
        float sample[4] = {0, 0, 0, 0};
        PyObject* keep = nullptr;   // a detached alias holding the sampled buffer
        PyObject* ident = nullptr;  // a non-tensor slot (a submodule), compared by identity
        Py_ssize_t dict_size = 0;   // ... and the size of the dict holding it
    };
    std::vector<Item> items_;

    static PyObject* lookup(const Item& it) {
        PyObject* t = PyDict_GetItemWithError(it.dict, it.name);  // borrowed
        if (!t) {
            if (PyErr_Occurred()) throw py::error_already_set();
            throw py::key_error("a watched tensor was removed: " + std::string(py::str(it.name)));
        }
        return t;
    }
    static long long version(PyObject* t) {
        static PyObject* attr = PyUnicode_InternFromString("_version");
        PyObject* v = PyObject_GetAttr(t, attr);
        if (!v) {  // inference tensors have no version counter: pointer and samples only
            PyErr_Clear();
            return -1;
        }
        const long long out = PyLong_AsLongLong(v);
        Py_DECREF(v);
        if (out == -1 && PyErr_Occurred()) throw py::error_already_set();
        return out;
    }
    static uintptr_t data_ptr(PyObject* t) {
        static PyObject* attr = PyUnicode_InternFromString("data_ptr");
        PyObject* p = PyObject_CallMethodNoArgs(t, attr);
        if (!p) throw py::error_already_set();
        const unsigned long long out = PyLong_AsUnsignedLongLong(p);
        Py_DECREF(p);
        if (out == (unsigned long long)-1 && PyErr_Occurred()) throw py::error_already_set();
        return (uintptr_t)out;
    }
    static void read_samples(const Item& it, float* out) {
        const float* p = reinterpret_cast<const float*>(it.ptr);
        const long idx[4] = {0, it.n / 3, (2 * it.n) / 3, it.n - 1};
        for (int i = 0; i < 4; ++i) std::memcpy(out + i, p + idx[i], sizeof(float));
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
    std::vector<long> so{-1, S};
    a.obs = check_buf<float>(obs, "obs", so, false);
    const long B = so[0];
    a.x0 = check_rows<float>(x0, "x0", B * K, A);
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
    } else if (kind == "ddpm") {
        a.kind = qk::KIND_DDPM;
        if (solver < 0 || solver > 1) throw py::value_error("ddpm solver id must be 0 (predicts x0) or 1 (eps)");
    } else {
        throw py::value_error("kind must be 'velocity', 'noise', 'consistency' or 'ddpm', got '" + kind + "'");
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
    } else if (a.kind == qk::KIND_DDPM) {
        n_evals = steps;  // one network evaluation per DDPM step
        a.coef = check<float>(coef, "coef", {steps, qk::NCOEF_DDPM});
        if (steps > 1) a.step_noise = check_rows<float>(step_noise, "step_noise", (steps - 1) * B * K, A);
    } else {
        n_evals = steps;  // consistency: steps = number of denoiser evaluations
        a.coef = check<float>(coef, "coef", {steps, qk::NCOEF_CONS});
        if (steps > 1) a.step_noise = check_rows<float>(step_noise, "step_noise", (steps - 1) * B * K, A);
    }
    a.n_evals = n_evals;
    a.ttab = check<float>(ttab, "ttab", {n_evals, d.H});
    a.clip = clip ? 1 : 0;
    a.net = &net.d;
    return a;
}

const long CHUNK_ROWS = 64;

// True when every watch given (None = not checked) reports no change since its pack was made.
bool unchanged(py::handle w) { return w.is_none() || !w.cast<const Watch&>().changed(); }

bool sample(const Pack& net, py::handle obs, py::handle x0, int K, const std::string& kind, int solver, int steps,
            py::handle ttab, py::handle coef, py::handle step_noise, bool clip, py::handle out, py::handle traj,
            int n_threads, long chunk_rows, py::handle watch) {
    if (!unchanged(watch)) return false;  // the pack is stale: nothing written, the caller re-packs
    qk::SampleArgs a = make_sample_args(net, obs, x0, K, kind, solver, steps, ttab, coef, step_noise, clip);
    const long A = net.d.nout;
    a.out = check_rows<float>(out, "out", a.R, A, true);
    if (!traj.is_none()) {
        if (a.kind == qk::KIND_CONSISTENCY || a.kind == qk::KIND_DDPM)
            throw py::value_error("traj is only for the ODE solvers");
        a.traj = check_rows<float>(traj, "traj", (steps + 1) * a.R, A, true);
    }
    if (chunk_rows <= 0) chunk_rows = CHUNK_ROWS;
    const long ws = qk::sample_ws_floats(&net.d, chunk_rows, chunk_rows) + 256;
    const Variant v = g_var;
    auto run = [&]() {
        run_chunks(a.R, chunk_rows, n_threads, ws, [&](long r0, long r1, float* w) { v.sample_chunk(&a, r0, r1, w); });
    };
    if (a.R <= chunk_rows && steps == 1) {
        run();  // a few microseconds: holding the GIL is cheaper than handing it over and back
    } else {
        py::gil_scoped_release nogil;
        run();
    }
    return true;
}

bool act(const Pack& net, const Pack& q1, const Pack& q2, py::handle obs, py::handle x0, int K,
         const std::string& kind, int solver, int steps, py::handle ttab, py::handle coef, py::handle step_noise,
         bool clip, const std::string& mode, double temperature, py::handle uniform, py::handle act_out,
         py::handle q_out, py::handle idx_out, py::handle cand_out, int n_threads, long chunk_rows,
         py::handle watch, py::handle critic_watch) {
    if (!unchanged(watch) || !unchanged(critic_watch)) return false;  // a pack is stale: the caller re-packs
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
    if (!cand_out.is_none()) a.s.out = check_rows<float>(cand_out, "cand_out", B * K, A, true);
    if (chunk_rows <= 0) chunk_rows = CHUNK_ROWS;
    const long states = std::max(1L, chunk_rows / K);
    const long m = states * K;
    const NetDesc* wide = q1.d.Hp >= q2.d.Hp ? &q1.d : &q2.d;
    const long ws = qk::act_ws_floats(&net.d, wide, m, states) + 512;
    const Variant v = g_var;
    py::gil_scoped_release nogil;
    run_chunks(B, states, n_threads, ws, [&](long b0, long b1, float* w) { v.act_chunk(&a, b0, b1, w); });
    return true;
}

// ---------------------------------------------------------------- select_action
// out[b] = cand[b, select_index(q[b])] for q [B, K], cand [B, K, D]; idx_out [B] optional.
void select_action(py::handle q_values, py::handle candidates, const std::string& mode, double temperature,
            py::handle uniform, py::handle out, py::handle idx_out) {
    std::vector<long> sq{-1, -1};
    const float* Q = check_buf<float>(q_values, "q_values", sq, false);
    const long B = sq[0], K = sq[1];
    if (B < 1 || K < 1) throw py::value_error("q_values must be non-empty [B, K]");
    std::vector<long> sc{B, K, -1};
    const float* X = check_buf<float>(candidates, "candidates", sc, false);
    const long D = sc[2];
    int m;
    const double* U = nullptr;
    if (mode == "argmax") {
        m = 0;
    } else if (mode == "softmax") {
        m = 1;
        if (!(temperature > 0.0) || !std::isfinite(temperature))
            throw py::value_error("temperature must be > 0 and finite");
        U = check<double>(uniform, "uniform", {B});
        for (long b = 0; b < B; ++b)
            if (!(U[b] >= 0.0 && U[b] < 1.0)) throw py::value_error("uniform must lie in [0, 1)");
    } else {
        throw py::value_error("mode must be 'argmax' or 'softmax', got '" + mode + "'");
    }
    float* O = check_out<float>(out, "out", {B, D});
    int64_t* I = idx_out.is_none() ? nullptr : check_out<int64_t>(idx_out, "idx_out", {B});
    std::vector<int64_t> own(I ? 0 : B);
    if (!I) I = own.data();
    std::vector<double> scratch(K + 16);
    const Variant v = g_var;
    auto run = [&]() {
        v.select_rows(Q, B, (int)K, m, temperature, U, I, scratch.data());
        for (long b = 0; b < B; ++b) std::memcpy(O + b * D, X + (b * K + I[b]) * D, sizeof(float) * D);
    };
    if (B * K < (1L << 16)) {
        run();
    } else {
        py::gil_scoped_release nogil;
        run();
    }
}

// ---------------------------------------------------------------- weighted flow-matching loss
// loss = sum_{b,m} wn[b,m] lambda[b,m] |pred - tgt|^2, tgt = target (or target - noise when given),
// wn: 1/(B M) without energy; softmax_m(beta energy)/B ("support"); softmax_{b,m}(beta energy) ("batch").
// grad = 2 (pred - tgt) wn lambda. Accumulated in double.
double fm_loss(py::handle pred, py::handle target, py::handle noise, py::handle energy, double beta,
               const std::string& normalize, py::handle pair_weight, py::handle grad, py::handle sq_out,
               py::handle w_out, int n_threads) {
    std::vector<long> sp{-1, -1, -1};
    const float* P = check_buf<float>(pred, "pred", sp, false);
    const long B = sp[0], M = sp[1], D = sp[2];
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
    const Variant v = g_var;  // (read while holding the GIL, as every entry point)
    {
        py::gil_scoped_release nogil;
        if (!E) {
            std::fill(wn.begin(), wn.end(), 1.0 / (double)n);
        } else if (norm == 0) {  // softmax over each state's M support actions, / B
            v.softmax_rows(E, B, M, beta, 1.0 / (double)B, wn.data());
        } else {                 // softmax over the whole batch
            v.softmax_rows(E, 1, n, beta, 1.0, wn.data());
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
    std::vector<long> sx{-1, Hp};
    const float* X = check_buf<float>(x, "x", sx, false);
    const long M = sx[0];
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
    // a qipo_kernels.backends.Fallback: ops then runs the reference for backend="auto"
    py::register_exception<UnreadableBuffer>(
        m, "UnreadableBuffer", py::module_::import("qipo_kernels.backends").attr("Fallback").ptr());
    py::class_<Pack, std::shared_ptr<Pack>>(m, "Pack")
        .def(py::init<py::object, py::object, py::object, py::list, py::list, py::object, py::object,
                      const std::string&, py::object, py::object, py::object>(),
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
          py::arg("watch") = py::none(),
          "ODE or consistency sampling of R = B*K rows into out [R, A] (and traj [steps+1, R, A]). Returns "
          "False, writing nothing, when `watch` (the pack's Watch) reports a change: re-pack and call again.");
    m.def("act", &act, py::arg("net"), py::arg("q1"), py::arg("q2"), py::arg("obs"), py::arg("x0"), py::arg("K"),
          py::arg("kind"), py::arg("solver"), py::arg("steps"), py::arg("ttab"), py::arg("coef"),
          py::arg("step_noise"), py::arg("clip"), py::arg("mode"), py::arg("temperature"), py::arg("uniform"),
          py::arg("act_out"), py::arg("q_out") = py::none(), py::arg("idx_out") = py::none(),
          py::arg("cand_out") = py::none(), py::arg("n_threads") = 1, py::arg("chunk_rows") = 0,
          py::arg("watch") = py::none(), py::arg("critic_watch") = py::none(),
          "Sample K candidates per state, score by min(Q1, Q2), select one per state into act_out [B, A]. "
          "Returns False, writing nothing, when a watch reports a change (re-pack and call again).");
    m.def("select_action", &select_action, py::arg("q_values"), py::arg("candidates"), py::arg("mode"), py::arg("temperature"),
          py::arg("uniform"), py::arg("out"), py::arg("idx_out") = py::none(),
          "Pick one of K candidates [B, K, D] per state by q_values [B, K] (argmax, or a softmax draw by "
          "inverse CDF with uniform [B] float64) into out [B, D] (and the index into idx_out [B]).");
    m.def("fm_loss", &fm_loss, py::arg("pred"), py::arg("target"), py::arg("noise"), py::arg("energy"),
          py::arg("beta"), py::arg("normalize"), py::arg("pair_weight"), py::arg("grad"), py::arg("sq_out"),
          py::arg("w_out"), py::arg("n_threads") = 1,
          "Weighted flow-matching loss (returned, float64) and its gradient w.r.t. pred (into grad).");
    py::class_<Watch, std::shared_ptr<Watch>>(m, "Watch")
        .def(py::init<py::list>(), py::arg("slots"),
             "Record the state of the tensors d[name] for (d, name) in slots (those a pack reads).")
        .def("changed", &Watch::changed,
             "True once any watched tensor changed: version, data pointer, or one of four sampled elements.")
        .def("__len__", &Watch::size);
    m.def("fma_peak", &fma_peak, py::arg("seconds") = 0.2,
          "Measured single-thread peak FLOP/s of a tight FMA loop in the active variant.");
    m.def("gemm", &gemm, py::arg("x"), py::arg("net"), py::arg("y"));
    m.def("isa", []() { return std::string(g_var.name); }, "The active instruction-set variant.");
    m.def("available_isas", &available_isas, "Variants this CPU and build can run, best first.");
    m.def("set_isa", &set_isa, py::arg("isa"), "Switch the active variant (tests run every one).");
}
