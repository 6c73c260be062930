"""The fused sampler's on-chip network evaluation (mlp.mlp_eval, layer pairing) on the structures
it has to get right: every depth parity (layer 1 blocked or full width, one to three pairs), hidden
widths padded to a power of two (17 -> 32, 100 -> 128, 300 -> 512), several column blocks per
layer (BN forced down to 16), LayerNorm critics whose normalised layers fall on blocked (first of
a pair) and on full-width positions, large pre-activation means (the blocked LayerNorm statistics),
NaN-poisoned outputs. Compared with the plain-PyTorch reference in float32 and with float64 truth
(the reference run on a float64 copy). Interpreter only (float32); bf16 / fp16 need a GPU.
"""
import copy

import pytest
import torch
import triton
import triton.language as tl

from qipo_kernels import ops
from qipo_kernels.nets import ConditionalMLP, DoubleCritic
from qipo_kernels.reference import ode as ref_ode
from qipo_kernels.triton import _host
from qipo_kernels.triton import sampler as ts
from qipo_kernels.triton import sampler_launch as tl_launch
from qipo_kernels.triton import sampler_pack as tpack
from qipo_kernels.triton.mlp import tf32_split

DEV = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = {torch.float32: 3e-5}


# every buffer the kernels write starts as NaN, every test under no_grad (conftest.poisoned_buffers)
pytestmark = pytest.mark.usefixtures("poisoned_buffers")


@pytest.fixture(params=[16, 64], ids=["BN16", "BN64"])
def column_block(request, monkeypatch):
    """Column block of the interpreter launches: 16 gives several blocks per layer at every width
    here (the pairing loop, its blocked LayerNorm statistics, partially padded last blocks)."""
    monkeypatch.setattr(tl_launch, "INTERPRET_BN", request.param)
    return request.param


def _err(out, ref):
    return (out.double() - ref.double()).abs().max().item()


def _close(out, ref, truth, dtype=torch.float32):
    """No NaN; within RTOL of the float32 reference and of the float64 truth (scaled by max(1, |truth|))."""
    assert out.shape == ref.shape == truth.shape
    assert torch.isfinite(out).all(), "kernel left NaN / inf in its output"
    scale = max(1.0, truth.abs().max().item())
    tol = RTOL[dtype] * scale
    assert _err(out, ref) <= tol, f"vs reference: {_err(out, ref):.3g} > {tol:.3g}"
    assert _err(out, truth) <= tol + _err(ref, truth), f"vs float64: {_err(out, truth):.3g}"


def _net(H, depth, act="mish", seed=0, A=6, S=17):
    torch.manual_seed(seed)
    return ConditionalMLP(A, S, hidden=H, depth=depth, activation=act, time_embedding="sinusoidal").to(DEV)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("H", [17, 100])
def test_policy_every_depth_parity_and_padded_width(H, depth, column_block):
    net = _net(H, depth, act="silu", seed=depth)
    g = torch.Generator().manual_seed(10 * depth + H)
    x0 = torch.randn(2, 7, 6, generator=g).to(DEV)  # 14 rows: a partial tile
    obs = torch.randn(2, 17, generator=g).to(DEV)
    ref = ref_ode._integrate(net, x0, obs, 2, "heun", 0.0, 1.0, "ot", False)
    truth = ref_ode._integrate(copy.deepcopy(net).double(), x0.double(), obs.double(), 2, "heun", 0.0, 1.0, "ot",
                               False)
    out = ts.integrate(net, x0, obs, 2, "heun", 0.0, 1.0, "ot", False)
    _close(out, ref, truth)


def test_policy_wide_padded_to_512():
    # 300 -> 512: most of every block is padding; depth 3 (two blocked pairs)
    net = _net(300, 3, act="gelu", seed=3)
    g = torch.Generator().manual_seed(30)
    x0 = torch.randn(5, 6, generator=g).to(DEV)
    obs = torch.randn(5, 17, generator=g).to(DEV)
    assert tpack._pad_hidden(300) == 512
    ref = ref_ode._integrate(net, x0, obs, 1, "euler", 0.0, 1.0, None, False)
    truth = ref_ode._integrate(copy.deepcopy(net).double(), x0.double(), obs.double(), 1, "euler", 0.0, 1.0, None,
                               False)
    _close(ts.integrate(net, x0, obs, 1, "euler", 0.0, 1.0, None, False), ref, truth)


