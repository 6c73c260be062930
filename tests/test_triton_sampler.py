"""Fused Triton samplers (qipo_kernels.triton.sampler) against the plain-PyTorch references.

On a CPU these run under TRITON_INTERPRET=1 (set by conftest.py) in float32, on small odd
shapes; every buffer the kernel writes (its outputs: it has no scratch) is poisoned with NaN first, so
an element the kernel leaves unwritten fails.
bf16/fp16/tf32 checks need a GPU (marked gpu): there the fused result may be at most ~2x as far
from the float64 truth as PyTorch eager in the same precision.
"""

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from qipo_kernels import backends, ops
from qipo_kernels.nets import ConditionalMLP, DoubleCritic
from qipo_kernels.reference import consistency as ref_cons
from qipo_kernels.reference import ode as ref_ode
from qipo_kernels.triton import sampler as ts
from qipo_kernels.triton import sampler_launch as tl_launch
from qipo_kernels.triton import sampler_pack as tpack
from qipo_kernels.triton import sampler_supports
from qipo_kernels.triton.sampler_kernel import cos_2pi, philox_randn

DEV = "cuda" if torch.cuda.is_available() else "cpu"


# every buffer the kernels write starts as NaN, every test under no_grad (conftest.poisoned_buffers)
pytestmark = pytest.mark.usefixtures("poisoned_buffers")


def _net(A=6, S=17, H=24, depth=3, act="mish", emb="sinusoidal", seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return ConditionalMLP(A, S, hidden=H, depth=depth, activation=act, time_embedding=emb).to(DEV, dtype)


def _close(out, ref, rel=3e-5):
    """max |out - ref| <= rel * max(1, max |ref|) and no NaN."""
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), "kernel left NaN / inf in its output"
    scale = max(1.0, ref.abs().max().item())
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel * scale:.3g}"


SOLVER_PATHS = [("euler", None), ("midpoint", None), ("heun", "ot"), ("rk4", None), ("ddim", "vp"),
                ("dpm1", "ot-eps"), ("dpm2", "vp"), ("dpm2", "ot-eps")]


@pytest.mark.parametrize("solver,path", SOLVER_PATHS)
def test_integrate_every_solver(solver, path):
    net = _net()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(19, 6, generator=g).to(DEV)
    obs = torch.randn(19, 17, generator=g).to(DEV)
    ref = ref_ode._integrate(net, x0, obs, 3, solver, 0.0, 1.0, path, False)
    out = ts.integrate(net, x0, obs, 3, solver, 0.0, 1.0, path, False)
    _close(out, ref)


@pytest.mark.parametrize("act", ["mish", "silu", "relu", "gelu", "tanh"])
@pytest.mark.parametrize("emb", ["sinusoidal", "fourier", "raw"])
def test_integrate_activations_and_time_embeddings(act, emb):
    depth = 1 if (act, emb) in {("mish", "raw"), ("relu", "fourier"), ("tanh", "sinusoidal"), ("gelu", "raw")} else 3
    net = _net(A=1, S=3, H=40, depth=depth, act=act, emb=emb, seed=hash((act, emb)) % 1000)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 5, 1, generator=g).to(DEV)  # [B, K, A] layout
    obs = torch.randn(3, 3, generator=g).to(DEV)
    ref = ref_ode._integrate(net, x0, obs, 2, "heun", 0.1, 0.9, None, False)
    out = ts.integrate(net, x0, obs, 2, "heun", 0.1, 0.9, None, False)
    _close(out, ref)


@pytest.mark.parametrize("layout", ["flat", "grouped"])
def test_integrate_layouts_many_tiles_and_trajectory(layout):
    # 70 samples = 5 tiles of 16 on 2 persistent programs; hidden 100 -> padded 128, 2 column blocks;
    # obs dim 70 -> padded 128, 2 K blocks; act dim 3.
    net = _net(A=3, S=70, H=100, depth=2, act="silu", emb="fourier")
    g = torch.Generator().manual_seed(3)
    if layout == "flat":
        x0 = torch.randn(70, 3, generator=g).to(DEV)
        obs = torch.randn(70, 70, generator=g).to(DEV)
    else:
        x0 = torch.randn(7, 10, 3, generator=g).to(DEV)
        obs = torch.randn(7, 70, generator=g).to(DEV)
    ref, ref_tr = ref_ode._integrate(net, x0, obs, 2, "midpoint", 0.0, 1.0, None, True)
    out, tr = ts.integrate(net, x0, obs, 2, "midpoint", 0.0, 1.0, None, True)
    _close(out, ref)
    _close(tr, ref_tr)
    assert tr.shape == (3,) + tuple(x0.shape)


@pytest.mark.parametrize("H,depth", [(512, 6), (300, 2)])
def test_integrate_widest_and_deepest(H, depth):
    # the limits (512 wide, 6 deep) and a width that is not a multiple of the 64-column blocks
    net = _net(A=6, S=17, H=H, depth=depth, act="gelu", emb="sinusoidal")
    g = torch.Generator().manual_seed(8)
    x0 = torch.randn(5, 6, generator=g).to(DEV)
    obs = torch.randn(5, 17, generator=g).to(DEV)
    ref = ref_ode._integrate(net, x0, obs, 1, "euler", 0.0, 1.0, None, False)
    out = ts.integrate(net, x0, obs, 1, "euler", 0.0, 1.0, None, False)
    _close(out, ref)


def test_integrate_obs_share_per_state_matches_repeated_obs():
    # [B, K, A] with obs [B, S] must equal [B*K, A] with the obs rows repeated.
    net = _net(H=24, depth=1, act="relu")
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(4, 6, 6, generator=g).to(DEV)
    obs = torch.randn(4, 17, generator=g).to(DEV)
    a = ts.integrate(net, x0, obs, 2, "euler", 0.0, 1.0, None, False)
    b = ts.integrate(net, x0.reshape(24, 6), obs.repeat_interleave(6, 0), 2, "euler", 0.0, 1.0, None, False)
    assert torch.equal(a.reshape(24, 6), b)


def test_integrate_through_ops_dispatch():
    net = _net(H=24, depth=2)
    x0 = torch.randn(5, 6, device=DEV)
    obs = torch.randn(5, 17, device=DEV)
    ref = ops.integrate(net, x0, obs, steps=4, solver="rk4", backend="torch")
    out = ops.integrate(net, x0, obs, steps=4, solver="rk4", backend="triton")
    _close(out, ref)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(A=st.integers(1, 40), S=st.integers(1, 80), H=st.integers(8, 130), depth=st.integers(1, 4),
       act=st.sampled_from(["mish", "silu", "relu", "gelu", "tanh"]),
       emb=st.sampled_from(["sinusoidal", "fourier", "raw"]), B=st.integers(1, 9), K=st.integers(1, 20),
       sp=st.sampled_from(SOLVER_PATHS))
def test_integrate_random_shapes(A, S, H, depth, act, emb, B, K, sp):
    net = _net(A=A, S=S, H=H, depth=depth, act=act, emb=emb)
    g = torch.Generator().manual_seed(A * 1000 + S)
    x0 = torch.randn(B, K, A, generator=g).to(DEV)
    obs = torch.randn(B, S, generator=g).to(DEV)
    with torch.no_grad():
        ref = ref_ode._integrate(net, x0, obs, 2, sp[0], 0.0, 1.0, sp[1], False)
        out = ts.integrate(net, x0, obs, 2, sp[0], 0.0, 1.0, sp[1], False)
    _close(out, ref)


# ------------------------------------------------------------------------------------ consistency
@pytest.mark.parametrize("sigmas,clip,layout", [(None, True, "flat"), ([2.0, 0.5], True, "grouped"),
                                                ([5.0], False, "flat"), (None, False, "grouped")])
