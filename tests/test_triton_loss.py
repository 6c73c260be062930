"""Triton fused flow-matching loss and path builder against the plain-PyTorch reference.

Runs on the CPU under TRITON_INTERPRET=1 (set by conftest) in float32; the float64 reference is the
truth. Outputs of every launch are poisoned with NaN first (the ``poison`` fixture replaces the
launchers' allocation function), so an element a kernel leaves unwritten fails the comparison.
Tests marked ``gpu`` (16-bit dtypes, CUDA graphs) run only where CUDA exists.
"""
import pytest
import torch

import qipo_kernels as qk
from qipo_kernels import backends
from qipo_kernels.reference import loss as ref_loss
from qipo_kernels.reference import paths as ref_paths

tl_mod = pytest.importorskip("qipo_kernels.triton.loss")
from qipo_kernels.triton import _host  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
PATHS = ("ot", "ot-eps", "vp")
SHAPES = [(3, 17, 6), (5, 1, 1), (2, 64, 7), (40, 25, 3)]  # the last: 1000 pairs


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every kernel output starts as NaN; returns the list of shapes allocated (to prove it ran)."""
    calls = []

    def nan_empty(shape, dtype, device):
        calls.append(tuple(shape))
        if dtype.is_floating_point:
            return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
        return torch.full(tuple(shape), -12345, dtype=dtype, device=device)

    monkeypatch.setattr(_host, "empty", nan_empty)
    return calls


def _inputs(B, M, D, gen, dtype=torch.float32, energy_scale=1.0, with_energy=True, with_pw=False):
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    pred, a, z = mk(B, M, D), mk(B, M, D), mk(B, M, D)
    t = torch.rand(B, M, generator=gen, dtype=torch.float64)
    e = mk(B, M) * energy_scale if with_energy else None
    pw = torch.rand(B, M, generator=gen, dtype=torch.float64) + 0.1 if with_pw else None
    cast = lambda x: None if x is None else x.to(dtype=dtype, device=DEV)  # noqa: E731
    return [cast(x) for x in (pred, a, z, t, e, pw)]


def _grad(fn, x):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (g,) = torch.autograd.grad(out, x)
    return out.detach(), g


def _err(x, truth):
    return (x.double() - truth.double()).abs().max().item()


def assert_as_good_as_torch(fast, ref_same_dtype, truth, name, atol=1e-6, factor=2.0):
    """fast may be at most ``factor`` x as far from the float64 truth as PyTorch in the same precision
    (plus atol relative to the truth's largest magnitude, for results PyTorch happens to get exactly)."""
    assert torch.isfinite(fast).all(), f"{name}: non-finite values (an unwritten output?)"
    scale = max(truth.double().abs().max().item(), 1e-30)
    e_fast, e_ref = _err(fast, truth), _err(ref_same_dtype, truth)
    assert e_fast <= factor * e_ref + atol * scale, \
        f"{name}: error {e_fast:.3g} vs torch {e_ref:.3g} (scale {scale:.3g})"


def _check_fm(pred, a, z, t, path, e, beta, norm, pw):
    """Triton float32 loss + d/dpred vs the float64 reference (truth) and the float32 reference."""
    f = lambda p: qk.flow_matching_loss(p, a, z, t, path, e, beta, norm, pw, backend="triton")  # noqa: E731
    loss, g = _grad(f, pred)
    d = lambda x: None if x is None else x.double()  # noqa: E731
    r64 = lambda p: ref_loss.flow_matching_loss(p, d(a), d(z), d(t), path, d(e), beta, norm, d(pw))  # noqa: E731
    loss64, g64 = _grad(r64, pred.double())
    r32 = lambda p: ref_loss.flow_matching_loss(p, a, z, t, path, e, beta, norm, pw)  # noqa: E731
    loss32, g32 = _grad(r32, pred)
    assert loss.dtype == pred.dtype and loss.shape == ()
    assert g.shape == pred.shape and g.dtype == pred.dtype
    assert_as_good_as_torch(loss, loss32, loss64, "loss")
    assert_as_good_as_torch(g, g32, g64, "grad_pred")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("normalize", ("support", "batch"))
def test_flow_matching_loss_matches_reference(shape, path, normalize, gen, poison):
    for with_energy, with_pw in ((True, False), (False, False), (True, True), (False, True)):
        pred, a, z, t, e, pw = _inputs(*shape, gen, with_energy=with_energy, with_pw=with_pw)
        _check_fm(pred, a, z, t, path, e, 3.0, normalize, pw)
    assert poison, "the kernel outputs were not allocated through the poisoning hook"


@pytest.mark.parametrize("normalize", ("support", "batch"))
@pytest.mark.parametrize("beta,energy_scale", [(1e-3, 1.0), (5.0, 1000.0), (50.0, 100.0)])
def test_extreme_beta(normalize, beta, energy_scale, gen):
    """beta * Q up to ~5000: the max is subtracted, nothing overflows, and the weights (nearly
    one-hot for huge beta) match the float64 truth as well as PyTorch float32 does."""
    pred, a, z, t, e, _ = _inputs(4, 33, 6, gen, energy_scale=energy_scale)
    _check_fm(pred, a, z, t, "ot", e, beta, normalize, None)


def test_energy_and_t_in_other_dtypes(gen):
    """energy (and t) may be float64 with float32 pred: the reference rounds energy to pred's dtype."""
    pred, a, z, t, e, pw = _inputs(3, 10, 4, gen, with_pw=True)
    for norm in ("support", "batch"):
        _check_fm(pred, a, z, t.double(), "ot", e.double() * 30, 3.0, norm, pw)


def test_energy_offset_invariance(gen):
    """Adding a constant to a state's energies must not change support weights (max subtraction)."""
    pred, a, z, t, e, _ = _inputs(3, 9, 5, gen)
    l1 = qk.flow_matching_loss(pred, a, z, t, "ot", e, 3.0, "support", backend="triton")
    l2 = qk.flow_matching_loss(pred, a, z, t, "ot", e + 1e4, 3.0, "support", backend="triton")
    torch.testing.assert_close(l1, l2, rtol=5e-3, atol=1e-5)


@pytest.mark.parametrize("normalize", ("support", "batch"))
def test_weighted_fm_loss_grads_pred_and_target(normalize, gen):
    pred, tgt, _, _, e, pw = _inputs(3, 17, 6, gen, with_pw=True)
    p1, t1 = pred.clone().requires_grad_(), tgt.clone().requires_grad_()
    loss = qk.weighted_fm_loss(p1, t1, e, 2.0, normalize, pw, backend="triton")
    gp, gt = torch.autograd.grad(loss, (p1, t1))
    p2, t2 = pred.double().requires_grad_(), tgt.double().requires_grad_()
    loss64 = ref_loss.weighted_fm_loss(p2, t2, e.double(), 2.0, normalize, pw.double())
    gp64, gt64 = torch.autograd.grad(loss64, (p2, t2))
    torch.testing.assert_close(loss.double(), loss64, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(gp.double(), gp64, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(gt.double(), gt64, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("normalize", ("support", "batch"))
def test_grads_of_actions_noise_pair_weight(path, normalize, gen):
    """Every gradient the reference's autograd gives, the fused op gives: actions and noise through
    the target, pair_weight; none for energy (detached weights) or t (not in the target)."""
    pred, a, z, t, e, pw = _inputs(2, 13, 5, gen, with_pw=True)

    def run(fn, dtype):
        xs = [x.to(dtype).clone().requires_grad_() for x in (pred, a, z, t, e, pw)]
        loss = fn(*xs)
        gs = torch.autograd.grad(loss, xs, allow_unused=True)
        return loss, gs

    loss, gs = run(lambda p, a_, z_, t_, e_, w_: qk.flow_matching_loss(p, a_, z_, t_, path, e_, 3.0, normalize, w_,
                                                                      backend="triton"), torch.float32)
    loss64, gs64 = run(lambda p, a_, z_, t_, e_, w_: ref_loss.flow_matching_loss(p, a_, z_, t_, path, e_, 3.0,
                                                                                 normalize, w_), torch.float64)
    torch.testing.assert_close(loss.double(), loss64, rtol=2e-5, atol=2e-6)
    for name, g, g64 in zip(("pred", "actions", "noise", "t", "energy", "pair_weight"), gs, gs64):
        if g64 is None:
            assert g is None, f"{name}: the reference gives no gradient, the Triton op gave one"
        else:
            assert g is not None, f"{name}: gradient missing"
            torch.testing.assert_close(g.double(), g64, rtol=2e-5, atol=1e-6, msg=f"gradient of {name}")


def test_grad_output_scaling_and_accumulation(gen):
    pred, a, z, t, e, _ = _inputs(3, 7, 4, gen)
    p = pred.clone().requires_grad_()
    (3.5 * qk.flow_matching_loss(p, a, z, t, "ot", e, 3.0, backend="triton")).backward()
    (-1.0 * qk.flow_matching_loss(p, a, z, t, "ot", e, 3.0, backend="triton")).backward()
    p64 = pred.double().requires_grad_()
    (2.5 * ref_loss.flow_matching_loss(p64, a.double(), z.double(), t.double(), "ot", e.double(), 3.0)).backward()
    torch.testing.assert_close(p.grad.double(), p64.grad, rtol=2e-5, atol=1e-7)


def test_double_backward_refused(gen):
    """backward(create_graph=True) would need the second derivative; the fused loss refuses loudly
    rather than returning a gradient that silently does not depend on pred."""
    pred, a, z, t, e, _ = _inputs(2, 3, 4, gen)
    p = pred.clone().requires_grad_()
    loss = qk.flow_matching_loss(p, a, z, t, "ot", e, 3.0, backend="triton")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, p, create_graph=True)


def test_chunked_tiles_and_batch_partials(monkeypatch, gen):
    """Small tiles force the support loop over M in chunks, many programs, several batch partials
    per program and a partial count that is not a power of two."""
    monkeypatch.setattr(tl_mod, "TILE", 16)
    monkeypatch.setattr(tl_mod, "STATS_BLOCK", 8)
    monkeypatch.setattr(tl_mod, "MAX_PARTIALS", 3)
    for B, M, D in ((3, 37, 5), (7, 3, 9)):
        for norm in ("support", "batch"):
            pred, a, z, t, e, pw = _inputs(B, M, D, gen, energy_scale=10.0, with_pw=True)
            _check_fm(pred, a, z, t, "ot", e, 3.0, norm, pw)


def test_non_contiguous_inputs(gen):
    pred, a, z, t, e, pw = _inputs(3, 11, 6, gen, with_pw=True)
    nc = lambda x: x.transpose(0, 1).contiguous().transpose(0, 1)  # noqa: E731  same values, other strides
    args = [nc(x) for x in (pred, a, z, t, e, pw)]
    assert not args[0].is_contiguous() and not args[4].is_contiguous()
    _check_fm(*args[:4], "vp", args[4], 3.0, "support", args[5])


def test_no_grad_mode_same_value(poison, gen):
    pred, a, z, t, e, _ = _inputs(3, 5, 4, gen)
    p = pred.clone().requires_grad_()
    with torch.no_grad():
        l0 = qk.flow_matching_loss(p, a, z, t, "ot", e, 3.0, backend="triton")
    assert (3, 5, 4) not in poison, "no gradient buffer should be written when no gradient is wanted"
    l1 = qk.flow_matching_loss(p, a, z, t, "ot", e, 3.0, backend="triton")
    assert not l0.requires_grad and l1.requires_grad
    assert torch.equal(l0, l1.detach())


# ---- flow_path ----

@pytest.mark.parametrize("shape", [(3, 17, 6), (5, 1, 1), (1000, 6), (2, 3, 4, 5)])
@pytest.mark.parametrize("path", PATHS)
def test_flow_path_matches_reference(shape, path, gen):
    a = torch.randn(*shape, generator=gen, dtype=torch.float64)
    z = torch.randn(*shape, generator=gen, dtype=torch.float64)
    t = torch.rand(*shape[:-1], generator=gen, dtype=torch.float64)
    t.view(-1)[0] = 0.0
    t.view(-1)[-1] = 1.0  # both ends of the path (vp: sigma = 0 exactly at t = 1)
    zf = z.float()
    x, tgt = qk.flow_path(a.float(), zf, t.float(), path, backend="triton")
    x32, tgt32 = ref_paths.flow_path(a.float(), z.float(), t.float(), path)
    x64, tgt64 = ref_paths.flow_path(a, z, t.float().double(), path)
    assert x.shape == a.shape and x.dtype == torch.float32
    assert_as_good_as_torch(x, x32, x64, "x_t", atol=2e-7)
    assert_as_good_as_torch(tgt, tgt32, tgt64, "target", atol=0.0)
    if path != "ot":
        assert tgt is zf  # as in the reference, the noise target is the noise tensor itself


def test_flow_path_t_in_float64_rounded_like_reference(gen):
    a = torch.randn(4, 6, 3, generator=gen)
    z = torch.randn(4, 6, 3, generator=gen)
    t = torch.rand(4, 6, generator=gen, dtype=torch.float64)
    for path in PATHS:
        x, _ = qk.flow_path(a, z, t, path, backend="triton")
        xr, _ = ref_paths.flow_path(a, z, t, path)
        torch.testing.assert_close(x, xr, rtol=2e-6, atol=2e-6)


def test_flow_path_vp_sigma_accurate_near_data_end():
    """sigma = sqrt(1 - alpha^2) cancels near t = 1; the kernel's expm1 keeps it accurate."""
    t = torch.tensor([[1 - 1e-3, 1 - 1e-5, 1 - 1e-7]], dtype=torch.float32)
    a = torch.zeros(1, 3, 1)
    z = torch.ones(1, 3, 1)
    x, _ = qk.flow_path(a, z, t, "vp", backend="triton")
    _, sigma64 = ref_paths.alpha_sigma(t.double(), "vp")
    torch.testing.assert_close(x[..., 0].double(), sigma64, rtol=1e-5, atol=0)


# ---- dispatch, reasons, bad input ----

def test_explain_lists_reasons(gen):
    pred, a, z, t, e, _ = _inputs(2, 3, 4, gen, dtype=torch.float64)
    why = backends.explain("flow_matching_loss", pred.device, pred=pred, actions=a, noise=z, t=t, path="ot",
                           energy=e, normalize="support", pair_weight=None)
    assert why["torch"] == []
    assert any("float64" in r for r in why["triton"]), why
    with pytest.raises(RuntimeError, match="float64"):
        qk.flow_matching_loss(pred, a, z, t, "ot", e, backend="triton")
    wide = torch.zeros(1, 1, 2048)
    why = backends.explain("weighted_fm_loss", wide.device, pred=wide, target=wide, energy=None,
                           normalize="support", pair_weight=None)
    assert any("D = 2048" in r for r in why["triton"]), why
    a32 = torch.zeros(2, 3, 4, requires_grad=True)
    why = backends.explain("flow_path", a32.device, actions=a32, noise=a32.detach(), t=torch.zeros(2, 3), path="vp")
    assert any("backward" in r for r in why["triton"]), why
    with torch.no_grad():
        why = backends.explain("flow_path", a32.device, actions=a32, noise=a32.detach(), t=torch.zeros(2, 3), path="vp")
    assert not any("backward" in r for r in why["triton"]), why
    why = backends.explain("weighted_fm_loss", a32.device, pred=a32, target=a32, energy=None, normalize="batch",
                           pair_weight=torch.ones(2, 3, dtype=torch.float64))
    assert any("pair_weight" in r for r in why["triton"]), why


def test_triton_module_registered():
    backends._load("triton")
    assert "triton" not in backends._IMPORT_ERRORS, backends._IMPORT_ERRORS
    for op in ("flow_matching_loss", "weighted_fm_loss", "flow_path"):
        assert "triton" in backends._IMPLS[op]


@pytest.mark.parametrize("bad", ["energy_shape", "energy_nan", "beta", "normalize", "path", "pred_dtype", "t_shape",
                                 "pair_weight_inf", "device"])
def test_bad_input_raises_before_launch(bad, monkeypatch, gen):
    def boom(*a, **k):
        raise AssertionError("a kernel was launched on bad input")

    monkeypatch.setattr(tl_mod, "_fm_loss_launch", boom)
    pred, a, z, t, e, pw = _inputs(2, 3, 4, gen, with_pw=True)
    kw = dict(path="ot", energy=e, beta=1.0, normalize="support", pair_weight=pw)
    if bad == "energy_shape":
        kw["energy"] = e[:, :2]
    elif bad == "energy_nan":
        kw["energy"] = e.clone().fill_(float("nan"))
    elif bad == "beta":
        kw["beta"] = 0.0
    elif bad == "normalize":
        kw["normalize"] = "global"
    elif bad == "path":
        kw["path"] = "cosine"
    elif bad == "pred_dtype":
        pred = pred.to(torch.int32)
    elif bad == "t_shape":
        t = t[:, :1]
    elif bad == "pair_weight_inf":
        kw["pair_weight"] = pw.clone().fill_(float("inf"))
    elif bad == "device":
        t = t.to("meta")  # a second device (meta: the only other one on a CPU-only host)
    with pytest.raises((ValueError, TypeError)):
        qk.flow_matching_loss(pred, a, z, t, backend="triton", **kw)


# ---- torch.compile / fake tensors ----

def test_fake_impl_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        pred = torch.empty(3, 5, 7)
        e = torch.empty(3, 5)
        loss, grad, dpw = torch.ops.qipo_kernels.triton_fm_loss(pred, pred, pred, e, e, 2.0, 1, 1, True, True)
        assert loss.shape == () and grad.shape == (3, 5, 7) and dpw.shape == (3, 5) and loss.dtype == torch.float32
        _, grad, dpw = torch.ops.qipo_kernels.triton_fm_loss(pred, None, pred, None, None, 2.0, 2, 0, False, False)
        assert grad.shape == (0,) and dpw.shape == (0,)
        x, tgt = torch.ops.qipo_kernels.triton_flow_path(pred, pred, e, 0)
        assert x.shape == (3, 5, 7) and tgt.shape == (3, 5, 7)


def test_opcheck(gen):
    pred, a, z, t, e, pw = _inputs(2, 5, 3, gen, with_pw=True)
    p = pred.clone().requires_grad_()
    torch.library.opcheck(torch.ops.qipo_kernels.triton_fm_loss.default, (p, a, z, e, pw, 3.0, 1, 1, True, False))
    torch.library.opcheck(torch.ops.qipo_kernels.triton_fm_loss.default, (p, None, z, e, None, 3.0, 2, 2, True, False))
    torch.library.opcheck(torch.ops.qipo_kernels.triton_flow_path.default, (a, z, t, 2))


def test_torch_compile_fullgraph(gen):
    """torch.compile traces the whole loss (checks, dispatch, custom op) with no graph break, the
    custom op is in the graph, and the compiled forward + backward (aot_eager: quick on the CPU
    interpreter) match eager."""
    pred, a, z, t, e, _ = _inputs(3, 6, 4, gen)

    def fwd(p):
        return qk.flow_matching_loss(p, a, z, t, "vp", e, 3.0, "batch", backend="triton")

    seen = []

    def recording_backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fwd, backend=recording_backend, fullgraph=True)(pred.clone().requires_grad_())
    assert any("triton_fm_loss" in s for s in seen), seen

    torch._dynamo.reset()
    compiled = torch.compile(fwd, backend="aot_eager", fullgraph=True)
    p = pred.clone().requires_grad_()
    loss = compiled(p)
    loss.backward()
    p2 = pred.clone().requires_grad_()
    ref = fwd(p2)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(p.grad, p2.grad)
    torch._dynamo.reset()


# ---- GPU only: 16-bit dtypes, CUDA graphs ----

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("normalize", ("support", "batch"))
def test_gpu_16bit_within_2x_of_torch(dtype, path, normalize, gen):
    """Flash-attention rule: the fused op is at most ~2x as far from the float64 truth as the
    reference computed by PyTorch in the same precision."""
    for shape in ((256, 64, 6), (3, 17, 6), (1000, 1, 7)):
        pred, a, z, t, e, pw = _inputs(*shape, gen, dtype=dtype, energy_scale=3.0, with_pw=True)
        _check_fm_16(pred, a, z, t, path, e, 3.0, normalize, pw)


def _check_fm_16(pred, a, z, t, path, e, beta, norm, pw):
    f = lambda p: qk.flow_matching_loss(p, a, z, t, path, e, beta, norm, pw, backend="triton")  # noqa: E731
    loss, g = _grad(f, pred)
    d = lambda x: x.double()  # noqa: E731
    r64 = lambda p: ref_loss.flow_matching_loss(p, d(a), d(z), d(t), path, d(e), beta, norm, d(pw))  # noqa: E731
    loss64, g64 = _grad(r64, pred.double())
    r16 = lambda p: ref_loss.flow_matching_loss(p, a, z, t, path, e, beta, norm, pw)  # noqa: E731
    loss16, g16 = _grad(r16, pred)
    assert loss.dtype == pred.dtype and g.dtype == pred.dtype
    eps = torch.finfo(pred.dtype).eps
    assert_as_good_as_torch(loss, loss16, loss64, "loss", atol=eps)
    assert_as_good_as_torch(g, g16, g64, "grad_pred", atol=eps)


@pytest.mark.gpu
def test_gpu_float32_large(gen):
    pred, a, z, t, e, pw = _inputs(4096, 64, 6, gen, energy_scale=300.0, with_pw=True)
    for norm in ("support", "batch"):
        _check_fm(pred, a, z, t, "ot", e, 3.0, norm, pw)


@pytest.mark.gpu
@pytest.mark.parametrize("normalize", ("support", "batch"))
def test_gpu_cuda_graph_capture(normalize, gen):
    """Forward and backward capture in a CUDA graph (no host sync in the launch path) and replay
    on new input values."""
    pred, a, z, t, e, _ = _inputs(64, 17, 6, gen)
    p = pred.clone().requires_grad_()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up (compiles the kernels)
            p.grad = None
            qk.flow_matching_loss(p, a, z, t, "ot", e, 3.0, normalize, backend="triton").backward()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    p.grad = None
    with torch.cuda.graph(graph):
        loss = qk.flow_matching_loss(p, a, z, t, "ot", e, 3.0, normalize, backend="triton")
        loss.backward()
    new = _inputs(64, 17, 6, gen)
    with torch.no_grad():
        p.copy_(new[0])
        a.copy_(new[1])
        z.copy_(new[2])
        e.copy_(new[4])
        p.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    loss_ref, g_ref = _grad(lambda q: ref_loss.flow_matching_loss(q, a.double(), z.double(), t.double(), "ot",
                                                                  e.double(), 3.0, normalize), p.detach().double())
    torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(p.grad.double(), g_ref, rtol=1e-4, atol=1e-6)
