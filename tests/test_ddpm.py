"""DDPM sampler (Diffusion-QL): the reference against an independent eager loop written here from the
official semantics, and every backend against the reference.

The official loop below is written from Diffusion-QL's ``Diffusion`` (agents/diffusion.py): buffers
computed at construction in float32, ``p_sample_loop`` over i = T-1..0 with the integer step as the
time input, x0 predicted from eps and clamped, posterior mean + exp(0.5 log var) noise except at
i = 0, the result clamped. No code is downloaded: it is the few lines a reader of the paper writes.
"""
import math

import pytest
import torch

from qipo_kernels import ops
from qipo_kernels.nets import ConditionalMLP
from qipo_kernels.reference import ddpm as R

from conftest import TOL, poison_fast_outputs

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # np.sqrt on a tensor, as the official module does
              pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")]


from _official import OfficialDiffusion, OfficialMLP  # noqa: E402


def net_and_data(A=6, S=17, H=64, B=13, K=1, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    net = ConditionalMLP(A, S, hidden=H, depth=3).to(dtype)
    obs = torch.randn(B, S, dtype=dtype)
    noise = torch.randn(B, K, A, dtype=dtype) if K > 1 else torch.randn(B, A, dtype=dtype)
    return net, obs, noise


@pytest.mark.parametrize("schedule", ["vp", "linear", "cosine"])
@pytest.mark.parametrize("T", [5, 1, 17])
@pytest.mark.parametrize("predict_epsilon", [True, False])
def test_reference_is_the_official_loop(schedule, T, predict_epsilon):
    net, obs, x = net_and_data()
    max_action = 0.75
    off = OfficialDiffusion(net, T, schedule, max_action, predict_epsilon)
    step = torch.randn(T - 1, *x.shape)
    with torch.no_grad():
        want = off.sample(obs, x, list(step))
        got = R.ddpm_sample(net, x, obs, schedule, n_timesteps=T, step_noise=step, max_action=max_action,
                            predict_epsilon=predict_epsilon)
        # the buffers as saved by the official module give the same numbers
        got_sd = R.ddpm_sample(net, x, obs, R.DDPMSchedule.from_state_dict(off.state_dict()), step_noise=step,
                               max_action=max_action, predict_epsilon=predict_epsilon)
    assert torch.equal(got, want)
    assert torch.equal(got_sd, want)


def test_schedule_values():
    T = 5
    b = R.beta_schedule(T, "vp")
    i = torch.arange(1, T + 1, dtype=torch.float64)
    want = 1 - torch.exp(-0.1 / T - 0.5 * 9.9 * (2 * i - 1) / T ** 2)
    torch.testing.assert_close(b.double(), want, atol=0, rtol=1e-7)
    sch = R.DDPMSchedule.from_betas(b)
    # last step (i = 0): c1 = 1, c2 = 0; the log variance at i = 0 is the clipped floor
    assert abs(float(sch.posterior_mean_coef1[0]) - 1.0) < 1e-6 and float(sch.posterior_mean_coef2[0]) == 0.0
    assert float(sch.posterior_log_variance_clipped[0]) == pytest.approx(math.log(1e-20), rel=1e-6)
    assert R.ddpm_time_inputs(3) == [2.0, 1.0, 0.0]


def test_float64_against_float32():
    net, obs, x = net_and_data(K=4, B=7)
    step = torch.randn(4, *x.shape)
    with torch.no_grad():
        y32 = R.ddpm_sample(net, x, obs, step_noise=step)
        net64 = ConditionalMLP(6, 17, hidden=64, depth=3).double()
        net64.load_state_dict(net.state_dict())
        y64 = R.ddpm_sample(net64, x.double(), obs.double(), step_noise=step.double())
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(y32.double(), y64, atol=20 * atol, rtol=20 * rtol)


def test_generator_draws_in_order():
    net, obs, x = net_and_data(K=3, B=5)
    T = 5
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        a = R.ddpm_sample(net, x, obs, generator=g)
        g2 = torch.Generator().manual_seed(7)
        step = torch.stack([torch.randn((15, 6), generator=g2) for _ in range(T - 1)]).reshape(T - 1, 5, 3, 6)
        b = R.ddpm_sample(net, x, obs, step_noise=step)
    assert torch.equal(a, b)


def test_bad_arguments():
    net, obs, x = net_and_data()
    with pytest.raises(ValueError, match="step_noise"):
        R.ddpm_sample(net, x, obs, step_noise=torch.randn(5, *x.shape))
    with pytest.raises(ValueError, match="schedule"):
        R.ddpm_sample(net, x, obs, "quadratic")
    with pytest.raises(ValueError, match="max_action"):
        R.ddpm_sample(net, x, obs, max_action=0.0)
    with pytest.raises(ValueError, match="n_timesteps"):
        R.ddpm_sample(net, x, obs, n_timesteps=0)
    with pytest.raises(ValueError, match="beta"):
        R.ddpm_sample(net, x, obs, torch.tensor([0.5, 1.5]))
    with pytest.raises(TypeError, match="predict_epsilon"):
        R.ddpm_sample(net, x, obs, predict_epsilon=1)
    with pytest.raises(ValueError, match="no DDPM schedule"):
        R.DDPMSchedule.from_state_dict({"model.final_layer.weight": torch.zeros(2, 2)})


# ------------------------------------------------------------------ backends against the reference
def _fast_backends():
    from qipo_kernels import backends

    return [b for b in ("cpp", "triton") if not backends.backend_reasons(b, torch.device("cpu"))
            and b in backends._IMPLS.get("ddpm_sample", {})]


def _act_backends():
    """The fast backends that also run act with a ddpm sampler (op act_ext)."""
    from qipo_kernels import backends

    return [b for b in _fast_backends() if b in backends._IMPLS.get("act_ext", {})]


def test_fast_backends_found():
    from qipo_kernels import backends

    for b in ("cpp", "triton"):
        if not backends.backend_reasons(b, torch.device("cpu")):
            assert b in _fast_backends()


def test_cpp_is_registered():
    from qipo_kernels import backends

    backends.backend_reasons("cpp", torch.device("cpu"))
    if "cpp" not in backends._IMPORT_ERRORS:
        assert "cpp" in backends._IMPLS["ddpm_sample"]


@pytest.mark.parametrize("A,S,H,B,K,depth", [(6, 17, 40, 13, 1, 3), (1, 3, 17, 1, 50, 2), (3, 11, 70, 9, 6, 1)])
@pytest.mark.parametrize("schedule,T", [("vp", 5), ("linear", 1), ("cosine", 7)])
@pytest.mark.parametrize("predict_epsilon,clip_denoised,max_action", [(True, True, 1.0), (False, True, 0.4),
                                                                       (True, False, 2.5)])
def test_backends_match_reference(monkeypatch, A, S, H, B, K, depth, schedule, T, predict_epsilon, clip_denoised,
                                  max_action):
    poison_fast_outputs(monkeypatch)
    torch.manual_seed(A * 100 + B)
    net = ConditionalMLP(A, S, hidden=H, depth=depth)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.5)
    obs = torch.randn(B, S)
    noise = torch.randn(B, K, A) if K > 1 else torch.randn(B, A)
    step = torch.randn(T - 1, *noise.shape)
    kw = dict(schedule=schedule, n_timesteps=T, step_noise=step, max_action=max_action,
              predict_epsilon=predict_epsilon, clip_denoised=clip_denoised)
    with torch.no_grad():
        want = ops.ddpm_sample(net, noise, obs, backend="torch", **kw)
        net64 = ConditionalMLP(A, S, hidden=H, depth=depth).double()
        net64.load_state_dict(net.state_dict())
        truth = ops.ddpm_sample(net64, noise.double(), obs.double(), backend="torch",
                                **dict(kw, step_noise=step.double()))
        for b in _fast_backends():
            got = ops.ddpm_sample(net, noise, obs, backend=b, **kw)
            assert got.shape == noise.shape and torch.isfinite(got).all()
            # float32 rounding, as far from the float64 truth as the float32 reference at most ~2x
            err = (got.double() - truth).abs().max().item()
            ref_err = (want.double() - truth).abs().max().item()
            assert err <= 2 * ref_err + 1e-5, (b, err, ref_err)
            torch.testing.assert_close(got, want, atol=2e-5 * max(1.0, max_action), rtol=2e-5)