def test_consistency_sample(sigmas, clip, layout):
    net = _net(A=6, S=17, H=40, depth=3, act="mish", emb="sinusoidal")
    g = torch.Generator().manual_seed(5)
    shape = (21, 6) if layout == "flat" else (3, 7, 6)
    z = torch.randn(shape, generator=g).to(DEV)
    obs = torch.randn(shape[0], 17, generator=g).to(DEV)
    sn = torch.randn((len(sigmas),) + shape, generator=g).to(DEV) if sigmas else None
    ref = ref_cons._consistency_sample(net, z, obs, sigmas, sn, 80.0, 0.002, 0.5, clip, None)
    out = ts.consistency_sample(net, z, obs, sigmas, sn, 80.0, 0.002, 0.5, clip, None)
    _close(out, ref)


def test_consistency_step_noise_from_generator_matches_reference_stream():
    net = _net(A=1, S=3, H=24, depth=2, act="tanh")
    z = torch.randn(9, 1, device=DEV)
    obs = torch.randn(9, 3, device=DEV)
    g1 = torch.Generator(device=DEV).manual_seed(7)
    g2 = torch.Generator(device=DEV).manual_seed(7)
    ref = ops.consistency_sample(net, z, obs, sigmas=[3.0, 1.0, 0.2], generator=g1, backend="torch")
    out = ops.consistency_sample(net, z, obs, sigmas=[3.0, 1.0, 0.2], generator=g2, backend="triton")
    _close(out, ref)


# ------------------------------------------------------------------------------------ act
def _safe_uniform(q, temperature, g):
    """u in [0, 1) per state, kept 1e-4 away from every softmax-CDF boundary (so float32 vs float64
    Q values cannot flip the draw)."""
    cdf = torch.softmax(q.double() / temperature, dim=1).cumsum(1)
    u = torch.rand(q.shape[0], dtype=torch.float64, generator=g)
    for b in range(q.shape[0]):
        for _ in range(100):
            if (cdf[b] - u[b]).abs().min() > 1e-4:
                break
            u[b] = torch.rand(1, dtype=torch.float64, generator=g)
    return u


def _ref_q(net, critic, obs, K, sampler, steps, solver, path, sigmas, noise, step_noise):
    if sampler == "flow":
        cand = ref_ode._integrate(net, noise, obs, steps, solver, 0.0, 1.0, path, False)
    else:
        cand = ref_cons._consistency_sample(net, noise, obs, sigmas, step_noise, 80.0, 0.002, 0.5, True, None)
    cand = cand.clamp(-1, 1)
    B = obs.shape[0]
    return critic.q_min(obs.repeat_interleave(K, 0), cand.reshape(B * K, -1)).reshape(B, K)


@pytest.mark.parametrize("sampler,mode,K", [("flow", "argmax", 5), ("flow", "softmax", 17),
                                            ("consistency", "argmax", 1), ("consistency", "softmax", 6)])
def test_act_matches_reference(sampler, mode, K):
    net = _net(A=6, S=17, H=24, depth=2, act="mish")
    torch.manual_seed(11)
    critic = DoubleCritic(17, 6, hidden=40, depth=2, activation="relu").to(DEV)
    g = torch.Generator().manual_seed(6)
    B = 5
    obs = torch.randn(B, 17, generator=g).to(DEV)
    noise = torch.randn(B, K, 6, generator=g).to(DEV)
    sigmas = [1.5] if sampler == "consistency" else None
    sn = torch.randn(1, B, K, 6, generator=g).to(DEV) if sigmas else None
    solver, path = ("euler", None) if sampler == "flow" else ("euler", None)
    q = _ref_q(net, critic, obs, K, sampler, 3, solver, path, sigmas, noise, sn)
    u = _safe_uniform(q.cpu(), 0.05, g).to(DEV) if mode == "softmax" else None
    ref = ops._act_ref(net, critic, obs, K, sampler, 3, solver, path, sigmas, mode, 0.05, noise, sn, u, None, True)
    out = ts.act(net, critic, obs, K, sampler, 3, solver, path, sigmas, mode, 0.05, noise, sn, u, None, True)
    _close(out, ref)
    if mode == "argmax" and K > 1:
        # the pick is really the best candidate (not e.g. always index 0)
        assert not torch.equal(q.argmax(1), torch.zeros_like(q.argmax(1)))


def test_act_dpm2_and_generator_stream():
    net = _net(A=6, S=17, H=24, depth=1, act="gelu", emb="fourier")
    torch.manual_seed(12)
    critic = DoubleCritic(17, 6, hidden=24, depth=3, activation="mish").to(DEV)
    obs = torch.randn(3, 17, device=DEV)
    g1 = torch.Generator(device=DEV).manual_seed(9)
    g2 = torch.Generator(device=DEV).manual_seed(9)
    ref = ops.act(net, critic, obs, num_candidates=4, steps=2, solver="dpm2", path="vp", generator=g1,
                  backend="torch")
    out = ops.act(net, critic, obs, num_candidates=4, steps=2, solver="dpm2", path="vp", generator=g2,
                  backend="triton")
    _close(out, ref)


@pytest.mark.parametrize("mode", ["argmax", "softmax"])
def test_act_layer_norm_critic(mode):
    # CPQL's offline critic: Linear -> LayerNorm -> Mish; gamma / beta made non-trivial.
    net = _net(A=6, S=17, H=24, depth=2, act="mish")
    torch.manual_seed(13)
    critic = DoubleCritic(17, 6, hidden=40, depth=3, activation="mish", layer_norm=True).to(DEV)
    for m in critic.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.3, 0.3)
    g = torch.Generator().manual_seed(14)
    B, K = 6, 7
    obs = torch.randn(B, 17, generator=g).to(DEV)
    noise = torch.randn(B, K, 6, generator=g).to(DEV)
    q = _ref_q(net, critic, obs, K, "flow", 2, "midpoint", None, None, noise, None)
    u = _safe_uniform(q.cpu(), 0.02, g).to(DEV) if mode == "softmax" else None
    ref = ops._act_ref(net, critic, obs, K, "flow", 2, "midpoint", None, None, mode, 0.02, noise, None, u, None, True)
    out = ops.act(net, critic, obs, K, "flow", 2, "midpoint", None, None, mode, 0.02, noise, None, u, backend="triton")
    _close(out, ref)


def test_warm_calls_take_this_calls_inputs():
    """A warm call (its launch remembered under a key of the call's configuration and shapes) runs on
    this call's tensors and scalars: new obs / noise / step-noise values, the temperature and the
    uniform of softmax act, the trajectory; each checked against the reference, cold call then warm."""
    net = _net(H=24, depth=2)
    torch.manual_seed(18)
    critic = DoubleCritic(17, 6, hidden=24, depth=2).to(DEV)
    g = torch.Generator().manual_seed(19)
    B, K = 4, 5
    for temp in (0.05, 0.5, 2.0):
        obs = torch.randn(B, 17, generator=g).to(DEV)
        noise = torch.randn(B, K, 6, generator=g).to(DEV)
        sn = torch.randn(1, B, K, 6, generator=g).to(DEV)
        out, traj = ts.integrate(net, noise, obs, 2, "heun", 0.1, 0.9, None, True)
        rout, rtraj = ref_ode._integrate(net, noise, obs, 2, "heun", 0.1, 0.9, None, True)
        _close(out, rout)
        _close(traj, rtraj)
        _close(ts.integrate(net, noise[:, 0], obs, 2, "heun", 0.1, 0.9, None, False),
               ref_ode._integrate(net, noise[:, 0], obs, 2, "heun", 0.1, 0.9, None, False))
        _close(ts.consistency_sample(net, noise, obs, [1.5], sn, 80.0, 0.002, 0.5, True, None),
               ref_cons._consistency_sample(net, noise, obs, [1.5], sn, 80.0, 0.002, 0.5, True, None))
        q = _ref_q(net, critic, obs, K, "flow", 2, "euler", None, None, noise, None)
        u = _safe_uniform(q.cpu(), temp, g).to(DEV)
        ref = ops._act_ref(net, critic, obs, K, "flow", 2, "euler", None, None, "softmax", temp, noise, None, u, None,
                           True)
        _close(ts.act(net, critic, obs, K, "flow", 2, "euler", None, None, "softmax", temp, noise, None, u, None, True),
               ref)
    plans = tpack.get_pack(net, "policy", torch.float32, obs.device).plans
    warm = {k[0] for k in plans if isinstance(k[0], str)}
    assert warm == {"integrate", "consistency", "act"}  # the warm entries were there to be used


