"""ops.act's ``t0`` (the flow sampler's start time; issue 14): every backend against the reference on
fresh random inputs, odd shapes, t0 in {0, 0.05, an odd value}, NaN-poisoned outputs; a bad t0 is
refused with the same message on every backend before anything is drawn; FlowPolicy.act on QIPO's
default "ot-eps" path (t0 = 0.05) is one ops.act call and gives what sample + score + select gave.
Triton runs under TRITON_INTERPRET=1 (float32) off a GPU."""
import zlib

import pytest
import torch

from conftest import need_backend, poison_fast_outputs
from qipo_kernels import backends, ops
from qipo_kernels.nets import ConditionalMLP, DoubleCritic
from qipo_kernels.policies import OT_EPS_SAMPLE_T0, FlowPolicy, make_sampler
from qipo_kernels.reference import ode as ref_ode

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = [b for b in ("cpp", "triton") if not backends.backend_reasons(b, torch.device("cpu"))]
T0S = [0.0, OT_EPS_SAMPLE_T0, 0.1372]


def _nets(seed, A=6, S=17, H=24, depth=2):
    torch.manual_seed(seed)
    net = ConditionalMLP(A, S, hidden=H, depth=depth, activation="mish", time_embedding="fourier")
    with torch.no_grad():  # larger weights than the default init: the nets are far from linear
        for p in net.parameters():
            p.mul_(1.5)
    critic = DoubleCritic(S, A, hidden=H + 7, depth=depth, activation="relu")
    return net.eval(), critic.eval()


def _close(out, ref, tol=3e-5):
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), "a backend left NaN in its output"
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= tol * max(1.0, ref.abs().max().item()), f"max error {err:.3g}"


def _candidates(net, obs, noise, steps, solver, path, t0):
    """The reference's candidates from t0 (noise scaled by sigma(t0)), clamped as act clamps them."""
    x0 = ref_ode.start_noise(noise, t0, path)
    return ref_ode._integrate(net, x0, obs, steps, solver, t0, 1.0, path, False).clamp(-1.0, 1.0)


# (solver, path, steps): a velocity solver on "ot", the noise solvers on both noise paths
CONFIGS = [("heun", None, 3), ("dpm2", "ot-eps", 3), ("ddim", "vp", 2)]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("t0", T0S)
@pytest.mark.parametrize("solver,path,steps", CONFIGS)
@pytest.mark.parametrize("B,K,mode", [(3, 6, "argmax"), (5, 17, "softmax")])
def test_act_from_t0_matches_reference(monkeypatch, backend, t0, solver, path, steps, B, K, mode):
    poison_fast_outputs(monkeypatch)
    seed = zlib.crc32(repr((backend, t0, solver, B)).encode()) % 1000  # (one fresh draw per case, reproducible)
    net, critic = _nets(seed)
    g = torch.Generator().manual_seed(seed + 1)
    obs, noise = torch.randn(B, 17, generator=g), torch.randn(B, K, 6, generator=g)
    u = torch.rand(B, dtype=torch.float64, generator=g) if mode == "softmax" else None
    kw = dict(steps=steps, solver=solver, path=path, mode=mode, temperature=0.3, noise=noise, uniform=u, t0=t0)
    with torch.no_grad():
        ref = ops.act(net, critic, obs, K, backend="torch", **kw)
        out = ops.act(net, critic, obs, K, backend=backend, **kw)
        cand = _candidates(net, obs, noise, steps, solver, path, t0)
    _close(out, ref)
    # the reference picks one of the candidates integrated from t0 (not from 0)
    hit = (cand - ref[:, None, :]).abs().amax(-1).min(1).values
    assert hit.max().item() == 0.0
    if t0 > 0.0:
        with torch.no_grad():
            cand0 = _candidates(net, obs, noise, steps, solver, path, 0.0)
        assert (cand - cand0).abs().max().item() > 1e-3, "t0 changed nothing"


