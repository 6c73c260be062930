"""Fused Triton samplers: a whole ConditionalMLP, every solver step, in one launch.

Ops registered here (backend "triton"):

    integrate(net, x0, obs, steps, solver, t0, t1, path, return_trajectory)
        x0 [N, A] with obs [N, S], or x0 [B, K, A] with obs [B, S]  ->  x(t1), x0's shape
        (and the trajectory [steps + 1, *x0.shape] when asked).
    consistency_sample(net, noise, obs, sigmas, step_noise, sigma_max, sigma_min, sigma_data, clip, generator)
        noise [N, A] / [B, K, A]  ->  actions, noise's shape.
    act(net, critic, obs, num_candidates, sampler, steps, solver, path, sigmas, mode, temperature,
        noise, step_noise, uniform, generator, clip, t0=0.0)
        obs [B, S]  ->  actions [B, A]: K candidates per state sampled (flow: from t0), scored by min(Q1, Q2) of the
        DoubleCritic and one chosen (argmax or softmax inverse-CDF draw) -- all in ONE launch.
    sample(net, obs, num_samples, steps, solver, path, seed, return_trajectory)
        obs [B, S]  ->  [B, num_samples, A]: integrate with the noise drawn in the kernel from ``seed``.
    ddpm_sample(net, noise, obs, schedule, step_noise, max_action, predict_epsilon, clip_denoised, clip, generator)
        noise [N, A] / [B, K, A]  ->  actions, noise's shape: Diffusion-QL's T-step ancestral sampler.

The package: mlp.py (the @triton.jit MLP-evaluation helpers), sampler_kernel.py (the kernel),
sampler_pack.py (weight packing and its cache), sampler_tables.py (solver coefficients, time
share), sampler_launch.py (precision, tiles, launch plans), sampler_ops.py (custom ops + fakes),
sampler_supports.py (what a call needs: supports() and dispatch's fast checks; its names are
re-exported here), and this file (the implementations, ``Prepared`` for make_sampler, and their
registration with qipo_kernels.backends).

Precision: the compute dtype is x0's dtype (see sampler_launch: float32 runs TF32x3 on tensor cores
unless TF32 or IEEE is asked for); bfloat16 / float16 use float32 accumulation, float32
bias / activation and a float32 state x. float64 is not supported (``supports`` says so and
backend="auto" takes the reference). A NaN anywhere in a sample's inputs gives a NaN output (the
[-1, 1] clamps propagate NaN like torch.clamp).

The DoubleCritic in act may have layer_norm=True (CPQL's offline critic): LayerNorm over the
hidden width is computed in the kernel after each hidden Linear (two-pass, biased variance).

Randomness: in integrate / consistency_sample / act every random number is an input (x0 / noise /
step_noise / uniform). When act or consistency_sample get None for one of them it is drawn on the
host from ``generator`` in the same order and shape as the reference draws it, so both backends see
the same stream. ``sample`` instead draws x0 inside the kernel (Philox on the global element index:
x0[b, k, a] = tl.randn(seed, (b K + k) A + a), rounded to obs' dtype); the noise is never stored.
That is another stream than the reference's torch.Generator: same distribution, not the same numbers.

torch.compile: under tracing the packing and tables are traced as plain torch ops from the live
parameters and the launch is the custom op qipo_kernels::triton_policy_sample (sampler_ops), so a
function calling integrate / consistency_sample / act with backend="triton" compiles with
fullgraph=True. Eagerly the packed weights, tables and launch plans are cached per (module, dtype,
device) and checked by a watch of the module's tensors (sampler_pack), and the launcher is called
without the dispatcher.

CUDA graphs: the launch path does no host synchronisation. A cache miss copies a small table to the
device, so run each configuration once before capturing (make_sampler(..., cuda_graph=True) does).
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from .. import _checks
from .. import backends as _backends
from ..reference import consistency as _cons
from ..reference import ode as _ode
from . import _host
from .mlp import ACT_CODES
from .sampler_kernel import (MODE_ACT_CONSISTENCY, MODE_ACT_FLOW, MODE_CONSISTENCY, MODE_DDPM, MODE_INTEGRATE, NCOEF,  # noqa: F401
                             SOLVER_CODES, is_group)
from .sampler_launch import make_plan, prec, run_plan
from .sampler_ops import _consistency_tables_op, _flow_tables_op, _policy_sample_op, _seeded_sample_op
from .sampler_pack import (_critic_meta, _critic_tensors, _policy_tensors, cached_table, get_pack, peek,  # noqa: F401
                           refresh)
from .sampler_supports import (MAX_ACT_DIM, MAX_CANDIDATES, MAX_DEPTH, MAX_HIDDEN,  # noqa: F401  (re-exported)
                               _fast_act, _fast_consistency_sample, _fast_ddpm_sample, _fast_integrate, _fast_sample,
                               _module_reasons, supports_act, supports_consistency_sample, supports_ddpm_sample,
                               supports_integrate, supports_sample)
from .sampler_tables import _coef_tensor, _ddpm_tables, _time_share

_MAX_PLANS = 64


# ----------------------------------------------------------------------------------------------
# Implementations (same arguments as the references' private functions)
# ----------------------------------------------------------------------------------------------
def _compiling() -> bool:
    return bool(torch.compiler.is_compiling())


def _check_dims(net, x, obs, xname):
    if x.shape[-1] != net.act_dim:
        raise ValueError(f"{xname} must have last dim act_dim = {net.act_dim}, got shape {tuple(x.shape)}")
    if obs.shape[1] != net.obs_dim:
        raise ValueError(f"obs must be [*, {net.obs_dim}] (net.obs_dim), got shape {tuple(obs.shape)}")


def _flow_key(steps, solver, t0, t1, path, dtype):
    return ("flow", steps, solver, float(t0), float(t1), path, dtype)


def _flow_table_fn(net, steps, solver, t0, t1, path, dtype, device):
    def build(pol):
        times, coef = _flow_tables_op(steps, solver, float(t0), float(t1), path, device)
        return _time_share(net, times, torch.promote_types(dtype, torch.float32), pol[0].shape[1]), coef
    return build


def _cons_key(sig, sigma_max, sigma_min, sigma_data, dtype):
    return ("cons", tuple(sig), float(sigma_max), float(sigma_min), float(sigma_data), dtype)


def _cons_table_fn(net, sig, sigma_max, sigma_min, sigma_data, dtype, device):
    def build(pol):
        tin, coef = _consistency_tables_op(list(sig), float(sigma_max), float(sigma_min), float(sigma_data),
                                           dtype, device)
        return _time_share(net, tin, torch.promote_types(dtype, torch.float32), pol[0].shape[1]), coef
    return build


def _flow_inputs(net, steps, solver, t0, t1, path, dtype, device):
    """(packed policy tensors, time share [n_evals, HP], coefficients) of one flow configuration:
    traced under torch.compile, cached eagerly."""
    build = _flow_table_fn(net, steps, solver, t0, t1, path, dtype, device)
    if _compiling():
        pol = _policy_tensors(net, dtype, device)
        return (pol, *build(pol))
    e = get_pack(net, "policy", dtype, device)
    return (e.tensors, *cached_table(e, _flow_key(steps, solver, t0, t1, path, dtype), lambda: build(e.tensors)))


def _consistency_inputs(net, sig, sigma_max, sigma_min, sigma_data, dtype, device):
    build = _cons_table_fn(net, sig, sigma_max, sigma_min, sigma_data, dtype, device)
    if _compiling():
        pol = _policy_tensors(net, dtype, device)
        return (pol, *build(pol))
    e = get_pack(net, "policy", dtype, device)
    return (e.tensors, *cached_table(e, _cons_key(sig, sigma_max, sigma_min, sigma_data, dtype),
                                     lambda: build(e.tensors)))


def _critic_inputs(critic, dtype, device) -> List[torch.Tensor]:
    if _compiling():
        return _critic_tensors(critic, dtype, device)
    return get_pack(critic, "critic", dtype, device).tensors


def _entry(module, kind: str, dtype, device):
    """The module's current pack (re-packed if it changed), or backends.Fallback when its parameters
    are not (any more) in the inputs' dtype / on their device. None under torch.compile (traced)."""
    if _compiling():
        return None
    e = get_pack(module, kind, dtype, device)
    if not e.ok:
        name = "net" if kind == "policy" else "critic"
        why = _module_reasons(name, module, dtype, device) or [f"{name}'s parameters do not match the inputs"]
        raise _backends.Fallback("the Triton backend cannot run this call: " + "; ".join(why))
    return e


