"""Issue 12: FlowPolicy.loss refuses data off the package's scales, FlowPolicy.sample is inference
(no grad, fused backends) unless asked, DoubleCritic checks layer_norm, and qk.sample has a C++
path that gives the reference's samples for the same seed."""
import pytest
import torch

from conftest import need_backend

import qipo_kernels as qk
from qipo_kernels import backends as _B
from qipo_kernels.policies import ACTION_TOL, FlowPolicy

pytestmark = pytest.mark.usefixtures("one_thread")


def need_cpp():
    need_backend("cpp")


@pytest.fixture(scope="module")
def pi():
    torch.manual_seed(0)
    return FlowPolicy(obs_dim=5, act_dim=3, hidden=32, depth=2)


def _batch(B=6, M=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(B, 5, generator=g)
    actions = torch.rand(B, M, 3, generator=g) * 2 - 1
    t = torch.rand(B, M, generator=g)
    return obs, actions, t


# ----------------------------------------------------------------------------------- FlowPolicy.loss
@pytest.mark.parametrize("bad", [1.5, -0.01, float("nan"), float("inf")])
def test_flow_loss_refuses_t_outside_unit_interval(pi, bad):
    obs, actions, t = _batch()
    t[2, 1] = bad
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\] \(noise at 0, data at 1\), got 1 value\(s\)"):
        pi.loss(obs, actions, t=t)


@pytest.mark.parametrize("bad", [1.0 + 2 * ACTION_TOL, -3.0, 255.0, float("nan"), float("-inf")])
def test_flow_loss_refuses_actions_far_outside_the_unit_box(pi, bad):
    obs, actions, t = _batch()
    actions[1, 3, 0] = bad
    with pytest.raises(ValueError, match=r"actions must lie in \[-1, 1\] \(\|a\| <= 1 \+ 0.001; rescale"):
        pi.loss(obs, actions, t=t)
    with pytest.raises(ValueError, match=r"actions must lie in \[-1, 1\]"):
        pi.loss(obs, actions[:, 3], t=t[:, :1])  # the [B, A] form too


def test_flow_loss_accepts_the_box_edges_and_the_tolerance(pi):
    obs, actions, t = _batch()
    actions[0, 0] = torch.tensor([1.0, -1.0, 1.0 + ACTION_TOL])
    actions[0, 1] = torch.tensor([-1.0 - ACTION_TOL, 0.0, 1.0000001])  # float32 rounding of a rescaled bound
    t[0, 0], t[0, 1] = 0.0, 1.0
    loss = pi.loss(obs, actions, t=t, energy=torch.randn(6, 4), beta=3.0)
    assert torch.isfinite(loss)
    loss.backward()


# ----------------------------------------------------------------------------------- FlowPolicy.sample
def test_flow_sample_outside_no_grad_is_inference_on_the_fast_backend(pi):
    need_cpp()
    obs = torch.randn(7, 5)
    assert torch.is_grad_enabled()
    noise = torch.randn(7, 4, 3, generator=torch.Generator().manual_seed(1))
    a = pi.sample(obs, 4, noise=noise)  # README: pi.sample(obs, 4) without torch.no_grad
    assert a.shape == (7, 4, 3) and not a.requires_grad and a.grad_fn is None
    # the C++ backend ran it: before, with grad mode on it refused ("does not backpropagate")
    b = pi.sample(obs, 4, noise=noise, backend="cpp")
    assert torch.equal(a, b)
    with torch.no_grad():
        ref = pi.sample(obs, 4, noise=noise, backend="torch")
    torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-5)


def test_flow_sample_with_grad_true_differentiates_through_the_sampler(pi):
    obs = torch.randn(3, 5)
    noise = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(2))
    a = pi.sample(obs, 2, noise=noise, grad=True, steps=3)
    assert a.requires_grad
    a.sum().backward()
    g = pi.net.out.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    pi.zero_grad(set_to_none=True)
    with pytest.raises(TypeError, match="grad must be a bool"):
        pi.sample(obs, 2, grad="yes")
    with torch.no_grad():  # grad=True under no_grad: the caller's no_grad wins, nothing recorded
        assert not pi.sample(obs, 2, noise=noise, grad=True, steps=3).requires_grad


