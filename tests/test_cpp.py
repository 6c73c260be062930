"""The C++ CPU backend (qipo_kernels._C via qipo_kernels.cpp) against the PyTorch reference.

Every output buffer the C++ writes is poisoned with NaN first (the autouse ``poison`` fixture
replaces cpp._empty), so an element the kernels leave unwritten fails the comparison. Noise is
passed in (or drawn from the same generator state), so both backends see identical inputs.
Results must agree to float32 rounding; where the computation amplifies rounding (the
noise-prediction solvers divide by alpha(t)), the C++ result must be at most a few times as far
from the float64 truth as the float32 reference is.
"""
import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

if os.environ.get("QIPO_KERNELS_NO_EXT", "0") == "1":
    pytest.skip("QIPO_KERNELS_NO_EXT=1: the C++ extension was deliberately not built", allow_module_level=True)

import qipo_kernels as qk  # noqa: E402
from qipo_kernels import _C, backends, cpp  # noqa: E402  (must import: the extension is required here)
from qipo_kernels.nets import ACTIVATIONS, TIME_EMBEDDINGS  # noqa: E402
from conftest import poison_cpp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL, RTOL = 2e-5, 2e-5


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    poison_cpp(monkeypatch)


@pytest.fixture(params=_C.available_isas())
def isa(request):
    old = _C.isa()
    _C.set_isa(request.param)
    yield request.param
    _C.set_isa(old)


def make(act_dim=6, obs_dim=17, hidden=40, depth=3, activation="mish", time_embedding="sinusoidal", seed=0,
         critic=False, critic_hidden=None):
    torch.manual_seed(seed)
    net = qk.ConditionalMLP(act_dim, obs_dim, hidden=hidden, depth=depth, activation=activation,
                            time_embedding=time_embedding)
    # larger weights than the default init so that the nets are far from linear
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.5)
    if not critic:
        return net
    q = qk.DoubleCritic(obs_dim, act_dim, hidden=critic_hidden or hidden, depth=depth, activation=activation)
    return net, q


def close(a, b, atol=ATOL, rtol=RTOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.isfinite(a).all(), "non-finite values in the C++ output (unwritten element?)"
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def f64(*mods):
    return [copy.deepcopy(m).double() for m in mods]


# ----------------------------------------------------------------------------------------- integrate
SOLVER_PATHS = [("euler", None), ("midpoint", None), ("heun", "ot"), ("rk4", None), ("ddim", "vp"),
                ("dpm1", "ot-eps"), ("dpm2", "vp"), ("dpm2", "ot-eps"), ("ddim", "ot-eps")]


@pytest.mark.parametrize("solver,path", SOLVER_PATHS)
@pytest.mark.parametrize("layout", ["flat", "per_state"])
def test_integrate_matches_reference(solver, path, layout):
    net = make(hidden=40, obs_dim=17, act_dim=6)
    g = torch.Generator().manual_seed(1)
    if layout == "flat":
        x0, obs = torch.randn(7, 6, generator=g), torch.randn(7, 17, generator=g)
    else:
        x0, obs = torch.randn(3, 5, 6, generator=g), torch.randn(3, 17, generator=g)
    steps = 6
    with torch.no_grad():
        ref = qk.integrate(net, x0, obs, steps=steps, solver=solver, path=path, backend="torch")
        out = qk.integrate(net, x0, obs, steps=steps, solver=solver, path=path, backend="cpp")
        if solver in ("euler", "midpoint", "heun", "rk4"):
            close(out, ref)
        else:
            (n64,) = f64(net)
            truth = qk.integrate(n64, x0.double(), obs.double(), steps=steps, solver=solver, path=path,
                                 backend="torch")
            e_ref = (ref.double() - truth).abs().max().item()
            e_cpp = (out.double() - truth).abs().max().item()
            assert torch.isfinite(out).all()
            assert e_cpp <= 4 * e_ref + 1e-5, (e_cpp, e_ref)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("time_embedding", TIME_EMBEDDINGS)
def test_integrate_activations_time_embeddings(activation, time_embedding):
    # odd shapes rotate with the combination
    i = ACTIVATIONS.index(activation) + 5 * TIME_EMBEDDINGS.index(time_embedding)
    hidden, obs_dim, act_dim, n, depth = [(24, 3, 1, 1, 1), (40, 17, 6, 7, 2), (24, 17, 1, 50, 3),
                                          (40, 3, 6, 1, 4)][i % 4]
    net = make(act_dim, obs_dim, hidden, depth, activation, time_embedding, seed=i)
    g = torch.Generator().manual_seed(i)
    x0, obs = torch.randn(n, act_dim, generator=g), torch.randn(n, obs_dim, generator=g)
    with torch.no_grad():
        for solver in ("euler", "rk4"):
            ref = qk.integrate(net, x0, obs, steps=4, solver=solver, backend="torch")
            out = qk.integrate(net, x0, obs, steps=4, solver=solver, backend="cpp")
            close(out, ref)


@pytest.mark.parametrize("hidden,obs_dim,act_dim,B,K", [(256, 17, 6, 2, 50), (24, 3, 1, 1, 1), (40, 17, 6, 7, 3)])
def test_integrate_shapes_and_isas(isa, hidden, obs_dim, act_dim, B, K):
    net = make(act_dim, obs_dim, hidden)
    g = torch.Generator().manual_seed(2)
    x0, obs = torch.randn(B, K, act_dim, generator=g), torch.randn(B, obs_dim, generator=g)
    with torch.no_grad():
        for solver, path in (("heun", None), ("dpm2", "vp")):
            ref = qk.integrate(net, x0, obs, steps=3, solver=solver, path=path, backend="torch")
            out = qk.integrate(net, x0, obs, steps=3, solver=solver, path=path, backend="cpp")
            close(out, ref, atol=2e-4 if path else ATOL)


def test_integrate_trajectory_and_interval():
    net = make()
    g = torch.Generator().manual_seed(3)
    x0, obs = torch.randn(4, 3, 6, generator=g), torch.randn(4, 17, generator=g)
    with torch.no_grad():
        ref, rtraj = qk.integrate(net, x0, obs, steps=5, solver="midpoint", t0=0.2, t1=0.9, return_trajectory=True,
                                  backend="torch")
        out, traj = qk.integrate(net, x0, obs, steps=5, solver="midpoint", t0=0.2, t1=0.9, return_trajectory=True,
                                 backend="cpp")
    assert traj.shape == (6, 4, 3, 6)
    close(out, ref)
    close(traj, rtraj)
    assert torch.equal(traj[0], x0) and torch.equal(traj[-1], out)


def test_threads_do_not_change_results():
    net = make(hidden=24)
    g = torch.Generator().manual_seed(4)
    x0, obs = torch.randn(9, 31, 6, generator=g), torch.randn(9, 17, generator=g)  # 279 rows: 5 chunks
    old = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one = qk.integrate(net, x0, obs, steps=3, backend="cpp")
            torch.set_num_threads(2)
            two = qk.integrate(net, x0, obs, steps=3, backend="cpp")
            ref = qk.integrate(net, x0, obs, steps=3, backend="torch")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)
    close(one, ref)


