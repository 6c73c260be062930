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
to the plain-PyTorch reference otherwise. Sampling while autograd records and the network has
trainable parameters always uses the reference (the fused samplers are inference-only), so a
differentiable sample (CPQL's Q loss) is never silently cut from the graph.

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
from .reference.ode import NOISE_SOLVERS, SOLVERS, VELOCITY_SOLVERS
from .reference.paths import PATHS, VP_EPS, alpha_sigma
from .reference.select import SELECT_MODES

__all__ = ["FlowPolicy", "ConsistencyPolicy", "make_sampler", "Sampler", "OT_EPS_SAMPLE_T0"]

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
    p = next(module.parameters())
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
        if self.t0 == 0.0:
            return 1.0
        _, sig = alpha_sigma(torch.tensor(self.t0, dtype=torch.float64), self.path)
        return float(sig)

    # ---- training -------------------------------------------------------------------------
    def loss(self, obs: torch.Tensor, actions: torch.Tensor, energy: Optional[torch.Tensor] = None,
             beta: float = 3.0, normalize: str = "support", generator: Optional[torch.Generator] = None,
             t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
             pair_weight: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
        """(Energy-weighted) flow-matching loss.

        Args:
            obs: [B, S].
            actions: [B, A] (one action per state) or [B, M, A] (M support actions per state), in [-1, 1].
            energy: None (plain flow matching) or Q values [B, M] (higher = better), weights
                softmax(beta * energy) over each state's support ("support") or over the batch ("batch").
            beta: inverse temperature > 0 (QIPO: 3.0).
            generator: for t ~ U(0, 1) ("ot", "ot-eps") or U(0, 1 - 1e-3) ("vp") and z ~ N(0, I).
            t, noise: optional fixed draws, [B, M] and [B, M, A].
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
        if t is None:
            hi = 1.0 - VP_EPS if self.path == "vp" else 1.0
            t = torch.rand((B, M), dtype=obs.dtype, device=obs.device, generator=generator) * hi
        else:
            C.tensor("t", t, shape=(B, M))
        if noise is None:
            noise = torch.randn((B, M, A), dtype=obs.dtype, device=obs.device, generator=generator)
        else:
            C.tensor("noise", noise, shape=(B, M, A))
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
               generator: Optional[torch.Generator] = None, clip: bool = True, backend: str = "auto") -> torch.Tensor:
        """Draw num_samples actions per state: obs [B, S] -> [B, num_samples, A] (clamped to [-1, 1]).

        noise: optional initial noise [B, num_samples, A]; steps / solver default to the policy's.
        """
        steps = self.steps if steps is None else C.positive_int("steps", steps)
        solver = self._solver(solver)
        noise = _initial_noise(self, obs, num_samples, noise, generator)
        if self.t0 > 0.0:
            noise = noise * self.start_noise_scale()
        out = ops.integrate(self.net, noise, obs, steps=steps, solver=solver, t0=self.t0,
                            path=None if self.path == "ot" else self.path, backend=_backend_for(self.net, backend))
        return out.clamp(-1.0, 1.0) if clip else out

    def act(self, obs: torch.Tensor, critic, num_candidates: int = 50, select: str = "argmax",
            temperature: float = 1.0, steps: Optional[int] = None, solver: Optional[str] = None,
            noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
            backend: str = "auto") -> torch.Tensor:
        """Sample num_candidates actions per state, score them by critic.q_min, pick one: [B, S] -> [B, A]."""
        _check_obs(obs, self.obs_dim)
        C.choice("select", select, SELECT_MODES)
        steps = self.steps if steps is None else C.positive_int("steps", steps)
        solver = self._solver(solver)
        _param_like(self.net, obs)
        if self.t0 > 0.0:  # ops.act integrates from t = 0: sample, score and select in three calls
            with torch.no_grad():
                cand = self.sample(obs, num_candidates, steps=steps, solver=solver, noise=noise, generator=generator,
                                   backend=backend)
                q = critic.q_min(obs.repeat_interleave(num_candidates, 0), cand.reshape(-1, self.act_dim))
                return ops.select_action(q.reshape(obs.shape[0], num_candidates), cand, mode=select,
                                         temperature=temperature, generator=generator, backend=backend)
        with torch.no_grad():
            return ops.act(self.net, critic, obs, num_candidates=num_candidates, sampler="flow", steps=steps,
                           solver=solver, path=None if self.path == "ot" else self.path, mode=select,
                           temperature=temperature, noise=noise, generator=generator, backend=backend)


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
        if (self.sigma_min, self.sigma_max, self.sigma_data) != (SIGMA_MIN, SIGMA_MAX, SIGMA_DATA):
            # ops.act samples with the package's default sigmas: do it in two calls instead.
            with torch.no_grad():
                cand = self.sample(obs, num_candidates, sigmas=sigmas, noise=noise, generator=generator, backend=backend)
                q = critic.q_min(obs.repeat_interleave(num_candidates, 0), cand.reshape(-1, self.act_dim))
                return ops.select_action(q.reshape(obs.shape[0], num_candidates), cand, mode=select,
                                         temperature=temperature, generator=generator, backend=backend)
        with torch.no_grad():
            return ops.act(self.net, critic, obs, num_candidates=num_candidates, sampler="consistency",
                           sigmas=sigmas, mode=select, temperature=temperature, noise=noise, generator=generator,
                           backend=backend)


# ---- drop-in sampler -------------------------------------------------------------------------

class Sampler:
    """A fast, gradient-free obs -> actions callable (see ``make_sampler``).

    __call__(obs [B, S] or [S]) -> [B, A] (or [A]) when num_samples == 1, else [B, K, A].
    ``.net`` is the ConditionalMLP it runs; ``.backend_used(obs)`` names the backend chosen for obs.
    """

    def __init__(self, policy: nn.Module, kind: str, num_samples: int, steps: int, solver: Optional[str],
                 sigmas: Optional[Sequence[float]], backend: str, generator: Optional[torch.Generator]):
        self.policy, self.kind, self.num_samples = policy, kind, num_samples
        self.steps, self.solver, self.sigmas, self.backend, self.generator = steps, solver, sigmas, backend, generator
        self.net = policy.net
        # Real-time path: once a call of some (obs shape, dtype, device) has been dispatched to the C++
        # backend, later calls with the same kind of obs go straight to its impl, skipping the ops-layer
        # checks and backend choice (~10 us of a ~25 us single-state call). The impl still checks the
        # module's packed weights on every call (re-packs after a change, raises cpp.Unsupported when
        # it can no longer run it, which drops the plan and takes the checked path again).
        self._plan = None

    @torch.no_grad()
    def backend_used(self, obs: torch.Tensor) -> str:
        """The backend ``self(obs)`` runs on (under no_grad, as ``__call__``)."""
        from . import backends as B

        noise = torch.empty((obs.shape[0], self.num_samples, self.policy.act_dim), dtype=obs.dtype, device=obs.device)
        if self.kind == "flow":
            name, _ = B.choose("integrate", self.backend, obs.device, None, net=self.net, x0=noise, obs=obs,
                               steps=self.steps, solver=self.policy._solver(self.solver),
                               path=None if self.policy.path == "ot" else self.policy.path, return_trajectory=False)
        else:
            name, _ = B.choose("consistency_sample", self.backend, obs.device, None, net=self.net, noise=noise, obs=obs,
                               sigmas=self.sigmas, step_noise=None, clip=True)
        return name

    def __call__(self, obs: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # (a no_grad decorator would cost every real-time call ~3 us)
            with torch.no_grad():
                return self._call(obs)
        return self._call(obs)

    def _call(self, obs: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(obs):
            raise TypeError(f"obs must be a torch.Tensor, got {type(obs).__name__}")
        single = obs.dim() == 1
        if single:
            obs = obs.unsqueeze(0)
        plan = self._plan
        noise = None
        if plan is not None and plan[0] == (obs.shape, obs.dtype, obs.device):
            out, noise = self._planned(plan[1], plan[2], obs)
            if out is not None:
                return out[0] if single else out
            # the plan's impl could not run this module any more: the checked path, with the noise
            # already drawn (the generator stream stays the one the checked path alone would use)
            noise = noise.reshape(obs.shape[0], self.num_samples, -1)
        key = (obs.shape, obs.dtype, obs.device)
        if self.kind == "flow":
            out = self.policy.sample(obs, self.num_samples, steps=self.steps, solver=self.solver, noise=noise,
                                     generator=self.generator, backend=self.backend)
        else:
            out = self.policy.sample(obs, self.num_samples, sigmas=self.sigmas, noise=noise,
                                     generator=self.generator, backend=self.backend)
        if self.num_samples == 1:
            out = out[:, 0]
        self._plan = self._make_plan(key, obs)
        return out[0] if single else out

    def _make_plan(self, key, obs):
        from . import backends as B

        if self.backend not in ("auto", "cpp") or self.backend_used(obs) != "cpp":
            return None
        op = "integrate" if self.kind == "flow" else "consistency_sample"
        # B.Fallback: what an impl raises when it cannot run this call after all (ops catches it too)
        return key, B._IMPLS[op]["cpp"], B.Fallback

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
                x0 = noise * pol.start_noise_scale() if pol.t0 > 0.0 else noise
                out = impl(self.net, x0, obs, self.steps, pol._solver(self.solver), pol.t0, 1.0,
                           None if pol.path == "ot" else pol.path, False).clamp_(-1.0, 1.0)
            else:
                sig = None if self.sigmas is None else [float(v) for v in self.sigmas]
                out = impl(self.net, noise, obs, sig, None, pol.sigma_max, pol.sigma_min, pol.sigma_data,
                           True, self.generator)
        except unsupported:
            self._plan = None
            return None, noise
        return out, noise


def make_sampler(actor, kind: str = "flow", obs_dim: Optional[int] = None, act_dim: Optional[int] = None,
                 num_samples: int = 1, steps: int = 10, solver: Optional[str] = None, path: str = "ot",
                 sigmas: Optional[Sequence[float]] = None, backend: str = "auto", device=None,
                 dtype: Optional[torch.dtype] = None, generator: Optional[torch.Generator] = None) -> Sampler:
    """Build a fast sampler obs -> actions from an existing actor, in one call.

    Args:
        actor: a FlowPolicy / ConsistencyPolicy, a ConditionalMLP, or a state_dict of a CPQL /
            Diffusion-QL ``MLP`` actor (keys ``time_mlp.*``, ``mid_layer.*``, ``final_layer.*``, an optional
            ``model.`` prefix; loaded with ConditionalMLP.from_cpql_state_dict, which needs obs_dim and act_dim).
        kind: "flow" (ODE from noise at t = 0 to actions at t = 1; ``path`` says what the net predicts:
            "ot" velocity, "ot-eps" / "vp" noise) or "consistency" (CPQL: one step from sigma_max, then
            ``sigmas`` if given).
        num_samples: K actions per state (K = 1 returns [B, A]).
        steps, solver: flow sampling (solver None = "euler" for "ot", "dpm2" for noise paths).
        backend: "auto" (fused Triton / C++ kernels where they run, else PyTorch), or a named backend.
        device, dtype: move the network there first (default: where it is).
    Returns:
        a ``Sampler``; ``sampler(obs [B, S]) -> actions [B, A]`` (no gradient, clamped to [-1, 1]).

    Diffusion-QL's own DDPM sampler (discrete timesteps) is not provided: a Diffusion-QL state_dict
    loads into the same network, but only the flow / consistency samplers of this package run it.
    """
    C.choice("kind", kind, ("flow", "consistency"))
    C.positive_int("num_samples", num_samples)
    C.positive_int("steps", steps)
    C.choice("backend", backend, ("auto", "torch", "triton", "cpp"))
    if isinstance(actor, (FlowPolicy, ConsistencyPolicy)):
        want = FlowPolicy if kind == "flow" else ConsistencyPolicy
        if not isinstance(actor, want):
            raise ValueError(f"kind={kind!r} does not match the actor, a {type(actor).__name__}")
        policy = actor
    else:
        if isinstance(actor, Mapping):
            if obs_dim is None or act_dim is None:
                raise ValueError("obs_dim and act_dim are required to load a state_dict")
            C.positive_int("obs_dim", obs_dim)
            C.positive_int("act_dim", act_dim)
            net = ConditionalMLP.from_cpql_state_dict(actor, obs_dim=obs_dim, act_dim=act_dim)
        elif isinstance(actor, ConditionalMLP):
            net = actor
            for name, v, have in (("obs_dim", obs_dim, net.obs_dim), ("act_dim", act_dim, net.act_dim)):
                if v is not None and v != have:
                    raise ValueError(f"{name}={v} does not match the network's {have}")
        else:
            raise TypeError("actor must be a FlowPolicy, ConsistencyPolicy, ConditionalMLP or a CPQL/Diffusion-QL "
                            f"state_dict (a Mapping of tensors), got {type(actor).__name__}")
        if kind == "flow":
            policy = FlowPolicy(net.obs_dim, net.act_dim, hidden=1, depth=1, path=path, steps=steps, solver=solver)
        else:
            policy = ConsistencyPolicy(net.obs_dim, net.act_dim, hidden=1, depth=1)
        policy.net = net  # share, don't copy
    if device is not None or dtype is not None:
        policy.to(device=device, dtype=dtype)
    policy.eval()
    if kind == "flow":
        policy._solver(solver)  # validates solver against the path now
    elif sigmas is not None:
        for s in sigmas:
            if not (policy.sigma_min <= float(s) <= policy.sigma_max):
                raise ValueError(f"every sigma in sigmas must lie in [{policy.sigma_min}, {policy.sigma_max}], got {s}")
    return Sampler(policy, kind, num_samples, steps, solver, sigmas, backend, generator)