def _picked(out, cand):
    """Index of the candidate each state's action is (nearest row of cand [B, K, A]); asserts it is one."""
    d = (out[:, None, :].double() - cand.double()).abs().amax(-1)
    assert (d.min(1).values <= 1e-5).all(), "the action is none of the candidates"
    return d.argmin(1)


def _ln_critic(H, depth, shift, seed):
    torch.manual_seed(seed)
    critic = DoubleCritic(17, 6, hidden=H, depth=depth, activation="mish", layer_norm=True).to(DEV)
    for m in critic.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.3, 0.3)
        elif isinstance(m, torch.nn.Linear) and m.out_features == H:
            m.bias.add_(shift)  # a large common offset: the LayerNorm statistics must not cancel
    return critic


def _float64_candidates(net, critic, g, B, K, steps):
    """obs [B, 17] and noise [B, K, 6] drawn from g; the candidates of ``steps`` Euler steps from that noise
    (clamped, [B, K, 6]) and their min-Q scored in float64 ([B, K])."""
    obs = torch.randn(B, 17, generator=g).to(DEV)
    noise = torch.randn(B, K, 6, generator=g).to(DEV)
    cand = ref_ode._integrate(net, noise, obs, steps, "euler", 0.0, 1.0, None, False).clamp(-1, 1)
    q64 = copy.deepcopy(critic).double().q_min(obs.double().repeat_interleave(K, 0),
                                               cand.double().reshape(B * K, -1)).reshape(B, K)
    return obs, noise, cand, q64


def _assert_no_near_tie(q64):
    gap = q64.sort(1, descending=True).values
    assert (gap[:, 0] - gap[:, 1]).min() > 1e-4, "test data: a near tie between the two best candidates"


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("H,shift", [(24, 0.0), (100, 30.0)])
def test_layer_norm_critic_every_position(depth, H, shift, column_block):
    """Depth 1 / 3: layer 1 (and at 3 the second hidden layer) normalised inside the blocked loop
    (two passes, merged block statistics); depth 2 / 4: layer 1 full width, then blocked and
    full-width (second of a pair) positions."""
    net = _net(24, 2, seed=5)
    critic = _ln_critic(H, depth, shift, seed=20 + depth)
    g = torch.Generator().manual_seed(40 + depth)
    B, K = 3, 5
    # candidates and their scores from the float64 reference: the pick must be the float64 argmax
    obs, noise, cand, q64 = _float64_candidates(net, critic, g, B, K, 2)
    args = (obs, K, "flow", 2, "euler", None, None, "argmax", 1.0, noise, None, None, None, True)
    ref = ops._act_ref(net, critic, *args)
    out = ops.act(net, critic, *args[:-1], backend="triton")
    _assert_no_near_tie(q64)
    truth = cand[torch.arange(B), q64.argmax(1)]
    _close(out, ref, truth)
    assert torch.equal(_picked(out, cand), q64.argmax(1))  # the kernel picked the float64 best candidate


def test_critic_scores_match_float64_through_blocked_layer_norm(column_block, monkeypatch):
    """The LayerNorm critic's scores (not only the argmax) agree with float64: act with softmax
    selection at a temperature where the draw is decided by score differences of ~1e-3."""
    net = _net(24, 1, seed=6)
    critic = _ln_critic(100, 3, 30.0, seed=7)
    g = torch.Generator().manual_seed(8)
    B, K = 4, 6
    obs, noise, cand, q64 = _float64_candidates(net, critic, g, B, K, 1)
    temp = 0.05
    cdf = torch.softmax(q64 / temp, 1).cumsum(1)
    u = torch.empty(B, dtype=torch.float64)
    for b in range(B):  # a u in the middle of each candidate interval, away from every boundary
        lo = torch.cat([torch.zeros(1, dtype=torch.float64), cdf[b, :-1]])
        k = int(torch.argmax(cdf[b] - lo))
        u[b] = 0.5 * (lo[k] + cdf[b, k])
    args = (obs, K, "flow", 1, "euler", None, None, "softmax", temp, noise, None, u.to(DEV), None, True)
    out = ops.act(net, critic, *args[:-1], backend="triton")
    idx = (cdf <= u[:, None]).sum(1).clamp(max=K - 1)
    assert len(set(idx.tolist())) > 1 or len(set(q64.argmax(1).tolist())) > 1  # not a constant pick
    assert torch.equal(_picked(out, cand), idx)


