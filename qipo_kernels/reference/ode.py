"""Fixed-step ODE integration of a flow / diffusion policy network (plain PyTorch reference).

Package convention: noise at t = 0, data at t = 1; integration runs from t0 to t1 in ``steps``
equal steps of size h = (t1 - t0) / steps.

Velocity solvers (net(x, t, obs) is the velocity dx/dt):
    "euler"     1 evaluation / step, order 1
    "midpoint"  2 evaluations / step, order 2   x += h f(x + h/2 f(x, t), t + h/2)
    "heun"      2 evaluations / step, order 2   x += h/2 (f(x, t) + f(x + h f(x, t), t + h))
    "rk4"       4 evaluations / step, order 4   classical Runge-Kutta (1/6, 1/3, 1/3, 1/6)

Noise-prediction solvers (net(x, t, obs) predicts the noise z of x_t = alpha a + sigma z on
``path`` "vp" (QIPO-Diff, default) or "ot-eps" (QIPO-OT)), written in data-prediction form
(DPM-Solver++ with predict_x0=True, as QIPO's code samples):
    "ddim" / "dpm1"  1 evaluation / step (DDIM = DPM-Solver-1)
    "dpm2"           2 evaluations / step, singlestep DPM-Solver++(2S) with r1 = 1/2 in log-SNR
For these the grid is clipped where the path is singular: t0 >= 1e-3 on "ot-eps", t1 <= 1 - 1e-3
on "vp" (the VP model is trained on diffusion times s in [1e-3, 1]).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import _checks as C
from .paths import VP_EPS, alpha_sigma, inverse_log_snr, log_snr

VELOCITY_SOLVERS = ("euler", "midpoint", "heun", "rk4")
NOISE_SOLVERS = ("ddim", "dpm1", "dpm2")
SOLVERS = VELOCITY_SOLVERS + NOISE_SOLVERS
NOISE_PATHS = ("vp", "ot-eps")
# Network evaluations per step, per solver.
STAGES = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "ddim": 1, "dpm1": 1, "dpm2": 2}
OT_EPS_T0 = 1e-3


def time_grid(steps: int, t0: float, t1: float, solver: str, path: Optional[str]):
    """The (t0, t1) actually integrated over, after clipping the singular ends of noise paths."""
    if solver in NOISE_SOLVERS:
        if path == "ot-eps":
            t0 = max(t0, OT_EPS_T0)
        elif path == "vp":
            t1 = min(t1, 1.0 - VP_EPS)
    return t0, t1


# (t0, path) -> sigma(t0): the start noise scale is a pure function of these two, looked up on every
# act call from t0 > 0 (alpha_sigma builds float64 tensors); bounded, cleared when full
_START_SCALE: dict = {}


@torch.compiler.assume_constant_result  # (a Python float of constant arguments: no graph break under tracing)
def start_noise_scale(t0: float, path: Optional[str]) -> float:
    """sigma(t0) of ``path`` (None = "ot"): sampling from t0 > 0 starts from N(0, I) noise scaled by
    this, the path's noise level at t0 (FlowPolicy.sample, ops.act's t0). Exactly 1.0 at t0 = 0."""
    t0 = float(t0)
    if t0 == 0.0:
        return 1.0
    key = (t0, path)
    s = _START_SCALE.get(key)
    if s is None:
        _, sig = alpha_sigma(torch.tensor(t0, dtype=torch.float64), path or "ot")
        if len(_START_SCALE) >= 256:
            _START_SCALE.clear()
        s = _START_SCALE[key] = float(sig)
    return s


def start_noise(noise: torch.Tensor, t0: float, path: Optional[str]) -> torch.Tensor:
    """The state at t0 from N(0, I) ``noise``: noise * sigma(t0) (noise itself at t0 = 0, not copied)."""
    s = start_noise_scale(t0, path)
    return noise if s == 1.0 else noise * s


def _flatten(x0, obs):
    """x0 [N, A] with obs [N, S], or x0 [B, K, A] with obs [B, S] (K samples per state)."""
    if x0.dim() == 3:
        B, K, A = x0.shape
        return x0.reshape(B * K, A), obs.repeat_interleave(K, dim=0), (B, K, A)
    return x0, obs, None


def check_integrate(net, x0, obs, steps, solver, t0, t1, path):
    # (the passing case is a few attribute reads and comparisons; the checks' functions, which build
    # the messages, run only when a condition fails)
    if not callable(net):
        raise TypeError(f"net must be callable as net(x, t, obs), got {type(net).__name__}")
    if x0.__class__ is not torch.Tensor or x0.dtype not in C.FLOAT_DTYPES:
        C.tensor("x0", x0)
    xs = x0.shape
    if len(xs) not in (2, 3):
        raise ValueError(f"x0 must be [N, A] or [B, K, A], got shape {tuple(xs)}")
    if obs.__class__ is not torch.Tensor or obs.dtype not in C.FLOAT_DTYPES or obs.dim() != 2:
        C.tensor("obs", obs, ndim=2)
    if obs.shape[0] != xs[0]:
        raise ValueError(f"obs must have {xs[0]} rows (one per {'sample' if len(xs) == 2 else 'state'} of x0), got {obs.shape[0]}")
    if xs[-1] == 0 or (len(xs) == 3 and xs[1] == 0):
        C.nonempty_samples("x0", x0)
    if not (x0.is_cpu and obs.is_cpu) and x0.device != obs.device:  # (both on the CPU: one device)
        C.same_device(x0=x0, obs=obs)
    if x0.dtype is not obs.dtype:
        C.same_dtype(x0=x0, obs=obs)
    dt = C.module_dtype(net)
    if dt is not None and x0.dtype is not dt:
        C.module_inputs("net", net, x0=x0)
    check_solver(steps, solver, t0, t1, path)


# Solver configurations check_solver has passed, keyed with the scalars' types (True == 1 and 1 == 1.0
# hash alike but are not alike to the checks); a configuration is a pure function of these values,
# so a repeat skips the checks. Bounded: cleared when full.
_SOLVER_OK: set = set()
_SOLVER_OK_MAX = 256


def check_solver(steps, solver, t0, t1, path, caller: str = "integrate"):
    """steps, solver, (t0, t1) and path of a fixed-step integration (shared by integrate and sample;
    ``caller="act"``: act has no t1 (it integrates from t0 to 1), so its message says t0 < 1)."""
    key = None
    if not torch.compiler.is_compiling():  # (torch.compile traces the checks themselves, no memo)
        try:
            key = (steps.__class__, steps, solver.__class__, solver, t0.__class__, t0, t1.__class__, t1,
                   path.__class__, path)
            if key in _SOLVER_OK:
                return
        except TypeError:  # an unhashable argument: the checks below say what is wrong with it
            key = None
    C.positive_int("steps", steps)
    C.choice("solver", solver, SOLVERS)
    for name, v in (("t0", t0), ("t1", t1)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= float(v) <= 1.0):
            raise ValueError(f"{name} must be a float in [0, 1], got {v!r}")
    if solver in NOISE_SOLVERS:
        C.choice("path", path, NOISE_PATHS)
    elif path is not None and path != "ot":
        raise ValueError(f"solver {solver!r} integrates a velocity field: path must be None or 'ot', got {path!r}; "
                         f"use solver in {NOISE_SOLVERS} for noise-prediction paths")
    a, b = time_grid(steps, float(t0), float(t1), solver, path)
    if not a < b:
        if caller == "act":
            raise ValueError(f"t0 must be below 1 (act integrates from t0 to 1), got t0={t0} (after clipping the "
                             f"path's singular ends: {a}, {b})")
        raise ValueError(f"need t0 < t1, got t0={t0}, t1={t1} (after clipping the path's singular ends: {a}, {b})")
    if key is not None and solver.__class__ is str and (path is None or path.__class__ is str):
        if len(_SOLVER_OK) >= _SOLVER_OK_MAX:
            _SOLVER_OK.clear()
        _SOLVER_OK.add(key)


def _velocity_step(f, x, t, h, solver):
    if solver == "euler":
        return x + h * f(x, t)
    if solver == "midpoint":
        k1 = f(x, t)
        return x + h * f(x + 0.5 * h * k1, t + 0.5 * h)
    if solver == "heun":
        k1 = f(x, t)
        k2 = f(x + h * k1, t + h)
        return x + 0.5 * h * (k1 + k2)
    k1 = f(x, t)
    k2 = f(x + 0.5 * h * k1, t + 0.5 * h)
    k3 = f(x + 0.5 * h * k2, t + 0.5 * h)
    k4 = f(x + h * k3, t + h)
    return x + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


def _scalar(v, like):
    return torch.tensor(v, dtype=torch.float64, device=like.device)


def _noise_step(eps_fn, x, t, t_next, solver, path):
    """One DPM-Solver++ step in data-prediction form from t to t_next (scalars, float64 coefficients)."""
    tt, tn = _scalar(t, x), _scalar(t_next, x)
    a_t, s_t = alpha_sigma(tt, path)
    a_n, s_n = alpha_sigma(tn, path)

    def x0_pred(xx, a, s, time):
        return (xx - float(s) * eps_fn(xx, time)) / float(a)

    x0_t = x0_pred(x, a_t, s_t, t)
    if solver in ("ddim", "dpm1"):
        # x' = (s_n / s_t) x + a_n (1 - e^{-h}) x0, e^{-h} = (s_n a_t) / (a_n s_t)
        return float(s_n / s_t) * x + float(a_n * (1.0 - (s_n * a_t) / (a_n * s_t))) * x0_t
    lam_t, lam_n = log_snr(tt, path), log_snr(tn, path)
    h = lam_n - lam_t
    lam_m = lam_t + 0.5 * h
    tm = inverse_log_snr(lam_m, path)
    a_m, s_m = alpha_sigma(tm, path)
    phi_m = torch.expm1(-0.5 * h)  # e^{-h/2} - 1
    phi_n = -(1.0 - (s_n * a_t) / (a_n * s_t))  # e^{-h} - 1 (finite also when s_n = 0)
    x_m = float(s_m / s_t) * x - float(a_m * phi_m) * x0_t
    x0_m = x0_pred(x_m, a_m, s_m, float(tm))
    return float(s_n / s_t) * x - float(a_n * phi_n) * x0_t - float(a_n * phi_n) * (x0_m - x0_t)


def _integrate(net: Callable, x0, obs, steps, solver, t0, t1, path, return_trajectory):
    x, o, shape3 = _flatten(x0, obs)
    n = x.shape[0]

    def f(xx, time):
        return net(xx, torch.full((n,), time, dtype=xx.dtype, device=xx.device), o)

    a, b = time_grid(steps, float(t0), float(t1), solver, path)
    h = (b - a) / steps
    traj = [x] if return_trajectory else None
    for i in range(steps):
        t = a + i * h
        if solver in VELOCITY_SOLVERS:
            x = _velocity_step(f, x, t, h, solver)
        else:
            x = _noise_step(f, x, t, a + (i + 1) * h if i + 1 < steps else b, solver, path)
        if return_trajectory:
            traj.append(x)
    if shape3 is not None:
        x = x.reshape(shape3)
        if return_trajectory:
            traj = [y.reshape(shape3) for y in traj]
    if return_trajectory:
        return x, torch.stack(traj, dim=0)
    return x


def integrate(net: Callable, x0: torch.Tensor, obs: torch.Tensor, steps: int = 10, solver: str = "euler",
              t0: float = 0.0, t1: float = 1.0, path: Optional[str] = None, return_trajectory: bool = False):
    """Integrate a policy network from noise (t0) to actions (t1) with a fixed-step solver.

    Args:
        net: callable net(x [N, A], t [N], obs [N, S]) -> [N, A] (velocity, or noise for the
            noise solvers), e.g. a ConditionalMLP.
        x0: initial noise, [N, A] (one sample per obs row) or [B, K, A] (K samples per state).
        obs: [N, S] or [B, S].
        steps: number of solver steps (network evaluations = steps * STAGES[solver]).
        solver: one of SOLVERS (see module docstring).
        t0, t1: time interval, 0 <= t0 < t1 <= 1 (noise at 0, data at 1).
        path: for noise solvers "vp" or "ot-eps" (required); None / "ot" for velocity solvers.
        return_trajectory: also return the states at every grid time, [steps + 1, *x0.shape].
    Returns:
        x(t1) with the shape of x0 (and the trajectory when asked).
    """
    check_integrate(net, x0, obs, steps, solver, t0, t1, path)
    return _integrate(net, x0, obs, steps, solver, t0, t1, path, return_trajectory)


MAX_SEED = 2 ** 63 - 1


def check_sample(net, obs, num_samples, steps, solver, path, seed):
    if not callable(net):
        raise TypeError(f"net must be callable as net(x, t, obs), got {type(net).__name__}")
    act_dim = getattr(net, "act_dim", None)
    if isinstance(act_dim, bool) or not isinstance(act_dim, int) or act_dim < 1:
        raise TypeError(f"net must have a positive int act_dim attribute (e.g. a ConditionalMLP), got {act_dim!r}")
    C.tensor("obs", obs, ndim=2)
    C.module_inputs("net", net, obs=obs)
    C.positive_int("num_samples", num_samples)
    check_solver(steps, solver, 0.0, 1.0, path)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an int in [0, 2**63 - 1], got {seed!r}")


def sample_noise(net, obs, num_samples: int, seed: int) -> torch.Tensor:
    """sample's initial noise [B, num_samples, net.act_dim]: torch.randn in obs' dtype from a
    torch.Generator on obs' device seeded with ``seed`` (also the C++ backend's draw)."""
    g = torch.Generator(device=obs.device)
    g.manual_seed(seed)
    return torch.randn((obs.shape[0], num_samples, net.act_dim), dtype=obs.dtype, device=obs.device, generator=g)


def _sample(net: Callable, obs, num_samples, steps, solver, path, seed, return_trajectory):
    x0 = sample_noise(net, obs, num_samples, seed)
    return _integrate(net, x0, obs, steps, solver, 0.0, 1.0, path, return_trajectory)


def sample(net: Callable, obs: torch.Tensor, num_samples: int, steps: int = 10, solver: str = "euler",
           path: Optional[str] = None, seed: int = 0, return_trajectory: bool = False):
    """Draw ``num_samples`` actions per state: integrate from noise seeded by ``seed`` (t = 0 to 1).

    The reference draws x0 [B, num_samples, act_dim] with ``torch.randn`` from a torch.Generator on
    obs' device seeded with ``seed``, in obs' dtype, then runs ``integrate``. Fused backends may
    draw their noise from another generator (same distribution, not the same numbers).

    Args:
        net: a policy network with an ``act_dim`` attribute (e.g. a ConditionalMLP).
        obs: [B, S].
        num_samples: K, samples per state.
        steps, solver, path: as in ``integrate``.
        seed: int in [0, 2**63 - 1]; the same seed gives the same samples.
        return_trajectory: also return [steps + 1, B, K, A] (its first entry is the noise).
    Returns:
        [B, num_samples, act_dim] (and the trajectory when asked).
    """
    check_sample(net, obs, num_samples, steps, solver, path, seed)
    return _sample(net, obs, num_samples, steps, solver, path, seed, return_trajectory)