def _run(net, e, critic, ce, tkey, tbuild, x, obs, sn, u, mode, K, steps, n_evals, scode, temperature, clip,
         softmax, trajectory, dtype, device, seeded_samples=0, seed=0, hot_key=None):
    """One fused call: (out, traj). x [N, A] or [B, K, A] contiguous (None: seeded, ``seeded_samples``
    per state), obs [B, S] contiguous; e / ce the policy / critic packs (_entry). Under torch.compile
    through the custom ops; eagerly straight to a cached launch plan. out has x's shape ([B, A] in
    the act modes, [B, seeded_samples, A] seeded); traj [steps + 1, *out's shape] or None.

    hot_key: the caller's key of this call (every argument the plan, tables and output shapes
    depend on); the launch is then also kept as ``e.plans[hot_key]`` for _run_hot, which later
    calls with the same key take without rebuilding any of it."""
    A = net.act_dim
    B = obs.shape[0]
    N = x.numel() // A if x is not None else B * seeded_samples
    group = is_group(mode)
    if critic is not None:
        meta = ce.current_meta() if ce is not None else None
        cdepth, chidden, cln, ceps = meta if meta is not None else _critic_meta(critic)
        cact = ACT_CODES[critic.activation]
    else:
        cdepth, chidden, cln, ceps, cact = 1, 1, False, 0.0, 0
    if e is None:  # torch.compile: traced packing, custom ops
        pol = _policy_tensors(net, dtype, device)
        tvec, coef = tbuild(pol)
        if x is None:
            return _seeded_sample_op(obs, tvec, coef, pol, seeded_samples, A, seed, steps, scode,
                                     ACT_CODES[net.activation], len(net.layers), trajectory)
        cw = _critic_tensors(critic, dtype, device) if critic is not None else []
        out, traj = _policy_sample_op(x.view(N, A), obs, sn, u, tvec, coef, pol, cw, mode, K, steps, n_evals, scode,
                                      ACT_CODES[net.activation], len(net.layers), cact, cdepth, chidden, cln, ceps,
                                      temperature, clip, softmax, trajectory)
        if not group:
            out = out.view(x.shape)
        return out, (traj.view((steps + 1,) + tuple(x.shape)) if trajectory else None)
    tab = e.tables.get(tkey)
    if tab is None:
        tab = cached_table(e, tkey, lambda: tbuild(e.tensors))
    pkey = (tkey, mode, K, N, B, clip, softmax, trajectory, x is None, ce, ceps,
            prec(dtype, device) if device.type == "cuda" else 0)
    p = e.plans.get(pkey)
    if p is None:
        if len(e.plans) >= _MAX_PLANS:
            e.plans.clear()
        p = e.plans[pkey] = make_plan(mode, e.tensors, ce.tensors if ce is not None else [], B if group else N, K,
                                      A, steps, n_evals, scode, ACT_CODES[net.activation], len(net.layers), cact,
                                      cdepth, chidden, cln, ceps, clip, softmax, trajectory, x is None, dtype,
                                      device)
    shape = (B, A) if group else (x.shape if x is not None else (B, seeded_samples, A))
    tshape = (steps + 1,) + tuple(shape) if trajectory else None
    hot = (p, tab[0], tab[1], shape, tshape, N, B, (B if group else N) > 0)
    if hot_key is not None:
        e.plans[hot_key] = hot
    return _run_hot(hot, x, obs, sn, u, temperature, seed)


