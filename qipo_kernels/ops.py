"""The functional API: argument checks, then dispatch to one backend.

Every function here takes the arguments of its reference in qipo_kernels.reference plus
``backend`` ("auto" | "torch" | "triton" | "cpp") and returns the same thing. Input is checked
before any kernel runs. ``qipo_kernels.backends.explain(op, device)`` says why a backend is
not used.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from . import _checks as C
from . import backends as _b
from .reference import consistency as _cons
from .reference import ddpm as _ddpm
from .reference import loss as _loss
from .reference import ode as _ode
from .reference import paths as _paths
from .reference import select as _sel
from .reference.consistency import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, consistency_loss, karras_sigmas  # noqa: F401

OPS = _b.OPS  # (the op list lives in backends, which must not import this module)


def _fallback(op: str, backend: str, name: str, err: Exception) -> None:
    """A fast implementation found at run time that it cannot do this call (backends.Fallback): with
    backend="auto" the caller runs the reference (an impl raises Fallback before it draws from the
    generator, so the reference finds the generator as it would have), with a named backend this
    is an error."""
    if backend != "auto":
        raise RuntimeError(f"backend={name!r} cannot run {op} here: {err}") from err


def _run(op: str, backend: str, name: str, fn: Callable, reference: Callable, args: tuple):
    """fn(*args), or the reference's when fn raises backends.Fallback (see _fallback)."""
    try:
        return fn(*args)
    except _b.Fallback as err:
        _fallback(op, backend, name, err)
    return reference(*args)


def flow_path(actions, noise, t, path: str = "ot", backend: str = "auto"):
    """(x_t, target) on a probability path; see reference.paths.flow_path. Shapes [..., D], t [...]."""
    _paths.check_flow_path(actions, noise, t, path)
    _, fn = _b.choose("flow_path", backend, actions.device, _paths._flow_path,
                      actions=actions, noise=noise, t=t, path=path)
    return fn(actions, noise, t, path)


def weighted_fm_loss(pred, target, energy=None, beta: float = 1.0, normalize: str = "support",
                     pair_weight=None, backend: str = "auto"):
    """Energy-weighted flow-matching loss; see reference.loss.weighted_fm_loss. pred/target [B, M, D]."""
    _loss.check_weighted_fm_loss(pred, target, energy, beta, normalize, pair_weight)
    name, fn = _b.choose("weighted_fm_loss", backend, pred.device, _loss._weighted_fm_loss,
                         pred=pred, target=target, energy=energy, normalize=normalize, pair_weight=pair_weight)
    return _run("weighted_fm_loss", backend, name, fn, _loss._weighted_fm_loss,
                (pred, target, energy, float(beta), normalize, pair_weight))


def flow_matching_loss(pred, actions, noise, t, path: str = "ot", energy=None, beta: float = 1.0,
                       normalize: str = "support", pair_weight=None, backend: str = "auto"):
    """Weighted FM loss with the target formed from (actions, noise, t); see reference.loss."""
    _loss.check_flow_matching_loss(pred, actions, noise, t, path, energy, beta, normalize, pair_weight)
    name, fn = _b.choose("flow_matching_loss", backend, pred.device, _loss._flow_matching_loss,
                         pred=pred, actions=actions, noise=noise, t=t, path=path, energy=energy,
                         normalize=normalize, pair_weight=pair_weight)
    return _run("flow_matching_loss", backend, name, fn, _loss._flow_matching_loss,
                (pred, actions, noise, t, path, energy, float(beta), normalize, pair_weight))


def integrate(net: Callable, x0, obs, steps: int = 10, solver: str = "euler", t0: float = 0.0, t1: float = 1.0,
              path: Optional[str] = None, return_trajectory: bool = False, backend: str = "auto"):
    """Fixed-step ODE sampling from noise to actions; see reference.ode.integrate.

    x0 [N, A] with obs [N, S], or x0 [B, K, A] with obs [B, S]; returns x0's shape.
    """
    _ode.check_integrate(net, x0, obs, steps, solver, t0, t1, path)
    name, fn = _b.choose("integrate", backend, x0.device, _ode._integrate, net=net, x0=x0, obs=obs, steps=steps,
                         solver=solver, path=path, return_trajectory=return_trajectory)
    return _run("integrate", backend, name, fn, _ode._integrate, (net, x0, obs, steps, solver, t0, t1, path,
                                                                   return_trajectory))