@pytest.mark.parametrize("backend", FAST)
def test_act_from_t0_thousand_rows_and_drawn_noise(monkeypatch, backend):
    """B x K = 20 x 50 = 1000 candidate rows, the noise and softmax uniform drawn from the generator
    (the same stream on every backend), several t0 in turn on one configuration: a plan or table
    cached for one t0 must not answer for another."""
    poison_fast_outputs(monkeypatch)
    net, critic = _nets(31, H=40, depth=3)
    obs = torch.randn(20, 17, generator=torch.Generator().manual_seed(32))
    with torch.no_grad():
        for t0 in (0.0, 0.1372, OT_EPS_SAMPLE_T0, 0.0):
            for mode in ("argmax", "softmax"):
                kw = dict(steps=4, solver="dpm2", path="ot-eps", mode=mode, t0=t0)
                ref = ops.act(net, critic, obs, 50, generator=torch.Generator().manual_seed(5), backend="torch", **kw)
                out = ops.act(net, critic, obs, 50, generator=torch.Generator().manual_seed(5), backend=backend, **kw)
                _close(out, ref)


BAD_T0 = [(-0.1, "t0 must be a float in [0, 1], got -0.1"), (1.0, "t0 must be below 1 (act integrates from t0 to 1), got t0=1.0"),
          (float("nan"), "t0 must be a float in [0, 1], got nan"), (True, "t0 must be a float in [0, 1], got True"),
          ("0.05", "t0 must be a float in [0, 1], got '0.05'"), (float("inf"), "t0 must be a float in [0, 1], got inf"),
          (torch.tensor(0.05), "t0 must be a float in [0, 1], got tensor(0.0500)")]


@pytest.mark.parametrize("bad,msg", BAD_T0, ids=[repr(b) for b, _ in BAD_T0])
def test_bad_t0_refused_with_one_message_on_every_backend(bad, msg):
    """The same ValueError (naming t0) from the reference, C++, Triton and auto, raised before any
    kernel runs or anything is drawn from the generator."""
    net, critic = _nets(3)
    obs = torch.randn(4, 17)
    got = {}
    for backend in ["torch", "auto"] + FAST:
        g = torch.Generator().manual_seed(1)
        state = g.get_state()
        with torch.no_grad(), pytest.raises(ValueError) as err:
            ops.act(net, critic, obs, 5, steps=2, solver="dpm2", path="ot-eps", t0=bad, generator=g, backend=backend)
        assert torch.equal(g.get_state(), state), f"{backend} drew from the generator before refusing"
        got[backend] = str(err.value)
    assert len(set(got.values())) == 1 and got["torch"].startswith(msg), got


@pytest.mark.parametrize("sampler", ["consistency", "ddpm"])
def test_t0_only_for_the_flow_sampler(sampler):
    net, critic = _nets(4)
    obs = torch.randn(2, 17)
    for backend in ["torch"] + FAST:
        with torch.no_grad(), pytest.raises(ValueError, match=r"t0 must be 0 for sampler='%s'" % sampler):
            ops.act(net, critic, obs, 3, sampler=sampler, t0=0.05, backend=backend)
    with torch.no_grad():  # 0 (the default) is what these samplers do
        ops.act(net, critic, obs, 3, sampler=sampler, t0=0, backend="torch")


def test_start_noise_is_flow_policy_scale():
    """One sigma(t0) for ops.act, FlowPolicy and the prepared sampler (reference.ode.start_noise_scale)."""
    for path in ("ot", "ot-eps", "vp"):
        for t0 in T0S:
            pol = FlowPolicy(3, 2, hidden=8, depth=1, path=path, t0=t0)
            want = 1.0 if t0 == 0.0 else (1.0 - t0 if path != "vp" else None)
            s = ref_ode.start_noise_scale(t0, None if path == "ot" else path)
            assert pol.start_noise_scale() == s
            if want is not None:
                assert s == pytest.approx(want, rel=1e-15)
    z = torch.randn(3, 2)
    assert ref_ode.start_noise(z, 0.0, "vp") is z  # not copied at t0 = 0
    assert torch.equal(ref_ode.start_noise(z, 0.25, "ot-eps"), z * 0.75)