# ----------------------------------------------------------------------------------------- consistency
@pytest.mark.parametrize("layout", ["flat", "per_state"])
@pytest.mark.parametrize("sigmas", [None, [2.0, 0.5], [10.0]])
@pytest.mark.parametrize("clip", [True, False])
def test_consistency_matches_reference(layout, sigmas, clip):
    net = make(hidden=40, activation="mish")
    g = torch.Generator().manual_seed(5)
    shape = (7, 6) if layout == "flat" else (3, 4, 6)
    z, obs = torch.randn(*shape, generator=g), torch.randn(shape[0], 17, generator=g)
    sn = torch.randn(len(sigmas), *shape, generator=g) if sigmas else None
    with torch.no_grad():
        ref = qk.consistency_sample(net, z, obs, sigmas=sigmas, step_noise=sn, clip=clip, backend="torch")
        out = qk.consistency_sample(net, z, obs, sigmas=sigmas, step_noise=sn, clip=clip, backend="cpp")
        close(out, ref)
        if sigmas:  # re-noise drawn from the generator, in the reference's order
            ref = qk.consistency_sample(net, z, obs, sigmas=sigmas, clip=clip, backend="torch",
                                        generator=torch.Generator().manual_seed(9))
            out = qk.consistency_sample(net, z, obs, sigmas=sigmas, clip=clip, backend="cpp",
                                        generator=torch.Generator().manual_seed(9))
            close(out, ref)


def test_consistency_isas(isa):
    net = make(hidden=256, obs_dim=17, act_dim=6)
    g = torch.Generator().manual_seed(6)
    z, obs = torch.randn(1, 6, generator=g), torch.randn(1, 17, generator=g)
    with torch.no_grad():
        close(qk.consistency_sample(net, z, obs, backend="cpp"), qk.consistency_sample(net, z, obs, backend="torch"))


# ----------------------------------------------------------------------------------------- select_action
@pytest.mark.parametrize("B,K,D", [(1, 1, 1), (17, 50, 6), (6, 1000, 17), (1000, 3, 2)])
@pytest.mark.parametrize("mode", ["argmax", "softmax"])
def test_select_action_matches_reference(B, K, D, mode):
    g = torch.Generator().manual_seed(B * K + D)
    q = torch.randn(B, K, generator=g) * 3.0
    if K > 2:
        q[0, 1] = q[0, 2] = q[0].max() + 1.0     # a tie: argmax takes the first
    cand = torch.randn(B, K, D, generator=g)
    for temperature in (1.0, 0.05, 7.0):
        want = qk.select_action(q, cand, mode, temperature, generator=torch.Generator().manual_seed(3), backend="torch")
        got = qk.select_action(q, cand, mode, temperature, generator=torch.Generator().manual_seed(3), backend="cpp")
        assert torch.isfinite(got).all() and torch.equal(got, want)
        u = torch.rand(B, dtype=torch.float64, generator=g)
        assert torch.equal(qk.select_action(q, cand, mode, temperature, uniform=u, backend="cpp"),
                           qk.select_action(q, cand, mode, temperature, uniform=u, backend="torch"))
    assert backends.choose("select_action", "auto", q.device, None, q_values=q, candidates=cand, mode=mode)[0] == "cpp"


def test_select_action_softmax_isas_temperatures(isa):
    # the softmax draw's exp is vectorised per instruction set: every variant, extreme temperatures
    # (offsets down to -1e5, below exp's range) and K around the vector width
    g = torch.Generator().manual_seed(7)
    for K in (1, 2, 3, 7, 8, 9, 16, 17, 300):
        q = torch.randn(64, K, generator=g) * 4.0
        cand = torch.randn(64, K, 3, generator=g)
        for temperature in (1e-4, 0.01, 1.0, 1e4):
            u = torch.rand(64, dtype=torch.float64, generator=g)
            got = qk.select_action(q, cand, "softmax", temperature, uniform=u, backend="cpp")
            assert torch.equal(got, qk.select_action(q, cand, "softmax", temperature, uniform=u, backend="torch"))


def test_select_action_reasons_and_bad_input():
    q, cand = torch.randn(4, 5), torch.randn(4, 5, 3)
    r = _cpp_reasons("select_action", q_values=q.double(), candidates=cand.double(), mode="argmax")
    assert r and "float64" in r[0]
    out = qk.select_action(q.double(), cand.double())                # auto: the reference
    assert out.dtype == torch.float64
    c = cand.clone().requires_grad_()
    assert any("grad" in s for s in _cpp_reasons("select_action", q_values=q, candidates=c, mode="argmax"))
    qk.select_action(q, c).sum().backward()                          # auto: the reference, with gradients
    assert c.grad.abs().sum() == 4 * 3
    with pytest.raises(ValueError, match="finite"):
        qk.select_action(torch.tensor([[0.0, float("nan")]]), torch.randn(1, 2, 3), backend="cpp")
    with pytest.raises(ValueError, match="uniform"):
        qk.select_action(q, cand, "softmax", uniform=torch.full((4,), 1.0, dtype=torch.float64), backend="cpp")
    o = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="candidates must have shape"):
        _C.select_action(q, torch.randn(4, 6, 3), "argmax", 1.0, None, o)
    with pytest.raises(TypeError, match="uniform"):
        _C.select_action(q, cand, "softmax", 1.0, torch.rand(4), o)          # float32 uniform
    with pytest.raises(ValueError, match="mode"):
        _C.select_action(q, cand, "greedy", 1.0, None, o)
    with pytest.raises(ValueError, match="temperature"):
        _C.select_action(q, cand, "softmax", 0.0, torch.rand(4, dtype=torch.float64), o)
    idx = np.full(4, -1, np.int64)
    _C.select_action(q, cand, "argmax", 1.0, None, o, idx)
    assert (idx == q.argmax(1).numpy()).all()


# ----------------------------------------------------------------------------------------- act
def _act_both(net, critic, obs, K, **kw):
    with torch.no_grad():
        dbg = {}
        ref = qk.act(net, critic, obs, K, backend="torch", generator=torch.Generator().manual_seed(11), **kw)
        args = dict(num_candidates=K, sampler="flow", steps=10, solver="euler", path=None, sigmas=None,
                    mode="argmax", temperature=1.0, noise=None, step_noise=None, uniform=None, clip=True)
        args.update(kw)
        if args["sigmas"] is not None:
            args["sigmas"] = [float(s) for s in args["sigmas"]]
        out = cpp.act(net, critic, obs, args["num_candidates"], args["sampler"], args["steps"], args["solver"],
                      args["path"], args["sigmas"], args["mode"], float(args["temperature"]), args["noise"],
                      args["step_noise"], args["uniform"], torch.Generator().manual_seed(11), args["clip"],
                      _debug=dbg)
        via_ops = qk.act(net, critic, obs, K, backend="cpp", generator=torch.Generator().manual_seed(11), **kw)
    assert torch.equal(out, via_ops)
    return ref, out, dbg


@pytest.mark.parametrize("sampler,mode", [("flow", "argmax"), ("flow", "softmax"), ("consistency", "argmax"),
                                          ("consistency", "softmax")])