def test_backends_draw_the_reference_noise(monkeypatch):
    poison_fast_outputs(monkeypatch)
    net, obs, x = net_and_data(K=4, B=3)
    with torch.no_grad():
        want = ops.ddpm_sample(net, x, obs, generator=torch.Generator().manual_seed(3), backend="torch")
        for b in _fast_backends():
            got = ops.ddpm_sample(net, x, obs, generator=torch.Generator().manual_seed(3), backend=b)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_auto_uses_reference_when_grad_needed():
    net, obs, x = net_and_data(B=2)
    out = ops.ddpm_sample(net, x, obs, generator=torch.Generator().manual_seed(0))
    assert out.requires_grad  # the reference ran: the fused samplers do not backpropagate
    from qipo_kernels import backends

    why = backends.explain("ddpm_sample", torch.device("cpu"), net=net, noise=x, obs=obs, schedule=None,
                           step_noise=None)
    assert any("grad" in r for r in why["cpp"]) or why["cpp"] and "import" in why["cpp"][0]


def test_ops_bad_arguments_before_any_kernel():
    net, obs, x = net_and_data()
    for b in ["torch"] + _fast_backends():
        with pytest.raises(ValueError, match="step_noise"):
            ops.ddpm_sample(net, x, obs, step_noise=torch.randn(2, *x.shape), backend=b)
        with pytest.raises(ValueError, match="obs must have"):
            ops.ddpm_sample(net, x, obs[:3], backend=b)
        with pytest.raises(TypeError, match="schedule"):
            ops.ddpm_sample(net, x, obs, schedule=3, backend=b)