# ------------------------------------------------------------------------------------ cache
def test_packed_weights_refresh_after_optimizer_step():
    net = _net(H=24, depth=2)
    x0 = torch.randn(6, 6, device=DEV)
    obs = torch.randn(6, 17, device=DEV)
    out1 = ts.integrate(net, x0, obs, 2, "euler", 0.0, 1.0, None, False)
    pack1 = tpack.get_pack(net, "policy", torch.float32, x0.device)
    assert tpack.get_pack(net, "policy", torch.float32, x0.device) is pack1  # cached
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with torch.enable_grad():
        loss = net(x0, torch.rand(6, device=DEV), obs).pow(2).sum()
        loss.backward()
    opt.step()
    out2 = ts.integrate(net, x0, obs, 2, "euler", 0.0, 1.0, None, False)
    assert tpack.get_pack(net, "policy", torch.float32, x0.device) is not pack1
    assert not torch.allclose(out1, out2)
    _close(out2, ref_ode._integrate(net, x0, obs, 2, "euler", 0.0, 1.0, None, False))
    # a time-MLP-only change (in-place) also refreshes the time table
    net.time_mlp[1].bias.add_(0.5)
    _close(ts.integrate(net, x0, obs, 2, "euler", 0.0, 1.0, None, False),
            ref_ode._integrate(net, x0, obs, 2, "euler", 0.0, 1.0, None, False))


# ------------------------------------------------------------------------------------ sample (in-kernel noise)
def _zero_velocity_net(A, S, seed=0):
    """A ConditionalMLP whose output layer is zero: velocity 0, so sampling returns the noise itself."""
    net = _net(A=A, S=S, H=16, depth=1, seed=seed)
    with torch.no_grad():
        net.out.weight.zero_()
        net.out.bias.zero_()
    return net


def _corr(a, b):
    return torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1].item()


def test_sample_in_kernel_noise_is_standard_normal_and_seeded():
    """With zero velocity the output is the kernel's noise: independent N(0, 1) draws, reproducible
    per seed, different across seeds, and independent of the tiling (a prefix of the states gets
    the same numbers)."""
    net = _zero_velocity_net(6, 17)
    g = torch.Generator().manual_seed(12)
    obs = torch.randn(16, 17, generator=g).to(DEV)
    z = ops.sample(net, obs, 64, steps=1, seed=2024, backend="triton").cpu().double()  # [16, 64, 6]
    assert z.shape == (16, 64, 6) and torch.isfinite(z).all()
    n = z.numel()
    flat = z.flatten()
    assert abs(flat.mean().item()) < 5 / n ** 0.5
    assert abs(flat.std().item() - 1) < 5 / (2 * n) ** 0.5
    # Kolmogorov-Smirnov distance to the standard normal CDF (p ~ 1e-3 threshold)
    xs = flat.sort().values
    cdf = torch.special.ndtr(xs)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert ks < 1.95 / n ** 0.5, ks
    assert flat.unique().numel() >= n - 2  # no reused Philox offsets
    # independence: across action dims, across samples of a state, across states, in memory order
    r = 5 / (16 * 64) ** 0.5
    c = torch.corrcoef(z.reshape(-1, 6).t())
    assert (c - torch.eye(6, dtype=c.dtype)).abs().max() < r
    assert abs(_corr(z[:, :-1], z[:, 1:])) < r
    assert abs(_corr(z[:-1], z[1:])) < r
    assert abs(_corr(flat[:-1], flat[1:])) < 5 / n ** 0.5
    # same seed -> same numbers (also for a prefix of the states: other tiling), other seed -> others
    z_pre = ops.sample(net, obs[:3], 64, steps=1, seed=2024, backend="triton").cpu().double()
    assert torch.equal(z_pre, z[:3])
    z_other = ops.sample(net, obs[:3], 64, steps=1, seed=2025, backend="triton").cpu().double()
    assert not torch.equal(z_other, z[:3]) and abs(_corr(z_other, z[:3])) < 5 / z_other.numel() ** 0.5


