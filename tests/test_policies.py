"""FlowPolicy / ConsistencyPolicy / make_sampler: shapes, agreement with the references, bad input."""
import math

import pytest
import torch
import torch.nn as nn

from qipo_kernels import ConditionalMLP, ConsistencyPolicy, DoubleCritic, FlowPolicy, make_sampler, ops, reference
from qipo_kernels.reference.paths import VP_EPS

S, A = 5, 3


pytestmark = pytest.mark.usefixtures("one_thread")


def _obs(B=7, seed=0, dtype=torch.float32):
    return torch.randn(B, S, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("path", ["ot", "ot-eps", "vp"])
def test_flow_policy_shapes_and_gradients(path):
    torch.manual_seed(0)
    p = FlowPolicy(S, A, hidden=17, depth=2, path=path)
    obs = _obs()
    acts = torch.rand(7, 6, A) * 2 - 1
    loss = p.loss(obs, acts, energy=torch.randn(7, 6), beta=3.0)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in p.net.parameters())
    assert p.loss(obs, acts[:, 0]).dim() == 0  # [B, A] actions
    assert p.loss(obs, acts, energy=torch.randn(7, 6), normalize="batch").dim() == 0
    out = p.sample(obs, num_samples=4, steps=3)
    assert out.shape == (7, 4, A) and out.abs().max() <= 1.0
    crit = DoubleCritic(S, A, hidden=9, depth=1)
    a = p.act(obs, crit, num_candidates=5, steps=2)
    assert a.shape == (7, A)
    assert p.act(obs, crit, num_candidates=5, steps=2, select="softmax", generator=torch.Generator().manual_seed(1)).shape == (7, A)


@pytest.mark.parametrize("path", ["ot", "ot-eps", "vp"])
def test_flow_policy_loss_matches_reference(path):
    torch.manual_seed(1)
    p = FlowPolicy(S, A, hidden=16, depth=2, path=path)
    B, M = 6, 4
    obs, acts = _obs(B), torch.rand(B, M, A) * 2 - 1
    t, z, e = torch.rand(B, M) * (1 - VP_EPS), torch.randn(B, M, A), torch.randn(B, M)
    got = p.loss(obs, acts, energy=e, beta=2.0, t=t, noise=z)
    x_t, target = reference.flow_path(acts, z, t, path)
    pred = p.net(x_t.reshape(-1, A), t.reshape(-1), obs.repeat_interleave(M, 0)).reshape(B, M, A)
    want = reference.weighted_fm_loss(pred, target, e, 2.0, "support")
    torch.testing.assert_close(got, want)


def test_flow_policy_draws_t_in_the_right_range():
    p = FlowPolicy(S, A, hidden=8, depth=1, path="vp")
    seen = []
    orig = p.net.forward

    def spy(x, t, o):
        seen.append(t.detach().clone())
        return orig(x, t, o)

    p.net.forward = spy
    p.loss(_obs(50), torch.zeros(50, 20, A), generator=torch.Generator().manual_seed(0))
    t = torch.cat(seen)
    assert t.min() >= 0 and t.max() <= 1 - VP_EPS and t.numel() == 1000


@pytest.mark.parametrize("path,solver", [("ot", "euler"), ("ot", "rk4"), ("ot-eps", "dpm2"), ("vp", "ddim")])
def test_flow_policy_sample_matches_reference_integrate(path, solver):
    torch.manual_seed(2)
    p = FlowPolicy(S, A, hidden=16, depth=2, path=path)
    obs, z = _obs(4), torch.randn(4, 3, A)
    got = p.sample(obs, 3, steps=4, solver=solver, noise=z, backend="torch")
    # sampling starts at the policy's t0 (0.05 on "ot-eps", else 0) from noise scaled by sigma(t0)
    want = reference.integrate(p.net, z * p.start_noise_scale(), obs, steps=4, solver=solver, t0=p.t0,
                               path=None if path == "ot" else path).clamp(-1, 1)
    torch.testing.assert_close(got, want)
    got_auto = p.sample(obs, 3, steps=4, solver=solver, noise=z)
    torch.testing.assert_close(got_auto, want, atol=2e-5, rtol=2e-5)


