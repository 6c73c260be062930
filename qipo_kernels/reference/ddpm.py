"""Discrete-time DDPM sampling (Diffusion-QL; the IDQL / EDP family share its form), plain PyTorch.

Conventions are Diffusion-QL's (Wang et al., ICLR 2023, ``agents/diffusion.py``):

* T steps (Diffusion-QL: 5) with a beta schedule: ``"vp"`` (b_min 0.1, b_max 10, discretised VP SDE)
  ``beta_i = 1 - exp(-b_min / T - (b_max - b_min) (2 i - 1) / (2 T^2))``, i = 1..T; ``"linear"``
  (1e-4 .. 2e-2); ``"cosine"`` (Nichol & Dhariwal, s = 0.008, clipped to 0.999). The schedule is
  computed in float64 and stored in float32, and every derived coefficient is computed from the
  float32 betas in float32, as their module does (so the numbers are those of their buffers).
* The network's time input is the integer step index i (as a float), noisiest first: i = T-1 .. 0.
* Ancestral step, from x_T = z:

      eps    = F(x_i, i, obs)
      x0_hat = clamp(sqrt(1 / abar_i) x_i - sqrt(1 / abar_i - 1) eps, -max_action, max_action)
               (predict_epsilon=False: x0_hat = clamp(F(x_i, i, obs)); clip_denoised=False: no clamp)
      mean   = c1_i x0_hat + c2_i x_i           (posterior q(x_{i-1} | x_i, x0_hat) mean)
      x_{i-1} = mean + exp(0.5 log max(var_i, 1e-20)) z_i     for i > 0;   x_{-1} = mean  (i = 0)

  c1_i = beta_i sqrt(abar_{i-1}) / (1 - abar_i), c2_i = (1 - abar_{i-1}) sqrt(alpha_i) / (1 - abar_i),
  var_i = beta_i (1 - abar_{i-1}) / (1 - abar_i), abar_{-1} = 1.
* The result is clamped to [-max_action, max_action] (their ``Diffusion.sample``); ``clip=False`` skips it.

Noise: z [N, A] (or [B, K, A]); the per-step draws z_i, i = T-1 .. 1, are ``step_noise``
[T-1, *z.shape] or drawn from ``generator`` in that order (one [rows, A] draw per step).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Callable, Mapping, Optional, Union

import numpy as np
import torch

from .. import _checks as C
from .consistency import _check_net_x_obs

SCHEDULES = ("vp", "linear", "cosine")
T_DEFAULT = 5
VP_B_MIN = 0.1
VP_B_MAX = 10.0
LOGVAR_FLOOR = 1e-20
# the buffers a Diffusion-QL ``Diffusion`` module registers (its state_dict carries them)
BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
           "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
           "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")
# the ones the sampler reads
SAMPLER_BUFFERS = ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1",
                   "posterior_mean_coef2", "posterior_log_variance_clipped")


def beta_schedule(n_timesteps: int = T_DEFAULT, schedule: str = "vp", b_min: float = VP_B_MIN,
                  b_max: float = VP_B_MAX, beta_start: float = 1e-4, beta_end: float = 2e-2,
                  cosine_s: float = 0.008) -> torch.Tensor:
    """betas [T] float32 of a named schedule (computed in float64, rounded once)."""
    T = C.positive_int("n_timesteps", n_timesteps)
    C.choice("schedule", schedule, SCHEDULES)
    if schedule == "vp":
        b_min = C.positive_float("b_min", b_min)
        b_max = C.positive_float("b_max", b_max)
        if not b_min < b_max:
            raise ValueError(f"need b_min < b_max, got {b_min} and {b_max}")
        i = np.arange(1, T + 1, dtype=np.float64)
        betas = 1.0 - np.exp(-b_min / T - 0.5 * (b_max - b_min) * (2 * i - 1) / T ** 2)
    elif schedule == "linear":
        beta_start = C.positive_float("beta_start", beta_start)
        beta_end = C.positive_float("beta_end", beta_end)
        if not (beta_start <= beta_end < 1.0):
            raise ValueError(f"need beta_start <= beta_end < 1, got {beta_start} and {beta_end}")
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    else:
        s = C.positive_float("cosine_s", cosine_s)
        x = np.linspace(0, T + 1, T + 1, dtype=np.float64)
        ac = np.cos(((x / (T + 1)) + s) / (1 + s) * np.pi * 0.5) ** 2
        ac = ac / ac[0]
        betas = np.clip(1 - ac[1:] / ac[:-1], 0.0, 0.999)
    return torch.tensor(betas, dtype=torch.float32)


def _np_sqrt(x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.sqrt(x.numpy()))


@dataclass(frozen=True)
class DDPMSchedule:
    """The per-step coefficients the sampler reads, float32 tensors [T] indexed by step i (0 = cleanest).

    Build with ``DDPMSchedule.from_betas`` or ``DDPMSchedule.from_state_dict`` (a Diffusion-QL actor's
    buffers, used as stored).
    """
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor

    @property
    def n_timesteps(self) -> int:
        return int(self.sqrt_recip_alphas_cumprod.shape[0])

    def std(self) -> torch.Tensor:
        """exp(0.5 log_var_clipped), float32 [T] (the noise scale of each step; step 0 adds none)."""
        return (0.5 * self.posterior_log_variance_clipped).exp()

    @cached_property
    def _rows(self):
        cols = [c.detach().cpu().tolist() for c in (
            self.sqrt_recip_alphas_cumprod, self.sqrt_recipm1_alphas_cumprod, self.posterior_mean_coef1,
            self.posterior_mean_coef2, self.std())]
        return tuple(tuple(c[i] for c in cols) for i in range(self.n_timesteps))

    def rows(self):
        """((c_recip, c_recipm1, c1, c2, std), ...) as Python floats per step i (exactly the float32
        values; read once per schedule object, which the fast backends key their tables by)."""
        return self._rows

    @classmethod
    def from_betas(cls, betas) -> "DDPMSchedule":
        """The coefficients of betas [T] (float32; in (0, 1)), computed in float32 as Diffusion-QL's module."""
        b = torch.as_tensor(betas).detach().to(device="cpu", dtype=torch.float32)
        if b.dim() != 1 or b.shape[0] < 1:
            raise ValueError(f"betas must be a non-empty 1-d tensor, got shape {tuple(b.shape)}")
        if not bool(((b > 0) & (b < 1)).all()):
            raise ValueError("every beta must lie in (0, 1)")
        alphas = 1.0 - b
        ac = torch.cumprod(alphas, dim=0)
        ac_prev = torch.cat([torch.ones(1), ac[:-1]])
        var = b * (1.0 - ac_prev) / (1.0 - ac)
        return cls(
            sqrt_recip_alphas_cumprod=torch.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=torch.sqrt(1.0 / ac - 1),
            # numpy's float32 sqrt here, torch's above, as their module does: the two differ in the
            # last bit for some inputs, and the point is the numbers of their buffers
            posterior_mean_coef1=b * _np_sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * _np_sqrt(alphas) / (1.0 - ac),
            posterior_log_variance_clipped=torch.log(torch.clamp(var, min=LOGVAR_FLOOR)),
        )

    @classmethod
    def named(cls, schedule: str = "vp", n_timesteps: int = T_DEFAULT, **kw) -> "DDPMSchedule":
        return cls.from_betas(beta_schedule(n_timesteps, schedule, **kw))

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> "DDPMSchedule":
        """Read the sampler's buffers from a Diffusion-QL ``Diffusion`` state_dict (an optional ``actor.``
        prefix is accepted); when only ``betas`` is there, derive the rest from it."""
        sd = {k[len("actor."):] if k.startswith("actor.") else k: v for k, v in state_dict.items()}
        if all(k in sd for k in SAMPLER_BUFFERS):
            vals = {k: torch.as_tensor(sd[k]).detach().to(device="cpu", dtype=torch.float32) for k in SAMPLER_BUFFERS}
            T = vals[SAMPLER_BUFFERS[0]].shape
            for k, v in vals.items():
                if v.dim() != 1 or v.shape != T or v.shape[0] < 1:
                    raise ValueError(f"state_dict buffer {k!r} must be 1-d of one length T >= 1 like the others, "
                                     f"got shape {tuple(v.shape)}")
                if not bool(torch.isfinite(v).all()):
                    raise ValueError(f"state_dict buffer {k!r} has NaN/inf values")
            return cls(**vals)
        if "betas" in sd:
            return cls.from_betas(sd["betas"])
        raise ValueError("state_dict carries no DDPM schedule: expected Diffusion-QL's buffers "
                         f"{list(SAMPLER_BUFFERS)} or at least 'betas'")


