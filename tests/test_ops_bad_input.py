"""Issue 12, "silent answers from the ops": bad input gets the same clear ValueError/TypeError on
every backend (torch, cpp, triton under the interpreter, auto), before any kernel runs, and the
float32-overflow cases give the same answer everywhere (logits formed as beta * (Q - max Q))."""
import math

import numpy as np
import pytest
import torch

from conftest import need_backend

import qipo_kernels as qk
from qipo_kernels import _checks as C

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ["torch", "cpp", "triton", "auto"]
FAST = ["torch", "cpp", "triton"]


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    net = qk.ConditionalMLP(act_dim=3, obs_dim=5, hidden=32, depth=2).eval()
    critic = qk.DoubleCritic(obs_dim=5, act_dim=3, hidden=32, depth=2).eval()
    return net, critic


@pytest.fixture
def obs():
    return torch.randn(7, 5, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------- act / select
@pytest.mark.parametrize("backend", BACKENDS)
def test_act_refuses_a_velocity_solver_on_a_noise_path_as_integrate_does(nets, obs, backend):
    need_backend(backend)
    net, critic = nets
    with pytest.raises(ValueError, match="solver 'euler' integrates a velocity field: path must be None or 'ot'"):
        qk.integrate(net, torch.randn(7, 4, 3), obs, solver="euler", path="vp", backend="torch")
    with torch.no_grad(), pytest.raises(ValueError, match="solver 'euler' integrates a velocity field"):
        qk.act(net, critic, obs, 4, solver="euler", path="vp", backend=backend)
    with torch.no_grad(), pytest.raises(ValueError, match="path must be one of"):
        qk.act(net, critic, obs, 4, solver="dpm2", path=None, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), -0.25, 1.0, 1.5, float("inf")])
def test_uniform_outside_unit_interval_is_refused_by_act_and_select(nets, obs, backend, bad):
    need_backend(backend)
    net, critic = nets
    u = torch.full((7,), 0.5, dtype=torch.float64)
    u[3] = bad
    with torch.no_grad(), pytest.raises(ValueError, match=r"uniform must lie in \[0, 1\) with no NaN"):
        qk.act(net, critic, obs, 4, mode="softmax", uniform=u, backend=backend)
    q, cand = torch.randn(7, 4), torch.randn(7, 4, 3)
    with pytest.raises(ValueError, match=r"uniform must lie in \[0, 1\) with no NaN"):
        qk.select_action(q, cand, mode="softmax", uniform=u.float(), backend=backend)


@pytest.mark.parametrize("backend", FAST)
def test_tiny_temperature_picks_the_argmax_on_every_backend(backend):
    """(q - max q) / T: T = 1e-300 with q ~ 1e9 used to overflow q / T to inf (NaN softmax, index 0
    on torch) while cpp and triton took the argmax."""
    need_backend(backend)
    g = torch.Generator().manual_seed(5)
    B, K = 17, 6
    q = 1e9 + 1e3 * torch.randn(B, K, generator=g)
    cand = torch.arange(B * K, dtype=torch.float32).reshape(B, K, 1)
    u = torch.rand(B, dtype=torch.float64, generator=g)
    out = qk.select_action(q, cand, mode="softmax", temperature=1e-300, uniform=u, backend=backend)
    want = cand[torch.arange(B), q.argmax(1)]
    assert torch.equal(out, want)


class _NaNCritic(torch.nn.Module):
    """Stands in for a critic whose Q values blew up: q_min returns NaN / inf for chosen rows."""

    def __init__(self, critic, value):
        super().__init__()
        self.critic, self.value = critic, value

    def q_min(self, o, a):
        q = self.critic.q_min(o, a)
        q[::5] = self.value
        return q