def sample(net: Callable, obs, num_samples: int, steps: int = 10, solver: str = "euler", path: Optional[str] = None,
           seed: int = 0, return_trajectory: bool = False, backend: str = "auto"):
    """Draw num_samples actions per state from a flow policy, the noise drawn from ``seed``.

    obs [B, S] -> [B, num_samples, act_dim] (and the trajectory [steps + 1, B, num_samples, act_dim],
    the noise first, when asked); see reference.ode.sample. The Triton backend draws the noise
    inside the kernel (never materialised: e.g. QIPO's support renewal, 1e6 states x 64 actions),
    from a different generator than the reference: same distribution, same seed -> same output
    on one backend, but Triton does not match the others number for number. The C++ backend
    draws the reference's noise (reference.ode.sample_noise) and gives the reference's samples.
    """
    _ode.check_sample(net, obs, num_samples, steps, solver, path, seed)
    name, fn = _b.choose("sample", backend, obs.device, _ode._sample, net=net, obs=obs, num_samples=num_samples,
                         steps=steps, solver=solver, path=path, seed=seed, return_trajectory=return_trajectory)
    return _run("sample", backend, name, fn, _ode._sample, (net, obs, num_samples, steps, solver, path, seed,
                                                            return_trajectory))


def consistency_sample(net: Callable, noise, obs, sigmas: Optional[Sequence[float]] = None, step_noise=None,
                       sigma_max: float = SIGMA_MAX, sigma_min: float = SIGMA_MIN, sigma_data: float = SIGMA_DATA,
                       clip: bool = True, generator: Optional[torch.Generator] = None, backend: str = "auto"):
    """One-step / multistep consistency sampling; see reference.consistency.consistency_sample."""
    _cons.check_consistency_sample(net, noise, obs, sigmas, step_noise, sigma_max, sigma_min, sigma_data)
    sig = [float(s) for s in sigmas] if sigmas is not None else None
    name, fn = _b.choose("consistency_sample", backend, noise.device, _cons._consistency_sample, net=net,
                         noise=noise, obs=obs, sigmas=sig, step_noise=step_noise, clip=clip)
    args = (net, noise, obs, sig, step_noise, float(sigma_max), float(sigma_min), float(sigma_data), clip, generator)
    try:  # (_run inlined: one frame less on the one-state real-time path)
        return fn(*args)
    except _b.Fallback as err:
        _fallback("consistency_sample", backend, name, err)
    return _cons._consistency_sample(*args)


def ddpm_sample(net: Callable, noise, obs, schedule="vp", n_timesteps: int = _ddpm.T_DEFAULT, step_noise=None,
                max_action: float = 1.0, predict_epsilon: bool = True, clip_denoised: bool = True, clip: bool = True,
                generator: Optional[torch.Generator] = None, backend: str = "auto"):
    """Diffusion-QL's ancestral DDPM sampler; see reference.ddpm.ddpm_sample.

    noise [N, A] (obs [N, S]) or [B, K, A] (obs [B, S]) -> actions of noise's shape.
    schedule: "vp" | "linear" | "cosine" (with n_timesteps), a reference.ddpm.DDPMSchedule (e.g. read
    from a Diffusion-QL state_dict) or betas [T]; step_noise [T-1, *noise.shape] or drawn from generator.
    """
    sch = _ddpm.as_schedule(schedule, n_timesteps)
    _ddpm.check_ddpm_sample(net, noise, obs, sch, step_noise, max_action, predict_epsilon, clip_denoised, clip)
    name, fn = _b.choose("ddpm_sample", backend, noise.device, _ddpm._ddpm_sample, net=net, noise=noise, obs=obs,
                         schedule=sch, step_noise=step_noise)
    return _run("ddpm_sample", backend, name, fn, _ddpm._ddpm_sample,
                (net, noise, obs, sch, step_noise, float(max_action), predict_epsilon, clip_denoised, clip, generator))


def consistency_denoise(net, x, sigma, obs, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN, clip: bool = True):
    """One consistency-function evaluation (reference only: it is one network call)."""
    return _cons.consistency_denoise(net, x, sigma, obs, sigma_data, sigma_min, clip)


def _select_ref(q_values, candidates, mode, temperature, uniform, generator):
    idx = _sel.select_index(q_values, mode, temperature, uniform, generator)
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), idx]


