"""Policies: thin objects over a ConditionalMLP (``.net``) and the functional ops.

    FlowPolicy(obs_dim, act_dim, path="ot" | "ot-eps" | "vp")
        .loss(obs [B, S], actions [B, A] or [B, M, A], energy=None or [B, M], beta=3.0) -> scalar
        .sample(obs [B, S], num_samples=K) -> [B, K, A] in [-1, 1]
        .act(obs [B, S], critic, num_candidates=50) -> [B, A]
    ConsistencyPolicy(obs_dim, act_dim)
        .loss(obs [B, S], actions [B, A]) -> scalar   (CPQL's Karras-weighted reconstruction loss)
        .sample(obs [B, S], num_samples=K, sigmas=None) -> [B, K, A]
        .act(obs [B, S], critic, num_candidates=50) -> [B, A]

Both keep the network in ``.net`` (a ConditionalMLP), so ``backend="auto"`` routes sampling to the
fused backends (Triton on CUDA, the C++ extension on CPU) whenever they are available here, and
to the plain-PyTorch reference otherwise. FlowPolicy.sample / .act and ConsistencyPolicy.act are
inference: they run under torch.no_grad() (fused backends, results that do not require grad)
even outside a no_grad block; ``FlowPolicy.sample(..., grad=True)`` differentiates through the
sampler. ConsistencyPolicy.sample is differentiable while autograd records (CPQL's Q loss): then
it always uses the reference, so the sample is never silently cut from the graph.

``make_sampler`` turns an existing actor (ours or a CPQL / Diffusion-QL ``MLP`` state_dict) into a
fast callable obs -> actions in one call.

Time convention: noise at t = 0, data at t = 1 (flows); noise level sigma (consistency).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.nn as nn

from . import _checks as C
from . import ops
from .nets import ConditionalMLP
from .reference.consistency import NUM_SCALES, RHO, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN
from .reference.loss import dequantize_bounds
from .reference.ode import NOISE_SOLVERS, SOLVERS, VELOCITY_SOLVERS, start_noise, start_noise_scale
from .reference.paths import PATHS, VP_EPS
from .reference.select import SELECT_MODES

__all__ = ["FlowPolicy", "ConsistencyPolicy", "DDPMPolicy", "make_sampler", "Sampler", "OT_EPS_SAMPLE_T0"]

# Where sampling starts on the "ot-eps" path (see FlowPolicy): the noise end t = 0 is singular there.
OT_EPS_SAMPLE_T0 = 0.05


def _check_obs(obs, obs_dim: int, name: str = "obs") -> torch.Tensor:
    C.tensor(name, obs, ndim=2)
    if obs.shape[1] != obs_dim:
        raise ValueError(f"{name} must be [B, {obs_dim}], got {tuple(obs.shape)}")
    if obs.shape[0] == 0:
        raise ValueError(f"{name} must have at least one row, got {tuple(obs.shape)}")
    return obs


def _param_like(module: nn.Module, obs: torch.Tensor) -> None:
    p = C.first_param(module)   # (located once per module, not a walk of module.parameters() per call)
    if p is None:
        raise TypeError(f"the policy network {type(module).__name__} has no floating-point parameters")
    if obs.device != p.device:
        raise ValueError(f"obs is on {obs.device} but the policy is on {p.device}")
    if obs.dtype != p.dtype:
        raise TypeError(f"obs has dtype {obs.dtype} but the policy's parameters are {p.dtype}")


def _needs_grad(module: nn.Module) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())


def _backend_for(module: nn.Module, backend: str) -> str:
    """The fused samplers are inference-only: keep the reference when a gradient is wanted."""
    if backend == "auto" and _needs_grad(module):
        return "torch"
    return backend


def _elementwise_backend(op: str, backend: str, like: torch.Tensor) -> str:
    """A named backend that has no implementation of an elementwise op (e.g. cpp has no flow_path)
    runs that op on the reference, so the rest of the call (the loss kernel) still runs on it;
    a backend that cannot run on this device at all is left to raise in the ops that follow."""
    if backend in ("auto", "torch"):
        return backend
    from . import backends as B

    if B.backend_reasons(backend, like.device):
        return backend
    return "torch" if (op, backend) not in B._REG else backend


def _initial_noise(policy, obs, num_samples, noise, generator) -> torch.Tensor:
    """Check obs (and the given noise) against the policy; draw noise [B, num_samples, A] when None."""
    _check_obs(obs, policy.obs_dim)
    C.positive_int("num_samples", num_samples)
    _param_like(policy.net, obs)
    shape = (obs.shape[0], num_samples, policy.act_dim)
    if noise is None:
        return torch.randn(shape, dtype=obs.dtype, device=obs.device, generator=generator)
    return C.tensor("noise", noise, shape=shape)


# Actions live in [-1, 1] (datasets are rescaled from the env's Box bounds); FlowPolicy.loss accepts
# |a| <= 1 + ACTION_TOL, the slack for float32 rounding of that rescaling (a bound mapped to
# 1.0000001) and for data clipped a little outside the box. Anything further out is not this
# package's action scale (a dataset that was not rescaled, raw env units) and is refused.
ACTION_TOL = 1e-3


def _check_loss_ranges(actions: torch.Tensor, t: torch.Tensor) -> None:
    """FlowPolicy.loss' data: |actions| <= 1 + ACTION_TOL and t in [0, 1], NaN refused (one host sync;
    skipped during CUDA-graph capture / compilation)."""
    if C._capturing():
        return
    a_bad = ~(actions.abs() <= 1.0 + ACTION_TOL)
    t_bad = ~((t >= 0) & (t <= 1))
    a_any, t_any = torch.stack([a_bad.any(), t_bad.any()]).tolist()
    if a_any:
        v = float(actions[a_bad][0])
        raise ValueError(f"actions must lie in [-1, 1] (|a| <= 1 + {ACTION_TOL:g}; rescale the dataset's actions "
                         f"from the env's bounds), got {int(a_bad.sum())} value(s) outside, e.g. {v!r}")
    if t_any:
        v = float(t[t_bad][0])
        raise ValueError(f"t must lie in [0, 1] (noise at 0, data at 1), got {int(t_bad.sum())} value(s) outside, "
                         f"e.g. {v!r}")


class FlowPolicy(nn.Module):
    """Flow-matching (QIPO-OT) or diffusion (QIPO-Diff) policy.

    Args:
        obs_dim, act_dim: S and A.
        hidden, depth, activation, time_embedding, t_dim: the ConditionalMLP (``.net``).
            ``time_embedding="fourier"`` (QGPO/QIPO's Gaussian Fourier features) by default.
        path: "ot" (velocity target a - z, Euler sampling), "ot-eps" (noise target on the OT path,
            QIPO-OT's official parameterisation) or "vp" (linear VP, noise target, QIPO-Diff).
        steps: default number of sampling steps.
        solver: default solver; None = "euler" for "ot", "dpm2" (DPM-Solver++(2S)) for noise paths.
        t0: time at which sampling starts from noise scaled by sigma(t0) (the path's noise level there;
            plain N(0, I) at t0 = 0). None = ``OT_EPS_SAMPLE_T0`` (0.05) on "ot-eps", 0 on "ot" and "vp".

    Why "ot-eps" starts at 0.05: a noise-predicting network's action estimate is (x - sigma eps) / alpha,
    and on the OT path alpha(t) = t, so near t = 0 every error of the network is multiplied by ~1/t.
    From t0 = 1e-3 (the solver's clip) the first of 8 uniform steps (to t = 0.126) multiplies it by
    ~126 (|a| reached 10-170 before the final clip, most samples saturated, the mean of 64 samples
    explained R^2 = 0.25 of the data actions after 1,000 steps on HalfCheetah against 0.50 from 0.05;
    bench/results/qipo_bc_diagnosis.md). From 0.05 the first step's alpha ratio (0.169 / 0.05 = 3.4)
    is that of the VP path's first step (0.0066 -> 0.021, QGPO / QIPO-Diff), and the start
    distribution N(0, 0.95^2 I) differs from the true one only by the 0.05 a shift.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, depth: int = 3, activation: str = "mish",
                 time_embedding: str = "fourier", t_dim: Optional[int] = None, path: str = "ot", steps: int = 10,
                 solver: Optional[str] = None, t0: Optional[float] = None):
        super().__init__()
        C.choice("path", path, PATHS)
        C.positive_int("steps", steps)
        if t0 is None:
            t0 = OT_EPS_SAMPLE_T0 if path == "ot-eps" else 0.0
        if isinstance(t0, bool) or not isinstance(t0, (int, float)) or not 0.0 <= float(t0) < 0.5:
            raise ValueError(f"t0 must be a float in [0, 0.5), got {t0!r}")
        self.t0 = float(t0)
        if solver is not None:
            C.choice("solver", solver, NOISE_SOLVERS if path != "ot" else VELOCITY_SOLVERS)
        self.net = ConditionalMLP(act_dim, obs_dim, hidden=hidden, depth=depth, activation=activation,
                                  time_embedding=time_embedding, t_dim=t_dim)
        self.obs_dim, self.act_dim, self.path = obs_dim, act_dim, path
        self.steps = steps
        self.solver = solver if solver is not None else ("euler" if path == "ot" else "dpm2")

    def config(self):
        """Constructor arguments (for checkpoints)."""
        c = self.net.config()
        return dict(obs_dim=self.obs_dim, act_dim=self.act_dim, hidden=c["hidden"], depth=c["depth"],
                    activation=c["activation"], time_embedding=c["time_embedding"], t_dim=c["t_dim"],
                    path=self.path, steps=self.steps, solver=self.solver, t0=self.t0)

    def start_noise_scale(self) -> float:
        """sigma(t0): the initial noise N(0, I) is scaled by this (1 when t0 = 0)."""
        return start_noise_scale(self.t0, self.path)

    # ---- training -------------------------------------------------------------------------
    def loss(self, obs: torch.Tensor, actions: torch.Tensor, energy: Optional[torch.Tensor] = None,
             beta: float = 3.0, normalize: str = "support", generator: Optional[torch.Generator] = None,
             t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
             pair_weight: Optional[torch.Tensor] = None, backend: str = "auto", bound_dequant: float = 0.0,
             dequant_noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(Energy-weighted) flow-matching loss.

        Args:
            obs: [B, S].
            actions: [B, A] (one action per state) or [B, M, A] (M support actions per state), in
                [-1, 1]: |a| > 1 + ACTION_TOL (1e-3) or NaN is a ValueError.
            energy: None (plain flow matching) or Q values [B, M] (higher = better), weights
                softmax(beta * energy) over each state's support ("support") or over the batch ("batch").
            beta: inverse temperature > 0 (QIPO: 3.0).
            generator: for t ~ U(0, 1) ("ot", "ot-eps") or U(0, 1 - 1e-3) ("vp") and z ~ N(0, I).
            t, noise: optional fixed draws, [B, M] (in [0, 1], else a ValueError) and [B, M, A].
            bound_dequant: sigma >= 0 of ``reference.dequantize_bounds``: target coordinates at the bound
                (|a| = 1, where the env clips) become sign(a) (1 + sigma |z|) after the range check, so the
                model learns to put the data's at-bound mass beyond it (the sampler clamps it back); 0 (the
                default, the papers): the actions as given. dequant_noise: optional fixed z [B, M, A] for it
                (else drawn from ``generator`` after t and noise).
        Returns: scalar loss.
        """
        _check_obs(obs, self.obs_dim)
        C.tensor("actions", actions)
        if actions.dim() == 2:
            actions = actions.unsqueeze(1)
        if actions.dim() != 3 or actions.shape[0] != obs.shape[0] or actions.shape[2] != self.act_dim:
            raise ValueError(f"actions must be [{obs.shape[0]}, {self.act_dim}] or [{obs.shape[0]}, M, {self.act_dim}], "
                             f"got {tuple(actions.shape)}")
        C.same_device(obs=obs, actions=actions)
        _param_like(self.net, obs)
        C.same_dtype(obs=obs, actions=actions)
        B, M, A = actions.shape
        if energy is not None:
            C.tensor("energy", energy, shape=(B, M))
            C.finite("energy", energy)
            C.same_device(obs=obs, energy=energy)
        C.positive_float("beta", beta)
        bound_dequant = C.positive_float("bound_dequant", bound_dequant, allow_zero=True)
        if dequant_noise is not None:
            C.tensor("dequant_noise", dequant_noise, shape=(B, M, A))
            C.same_device(obs=obs, dequant_noise=dequant_noise)
        if t is None:
            hi = 1.0 - VP_EPS if self.path == "vp" else 1.0
            t = torch.rand((B, M), dtype=obs.dtype, device=obs.device, generator=generator) * hi
        else:
            C.tensor("t", t, shape=(B, M))
            C.same_device(obs=obs, t=t)
        _check_loss_ranges(actions, t)
        if noise is None:
            noise = torch.randn((B, M, A), dtype=obs.dtype, device=obs.device, generator=generator)
        else:
            C.tensor("noise", noise, shape=(B, M, A))
        if bound_dequant > 0.0:  # after t and noise: their draws from generator are the same either way
            actions = dequantize_bounds(actions, bound_dequant, dequant_noise, generator)
        x_t, _ = ops.flow_path(actions, noise, t, self.path, backend=_elementwise_backend("flow_path", backend, obs))
        pred = self.net(x_t.reshape(B * M, A), t.reshape(B * M), obs.repeat_interleave(M, dim=0)).reshape(B, M, A)
        return ops.flow_matching_loss(pred, actions, noise, t, self.path, energy=energy, beta=beta,
                                      normalize=normalize, pair_weight=pair_weight, backend=backend)

    # ---- sampling -------------------------------------------------------------------------
    def _solver(self, solver: Optional[str]) -> str:
        solver = self.solver if solver is None else solver
        C.choice("solver", solver, SOLVERS)
        if (self.path == "ot") != (solver in VELOCITY_SOLVERS):
            want = VELOCITY_SOLVERS if self.path == "ot" else NOISE_SOLVERS
            raise ValueError(f"solver must be one of {want} for path {self.path!r}, got {solver!r}")
        return solver

    def sample(self, obs: torch.Tensor, num_samples: int = 1, steps: Optional[int] = None,
               solver: Optional[str] = None, noise: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None, clip: bool = True, backend: str = "auto",
               grad: bool = False, noise_scale: float = 1.0) -> torch.Tensor:
        """Draw num_samples actions per state: obs [B, S] -> [B, num_samples, A] (clamped to [-1, 1]).

        noise: optional initial noise [B, num_samples, A]; steps / solver default to the policy's.
        noise_scale: multiplies the standard-normal initial noise (before the path's sigma(t0)): 1 samples
        the learned distribution (QIPO's evaluation), below 1 samples nearer its mode, 0 is the
        deterministic ODE from the origin (the same action for a state on every call). Not in the QIPO
        paper: bench/results/qipo_noise_scale.md measures what it does on the locomotion datasets.
        Sampling is inference: it runs under torch.no_grad() (the fused backends take it, the
        result does not require grad) whether or not the caller is in no_grad. grad=True asks for
        gradients through the sampler instead: then, while autograd records, backend="auto" runs
        the reference and the result carries the graph of every solver step.
        """
        C.boolean("grad", grad)
        noise_scale = C.positive_float("noise_scale", noise_scale, allow_zero=True)
        steps = self.steps if steps is None else C.positive_int("steps", steps)
        solver = self._solver(solver)
        noise = _initial_noise(self, obs, num_samples, noise, generator)
        if noise_scale != 1.0:
            noise = noise * noise_scale
        noise = start_noise(noise, self.t0, self.path)
        path = None if self.path == "ot" else self.path
        if grad:
            out = ops.integrate(self.net, noise, obs, steps=steps, solver=solver, t0=self.t0, path=path,
                                backend=_backend_for(self.net, backend))
        else:
            with torch.no_grad():
                out = ops.integrate(self.net, noise, obs, steps=steps, solver=solver, t0=self.t0, path=path,
                                    backend=backend)
        return out.clamp(-1.0, 1.0) if clip else out

    def act(self, obs: torch.Tensor, critic, num_candidates: int = 50, select: str = "argmax",
            temperature: float = 1.0, steps: Optional[int] = None, solver: Optional[str] = None,
            noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
            backend: str = "auto", noise_scale: float = 1.0) -> torch.Tensor:
        """Sample num_candidates actions per state, score them by critic.q_min, pick one: [B, S] -> [B, A].
        noise_scale: as in sample (the candidates' initial noise is multiplied by it)."""
        _check_obs(obs, self.obs_dim)
        C.choice("select", select, SELECT_MODES)
        noise_scale = C.positive_float("noise_scale", noise_scale, allow_zero=True)
        steps = self.steps if steps is None else C.positive_int("steps", steps)
        solver = self._solver(solver)
        _param_like(self.net, obs)
        if noise_scale != 1.0:  # draw the candidates' noise here (act would draw the same N(0, I)), scaled
            noise = _initial_noise(self, obs, C.positive_int("num_candidates", num_candidates), noise, generator)
            noise = noise * noise_scale
        # one fused call from t0 (0.05 on "ot-eps"): the noise scaled by sigma(t0), as sample scales it
        with torch.no_grad():
            return ops.act(self.net, critic, obs, num_candidates=num_candidates, sampler="flow", steps=steps,
                           solver=solver, path=None if self.path == "ot" else self.path, mode=select,
                           temperature=temperature, noise=noise, generator=generator, backend=backend, t0=self.t0)


class ConsistencyPolicy(nn.Module):
    """CPQL's consistency policy f(x, sigma | s) with the Karras boundary parameterisation.

    The network defaults are CPQL's (and Diffusion-QL's): hidden 256, depth 3, Mish, sinusoidal
    time embedding of width 16.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, depth: int = 3, activation: str = "mish",
                 time_embedding: str = "sinusoidal", t_dim: Optional[int] = None, sigma_data: float = SIGMA_DATA,
                 sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, num_scales: int = NUM_SCALES,
                 rho: float = RHO):
        super().__init__()
        self.net = ConditionalMLP(act_dim, obs_dim, hidden=hidden, depth=depth, activation=activation,
                                  time_embedding=time_embedding, t_dim=t_dim)
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.sigma_data = C.positive_float("sigma_data", sigma_data)
        self.sigma_min = C.positive_float("sigma_min", sigma_min)
        self.sigma_max = C.positive_float("sigma_max", sigma_max)
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"need sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        self.num_scales = C.positive_int("num_scales", num_scales, minimum=2)
        self.rho = C.positive_float("rho", rho)

    def config(self):
        c = self.net.config()
        return dict(obs_dim=self.obs_dim, act_dim=self.act_dim, hidden=c["hidden"], depth=c["depth"],
                    activation=c["activation"], time_embedding=c["time_embedding"], t_dim=c["t_dim"],
                    sigma_data=self.sigma_data, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                    num_scales=self.num_scales, rho=self.rho)

    def loss(self, obs: torch.Tensor, actions: torch.Tensor, generator: Optional[torch.Generator] = None,
             sigma_idx: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
             reduction: str = "mean") -> torch.Tensor:
        """Karras-weighted reconstruction loss: obs [B, S], actions [B, A] -> scalar (or [B] with reduction="none")."""
        _check_obs(obs, self.obs_dim)
        C.tensor("actions", actions, ndim=2)
        if actions.shape != (obs.shape[0], self.act_dim):
            raise ValueError(f"actions must be [{obs.shape[0]}, {self.act_dim}], got {tuple(actions.shape)}")
        _param_like(self.net, obs)
        return ops.consistency_loss(self.net, actions, obs, sigma_idx=sigma_idx, noise=noise,
                                    num_scales=self.num_scales, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                                    rho=self.rho, sigma_data=self.sigma_data, generator=generator,
                                    reduction=reduction)

    def sample(self, obs: torch.Tensor, num_samples: int = 1, sigmas: Optional[Sequence[float]] = None,
               noise: Optional[torch.Tensor] = None, step_noise: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None, backend: str = "auto") -> torch.Tensor:
        """One-step (sigmas=None) or multistep consistency sampling: obs [B, S] -> [B, num_samples, A].

        Differentiable w.r.t. the network when autograd is recording (the reference runs then).
        """
        noise = _initial_noise(self, obs, num_samples, noise, generator)
        return ops.consistency_sample(self.net, noise, obs, sigmas=sigmas, step_noise=step_noise,
                                      sigma_max=self.sigma_max, sigma_min=self.sigma_min, sigma_data=self.sigma_data,
                                      generator=generator, backend=_backend_for(self.net, backend))

    def act(self, obs: torch.Tensor, critic, num_candidates: int = 50, select: str = "softmax",
            temperature: float = 1.0, sigmas: Optional[Sequence[float]] = None, noise: Optional[torch.Tensor] = None,
            generator: Optional[torch.Generator] = None, backend: str = "auto") -> torch.Tensor:
        """CPQL / Diffusion-QL evaluation: num_candidates samples per state, one drawn by softmax(min Q)."""
        _check_obs(obs, self.obs_dim)
        C.choice("select", select, SELECT_MODES)
        _param_like(self.net, obs)
        if (self.sigma_min, self.sigma_max, self.sigma_data) != (SIGMA_MIN, SIGMA_MAX, SIGMA_DATA) and obs.is_cuda:
            # act with other sigma parameters has no Triton kernel (act_ext): sample with the fused
            # sampler, then score and select, in two calls
            with torch.no_grad():
                cand = self.sample(obs, num_candidates, sigmas=sigmas, noise=noise, generator=generator, backend=backend)
                q = critic.q_min(obs.repeat_interleave(num_candidates, 0), cand.reshape(-1, self.act_dim))
                return ops.select_action(q.reshape(obs.shape[0], num_candidates), cand, mode=select,
                                         temperature=temperature, generator=generator, backend=backend)
        with torch.no_grad():  # (on the CPU, other sigma parameters run in one C++ call: act_ext)
            return ops.act(self.net, critic, obs, num_candidates=num_candidates, sampler="consistency",
                           sigmas=sigmas, mode=select, temperature=temperature, noise=noise, generator=generator,
                           backend=backend, sigma_max=self.sigma_max, sigma_min=self.sigma_min,
                           sigma_data=self.sigma_data)


class DDPMPolicy(nn.Module):
    """Diffusion-QL's discrete-time DDPM policy (reference.ddpm) over a ConditionalMLP (``.net``).

    Args:
        obs_dim, act_dim, hidden, depth, activation, time_embedding, t_dim: the network (Diffusion-QL's
            defaults: 3 x 256 Mish, sinusoidal time embedding of width 16).
        schedule: "vp" (Diffusion-QL), "linear" or "cosine" with n_timesteps (5), a DDPMSchedule (e.g.
            read from their state_dict) or betas [T].
        max_action: the action bound (Diffusion-QL: the env's action_space.high[0]); predict_epsilon,
            clip_denoised: as their Diffusion module.

    Sampling only (training a DDPM actor is Diffusion-QL's own code): .sample(obs [B, S], K) -> [B, K, A],
    .act(obs, critic, num_candidates=50) -> [B, A] (softmax(Q) draw, as their sample_action).
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, depth: int = 3, activation: str = "mish",
                 time_embedding: str = "sinusoidal", t_dim: Optional[int] = None, schedule="vp",
                 n_timesteps: int = 5, max_action: float = 1.0, predict_epsilon: bool = True,
                 clip_denoised: bool = True):
        super().__init__()
        from .reference import ddpm as _ddpm

        self.net = ConditionalMLP(act_dim, obs_dim, hidden=hidden, depth=depth, activation=activation,
                                  time_embedding=time_embedding, t_dim=t_dim)
        self.net.kind = "ddpm"
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.schedule = _ddpm.as_schedule(schedule, n_timesteps)
        self.max_action = C.positive_float("max_action", max_action)
        for name, v in (("predict_epsilon", predict_epsilon), ("clip_denoised", clip_denoised)):
            C.boolean(name, v)
        self.predict_epsilon, self.clip_denoised = predict_epsilon, clip_denoised

    def _ddpm_kw(self):
        return dict(schedule=self.schedule, max_action=self.max_action, predict_epsilon=self.predict_epsilon,
                    clip_denoised=self.clip_denoised)

    def sample(self, obs: torch.Tensor, num_samples: int = 1, noise: Optional[torch.Tensor] = None,
               step_noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
               backend: str = "auto") -> torch.Tensor:
        """obs [B, S] -> [B, num_samples, A] in [-max_action, max_action]."""
        noise = _initial_noise(self, obs, num_samples, noise, generator)
        return ops.ddpm_sample(self.net, noise, obs, step_noise=step_noise, generator=generator,
                               backend=_backend_for(self.net, backend), **self._ddpm_kw())

    def act(self, obs: torch.Tensor, critic, num_candidates: int = 50, select: str = "softmax",
            temperature: float = 1.0, noise: Optional[torch.Tensor] = None,
            generator: Optional[torch.Generator] = None, backend: str = "auto") -> torch.Tensor:
        """Diffusion-QL evaluation: num_candidates samples per state, one drawn by softmax(min Q)."""
        _check_obs(obs, self.obs_dim)
        C.choice("select", select, SELECT_MODES)
        _param_like(self.net, obs)
        with torch.no_grad():
            return ops.act(self.net, critic, obs, num_candidates=num_candidates, sampler="ddpm", mode=select,
                           temperature=temperature, noise=noise, generator=generator, backend=backend,
                           **self._ddpm_kw())


# ---- drop-in sampler -------------------------------------------------------------------------

class Sampler:
    """A fast, gradient-free obs -> actions callable (see ``make_sampler``).

    __call__(obs [B, S] or [S]) -> [B, A] (or [A]) when num_samples == 1, else [B, K, A].
    ``.act(obs, critic)`` -> [B, A] (or [A]): K candidates scored by the critic, one picked, with the
    defaults of the actor's authors (QIPO: argmax; CPQL / Diffusion-QL: a softmax(Q) draw of 50).
    Observations pass through ``obs_normalizer`` first; actions come out as ``a * action_scale +
    action_bias`` (identity unless given). ``.net`` is the ConditionalMLP it runs; ``.kind`` its sampler;
    ``.backend_used(obs)`` names the backend chosen for obs.
    """

    def __init__(self, policy: nn.Module, kind: str, num_samples: int, steps: int, solver: Optional[str],
                 sigmas: Optional[Sequence[float]], backend: str, generator: Optional[torch.Generator],
                 obs_normalizer=None, action_scale=None, action_bias=None, cuda_graph: bool = False):
        self.policy, self.kind, self.num_samples = policy, kind, num_samples
        self.steps, self.solver, self.sigmas, self.backend, self.generator = steps, solver, sigmas, backend, generator
        self.cuda_graph = cuda_graph
        self.net = policy.net
        self.obs_normalizer = obs_normalizer
        self.action_scale, self.action_bias = action_scale, action_bias
        self._affine_cache = None
        # Real-time path: once a call of some (obs shape, dtype, device) has been dispatched to the C++
        # backend, later calls with the same kind of obs go straight to its impl, skipping the ops-layer
        # checks and backend choice (~10 us of a ~25 us single-state call). The impl still checks the
        # module's packed weights on every call (re-packs after a change, raises cpp.Unsupported when
        # it can no longer run it, which drops the plan and takes the checked path again).
        # On the Triton backend the plan is a triton.sampler.Prepared call (weights, tables and launch
        # configuration looked up once; a call checks the pack's watch, draws the noise and launches)
        # or, with cuda_graph=True, a _GraphCall replaying that call captured in a CUDA graph.
        self._plan = None

    _OP = {"flow": "integrate", "consistency": "consistency_sample", "ddpm": "ddpm_sample"}

    @torch.no_grad()
    def backend_used(self, obs: torch.Tensor) -> str:
        """The backend ``self(obs)`` runs on (under no_grad, as ``__call__``)."""
        from . import backends as B

        noise = torch.empty((obs.shape[0], self.num_samples, self.policy.act_dim), dtype=obs.dtype, device=obs.device)
        if self.kind == "flow":
            name, _ = B.choose("integrate", self.backend, obs.device, None, net=self.net, x0=noise, obs=obs,
                               steps=self.steps, solver=self.policy._solver(self.solver),
                               path=None if self.policy.path == "ot" else self.policy.path, return_trajectory=False)
        elif self.kind == "ddpm":
            name, _ = B.choose("ddpm_sample", self.backend, obs.device, None, net=self.net, noise=noise, obs=obs,
                               schedule=self.policy.schedule, step_noise=None)
        else:
            name, _ = B.choose("consistency_sample", self.backend, obs.device, None, net=self.net, noise=noise, obs=obs,
                               sigmas=self.sigmas, step_noise=None, clip=True)
        return name

    def _affine(self, out: torch.Tensor) -> torch.Tensor:
        if self.action_scale is None and self.action_bias is None:
            return out
        c = self._affine_cache
        if c is None or c[0] != (out.dtype, out.device):
            A = self.policy.act_dim
            sc = torch.as_tensor(1.0 if self.action_scale is None else self.action_scale, dtype=out.dtype,
                                 device=out.device).expand(A).clone()
            bi = torch.as_tensor(0.0 if self.action_bias is None else self.action_bias, dtype=out.dtype,
                                 device=out.device).expand(A).clone()
            c = self._affine_cache = ((out.dtype, out.device), sc, bi)
        return out * c[1] + c[2]

    def _obs(self, obs):
        if not torch.is_tensor(obs):
            raise TypeError(f"obs must be a torch.Tensor, got {type(obs).__name__}")
        single = obs.dim() == 1
        if single:
            obs = obs.unsqueeze(0)
        if self.obs_normalizer is not None:
            obs = self.obs_normalizer(obs)
        return obs, single

    def __call__(self, obs: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # (a no_grad decorator would cost every real-time call ~3 us)
            with torch.no_grad():
                return self._call(obs)
        return self._call(obs)

    def _call(self, obs: torch.Tensor) -> torch.Tensor:
        obs, single = self._obs(obs)
        out = self._affine(self._sample(obs))
        return out[0] if single else out

    def _sample(self, obs: torch.Tensor) -> torch.Tensor:
        plan = self._plan
        noise = None
        if plan is not None and plan[0] == (obs.shape, obs.dtype, obs.device) and plan[2] is None:
            out = plan[1](obs)  # the Triton prepared call (or its CUDA graph)
            if out is not None:
                return out
            self._plan = None  # the module changed: the checked path re-packs, then a new plan
        elif plan is not None and plan[0] == (obs.shape, obs.dtype, obs.device):
            out, noise = self._planned(plan[1], plan[2], obs)
            if out is not None:
                return out
            # the plan's impl could not run this module any more: the checked path, with the noise
            # already drawn (the generator stream stays the one the checked path alone would use)
            noise = noise.reshape(obs.shape[0], self.num_samples, -1)
        key = (obs.shape, obs.dtype, obs.device)
        if self.kind == "flow":
            out = self.policy.sample(obs, self.num_samples, steps=self.steps, solver=self.solver, noise=noise,
                                     generator=self.generator, backend=self.backend)
        elif self.kind == "ddpm":
            out = self.policy.sample(obs, self.num_samples, noise=noise, generator=self.generator, backend=self.backend)
        else:
            out = self.policy.sample(obs, self.num_samples, sigmas=self.sigmas, noise=noise,
                                     generator=self.generator, backend=self.backend)
        if self.num_samples == 1:
            out = out[:, 0]
        self._plan = self._make_plan(key, obs)
        return out

    def _make_plan(self, key, obs):
        from . import backends as B

        used = self.backend_used(obs) if self.backend in ("auto", "triton", "cpp") else "torch"
        if used == "triton":
            return key, self._prepare_triton(obs), None
        if self.cuda_graph:
            why = B.reasons(self._OP[self.kind], "triton", obs.device,
                            net=self.net, x0=obs.new_empty(obs.shape[0], 1, self.policy.act_dim), obs=obs)
            raise RuntimeError(f"cuda_graph=True captures the fused Triton sampler, but this call runs on the "
                               f"{used!r} backend: " + "; ".join(why))
        if used != "cpp":
            return None
        # B.Fallback: what an impl raises when it cannot run this call after all (ops catches it too)
        return key, B._IMPLS[self._OP[self.kind]]["cpp"], B.Fallback

    def _prepare_triton(self, obs):
        from .triton.sampler import Prepared

        pol = self.policy
        if self.kind == "flow":
            # (from t0 > 0, e.g. "ot-eps" at 0.05: the noise scaled by sigma(t0), as FlowPolicy.sample)
            call = Prepared(self.net, "flow", self.num_samples, obs, steps=self.steps, solver=pol._solver(self.solver),
                            path=None if pol.path == "ot" else pol.path, generator=self.generator,
                            t0=pol.t0, noise_scale=pol.start_noise_scale())
        else:
            call = Prepared(self.net, "consistency", self.num_samples, obs, sigmas=self.sigmas,
                            sigma_max=pol.sigma_max, sigma_min=pol.sigma_min, sigma_data=pol.sigma_data,
                            generator=self.generator)
        return _GraphCall(call, obs) if self.cuda_graph else call

    def _planned(self, impl, unsupported, obs):
        """The C++ impl called directly (same noise draw and arguments as policy.sample): (actions,
        noise), actions None if it can no longer run this module (the caller then takes the checked
        path with this noise; the impl raises before it draws anything more)."""
        pol = self.policy
        K = self.num_samples
        # K = 1: the [B, A] layout gives the [B, A] result directly (the same numbers as [B, 1, A])
        shape = (obs.shape[0], pol.act_dim) if K == 1 else (obs.shape[0], K, pol.act_dim)
        noise = torch.randn(shape, dtype=obs.dtype, device=obs.device, generator=self.generator)
        try:
            if self.kind == "flow":
                x0 = start_noise(noise, pol.t0, pol.path)
                out = impl(self.net, x0, obs, self.steps, pol._solver(self.solver), pol.t0, 1.0,
                           None if pol.path == "ot" else pol.path, False).clamp_(-1.0, 1.0)
            elif self.kind == "ddpm":
                out = impl(self.net, noise, obs, pol.schedule, None, pol.max_action, pol.predict_epsilon,
                           pol.clip_denoised, True, self.generator)
            else:
                sig = None if self.sigmas is None else [float(v) for v in self.sigmas]
                out = impl(self.net, noise, obs, sig, None, pol.sigma_max, pol.sigma_min, pol.sigma_data,
                           True, self.generator)
        except unsupported:
            self._plan = None
            return None, noise
        return out, noise

    @torch.no_grad()
    def act(self, obs: torch.Tensor, critic, num_candidates: int = 50, mode: Optional[str] = None,
            temperature: float = 1.0, generator: Optional[torch.Generator] = None,
            backend: Optional[str] = None) -> torch.Tensor:
        """num_candidates actions per state from this sampler, scored by ``critic.q_min`` (a DoubleCritic,
        e.g. DoubleCritic.from_cpql_state_dict), one picked: obs [B, S] -> [B, A] (or [S] -> [A]).

        mode None = the actor's authors' selection: "softmax" (a draw from softmax(Q / temperature),
        CPQL's and Diffusion-QL's sample_action) for consistency and ddpm, "argmax" (QIPO) for flow.
        The critic sees the normalised observation and the actions before action_scale / action_bias.
        """
        obs, single = self._obs(obs)
        pol = self.policy
        if self.kind == "flow":  # (from the policy's t0, as FlowPolicy.act)
            kw = dict(steps=self.steps, solver=pol._solver(self.solver), path=None if pol.path == "ot" else pol.path,
                      t0=pol.t0)
        elif self.kind == "consistency":
            kw = dict(sigmas=self.sigmas, sigma_max=pol.sigma_max, sigma_min=pol.sigma_min, sigma_data=pol.sigma_data)
        else:
            kw = pol._ddpm_kw()
        out = ops.act(self.net, critic, obs, num_candidates=num_candidates, sampler=self.kind, mode=mode,
                      temperature=temperature, generator=self.generator if generator is None else generator,
                      backend=self.backend if backend is None else backend, **kw)
        out = self._affine(out)
        return out[0] if single else out


def _obs_normalizer(norm):
    """A callable obs -> normalised obs from None, a callable, or (mean, std): (obs - mean) / std."""
    if norm is None or callable(norm):
        return norm
    if isinstance(norm, (tuple, list)) and len(norm) == 2:
        mean, std = (torch.as_tensor(v, dtype=torch.float64) for v in norm)
        if not bool((std > 0).all()):
            raise ValueError("obs_normalizer's std must be > 0 everywhere")
        cache = {}

        def normalize(obs):
            key = (obs.dtype, obs.device)
            if key not in cache:
                cache[key] = (mean.to(obs.device, obs.dtype), std.to(obs.device, obs.dtype))
            m, sd = cache[key]
            return (obs - m) / sd
        return normalize
    raise TypeError(f"obs_normalizer must be None, a callable obs -> obs or a (mean, std) pair, got {type(norm).__name__}")


def _box_bounds(space):
    try:
        low = torch.as_tensor(space.low, dtype=torch.float64).reshape(-1)
        high = torch.as_tensor(space.high, dtype=torch.float64).reshape(-1)
    except AttributeError:
        raise TypeError(f"action_space must have .low and .high (e.g. a gymnasium Box), got {type(space).__name__}") from None
    if low.shape != high.shape or not bool(torch.isfinite(low).all() and torch.isfinite(high).all() and (high > low).all()):
        raise ValueError("action_space must have finite bounds with high > low")
    return low, high


def _official_module(actor):
    """(state_dict, attributes) of an official Diffusion-QL ``Diffusion`` / CPQL or Diffusion-QL ``MLP``
    module, or None for anything else."""
    if isinstance(actor, nn.Module) and hasattr(actor, "betas") and isinstance(getattr(actor, "model", None), nn.Module):
        attrs = {k: getattr(actor, k) for k in ("max_action", "predict_epsilon", "clip_denoised") if hasattr(actor, k)}
        return actor.state_dict(), attrs
    if isinstance(actor, nn.Module) and all(hasattr(actor, k) for k in ("time_mlp", "mid_layer", "final_layer")):
        return actor.state_dict(), {}
    return None


def _infer_dims(sd, obs_dim, act_dim):
    """(obs_dim, act_dim) of a CPQL / Diffusion-QL MLP state_dict, those given checked against it."""
    g = {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()}
    try:
        A = int(g["final_layer.weight"].shape[0])
        T = int(g["time_mlp.3.weight"].shape[0])
        S = int(g["mid_layer.0.weight"].shape[1]) - A - T
    except (KeyError, AttributeError, IndexError):
        return obs_dim, act_dim  # from_cpql_state_dict names what is missing
    return (S if obs_dim is None else obs_dim), (A if act_dim is None else act_dim)


KINDS = ("flow", "consistency", "ddpm")


def make_sampler(actor, kind: Optional[str] = None, obs_dim: Optional[int] = None, act_dim: Optional[int] = None,
                 num_samples: int = 1, steps: int = 10, solver: Optional[str] = None, path: str = "ot",
                 sigmas: Optional[Sequence[float]] = None, backend: str = "auto", device=None,
                 dtype: Optional[torch.dtype] = None, generator: Optional[torch.Generator] = None, *,
                 sigma_max: Optional[float] = None, sigma_min: Optional[float] = None,
                 sigma_data: Optional[float] = None, schedule=None, n_timesteps: int = 5,
                 max_action: Optional[float] = None, predict_epsilon: Optional[bool] = None,
                 clip_denoised: Optional[bool] = None, action_space=None, action_scale=None, action_bias=None,
                 obs_normalizer=None, cuda_graph: bool = False) -> Sampler:
    """Build a fast sampler obs -> actions from an existing actor, in one call.

    Args:
        actor: one of
            - a FlowPolicy / ConsistencyPolicy / DDPMPolicy, or a ConditionalMLP;
            - a CPQL / Diffusion-QL actor's state_dict: CPQL's ``MLP`` (keys ``time_mlp.*``, ``mid_layer.*``,
              ``final_layer.*``) or Diffusion-QL's ``Diffusion`` (the same under ``model.``, plus its
              schedule buffers ``betas``, ``alphas_cumprod``, ...);
            - the official module objects themselves (their ``MLP``, or Diffusion-QL's ``Diffusion``, whose
              max_action / predict_epsilon / clip_denoised attributes are read).
            obs_dim / act_dim are read from the tensors (give them to check).
        kind: "flow" (ODE from noise at t = 0 to actions at t = 1; ``path`` says what the net predicts:
            "ot" velocity, "ot-eps" / "vp" noise), "consistency" (CPQL: one step from sigma_max, then
            ``sigmas`` if given) or "ddpm" (Diffusion-QL's T-step ancestral sampler). None = what the
            actor is: its policy class, ``net.kind``, or "ddpm" for a state_dict / module carrying a
            DDPM schedule. A bare MLP state_dict does not say how it samples (CPQL's and Diffusion-QL's
            networks are the same ``MLP``): kind is then required. A kind that contradicts the actor
            (e.g. "consistency" for a Diffusion-QL checkpoint) raises instead of returning wrong actions.
        num_samples: K actions per state (K = 1 returns [B, A]).
        steps, solver: flow sampling (solver None = "euler" for "ot", "dpm2" for noise paths).
        sigmas, sigma_max, sigma_min, sigma_data: consistency sampling (CPQL defaults 80 / 0.002 / 0.5;
            CPQL's multistep = ``sigmas=karras_sigmas(40)[[0, 20]] + [0.002]``, see consistency_sample).
        schedule, n_timesteps, max_action, predict_epsilon, clip_denoised: ddpm sampling (defaults: the
            schedule the checkpoint carries, else "vp" with 5 steps; Diffusion-QL's module attributes;
            max_action 1 or action_space.high[0]).
        action_space: an env's Box: flow / consistency actions are mapped from [-1, 1] to [low, high]
            (scale (high - low) / 2, bias (high + low) / 2, as CPQL's sample_action); for ddpm it gives
            max_action = high[0] (Diffusion-QL samples in env units; the box must be symmetric).
        action_scale, action_bias: the map a * scale + bias explicitly (instead of action_space).
        obs_normalizer: None, a callable obs -> obs, or (mean, std): applied to every obs first.
        backend: "auto" (fused Triton / C++ kernels where they run, else PyTorch), or a named backend.
        device, dtype: move the network there first (default: where it is).
        cuda_graph: capture the whole fused call (noise draw, launch) in a CUDA graph per obs shape on
            first use and replay it afterwards (the Triton backend on a CUDA device only; a ValueError
            otherwise; flow policies sampled from t0 > 0, e.g. "ot-eps" at 0.05, included: the
            captured draw is N(0, sigma(t0)^2)). The graph is re-captured after the network changes
            (optimizer step, load_state_dict, replaced layer); the warm-up before a capture draws
            from ``generator``.
    Returns:
        a ``Sampler``: ``sampler(obs [B, S]) -> actions [B, A]`` (no gradient) and
        ``sampler.act(obs, critic) -> [B, A]`` (candidates + critic selection, the authors' defaults).
    """
    from .reference import ddpm as _ddpm

    if kind is not None:
        C.choice("kind", kind, KINDS)
    C.positive_int("num_samples", num_samples)
    C.positive_int("steps", steps)
    C.choice("backend", backend, ("auto", "torch", "triton", "cpp"))
    attrs = {}
    sd_schedule = None
    if isinstance(actor, (FlowPolicy, ConsistencyPolicy, DDPMPolicy)):
        have = "flow" if isinstance(actor, FlowPolicy) else "consistency" if isinstance(actor, ConsistencyPolicy) else "ddpm"
        if kind is not None and kind != have:
            raise ValueError(f"kind={kind!r} does not match the actor, a {type(actor).__name__}")
        kind, policy, net = have, actor, None
    else:
        off = None if isinstance(actor, (Mapping, ConditionalMLP)) else _official_module(actor)
        if off is not None:
            actor, attrs = off
        if isinstance(actor, Mapping):
            detected = "ddpm" if any(k in actor for k in _ddpm.BUFFERS) else None
            if kind is not None and detected is not None and kind != detected:
                raise ValueError(f"kind={kind!r}, but this actor carries Diffusion-QL's DDPM schedule buffers: it is a "
                                 "DDPM actor, and the flow / consistency samplers would return wrong actions from it; "
                                 "use kind='ddpm' (or None)")
            if kind is None and detected is None:
                raise ValueError("kind must be given for this actor: a CPQL / Diffusion-QL MLP state_dict does not say "
                                 "how it samples (CPQL: kind='consistency'; a Diffusion-QL MLP saved alone: kind='ddpm')")
            kind = kind or detected
            obs_dim, act_dim = _infer_dims(actor, obs_dim, act_dim)
            if obs_dim is None or act_dim is None:
                raise ValueError("obs_dim and act_dim are required to load this state_dict")
            C.positive_int("obs_dim", obs_dim)
            C.positive_int("act_dim", act_dim)
            net = ConditionalMLP.from_cpql_state_dict(actor, obs_dim=obs_dim, act_dim=act_dim, kind=kind)
            sd_schedule = net.ddpm_schedule
        elif isinstance(actor, ConditionalMLP):
            net = actor
            for name, v, have in (("obs_dim", obs_dim, net.obs_dim), ("act_dim", act_dim, net.act_dim)):
                if v is not None and v != have:
                    raise ValueError(f"{name}={v} does not match the network's {have}")
            detected = getattr(net, "kind", None)
            if kind is not None and detected is not None and kind != detected:
                raise ValueError(f"kind={kind!r} does not match the network, loaded as a {detected!r} actor (net.kind)")
            kind = kind or detected or "flow"
            sd_schedule = getattr(net, "ddpm_schedule", None)
        else:
            raise TypeError("actor must be a FlowPolicy, ConsistencyPolicy, DDPMPolicy, ConditionalMLP, a CPQL / "
                            "Diffusion-QL MLP or Diffusion module, or their state_dict (a Mapping of tensors), "
                            f"got {type(actor).__name__}")
    # ---- action map
    scale = bias = None
    box_max_action = False  # max_action taken from action_space (not the caller's)
    if action_space is not None:
        if action_scale is not None or action_bias is not None:
            raise ValueError("give action_space or action_scale / action_bias, not both")
        low, high = _box_bounds(action_space)
        if kind == "ddpm":
            if not (torch.equal(low, -high) and bool((high == high[0]).all())):
                raise ValueError("a ddpm actor (Diffusion-QL) samples in [-max_action, max_action] with max_action = "
                                 "action_space.high[0]: the Box must be symmetric with one bound; give max_action "
                                 "and action_scale / action_bias instead")
            if max_action is None:
                max_action = float(high[0])
                box_max_action = True
        else:
            scale, bias = (high - low) / 2.0, (high + low) / 2.0
    else:
        scale, bias = action_scale, action_bias
    if net is not None:
        if kind == "flow":
            policy = FlowPolicy(net.obs_dim, net.act_dim, hidden=1, depth=1, path=path, steps=steps, solver=solver)
        elif kind == "consistency":
            policy = ConsistencyPolicy(net.obs_dim, net.act_dim, hidden=1, depth=1,
                                       sigma_max=SIGMA_MAX if sigma_max is None else sigma_max,
                                       sigma_min=SIGMA_MIN if sigma_min is None else sigma_min,
                                       sigma_data=SIGMA_DATA if sigma_data is None else sigma_data)
        else:
            sch = schedule if schedule is not None else (sd_schedule if sd_schedule is not None else "vp")
            policy = DDPMPolicy(net.obs_dim, net.act_dim, hidden=1, depth=1, schedule=sch, n_timesteps=n_timesteps,
                                max_action=float(attrs.get("max_action", 1.0) if max_action is None else max_action),
                                predict_epsilon=bool(attrs.get("predict_epsilon", True)) if predict_epsilon is None
                                else predict_epsilon,
                                clip_denoised=bool(attrs.get("clip_denoised", True)) if clip_denoised is None
                                else clip_denoised)
        policy.net = net  # share, don't copy
    else:
        given = {"sigma_max": sigma_max, "sigma_min": sigma_min, "sigma_data": sigma_data, "schedule": schedule,
                 "max_action": max_action, "predict_epsilon": predict_epsilon, "clip_denoised": clip_denoised}
        if box_max_action:  # the Box must agree with the policy's own bound
            given["max_action"] = None
            if float(max_action) != float(policy.max_action):
                raise ValueError(f"action_space.high[0] = {max_action} differs from the {type(policy).__name__}'s "
                                 f"max_action = {policy.max_action}")
        extra = [k for k, v in given.items() if v is not None]
        if extra:
            raise ValueError(f"{extra} are the policy object's own settings; build the {type(policy).__name__} with "
                             "them instead")
    if device is not None or dtype is not None:
        policy.to(device=device, dtype=dtype)
    policy.eval()
    if kind == "flow":
        policy._solver(solver)  # validates solver against the path now
    elif kind == "consistency" and sigmas is not None:
        for s in sigmas:
            if not (policy.sigma_min <= float(s) <= policy.sigma_max):
                raise ValueError(f"every sigma in sigmas must lie in [{policy.sigma_min}, {policy.sigma_max}], got {s}")
    if cuda_graph:
        if kind == "ddpm":
            raise ValueError("cuda_graph=True captures the prepared Triton call of flow and consistency actors only, "
                             "not a ddpm actor; pass cuda_graph=False")
        dev = next(policy.parameters()).device
        if dev.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the policy on a CUDA device (device='cuda'), it is on {dev}")
        if backend not in ("auto", "triton"):
            raise ValueError(f"cuda_graph=True captures the fused Triton sampler; backend must be 'auto' or 'triton', "
                             f"got {backend!r}")
    return Sampler(policy, kind, num_samples, steps, solver, sigmas, backend, generator,
                   obs_normalizer=_obs_normalizer(obs_normalizer), action_scale=scale, action_bias=bias,
                   cuda_graph=bool(cuda_graph))


class _GraphCall:
    """A Triton ``Prepared`` call captured in a CUDA graph for one obs shape: a call copies obs into
    the graph's input, replays, and returns a copy of the graph's output (None, drawing nothing, when
    the network changed since the capture: the Sampler then re-plans and captures again)."""

    def __init__(self, call, obs: torch.Tensor):
        self.call = call
        self.obs = obs.clone()
        side = torch.cuda.Stream(device=obs.device)
        side.wait_stream(torch.cuda.current_stream(obs.device))
        with torch.cuda.stream(side):  # autotune / compile / first launch outside the capture
            for _ in range(2):
                call(self.obs)
        torch.cuda.current_stream(obs.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        gen = call.generator
        if gen is not None and hasattr(self.graph, "register_generator_state"):
            self.graph.register_generator_state(gen)
        with torch.cuda.graph(self.graph):  # (the kernel allocates no scratch: only the output)
            self.out = call(self.obs)

    def __call__(self, obs: torch.Tensor):
        if self.call.entry.watch.changed():
            return None
        self.obs.copy_(obs)
        self.graph.replay()
        return self.out.clone()