def _run_hot(hot, x, obs, sn, u, temperature=1.0, seed=0):
    """The launch of a call whose plan, tables and shapes are known (see _run's hot_key): two
    allocations at most and the launch. x, obs contiguous, of the shapes the key was made for."""
    p, tvec, coef, shape, tshape, N, B, live = hot
    out = _host.empty(shape, p.dtype, p.device)
    traj = _host.empty(tshape, p.dtype, p.device) if tshape is not None else None
    if live:
        run_plan(p, x, obs, sn, u, out, traj, tvec, coef, N, B, temperature, seed)
    return out, traj


def integrate(net, x0, obs, steps, solver, t0, t1, path, return_trajectory):
    """Fused ODE sampling; arguments and result as reference.ode._integrate.

    x0 [N, A] with obs [N, S], or x0 [B, K, A] with obs [B, S]; returns x0's shape
    (and the trajectory [steps + 1, *x0.shape] when return_trajectory).
    """
    _check_dims(net, x0, obs, "x0")
    dtype, device = x0.dtype, x0.device
    e = _entry(net, "policy", dtype, device)
    x = x0 if x0.is_contiguous() else x0.contiguous()
    obs = obs if obs.is_contiguous() else obs.contiguous()
    hk = None
    if e is not None:  # a warm call: one lookup, then the launch
        hk = ("integrate", x0.shape, obs.shape, steps, solver, t0, t1, path, bool(return_trajectory),
              prec(dtype, device) if device.type == "cuda" else 0)
        hot = e.plans.get(hk)
        if hot is not None:
            out, traj = _run_hot(hot, x, obs, None, None)
            return (out, traj) if return_trajectory else out
    out, traj = _run(net, e, None, None, _flow_key(steps, solver, t0, t1, path, dtype),
                     _flow_table_fn(net, steps, solver, t0, t1, path, dtype, device), x,
                     obs, None, None, MODE_INTEGRATE,
                     x0.shape[1] if x0.dim() == 3 else 1, steps, 0, SOLVER_CODES[solver], 1.0, False, False,
                     bool(return_trajectory), dtype, device, hot_key=hk)
    return (out, traj) if return_trajectory else out