class _Dispatches:
    """Records every ops-level dispatch (backends.choose: one per ops call)."""

    def __init__(self, monkeypatch):
        self.ops = []
        real = backends.choose

        def choose(op, *args, **kw):
            self.ops.append(op)
            return real(op, *args, **kw)
        monkeypatch.setattr(backends, "choose", choose)


def _three_calls(pol, critic, obs, K, noise, mode, generator, backend):
    """What FlowPolicy.act did from t0 > 0 before ops.act took t0: sample, score, select."""
    cand = pol.sample(obs, K, noise=noise, generator=generator, backend=backend)
    q = critic.q_min(obs.repeat_interleave(K, 0), cand.reshape(-1, pol.act_dim))
    return ops.select_action(q.reshape(obs.shape[0], K), cand, mode=mode, temperature=0.5, generator=generator,
                             backend=backend)


@pytest.mark.parametrize("backend", ["torch"] + FAST)
@pytest.mark.parametrize("mode", ["argmax", "softmax"])
def test_flow_policy_act_on_ot_eps_is_one_call(monkeypatch, backend, mode):
    poison_fast_outputs(monkeypatch)
    torch.manual_seed(40)
    pol = FlowPolicy(17, 6, hidden=24, depth=2, steps=3, path="ot-eps").eval()
    assert pol.t0 == OT_EPS_SAMPLE_T0 > 0.0
    critic = DoubleCritic(17, 6, hidden=24, depth=2).eval()
    obs = torch.randn(5, 17, generator=torch.Generator().manual_seed(41))
    with torch.no_grad():
        want = _three_calls(pol, critic, obs, 7, None, mode, torch.Generator().manual_seed(9), "torch")
        seen = _Dispatches(monkeypatch)
        got = pol.act(obs, critic, 7, select=mode, temperature=0.5, generator=torch.Generator().manual_seed(9),
                      backend=backend)
        assert seen.ops == ["act"], f"FlowPolicy.act dispatched {seen.ops}"
        if backend == "torch":  # the very same operations as the three calls: the same numbers
            assert torch.equal(got, want)
        else:
            _close(got, want)
        # through make_sampler's act as well (its policy's t0, one call)
        smp = make_sampler(pol, num_samples=1, steps=3, backend=backend, generator=torch.Generator().manual_seed(9))
        seen.ops.clear()
        a = smp.act(obs, critic, 7, mode=mode, temperature=0.5)
        assert seen.ops == ["act"], f"Sampler.act dispatched {seen.ops}"
        _close(a, want)


@pytest.mark.skipif("triton" not in FAST, reason="Triton does not run here")
def test_triton_act_from_t0_compiles_fullgraph(monkeypatch):
    """Under torch.compile (fullgraph=True) act from t0 traces with no graph break (sigma(t0) is a
    constant of the trace) and gives the eager numbers."""
    poison_fast_outputs(monkeypatch)
    net, critic = _nets(51)
    g = torch.Generator().manual_seed(52)
    obs, x0 = torch.randn(3, 17, generator=g), torch.randn(3, 4, 6, generator=g)

    def f(obs, x0):
        return ops.act(net, critic, obs, 4, steps=2, solver="dpm2", path="ot-eps", noise=x0, t0=OT_EPS_SAMPLE_T0,
                       backend="triton")

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            got = torch.compile(f, backend="aot_eager", fullgraph=True)(obs, x0)
            want = f(obs, x0)
            assert torch.equal(got, want)
            _close(got, ops.act(net, critic, obs, 4, steps=2, solver="dpm2", path="ot-eps", noise=x0,
                                t0=OT_EPS_SAMPLE_T0, backend="torch"))
    finally:
        torch._dynamo.reset()