def test_act_matches_reference(sampler, mode):
    net, critic = make(hidden=40, critic=True, critic_hidden=24)
    obs = torch.randn(5, 17, generator=torch.Generator().manual_seed(7))
    kw = dict(sampler=sampler, mode=mode, steps=4, solver="heun", temperature=0.7)
    if sampler == "consistency":
        kw.update(sigmas=[2.0, 0.5], steps=10)
    ref, out, dbg = _act_both(net, critic, obs, 9, **kw)
    close(out, ref)
    # the C++ q values are the critic's min(Q1, Q2) of its own candidates; the index picks the output
    cand, q, idx = dbg["candidates"], dbg["q"], dbg["index"]
    with torch.no_grad():
        q_ref = critic.q_min(obs.repeat_interleave(9, dim=0), cand.reshape(-1, 6)).reshape(5, 9)
    close(q, q_ref)
    assert torch.equal(out, cand[torch.arange(5), idx])
    if mode == "argmax":
        assert torch.equal(idx, q.argmax(dim=1))


def test_act_uniform_and_noise_given_isas(isa):
    net, critic = make(hidden=256, activation="relu", critic=True)
    g = torch.Generator().manual_seed(8)
    B, K = 2, 50
    obs, noise = torch.randn(B, 17, generator=g), torch.randn(B, K, 6, generator=g)
    u = torch.rand(B, dtype=torch.float64, generator=g)
    ref, out, _ = _act_both(net, critic, obs, K, noise=noise, uniform=u, mode="softmax", steps=3, solver="rk4")
    close(out, ref)
    ref, out, _ = _act_both(net, critic, obs, K, noise=noise, steps=3, sampler="flow", solver="dpm2", path="vp")
    close(out, ref, atol=2e-4, rtol=2e-4)


def test_act_one_state_one_candidate_no_clip():
    net, critic = make(hidden=24, act_dim=1, obs_dim=3, activation="tanh", critic=True)
    obs = torch.randn(1, 3)
    ref, out, dbg = _act_both(net, critic, obs, 1, clip=False, steps=2)
    close(out, ref)
    assert dbg["index"].tolist() == [0]


def ln_critic(obs_dim=17, act_dim=6, hidden=24, depth=3, activation="mish", seed=1):
    """A DoubleCritic(layer_norm=True) with random LayerNorm gamma / beta (not the 1 / 0 init)."""
    torch.manual_seed(seed)
    q = qk.DoubleCritic(obs_dim, act_dim, hidden=hidden, depth=depth, activation=activation, layer_norm=True)
    with torch.no_grad():
        for ln in cpp._critic_norms(q)[0] + cpp._critic_norms(q)[1]:
            ln.weight.normal_(1.0, 0.5)
            ln.bias.normal_(0.0, 0.5)
    return q


def _check_act(net, critic, obs, K, **kw):
    B = obs.shape[0]
    ref, out, dbg = _act_both(net, critic, obs, K, **kw)
    cand, q, idx = dbg["candidates"], dbg["q"], dbg["index"]
    with torch.no_grad():
        q_ref = critic.q_min(obs.repeat_interleave(K, dim=0), cand.reshape(B * K, -1)).reshape(B, K)
    close(q, q_ref)
    close(out, ref)
    assert torch.equal(out, cand[torch.arange(B), idx])
    if kw.get("mode", "argmax") == "argmax":
        assert torch.equal(idx, q.argmax(dim=1))
    return dbg


@pytest.mark.parametrize("sampler,mode", [("flow", "argmax"), ("flow", "softmax"), ("consistency", "argmax"),
                                          ("consistency", "softmax")])
@pytest.mark.parametrize("K", [1, 5, 17])
def test_act_layer_norm_critic_matches_reference(sampler, mode, K):
    net = make(hidden=40)
    critic = ln_critic(hidden=24 if K != 5 else 40)
    g = torch.Generator().manual_seed(7)
    obs = torch.randn(5, 17, generator=g)
    kw = dict(sampler=sampler, mode=mode, steps=4, solver="heun", temperature=0.7)
    if sampler == "consistency":
        kw.update(sigmas=[2.0, 0.5], steps=10)
    if mode == "softmax" and K == 17:  # the same uniform given to both backends
        kw.update(uniform=torch.rand(5, dtype=torch.float64, generator=g))
    _check_act(net, critic, obs, K, **kw)


def test_act_layer_norm_critic_isas_activations_eps(isa):
    # every activation, a non-default eps, a LayerNorm without affine / without bias, critic depth 1..3
    g = torch.Generator().manual_seed(3)
    for i, act in enumerate(ACTIVATIONS):
        depth = 1 + i % 3
        net = make(hidden=24, depth=2, activation=act, seed=i)
        critic = ln_critic(hidden=40 if i % 2 else 24, depth=depth, activation=act, seed=i)
        lns = cpp._critic_norms(critic)
        lns[0][0].eps = 1e-3
        if i == 1:
            critic.q2_net.net[1] = torch.nn.LayerNorm(critic.hidden, elementwise_affine=False)
        if i == 2:
            critic.q1_net.net[1] = torch.nn.LayerNorm(critic.hidden, bias=False)
        obs = torch.randn(3, 17, generator=g)
        _check_act(net, critic, obs, 7, steps=2, solver="midpoint")
        # a large constant offset in the pre-activations: the two-pass variance keeps it accurate
        with torch.no_grad():
            critic.q1_net.net[0].bias.add_(50.0)
        _check_act(net, critic, obs, 7, steps=2, solver="midpoint")


def test_act_layer_norm_critic_threads_and_many_states():
    net = make(hidden=24)
    critic = ln_critic(hidden=40)
    obs = torch.randn(37, 17, generator=torch.Generator().manual_seed(4))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        d1 = _check_act(net, critic, obs, 5, steps=2)
        torch.set_num_threads(3)
        d3 = _check_act(net, critic, obs, 5, steps=2)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(d1["q"], d3["q"])


def test_repack_when_layer_norm_parameters_change():
    net = make(hidden=24)
    critic = ln_critic(hidden=24)
    obs = torch.randn(4, 17, generator=torch.Generator().manual_seed(5))
    norms = cpp._critic_norms(critic)
    with torch.no_grad():
        _check_act(net, critic, obs, 5, steps=2)
        norms[0][1].weight.mul_(-2.0)                                 # in place: ._version
        _check_act(net, critic, obs, 5, steps=2)
        norms[1][2].bias.data = torch.randn_like(norms[1][2].bias)    # new storage, same version counter
        _check_act(net, critic, obs, 5, steps=2)
        norms[1][0].eps = 0.5                                         # a plain attribute
        _check_act(net, critic, obs, 5, steps=2)
        other = ln_critic(hidden=24, seed=9)
        critic.load_state_dict(other.state_dict())
        dbg = _check_act(net, critic, obs, 5, steps=2)
        q_other = other.q_min(obs.repeat_interleave(5, dim=0), dbg["candidates"].reshape(20, 6)).reshape(4, 5)
        close(dbg["q"], q_other)