def sample(net, obs, num_samples, steps, solver, path, seed, return_trajectory):
    """Fused reference.ode._sample: obs [B, S] -> [B, num_samples, A] (and the trajectory
    [steps + 1, B, num_samples, A], whose first entry is the noise, when asked).

    The initial noise is drawn inside the kernel (Philox, tl.randn) from ``seed``: it is never
    materialised in memory, and it is a different stream from the reference's torch.Generator
    (same distribution: independent standard normals, rounded to obs' dtype).
    """
    if obs.shape[1] != net.obs_dim:
        raise ValueError(f"obs must be [B, {net.obs_dim}] (net.obs_dim), got shape {tuple(obs.shape)}")
    dtype, device = obs.dtype, obs.device
    e = _entry(net, "policy", dtype, device)
    out, traj = _run(net, e, None, None, _flow_key(steps, solver, 0.0, 1.0, path, dtype),
                     _flow_table_fn(net, steps, solver, 0.0, 1.0, path, dtype, device), None, obs.contiguous(),
                     None, None, MODE_INTEGRATE, num_samples, steps, 0, SOLVER_CODES[solver], 1.0, False, False,
                     bool(return_trajectory), dtype, device, seeded_samples=num_samples, seed=int(seed))
    return (out, traj) if return_trajectory else out


def _draw_step_noise(sigmas, shape, dtype, device, generator):
    # Same draws, same order and same shapes as reference.consistency._consistency_sample.
    n = len(sigmas or ())
    if n == 0:
        return None
    return torch.stack([torch.randn(shape, dtype=dtype, device=device, generator=generator) for _ in range(n)])


def _noise_prologue(net, noise, obs):
    """The shared start of consistency_sample / ddpm_sample: dims checked, the pack entry looked up
    (a Fallback raises before any noise is drawn), contiguous noise and obs.
    Returns (e, z, obs, dtype, device, A, N) with N = rows of z = numel / A."""
    _check_dims(net, noise, obs, "noise")
    dtype, device = noise.dtype, noise.device
    e = _entry(net, "policy", dtype, device)
    z = noise if noise.is_contiguous() else noise.contiguous()
    obs = obs if obs.is_contiguous() else obs.contiguous()
    return e, z, obs, dtype, device, net.act_dim, z.numel() // net.act_dim