def test_flow_policy_default_solvers():
    assert FlowPolicy(S, A, hidden=4, depth=1, path="ot").solver == "euler"
    assert FlowPolicy(S, A, hidden=4, depth=1, path="vp").solver == "dpm2"
    assert FlowPolicy(S, A, hidden=4, depth=1, path="ot-eps").solver == "dpm2"


def test_flow_policy_bad_input():
    p = FlowPolicy(S, A, hidden=8, depth=1)
    obs = _obs(4)
    acts = torch.zeros(4, 2, A)
    with pytest.raises(ValueError, match="path"):
        FlowPolicy(S, A, path="rectified")
    with pytest.raises(ValueError, match="solver"):
        FlowPolicy(S, A, path="vp", solver="euler")
    with pytest.raises(ValueError, match="obs"):
        p.loss(obs[:, :3], acts)
    with pytest.raises(ValueError, match="obs"):
        p.loss(obs[0], acts)
    with pytest.raises(TypeError, match="obs"):
        p.loss(obs.numpy(), acts)
    with pytest.raises(ValueError, match="actions"):
        p.loss(obs, torch.zeros(3, 2, A))
    with pytest.raises(ValueError, match="actions"):
        p.loss(obs, torch.zeros(4, 2, A + 1))
    with pytest.raises(ValueError, match="energy"):
        p.loss(obs, acts, energy=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="energy"):
        p.loss(obs, acts, energy=torch.tensor([[0.0, float("nan")]] * 4))
    with pytest.raises(ValueError, match="beta"):
        p.loss(obs, acts, energy=torch.zeros(4, 2), beta=0.0)
    with pytest.raises(ValueError, match="normalize"):
        p.loss(obs, acts, energy=torch.zeros(4, 2), normalize="global")
    with pytest.raises(TypeError, match="dtype"):
        p.loss(obs.double(), acts.double())
    with pytest.raises(ValueError, match="num_samples"):
        p.sample(obs, 0)
    with pytest.raises(ValueError, match="solver"):
        p.sample(obs, 1, solver="dpm2")
    with pytest.raises(ValueError, match="solver"):
        p.sample(obs, 1, solver="magic")
    with pytest.raises(ValueError, match="noise"):
        p.sample(obs, 2, noise=torch.zeros(4, 3, A))
    with pytest.raises(ValueError, match="steps"):
        p.sample(obs, 1, steps=0)
    crit = DoubleCritic(S, A, hidden=4, depth=1)
    with pytest.raises(ValueError, match="select"):
        p.act(obs, crit, select="best")
    with pytest.raises(TypeError, match="critic"):
        p.act(obs, object())
    with pytest.raises(ValueError, match="num_candidates"):
        p.act(obs, crit, num_candidates=0)