@triton.jit
def _rng_kernel(u_ptr, c_ptr, z_ptr, zref_ptr, n, seed, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < n
    tl.store(c_ptr + offs, cos_2pi(tl.load(u_ptr + offs, mask=m, other=0.0)), mask=m)
    o = offs.to(tl.int64) * 7919 + 3 * 2 ** 33  # offsets beyond 32 bits, as N * A can be
    tl.store(z_ptr + offs, philox_randn(seed, o), mask=m)
    tl.store(zref_ptr + offs, tl.randn(seed, o), mask=m)


def test_seeded_noise_is_tl_randn_with_a_local_memory_free_cosine():
    """sampler_kernel.philox_randn (the seeded kernel's noise) is tl.randn's draw but for the
    cosine, cos_2pi (a reduced polynomial instead of libdevice's cosf, whose huge-argument path put
    a 32-byte stack frame in the seeded kernel): cos_2pi within 3e-7 of cos(2 pi u) on [0, 1]
    (octant boundaries included), and the normals within 3e-6 of tl.randn's."""
    n = 4099
    u = torch.cat([torch.linspace(0, 1, n - 9, dtype=torch.float64),
                   torch.tensor([0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0, 1e-9], dtype=torch.float64)])
    c, z, zref = (torch.full((n,), float("nan")) for _ in range(3))
    _rng_kernel[(1,)](u.float(), c, z, zref, n, 1234, BLOCK=8192)
    assert (c.double() - torch.cos(2 * torch.pi * u.float().double())).abs().max().item() < 3e-7
    assert torch.isfinite(z).all() and (z - zref).abs().max().item() < 3e-6
    assert z.std().item() > 0.9 and z.unique().numel() == n


@pytest.mark.parametrize("solver,path", [("euler", None), ("dpm2", "vp")])
def test_sample_matches_reference_on_its_own_noise(solver, path):
    """The seeded kernel = integrate on the noise it drew: the noise (trajectory[0], the same numbers
    a zero-velocity net returns for this seed and shape) fed to the reference gives the output."""
    net = _net(A=3, S=11, H=40, depth=2, act="silu", emb="fourier")
    g = torch.Generator().manual_seed(13)
    obs = torch.randn(5, 11, generator=g).to(DEV)
    out, traj = ops.sample(net, obs, 7, steps=3, solver=solver, path=path, seed=77, return_trajectory=True,
                           backend="triton")
    assert out.shape == (5, 7, 3) and traj.shape == (4, 5, 7, 3)
    noise = ops.sample(_zero_velocity_net(3, 11), obs, 7, steps=1, seed=77, backend="triton")
    assert torch.equal(traj[0], noise)
    ref, ref_traj = ref_ode._integrate(net, noise, obs, 3, solver, 0.0, 1.0, path, True)
    _close(out, ref)
    _close(traj, ref_traj)
    assert torch.equal(out, ops.sample(net, obs, 7, steps=3, solver=solver, path=path, seed=77, backend="triton"))


def test_sample_reference_and_dispatch():
    net = _net(A=3, S=11, H=24, depth=2)
    obs = torch.randn(4, 11, device=DEV)
    ref = ops.sample(net, obs, 5, steps=2, seed=9, backend="torch")
    x0 = torch.randn(4, 5, 3, generator=torch.Generator(device=DEV).manual_seed(9), device=DEV)
    assert torch.equal(ref, ref_ode._integrate(net, x0, obs, 2, "euler", 0.0, 1.0, None, False))
    assert backends.explain("sample", torch.device(DEV), net=net, obs=obs)["triton"] == []
    assert any("ConditionalMLP" in r for r in backends.explain("sample", torch.device(DEV), net=lambda *a: a[0],
                                                                obs=obs)["triton"])
    for bad in [dict(seed=-1), dict(seed=2 ** 63), dict(seed=1.5), dict(seed=True), dict(num_samples=0),
                dict(steps=0), dict(solver="ddim"), dict(solver="nope"), dict(obs=obs[0])]:
        kw = dict(num_samples=5, steps=2, seed=0)
        kw.update(bad)
        o = kw.pop("obs", obs)
        with pytest.raises((ValueError, TypeError)):
            ops.sample(net, o, backend="triton", **kw)
    with pytest.raises(TypeError):
        ops.sample(lambda x, t, o: x, obs, 5, backend="torch")  # no act_dim


# ------------------------------------------------------------------------------------ torch.compile
def test_fake_impls_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    net = _net(H=24, depth=2)
    critic = DoubleCritic(17, 6, hidden=40, depth=3, layer_norm=True).to(DEV)
    pol, tvec, coef = ts._flow_inputs(net, 3, "rk4", 0.0, 1.0, None, torch.float32, torch.device(DEV))
    cw = ts._critic_inputs(critic, torch.float32, torch.device(DEV))
    assert len(pol) == 7 and len(cw) == 18 and tvec.shape == (12, 32) and coef.shape == (3, ts.NCOEF)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x0, obs = torch.empty(35, 6, device=DEV), torch.empty(7, 17, device=DEV)
        out, traj = torch.ops.qipo_kernels.triton_policy_sample(
            x0, obs, None, None, tvec, coef, pol, [], ts.MODE_INTEGRATE, 5, 3, 0, 3, 0, 2, 0, 1, 1, False, 0.0,
            1.0, False, False, True)
        assert out.shape == (35, 6) and traj.shape == (4, 35, 6) and out.dtype == torch.float32
        out, traj = torch.ops.qipo_kernels.triton_policy_sample(
            x0, obs, None, torch.empty(7, dtype=torch.float64), tvec, coef, pol, cw, ts.MODE_ACT_FLOW, 5, 3, 0, 3,
            0, 2, 2, 3, 40, True, 1e-5, 0.5, True, True, False)
        assert out.shape == (7, 6) and traj.shape == (0,)
        out, traj = torch.ops.qipo_kernels.triton_policy_sample_seeded(obs, tvec, coef, pol, 5, 6, 1, 3, 3, 0, 2, True)
        assert out.shape == (7, 5, 6) and traj.shape == (4, 7, 5, 6) and out.dtype == torch.float32
        t, c = torch.ops.qipo_kernels.triton_sampler_flow_tables(4, "dpm2", 0.0, 1.0, "vp", torch.device(DEV))
        assert t.shape == (8,) and t.dtype == torch.float64 and c.shape == (4, ts.NCOEF) and c.dtype == torch.float32
        t, c = torch.ops.qipo_kernels.triton_sampler_consistency_tables([2.0, 0.5], 80.0, 0.002, 0.5,
                                                                        torch.float32, torch.device(DEV))
        assert t.shape == (3,) and c.shape == (3, ts.NCOEF)


def test_opcheck():
    net = _net(H=24, depth=2)
    torch.manual_seed(3)
    critic = DoubleCritic(17, 6, hidden=24, depth=2, activation="relu").to(DEV)
    dev = torch.device(DEV)
    pol, tvec, coef = ts._flow_inputs(net, 2, "midpoint", 0.0, 1.0, None, torch.float32, dev)
    cw = ts._critic_inputs(critic, torch.float32, dev)
    g = torch.Generator().manual_seed(9)
    x0 = torch.randn(6, 6, generator=g).to(DEV)
    obs = torch.randn(3, 17, generator=g).to(DEV)
    op = torch.ops.qipo_kernels.triton_policy_sample.default
    torch.library.opcheck(op, (x0, obs, None, None, tvec, coef, pol, [], ts.MODE_INTEGRATE, 2, 2, 0, 1, 0, 2,
                               0, 1, 1, False, 0.0, 1.0, False, False, True))
    u = torch.rand(3, dtype=torch.float64, generator=g).to(DEV)
    torch.library.opcheck(op, (x0, obs, None, u, tvec, coef, pol, cw, ts.MODE_ACT_FLOW, 2, 2, 0, 1, 0, 2,
                               2, 2, 24, False, 0.0, 0.7, True, True, False))
    torch.library.opcheck(torch.ops.qipo_kernels.triton_policy_sample_seeded.default,
                          (obs, tvec, coef, pol, 2, 6, 123, 2, 1, 0, 2, True))
    torch.library.opcheck(torch.ops.qipo_kernels.triton_sampler_flow_tables.default, (3, "ddim", 0.0, 1.0, "vp", dev))
    torch.library.opcheck(torch.ops.qipo_kernels.triton_sampler_consistency_tables.default,
                          ([1.0], 80.0, 0.002, 0.5, torch.float32, dev))


def test_torch_compile_fullgraph():
    """integrate, consistency_sample, act and sample trace with no graph break (fullgraph=True): the packing
    and the time-share table are traced from the live parameters, the launch and the host tables
    are custom ops in the graph. Compiled (aot_eager) results equal eager ones, also for a new
    batch size / step count (no frozen tables) and after an optimizer step between calls."""
    net = _net(H=24, depth=2)
    torch.manual_seed(4)
    critic = DoubleCritic(17, 6, hidden=24, depth=2, layer_norm=True).to(DEV)
    g = torch.Generator().manual_seed(10)
    x0 = torch.randn(3, 4, 6, generator=g).to(DEV)
    obs = torch.randn(3, 17, generator=g).to(DEV)
    sn = torch.randn(2, 3, 4, 6, generator=g).to(DEV)
    u = torch.rand(3, dtype=torch.float64, generator=g).to(DEV)

    def f(x0, obs, sn, u):
        a = ops.integrate(net, x0, obs, steps=2, solver="heun", backend="triton")
        b = ops.consistency_sample(net, x0, obs, sigmas=[2.0, 0.5], step_noise=sn, backend="triton")
        c = ops.act(net, critic, obs, 4, steps=2, mode="softmax", temperature=0.5, noise=x0, uniform=u,
                    backend="triton")
        d = ops.sample(net, obs, 4, steps=2, solver="midpoint", seed=3, backend="triton")
        return a, b, c, d

    seen = []

    def recording_backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    try:
        got = torch.compile(f, backend=recording_backend, fullgraph=True)(x0, obs, sn, u)
        assert sum("triton_policy_sample.default" in s for s in seen) == 3, seen
        assert sum("triton_policy_sample_seeded" in s for s in seen) == 1, seen
        assert any("triton_sampler_flow_tables" in s for s in seen) and \
            any("triton_sampler_consistency_tables" in s for s in seen), seen
        want = f(x0, obs, sn, u)
        for a, b in zip(got, want):
            assert torch.equal(a, b)

        torch._dynamo.reset()
        cf = torch.compile(lambda x, o, s: ops.integrate(net, x, o, steps=s, solver="rk4", backend="triton"),
                           backend="aot_eager", fullgraph=True)
        for n, steps in [(5, 2), (7, 3)]:
            x = torch.randn(n, 6, generator=g).to(DEV)
            o = torch.randn(n, 17, generator=g).to(DEV)
            _close(cf(x, o, steps), ref_ode._integrate(net, x, o, steps, "rk4", 0.0, 1.0, None, False))
        before = cf(x, o, 3)
        for p in net.parameters():
            p.add_(0.05)
        after = cf(x, o, 3)
        assert not torch.allclose(before, after)
        _close(after, ref_ode._integrate(net, x, o, 3, "rk4", 0.0, 1.0, None, False))
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------ reasons / bad input
def test_supports_reasons():
    net = _net(H=24, depth=2)
    x0 = torch.randn(4, 6, device=DEV)
    obs = torch.randn(4, 17, device=DEV)
    assert ts.supports_integrate(net=net, x0=x0, obs=obs) == []
    assert "not a qipo_kernels.nets.ConditionalMLP" in ts.supports_integrate(net=lambda x, t, o: x, x0=x0, obs=obs)[0]
    assert "> 512" in " ".join(ts.supports_integrate(net=ConditionalMLP(6, 17, hidden=520), x0=x0, obs=obs))
    assert "depth = 7" in " ".join(ts.supports_integrate(net=ConditionalMLP(6, 17, hidden=16, depth=7), x0=x0, obs=obs))
    r = ts.supports_integrate(net=net.double(), x0=x0.double(), obs=obs.double())
    assert any("float64" in s for s in r)
    net.float()
    with torch.enable_grad():
        assert any("no backward" in s for s in ts.supports_integrate(net=net, x0=x0, obs=obs))
    if DEV == "cpu":
        assert any("float32 only" in s for s in ts.supports_integrate(net=net, x0=x0.bfloat16(), obs=obs.bfloat16()))
    critic = DoubleCritic(17, 6, hidden=24, depth=2)
    assert ts.supports_act(net=net, critic=critic, obs=obs, num_candidates=4) == []
    assert ts.supports_act(net=net, critic=DoubleCritic(17, 6, hidden=24, layer_norm=True), obs=obs) == []
    assert any("not a qipo_kernels.nets.DoubleCritic" in s for s in ts.supports_act(net=net, critic=object(), obs=obs))
    assert any("num_candidates" in s for s in ts.supports_act(net=net, critic=critic, obs=obs, num_candidates=300))
    # dispatch: explain lists the reason; an explicit triton request fails with it
    why = backends.explain("integrate", x0.device, net=net, x0=x0.double(), obs=obs.double())
    assert any("float64" in s for s in why["triton"])
    with pytest.raises(RuntimeError, match="float64"):
        ops.integrate(net.double(), x0.double(), obs.double(), backend="triton")
    net.float()
    # auto falls back to the reference for float64 and gives its answer
    out = ops.integrate(net.double(), x0.double(), obs.double(), steps=2, backend="auto")
    assert out.dtype == torch.float64


def test_bad_input_raises_before_launch():
    net = _net(H=24, depth=2)
    x0 = torch.randn(4, 6, device=DEV)
    with pytest.raises(ValueError, match="obs"):
        ops.integrate(net, x0, torch.randn(4, 5, device=DEV), backend="triton")
    with pytest.raises(ValueError, match="x0"):
        ops.integrate(net, torch.randn(4, 5, device=DEV), torch.randn(4, 17, device=DEV), backend="triton")
    with pytest.raises(ValueError, match="solver"):
        ops.integrate(net, x0, torch.randn(4, 17, device=DEV), solver="rk45", backend="triton")
    with pytest.raises(ValueError, match="noise"):
        ops.consistency_sample(net, torch.randn(4, 3, device=DEV), torch.randn(4, 17, device=DEV), backend="triton")


# ------------------------------------------------------------------------------------ GPU precision
def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("solver,path", [("euler", None), ("rk4", None), ("dpm2", "vp")])
def test_gpu_half_precision_error_at_most_2x_eager(dtype, solver, path):
    net64 = _net(A=6, S=17, H=256, depth=3, dtype=torch.float64)
    net_h = _net(A=6, S=17, H=256, depth=3, dtype=dtype)
    net_h.load_state_dict(net64.state_dict())
    x0 = torch.randn(256, 50, 6, device="cuda", dtype=torch.float64)
    obs = torch.randn(256, 17, device="cuda", dtype=torch.float64)
    truth = ref_ode._integrate(net64, x0, obs, 10, solver, 0.0, 1.0, path, False)
    eager = ref_ode._integrate(net_h, x0.to(dtype), obs.to(dtype), 10, solver, 0.0, 1.0, path, False)
    fused = ts.integrate(net_h, x0.to(dtype), obs.to(dtype), 10, solver, 0.0, 1.0, path, False)
    assert torch.isfinite(fused).all()
    assert _err(fused, truth) <= 2.0 * _err(eager, truth) + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_half_consistency_and_act(dtype):
    net64 = _net(A=6, S=17, H=256, depth=3, dtype=torch.float64)
    net_h = _net(A=6, S=17, H=256, depth=3, dtype=dtype)
    net_h.load_state_dict(net64.state_dict())
    z = torch.randn(256, 50, 6, device="cuda", dtype=torch.float64)
    obs = torch.randn(256, 17, device="cuda", dtype=torch.float64)
    sn = torch.randn(2, 256, 50, 6, device="cuda", dtype=torch.float64)
    args = ([2.0, 0.5],)
    truth = ref_cons._consistency_sample(net64, z, obs, *args, sn, 80.0, 0.002, 0.5, False, None)
    eager = ref_cons._consistency_sample(net_h, z.to(dtype), obs.to(dtype), *args, sn.to(dtype), 80.0, 0.002, 0.5,
                                         False, None)
    fused = ts.consistency_sample(net_h, z.to(dtype), obs.to(dtype), *args, sn.to(dtype), 80.0, 0.002, 0.5, False, None)
    assert _err(fused, truth) <= 2.0 * _err(eager, truth) + 1e-6
    # act in half precision: the chosen action must be one of the state's candidates and its
    # float64 Q must be within the half-precision Q error of the best.
    crit64 = DoubleCritic(17, 6, hidden=256, depth=3).to("cuda", torch.float64)
    crit_h = DoubleCritic(17, 6, hidden=256, depth=3).to("cuda", dtype)
    crit_h.load_state_dict(crit64.state_dict())
    out = ts.act(net_h, crit_h, obs.to(dtype), 50, "flow", 10, "euler", None, None, "argmax", 1.0, z.to(dtype), None,
                 None, None, True)
    assert out.shape == (256, 6) and torch.isfinite(out).all()
    cand = ref_ode._integrate(net64, z, obs, 10, "euler", 0.0, 1.0, None, False).clamp(-1, 1)
    q = crit64.q_min(obs.repeat_interleave(50, 0), cand.reshape(-1, 6)).reshape(256, 50)
    q_out = crit64.q_min(obs, out.double())
    q_spread = (q.max(1).values - q.min(1).values).mean().item()
    assert (q.max(1).values - q_out).mean().item() <= 0.1 * q_spread


@pytest.mark.gpu
def test_gpu_tf32_error_at_most_2x_eager():
    net64 = _net(A=6, S=17, H=256, depth=3, dtype=torch.float64)
    net32 = _net(A=6, S=17, H=256, depth=3, dtype=torch.float32)
    net32.load_state_dict(net64.state_dict())
    x0 = torch.randn(256, 50, 6, device="cuda", dtype=torch.float64)
    obs = torch.randn(256, 17, device="cuda", dtype=torch.float64)
    truth = ref_ode._integrate(net64, x0, obs, 10, "euler", 0.0, 1.0, None, False)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        eager = ref_ode._integrate(net32, x0.float(), obs.float(), 10, "euler", 0.0, 1.0, None, False)
        fused = ts.integrate(net32, x0.float(), obs.float(), 10, "euler", 0.0, 1.0, None, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert _err(fused, truth) <= 2.0 * _err(eager, truth) + 1e-6
    exact = ts.integrate(net32, x0.float(), obs.float(), 10, "euler", 0.0, 1.0, None, False)
    assert _err(exact, truth) <= 1e-4 * max(1.0, truth.abs().max().item())


# ------------------------------------------------------------------------------------ GPU code generation
def test_autotuner_keys_are_stable_kernel_arguments():
    from qipo_kernels.triton.mlp import PREC_HALF, PREC_TF32X3

    k = tl_launch.tuned_kernel(256, 256)
    assert set(k.keys) <= set(tl_launch._policy_kernel.arg_names)
    assert not {"N", "B", "K"} & set(k.keys)  # never the batch
    assert tl_launch.choose_bm(50, 1, 256, 132) == 16 and tl_launch.choose_bm(64_000_000, 1, 256, 132) == 128
    assert tl_launch.choose_bm(100, 64, 256, 132) == 64  # a tile holds all of a state's candidates
    # 256 x 50 rows: 100 tiles of 128 (at least half the SMs busy) in bf16; float32 tiles are smaller
    assert tl_launch.choose_bm(12_800, 1, 256, 132) == 128
    assert tl_launch.choose_bm(12_800, 1, 256, 132, PREC_TF32X3) == 64
    assert tl_launch.choose_bm(50, 1, 256, 132, PREC_TF32X3) == 32  # its smallest spill-free tile
    assert tl_launch.choose_bm(12_800, 1, 512, 132, PREC_TF32X3) == 32  # 64-row tiles spill at width 512
    assert tl_launch.choose_bm(256 * 64, 64, 256, 132, PREC_HALF, group=True) == 64  # act stops at 64
    assert tl_launch.choose_bm(12_800, 1, 512, 132) == 64
    # the autotuner only ever tries the table's configurations for the launch's width / precision / BM
    for bm in (16, 32, 64, 128):
        for prec in (PREC_HALF, PREC_TF32X3):
            kept = tl_launch.prune_configs(k.configs, {}, BM=bm, HP=256, HPQ=256, PREC=prec)
            want = tl_launch.configs_for(256, prec, bm, 256)
            assert [(c.kwargs["BN"], c.num_warps, c.num_stages) for c in kept] == want
    # BN never exceeds the narrower network
    k2 = tl_launch.tuned_kernel(256, 16)
    assert all(c.kwargs["BN"] <= 16 for c in tl_launch.prune_configs(k2.configs, {}, BM=64, HP=256, HPQ=16,
                                                                      PREC=PREC_HALF))


def test_act_is_not_offered_where_its_tile_would_spill(monkeypatch):
    """On a GPU the fused act is offered only up to the candidate count whose act tile compiled for
    sm_90a without spills (sampler_launch._ACT_MAX_ROWS); beyond it supports_act (and the per-call fast
    check) names the reason, so dispatch takes the next backend. At most 32 candidates are always
    offered; nothing is refused under the interpreter or off CUDA."""
    from qipo_kernels.triton.mlp import PREC_HALF, PREC_IEEE, PREC_TF32X3

    cuda = torch.device("cuda")
    assert tl_launch.act_candidates_reason(256, 50, torch.float32, torch.device("cpu")) == ""
    monkeypatch.setattr(tl_launch, "interpret", lambda: False)
    for (w, p), cap in tl_launch._ACT_MAX_ROWS.items():
        assert cap <= tl_launch.MAX_BM_ACT and tl_launch.configs_for(w, p, cap, w)  # a listed tile
        monkeypatch.setattr(tl_launch, "prec", lambda dtype, device, p=p: p)
        assert tl_launch.act_candidates_reason(w, 32, torch.float32, cuda) == ""
        assert tl_launch.act_candidates_reason(w, cap, torch.float32, cuda) == ""
        assert f"at most {cap} candidates" in tl_launch.act_candidates_reason(w - 1, cap + 1, torch.float32, cuda)
    # act's tiles stop there whatever the batch (IEEE float32, width 256: 32 rows)
    assert tl_launch.choose_bm(256 * 32, 32, 256, 132, PREC_IEEE, group=True) == 32
    assert tl_launch.choose_bm(256 * 32, 32, 256, 132, PREC_IEEE) == 64  # (integrate: 64)
    # the benchmark shape, 50 candidates: offered in bf16 and TF32x3 at width 256, not in IEEE float32
    for p, offered in ((PREC_HALF, True), (PREC_TF32X3, True), (PREC_IEEE, False)):
        monkeypatch.setattr(tl_launch, "prec", lambda dtype, device, p=p: p)
        assert (tl_launch.act_candidates_reason(256, 50, torch.float32, cuda) == "") == offered
    # the dispatch checks ask it with the wider network and the candidate count
    seen = []

    def reason(hidden, k, dtype, device):
        seen.append((hidden, k, dtype))
        return "tile spills" if k > 32 else ""

    monkeypatch.setattr(sampler_supports, "act_candidates_reason", reason)
    net = _net(A=6, S=17, H=24, depth=2)
    torch.manual_seed(3)
    critic = DoubleCritic(17, 6, hidden=40, depth=2, activation="mish")
    obs = torch.randn(3, 17)
    assert "tile spills" in ts.supports_act(net, critic, obs, 50)
    assert "tile spills" in ts._fast_act(net=net, critic=critic, obs=obs, num_candidates=50)
    assert ts.supports_act(net, critic, obs, 32) == [] and ts._fast_act(net=net, critic=critic, obs=obs,
                                                                         num_candidates=32) == []
    assert (40, 50, torch.float32) in seen


_COMPILE_SCRIPT = """
import sys
from qipo_kernels.triton import sampler_launch as tl_launch
for case in eval(sys.argv[1]):
    k = tl_launch.compile_for_target(**case)
    print("CUBIN_BYTES", len(k.asm["cubin"]))
"""


def test_kernel_compiles_for_sm90_without_a_gpu():
    """The interpreter does not compile; this builds real sm_90 binaries (Triton's bundled ptxas,
    in a subprocess without TRITON_INTERPRET) so code-generation errors show up without a GPU too:
    act in bf16 with the softmax draw and a LayerNorm critic, rk4 in float32 with the trajectory, and
    the seeded sampler (in-kernel Philox noise) in bf16."""
    import os
    import subprocess
    import sys

    import qipo_kernels

    cases = [dict(mode=2, solver=0, dtype="bf16", prec=2, softmax=True, kp=64, bm=64, ln=True),
             dict(mode=0, solver=3, dtype="fp32", prec=0, traj=True, bm=32, depth=2, hp=128),
             dict(mode=0, solver=0, dtype="bf16", prec=2, seeded=True, bm=64, depth=1, hp=64)]
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(qipo_kernels.__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, repr(cases)], env=env, capture_output=True, text=True,
                       timeout=300)
    if r.returncode != 0 and "ptxas" in r.stderr.lower() and "not found" in r.stderr.lower():
        pytest.skip("no CUDA code generator (ptxas) here")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("CUBIN_BYTES") == 3


@pytest.mark.gpu
def test_gpu_fused_sampler_captures_in_a_cuda_graph():
    """No host synchronisation in the launch path: after one warm-up call (autotune, packing,
    tables) integrate and act can be captured and replayed."""
    net = _net(A=6, S=17, H=256, depth=3, dtype=torch.bfloat16)
    critic = DoubleCritic(17, 6, hidden=256, depth=3).to("cuda", torch.bfloat16)
    x0 = torch.randn(64, 50, 6, device="cuda", dtype=torch.bfloat16)
    obs = torch.randn(64, 17, device="cuda", dtype=torch.bfloat16)
    u = torch.rand(64, device="cuda", dtype=torch.float64)

    def run():
        a = ts.integrate(net, x0, obs, 10, "euler", 0.0, 1.0, None, False)
        b = ts.act(net, critic, obs, 50, "flow", 10, "euler", None, None, "softmax", 1.0, x0, None, u, None, True)
        return a, b

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        want = run()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        got = run()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ------------------------------------------------------------------------------------ NaN inputs
def test_nan_inputs_give_nan_actions_not_clamped_bounds():
    """A NaN in a sample's noise / observation gives NaN (as torch.clamp in the references), never a
    valid-looking -1 or 1 from the [-1, 1] clamp; the other samples are unaffected."""
    net = _net(A=6, S=17, H=24, depth=2)
    torch.manual_seed(13)
    critic = DoubleCritic(17, 6, hidden=24, depth=2).to(DEV)
    g = torch.Generator().manual_seed(14)
    z = torch.randn(3, 5, 6, generator=g).to(DEV)
    obs = torch.randn(3, 17, generator=g).to(DEV)
    z[1, 2, 3] = float("nan")
    ref = ref_cons._consistency_sample(net, z, obs, [1.0], torch.zeros(1, 3, 5, 6, device=DEV), 80.0, 0.002, 0.5,
                                       True, None)
    out = ts.consistency_sample(net, z, obs, [1.0], torch.zeros(1, 3, 5, 6, device=DEV), 80.0, 0.002, 0.5, True,
                                None)
    assert torch.isnan(ref[1, 2]).all() and torch.isnan(out[1, 2]).all()
    keep = ~torch.isnan(ref)
    torch.testing.assert_close(out[keep], ref[keep], rtol=3e-5, atol=3e-5)
    obs_nan = obs.clone()
    obs_nan[2, 0] = float("nan")
    z_ok = torch.nan_to_num(z)
    for sampler in ("flow", "consistency"):
        # NaN candidates score NaN: act cannot rank them and says which states (as the reference does)
        # instead of returning a clamped bound
        for fn in (ts.act, ops._act_ref):
            with pytest.raises(ValueError, match=r"of 1 of 3 state\(s\) \(states 2\)"):
                fn(net, critic, obs_nan, 5, sampler, 2, "euler", None, None, "argmax", 1.0, z_ok, None, None, None,
                   True)
        a = ts.act(net, critic, obs, 5, sampler, 2, "euler", None, None, "argmax", 1.0, z_ok, None, None, None, True)
        r = ops._act_ref(net, critic, obs, 5, sampler, 2, "euler", None, None, "argmax", 1.0, z_ok, None, None,
                         None, True)
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r, rtol=3e-5, atol=3e-5)