def consistency_sample(net, noise, obs, sigmas, step_noise, sigma_max, sigma_min, sigma_data, clip, generator):
    """Fused one-step / multistep consistency sampling; as reference.consistency._consistency_sample.

    noise [N, A] with obs [N, S] or [B, K, A] with obs [B, S]; step_noise [len(sigmas), *noise.shape]
    or None (then drawn from ``generator`` exactly as the reference draws it). Returns noise's shape.
    """
    e, z, obs, dtype, device, A, N = _noise_prologue(net, noise, obs)
    sig = [float(s) for s in (sigmas or ())]
    if sig and step_noise is None:
        step_noise = _draw_step_noise(sig, (N, A), dtype, device, generator)
    sn = step_noise.reshape(len(sig), N, A).contiguous() if step_noise is not None else None
    hk = None
    if e is not None:  # a warm call: one lookup, then the launch
        hk = ("consistency", z.shape, obs.shape, tuple(sig), sigma_max, sigma_min, sigma_data, bool(clip),
              prec(dtype, device) if device.type == "cuda" else 0)
        hot = e.plans.get(hk)
        if hot is not None:
            return _run_hot(hot, z, obs, sn, None)[0]
    out, _ = _run(net, e, None, None, _cons_key(sig, sigma_max, sigma_min, sigma_data, dtype),
                  _cons_table_fn(net, sig, sigma_max, sigma_min, sigma_data, dtype, device), z,
                  obs, sn, None, MODE_CONSISTENCY,
                  z.shape[1] if z.dim() == 3 else 1, 0, 1 + len(sig), 0, 1.0, bool(clip), False, False, dtype, device,
                  hot_key=hk)
    return out


def _ddpm_key(schedule, max_action, predict_epsilon, clip_denoised, dtype):
    return ("ddpm", schedule.rows(), float(max_action), bool(predict_epsilon), bool(clip_denoised), dtype)


def _ddpm_table_fn(net, schedule, max_action, clip_denoised, dtype, device):
    def build(pol):
        times, rows = _ddpm_tables(schedule.rows(), float(max_action), bool(clip_denoised))
        tvec = _time_share(net, torch.tensor(times, dtype=torch.float64, device=device),
                           torch.promote_types(dtype, torch.float32), pol[0].shape[1])
        return tvec, _coef_tensor(rows, device)
    return build


def ddpm_sample(net, noise, obs, schedule, step_noise, max_action, predict_epsilon, clip_denoised, clip, generator):
    """Fused reference.ddpm._ddpm_sample (Diffusion-QL's ancestral sampler): all T steps in one launch.

    noise [N, A] with obs [N, S] or [B, K, A] with obs [B, S]; schedule a DDPMSchedule; step_noise
    [T-1, *noise.shape] or None (then drawn here from ``generator`` as the reference draws it: one
    [N, A] draw per step i = T-1 .. 1, after the module is validated, so a Fallback leaves the generator
    untouched). Returns noise's shape.
    """
    e, z, obs, dtype, device, A, N = _noise_prologue(net, noise, obs)
    T = schedule.n_timesteps
    if T > 1 and step_noise is None:
        step_noise = _draw_step_noise([None] * (T - 1), (N, A), dtype, device, generator)
    sn = step_noise.reshape(T - 1, N, A).contiguous() if T > 1 else None
    out, _ = _run(net, e, None, None, _ddpm_key(schedule, max_action, predict_epsilon, clip_denoised, dtype),
                  _ddpm_table_fn(net, schedule, max_action, clip_denoised, dtype, device), z,
                  obs, sn, None, MODE_DDPM,
                  z.shape[1] if z.dim() == 3 else 1, 0, T, 1 if predict_epsilon else 0, 1.0, bool(clip), False,
                  False, dtype, device)
    return out


