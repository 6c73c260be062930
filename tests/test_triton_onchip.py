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

from qipo_kernels import ops
from qipo_kernels.nets import ConditionalMLP, DoubleCritic
from qipo_kernels.reference import ode as ref_ode
from qipo_kernels.triton import _host
from qipo_kernels.triton import sampler as ts
from qipo_kernels.triton import sampler_launch as tl_launch
from qipo_kernels.triton import sampler_pack as tpack

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
    obs = torch.randn(B, 17, generator=g).to(DEV)
    noise = torch.randn(B, K, 6, generator=g).to(DEV)
    args = (obs, K, "flow", 2, "euler", None, None, "argmax", 1.0, noise, None, None, None, True)
    ref = ops._act_ref(net, critic, *args)
    out = ops.act(net, critic, *args[:-1], backend="triton")
    # candidates and their scores from the float64 reference: the pick must be the float64 argmax
    cand = ref_ode._integrate(net, noise, obs, 2, "euler", 0.0, 1.0, None, False).clamp(-1, 1)
    q64 = copy.deepcopy(critic).double().q_min(obs.double().repeat_interleave(K, 0),
                                               cand.double().reshape(B * K, -1)).reshape(B, K)
    gap = q64.sort(1, descending=True).values
    assert (gap[:, 0] - gap[:, 1]).min() > 1e-4, "test data: a near tie between the two best candidates"
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
    obs = torch.randn(B, 17, generator=g).to(DEV)
    noise = torch.randn(B, K, 6, generator=g).to(DEV)
    cand = ref_ode._integrate(net, noise, obs, 1, "euler", 0.0, 1.0, None, False).clamp(-1, 1)
    q64 = copy.deepcopy(critic).double().q_min(obs.double().repeat_interleave(K, 0),
                                               cand.double().reshape(B * K, -1)).reshape(B, K)
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