# ------------------------------------------------------------------------------------ host path
def test_cache_is_not_revalidated_by_walking_but_sees_every_change():
    """The pack cache: one entry reused while nothing changes; a replaced layer, a `p.data = ...`
    write, an in-place update and refresh() after a `.data` element edit are each seen."""
    net = _net(H=24, depth=2)
    x0 = torch.randn(4, 3, 6, device=DEV)
    obs = torch.randn(4, 17, device=DEV)

    def check():
        _close(ts.integrate(net, x0, obs, 2, "euler", 0.0, 1.0, None, False),
               ref_ode._integrate(net, x0, obs, 2, "euler", 0.0, 1.0, None, False))
        return tpack.get_pack(net, "policy", torch.float32, x0.device)

    e1 = check()
    assert check() is e1 and not e1.watch.changed()
    net.out = torch.nn.Linear(net.out.in_features, 6).to(DEV)  # replaced layer
    e2 = check()
    assert e2 is not e1
    net.layers[1].weight.data = torch.randn_like(net.layers[1].weight)  # p.data = other
    e3 = check()
    assert e3 is not e2
    with torch.no_grad():
        net.layers[0].bias.mul_(0.5)  # in place
    e4 = check()
    assert e4 is not e3
    net.layers[0].weight.data[0, 0] += 3.0  # a .data element edit: no version counter sees it ...
    tpack.refresh(net)  # ... refresh does
    assert check() is not e4
    backends.refresh(net)  # (the package-level refresh reaches the Triton cache too)
    assert tpack.peek(net, torch.float32, x0.device) is None