def _diverged_critic(critic, value):
    bad = qk.DoubleCritic(obs_dim=5, act_dim=3, hidden=32, depth=2).eval()
    bad.load_state_dict(critic.state_dict())
    with torch.no_grad():  # both heads: min(Q1, Q2) hides a +inf of one head (and should)
        bad.q1_net.net[-1].bias.fill_(value)
        bad.q2_net.net[-1].bias.fill_(value)
    return bad


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton", "auto"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("mode", ["argmax", "softmax"])
def test_act_raises_when_the_critic_returns_nonfinite_q(nets, obs, backend, value, mode):
    need_backend(backend)
    net, critic = nets
    bad = _diverged_critic(critic, value)
    with torch.no_grad(), pytest.raises(ValueError, match=r"critic returned NaN or inf Q values for the candidates "
                                                          r"of 7 of 7 state\(s\)"):
        qk.act(net, bad, obs, 4, mode=mode, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton", "auto"])
def test_act_raises_when_one_critic_head_returns_nan(nets, obs, backend):
    """min(Q1, Q2) keeps a NaN of either head (a NaN must not hide behind the other head's value)."""
    need_backend(backend)
    net, critic = nets
    bad = qk.DoubleCritic(obs_dim=5, act_dim=3, hidden=32, depth=2).eval()
    bad.load_state_dict(critic.state_dict())
    with torch.no_grad():
        bad.q1_net.net[-1].bias.fill_(float("nan"))
    for mode in ("argmax", "softmax"):
        with torch.no_grad(), pytest.raises(ValueError, match="critic returned NaN or inf"):
            qk.act(net, bad, obs, 4, mode=mode, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton", "auto"])
def test_act_names_the_states_whose_candidates_got_nonfinite_q(nets, obs, backend):
    """A NaN observation row makes that state's candidates and scores NaN: the error names it
    (the same message on the reference, the C++ and the Triton backend)."""
    need_backend(backend)
    net, critic = nets
    o = obs.clone()
    o[2, 1] = float("nan")
    o[5, 0] = float("nan")
    with torch.no_grad(), pytest.raises(ValueError, match=r"of 2 of 7 state\(s\) \(states 2, 5\)"):
        qk.act(net, critic, o, 4, backend=backend)
    # a duck-typed critic (reference only) is checked too
    with torch.no_grad(), pytest.raises(ValueError, match="critic returned NaN or inf"):
        qk.act(net, _NaNCritic(critic, float("nan")), obs, 4, backend="torch")


def test_cpp_act_marks_nonfinite_states_in_the_kernel(nets, obs):
    """The C++ kernel itself writes index -1 (and a NaN action) for such a state, the finite ones as
    the reference picks them."""
    need_backend("cpp")
    from qipo_kernels import cpp

    net, critic = nets
    o = obs.clone()
    o[4, 2] = float("nan")
    noise = torch.randn(7, 4, 3, generator=torch.Generator().manual_seed(2))
    dbg = {}
    with torch.no_grad(), pytest.raises(ValueError, match=r"\(states 4\)"):
        cpp.act(net, critic, o, 4, "flow", 3, "euler", None, None, "argmax", 1.0, noise, None, None, None, True,
                _debug=dbg)
    assert dbg == {}  # raised before the debug outputs were published
    idx = torch.empty(7, dtype=torch.int64)
    out = np.full((7, 3), np.nan, dtype=np.float32)
    with torch.no_grad():
        pe, ce = cpp._repack(net, "policy"), cpp._repack(critic, "critic")
        kind, sid, nst, ttab, coef = cpp._flow_tables(net, pe, 3, "euler", 0.0, 1.0, None)
    cpp._C.act(pe.packs[0], ce.packs[0], ce.packs[1], o.contiguous(), noise.contiguous(), 4, kind, sid, nst, ttab,
               coef, None, True, "argmax", 1.0, None, out, None, idx.numpy(), None, 1, 64, None, None)
    assert idx[4] == -1 and np.isnan(out[4]).all()
    keep = [i for i in range(7) if i != 4]
    with torch.no_grad():
        ref = qk.act(net, critic, o[keep], 4, noise=noise[keep], steps=3, backend="torch")
    assert (idx[keep] >= 0).all()
    torch.testing.assert_close(torch.from_numpy(out[keep]), ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------- consistency
@pytest.mark.parametrize("backend", BACKENDS)
def test_sigma_min_above_sigma_max_is_refused(nets, obs, backend):
    need_backend(backend)
    net, _ = nets
    z = torch.randn(7, 3)
    for lo, hi in ((5.0, 1.0), (2.0, 2.0)):
        with torch.no_grad(), pytest.raises(ValueError, match="sigma_min must be < sigma_max"):
            qk.consistency_sample(net, z, obs, sigma_min=lo, sigma_max=hi, backend=backend)
    with pytest.raises(ValueError, match="sigma_min must be < sigma_max"):
        qk.consistency_loss(net, z, obs, sigma_min=5.0, sigma_max=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigma_max_past_the_float32_square_root_is_refused_and_below_it_works(nets, obs, backend):
    need_backend(backend)
    net, _ = nets
    z = torch.randn(7, 3, generator=torch.Generator().manual_seed(3))
    lim = C.sigma_limit(torch.float32)
    assert 9e18 < lim < 1e19 and (lim * lim) * 4 <= torch.finfo(torch.float32).max * 1.0001
    for big in (1e30, 2e19):
        with torch.no_grad(), pytest.raises(ValueError, match=r"sigma_max must be <= 9.22e\+18 for torch.float32"):
            qk.consistency_sample(net, z, obs, sigma_max=big, backend=backend)
    with torch.no_grad(), pytest.raises(ValueError, match="sigma_data must be <= "):
        qk.consistency_sample(net, z, obs, sigma_data=1e20, backend=backend)
    # inside the bound the actions are not all 0 and every backend agrees with the reference
    for s in (1e6, 9e18):
        with torch.no_grad():
            a = qk.consistency_sample(net, z, obs, sigma_max=s, backend=backend)
            ref = qk.consistency_sample(net, z, obs, sigma_max=s, backend="torch")
        assert torch.isfinite(a).all() and a.abs().max() > 1e-3
        torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-5)


def test_sigma_limit_follows_the_dtype():
    assert 127 < C.sigma_limit(torch.float16) < 129
    net = qk.ConditionalMLP(act_dim=3, obs_dim=5, hidden=16, depth=1).half()
    z, o = torch.randn(2, 3).half(), torch.randn(2, 5).half()
    with torch.no_grad(), pytest.raises(ValueError, match="sigma_max must be <= 128 for torch.float16"):
        qk.consistency_sample(net, z, o, sigma_max=200.0, backend="torch")
    with torch.no_grad():
        assert torch.isfinite(qk.consistency_sample(net, z, o, backend="torch")).all()  # the default 80 works


def test_consistency_loss_refuses_sigma_data_zero_and_an_empty_batch(nets, obs):
    net, _ = nets
    a = torch.rand(7, 3) * 2 - 1
    for bad in (0, 0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sigma_data must be > 0 and finite"):
            qk.consistency_loss(net, a, obs, sigma_data=bad)
    with pytest.raises(ValueError, match="actions must have at least one row"):
        qk.consistency_loss(net, a[:0], obs[:0])
    with pytest.raises(ValueError, match="sigma_max must be <= "):
        qk.consistency_loss(net, a, obs, sigma_max=1e25)
    assert torch.isfinite(qk.consistency_loss(net, a, obs))


# ----------------------------------------------------------------------------------- dtypes, K = 0
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_inputs_of_another_dtype_than_the_net_get_a_clear_type_error(nets, obs, backend, dtype):
    need_backend(backend)
    net, critic = nets
    o = obs.to(dtype)
    msg = rf"has dtype {dtype} but net's parameters are torch.float32: cast the input"
    with torch.no_grad():
        with pytest.raises(TypeError, match="x0 " + msg):
            qk.integrate(net, torch.randn(7, 2, 3, dtype=dtype), o, backend=backend)
        with pytest.raises(TypeError, match="obs " + msg):
            qk.sample(net, o, 2, backend=backend)
        with pytest.raises(TypeError, match="noise " + msg):
            qk.consistency_sample(net, torch.randn(7, 3, dtype=dtype), o, backend=backend)
        with pytest.raises(TypeError, match="obs " + msg):
            qk.act(net, critic, o, 4, backend=backend)
        with pytest.raises(TypeError, match="obs has dtype torch.float32 but x0 has"):
            qk.integrate(net, torch.randn(7, 2, 3, dtype=dtype), obs, backend=backend)
    with pytest.raises(TypeError, match="actions " + msg):
        qk.consistency_loss(net, torch.rand(7, 3, dtype=dtype), o)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_critic_of_another_dtype_gets_a_clear_type_error(obs, backend):
    need_backend(backend)
    net = qk.ConditionalMLP(act_dim=3, obs_dim=5, hidden=16, depth=1).double()
    critic = qk.DoubleCritic(obs_dim=5, act_dim=3, hidden=16, depth=1)
    with torch.no_grad(), pytest.raises(TypeError, match="obs has dtype torch.float64 but critic's parameters are "
                                                         "torch.float32"):
        qk.act(net, critic, obs.double(), 4, backend=backend)


def test_module_dtype_reads_the_first_float_parameter():
    assert C.module_dtype(qk.ConditionalMLP(3, 5, hidden=8, depth=1).double()) is torch.float64
    assert C.module_dtype(lambda x, t, o: x) is None
    assert C.module_dtype(torch.nn.Identity()) is None
    m = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(2, 2).half())
    assert C.module_dtype(m) is torch.float16
    # remembered per module, but conversions and replaced parameters are seen
    net = qk.ConditionalMLP(3, 5, hidden=8, depth=1)
    assert C.module_dtype(net) is torch.float32
    net.double()                                            # in place
    assert C.module_dtype(net) is torch.float64
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        net.float()                                         # new Parameter objects
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    assert C.module_dtype(net) is torch.float32
    owner, name = C._first_float_param(net)
    setattr(owner, name, torch.nn.Parameter(getattr(owner, name).detach().half()))
    assert C.module_dtype(net) is torch.float16
    mid = id(net)
    del net, owner
    import gc
    gc.collect()
    assert mid not in C._FIRST_PARAM                        # the record left with its module


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_samples_per_state_is_refused_and_an_empty_batch_is_empty_everywhere(nets, obs, backend):
    need_backend(backend)
    net, critic = nets
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"x0 must be \[B, K, A\] with K >= 1"):
            qk.integrate(net, torch.randn(7, 0, 3), obs, backend=backend)
        with pytest.raises(ValueError, match=r"noise must be \[B, K, A\] with K >= 1"):
            qk.consistency_sample(net, torch.randn(7, 0, 3), obs, backend=backend)
        with pytest.raises(ValueError, match=r"x0 must be \[N, A\] with A >= 1"):
            qk.integrate(lambda x, t, o: x, torch.randn(7, 0), obs, backend=backend)
        with pytest.raises(ValueError, match="num_candidates must be an int >= 1"):
            qk.act(net, critic, obs, 0, backend=backend)
        with pytest.raises(ValueError, match="num_samples must be an int >= 1"):
            qk.sample(net, obs, 0, backend=backend)
        with pytest.raises(ValueError, match="q_values must be non-empty"):
            qk.select_action(torch.randn(7, 0), torch.randn(7, 0, 3), backend=backend)
        assert qk.integrate(net, torch.randn(0, 2, 3), obs[:0], backend=backend).shape == (0, 2, 3)
        assert qk.consistency_sample(net, torch.randn(0, 3), obs[:0], backend=backend).shape == (0, 3)


# ----------------------------------------------------------------------------------- loss weights
def _weights(backend, q, normalize, beta, B, M):
    """The energy weights a backend used, read back as d loss / d pair_weight with |pred - target|^2 = 1."""
    pred = torch.zeros(B, M, 1)
    target = torch.ones(B, M, 1)
    pw = torch.ones(B, M, requires_grad=True)
    loss = qk.weighted_fm_loss(pred, target, energy=q, beta=beta, normalize=normalize, pair_weight=pw,
                               backend=backend)
    loss.backward()
    # support: loss = mean_b sum_m w lambda; batch: loss = mean_{b,m} (B M softmax) lambda
    return pw.grad.double() * (B if normalize == "support" else 1.0), loss


def _truth(q, normalize, beta):
    q = q.double()
    if normalize == "support":
        return torch.softmax(beta * (q - q.amax(1, keepdim=True)), 1)
    return torch.softmax(beta * (q.flatten() - q.max()), 0).reshape(q.shape)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("normalize", ["support", "batch"])
def test_support_softmax_keeps_float32_precision_for_large_q(backend, normalize):
    """Q = 5e3 + N(0, 1), beta 3: beta * Q in float32 is off by up to half an ulp of 1.5e4 (5e-4),
    which moved the weights by 2e-4..6e-4 relative; beta * (Q - max Q) is exact to float32 rounding."""
    need_backend(backend)
    B, M = 17, 33
    q = 5e3 + torch.randn(B, M, generator=torch.Generator().manual_seed(7))
    w, _ = _weights(backend, q, normalize, 3.0, B, M)
    truth = _truth(q, normalize, 3.0)
    rel = ((w - truth).abs() / truth).max().item()
    assert rel < 1e-5, rel


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("normalize", ["support", "batch"])
def test_beta_times_q_overflowing_float32_agrees_on_every_backend(backend, normalize):
    """beta * Q past float32's range: NaN on torch/triton before (inf - inf), 2.43 on cpp."""
    need_backend(backend)
    q = torch.tensor([[3e38, 1e38, -3e38, 2.9e38], [1e38, 1e38, 0.0, -1.0]])
    w, loss = _weights(backend, q, normalize, 10.0, 2, 4)
    truth = _truth(q, normalize, 10.0)
    assert torch.isfinite(loss)
    torch.testing.assert_close(w, truth, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(loss.double(), truth.sum() / (2 if normalize == "support" else 1.0),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_beta_past_float32_range_is_refused(backend):
    need_backend(backend)
    p = torch.randn(2, 3, 2)
    with pytest.raises(ValueError, match="beta must be <= 3.402823e\\+38"):
        qk.weighted_fm_loss(p, p, torch.randn(2, 3), beta=1e39, backend=backend)
    with pytest.raises(ValueError, match="beta must be <= "):
        qk.flow_matching_loss(p, p, p, torch.rand(2, 3), energy=torch.randn(2, 3), beta=1e300, backend=backend)


def test_half_energies_get_float32_weights_in_the_reference():
    """float16 energies 5e3 + N(0, 1) would round to multiples of 4 if the weights were computed
    in float16; the reference reads them in float32, as the fused kernels and cpp do."""
    B, M = 5, 8
    q = (5e3 + torch.randn(B, M, generator=torch.Generator().manual_seed(9))).half()
    w = qk.reference.energy_weights(q, 3.0, "support")
    assert w.dtype == torch.float16
    torch.testing.assert_close(w.double(), _truth(q.float(), "support", 3.0), atol=1e-3, rtol=2e-3)
    assert math.isclose(float(w.double().sum(1).mean()), 1.0, rel_tol=2e-3)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_warm_calls_raise_as_the_first(nets, obs, backend):
    """The warm path (a remembered plan or solver check) raises what the first call raised: act with
    NaN-marked states, and a bool / float `steps` after an int one passed."""
    need_backend(backend)
    net, critic = nets
    o = obs.clone()
    o[3, 0] = float("nan")
    x0 = torch.randn(7, 4, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for _ in range(3):
            with pytest.raises(ValueError, match=r"of 1 of 7 state\(s\) \(states 3\)"):
                qk.act(net, critic, o, 4, noise=x0, backend=backend)
            qk.act(net, critic, obs, 4, noise=x0, backend=backend)
            qk.integrate(net, x0, obs, steps=1, backend=backend)
            for bad in (True, 1.0):
                with pytest.raises(ValueError, match="steps must be an int"):
                    qk.integrate(net, x0, obs, steps=bad, backend=backend)
                with pytest.raises(ValueError, match="steps must be an int"):
                    qk.act(net, critic, obs, 4, steps=bad, noise=x0, backend=backend)
            with pytest.raises(ValueError, match="t0 must be a float in"):
                qk.integrate(net, x0, obs, steps=1, t0="0", backend=backend)
            with pytest.raises(TypeError, match="obs has dtype torch.float64"):
                qk.integrate(net, x0, obs.double(), steps=1, backend=backend)


def test_triton_act_marked_state_screen():
    """Triton act's NaN-marked-state check: one float32 sum screens; a finite sum that overflows
    (huge finite actions) raises nothing, a NaN / inf element names its state."""
    need_backend("triton")
    from qipo_kernels.triton import sampler as ts

    ts._check_marked(torch.full((3, 6), 3e38), 3)
    ts._check_marked(torch.zeros(0, 6), 0)
    for v in (float("nan"), float("inf"), float("-inf")):
        out = torch.zeros(4, 6)
        out[1, 2] = v
        with pytest.raises(ValueError, match=r"of 1 of 4 state\(s\) \(states 1\)"):
            ts._check_marked(out, 4)