def test_nan_in_one_sample_stays_in_its_row(column_block):
    """A NaN noise row poisons only its own sample: rows share weight blocks, never activations."""
    net = _net(100, 3, seed=9)
    g = torch.Generator().manual_seed(9)
    x0 = torch.randn(10, 6, generator=g).to(DEV)
    obs = torch.randn(10, 17, generator=g).to(DEV)
    x0[3, 2] = float("nan")
    ref = ref_ode._integrate(net, x0, obs, 2, "euler", 0.0, 1.0, None, False)
    out = ts.integrate(net, x0, obs, 2, "euler", 0.0, 1.0, None, False)
    assert torch.isnan(out[3]).all() and torch.isnan(ref[3]).all()
    keep = torch.ones(10, dtype=torch.bool)
    keep[3] = False
    torch.testing.assert_close(out[keep], ref[keep], rtol=3e-5, atol=3e-5)


def test_launcher_allocates_no_scratch(monkeypatch):
    """The launch allocates nothing but its outputs: no activation or obs-share scratch."""
    sizes = []

    def record(shape, dtype, device):
        sizes.append(tuple(shape))
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_host, "empty", record)
    net = _net(40, 3, seed=1)
    x0 = torch.randn(9, 6, device=DEV)
    obs = torch.randn(9, 17, device=DEV)
    ts.integrate(net, x0, obs, 1, "euler", 0.0, 1.0, None, False)
    assert sizes == [(9, 6)]
    p = tl_launch.make_plan(0, tpack._policy_tensors(net, torch.float32, torch.device(DEV)), [], 9, 1, 6, 1, 0, 0,
                            0, 3, 0, 1, 1, False, 0.0, False, False, False, False, torch.float32, torch.device(DEV))
    assert not hasattr(p, "scratch") and not any("osh" in k or "hbuf" in k or k in ("HS", "BK", "BKS") for k in p.meta)