def test_layer_norm_pack_arguments():
    z = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    args = (z(8, 2), z(8, 3), z(8), [z(8, 8)], [z(8)], z(1, 8), z(1), "mish")
    assert not _C.Pack(*args).layer_norm
    assert _C.Pack(*args, ln_w=[z(8)] * 2, ln_b=[z(8)] * 2, ln_eps=[1e-5] * 2).layer_norm
    with pytest.raises(ValueError, match="together"):
        _C.Pack(*args, ln_w=[z(8)] * 2)
    with pytest.raises(ValueError, match="one entry per hidden layer"):
        _C.Pack(*args, ln_w=[z(8)], ln_b=[z(8)], ln_eps=[1e-5])
    with pytest.raises(ValueError, match=r"ln_b\[1\]"):
        _C.Pack(*args, ln_w=[z(8)] * 2, ln_b=[z(8), z(7)], ln_eps=[1e-5] * 2)
    with pytest.raises(ValueError, match="ln_eps"):
        _C.Pack(*args, ln_w=[z(8)] * 2, ln_b=[z(8)] * 2, ln_eps=[1e-5, float("nan")])


# ----------------------------------------------------------------------------------------- losses
def _loss_inputs(B, M, D, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return r(B, M, D), r(B, M, D), r(B, M) * 3, torch.rand(B, M, generator=g) + 0.5


@pytest.mark.parametrize("B,M,D", [(7, 5, 3), (1, 1, 1), (3, 64, 6)])
@pytest.mark.parametrize("energy,normalize,pw", [(False, "support", False), (True, "support", False),
                                                 (True, "batch", True), (False, "batch", True)])
def test_weighted_fm_loss_and_grad_vs_float64(B, M, D, energy, normalize, pw):
    pred, target, e, lam = _loss_inputs(B, M, D, B * M + D)
    e = e if energy else None
    lam = lam if pw else None
    leaves32 = [pred.clone().requires_grad_(), target.clone().requires_grad_()] + \
        ([lam.clone().requires_grad_()] if pw else [])
    loss = qk.weighted_fm_loss(leaves32[0], leaves32[1], e, beta=2.0, normalize=normalize,
                               pair_weight=leaves32[2] if pw else None, backend="cpp")
    assert loss.dtype == torch.float32 and loss.dim() == 0
    loss.backward()
    leaves64 = [t.detach().double().requires_grad_() for t in leaves32]
    l64 = qk.weighted_fm_loss(leaves64[0], leaves64[1], None if e is None else e.double(), beta=2.0,
                              normalize=normalize, pair_weight=leaves64[2] if pw else None, backend="torch")
    l64.backward()
    torch.testing.assert_close(loss.double(), l64.detach(), atol=1e-6, rtol=1e-5)
    for a, b in zip(leaves32, leaves64):
        assert torch.isfinite(a.grad).all()
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("normalize", ["support", "batch"])
def test_loss_weights_every_isa(isa, normalize):
    # the softmax weights are computed per instruction set (vectorised float64 exp): odd M around the
    # vector width, and a beta that sends most offsets below exp's range (weights exactly 0)
    for B, M, beta in ((3, 1, 2.0), (5, 7, 2.0), (2, 9, 2.0), (4, 17, 2.0), (6, 1000, 2.0), (5, 33, 400.0)):
        pred, target, e, _ = _loss_inputs(B, M, 3, B * M)
        p32 = pred.clone().requires_grad_()
        loss = qk.weighted_fm_loss(p32, target, e, beta=beta, normalize=normalize, backend="cpp")
        loss.backward()
        p64 = pred.double().requires_grad_()
        l64 = qk.weighted_fm_loss(p64, target.double(), e.double(), beta=beta, normalize=normalize, backend="torch")
        l64.backward()
        torch.testing.assert_close(loss.double(), l64.detach(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(p32.grad.double(), p64.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("path", ["ot", "ot-eps", "vp"])
def test_flow_matching_loss_and_grad_vs_float64(path):
    pred, actions, e, _ = _loss_inputs(5, 7, 6, 3)
    noise = torch.randn(5, 7, 6)
    t = torch.rand(5, 7)
    leaves32 = [x.clone().requires_grad_() for x in (pred, actions, noise)]
    loss = qk.flow_matching_loss(*leaves32, t, path=path, energy=e, beta=3.0, backend="cpp")
    loss.backward()
    leaves64 = [x.detach().double().requires_grad_() for x in leaves32]
    l64 = qk.flow_matching_loss(*leaves64, t.double(), path=path, energy=e.double(), beta=3.0, backend="torch")
    l64.backward()
    torch.testing.assert_close(loss.double(), l64.detach(), atol=1e-6, rtol=1e-5)
    for a, b in zip(leaves32, leaves64):
        got = torch.zeros_like(b) if a.grad is None else a.grad.double()
        want = torch.zeros_like(b) if b.grad is None else b.grad
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_loss_without_grad_and_large_beta():
    pred, target, e, _ = _loss_inputs(4, 3, 2, 0)
    with torch.no_grad():
        a = qk.weighted_fm_loss(pred, target, e * 1000, beta=3.0, backend="cpp")
    b = qk.weighted_fm_loss(pred.double(), target.double(), e.double() * 1000, beta=3.0, backend="torch")
    assert torch.isfinite(a)
    torch.testing.assert_close(a.double(), b, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------- packing
def test_repack_when_parameters_change():
    net = make(hidden=24)
    x0, obs = torch.randn(3, 6), torch.randn(3, 17)
    with torch.no_grad():
        qk.integrate(net, x0, obs, steps=2, backend="cpp")
        net.layers[1].weight.mul_(0.5)                      # in place: ._version
        close(qk.integrate(net, x0, obs, steps=2, backend="cpp"), qk.integrate(net, x0, obs, steps=2, backend="torch"))
        net.out.weight.data = torch.randn_like(net.out.weight)  # new storage, same version counter
        close(qk.integrate(net, x0, obs, steps=2, backend="cpp"), qk.integrate(net, x0, obs, steps=2, backend="torch"))
        net.time_mlp[1].bias.add_(0.3)                      # the cached time tables must follow
        close(qk.integrate(net, x0, obs, steps=2, backend="cpp"), qk.integrate(net, x0, obs, steps=2, backend="torch"))
        net.layers[0].bias = torch.nn.Parameter(torch.randn(24))  # a new Parameter object
        close(qk.integrate(net, x0, obs, steps=2, backend="cpp"), qk.integrate(net, x0, obs, steps=2, backend="torch"))
        other = make(hidden=24, seed=5)
        net.load_state_dict(other.state_dict())
        close(qk.integrate(net, x0, obs, steps=2, backend="cpp"), qk.integrate(other, x0, obs, steps=2, backend="torch"))


def test_repack_after_writes_through_data():
    # `.data` writes bypass the version counter (the usual soft / EMA target update): the pack's
    # Watch compares sampled elements, so whole-tensor writes are still seen
    net, critic = make(hidden=24, critic=True)
    src_net, src_critic = make(hidden=24, critic=True, seed=8)
    x0, obs = torch.randn(3, 6), torch.randn(3, 17)
    with torch.no_grad():
        qk.integrate(net, x0, obs, steps=2, backend="cpp")
        v = net.layers[1].weight._version
        for p, q in zip(net.parameters(), src_net.parameters()):
            p.data.copy_(0.5 * p.data + 0.5 * q.data)             # polyak through .data
        assert net.layers[1].weight._version == v                  # (no version counter saw it)
        close(qk.integrate(net, x0, obs, steps=2, backend="cpp"), qk.integrate(net, x0, obs, steps=2, backend="torch"))
        net.layers[2].weight.data.mul_(-1.0)                       # one tensor, in place through .data
        close(qk.integrate(net, x0, obs, steps=2, backend="cpp"), qk.integrate(net, x0, obs, steps=2, backend="torch"))
        _check_act(net, critic, obs, 4, steps=2)
        for p, q in zip(critic.parameters(), src_critic.parameters()):
            p.data.copy_(q.data)                                   # the critic too (act)
        _check_act(net, critic, obs, 4, steps=2)
        # an edit of one element the samples do not cover is invisible until refresh()
        w = net.layers[1].weight
        w.data[1, 1] += 5.0
        stale = qk.integrate(net, x0, obs, steps=2, backend="cpp")
        ref = qk.integrate(net, x0, obs, steps=2, backend="torch")
        assert not torch.allclose(stale, ref, atol=1e-4)
        qk.refresh(net)                                            # (= cpp.refresh for this backend)
        close(qk.integrate(net, x0, obs, steps=2, backend="cpp"), ref)
        w.data[2, 2] -= 5.0
        cpp.refresh()                                              # every module
        ref = qk.integrate(net, x0, obs, steps=2, backend="torch")
        close(qk.integrate(net, x0, obs, steps=2, backend="cpp"), ref)


def test_watch_reports_each_kind_of_change():
    net = make(hidden=24)
    slots = cpp._make_slots(net, "policy")
    w = _C.Watch(slots)
    assert len(w) == len(slots) and not w.changed()
    lin = net.layers[1]
    with torch.no_grad():
        lin.bias.add_(0.0)                         # version only (values equal)
    assert w.changed()
    w = _C.Watch(slots)
    lin.weight.data = lin.weight.data.clone()      # pointer only
    assert w.changed()
    w = _C.Watch(slots)
    lin.weight.data[-1, -1] = 3.0                  # the last element is one of the samples
    assert w.changed()
    w = _C.Watch(slots)
    lin.bias = None                                # no longer a tensor: a change, not an error
    assert w.changed()
    del net.layers[1]._parameters["bias"]          # gone
    assert w.changed()


def test_stale_pack_the_backend_cannot_run_falls_back():
    net = make(hidden=24)
    x0, obs = torch.randn(3, 6), torch.randn(3, 17)
    with torch.no_grad():
        qk.integrate(net, x0, obs, steps=2)                       # packed (auto = cpp)
        sampler = qk.make_sampler(net, kind="consistency", backend="auto")
        sampler(obs)
        sampler(obs)                                               # the real-time plan is in place
        net.layers[1].bias = None                                  # now a Linear without bias
        want = qk.integrate(net, x0, obs, steps=2, backend="torch")
        torch.testing.assert_close(qk.integrate(net, x0, obs, steps=2), want)  # auto: the reference
        with pytest.raises(RuntimeError, match="without bias"):
            qk.integrate(net, x0, obs, steps=2, backend="cpp")
        assert any("without bias" in r for r in _cpp_reasons("integrate", net=net, x0=x0, obs=obs, steps=2,
                                                             solver="euler", path=None))
        assert sampler(obs).shape == (3, 6) and sampler.backend_used(obs) == "torch"
        z = torch.randn(3, 6)
        torch.testing.assert_close(qk.consistency_sample(net, z, obs),
                                   qk.consistency_sample(net, z, obs, backend="torch"))


def test_fallback_leaves_the_generator_as_the_reference_finds_it():
    # draws from a generator happen after the pack is validated: a fallback to the reference then
    # gives exactly the reference's result for the same generator seed
    net, critic = make(hidden=24, critic=True)
    obs = torch.randn(3, 17)
    z = torch.randn(3, 6)
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    with torch.no_grad():
        qk.act(net, critic, obs, 4, steps=2, generator=gen())
        qk.consistency_sample(net, z, obs, sigmas=[2.0, 0.5], generator=gen())
        net.layers[1].bias = None
        for mode in ("argmax", "softmax"):
            assert torch.equal(qk.act(net, critic, obs, 4, steps=2, mode=mode, generator=gen()),
                               qk.act(net, critic, obs, 4, steps=2, mode=mode, generator=gen(), backend="torch"))
        assert torch.equal(qk.consistency_sample(net, z, obs, sigmas=[2.0, 0.5], generator=gen()),
                           qk.consistency_sample(net, z, obs, sigmas=[2.0, 0.5], generator=gen(), backend="torch"))


@pytest.mark.parametrize("kind,kw", [("consistency", {}), ("consistency", {"sigmas": [2.0, 0.5]}),
                                     ("flow", {"steps": 3})])
def test_sampler_keeps_the_reference_stream_across_a_fallback(kind, kw):
    net = make(hidden=24)
    fast = qk.make_sampler(net, kind=kind, generator=torch.Generator().manual_seed(0), **kw)
    ref = qk.make_sampler(net, kind=kind, generator=torch.Generator().manual_seed(0), backend="torch", **kw)
    obs = torch.randn(3, 17)
    for i in range(4):
        if i == 2:
            net.layers[1].bias = None          # the C++ plan can no longer run it
        close(fast(obs), ref(obs))
    assert fast.backend_used(obs) == "torch"


def test_unreadable_tensors_fall_back_to_the_reference():
    # a ZeroTensor (no memory behind it) or a negative view: "auto" runs the reference, "cpp" says why
    net, critic = make(hidden=24, critic=True)
    obs = torch.randn(3, 17)
    zero, neg = torch._efficientzerotensor(3, 6), torch._neg_view(torch.randn(3, 6))
    with torch.no_grad():
        for x0 in (zero, neg):
            torch.testing.assert_close(qk.integrate(net, x0, obs, steps=2),
                                       qk.integrate(net, x0, obs, steps=2, backend="torch"))
            torch.testing.assert_close(qk.consistency_sample(net, x0, obs),
                                       qk.consistency_sample(net, x0, obs, backend="torch"))
        with pytest.raises(RuntimeError, match="backend='cpp' cannot run integrate.*ZeroTensor"):
            qk.integrate(net, zero, obs, steps=2, backend="cpp")
        z3 = torch._efficientzerotensor(3, 4, 6)
        torch.testing.assert_close(qk.act(net, critic, obs, 4, steps=2, noise=z3),
                                   qk.act(net, critic, obs, 4, steps=2, noise=z3, backend="torch"))
        q, cand = torch.randn(3, 4), torch._efficientzerotensor(3, 4, 6)
        torch.testing.assert_close(qk.select_action(q, cand), qk.select_action(q, cand, backend="torch"))
    # the sampler's real-time plan falls back too (same generator stream as the reference sampler)
    fast = qk.make_sampler(net, kind="consistency", generator=torch.Generator().manual_seed(0))
    ref = qk.make_sampler(net, kind="consistency", generator=torch.Generator().manual_seed(0), backend="torch")
    for o in (obs, obs, torch._neg_view(obs.neg()), obs):
        close(fast(o), ref(o))


def test_replaced_layer_is_a_change():
    # the old layer's tensors stay as they were: the Watch compares the submodules by identity
    net = make(hidden=24)
    x0, obs = torch.randn(3, 6), torch.randn(3, 17)
    with torch.no_grad():
        qk.integrate(net, x0, obs, steps=2, backend="cpp")
        net.out = torch.nn.Linear(24, 6)
        close(qk.integrate(net, x0, obs, steps=2, backend="cpp"), qk.integrate(net, x0, obs, steps=2, backend="torch"))
        net.out.weight.mul_(3.0)                 # the new layer is the one watched now
        close(qk.integrate(net, x0, obs, steps=2, backend="cpp"), qk.integrate(net, x0, obs, steps=2, backend="torch"))
        net.layers[1] = torch.nn.Linear(24, 24)  # inside a ModuleList
        close(qk.integrate(net, x0, obs, steps=2, backend="cpp"), qk.integrate(net, x0, obs, steps=2, backend="torch"))
        net.out = torch.nn.Sequential(torch.nn.Linear(24, 6))  # no longer a Linear: not runnable, auto falls back
        torch.testing.assert_close(qk.integrate(net, x0, obs, steps=2),
                                   qk.integrate(net, x0, obs, steps=2, backend="torch"))


def test_appended_layer_and_unreadable_parameters():
    net = make(hidden=24)
    x0, obs = torch.randn(3, 6), torch.randn(3, 17)
    with torch.no_grad():
        qk.integrate(net, x0, obs, steps=2, backend="cpp")
        net.layers.append(torch.nn.Linear(24, 24))      # a new key in a watched ModuleList
        close(qk.integrate(net, x0, obs, steps=2, backend="cpp"), qk.integrate(net, x0, obs, steps=2, backend="torch"))
        # parameters whose elements are not plain memory: "auto" runs the reference (no crash)
        for make_p in (lambda: torch._efficientzerotensor((6, 24)), lambda: torch._neg_view(torch.randn(6, 24))):
            net.out.weight = torch.nn.Parameter(make_p(), requires_grad=False)
            torch.testing.assert_close(qk.integrate(net, x0, obs, steps=2),
                                       qk.integrate(net, x0, obs, steps=2, backend="torch"))
            with pytest.raises(RuntimeError, match="ZeroTensor or a negative"):
                qk.integrate(net, x0, obs, steps=2, backend="cpp")


def test_huge_energies_and_scores_stay_finite(isa):
    # offsets are formed as (x - max) * scale, <= 0 and exactly 0 at the max whatever the magnitude
    # (x * scale - max * scale with a fused multiply-add could land above 0 or far below)
    pred, tgt = torch.randn(2, 8, 3), torch.randn(2, 8, 3)
    for e, beta, normalize in ((torch.full((2, 8), 1e30), 0.3, "support"), (torch.full((2, 8), -1e30), 0.1, "batch"),
                               (torch.randn(2, 8) * 1e30, 0.7, "support")):
        got = qk.weighted_fm_loss(pred, tgt, e, beta=beta, normalize=normalize, backend="cpp")
        torch.testing.assert_close(got.double(), qk.weighted_fm_loss(pred.double(), tgt.double(), e.double(), beta=beta,
                                                                     normalize=normalize, backend="torch"))
    q = torch.randn(16, 9) * 1e15
    cand = torch.randn(16, 9, 2)
    u = torch.rand(16, dtype=torch.float64)
    for temperature in (1e-4, 1.0):
        assert torch.equal(qk.select_action(q, cand, "softmax", temperature, uniform=u, backend="cpp"),
                           qk.select_action(q, cand, "softmax", temperature, uniform=u, backend="torch"))


def test_frozen_net_with_a_removed_parameter_under_grad_mode():
    net = make(hidden=24).requires_grad_(False)
    x0, obs = torch.randn(3, 6), torch.randn(3, 17)
    qk.integrate(net, x0, obs, steps=2)            # grad mode on, nothing requires grad: C++
    net.layers[1].bias = None
    torch.testing.assert_close(qk.integrate(net, x0, obs, steps=2), qk.integrate(net, x0, obs, steps=2, backend="torch"))


def test_threads_share_a_module_while_it_changes():
    # several threads sample from one net while another updates it in place: no thread may see a
    # half-built pack (every call either runs on a whole pack or re-packs), results stay finite
    import threading

    net = make(hidden=24)
    obs = torch.randn(2, 17)
    errors, stop = [], threading.Event()

    def sample():
        try:
            with torch.no_grad():
                while not stop.is_set():
                    assert torch.isfinite(qk.integrate(net, torch.randn(2, 6), obs, steps=2)).all()
                    assert torch.isfinite(qk.consistency_sample(net, torch.randn(2, 6), obs)).all()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=sample) for _ in range(3)]
    for t in threads:
        t.start()
    with torch.no_grad():
        for i in range(200):
            net.out.bias.add_(0.0)
            if i % 50 == 0:
                qk.refresh(net)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors


def test_inference_mode_parameters():
    # inference tensors have no version counter: the Watch goes by data pointers and samples
    with torch.inference_mode():
        net = make(hidden=24)
        x0, obs = torch.randn(3, 6), torch.randn(3, 17)
        close(qk.integrate(net, x0, obs, steps=2, backend="cpp"), qk.integrate(net, x0, obs, steps=2, backend="torch"))
        net.layers[1].weight.mul_(0.5)
        close(qk.integrate(net, x0, obs, steps=2, backend="cpp"), qk.integrate(net, x0, obs, steps=2, backend="torch"))


def test_tensor_buffers_at_the_extension():
    net = make(hidden=24)
    with torch.no_grad():
        e = cpp._entry(net, "policy")
    _, _, _, ttab, coef = cpp._flow_tables(net, e, 2, "euler", 0.0, 1.0, None)
    p = e.packs[0]
    obs, x0 = torch.randn(3, 17), torch.randn(3, 6)
    want = np.zeros((3, 6), np.float32)
    assert _C.sample(p, obs.numpy(), x0.numpy(), 1, "velocity", 0, 2, ttab, coef, None, False, want, None)
    out = torch.full((3, 6), float("nan"))
    assert _C.sample(p, obs, x0, 1, "velocity", 0, 2, ttab, coef, None, False, out, None)
    assert torch.equal(out, torch.from_numpy(want))
    # [B, K, A] rows with K = 3 (x0 and out in any shape whose leading dims multiply to B K)
    out3 = torch.full((1, 3, 6), float("nan"))
    assert _C.sample(p, obs[:1].contiguous(), x0.reshape(1, 3, 6), 3, "velocity", 0, 2, ttab, coef, None, False,
                     out3, None)
    assert torch.isfinite(out3).all()
    args = lambda o, x, y: (p, o, x, 1, "velocity", 0, 2, ttab, coef, None, False, y, None)  # noqa: E731
    out.fill_(float("nan"))  # every call below must fail before writing anything
    with pytest.raises(TypeError, match="obs must have dtype torch.float32"):
        _C.sample(*args(obs.double(), x0, out))
    with pytest.raises(ValueError, match="x0 must be contiguous"):
        _C.sample(*args(obs, torch.randn(6, 3).t(), out))
    with pytest.raises(ValueError, match="obs must be on the CPU"):
        _C.sample(*args(obs.to("meta"), x0, out))
    with pytest.raises(ValueError, match="dense"):
        _C.sample(*args(obs.to_sparse(), x0, out))
    with pytest.raises(ValueError, match="out .*must not require grad"):
        _C.sample(*args(obs, x0, torch.zeros(3, 6, requires_grad=True)))
    with pytest.raises(_C.UnreadableBuffer, match="negative bit"):
        _C.sample(*args(obs, torch._neg_view(x0), out))
    with pytest.raises(_C.UnreadableBuffer, match="ZeroTensor"):
        _C.sample(*args(obs, torch._efficientzerotensor(3, 6), out))
    with pytest.raises(ValueError, match="x0 must have shape \\[3, 6\\]"):
        _C.sample(*args(obs, torch.randn(2, 2, 6), out))
    with pytest.raises(TypeError, match="numpy array or a CPU torch.Tensor"):
        _C.sample(*args(obs, x0.tolist(), out))
    assert torch.isnan(out).all()  # (nothing ran on bad input)


# ----------------------------------------------------------------------------------------- reasons
def _cpp_reasons(op, **kw):
    return backends.reasons(op, "cpp", torch.device("cpu"), **kw)


def test_reasons_and_auto_fallback():
    net, critic = make(hidden=24, critic=True)
    x0, obs = torch.randn(3, 6), torch.randn(3, 17)
    kw = dict(net=net, x0=x0, obs=obs, steps=2, solver="euler", path=None, return_trajectory=False)
    with torch.no_grad():
        assert _cpp_reasons("integrate", **kw) == []
        # float64 inputs: a reason, and auto gives the reference's float64 result
        r = _cpp_reasons("integrate", **dict(kw, x0=x0.double(), obs=obs.double()))
        assert r and "float64" in r[0]
        (n64,) = f64(net)
        assert any("float64" in s for s in _cpp_reasons("integrate", **dict(kw, net=n64)))
        out = qk.integrate(n64, x0.double(), obs.double(), steps=2)
        assert out.dtype == torch.float64
        # float64 inputs with a float32 net: refused before any backend is chosen (issue 12)
        with pytest.raises(TypeError, match="x0 has dtype torch.float64 but net's parameters are torch.float32"):
            qk.integrate(net, x0.double(), obs.double(), steps=2, backend="cpp")
        # not a ConditionalMLP
        r = _cpp_reasons("integrate", **dict(kw, net=lambda x, t, o: x))
        assert r and "ConditionalMLP" in r[0]

        class Sub(qk.ConditionalMLP):
            def forward(self, x, t, obs):
                return 2 * super().forward(x, t, obs)

        sub = Sub(6, 17, hidden=24)
        assert "overrides" in _cpp_reasons("integrate", **dict(kw, net=sub))[0]
        close(qk.integrate(sub, x0, obs, steps=2), qk.integrate(sub, x0, obs, steps=2, backend="torch"))
        # critic with LayerNorm: runs in C++; a LayerNorm the kernel does not implement is a reason
        qln = qk.DoubleCritic(17, 6, hidden=24, layer_norm=True)
        assert _cpp_reasons("act", net=net, critic=qln, obs=obs, num_candidates=4, noise=None) == []
        assert _cpp_reasons("act", net=net, critic=critic, obs=obs, num_candidates=4, noise=None) == []

        class MyLN(torch.nn.LayerNorm):
            pass

        for bad, why in ((MyLN(24), "plain"), (torch.nn.LayerNorm((4, 6)), "hidden width")):
            q2 = qk.DoubleCritic(17, 6, hidden=24, layer_norm=True)
            q2.q2_net.net[4] = bad
            r = _cpp_reasons("act", net=net, critic=q2, obs=obs, num_candidates=4, noise=None)
            assert r and why in r[0]
        q3 = qk.DoubleCritic(17, 6, hidden=24)
        q3.q1_net.net.insert(1, torch.nn.Dropout(0.1))
        r = _cpp_reasons("act", net=net, critic=q3, obs=obs, num_candidates=4, noise=None)
        assert r and "nets.MLP" in r[0]
    # grad mode with parameters that require grad: the reference runs, and gradients flow
    r = _cpp_reasons("integrate", **kw)
    assert r and "grad" in r[0]
    y = qk.integrate(net, x0, obs, steps=2)
    assert y.requires_grad
    with pytest.raises(RuntimeError, match="backpropagate"):
        qk.integrate(net, x0, obs, steps=2, backend="cpp")
    # losses: float64 -> reason
    p = torch.randn(2, 3, 4, dtype=torch.float64)
    assert _cpp_reasons("weighted_fm_loss", pred=p, target=p, energy=None, normalize="support", pair_weight=None)


# ----------------------------------------------------------------------------------------- bad input
def test_bad_input_through_ops():
    net = make(hidden=24)
    with torch.no_grad():
        with pytest.raises(ValueError, match="obs"):
            qk.integrate(net, torch.randn(3, 6), torch.randn(4, 17), backend="cpp")
        with pytest.raises(ValueError, match="solver"):
            qk.integrate(net, torch.randn(3, 6), torch.randn(3, 17), solver="rk5", backend="cpp")
        with pytest.raises(ValueError, match="path"):
            qk.integrate(net, torch.randn(3, 6), torch.randn(3, 17), solver="dpm2", backend="cpp")
        with pytest.raises(ValueError, match="energy"):
            qk.weighted_fm_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.tensor([[1.0, float("nan"), 0.0]] * 2),
                                backend="cpp")


def test_bad_buffers_at_the_extension():
    net = make(hidden=24)
    with torch.no_grad():
        e = cpp._entry(net, "policy")
    _, _, _, ttab, coef = cpp._flow_tables(net, e, 2, "euler", 0.0, 1.0, None)
    obs, x0, out = np.zeros((3, 17), np.float32), np.zeros((3, 6), np.float32), np.zeros((3, 6), np.float32)
    p = e.packs[0]
    _C.sample(p, obs, x0, 1, "velocity", 0, 2, ttab, coef, None, False, out, None)  # fine
    with pytest.raises(TypeError, match="obs"):
        _C.sample(p, obs.astype(np.float64), x0, 1, "velocity", 0, 2, ttab, coef, None, False, out, None)
    with pytest.raises(ValueError, match="x0"):
        _C.sample(p, obs, np.zeros((4, 6), np.float32), 1, "velocity", 0, 2, ttab, coef, None, False, out, None)
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.sample(p, obs, np.zeros((6, 3), np.float32).T, 1, "velocity", 0, 2, ttab, coef, None, False, out, None)
    ro = np.zeros((3, 6), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        _C.sample(p, obs, x0, 1, "velocity", 0, 2, ttab, coef, None, False, ro, None)
    with pytest.raises(ValueError, match="ttab"):
        _C.sample(p, obs, x0, 1, "velocity", 0, 3, ttab, coef, None, False, out, None)
    with pytest.raises(ValueError, match="kind"):
        _C.sample(p, obs, x0, 1, "sde", 0, 2, ttab, coef, None, False, out, None)
    with pytest.raises(TypeError, match="step_noise"):
        _C.sample(p, obs, x0, 1, "consistency", 0, 2, np.zeros((2, 24), np.float32), np.zeros((2, 4), np.float32),
                  [1.0], True, out, None)
    with pytest.raises(ValueError, match="wc"):
        _C.Pack(np.zeros((8, 2), np.float32), np.zeros((7, 3), np.float32), np.zeros(8, np.float32), [], [],
                np.zeros((2, 8), np.float32), np.zeros(2, np.float32), "mish")
    with pytest.raises(ValueError, match="activation"):
        _C.Pack(np.zeros((8, 2), np.float32), np.zeros((8, 3), np.float32), np.zeros(8, np.float32), [], [],
                np.zeros((2, 8), np.float32), np.zeros(2, np.float32), "swish")
    with pytest.raises(ValueError, match="isa"):
        _C.set_isa("sse9")


def test_bad_uniform_at_the_extension():
    net, critic = make(hidden=24, critic=True)
    obs = torch.randn(2, 17)
    with torch.no_grad(), pytest.raises(ValueError, match="uniform"):
        qk.act(net, critic, obs, 3, mode="softmax", uniform=torch.tensor([0.5, 1.5], dtype=torch.float64),
               backend="cpp")


# ----------------------------------------------------------------------------------------- build / NO_EXT
def test_no_ext_path_reports_the_reason():
    code = ("import torch, qipo_kernels as qk; from qipo_kernels import backends as b; "
            "r = b.backend_reasons('cpp', torch.device('cpu')); print(r); "
            "assert r and 'QIPO_KERNELS_NO_EXT' in r[0], r; "
            "net = qk.ConditionalMLP(2, 3, hidden=8); x = torch.randn(2, 2); o = torch.randn(2, 3); "
            "y = qk.integrate(net, x, o, steps=2); assert y.shape == (2, 2); "
            "assert 'QIPO_KERNELS_NO_EXT' in b.table()")
    env = dict(os.environ, QIPO_KERNELS_NO_EXT="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("no_ext", ["0", "1"])
def test_setup_declares_the_extension_unless_no_ext(no_ext):
    code = ("import importlib.util; s = importlib.util.spec_from_file_location('qk_setup', 'setup.py'); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); e, c = m.ext_modules(); "
            "print(len(e), [x.name for x in e], sorted(c))")
    env = dict(os.environ, QIPO_KERNELS_NO_EXT=no_ext)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stderr
    if no_ext == "1":
        assert res.stdout.startswith("0 [] []")
    else:
        assert res.stdout.startswith("1 ['qipo_kernels._C'] ['build_ext']")


def test_fma_peak_is_positive():
    assert _C.fma_peak(0.01) > 1e8


def test_pack_cache_follows_the_module_lifetime():
    import gc

    net = make(hidden=24, seed=3)
    with torch.no_grad():
        qk.integrate(net, torch.randn(2, 6), torch.randn(2, 17), steps=2, backend="cpp")
    mid = id(net)
    assert mid in cpp._MODS and cpp._MODS[mid].entry is not None
    del net
    gc.collect()
    assert mid not in cpp._MODS


def test_registered_ops():
    for op in ("integrate", "consistency_sample", "act", "select_action", "weighted_fm_loss", "flow_matching_loss"):
        assert "cpp" in backends._IMPLS[op]
    assert backends.auto_order(torch.device("cpu"))[0] == "cpp"


def test_non_contiguous_inputs():
    net = make(hidden=24)
    g = torch.Generator().manual_seed(12)
    x0 = torch.randn(6, 7, generator=g).t()          # [7, 6], not contiguous
    obs = torch.randn(17, 7, generator=g).t()
    assert not x0.is_contiguous()
    with torch.no_grad():
        close(qk.integrate(net, x0, obs, steps=3, backend="cpp"), qk.integrate(net, x0, obs, steps=3, backend="torch"))


@pytest.mark.parametrize("hidden", [24, 40, 256])
def test_gemm_tiles_every_row_count(isa, hidden):
    # the packed hidden layer alone, for every row-tile tail (8/6-row tiles, then 4, 2, 1)
    net = make(hidden=hidden, activation="silu")
    with torch.no_grad():
        p = cpp._entry(net, "policy").packs[0]
        Hp = p.hidden_padded
        lin = net.layers[1]
        for M in (1, 2, 3, 5, 7, 8, 13, 50, 64):
            x = torch.zeros(M, Hp)
            x[:, :hidden] = torch.randn(M, hidden)
            y = np.full((M, Hp), np.nan, np.float32)
            _C.gemm(x.numpy(), p, y)
            want = torch.nn.functional.silu(lin(x[:, :hidden]))
            close(torch.from_numpy(y[:, :hidden]), want)
            assert (y[:, hidden:] == 0).all()


@pytest.mark.parametrize("kind,kwargs", [("consistency", {}), ("consistency", {"sigmas": (2.0, 0.5)}),
                                         ("flow", {"steps": 4}), ("flow", {"steps": 3, "path": "vp"})])
def test_sampler_real_time_plan_matches_checked_path(kind, kwargs, monkeypatch):
    """make_sampler's direct-to-C++ plan gives the checked path's result, is really taken, and falls
    back to the checked path (reference) when the module can no longer run in C++."""
    from qipo_kernels import ConditionalMLP, make_sampler, ops

    torch.manual_seed(0)
    net = ConditionalMLP(6, 17, hidden=24, depth=2)
    obs = torch.randn(3, 17)
    s1 = make_sampler(net, kind=kind, generator=torch.Generator().manual_seed(5), **kwargs)
    s2 = make_sampler(net, kind=kind, generator=torch.Generator().manual_seed(5), **kwargs)
    first = s1(obs)  # checked path; makes the plan
    assert s1._plan is not None and s2._plan is None
    want = [s2(obs) for _ in range(2)]  # s2: checked, then planned
    s2._plan = None
    calls = []
    real = ops.integrate if kind == "flow" else ops.consistency_sample
    monkeypatch.setattr(ops, real.__name__, lambda *a, **k: calls.append(1) or real(*a, **k))
    got = s1(obs)  # planned: ops is not called
    assert not calls
    torch.testing.assert_close(got, want[1], atol=0, rtol=0)
    torch.testing.assert_close(first, want[0], atol=0, rtol=0)
    # an obs of another shape re-plans through the checked path
    s1(obs[:1])
    assert calls and s1._plan[0][0] == (1, 17)
    # parameters changed to float64: the plan's impl refuses, the sampler goes back to the reference
    net.double()
    calls.clear()
    out = s1(obs[:1].double())
    assert calls and out.dtype == torch.float64 and s1._plan is None