def test_dispatch_fast_checks_agree_with_the_full_ones():
    """The per-call dispatch checks (_fast_*, with their one-expression common case) refuse exactly
    what supports_* refuses, on warm packs: autograd wanted, a subclass overriding forward, a critic
    that does not match the net, too many candidates, a LayerNorm critic, float64, parameters moved."""
    net = _net(H=24, depth=2)
    critic = DoubleCritic(17, 6, hidden=24, depth=2).to(DEV)
    x0 = torch.randn(4, 3, 6, device=DEV)
    obs = torch.randn(4, 17, device=DEV)
    for m, kind in ((net, "policy"), (critic, "critic")):
        tpack.get_pack(m, kind, torch.float32, obs.device)

    class Shifted(ConditionalMLP):
        def forward(self, x, t, obs):
            return super().forward(x, t, obs) + 1.0

    shifted = Shifted(6, 17, hidden=24, depth=2).to(DEV)
    tpack.get_pack(shifted, "policy", torch.float32, obs.device)
    cases = [dict(net=net, critic=critic, x0=x0, obs=obs, K=3),
             dict(net=shifted, critic=critic, x0=x0, obs=obs, K=3),
             dict(net=net, critic=DoubleCritic(17, 5, hidden=24, depth=2).to(DEV), x0=x0, obs=obs, K=3),
             dict(net=net, critic=critic, x0=x0, obs=obs, K=300),
             dict(net=net, critic=DoubleCritic(17, 6, hidden=24, depth=2, layer_norm=True).to(DEV), x0=x0, obs=obs,
                  K=3),
             dict(net=net, critic=critic, x0=x0.double(), obs=obs.double(), K=3),
             dict(net=net, critic=critic, x0=x0, obs=obs.double(), K=3)]
    for grad in (False, True):
        net.requires_grad_(grad)
        for c in cases:
            with torch.set_grad_enabled(grad):
                full_i = ts.supports_integrate(net=c["net"], x0=c["x0"], obs=c["obs"], _fast=True)
                full_a = ts.supports_act(net=c["net"], critic=c["critic"], obs=c["obs"], num_candidates=c["K"],
                                         noise=c["x0"], _fast=True)
                assert bool(ts._fast_integrate(net=c["net"], x0=c["x0"], obs=c["obs"])) == bool(full_i)
                assert bool(ts._fast_consistency_sample(net=c["net"], noise=c["x0"], obs=c["obs"])) == bool(full_i)
                assert bool(ts._fast_act(net=c["net"], critic=c["critic"], obs=c["obs"], num_candidates=c["K"],
                                         noise=c["x0"])) == bool(full_a)
        with torch.set_grad_enabled(grad):
            assert (ts._fast_integrate(net=net, x0=x0, obs=obs) == []) is (not grad)  # (no backward: refused)
    net.requires_grad_(False)
    assert ts._fast_act(net=net, critic=critic, obs=obs, num_candidates=3, noise=x0) == []
    assert ts._fast_act(net=net, critic=critic, obs=obs, num_candidates=300, noise=x0) != []
    net.double()  # the pack made from float32 parameters is stale: the impl's _entry check catches it
    with pytest.raises(backends.Fallback):
        ts.integrate(net, x0, obs, 2, "euler", 0.0, 1.0, None, False)