# ------------------------------------------------------------------ act with a ddpm actor
def test_act_ddpm_reference_and_backends(monkeypatch):
    from qipo_kernels import DoubleCritic
    from qipo_kernels.reference import select as RS

    poison_fast_outputs(monkeypatch)
    torch.manual_seed(5)
    A, S, B, K, T = 6, 17, 7, 50, 5
    net = ConditionalMLP(A, S, hidden=40, depth=3)
    critic = DoubleCritic(S, A, hidden=40, depth=3)
    obs = torch.randn(B, S)
    noise = torch.randn(B, K, A)
    step = torch.randn(T - 1, B, K, A)
    u = torch.rand(B, dtype=torch.float64)
    off = OfficialDiffusion(net, T, "vp", 1.0, True)
    with torch.no_grad():
        cand = off.sample(obs.repeat_interleave(K, 0), noise.reshape(B * K, A), list(step.reshape(T - 1, B * K, A)))
        q = critic.q_min(obs.repeat_interleave(K, 0), cand).reshape(B, K)
        want = cand.reshape(B, K, A)[torch.arange(B), RS.select_index(q, "softmax", 1.0, u)]
        got = {}
        for b in ["torch"] + _act_backends():
            got[b] = ops.act(net, critic, obs, K, sampler="ddpm", noise=noise, step_noise=step, uniform=u, backend=b)
        # generator draws: noise, step noise, uniform, on every backend alike
        gdraw = {b: ops.act(net, critic, obs, K, sampler="ddpm", generator=torch.Generator().manual_seed(9),
                            backend=b) for b in ["torch"] + _act_backends()}
    torch.testing.assert_close(got["torch"], want, atol=0, rtol=0)
    for b, v in got.items():
        torch.testing.assert_close(v, want, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(gdraw[b], gdraw["torch"], atol=2e-5, rtol=2e-5)


def test_act_picks_sampler_from_kind_and_refuses_another():
    from qipo_kernels import DoubleCritic

    torch.manual_seed(0)
    off = OfficialDiffusion(OfficialMLP(5, 3, hidden=32), 5, "cosine")
    sd = off.state_dict()
    assert "model.final_layer.weight" in sd and "betas" in sd
    loaded = ConditionalMLP.from_cpql_state_dict(sd, obs_dim=5, act_dim=3)
    assert loaded.kind == "ddpm" and loaded.ddpm_schedule.n_timesteps == 5
    critic = DoubleCritic(5, 3, hidden=16, depth=2)
    obs = torch.randn(4, 5)
    noise = torch.randn(4, 8, 3)
    step = torch.randn(4, 4, 8, 3)
    u = torch.rand(4, dtype=torch.float64)
    with torch.no_grad():
        a = ops.act(loaded, critic, obs, 8, noise=noise, step_noise=step, uniform=u)
        cand = off.sample(obs.repeat_interleave(8, 0), noise.reshape(32, 3), list(step.reshape(4, 32, 3)))
        q = critic.q_min(obs.repeat_interleave(8, 0), cand).reshape(4, 8)
        from qipo_kernels.reference import select as RS

        want = cand.reshape(4, 8, 3)[torch.arange(4), RS.select_index(q, "softmax", 1.0, u)]
    torch.testing.assert_close(a, want, atol=1e-5, rtol=1e-5)
    for s in ("flow", "consistency"):
        with pytest.raises(ValueError, match="loaded as a 'ddpm' actor"):
            ops.act(loaded, critic, obs, 8, sampler=s)
    with pytest.raises(ValueError, match="DDPM actor"):
        ConditionalMLP.from_cpql_state_dict(sd, obs_dim=5, act_dim=3, kind="consistency")


@pytest.mark.parametrize("backend,atol", [("cpp", 1e-4), ("triton", 2e-5)])
def test_fast_backends_follow_weight_changes(monkeypatch, backend, atol):
    if backend not in _fast_backends():
        pytest.skip(f"the {backend} backend is not available here")
    poison_fast_outputs(monkeypatch)
    net, obs, x = net_and_data(K=3, B=5)
    step = torch.randn(4, *x.shape)
    with torch.no_grad():
        a = ops.ddpm_sample(net, x, obs, step_noise=step, backend=backend)
        net.out.weight.mul_(0.5)  # an in-place update: the pack must follow
        b = ops.ddpm_sample(net, x, obs, step_noise=step, backend=backend)
        torch.testing.assert_close(b, ops.ddpm_sample(net, x, obs, step_noise=step, backend="torch"),
                                   atol=atol, rtol=2e-5)
        assert not torch.equal(a, b)


def test_cpp_float64_input():
    """float64 input: auto runs the reference, a named cpp says why."""
    if "cpp" not in _fast_backends():
        pytest.skip("the C++ backend is not available here")
    net, obs, x = net_and_data(K=3, B=5)
    step = torch.randn(4, *x.shape)
    with torch.no_grad():
        y = ops.ddpm_sample(net.double(), x.double(), obs.double(), step_noise=step.double())
        assert y.dtype == torch.float64
        with pytest.raises(RuntimeError, match="float32"):
            ops.ddpm_sample(net, x.double(), obs.double(), step_noise=step.double(), backend="cpp")


# ------------------------------------------------------------------ the Triton kernel (MODE_DDPM)
def _need_triton():
    from qipo_kernels import backends

    why = backends.backend_reasons("triton", torch.device("cpu"))
    if why:
        pytest.skip("Triton does not run here: " + "; ".join(why))


def _triton_case(monkeypatch, A, S, H, depth, shape, schedule, T, predict_epsilon, clip_denoised, max_action, clip,
                 seed):
    """Triton against the float32 reference and the float64 truth, with explicit and generator-drawn step
    noise (the same seed gives the reference's numbers and leaves the generator where the reference does)."""
    _need_triton()
    poison_fast_outputs(monkeypatch)
    torch.manual_seed(seed)
    net = ConditionalMLP(A, S, hidden=H, depth=depth)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.5)
    obs = torch.randn(shape[0], S)
    noise = torch.randn(*shape, A)
    step = torch.randn(T - 1, *noise.shape)
    kw = dict(schedule=schedule, n_timesteps=T, max_action=max_action, predict_epsilon=predict_epsilon,
              clip_denoised=clip_denoised, clip=clip)
    atol, rtol = 2e-5 * max(1.0, max_action), 2e-5
    with torch.no_grad():
        want = ops.ddpm_sample(net, noise, obs, step_noise=step, backend="torch", **kw)
        net64 = ConditionalMLP(A, S, hidden=H, depth=depth).double()
        net64.load_state_dict(net.state_dict())
        truth = ops.ddpm_sample(net64, noise.double(), obs.double(), step_noise=step.double(), backend="torch", **kw)
        got = ops.ddpm_sample(net, noise, obs, step_noise=step, backend="triton", **kw)
        assert got.shape == noise.shape and torch.isfinite(got).all()
        err = (got.double() - truth).abs().max().item()
        ref_err = (want.double() - truth).abs().max().item()
        assert err <= 2 * ref_err + 1e-5, (err, ref_err)
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
        if clip:
            assert got.abs().max() <= torch.tensor(max_action, dtype=torch.float32)
        # the step noise drawn from a generator: the reference's draws, in its order
        g_ref, g_tri = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
        want_g = ops.ddpm_sample(net, noise, obs, generator=g_ref, backend="torch", **kw)
        got_g = ops.ddpm_sample(net, noise, obs, generator=g_tri, backend="triton", **kw)
        torch.testing.assert_close(got_g, want_g, atol=atol, rtol=rtol)
        assert torch.equal(torch.randn(3, generator=g_ref), torch.randn(3, generator=g_tri))