# ----------------------------------------------------------------------------------- DoubleCritic
@pytest.mark.parametrize("bad", ["yes", 1, 0, None, "False"])
def test_double_critic_layer_norm_must_be_a_bool(bad):
    with pytest.raises(TypeError, match="layer_norm must be a bool"):
        qk.DoubleCritic(obs_dim=5, act_dim=3, layer_norm=bad)
    assert qk.DoubleCritic(obs_dim=5, act_dim=3, hidden=8, depth=1, layer_norm=True).layer_norm is True


# ----------------------------------------------------------------------------------- qk.sample on C++
@pytest.mark.parametrize("solver,path", [("euler", None), ("rk4", "ot"), ("dpm2", "vp"), ("ddim", "ot-eps")])
@pytest.mark.parametrize("B,K", [(1, 1), (17, 6)])
def test_sample_runs_in_cpp_with_the_reference_noise(solver, path, B, K, monkeypatch):
    need_cpp()
    from qipo_kernels import cpp

    torch.manual_seed(3)
    net = qk.ConditionalMLP(act_dim=3, obs_dim=5, hidden=40, depth=2).eval()
    obs = torch.randn(B, 5)
    # every output buffer the C++ writes starts as NaN: an element left unwritten fails the comparison
    monkeypatch.setattr(cpp, "_empty", lambda shape, dtype=cpp.np.float32: cpp.np.full(shape, cpp.np.nan, dtype))
    with torch.no_grad():
        assert _B.choose("sample", "auto", obs.device, None, net=net, obs=obs, num_samples=K, steps=5, solver=solver,
                         path=path, seed=11, return_trajectory=False)[0] == "cpp"
        ref, ref_traj = qk.sample(net, obs, K, steps=5, solver=solver, path=path, seed=11, return_trajectory=True,
                                  backend="torch")
        out, traj = qk.sample(net, obs, K, steps=5, solver=solver, path=path, seed=11, return_trajectory=True,
                              backend="cpp")
        again = qk.sample(net, obs, K, steps=5, solver=solver, path=path, seed=11, backend="auto")
        other = qk.sample(net, obs, K, steps=5, solver=solver, path=path, seed=12, backend="cpp")
    assert out.shape == (B, K, 3) and traj.shape == (6, B, K, 3)
    assert torch.equal(traj[0], ref_traj[0])  # the same noise, number for number
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(traj, ref_traj, atol=2e-5, rtol=2e-5)
    assert torch.equal(again, out)
    assert not torch.allclose(other, out)


def test_sample_cpp_falls_back_to_the_reference_with_gradients():
    need_cpp()
    net = qk.ConditionalMLP(act_dim=3, obs_dim=5, hidden=16, depth=1)
    obs = torch.randn(4, 5)
    a = qk.sample(net, obs, 2, steps=2, seed=0)  # grad mode on, trainable net: "auto" takes the reference
    assert a.requires_grad
    with pytest.raises(RuntimeError, match="backend='cpp' cannot run sample here: grad mode is on"):
        qk.sample(net, obs, 2, steps=2, seed=0, backend="cpp")


# ------------------------------------------------------ the policies' obs-vs-parameters check
def test_policy_obs_check_follows_conversions_of_the_policy():
    """FlowPolicy / ConsistencyPolicy / DDPMPolicy compare obs with their first parameter, located once
    per network (C.first_param): a later .double() / .float() of the policy is still seen, and the
    message names both dtypes, before anything is sampled."""
    torch.manual_seed(0)
    critic = qk.DoubleCritic(5, 3, hidden=16, depth=1)
    for pol in (FlowPolicy(5, 3, hidden=16, depth=1, path="ot-eps"), qk.ConsistencyPolicy(5, 3, hidden=16, depth=1),
                qk.DDPMPolicy(5, 3, hidden=16, depth=1)):
        obs = torch.randn(4, 5)
        assert pol.sample(obs, 2, backend="torch").shape == (4, 2, 3)
        with pytest.raises(TypeError, match=r"obs has dtype torch.float64 but the policy's parameters are torch.float32"):
            pol.sample(obs.double(), 2, backend="torch")
        pol.double()                                   # in place: the remembered parameter is now float64
        with pytest.raises(TypeError, match=r"obs has dtype torch.float32 but the policy's parameters are torch.float64"):
            pol.act(obs, critic.double(), 2, backend="torch")
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        try:
            pol.float()                                # new Parameter objects replace the remembered one
        finally:
            torch.__future__.set_overwrite_module_params_on_conversion(False)
        assert pol.act(obs, critic.float(), 2, backend="torch").shape == (4, 3)
        assert qk._checks.first_param(pol.net) is next(pol.net.parameters())