def test_dtype_change_after_packing_falls_back_to_reference():
    net = _net(H=24, depth=2)
    x0 = torch.randn(5, 6, device=DEV)
    obs = torch.randn(5, 17, device=DEV)
    ops.integrate(net, x0, obs, steps=2, backend="triton")
    net.double()  # the cached pack says float32 was fine; the impl sees the change
    with pytest.raises(backends.Fallback, match="float64|cannot run"):  # the impl itself (ops checks dtypes first)
        ts.integrate(net, x0, obs, 2, "euler", 0.0, 1.0, None, False)
    with pytest.raises(TypeError, match="float64"):  # through ops: refused before any backend runs
        ops.integrate(net, x0, obs, steps=2, backend="triton")
    net.float()
    _close(ops.integrate(net, x0, obs, steps=2, backend="triton"),
           ref_ode._integrate(net, x0, obs, 2, "euler", 0.0, 1.0, None, False))


def _prepared_follows_updates(pol, obs, update, make):
    """Three calls of make("triton") and make("torch") (two samplers of ``pol`` on one generator seed),
    update(p) applied in place to every parameter before the third: each Triton call takes the prepared
    call (not the checked path) and gives the reference sampler's numbers. Returns the Triton sampler."""
    s, r = make("triton"), make("torch")
    for i in range(3):
        if i == 2:
            with torch.no_grad():
                for p in pol.parameters():
                    update(p)
        a, b = s(obs), r(obs)
        assert isinstance(s._plan[1], ts.Prepared) and s._plan[2] is None  # the prepared call, not the checked one
        _close(a, b)
    return s