def select_action(q_values, candidates, mode: str = "argmax", temperature: float = 1.0, uniform=None,
                  generator: Optional[torch.Generator] = None, backend: str = "auto"):
    """Pick one of K candidates per state by Q; q_values [B, K], candidates [B, K, D] -> [B, D]."""
    _sel.check_select_action(q_values, candidates, mode, temperature, uniform)
    name, fn = _b.choose("select_action", backend, q_values.device, _select_ref, q_values=q_values,
                         candidates=candidates, mode=mode)
    return _run("select_action", backend, name, fn, _select_ref,
                (q_values, candidates, mode, float(temperature), uniform, generator))


SAMPLERS = ("flow", "consistency", "ddpm")
# what each sampler's authors select with when none is asked for: QIPO argmax over the candidates,
# CPQL and Diffusion-QL a draw from softmax(Q) (their sample_action)
DEFAULT_MODE = {"flow": "argmax", "consistency": "softmax", "ddpm": "softmax"}


def net_kind(net) -> Optional[str]:
    """What a network was trained as, when it says: "flow", "consistency", "ddpm" or None. Loaders set
    ``net.kind`` (ConditionalMLP.from_cpql_state_dict, make_sampler); a plain ConditionalMLP has None."""
    k = getattr(net, "kind", None)
    return k if k in SAMPLERS else None


def resolve_sampler(net, sampler: Optional[str], mode: Optional[str]):
    """(sampler, mode) for act: sampler None = the network's kind (``flow`` when it does not say);
    mode None = that sampler's authors' selection (DEFAULT_MODE). A sampler that contradicts the kind
    the network was loaded as is refused: it would return wrong actions without a word."""
    kind = net_kind(net)
    if sampler is None:
        sampler = kind or "flow"
    C.choice("sampler", sampler, SAMPLERS)
    if kind is not None and sampler != kind:
        raise ValueError(f"sampler={sampler!r} cannot sample this network: it was loaded as a {kind!r} actor "
                         f"(net.kind); use sampler={kind!r} (or None)")
    if mode is None:
        mode = DEFAULT_MODE[sampler]
    return sampler, mode


class _DDPMArgs(tuple):
    """(schedule, max_action, predict_epsilon, clip_denoised): the ddpm sampler's settings for act."""


def _check_act(net, critic, obs, num_candidates, sampler, steps, solver, path, sigmas, mode, temperature,
               noise, step_noise, uniform, sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN, sigma_data=SIGMA_DATA,
               ddpm=None, t0=0.0):
    if not callable(net):
        raise TypeError(f"net must be callable as net(x, t, obs), got {type(net).__name__}")
    if not (hasattr(critic, "q_min") and callable(critic.q_min)):
        raise TypeError(f"critic must have a q_min(obs, act) method (e.g. a DoubleCritic), got {type(critic).__name__}")
    # (the passing case is attribute reads and comparisons; the checks' functions, which build the
    # messages, run only when a condition fails)
    if obs.__class__ is not torch.Tensor or obs.dtype not in C.FLOAT_DTYPES or obs.dim() != 2:
        C.tensor("obs", obs, ndim=2)
    if num_candidates.__class__ is not int or num_candidates < 1:
        C.positive_int("num_candidates", num_candidates)
    C.choice("sampler", sampler, SAMPLERS)
    C.choice("mode", mode, _sel.SELECT_MODES)
    C.positive_float("temperature", temperature)
    act_dim = getattr(net, "act_dim", None)
    if noise is not None:
        if noise.__class__ is not torch.Tensor or noise.dtype not in C.FLOAT_DTYPES or noise.dim() != 3:
            C.tensor("noise", noise, ndim=3)
        if noise.shape[:2] != (obs.shape[0], num_candidates) or (act_dim is not None and noise.shape[2] != act_dim):
            raise ValueError(f"noise must be [{obs.shape[0]}, {num_candidates}, {act_dim or 'A'}], got {tuple(noise.shape)}")
        if not (obs.is_cpu and noise.is_cpu) and obs.device != noise.device:
            C.same_device(obs=obs, noise=noise)
        if obs.dtype is not noise.dtype:
            C.same_dtype(obs=obs, noise=noise)
    elif act_dim is None:
        raise ValueError("noise must be given when net has no act_dim attribute")
    dt = C.module_dtype(net)
    if dt is not None and obs.dtype is not dt:
        C.module_inputs("net", net, obs=obs)
    dt = C.module_dtype(critic)
    if dt is not None and obs.dtype is not dt:
        C.module_inputs("critic", critic, obs=obs)
    if uniform is not None:
        C.tensor("uniform", uniform, shape=(obs.shape[0],))
        C.unit_interval("uniform", uniform)
    shape = (obs.shape[0], num_candidates, act_dim if act_dim is not None else noise.shape[2])
    if sampler == "flow":
        # (as integrate: e.g. "euler" on path "vp" is refused; t0 a number in [0, 1) below 1 after the
        # path's clipping, the same message as integrate's)
        _ode.check_solver(steps, solver, t0, 1.0, path, caller="act")
    elif isinstance(t0, bool) or not isinstance(t0, (int, float)) or t0 != 0:
        raise ValueError(f"t0 must be 0 for sampler={sampler!r} (a start time applies to sampler='flow' only), "
                         f"got {t0!r}")
    elif sampler == "ddpm":
        sch, max_action, pe, cd = ddpm
        _ddpm.check_ddpm_sample(net, torch.empty(shape, device=obs.device, dtype=obs.dtype), obs, sch, step_noise, max_action, pe, cd,
                                True)
    elif (sigmas is not None or step_noise is not None
          or (sigma_max, sigma_min, sigma_data) != (SIGMA_MAX, SIGMA_MIN, SIGMA_DATA)):
        _cons.check_consistency_sample(net, torch.empty(shape, device=obs.device, dtype=obs.dtype), obs, sigmas,
                                       step_noise, float(sigma_max), float(sigma_min), float(sigma_data))