def act(net, critic, obs, num_candidates, sampler, steps, solver, path, sigmas, mode, temperature,
        noise, step_noise, uniform, generator, clip, t0=0.0):
    """Sample K candidates per state, score by min(Q1, Q2), choose one -- one launch.

    Arguments and result as ops._act_ref: obs [B, S] -> actions [B, A]. Random inputs that are None
    are drawn from ``generator`` in the reference's order (noise, step noise, uniform). Flow
    integrates from ``t0`` (integrate's tables on [t0, 1]); given noise is scaled by sigma(t0) on the
    host (reference.ode.start_noise), as the reference scales it; drawn noise is drawn at that scale.
    """
    B = obs.shape[0]
    K = num_candidates
    A = net.act_dim
    dtype, device = obs.dtype, obs.device
    if obs.shape[1] != net.obs_dim:
        raise ValueError(f"obs must be [B, {net.obs_dim}] (net.obs_dim), got shape {tuple(obs.shape)}")
    e = _entry(net, "policy", dtype, device)  # (a Fallback before anything is drawn)
    ce = _entry(critic, "critic", dtype, device)
    if noise is None:
        scale = _ode.start_noise_scale(t0, path) if sampler == "flow" else 1.0
        noise = _draw_noise((B, K, A), scale, dtype, device, generator)
    elif sampler == "flow":
        noise = _ode.start_noise(noise, t0, path)
    sig = [float(s) for s in (sigmas or ())] if sampler == "consistency" else []
    if sampler == "consistency" and sig and step_noise is None:
        step_noise = _draw_step_noise(sig, (B * K, A), dtype, device, generator)
    if mode == "softmax":
        if uniform is None:
            uniform = torch.rand(B, dtype=torch.float64, device=device, generator=generator)
        u = uniform.to(torch.float64).contiguous()
    else:
        u = None
    sn = step_noise.reshape(len(sig), B * K, A).contiguous() if step_noise is not None else None
    x = noise if noise.is_contiguous() else noise.contiguous()
    obs = obs if obs.is_contiguous() else obs.contiguous()
    temperature = float(temperature)
    hk = None
    meta = ce.current_meta() if ce is not None else None  # (None: a LayerNorm eps changed since packing)
    if meta is not None:  # a warm call: one lookup, then the launch
        # (ce, the critic's pack whose tensors the plan holds, and its meta are part of the key)
        hk = ("act", obs.shape, K, sampler, steps, solver, path, float(t0), tuple(sig), mode, bool(clip), ce, meta,
              prec(dtype, device) if device.type == "cuda" else 0)
        hot = e.plans.get(hk)
        if hot is not None:
            out = _run_hot(hot, x, obs, sn, u, temperature)[0]
            _check_marked(out, B)
            return out
    if sampler == "flow":
        tkey = _flow_key(steps, solver, t0, 1.0, path, dtype)
        tbuild = _flow_table_fn(net, steps, solver, t0, 1.0, path, dtype, device)
        m, n_evals, scode, nsteps = MODE_ACT_FLOW, 0, SOLVER_CODES[solver], steps
    else:
        args = (sig, _cons.SIGMA_MAX, _cons.SIGMA_MIN, _cons.SIGMA_DATA, dtype)
        tkey = _cons_key(*args)
        tbuild = _cons_table_fn(net, *args, device)
        m, n_evals, scode, nsteps = MODE_ACT_CONSISTENCY, 1 + len(sig), 0, 0
    # The consistency sampler always clamps (as the reference); ``clip`` clamps the candidates.
    out, _ = _run(net, e, critic, ce, tkey, tbuild, x, obs, sn, u, m, K, nsteps,
                  n_evals, scode, temperature, True if sampler == "consistency" else bool(clip),
                  mode == "softmax", False, dtype, device, hot_key=hk)
    _check_marked(out, B)
    return out


def _draw_noise(shape, scale, dtype, device, generator) -> torch.Tensor:
    """A sampler's initial noise N(0, scale^2) (scale None or 1: plain randn) in one op, one launch on a
    GPU: the draws of randn() * scale from the same generator stream, at most 1 ulp apart."""
    if scale is None or scale == 1.0:
        return torch.randn(shape, dtype=dtype, device=device, generator=generator)
    return torch.normal(0.0, scale, shape, dtype=dtype, device=device, generator=generator)


def _check_marked(out, B: int) -> None:
    """act's error for the states the kernel marked with NaN (their candidates scored NaN / inf).

    One reduction and one host read per call (a single device sync on CUDA): the float32 sum of
    the chosen actions is NaN or inf whenever any element is; only then are the marked states
    looked for (a finite sum that overflowed to inf finds none and raises nothing). Skipped during
    CUDA-graph capture / torch.compile tracing (it would sync), as every value check."""
    if _checks._capturing():
        return
    if math.isfinite(out.sum(dtype=torch.float32).item()):
        return
    bad = ~torch.isfinite(out).all(dim=1)
    if bool(bad.any()):
        _checks.nonfinite_q_states(bad.nonzero().flatten().tolist(), B)