@pytest.mark.parametrize("kind,K", [("flow", 1), ("flow", 4), ("consistency", 3)])
def test_make_sampler_triton_prepared_path(kind, K):
    """make_sampler on the Triton backend: the prepared call gives the checked path's numbers
    (same generator stream), is re-planned after an optimizer step and stays correct."""
    from qipo_kernels import ConsistencyPolicy, FlowPolicy, make_sampler

    torch.manual_seed(15)
    pol = (FlowPolicy(17, 6, hidden=24, depth=2, steps=3) if kind == "flow"
           else ConsistencyPolicy(17, 6, hidden=24, depth=2)).to(DEV)
    sig = [1.0] if kind == "consistency" else None
    obs = torch.randn(5, 17, device=DEV)
    s = _prepared_follows_updates(pol, obs, lambda p: p.add_(0.01), lambda backend: make_sampler(
        pol, kind=kind, num_samples=K, sigmas=sig, backend=backend, generator=torch.Generator(device=DEV).manual_seed(3)))
    assert s(obs).shape == ((5, 6) if K == 1 else (5, K, 6))
    assert s(obs[0]).shape == ((6,) if K == 1 else (K, 6))


@pytest.mark.parametrize("path,solver,t0", [("ot-eps", "dpm2", None), ("ot-eps", "ddim", 0.2), ("ot", "heun", 0.1),
                                             ("vp", "dpm1", 0.3)])
def test_make_sampler_triton_prepared_path_from_t0(path, solver, t0):
    """Flow policies sampled from t0 > 0 (QIPO's "ot-eps" default: 0.05) take the prepared Triton call
    too: it integrates over [t0, 1] from noise scaled by sigma(t0), and gives the reference's numbers
    from the same generator stream, before and after an optimizer-like update."""
    from qipo_kernels import FlowPolicy, make_sampler
    from qipo_kernels.policies import OT_EPS_SAMPLE_T0

    torch.manual_seed(21)
    pol = FlowPolicy(17, 6, hidden=24, depth=2, steps=3, path=path, solver=solver, t0=t0).to(DEV)
    assert pol.t0 == (OT_EPS_SAMPLE_T0 if t0 is None else t0) and pol.t0 > 0
    obs = torch.randn(3, 17, device=DEV)
    _prepared_follows_updates(pol, obs, lambda p: p.mul_(0.9), lambda backend: make_sampler(
        pol, num_samples=5, backend=backend, generator=torch.Generator(device=DEV).manual_seed(4)))
    # the prepared call itself against the reference integrator from t0, on the noise it drew
    g1, g2 = torch.Generator(device=DEV).manual_seed(8), torch.Generator(device=DEV).manual_seed(8)
    call = ts.Prepared(pol.net, "flow", 5, obs, steps=3, solver=solver, path=None if path == "ot" else path,
                       generator=g1, t0=pol.t0, noise_scale=pol.start_noise_scale())
    z = torch.randn(3, 5, 6, device=DEV, generator=g2) * pol.start_noise_scale()
    ref = ref_ode._integrate(pol.net, z, obs, 3, solver, pol.t0, 1.0, None if path == "ot" else path, False)
    _close(call(obs), ref.clamp(-1.0, 1.0))


def test_prepared_refuses_bad_t0_and_scale():
    net = _net(H=24, depth=2)
    obs = torch.randn(2, 17, device=DEV)
    with pytest.raises(ValueError, match="t0"):
        ts.Prepared(net, "flow", 3, obs, t0=1.0)
    with pytest.raises(ValueError, match="noise_scale"):
        ts.Prepared(net, "flow", 3, obs, noise_scale=float("nan"))
    with pytest.raises(ValueError, match="flow sampling only"):
        ts.Prepared(net, "consistency", 3, obs, t0=0.1)


def test_make_sampler_cuda_graph_needs_cuda():
    from qipo_kernels import FlowPolicy, make_sampler

    pol = FlowPolicy(17, 6, hidden=24, depth=2)
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present (see the GPU test)")
    with pytest.raises(ValueError, match="cuda_graph=True needs the policy on a CUDA device"):
        make_sampler(pol, cuda_graph=True)
    # a flow policy sampled from t0 > 0 is no longer refused for its t0 (only for the device here)
    with pytest.raises(ValueError, match="cuda_graph=True needs the policy on a CUDA device"):
        make_sampler(FlowPolicy(17, 6, hidden=24, depth=2, path="ot-eps"), cuda_graph=True)


@pytest.mark.gpu
def test_gpu_make_sampler_cuda_graph_replays_and_follows_updates():
    from qipo_kernels import FlowPolicy, make_sampler

    torch.manual_seed(16)
    pol = FlowPolicy(17, 6, hidden=256, depth=3, steps=10).to("cuda", torch.bfloat16)
    s = make_sampler(pol, num_samples=50, cuda_graph=True, generator=torch.Generator(device="cuda").manual_seed(1))
    obs = torch.randn(1, 17, device="cuda", dtype=torch.bfloat16)
    a = s(obs)
    assert isinstance(s._plan[1], __import__("qipo_kernels.policies", fromlist=["_GraphCall"])._GraphCall)
    b = s(obs)
    assert a.shape == (1, 50, 6) and torch.isfinite(a).all() and not torch.equal(a, b)  # fresh noise per replay
    g = s._plan[1].graph
    with torch.no_grad():
        for p in pol.parameters():
            p.mul_(0.5)
    c = s(obs)
    assert s._plan[1].graph is not g  # re-captured after the update
    assert torch.isfinite(c).all()


@pytest.mark.gpu
def test_gpu_make_sampler_cuda_graph_from_t0():
    """cuda_graph=True on an "ot-eps" policy (sampled from t0 = 0.05): the captured call scales the
    noise by sigma(t0) and integrates [t0, 1]; its samples match the checked path in distribution
    (per-dimension mean and s.d. over 4096 samples of one state)."""
    from qipo_kernels import FlowPolicy, make_sampler
    from qipo_kernels.policies import _GraphCall

    torch.manual_seed(17)
    pol = FlowPolicy(17, 6, hidden=64, depth=2, steps=10, path="ot-eps").to("cuda")
    assert pol.t0 > 0
    s = make_sampler(pol, num_samples=4096, cuda_graph=True, generator=torch.Generator(device="cuda").manual_seed(1))
    r = make_sampler(pol, num_samples=4096, backend="torch", generator=torch.Generator(device="cuda").manual_seed(2))
    obs = torch.randn(1, 17, device="cuda")
    a, b = s(obs), r(obs)
    assert isinstance(s._plan[1], _GraphCall)
    assert a.shape == b.shape == (1, 4096, 6) and torch.isfinite(a).all()
    assert (a.mean(1) - b.mean(1)).abs().max() < 0.1 and (a.std(1) - b.std(1)).abs().max() < 0.1