def _act_ref(net, critic, obs, num_candidates, sampler, steps, solver, path, sigmas, mode, temperature,
             noise, step_noise, uniform, generator, clip, t0=0.0):
    """The reference of act (the plain flow / CPQL-default consistency call); flow integrates from t0."""
    return _act_ext_ref(net, critic, obs, num_candidates, sampler,
                        (steps, solver, path, t0) if sampler == "flow" else (sigmas, SIGMA_MAX, SIGMA_MIN, SIGMA_DATA),
                        mode, temperature, noise, step_noise, uniform, generator, clip)


def _act_ext_ref(net, critic, obs, num_candidates, sampler, sargs, mode, temperature, noise, step_noise, uniform,
                 generator, clip):
    """act's reference for every sampler. sargs: (steps, solver, path, t0) for "flow", (sigmas, sigma_max,
    sigma_min, sigma_data) for "consistency", _DDPMArgs (schedule, max_action, predict_epsilon,
    clip_denoised) for "ddpm". Draw order: noise, the sampler's step noise, the softmax uniform.
    Flow from t0 > 0 starts from the noise scaled by sigma(t0) (reference.ode.start_noise)."""
    B = obs.shape[0]
    if noise is None:
        noise = torch.randn((B, num_candidates, net.act_dim), dtype=obs.dtype, device=obs.device, generator=generator)
    if sampler == "flow":
        steps, solver, path, t0 = sargs
        cand = _ode._integrate(net, _ode.start_noise(noise, t0, path), obs, steps, solver, t0, 1.0, path, False)
    elif sampler == "consistency":
        sigmas, smax, smin, sdata = sargs
        cand = _cons._consistency_sample(net, noise, obs, sigmas, step_noise, smax, smin, sdata, True, generator)
    else:
        sch, max_action, pe, cd = sargs
        # clip: the official final clamp to the action bound (not to [-1, 1])
        cand = _ddpm._ddpm_sample(net, noise, obs, sch, step_noise, max_action, pe, cd, clip, generator)
    if clip and sampler != "ddpm":
        cand = cand.clamp(-1.0, 1.0)
    A = cand.shape[-1]
    q = critic.q_min(obs.repeat_interleave(num_candidates, dim=0), cand.reshape(B * num_candidates, A))
    q = q.reshape(B, num_candidates)
    C.candidate_q(q)
    return _select_ref(q, cand, mode, temperature, uniform, generator)


