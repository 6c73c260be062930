import math

import pytest
import torch

import qipo_kernels as qk
from qipo_kernels import ConditionalMLP, DoubleCritic
from qipo_kernels import reference as R

D64 = torch.float64


def test_karras_sigmas_published_values():
    s = R.karras_sigmas(40)
    assert s.shape == (40,)
    assert abs(float(s[0]) - 80.0) < 1e-12
    assert abs(float(s[1]) - 69.4509) < 1e-4  # CPQL's second level, 69.45...
    assert abs(float(s[-1]) - 0.002) < 1e-15
    assert bool((s[1:] < s[:-1]).all())
    # the rho-th roots are evenly spaced
    r = s ** (1 / 7)
    d = r[1:] - r[:-1]
    torch.testing.assert_close(d, d[0].expand_as(d))


def test_boundary_scalings():
    c_skip, c_out, c_in = R.scalings(torch.tensor(0.002, dtype=D64))
    assert float(c_skip) == 1.0 and float(c_out) == 0.0
    assert abs(float(c_in) - 1 / math.sqrt(0.002 ** 2 + 0.25)) < 1e-15
    # python floats give the same numbers
    assert R.scalings(0.002) == (1.0, 0.0, float(c_in))
    # large sigma: the skip vanishes, the output scale tends to sigma_data
    c_skip, c_out, _ = R.scalings(torch.tensor(1e6, dtype=D64))
    assert float(c_skip) < 1e-12 and abs(float(c_out) - 0.5) < 1e-6


def test_denoise_formula_and_boundary():
    torch.manual_seed(0)
    net = ConditionalMLP(6, 17, hidden=16, depth=2).double()
    x, obs = torch.randn(5, 6, dtype=D64) * 0.5, torch.randn(5, 17, dtype=D64)
    # at sigma_min the consistency function is the identity (then clamped)
    torch.testing.assert_close(R.consistency_denoise(net, x, 0.002, obs), x.clamp(-1, 1))
    sigma = torch.tensor([0.5, 1.0, 2.0, 10.0, 80.0], dtype=D64)
    c_skip, c_out, c_in = R.scalings(sigma[:, None])
    want = (c_skip * x + c_out * net(c_in * x, 250 * torch.log(sigma), obs)).clamp(-1, 1)
    torch.testing.assert_close(R.consistency_denoise(net, x, sigma, obs), want)
    raw = R.consistency_denoise(net, x * 100, sigma, obs, clip=False)
    assert raw.abs().max() > 1  # clip=False leaves values outside [-1, 1]


def test_consistency_sample_one_and_multistep():
    torch.manual_seed(1)
    net = ConditionalMLP(6, 17, hidden=16, depth=2).double()
    z, obs = torch.randn(4, 6, dtype=D64), torch.randn(4, 17, dtype=D64)
    one = qk.consistency_sample(net, z, obs)
    torch.testing.assert_close(one, R.consistency_denoise(net, 80.0 * z, 80.0, obs))
    assert one.abs().max() <= 1.0
    sig = [2.0, 0.5]
    zs = torch.randn(2, 4, 6, dtype=D64)
    multi = qk.consistency_sample(net, z, obs, sigmas=sig, step_noise=zs)
    a = one
    for k, s in enumerate(sig):
        a = R.consistency_denoise(net, a + math.sqrt(s * s - 0.002 ** 2) * zs[k], s, obs)
    torch.testing.assert_close(multi, a)
    # [B, K, A] layout: K samples per state
    zk = torch.randn(4, 3, 6, dtype=D64)
    out = qk.consistency_sample(net, zk, obs)
    torch.testing.assert_close(out.reshape(12, 6), qk.consistency_sample(net, zk.reshape(12, 6), obs.repeat_interleave(3, 0)))
    # generator-drawn re-noise is reproducible
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(qk.consistency_sample(net, z, obs, sig, generator=g1),
                               qk.consistency_sample(net, z, obs, sig, generator=g2))


def test_consistency_loss_matches_cpql_formula():
    torch.manual_seed(2)
    net = ConditionalMLP(6, 17, hidden=16, depth=2).double()
    a = torch.rand(8, 6, dtype=D64) * 2 - 1
    obs, z = torch.randn(8, 17, dtype=D64), torch.randn(8, 6, dtype=D64)
    idx = torch.randint(0, 39, (8,))
    sig = R.karras_sigmas(40)[idx]
    den = R.consistency_denoise(net, a + sig[:, None] * z, sig, obs)
    want = (((den - a) ** 2).mean(-1) * (sig ** -2 + 4.0))
    got = qk.consistency_loss(net, a, obs, sigma_idx=idx, noise=z, reduction="none")
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(qk.consistency_loss(net, a, obs, sigma_idx=idx, noise=z), want.mean())
    loss = qk.consistency_loss(net, a, obs, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="sigma_idx must lie in"):
        qk.consistency_loss(net, a, obs, sigma_idx=torch.full((8,), 39))


