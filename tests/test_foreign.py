"""Drop-in for other people's RL code: CPQL's and Diffusion-QL's own architectures (built here with their
state_dict layouts, tests/_official.py), loaded with make_sampler / DoubleCritic.from_*, must give the
official actions, Q values and selection probabilities, with identical noise, on every backend.
"""
import types

import pytest
import torch

import qipo_kernels as qk
from qipo_kernels import backends, ops
from qipo_kernels.nets import DoubleCritic
from qipo_kernels.reference import cpql_multistep_sigmas
from qipo_kernels.reference import select as RS

from _official import OfficialCritic, OfficialDiffusion, OfficialMLP, karras_official_sample

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Implicit dimension choice for softmax")]

ATOL = RTOL = 2e-5
# ddpm: x0 = sqrt(1 / abar) x - sqrt(1 / abar - 1) eps multiplies the float32 rounding of the network
# by sqrt(1 / abar_T) = 12.5 at the first step of the 5-step vp schedule
DATOL = 1e-4
S, A = 11, 3


def _cpu_backends(op):
    out = ["torch"]
    for b in ("cpp",):
        if not backends.backend_reasons(b, torch.device("cpu")) and b in backends._IMPLS.get(op, {}):
            out.append(b)
    return out


def _perturb(module, seed=0):
    """Non-default LayerNorm gammas / betas and larger weights (far from linear)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------ critics
@pytest.mark.parametrize("norm", ["layernorm", "identity", None])
def test_critic_converters_give_the_official_q(norm):
    torch.manual_seed(1)
    off = OfficialCritic(S, A, H=37, norm=norm)
    _perturb(off)
    sd = off.state_dict()
    load = DoubleCritic.from_cpql_state_dict if norm else DoubleCritic.from_diffusion_ql_state_dict
    dc = load(sd, act_dim=A)
    auto = DoubleCritic.from_official_state_dict(sd, obs_dim=S)
    assert dc.layer_norm == (norm == "layernorm") and (dc.obs_dim, dc.act_dim, dc.hidden, dc.depth) == (S, A, 37, 3)
    obs, act = torch.randn(1000, S), torch.randn(1000, A)
    with torch.no_grad():
        q1, q2 = off(obs, act)
        want = off.q_min(obs, act)[:, 0]
        assert torch.equal(dc.q1(obs, act), q1[:, 0]) and torch.equal(dc.q2(obs, act), q2[:, 0])
        assert torch.equal(dc.q_min(obs, act), want) and torch.equal(auto.q_min(obs, act), want)


def test_critic_converters_refuse_unknown_layouts():
    torch.manual_seed(2)
    dql = OfficialCritic(S, A, H=8).state_dict()
    cpql = OfficialCritic(S, A, H=8, norm="layernorm").state_dict()
    with pytest.raises(ValueError, match="Linear layers at"):
        DoubleCritic.from_cpql_state_dict(dql, act_dim=A)           # Diffusion-QL's head read as CPQL's
    with pytest.raises(ValueError, match="unknown critic layout"):
        DoubleCritic.from_diffusion_ql_state_dict(cpql, act_dim=A)
    with pytest.raises(ValueError, match="no q1_model"):
        DoubleCritic.from_official_state_dict({"l1.weight": torch.zeros(2, 2)}, act_dim=A)
    some = {k: v for k, v in cpql.items() if not k.startswith(("q1_model.4.", "q2_model.4."))}
    with pytest.raises(ValueError, match="LayerNorm"):
        DoubleCritic.from_cpql_state_dict(some, act_dim=A)           # LayerNorm on some layers only
    with pytest.raises(ValueError, match="give obs_dim or act_dim"):
        DoubleCritic.from_cpql_state_dict(cpql)
    with pytest.raises(ValueError, match="obs_dim \\+ act_dim"):
        DoubleCritic.from_cpql_state_dict(cpql, obs_dim=S, act_dim=A + 1)
    with pytest.raises(ValueError, match="layout"):
        DoubleCritic.from_official_state_dict(cpql, layout="iql", act_dim=A)


# ------------------------------------------------------------------------------ Diffusion-QL
def _dql(seed=3, max_action=2.0, T=5, H=48):
    torch.manual_seed(seed)
    model = OfficialMLP(S, A, hidden=H)
    _perturb(model, seed)
    diff = OfficialDiffusion(model, T, "vp", max_action, True)
    critic = OfficialCritic(S, A, H=40)
    _perturb(critic, seed + 1)
    return diff, critic


@pytest.mark.parametrize("source", ["module", "state_dict"])
def test_diffusion_ql_sampler_and_act(source):
    diff, off_critic = _dql()
    T, B, K = 5, 6, 50
    critic = DoubleCritic.from_diffusion_ql_state_dict(off_critic.state_dict(), obs_dim=S)
    obs = torch.randn(B, S) * 2
    for b in _cpu_backends("ddpm_sample"):
        g = torch.Generator().manual_seed(4)
        if source == "module":
            smp = qk.make_sampler(diff, generator=g, backend=b)              # kind, max_action read from it
        else:
            smp = qk.make_sampler(diff.state_dict(), max_action=2.0, generator=g, backend=b)
        assert smp.kind == "ddpm" and smp.policy.max_action == 2.0
        got = [smp(obs), smp(obs)]  # the second call: the real-time plan
        g2 = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for y in got:
                x = torch.randn((B, A), generator=g2)
                want = diff.sample(obs, x, [torch.randn((B, A), generator=g2) for _ in range(T - 1)])
                torch.testing.assert_close(y, want, atol=DATOL, rtol=RTOL)
            # act: 50 candidates, min(Q1, Q2) of the official critic, a softmax(Q) draw (sample_action)
            smp.generator = torch.Generator().manual_seed(8)
            a = smp.act(obs, critic)
            g3 = torch.Generator().manual_seed(8)
            x = torch.randn((B, K, A), generator=g3).reshape(B * K, A)
            steps = [torch.randn((B * K, A), generator=g3) for _ in range(T - 1)]
            u = torch.rand(B, dtype=torch.float64, generator=g3)
            rpt = obs.repeat_interleave(K, 0)
            cand = diff.sample(rpt, x, steps)
            q = off_critic.q_min(rpt, cand).reshape(B, K)
            want = cand.reshape(B, K, A)[torch.arange(B), RS.select_index(q, "softmax", 1.0, u)]
        torch.testing.assert_close(a, want, atol=DATOL, rtol=RTOL)
        if b == "cpp":
            from qipo_kernels import cpp

            dbg = {}
            with torch.no_grad():
                cpp.act_ext(smp.net, critic, obs, K, "ddpm", ops._DDPMArgs(tuple(smp.policy._ddpm_kw().values())),
                            "softmax", 1.0, x.reshape(B, K, A), torch.stack(steps), u, None, True, _debug=dbg)
            torch.testing.assert_close(dbg["candidates"].reshape(B * K, A), cand, atol=DATOL, rtol=RTOL)
            torch.testing.assert_close(dbg["q"].reshape(B, K), q, atol=ATOL, rtol=RTOL)
            # the selection probabilities softmax(Q) of the official code
            torch.testing.assert_close(torch.softmax(dbg["q"].reshape(B, K).double(), 1), torch.softmax(q.double(), 1),
                                       atol=1e-5, rtol=1e-4)


def test_diffusion_ql_actor_refuses_other_samplers():
    diff, _ = _dql(H=16)
    for kind in ("consistency", "flow"):
        with pytest.raises(ValueError, match="DDPM"):
            qk.make_sampler(diff.state_dict(), kind=kind)
        with pytest.raises(ValueError, match="DDPM"):
            qk.make_sampler(diff, kind=kind)
    with pytest.raises(ValueError, match="kind must be given"):
        qk.make_sampler(diff.model.state_dict())  # the bare MLP: CPQL's or Diffusion-QL's network
    with pytest.raises(ValueError, match="kind must be given"):
        qk.make_sampler(diff.model)
    # the bare MLP with kind="ddpm" samples with the schedule asked for
    s = qk.make_sampler(diff.model, kind="ddpm", schedule="vp", max_action=2.0)
    assert s.kind == "ddpm" and s.policy.schedule.n_timesteps == 5
    box = types.SimpleNamespace(low=-2.0 * torch.ones(A), high=2.0 * torch.ones(A))
    assert qk.make_sampler(diff.state_dict(), action_space=box).policy.max_action == 2.0
    with pytest.raises(ValueError, match="symmetric"):
        qk.make_sampler(diff.state_dict(), action_space=types.SimpleNamespace(low=-torch.ones(A), high=2 * torch.ones(A)))


# ------------------------------------------------------------------------------ CPQL
def _cpql(seed=5, H=48, norm="layernorm"):
    torch.manual_seed(seed)
    model = OfficialMLP(S, A, hidden=H)
    _perturb(model, seed)
    critic = OfficialCritic(S, A, H=40, norm=norm)
    _perturb(critic, seed + 1)
    return model, critic


@pytest.mark.parametrize("multistep", [False, True])
def test_cpql_sampler_and_act_with_action_map(multistep):
    model, off_critic = _cpql()
    critic = DoubleCritic.from_cpql_state_dict(off_critic.state_dict(), obs_dim=S)
    B, K = 5, 50
    low, high = torch.tensor([-1.0, 0.0, -3.0]), torch.tensor([1.0, 2.0, 1.0])
    box = types.SimpleNamespace(low=low, high=high)
    scale, bias = (high - low) / 2, (high + low) / 2
    ts = [0, 20, 40] if multistep else None
    sig = cpql_multistep_sigmas() if multistep else None
    n_re = len(ts or ())
    obs = torch.randn(B, S)
    for b in _cpu_backends("consistency_sample"):
        smp = qk.make_sampler(model, kind="consistency", sigmas=sig, action_space=box,
                              generator=torch.Generator().manual_seed(6), backend=b)
        got = smp(obs)
        g = torch.Generator().manual_seed(6)
        with torch.no_grad():
            x = torch.randn((B, A), generator=g)
            want = karras_official_sample(model, obs, x, [torch.randn((B, A), generator=g) for _ in range(n_re)], ts)
        torch.testing.assert_close(got, want * scale + bias, atol=ATOL * 3, rtol=RTOL)
        # act: CPQL's sample_action (50 candidates, softmax(Q) of the target critic, then scale / bias)
        smp.generator = torch.Generator().manual_seed(7)
        a = smp.act(obs, critic)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            x = torch.randn((B, K, A), generator=g).reshape(B * K, A)
            re = [torch.randn((B * K, A), generator=g) for _ in range(n_re)]
            u = torch.rand(B, dtype=torch.float64, generator=g)
            rpt = obs.repeat_interleave(K, 0)
            cand = karras_official_sample(model, rpt, x, re, ts)
            q = off_critic.q_min(rpt, cand).reshape(B, K)
            want = cand.reshape(B, K, A)[torch.arange(B), RS.select_index(q, "softmax", 1.0, u)]
        torch.testing.assert_close(a, want * scale + bias, atol=ATOL * 3, rtol=RTOL)


def test_cpql_custom_sigma_parameters_and_obs_normaliser():
    model, off_critic = _cpql(H=24, norm="identity")
    critic = DoubleCritic.from_cpql_state_dict(off_critic.state_dict(), act_dim=A)
    obs = torch.randn(4, S)
    mean, std = torch.randn(S), torch.rand(S) + 0.5
    for b in _cpu_backends("act_ext"):
        smp = qk.make_sampler(model.state_dict(), kind="consistency", sigma_max=40.0, sigma_data=0.7,
                              obs_normalizer=(mean, std), generator=torch.Generator().manual_seed(2), backend=b)
        got = smp(obs)
        with torch.no_grad():
            x = torch.randn((4, A), generator=torch.Generator().manual_seed(2))
            want = karras_official_sample(model, (obs - mean) / std, x, [], None, sigma_max=40.0, sigma_data=0.7)
        torch.testing.assert_close(got, want, atol=ATOL * 3, rtol=RTOL)
        smp.generator = torch.Generator().manual_seed(3)
        a = smp.act(obs, critic, num_candidates=7)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            on = ((obs - mean) / std).repeat_interleave(7, 0)
            cand = karras_official_sample(model, on, torch.randn((4, 7, A), generator=g).reshape(28, A), [], None,
                                          sigma_max=40.0, sigma_data=0.7)
            q = off_critic.q_min(on, cand).reshape(4, 7)
            u = torch.rand(4, dtype=torch.float64, generator=g)
            want = cand.reshape(4, 7, A)[torch.arange(4), RS.select_index(q, "softmax", 1.0, u)]
        torch.testing.assert_close(a, want, atol=ATOL * 3, rtol=RTOL)


def test_official_critic_on_the_fast_path_warns_once_and_explain_says_why():
    if "cpp" not in _cpu_backends("act"):
        pytest.skip("the C++ backend is not available here")
    from qipo_kernels.cpp import FastPathSkipped

    model, off_critic = _cpql(H=16, norm="layernorm")
    net = qk.ConditionalMLP.from_cpql_state_dict(model.state_dict(), obs_dim=S, act_dim=A, kind="consistency")
    obs = torch.randn(2, S)
    with torch.no_grad():
        with pytest.warns(FastPathSkipped, match="from_cpql_state_dict") as rec:
            a1 = qk.act(net, off_critic, obs, 4, generator=torch.Generator().manual_seed(0))
            a2 = qk.act(net, off_critic, obs, 4, generator=torch.Generator().manual_seed(0))
        assert len([w for w in rec if issubclass(w.category, FastPathSkipped)]) == 1  # once per module
        assert torch.equal(a1, a2)
        why = backends.explain("act", torch.device("cpu"), net=net, critic=off_critic, obs=obs, num_candidates=4,
                               sampler="consistency", mode="softmax", noise=None)
        assert any("DoubleCritic.from_cpql_state_dict" in r for r in why["cpp"])
        # converted, the same call runs on the C++ backend without a warning
        import warnings

        dc = DoubleCritic.from_cpql_state_dict(off_critic.state_dict(), obs_dim=S)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FastPathSkipped)
            a3 = qk.act(net, dc, obs, 4, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(a3, a1, atol=ATOL, rtol=RTOL)


def test_make_sampler_ddpm_policy_with_a_box_and_cuda_graph_refusal():
    """A DDPMPolicy with action_space: the Box's bound must agree with the policy's max_action (it is
    not a setting the caller gave twice); cuda_graph=True is refused for a ddpm actor up front."""
    box = type("Box", (), {"low": -2 * torch.ones(3), "high": 2 * torch.ones(3)})
    pol = qk.DDPMPolicy(5, 3, hidden=16, depth=2, max_action=2.0)
    s = qk.make_sampler(pol, action_space=box, backend="torch")
    assert s(torch.randn(4, 5)).shape == (4, 3)
    with pytest.raises(ValueError, match="differs from the DDPMPolicy's max_action"):
        qk.make_sampler(qk.DDPMPolicy(5, 3, hidden=16, depth=2, max_action=1.0), action_space=box)
    with pytest.raises(ValueError, match="not a ddpm actor"):
        qk.make_sampler(pol, cuda_graph=True)


def test_act_float64_with_sigmas_and_ddpm():
    """act's argument check builds its stand-in noise in obs's dtype: float64 runs on every path."""
    net = qk.ConditionalMLP(act_dim=3, obs_dim=5, hidden=16, depth=2).double()
    critic = qk.DoubleCritic(5, 3, hidden=16, depth=2).double()
    obs = torch.randn(4, 5, dtype=torch.float64)
    with torch.no_grad():
        a = qk.act(net, critic, obs, 6, sampler="consistency", sigmas=[2.0, 0.5], backend="torch")
        b = qk.act(net, critic, obs, 6, sampler="consistency", sigma_max=40.0, backend="torch")
        c = qk.act(net, critic, obs, 6, sampler="ddpm", backend="torch")
    assert a.dtype == b.dtype == c.dtype == torch.float64 and a.shape == b.shape == c.shape == (4, 3)