def test_consistency_policy_shapes_loss_and_bad_input():
    torch.manual_seed(3)
    p = ConsistencyPolicy(S, A, hidden=16, depth=2)
    obs, acts = _obs(6), torch.rand(6, A) * 2 - 1
    idx, z = torch.randint(0, 39, (6,)), torch.randn(6, A)
    got = p.loss(obs, acts, sigma_idx=idx, noise=z)
    want = reference.consistency_loss(p.net, acts, obs, sigma_idx=idx, noise=z)
    torch.testing.assert_close(got, want)
    assert p.loss(obs, acts, reduction="none").shape == (6,)
    out = p.sample(obs, 5)
    assert out.shape == (6, 5, A) and out.abs().max() <= 1
    zz = torch.randn(6, 2, A)
    torch.testing.assert_close(p.sample(obs, 2, noise=zz, backend="torch"),
                               reference.consistency_sample(p.net, zz, obs))
    steps = torch.randn(2, 6, 2, A)
    torch.testing.assert_close(p.sample(obs, 2, sigmas=[2.0, 0.5], noise=zz, step_noise=steps, backend="torch"),
                               reference.consistency_sample(p.net, zz, obs, sigmas=[2.0, 0.5], step_noise=steps))
    crit = DoubleCritic(S, A, hidden=8, depth=1)
    assert p.act(obs, crit, num_candidates=4).shape == (6, A)
    assert p.act(obs, crit, num_candidates=4, select="argmax", sigmas=[1.0]).shape == (6, A)
    # a sample taken while autograd records is differentiable (CPQL's Q loss needs it)
    p.sample(obs, 1).sum().backward()
    assert p.net.out.weight.grad is not None
    with pytest.raises(ValueError, match="actions"):
        p.loss(obs, torch.zeros(6, 2, A))
    with pytest.raises(ValueError, match="actions"):
        p.loss(obs, torch.zeros(5, A))
    with pytest.raises(ValueError, match="sigma"):
        p.sample(obs, 1, sigmas=[200.0])
    with pytest.raises(ValueError, match="sigma_min"):
        ConsistencyPolicy(S, A, sigma_min=2.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="obs"):
        p.sample(obs[:, :2], 1)
    with pytest.raises(ValueError, match="select"):
        p.act(obs, crit, select="max")


def test_consistency_policy_custom_sigmas_act_uses_them():
    torch.manual_seed(4)
    p = ConsistencyPolicy(S, A, hidden=8, depth=1, sigma_max=10.0)
    crit = DoubleCritic(S, A, hidden=8, depth=1)
    obs, z = _obs(3), torch.randn(3, 4, A)
    got = p.act(obs, crit, num_candidates=4, select="argmax", noise=z)
    cand = reference.consistency_sample(p.net, z, obs, sigma_max=10.0)
    q = crit.q_min(obs.repeat_interleave(4, 0), cand.reshape(-1, A)).reshape(3, 4)
    torch.testing.assert_close(got, cand[torch.arange(3), q.argmax(1)])


# ---- make_sampler ----------------------------------------------------------------------------

class _CPQLSinusoidalPosEmb(nn.Module):
    """Written from CPQL's agents/helpers.py description (not our nets.SinusoidalPosEmb)."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        half = self.dim // 2
        emb = math.log(10000) / (half - 1)
        emb = torch.exp(torch.arange(half, device=x.device) * -emb)
        emb = x[:, None] * emb[None, :]
        return torch.cat((emb.sin(), emb.cos()), dim=-1)


class _CPQLMLP(nn.Module):
    """A stand-in for CPQL's agents/model.py MLP (same module names and forward)."""

    def __init__(self, state_dim, action_dim, t_dim=16, hidden=256):
        super().__init__()
        self.time_mlp = nn.Sequential(_CPQLSinusoidalPosEmb(t_dim), nn.Linear(t_dim, t_dim * 2), nn.Mish(),
                                      nn.Linear(t_dim * 2, t_dim))
        self.mid_layer = nn.Sequential(nn.Linear(state_dim + action_dim + t_dim, hidden), nn.Mish(),
                                       nn.Linear(hidden, hidden), nn.Mish(), nn.Linear(hidden, hidden), nn.Mish())
        self.final_layer = nn.Linear(hidden, action_dim)

    def forward(self, x, time, state):
        t = self.time_mlp(time)
        return self.final_layer(self.mid_layer(torch.cat([x, t, state], dim=1)))


def _cpql_one_step(model, obs, z, sigma_max=80.0, sigma_min=0.002, sigma_data=0.5):
    """CPQL's one-step sample written out: a = clamp(c_skip x + c_out F(c_in x, 250 ln sigma, s), -1, 1)."""
    x = sigma_max * z
    c_skip = sigma_data ** 2 / ((sigma_max - sigma_min) ** 2 + sigma_data ** 2)
    c_out = (sigma_max - sigma_min) * sigma_data / (sigma_max ** 2 + sigma_data ** 2) ** 0.5
    c_in = 1 / (sigma_max ** 2 + sigma_data ** 2) ** 0.5
    t = torch.full((x.shape[0],), 250.0 * math.log(sigma_max + 1e-44))
    return (c_skip * x + c_out * model(c_in * x, t, obs)).clamp(-1, 1)