# ----------------------------------------------------------------------------------------------
# make_sampler's prepared call
# ----------------------------------------------------------------------------------------------
class Prepared:
    """The fused call of a Sampler for one kind of obs ([B, S], dtype, device), prepared once:
    packed weights, tables and launch plan looked up at construction, so a call is a watch check,
    the noise draw (same generator stream and shapes as policy.sample), two allocations and the
    launch. ``__call__(obs)`` returns the actions ([B, A] for K = 1, else [B, K, A], clamped to
    [-1, 1]) or None when the module changed since (the caller then takes the checked path and
    prepares again); nothing is drawn from the generator in that case.

    Flow: integrates from ``t0`` to 1 (FlowPolicy.t0, e.g. 0.05 on "ot-eps"), the noise drawn as
    N(0, noise_scale^2) (noise_scale: FlowPolicy.start_noise_scale(), sigma(t0)) by one
    ``torch.normal`` from the same generator stream as FlowPolicy.sample's randn() * sigma(t0) (the
    same numbers up to 1 ulp); the time and coefficient tables are those of [t0, 1]."""

    def __init__(self, net, kind: str, num_samples: int, obs: torch.Tensor, steps: int = 10,
                 solver: str = "euler", path: Optional[str] = None, sigmas=None,
                 sigma_max: float = _cons.SIGMA_MAX, sigma_min: float = _cons.SIGMA_MIN,
                 sigma_data: float = _cons.SIGMA_DATA, generator: Optional[torch.Generator] = None,
                 t0: float = 0.0, noise_scale: float = 1.0):
        dtype, device = obs.dtype, obs.device
        B, A, K = obs.shape[0], net.act_dim, num_samples
        self.net, self.generator, self.dtype, self.device = net, generator, dtype, device
        self.shape = (B, A) if K == 1 else (B, K, A)  # the noise (and output) layout
        self.N, self.B, self.A = B * K, B, A
        self.sig = [float(s) for s in (sigmas or ())] if kind == "consistency" else []
        t0, noise_scale = float(t0), float(noise_scale)
        if kind != "flow" and (t0 != 0.0 or noise_scale != 1.0):
            raise ValueError("t0 and noise_scale apply to flow sampling only")
        if not 0.0 <= t0 < 1.0 or not 0.0 < noise_scale < math.inf:
            raise ValueError(f"need 0 <= t0 < 1 and a finite noise_scale > 0, got t0={t0!r}, "
                             f"noise_scale={noise_scale!r}")
        self.noise_scale = noise_scale if noise_scale != 1.0 else None
        if kind == "flow":
            tkey = _flow_key(steps, solver, t0, 1.0, path, dtype)
            tbuild = _flow_table_fn(net, steps, solver, t0, 1.0, path, dtype, device)
            mode, n_evals, scode = MODE_INTEGRATE, 0, SOLVER_CODES[solver]
        else:
            args = (self.sig, sigma_max, sigma_min, sigma_data, dtype)
            tkey, tbuild = _cons_key(*args), _cons_table_fn(net, *args, device)
            mode, n_evals, scode, steps = MODE_CONSISTENCY, 1 + len(self.sig), 0, 0
        e = _entry(net, "policy", dtype, device)
        self.entry = e
        self.tvec, self.coef = cached_table(e, tkey, lambda: tbuild(e.tensors))
        # CLIP: the flow sampler clamps the final state in the kernel (policy.sample's clamp), the
        # consistency sampler clamps each evaluation (as the reference)
        self.plan = make_plan(mode, e.tensors, [], self.N, K, A, steps, n_evals, scode, ACT_CODES[net.activation],
                              len(net.layers), 0, 1, 1, False, 0.0, True, False, False, False, dtype, device)

    def valid(self) -> bool:
        return peek(self.net, self.dtype, self.device) is self.entry

    def __call__(self, obs: torch.Tensor) -> Optional[torch.Tensor]:
        if self.entry.watch.changed():
            return None
        dtype, device, gen = self.dtype, self.device, self.generator
        noise = _draw_noise(self.shape, self.noise_scale, dtype, device, gen)
        sn = _draw_step_noise(self.sig, (self.N, self.A), dtype, device, gen) if self.sig else None
        out = _host.empty(self.shape, dtype, device)
        run_plan(self.plan, noise, obs if obs.is_contiguous() else obs.contiguous(), sn, None, out, None,
                 self.tvec, self.coef, self.N, self.B)
        return out


# supports: the full check (backends.reasons / explain); fast: what dispatch asks on every call
_backends.register("integrate", "triton", integrate, supports_integrate, _fast_integrate)
_backends.register("consistency_sample", "triton", consistency_sample, supports_consistency_sample,
                   _fast_consistency_sample)
_backends.register("ddpm_sample", "triton", ddpm_sample, supports_ddpm_sample, _fast_ddpm_sample)
_backends.register("act", "triton", act, supports_act, _fast_act)
_backends.register("sample", "triton", sample, supports_sample, _fast_sample)