def test_consistency_bad_input():
    net = ConditionalMLP(6, 17, hidden=8, depth=1)
    z, obs = torch.randn(4, 6), torch.randn(4, 17)
    with pytest.raises(ValueError, match="every sigma in sigmas"):
        qk.consistency_sample(net, z, obs, sigmas=[100.0])
    with pytest.raises(ValueError, match="step_noise must have shape"):
        qk.consistency_sample(net, z, obs, sigmas=[1.0], step_noise=torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match="obs must have 4 rows"):
        qk.consistency_sample(net, z, obs[:2])
    with pytest.raises(ValueError, match="N must be an int >= 2"):
        R.karras_sigmas(1)
    with pytest.raises(ValueError, match="need sigma_min < sigma_max"):
        R.karras_sigmas(10, sigma_min=5.0, sigma_max=1.0)


def test_select_argmax_and_softmax_draws():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 7, generator=g)
    cand = torch.randn(5, 7, 3, generator=g)
    out = qk.select_action(q, cand, "argmax")
    torch.testing.assert_close(out, cand[torch.arange(5), q.argmax(1)])
    # inverse CDF: u just below the first cumulative mass picks index 0, u near 1 the last
    p = torch.softmax(q.double(), 1)
    u0 = (p[:, 0] * 0.999).float()
    torch.testing.assert_close(qk.select_action(q, cand, "softmax", uniform=u0), cand[:, 0])
    u1 = torch.full((5,), 0.999999)
    last = R.select_index(q, "softmax", 1.0, u1)
    assert bool((p.cumsum(1).gather(1, (last - 1).clamp_min(0)[:, None])[:, 0] <= 0.999999).all())


def test_softmax_selection_frequencies():
    q = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(20000, 1)
    idx = R.select_index(q, "softmax", 0.5, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(idx, minlength=4).double() / 20000
    p = torch.softmax(q[0].double() / 0.5, 0)
    assert (freq - p).abs().max() < 0.015
    # low temperature approaches argmax
    idx = R.select_index(q[:100], "softmax", 1e-3, generator=torch.Generator().manual_seed(0))
    assert bool((idx == 2).all())


def test_select_bad_input():
    q, c = torch.randn(3, 4), torch.randn(3, 4, 2)
    with pytest.raises(ValueError, match="candidates must be"):
        qk.select_action(q, c[:, :3])
    with pytest.raises(ValueError, match="q_values contains NaN"):
        qk.select_action(torch.full((3, 4), float("nan")), c)
    with pytest.raises(ValueError, match="mode must be one of"):
        qk.select_action(q, c, "max")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        qk.select_action(q, c, "softmax", temperature=0)
    with pytest.raises(ValueError, match="uniform must lie"):
        qk.select_action(q, c, "softmax", uniform=torch.full((3,), 1.5))


def test_act_reference_end_to_end():
    torch.manual_seed(3)
    net = ConditionalMLP(6, 17, hidden=16, depth=2)
    critic = DoubleCritic(17, 6, hidden=16, depth=2)
    obs = torch.randn(4, 17)
    noise = torch.randn(4, 5, 6)
    got = qk.act(net, critic, obs, 5, noise=noise, backend="torch")
    cand = qk.integrate(net, noise, obs, 10, "euler", backend="torch").clamp(-1, 1)
    q = critic.q_min(obs.repeat_interleave(5, 0), cand.reshape(20, 6)).reshape(4, 5)
    torch.testing.assert_close(got, cand[torch.arange(4), q.argmax(1)])
    c_got = qk.act(net, critic, obs, 5, sampler="consistency", noise=noise, mode="softmax",
                   uniform=torch.full((4,), 0.5), backend="torch")
    cc = qk.consistency_sample(net, noise, obs)
    qc = critic.q_min(obs.repeat_interleave(5, 0), cc.reshape(20, 6)).reshape(4, 5)
    torch.testing.assert_close(c_got, cc[torch.arange(4), R.select_index(qc, "softmax", 1.0, torch.full((4,), 0.5))])
    with pytest.raises(ValueError, match="noise must be"):
        qk.act(net, critic, obs, 5, noise=torch.randn(4, 4, 6))
    with pytest.raises(TypeError, match="critic must have a q_min"):
        qk.act(net, object(), obs, 5)
    with pytest.raises(ValueError, match="sampler must be one of"):
        qk.act(net, critic, obs, 5, sampler="diffusion")


def test_dispatch_errors_and_explain():
    from qipo_kernels import backends

    p = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        qk.weighted_fm_loss(p, p, backend="cuda")
    table = backends.explain("integrate", torch.device("cpu"))
    assert table["torch"] == []
    assert set(table) == set(backends.BACKENDS)
    # a backend that cannot run names its reasons in the error
    for b, why in table.items():
        if why:
            with pytest.raises(RuntimeError, match="cannot run integrate here"):
                qk.integrate(ConditionalMLP(4, 3, hidden=8, depth=1), torch.randn(2, 4), torch.randn(2, 3),
                             2, backend=b)
    assert "torch" in backends.table()