ScheduleLike = Union[str, DDPMSchedule, torch.Tensor]


@lru_cache(maxsize=64)
def _named(schedule: str, n_timesteps: int) -> DDPMSchedule:
    """The named schedules, built once (their coefficient tables are then cached by the backends)."""
    return DDPMSchedule.named(schedule, n_timesteps)


def as_schedule(schedule: ScheduleLike = "vp", n_timesteps: int = T_DEFAULT) -> DDPMSchedule:
    """A DDPMSchedule from a schedule name (with n_timesteps), a DDPMSchedule, or betas [T]."""
    if isinstance(schedule, DDPMSchedule):
        return schedule
    if isinstance(schedule, str):
        C.choice("schedule", schedule, SCHEDULES)
        return _named(schedule, C.positive_int("n_timesteps", n_timesteps))
    if torch.is_tensor(schedule):
        return DDPMSchedule.from_betas(schedule)
    raise TypeError("schedule must be a name in "
                    f"{SCHEDULES}, a DDPMSchedule or a betas tensor [T], got {type(schedule).__name__}")


def check_ddpm_sample(net, noise, obs, schedule, step_noise, max_action, predict_epsilon, clip_denoised, clip):
    _check_net_x_obs(net, noise, obs, "noise")
    if not isinstance(schedule, DDPMSchedule):
        raise TypeError(f"schedule must be a DDPMSchedule here, got {type(schedule).__name__}")
    C.positive_float("max_action", max_action)
    for name, v in (("predict_epsilon", predict_epsilon), ("clip_denoised", clip_denoised), ("clip", clip)):
        C.boolean(name, v)
    if step_noise is not None:
        C.tensor("step_noise", step_noise, shape=(schedule.n_timesteps - 1,) + tuple(noise.shape))
        C.same_device(noise=noise, step_noise=step_noise)


