"""Triton candidate selection against ops._select_ref / reference.select.

Selection is a gather, so results must be *equal* to the reference (same index), not close.
Runs on the CPU under TRITON_INTERPRET=1; outputs are poisoned with NaN before the kernel writes them.
"""
import pytest
import torch

import qipo_kernels as qk
from qipo_kernels import backends, ops

sel_mod = pytest.importorskip("qipo_kernels.triton.select")
from qipo_kernels.triton import _host  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(3, 17, 6), (5, 1, 1), (2, 64, 7), (20, 50, 6), (4, 300, 3)]  # K = 300 > one chunk


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    calls = []

    def nan_empty(shape, dtype, device):
        calls.append(tuple(shape))
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_host, "empty", nan_empty)
    return calls


def _inputs(B, K, D, gen, dtype=torch.float32, q_scale=1.0, ties=False):
    q = torch.randn(B, K, generator=gen, dtype=torch.float64) * q_scale
    if ties and K > 2:
        q[:, K // 3] = q.max(dim=1).values  # the max occurs twice: the first index must win
        q[:, K - 1] = q[:, K // 3]
    c = torch.randn(B, K, D, generator=gen, dtype=torch.float64)
    return q.to(dtype=dtype, device=DEV), c.to(dtype=dtype, device=DEV)


def _both(q, c, mode, temperature=1.0, uniform=None, seed=None):
    g1 = torch.Generator(device=q.device).manual_seed(seed) if seed is not None else None
    g2 = torch.Generator(device=q.device).manual_seed(seed) if seed is not None else None
    fast = qk.select_action(q, c, mode, temperature, uniform, g1, backend="triton")
    ref = ops._select_ref(q, c, mode, temperature, uniform, g2)
    return fast, ref


@pytest.mark.parametrize("shape", SHAPES)
def test_argmax_matches_reference(shape, gen, poison):
    for ties in (False, True):
        q, c = _inputs(*shape, gen, ties=ties)
        fast, ref = _both(q, c, "argmax")
        assert fast.shape == (shape[0], shape[2]) and fast.dtype == c.dtype
        assert torch.equal(fast, ref)
    assert poison, "outputs were not allocated through the poisoning hook"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", (0.05, 1.0, 30.0))
def test_softmax_draw_matches_reference(shape, temperature, gen):
    q, c = _inputs(*shape, gen)
    u = torch.rand(shape[0], generator=gen).to(DEV)
    fast, ref = _both(q, c, "softmax", temperature, u)
    assert torch.equal(fast, ref)
    fast, ref = _both(q, c, "softmax", temperature, None, seed=7)  # u drawn on the host from the generator
    assert torch.equal(fast, ref)


def test_softmax_draw_is_inverse_cdf(gen):
    """Independent of the reference: index = #{k : cdf[k] <= u}, capped at K - 1."""
    q, c = _inputs(64, 9, 2, gen)
    u = torch.rand(64, generator=gen, dtype=torch.float64)
    idx_c = torch.arange(9, dtype=torch.float64)[None, :, None].expand(64, 9, 2).contiguous()
    fast = qk.select_action(q, idx_c.float(), "softmax", 1.0, u, backend="triton")[:, 0].long()
    cdf = torch.softmax(q.double(), 1).cumsum(1)
    for b in range(64):
        k = int(fast[b])
        assert (k == 0 or cdf[b, k - 1] <= u[b]) and (k == 8 or cdf[b, k] > u[b])


def test_softmax_edges(gen):
    q, c = _inputs(6, 11, 3, gen, q_scale=1e5)  # q / T ~ 1e5: exactly one-hot in float64, no overflow
    u = torch.tensor([0.0, 0.5, 0.999999, 1 - 2 ** -53, 0.25, 0.75], dtype=torch.float64)
    fast, ref = _both(q, c, "softmax", 1.0, u)
    assert torch.equal(fast, ref)
    fast_arg, _ = _both(q, c, "argmax")
    assert torch.equal(fast, fast_arg)
    q1, c1 = _inputs(3, 1, 4, gen)  # K = 1: always candidate 0
    fast, ref = _both(q1, c1, "softmax", 1.0, torch.tensor([0.0, 0.5, 0.9]))
    assert torch.equal(fast, ref) and torch.equal(fast, c1[:, 0])


def test_chunked_k_and_d(monkeypatch, gen):
    """Small blocks force the loops over K (argmax carry, online softmax, cdf carry) and over D."""
    monkeypatch.setattr(sel_mod, "TILE", 16)
    monkeypatch.setattr(sel_mod, "MAX_BLOCK_K", 4)
    monkeypatch.setattr(sel_mod, "MAX_BLOCK_D", 2)
    for shape in ((5, 19, 7), (3, 8, 1)):
        q, c = _inputs(*shape, gen, ties=True)
        fast, ref = _both(q, c, "argmax")
        assert torch.equal(fast, ref)
        u = torch.rand(shape[0], generator=gen)
        fast, ref = _both(q, c, "softmax", 0.5, u)
        assert torch.equal(fast, ref)


def test_float64_and_mixed_dtypes(gen):
    q, c = _inputs(7, 13, 5, gen, dtype=torch.float64)
    q[:, 3] = q.max(1).values + 1e-12  # distinct in float64 only: must not be rounded into a tie
    q[:, 5] = q[:, 3] - 1e-12
    fast, ref = _both(q, c, "argmax")
    assert torch.equal(fast, ref)
    fast, ref = _both(q, c.float(), "softmax", 1.0, torch.rand(7, generator=gen))
    assert torch.equal(fast, ref)


def test_non_contiguous(gen):
    q, c = _inputs(6, 10, 4, gen)
    qn = q.t().contiguous().t()
    cn = c.transpose(0, 1).contiguous().transpose(0, 1)
    assert not qn.is_contiguous() and not cn.is_contiguous()
    for mode in ("argmax", "softmax"):
        fast, ref = _both(qn, cn, mode, 1.0, torch.rand(6, generator=gen) if mode == "softmax" else None)
        assert torch.equal(fast, ref)


def test_dispatch_and_reasons(gen):
    backends._load("triton")
    assert "triton" not in backends._IMPORT_ERRORS and "triton" in backends._IMPLS["select_action"]
    q, c = _inputs(2, 3, 4, gen)
    c.requires_grad_(True)
    why = backends.explain("select_action", q.device, q_values=q, candidates=c, mode="argmax")
    assert why["torch"] == [] and any("grad" in r for r in why["triton"]), why
    with pytest.raises(RuntimeError, match="grad"):
        qk.select_action(q, c, backend="triton")
    with torch.no_grad():
        assert torch.equal(qk.select_action(q, c, backend="triton"), ops._select_ref(q, c, "argmax", 1.0, None, None))
    why = backends.explain("select_action", q.device, q_values=q.to(torch.int64), candidates=c.detach(), mode="argmax")
    assert any("dtype" in r for r in why["triton"]), why


@pytest.mark.parametrize("bad", ["q_shape", "cand_shape", "q_nan", "mode", "temperature", "uniform_range",
                                 "uniform_shape", "device"])
def test_bad_input_raises_before_launch(bad, monkeypatch, gen):
    def boom(*a, **k):
        raise AssertionError("a kernel was launched on bad input")

    monkeypatch.setattr(sel_mod, "_select_launch", boom)
    q, c = _inputs(3, 5, 2, gen)
    kw = dict(mode="softmax", temperature=1.0, uniform=torch.rand(3, generator=gen))
    if bad == "q_shape":
        q = q[0]
    elif bad == "cand_shape":
        c = c[:, :4]
    elif bad == "q_nan":
        q = q.clone()
        q[1, 2] = float("nan")
    elif bad == "mode":
        kw["mode"] = "max"
    elif bad == "temperature":
        kw["temperature"] = -1.0
    elif bad == "uniform_range":
        kw["uniform"] = torch.full((3,), 1.0)
    elif bad == "uniform_shape":
        kw["uniform"] = torch.rand(4, generator=gen)
    elif bad == "device":
        c = c.to("meta")
    with pytest.raises((ValueError, TypeError)):
        qk.select_action(q, c, backend="triton", **kw)


def test_fake_impl_and_opcheck(gen):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = torch.ops.qipo_kernels.triton_select_action(torch.empty(4, 9), torch.empty(4, 9, 3, dtype=torch.float64),
                                                          True, 1.0, torch.empty(4))
        assert out.shape == (4, 3) and out.dtype == torch.float64
    q, c = _inputs(4, 9, 3, gen)
    torch.library.opcheck(torch.ops.qipo_kernels.triton_select_action.default, (q, c, False, 1.0, None))
    torch.library.opcheck(torch.ops.qipo_kernels.triton_select_action.default, (q, c, True, 0.5, torch.rand(4)))


def test_torch_compile_fullgraph(gen):
    q, c = _inputs(5, 12, 3, gen)
    u = torch.rand(5, generator=gen)

    def f(q, c, u):
        return (qk.select_action(q, c, "argmax", backend="triton"),
                qk.select_action(q, c, "softmax", 0.5, u, backend="triton"))

    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, c, u)
    want = f(q, c, u)
    torch._dynamo.reset()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---- GPU only ----

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32))
def test_gpu_dtypes(dtype, gen):
    for shape in ((256, 50, 6), (1, 50, 6), (1000, 64, 17)):
        q, c = _inputs(*shape, gen, dtype=dtype, ties=True)
        fast, ref = _both(q, c, "argmax")
        assert torch.equal(fast, ref)
        u = torch.rand(shape[0], generator=gen).to(DEV)
        fast, ref = _both(q, c, "softmax", 1.0, u)
        assert torch.equal(fast, ref)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture(gen):
    q, c = _inputs(256, 50, 6, gen)
    u = torch.rand(256, generator=gen).to(DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            qk.select_action(q, c, "softmax", 1.0, u, backend="triton")
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = qk.select_action(q, c, "softmax", 1.0, u, backend="triton")
    q2, c2 = _inputs(256, 50, 6, gen)
    q.copy_(q2)
    c.copy_(c2)
    u.copy_(torch.rand(256, generator=gen).to(DEV))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ops._select_ref(q, c, "softmax", 1.0, u, None))
