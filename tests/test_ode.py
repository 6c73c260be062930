"""ODE integration checked against things nobody here wrote: closed forms, torchdiffeq, measured orders."""
import math

import pytest
import torch
import torchdiffeq

from qipo_kernels import ConditionalMLP, integrate
from qipo_kernels import reference as R

D64 = torch.float64


class LinearField:
    """dx/dt = A x + b (obs ignored); exact flow by the matrix exponential of [[A, b], [0, 0]]."""

    def __init__(self, d, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(d, d, generator=g, dtype=D64) * 0.7
        self.b = torch.randn(d, generator=g, dtype=D64)

    def __call__(self, x, t, obs):
        return x @ self.A.T + self.b

    def exact(self, x0, t0, t1):
        d = self.A.shape[0]
        M = torch.zeros(d + 1, d + 1, dtype=D64)
        M[:d, :d], M[:d, d] = self.A, self.b
        E = torch.linalg.matrix_exp(M * (t1 - t0))
        return x0 @ E[:d, :d].T + E[:d, d]


class NonlinearField:
    """A time-dependent nonlinear field with an obs dependence (no closed form)."""

    def __call__(self, x, t, obs):
        return -x + torch.sin(3.0 * t)[:, None] * torch.tanh(x + obs[:, :1]) + 0.5 * obs[:, 1:2]


@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun", "rk4"])
def test_linear_field_against_matrix_exponential(solver):
    f = LinearField(5)
    x0 = torch.randn(7, 5, dtype=D64)
    obs = torch.zeros(7, 1, dtype=D64)
    exact = f.exact(x0, 0.0, 1.0)
    tol = {"euler": 0.1, "midpoint": 3e-3, "heun": 3e-3, "rk4": 1e-6}[solver]
    got = integrate(f, x0, obs, steps=64, solver=solver)
    assert (got - exact).abs().max() < tol


@pytest.mark.parametrize("solver,order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_measured_convergence_order(solver, order):
    f = NonlinearField()
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(6, 3, generator=g, dtype=D64)
    obs = torch.randn(6, 2, generator=g, dtype=D64)
    truth = torchdiffeq.odeint(lambda t, x: f(x, t.expand(x.shape[0]), obs), x0,
                               torch.tensor([0.0, 1.0], dtype=D64), method="dopri5", rtol=1e-13, atol=1e-13)[-1]
    n = 16 if order < 4 else 8
    e1 = (integrate(f, x0, obs, n, solver) - truth).abs().max()
    e2 = (integrate(f, x0, obs, 2 * n, solver) - truth).abs().max()
    measured = math.log2(float(e1 / e2))
    assert abs(measured - order) < 0.35, f"{solver}: measured order {measured:.2f}, expected {order}"


@pytest.mark.parametrize("solver", ["euler", "midpoint"])
def test_same_as_torchdiffeq_fixed_step(solver):
    torch.manual_seed(0)
    net = ConditionalMLP(6, 17, hidden=32, depth=2, time_embedding="fourier").double()
    x0, obs = torch.randn(9, 6, dtype=D64), torch.randn(9, 17, dtype=D64)
    steps = 10
    theirs = torchdiffeq.odeint(lambda t, x: net(x, t.expand(9), obs), x0, torch.tensor([0.0, 1.0], dtype=D64),
                                method=solver, options=dict(step_size=1.0 / steps))[-1]
    torch.testing.assert_close(integrate(net, x0, obs, steps, solver), theirs, atol=1e-12, rtol=1e-12)


def test_rk4_like_with_like_against_torchdiffeq():
    """torchdiffeq's "rk4" is the 3/8 rule, ours the classical one: both are 4th order, so both sit
    within O(h^4) of an adaptive solution, and of each other."""
    torch.manual_seed(0)
    net = ConditionalMLP(6, 17, hidden=32, depth=2, activation="tanh", time_embedding="raw").double()
    x0, obs = torch.randn(9, 6, dtype=D64), torch.randn(9, 17, dtype=D64)
    func = lambda t, x: net(x, t.expand(9), obs)  # noqa: E731
    span = torch.tensor([0.0, 1.0], dtype=D64)
    truth = torchdiffeq.odeint(func, x0, span, method="dopri5", rtol=1e-12, atol=1e-12)[-1]
    theirs = torchdiffeq.odeint(func, x0, span, method="rk4", options=dict(step_size=0.05))[-1]
    ours = integrate(net, x0, obs, 20, "rk4")
    e_ours, e_theirs = (ours - truth).abs().max(), (theirs - truth).abs().max()
    assert e_ours < 1e-6 and e_theirs < 1e-6
    assert e_ours < 10 * e_theirs + 1e-12


def _gaussian_eps(mu, s, path):
    """Exact noise prediction when the data is N(mu, s^2 I): eps(x, t) = sigma (x - alpha mu) / (alpha^2 s^2 + sigma^2)."""

    def eps(x, t, obs):
        alpha, sigma = R.alpha_sigma(t[:, None], path)
        den = alpha ** 2 * s ** 2 + sigma ** 2
        # at sigma = 0 (t = 1 on ot-eps) x is the data itself and any finite prediction is exact
        return torch.where(den > 0, sigma * (x - alpha * mu) / torch.where(den > 0, den, 1.0), 0.0)

    def exact(x0, t0, t1):
        tt0, tt1 = torch.tensor(t0, dtype=D64), torch.tensor(t1, dtype=D64)
        a0, s0 = R.alpha_sigma(tt0, path)
        a1, s1 = R.alpha_sigma(tt1, path)
        c = (x0 - a0 * mu) / torch.sqrt(a0 ** 2 * s ** 2 + s0 ** 2)
        return a1 * mu + torch.sqrt(a1 ** 2 * s ** 2 + s1 ** 2) * c

    return eps, exact


@pytest.mark.parametrize("path", ["vp", "ot-eps"])
@pytest.mark.parametrize("solver,order", [("ddim", 1), ("dpm1", 1), ("dpm2", 2)])
def test_dpm_solvers_converge_to_gaussian_flow(path, solver, order):
    mu = torch.tensor([0.3, -0.5, 0.1], dtype=D64)
    eps, exact = _gaussian_eps(mu, 0.4, path)
    x0 = torch.randn(5, 3, dtype=D64)
    obs = torch.zeros(5, 1, dtype=D64)
    t0, t1 = R.ode.time_grid(1, 0.0, 1.0, solver, path)
    truth = exact(x0, t0, t1)
    # a time-uniform grid is coarse near the data end of VP: the asymptotic rate shows from ~32 steps
    e = [float((integrate(eps, x0, obs, n, solver, path=path) - truth).abs().max()) for n in (32, 64, 128)]
    measured = math.log2(e[1] / e[2])
    assert e[2] < 0.05
    assert abs(measured - order) < 0.4, f"{solver} on {path}: errors {e}, measured order {measured:.2f}"


@pytest.mark.parametrize("solver", ["ddim", "dpm2"])
def test_point_mass_data_is_recovered_exactly(solver):
    """With data a single point mu, the exact noise prediction makes the data prediction equal mu at
    every step: the solvers land on mu exactly (ot-eps ends at sigma = 0)."""
    mu = torch.tensor([0.25, -0.75], dtype=D64)
    eps, _ = _gaussian_eps(mu, 0.0, "ot-eps")
    out = integrate(eps, torch.randn(4, 2, dtype=D64), torch.zeros(4, 1, dtype=D64), 3, solver, path="ot-eps")
    torch.testing.assert_close(out, mu.expand(4, 2), atol=1e-12, rtol=0)


@pytest.mark.parametrize("solver", R.SOLVERS)
def test_layouts_trajectory_and_stages(solver):
    torch.manual_seed(0)
    net = ConditionalMLP(6, 17, hidden=16, depth=1)
    calls = []

    def counted(x, t, obs):
        calls.append(1)
        return net(x, t, obs)

    path = "vp" if solver in R.NOISE_SOLVERS else None
    x0, obs = torch.randn(3, 4, 6), torch.randn(3, 17)
    out, traj = integrate(counted, x0, obs, 5, solver, path=path, return_trajectory=True)
    assert len(calls) == 5 * R.STAGES[solver]
    assert out.shape == (3, 4, 6) and traj.shape == (6, 3, 4, 6)
    torch.testing.assert_close(traj[0], x0)
    torch.testing.assert_close(traj[-1], out)
    flat = integrate(net, x0.reshape(12, 6), obs.repeat_interleave(4, 0), 5, solver, path=path)
    torch.testing.assert_close(out.reshape(12, 6), flat)


def test_integrate_bad_input():
    net = ConditionalMLP(6, 17, hidden=8, depth=1)
    x, o = torch.randn(4, 6), torch.randn(4, 17)
    with pytest.raises(ValueError, match="solver must be one of"):
        integrate(net, x, o, 4, "rk45")
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        integrate(net, x, o, 0)
    with pytest.raises(ValueError, match="obs must have 4 rows"):
        integrate(net, x, o[:3], 4)
    with pytest.raises(ValueError, match="x0 must be"):
        integrate(net, x[0], o, 4)
    with pytest.raises(ValueError, match="path must be one of"):
        integrate(net, x, o, 4, "dpm2")
    with pytest.raises(ValueError, match="path must be None or 'ot'"):
        integrate(net, x, o, 4, "euler", path="vp")
    with pytest.raises(ValueError, match="need t0 < t1"):
        integrate(net, x, o, 4, "euler", t0=0.5, t1=0.5)
    with pytest.raises(ValueError, match="t1 must be a float in"):
        integrate(net, x, o, 4, "euler", t1=2.0)
    with pytest.raises(TypeError, match="net must be callable"):
        integrate("net", x, o, 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        integrate(net, x, o, 4, backend="cuda")