# ------------------------------------------------------------------------ float32 on tensor cores (TF32x3)
def _tf32_truncate(a):
    """What a TF32 tensor-core product reads of float32 operands: the 13 low mantissa bits ignored."""
    import numpy as np

    return (np.ascontiguousarray(a, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


@pytest.fixture
def tf32_products(monkeypatch):
    """The interpreter's tl.dot is an exact float32 product whatever input_precision says; with this
    fixture a dot with input_precision="tf32" reads its operands truncated to TF32, as the tensor
    cores do, so the TF32x3 code path (mlp.dot, PREC_TF32X3) is checked for its accuracy and not
    only for its arithmetic."""
    from triton._C.libtriton import ir
    from triton.runtime import interpreter as tri

    orig = tri.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if input_precision == ir.INPUT_PRECISION.TF32 and a.data.dtype == b.data.dtype == "float32":
            a = tri.TensorHandle(_tf32_truncate(a.data), a.dtype.scalar)
            b = tri.TensorHandle(_tf32_truncate(b.data), b.dtype.scalar)
        return orig(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(tri.InterpreterBuilder, "create_dot", create_dot)


def _force_precision(monkeypatch, precision):
    monkeypatch.setattr(tl_launch, "prec", lambda dtype, device: precision)


@pytest.mark.parametrize("H,depth", [(100, 3), (300, 2)])
def test_tf32x3_matches_float64_at_float32_tolerance(H, depth, tf32_products, monkeypatch):
    """float32 on tensor cores, TF32x3 (the float32 default on a GPU), through every place the
    kernel multiplies: layer 1 (x and obs parts), the split-K hidden-layer dots (128 = 4 chunks,
    512 = 16 chunks of K_SPLIT), the pair's second dot, the output layer. Within the float32
    tolerance of the reference and of float64 truth; plain TF32 under the same emulation is not
    (so the emulation is on and the low halves matter)."""
    from qipo_kernels.triton.mlp import PREC_TF32, PREC_TF32X3

    net = _net(H, depth, seed=H + depth)
    g = torch.Generator().manual_seed(H)
    x0 = torch.randn(3, 7, 6, generator=g).to(DEV)
    obs = torch.randn(3, 17, generator=g).to(DEV)
    ref = ref_ode._integrate(net, x0, obs, 2, "midpoint", 0.0, 1.0, None, False)
    truth = ref_ode._integrate(copy.deepcopy(net).double(), x0.double(), obs.double(), 2, "midpoint", 0.0, 1.0,
                               None, False)
    _force_precision(monkeypatch, PREC_TF32X3)
    x3 = ts.integrate(net, x0, obs, 2, "midpoint", 0.0, 1.0, None, False)
    _close(x3, ref, truth)
    _force_precision(monkeypatch, PREC_TF32)
    tf32 = ts.integrate(copy.deepcopy(net), x0, obs, 2, "midpoint", 0.0, 1.0, None, False)
    tol = RTOL[torch.float32] * max(1.0, truth.abs().max().item())
    assert _err(tf32, truth) > tol + _err(ref, truth), "plain TF32 would pass too: is the emulation on?"
    assert 10 * _err(x3, truth) < _err(tf32, truth)


def test_tf32x3_act_with_layer_norm_critic(tf32_products, monkeypatch):
    """act in TF32x3: the twin LayerNorm critic (blocked statistics, split-K P layers) scores the
    candidates as float64 does: the kernel picks the float64 best candidate."""
    from qipo_kernels.triton.mlp import PREC_TF32X3

    net = _net(24, 2, seed=5)
    critic = _ln_critic(100, 3, 30.0, seed=23)
    g = torch.Generator().manual_seed(24)
    B, K = 3, 5
    obs, noise, cand, q64 = _float64_candidates(net, critic, g, B, K, 2)
    _assert_no_near_tie(q64)
    _force_precision(monkeypatch, PREC_TF32X3)
    out = ops.act(net, critic, obs, num_candidates=K, sampler="flow", steps=2, solver="euler", mode="argmax",
                  noise=noise, backend="triton")
    assert torch.equal(_picked(out, cand), q64.argmax(1))


@triton.jit
def _split_kernel(x_ptr, hi_ptr, lo_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < n
    hi, lo = tf32_split(tl.load(x_ptr + offs, mask=m, other=0.0))
    tl.store(hi_ptr + offs, hi, mask=m)
    tl.store(lo_ptr + offs, lo, mask=m)


def test_tf32_split_is_exact_and_high_part_is_tf32():
    """mlp.tf32_split: hi has the 13 low mantissa bits clear (exact in TF32), hi + lo == x exactly,
    |lo| < one TF32 ulp of x; zeros, subnormals, huge values, signs."""
    g = torch.Generator().manual_seed(31)
    x = torch.cat([torch.randn(900, generator=g) * 10.0 ** torch.randint(-30, 30, (900,), generator=g),
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-40, -3e-39, 3e38, -3e38, 1.0 + 2 ** -23])]).float()
    n = x.numel()
    hi, lo = torch.empty_like(x), torch.empty_like(x)
    _split_kernel[(1,)](x, hi, lo, n, BLOCK=1024)
    assert ((hi.view(torch.int32) & 0x1FFF) == 0).all()
    assert torch.equal(hi + lo, x)
    normal = x.abs() >= torch.finfo(torch.float32).tiny
    assert (lo.abs() <= x.abs() * 2.0 ** -10)[normal].all()  # below one TF32 ulp of x
    assert (lo.abs() < 2.0 ** -136)[~normal].all()  # subnormals: the 13 cleared bits are worth < 2^-136