def _ddpm_sample(net, noise, obs, schedule: DDPMSchedule, step_noise, max_action, predict_epsilon, clip_denoised,
                 clip, generator):
    if noise.dim() == 3:
        B, K, A = noise.shape
        x, o, shape3 = noise.reshape(B * K, A), obs.repeat_interleave(K, dim=0), (B, K, A)
    else:
        x, o, shape3 = noise, obs, None
    T = schedule.n_timesteps
    dt, dev = x.dtype, x.device
    # the float32 coefficients as tensors [T, 1] of x's dtype (exact for float32 / float64)
    cols = [c.to(device=dev, dtype=dt)[:, None] for c in (
        schedule.sqrt_recip_alphas_cumprod, schedule.sqrt_recipm1_alphas_cumprod, schedule.posterior_mean_coef1,
        schedule.posterior_mean_coef2, schedule.std())]
    n = x.shape[0]
    for k, i in enumerate(range(T - 1, -1, -1)):
        f = net(x, torch.full((n,), float(i), dtype=dt, device=dev), o)
        x0 = cols[0][i] * x - cols[1][i] * f if predict_epsilon else f
        if clip_denoised:
            x0 = x0.clamp(-max_action, max_action)
        mean = cols[2][i] * x0 + cols[3][i] * x
        if i > 0:
            if step_noise is not None:
                z = step_noise[k].reshape(x.shape)
            else:
                z = torch.randn(x.shape, dtype=dt, device=dev, generator=generator)
            x = mean + cols[4][i] * z
        else:
            x = mean
    if clip:
        x = x.clamp(-max_action, max_action)
    return x.reshape(shape3) if shape3 is not None else x


def ddpm_sample(net: Callable, noise: torch.Tensor, obs: torch.Tensor, schedule: ScheduleLike = "vp",
                n_timesteps: int = T_DEFAULT, step_noise: Optional[torch.Tensor] = None, max_action: float = 1.0,
                predict_epsilon: bool = True, clip_denoised: bool = True, clip: bool = True,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Diffusion-QL's ancestral DDPM sampler (see the module docstring).

    Args:
        net: F(x [N, A], t [N] (the step index as a float), obs [N, S]) -> [N, A] (eps or x0).
        noise: x_T, [N, A] (obs [N, S]) or [B, K, A] (obs [B, S], K samples per state).
        schedule: "vp" | "linear" | "cosine" (with n_timesteps), a DDPMSchedule, or betas [T].
        step_noise: z_i for the steps i = T-1 .. 1, [T-1, *noise.shape]; drawn from ``generator`` when None.
        max_action: the clamp bound of x0_hat and of the result.
        predict_epsilon: the network predicts the noise (True) or x0 (False).
        clip_denoised: clamp x0_hat every step; clip: clamp the result.
    Returns: actions with the shape of noise.
    """
    sch = as_schedule(schedule, n_timesteps)
    check_ddpm_sample(net, noise, obs, sch, step_noise, max_action, predict_epsilon, clip_denoised, clip)
    return _ddpm_sample(net, noise, obs, sch, step_noise, float(max_action), predict_epsilon, clip_denoised, clip,
                        generator)


def ddpm_time_inputs(n_timesteps: int):
    """The network's time inputs in evaluation order: [T-1, ..., 0] as floats."""
    return [float(i) for i in range(n_timesteps - 1, -1, -1)]


__all__ = ["SCHEDULES", "T_DEFAULT", "BUFFERS", "SAMPLER_BUFFERS", "DDPMSchedule", "beta_schedule", "as_schedule",
           "ddpm_sample", "check_ddpm_sample", "ddpm_time_inputs"]