@pytest.mark.parametrize("prefix", ["", "model."])
def test_make_sampler_from_cpql_state_dict_matches_cpql(prefix):
    torch.manual_seed(5)
    S_, A_ = 11, 6
    model = _CPQLMLP(S_, A_, hidden=37)
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    sampler = make_sampler(sd, kind="consistency", obs_dim=S_, act_dim=A_, generator=torch.Generator().manual_seed(9))
    obs = torch.randn(17, S_)
    got = sampler(obs)
    z = torch.randn((17, 1, A_), generator=torch.Generator().manual_seed(9))[:, 0]
    with torch.no_grad():
        want = _cpql_one_step(model, obs, z)
    assert got.shape == (17, A_)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert sampler(obs[0]).shape == (A_,)
    from qipo_kernels import backends
    fast = [b for b in ("cpp",) if not backends.backend_reasons(b, obs.device)]
    assert sampler.backend_used(obs) == (fast[0] if fast else "torch")


def test_make_sampler_flow_from_conditional_mlp():
    torch.manual_seed(6)
    net = ConditionalMLP(A, S, hidden=19, depth=2, time_embedding="fourier")
    req = [p.requires_grad for p in net.parameters()]
    s = make_sampler(net, kind="flow", num_samples=4, steps=3, generator=torch.Generator().manual_seed(2))
    obs = _obs(6)
    got = s(obs)
    z = torch.randn((6, 4, A), generator=torch.Generator().manual_seed(2))
    want = reference.integrate(net, z, obs, steps=3).clamp(-1, 1)
    assert got.shape == (6, 4, A) and not got.requires_grad
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert [p.requires_grad for p in net.parameters()] == req  # the caller's network is left alone
    # a policy object goes straight through
    pol = FlowPolicy(S, A, hidden=8, depth=1, path="vp")
    assert make_sampler(pol, kind="flow", steps=2)(obs).shape == (6, A)


def test_make_sampler_bad_input():
    net = ConditionalMLP(A, S, hidden=8, depth=1)
    sd = _CPQLMLP(S, A, hidden=8).state_dict()
    with pytest.raises(ValueError, match="kind must be given"):
        make_sampler(sd)  # a bare MLP state_dict: CPQL's and Diffusion-QL's networks are the same module
    assert make_sampler(sd, kind="consistency").net.obs_dim == S  # sizes read from the tensors
    with pytest.raises(ValueError, match="mid_layer.0"):
        make_sampler(sd, kind="consistency", obs_dim=S + 1, act_dim=A)
    with pytest.raises(ValueError, match="missing keys"):
        make_sampler({"foo": torch.zeros(1)}, kind="consistency", obs_dim=S, act_dim=A)
    with pytest.raises(ValueError, match="kind"):
        make_sampler(net, kind="diffusion")
    with pytest.raises(TypeError, match="actor"):
        make_sampler(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="obs_dim"):
        make_sampler(net, obs_dim=S + 2)
    with pytest.raises(ValueError, match="kind"):
        make_sampler(ConsistencyPolicy(S, A, hidden=4, depth=1), kind="flow")
    with pytest.raises(ValueError, match="solver"):
        make_sampler(net, kind="flow", path="vp", solver="euler")
    with pytest.raises(ValueError, match="backend"):
        make_sampler(net, backend="cuda")
    with pytest.raises(TypeError, match="obs"):
        make_sampler(net)([[0.0] * S])


def _known_mean_data(n, g):
    """States s ~ N(0, I_5); actions a = clip(tanh(1.5 W s) + N(0, 0.1^2)), so E[a | s] ~ tanh(1.5 W s)."""
    s = torch.randn(n, 5, generator=g)
    W = torch.tensor([[1.0, -0.5, 0.3, 0.0, 0.8], [0.2, 0.9, -0.7, 0.5, 0.0], [-0.6, 0.1, 0.4, 1.0, -0.3]])
    mean = torch.tanh(1.5 * s @ W.T)
    return s, (mean + 0.1 * torch.randn(n, 3, generator=g)).clamp(-1, 1), mean