@pytest.mark.parametrize("schedule", ["vp", "linear", "cosine"])
@pytest.mark.parametrize("T", [1, 5, 7])
@pytest.mark.parametrize("predict_epsilon,clip_denoised", [(True, True), (False, False), (True, False)])
def test_triton_matches_reference_b17_k6(monkeypatch, schedule, T, predict_epsilon, clip_denoised):
    # [B, K, A] = [17, 6, 6], obs 17; max_action 0.6 makes both clamps bite, 2.5 leaves room
    max_action = 0.6 if clip_denoised else 2.5
    _triton_case(monkeypatch, 6, 17, 24, 3, (17, 6), schedule, T, predict_epsilon, clip_denoised, max_action,
                 True, seed=T * 10 + predict_epsilon)


@pytest.mark.parametrize("schedule,T,predict_epsilon,clip_denoised,clip",
                         [("vp", 5, True, True, True), ("linear", 7, False, False, True),
                          ("cosine", 5, True, False, False), ("vp", 1, False, True, False)])
def test_triton_matches_reference_n1000(monkeypatch, schedule, T, predict_epsilon, clip_denoised, clip):
    # [N, A] = [1000, 3], obs 5, a small net (several tiles per program of the persistent grid)
    _triton_case(monkeypatch, 3, 5, 16, 2, (1000,), schedule, T, predict_epsilon, clip_denoised, 1.0, clip, seed=3)