def act(net: Callable, critic, obs, num_candidates: int = 50, sampler: Optional[str] = None, steps: int = 10,
        solver: str = "euler", path: Optional[str] = None, sigmas: Optional[Sequence[float]] = None,
        mode: Optional[str] = None, temperature: float = 1.0, noise=None, step_noise=None, uniform=None,
        generator: Optional[torch.Generator] = None, clip: bool = True, backend: str = "auto", *,
        sigma_max: float = SIGMA_MAX, sigma_min: float = SIGMA_MIN, sigma_data: float = SIGMA_DATA,
        schedule=None, n_timesteps: int = _ddpm.T_DEFAULT, max_action: float = 1.0, predict_epsilon: bool = True,
        clip_denoised: bool = True, t0: float = 0.0):
    """Sample K candidates per state, score them by min(Q1, Q2), pick one: B states in, B actions out.

    Args:
        net: the policy network (a ConditionalMLP for the fused backends).
        critic: a DoubleCritic (anything with q_min(obs [N, S], act [N, A]) -> [N] for the reference).
        obs: [B, S].
        num_candidates: K (Diffusion-QL / CPQL evaluate 50).
        sampler: "flow" (integrate with steps/solver/path), "consistency" (sigmas: None = one step;
            sigma_max / sigma_min / sigma_data) or "ddpm" (reference.ddpm: schedule (None = the one
            ``net.ddpm_schedule`` carries, else "vp"), n_timesteps, max_action, predict_epsilon,
            clip_denoised). None = what the network was loaded as (``net.kind``; "flow" when unknown).
            A sampler other than ``net.kind`` raises.
        mode: None = the sampler's authors' choice: "argmax" for flow (QIPO), "softmax" (a draw from
            softmax(Q / temperature)) for consistency (CPQL) and ddpm (Diffusion-QL). See select_action.
        temperature, uniform: see select_action.
        noise: optional initial noise [B, K, A]; step_noise: consistency re-noise [len(sigmas), B, K, A]
            or ddpm step noise [n_timesteps - 1, B, K, A].
        clip: clamp candidates to [-1, 1] before scoring (ddpm: to [-max_action, max_action], its final clamp).
        t0: flow only: integrate from t0 (0 <= t0 < 1, checked as integrate checks it) to 1, starting
            from the noise (given or drawn, N(0, I)) scaled by sigma(t0), the path's noise level there
            (reference.ode.start_noise; path None = "ot": 1 - t0). FlowPolicy.act passes its t0 (0.05
            on "ot-eps"). Another sampler with t0 != 0 is a ValueError.
    Returns: [B, A] actions.
    Raises ValueError (every backend) when the critic scores a candidate NaN or inf: such a
    score cannot be ranked, and act never picks a candidate silently. (The Triton kernel marks such
    states with NaN actions; finding them costs one reduction and one host read per call, a single
    device sync on CUDA, skipped while a CUDA graph is captured or torch.compile traces.)
    """
    sampler, mode = resolve_sampler(net, sampler, mode)
    ddpm = None
    if sampler == "ddpm":
        if schedule is None:
            schedule = getattr(net, "ddpm_schedule", None) or "vp"
        ddpm = _DDPMArgs((_ddpm.as_schedule(schedule, n_timesteps), float(C.positive_float("max_action", max_action)),
                          predict_epsilon, clip_denoised))
    _check_act(net, critic, obs, num_candidates, sampler, steps, solver, path, sigmas, mode, temperature,
               noise, step_noise, uniform, sigma_max, sigma_min, sigma_data, ddpm, t0)
    sig = [float(s) for s in sigmas] if sigmas is not None else None
    plain = sampler == "flow" or (float(sigma_max), float(sigma_min), float(sigma_data)) == (SIGMA_MAX, SIGMA_MIN,
                                                                                            SIGMA_DATA)
    if sampler != "ddpm" and plain:
        name, fn = _b.choose("act", backend, obs.device, _act_ref, net=net, critic=critic, obs=obs,
                             num_candidates=num_candidates, sampler=sampler, steps=steps, solver=solver, path=path,
                             sigmas=sig, mode=mode, noise=noise)
        return _run("act", backend, name, fn, _act_ref, (net, critic, obs, num_candidates, sampler, steps, solver,
                                                       path, sig, mode, float(temperature), noise, step_noise,
                                                       uniform, generator, clip, float(t0)))
    # a DDPM actor, or consistency sigmas other than CPQL's defaults: the "act_ext" implementations
    sargs = ddpm if sampler == "ddpm" else (sig, float(sigma_max), float(sigma_min), float(sigma_data))
    name, fn = _b.choose("act_ext", backend, obs.device, _act_ext_ref, net=net, critic=critic, obs=obs,
                         num_candidates=num_candidates, sampler=sampler, sargs=sargs, mode=mode, noise=noise,
                         step_noise=step_noise)
    return _run("act_ext", backend, name, fn, _act_ext_ref, (net, critic, obs, num_candidates, sampler, sargs, mode,
                                                           float(temperature), noise, step_noise, uniform,
                                                           generator, clip))