def test_ot_eps_behaviour_model_imitates_a_known_mean_action():
    """Regression test for QIPO's stage-1 model on "ot-eps" (the QIPO default path): after 1,500 steps
    the mean of 64 samples per held-out state explains R^2 >= 0.98 of the known mean action, no
    sample leaves [-3, 3] before the final clip and the saturated fraction stays near the data's.
    Sampling from t = 1e-3 (before the fix) gave R^2 0.947, |a| up to 23 (and 87% saturated after
    400 steps): the first solver step multiplied the network's error by ~126."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    s, a, _ = _known_mean_data(20000, g)
    sh, ah, mh = _known_mean_data(300, g)
    torch.manual_seed(0)
    pol = FlowPolicy(5, 3, hidden=64, depth=3, path="ot-eps", steps=8)   # fourier time features, dpm2
    assert pol.t0 == 0.05 and pol.solver == "dpm2"
    opt = torch.optim.Adam(pol.parameters(), lr=1e-3)
    for _ in range(1500):
        idx = torch.randint(0, 20000, (256,), generator=g)
        loss = pol.loss(s[idx], a[idx], generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        raw = pol.sample(sh, 64, generator=g, clip=False)
    m = raw.clamp(-1, 1).mean(1)
    r2 = 1 - ((m - mh) ** 2).sum() / ((mh - mh.mean(0)) ** 2).sum()
    sat, data_sat = (raw.abs() >= 0.999).float().mean(), (ah.abs() >= 0.999).float().mean()
    assert r2 >= 0.98, f"R^2 {float(r2):.3f}"
    assert raw.abs().max() < 3.0, f"max |a| before the clip {float(raw.abs().max()):.1f}"
    assert abs(float(sat - data_sat)) < 0.1, f"saturation {float(sat):.3f} vs the data's {float(data_sat):.3f}"


def test_flow_policy_t0_starts_sampling_there_with_scaled_noise():
    torch.manual_seed(0)
    pol = FlowPolicy(4, 2, hidden=16, depth=2, path="ot-eps", steps=3)
    obs, noise = torch.randn(5, 4), torch.randn(5, 7, 2)
    with torch.no_grad():
        got = pol.sample(obs, 7, noise=noise, clip=False, backend="torch")
        want = ops.integrate(pol.net, noise * 0.95, obs, steps=3, solver="dpm2", t0=0.05, path="ot-eps",
                             backend="torch")
    torch.testing.assert_close(got, want)
    assert pol.config()["t0"] == 0.05 and FlowPolicy(4, 2, path="ot").t0 == 0.0 and FlowPolicy(4, 2, path="vp").t0 == 0.0
    with pytest.raises(ValueError, match="t0"):
        FlowPolicy(4, 2, path="ot-eps", t0=0.7)
    # the fast sampler and act follow the same start
    fast = make_sampler(pol, kind="flow", steps=3, num_samples=7, generator=torch.Generator().manual_seed(3))
    rg = torch.Generator().manual_seed(3)
    with torch.no_grad():
        ref1, ref2 = pol.sample(obs, 7, steps=3, generator=rg), pol.sample(obs, 7, steps=3, generator=rg)
    torch.testing.assert_close(fast(obs), ref1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast(obs), ref2, atol=1e-4, rtol=1e-4)  # the second call takes the planned path
    critic = DoubleCritic(4, 2, hidden=8, depth=1)
    cand_noise = torch.randn(5, 6, 2)
    with torch.no_grad():
        picked = pol.act(obs, critic, num_candidates=6, noise=cand_noise, backend="torch")
        cand = pol.sample(obs, 6, noise=cand_noise, backend="torch")
        q = critic.q_min(obs.repeat_interleave(6, 0), cand.reshape(-1, 2)).reshape(5, 6)
    torch.testing.assert_close(picked, cand[torch.arange(5), q.argmax(1)])


@pytest.mark.parametrize("path", ["ot", "ot-eps", "vp"])
def test_flow_policy_noise_scale(path):
    """noise_scale multiplies the N(0, I) initial noise before the path's sigma(t0) (against the reference
    integrate, float64, odd sizes); 0 is the deterministic ODE from the origin, the same for any generator;
    act scales its candidates' noise the same way; a bad value is refused by name before sampling."""
    torch.manual_seed(3)
    p = FlowPolicy(S, A, hidden=17, depth=2, path=path).double()
    obs, z = _obs(6, dtype=torch.float64), torch.randn(6, 17, A, dtype=torch.float64)
    pth = None if path == "ot" else path
    for s in (0.0, 0.37, 1.0):
        want = reference.integrate(p.net, z * s * p.start_noise_scale(), obs, steps=3, solver=p.solver, t0=p.t0,
                                   path=pth).clamp(-1, 1)
        for be in ("torch", "auto"):
            torch.testing.assert_close(p.sample(obs, 17, steps=3, noise=z, noise_scale=s, backend=be), want)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    a0 = p.sample(obs, 4, steps=3, generator=g1, noise_scale=0)
    torch.testing.assert_close(a0, p.sample(obs, 4, steps=3, generator=g2, noise_scale=0))
    torch.testing.assert_close(a0[:, 1:], a0[:, :1].expand(-1, 3, -1))
    # the drawn noise is scaled: same generator state, scale s == explicit s * z
    z1 = torch.randn(6, 4, A, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(p.sample(obs, 4, steps=3, generator=torch.Generator().manual_seed(5), noise_scale=0.5),
                               p.sample(obs, 4, steps=3, noise=0.5 * z1))
    crit = DoubleCritic(S, A, hidden=9, depth=1).double()
    for be in ("torch", "auto"):
        got = p.act(obs, crit, num_candidates=17, steps=3, noise=z, noise_scale=0.37, backend=be)
        torch.testing.assert_close(got, p.act(obs, crit, num_candidates=17, steps=3, noise=0.37 * z, backend=be))
    act0 = p.act(obs, crit, num_candidates=5, steps=3, generator=g1, noise_scale=0.0)
    torch.testing.assert_close(act0, a0[:, 0])  # all candidates are the one deterministic action
    for bad, err in ((-0.1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError), ("x", TypeError)):
        with pytest.raises(err, match="noise_scale"):
            p.sample(obs, 2, noise_scale=bad)
        with pytest.raises(err, match="noise_scale"):
            p.act(obs, crit, num_candidates=2, noise_scale=bad)


@pytest.mark.parametrize("path", ["ot", "ot-eps", "vp"])
def test_flow_policy_bound_dequant_is_the_loss_on_dequantized_targets(path):
    """loss(bound_dequant=sigma) = the plain loss on reference.dequantize_bounds(actions, sigma, z) for the
    same t, noise and z, on every backend; drawn from the generator in the order t, noise, z (so
    distributed.flow_loss can draw them for the global batch); sigma = 0 changes nothing."""
    torch.manual_seed(2)
    p = FlowPolicy(S, A, hidden=17, depth=2, path=path)
    B, M = 6, 17
    g = torch.Generator().manual_seed(5)
    obs = _obs(B)
    acts = (torch.rand(B, M, A, generator=g) * 3 - 1.5).clamp(-1, 1)
    t, z, zq = torch.rand(B, M, generator=g) * (1 - VP_EPS), torch.randn(B, M, A, generator=g), torch.randn(B, M, A, generator=g)
    e = torch.randn(B, M, generator=g)
    # the reference: the loss formula on the dequantized targets (no range check: they lie beyond 1)
    tgt = reference.dequantize_bounds(acts, 0.2, zq)
    x_t, target = reference.flow_path(tgt, z, t, path)
    pred = p.net(x_t.reshape(-1, A), t.reshape(-1), obs.repeat_interleave(M, 0)).reshape(B, M, A)
    want = reference.weighted_fm_loss(pred, target, e, 3.0, "support")
    for backend in ("torch", "auto"):
        got = p.loss(obs, acts, energy=e, t=t, noise=z, bound_dequant=0.2, dequant_noise=zq, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in p.net.parameters())
    # drawn: t, then noise, then z, from one generator
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    drawn = p.loss(obs, acts, generator=g1, bound_dequant=0.2, backend="torch")
    hi = 1.0 - VP_EPS if path == "vp" else 1.0
    t2 = torch.rand(B, M, generator=g2) * hi
    z2, zq2 = torch.randn(B, M, A, generator=g2), torch.randn(B, M, A, generator=g2)
    torch.testing.assert_close(drawn, p.loss(obs, acts, t=t2, noise=z2, bound_dequant=0.2, dequant_noise=zq2,
                                             backend="torch"))
    # off: the plain loss, and the generator advances as without the argument
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(p.loss(obs, acts, generator=g1, bound_dequant=0.0), p.loss(obs, acts, generator=g2))
    assert torch.equal(g1.get_state(), g2.get_state())


def test_flow_policy_bound_dequant_bad_input_before_any_draw():
    p = FlowPolicy(S, A, hidden=8, depth=1)
    obs, acts = _obs(4), torch.zeros(4, 2, A)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    with pytest.raises(ValueError, match="bound_dequant must be >= 0"):
        p.loss(obs, acts, generator=g, bound_dequant=-0.1)
    with pytest.raises(TypeError, match="bound_dequant must be a number"):
        p.loss(obs, acts, generator=g, bound_dequant=None)
    with pytest.raises(ValueError, match=r"dequant_noise must be \[4, 2, 3\]"):
        p.loss(obs, acts, generator=g, bound_dequant=0.1, dequant_noise=torch.randn(4, 3))
    assert torch.equal(g.get_state(), state)
    # the data range is checked on the actions as given, not on their dequantized copy
    with pytest.raises(ValueError, match="actions must lie in"):
        p.loss(obs, acts + 1.5, bound_dequant=0.1)


def test_bound_dequant_makes_the_flow_model_keep_the_datas_saturated_actions():
    """Regression test for QIPO's stage-1 saturation (issue 10; bench/results/qipo_saturation.md): on data
    with 35% of the coordinates at the bound (an env clip), plain flow matching puts that mass just
    inside the box (15% of the samples' coordinates at |a| >= 0.999 after 2,000 steps here); with the
    bound targets dequantized (sigma 0.2) the samples match the data's fraction (36%)."""
    torch.set_num_threads(1)

    def draw(n, g):
        s = torch.randn(n, 5, generator=g)
        W = torch.tensor([[1.0, -0.5, 0.3, 0.0, 0.8], [0.2, 0.9, -0.7, 0.5, 0.0], [-0.6, 0.1, 0.4, 1.0, -0.3]])
        return s, (1.1 * torch.tanh(1.5 * s @ W.T) + 0.2 * torch.randn(n, 3, generator=g)).clamp(-1, 1)

    sat = {}
    for sigma in (0.0, 0.2):
        g = torch.Generator().manual_seed(0)
        s, a = draw(20000, g)
        sh, ah = draw(300, g)
        torch.manual_seed(0)
        pol = FlowPolicy(5, 3, hidden=64, depth=3, path="ot-eps", steps=8)
        opt = torch.optim.Adam(pol.parameters(), lr=1e-3)
        for _ in range(2000):
            idx = torch.randint(0, 20000, (256,), generator=g)
            loss = pol.loss(s[idx], a[idx], generator=g, bound_dequant=sigma)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            out = pol.sample(sh, 64, generator=g)
        sat[sigma] = float((out.abs() >= 0.999).float().mean())
        data_sat = float((ah.abs() >= 0.999).float().mean())
    assert 0.3 < data_sat < 0.4
    assert sat[0.0] < data_sat - 0.12, sat          # the defect this guards against
    assert abs(sat[0.2] - data_sat) < 0.06, (sat, data_sat)