def test_triton_schedule_from_state_dict_and_betas(monkeypatch):
    _need_triton()
    poison_fast_outputs(monkeypatch)
    net, obs, x = net_and_data(A=3, S=5, B=7, K=4)
    off = OfficialDiffusion(net, 6, "cosine", 0.8, True)
    step = torch.randn(5, *x.shape)
    with torch.no_grad():
        for sch in (R.DDPMSchedule.from_state_dict(off.state_dict()), R.beta_schedule(6, "cosine")):
            want = off.sample(obs.repeat_interleave(4, 0), x.reshape(28, 3), list(step.reshape(5, 28, 3)))
            got = ops.ddpm_sample(net, x, obs, schedule=sch, step_noise=step, max_action=0.8, backend="triton")
            torch.testing.assert_close(got, want.reshape(x.shape), atol=2e-5, rtol=2e-5)


def test_explain_and_dispatch_triton():
    from qipo_kernels import backends
    from qipo_kernels.triton import sampler as ts

    _need_triton()
    net, obs, x = net_and_data(B=2)
    sch = R.as_schedule("vp", 5)
    with torch.no_grad():
        why = backends.explain("ddpm_sample", torch.device("cpu"), net=net, noise=x, obs=obs, schedule=sch,
                               step_noise=None)
        assert why["torch"] == [] and why["triton"] == []
        name, fn = backends.choose("ddpm_sample", "triton", torch.device("cpu"), R._ddpm_sample, net=net, noise=x,
                                   obs=obs, schedule=sch, step_noise=None)
        assert name == "triton" and fn is ts.ddpm_sample
        y = ops.ddpm_sample(net, x, obs, generator=torch.Generator().manual_seed(0), backend="triton")
        assert torch.equal(y, ts.ddpm_sample(net, x, obs, sch, None, 1.0, True, True, True,
                                             torch.Generator().manual_seed(0)))
        # what it cannot run, it says, and a named backend refuses instead of running something else
        why64 = backends.explain("ddpm_sample", torch.device("cpu"), net=net.double(), noise=x.double(),
                                 obs=obs.double(), schedule=sch, step_noise=None)
        assert any("float64" in r for r in why64["triton"])
        with pytest.raises(RuntimeError, match="float64"):
            ops.ddpm_sample(net, x.double(), obs.double(), backend="triton")
        net.float()
        why_sn = backends.explain("ddpm_sample", torch.device("cpu"), net=net, noise=x, obs=obs, schedule=sch,
                                  step_noise=torch.randn(4, *x.shape, dtype=torch.float64))
        assert any("step_noise" in r for r in why_sn["triton"])
    why_grad = backends.explain("ddpm_sample", torch.device("cpu"), net=net, noise=x, obs=obs, schedule=sch,
                                step_noise=None)
    assert any("grad" in r for r in why_grad["triton"])
    assert "ddpm_sample" in backends.table()
