"""Consistency-model policy (CPQL), plain PyTorch reference.

Karras boundary parameterisation (defaults sigma_data = 0.5, sigma_min = 0.002, sigma_max = 80):

    c_skip(s) = sd^2 / ((s - s_min)^2 + sd^2)
    c_out(s)  = (s - s_min) sd / sqrt(s^2 + sd^2)
    c_in(s)   = 1 / sqrt(s^2 + sd^2)
    f(x, s | obs) = clamp(c_skip x + c_out F(c_in x, 250 ln(s + 1e-44), obs), -1, 1)

The noise level s plays the role of time: sampling starts from x = sigma_max z.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from .. import _checks as C

SIGMA_DATA = 0.5
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0
NUM_SCALES = 40


def karras_sigmas(N: int = NUM_SCALES, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, i = 0..N-1 (decreasing)."""
    C.positive_int("N", N, minimum=2)
    sigma_min = C.positive_float("sigma_min", sigma_min)
    sigma_max = C.positive_float("sigma_max", sigma_max)
    rho = C.positive_float("rho", rho)
    if not sigma_min < sigma_max:
        raise ValueError(f"need sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    i = torch.arange(N, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return ((hi + i / (N - 1) * (lo - hi)) ** rho).to(dtype=dtype, device=device)


CPQL_MULTISTEP_TS = (0, 20, 40)


def cpql_multistep_sigmas(ts=CPQL_MULTISTEP_TS, N: int = NUM_SCALES, sigma_min: float = SIGMA_MIN,
                          sigma_max: float = SIGMA_MAX, rho: float = RHO):
    """The re-noise levels of CPQL's multistep sampler (its KarrasDenoiser.sample_multistep, AntMaze):
    the Karras level at each index of ``ts`` on the N-level grid, clipped to [sigma_min, sigma_max]
    (index 40 of N = 40 lies past the grid's end and clips to sigma_min). Defaults give
    [80.0, 2.2404..., 0.002]; pass them as ``sigmas`` to consistency_sample / act / make_sampler."""
    C.positive_int("N", N, minimum=2)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    out = []
    for i in ts:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ValueError(f"ts must hold ints >= 0, got {i!r}")
        base = hi + i / (N - 1) * (lo - hi)
        t = base ** rho if base > 0 else 0.0
        out.append(float(min(max(t, sigma_min), sigma_max)))
    return out


def scalings(sigma, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN):
    """(c_skip, c_out, c_in) for noise level(s) sigma (tensor or float), elementwise."""
    if torch.is_tensor(sigma):
        sq = torch.sqrt
    else:
        sq = math.sqrt
    sd2 = sigma_data * sigma_data
    c_skip = sd2 / ((sigma - sigma_min) ** 2 + sd2)
    c_out = (sigma - sigma_min) * sigma_data / sq(sigma * sigma + sd2)
    c_in = 1.0 / sq(sigma * sigma + sd2)
    return c_skip, c_out, c_in


def time_input(sigma):
    """The network's time input for noise level sigma: 250 ln(sigma + 1e-44) (CPQL)."""
    if torch.is_tensor(sigma):
        return 250.0 * torch.log(sigma + 1e-44)
    return 250.0 * math.log(sigma + 1e-44)


def _sigma_vector(sigma, n, like):
    if torch.is_tensor(sigma):
        s = sigma.to(device=like.device, dtype=like.dtype)
        return s.reshape(1).expand(n) if s.dim() == 0 else s
    return torch.full((n,), float(sigma), dtype=like.dtype, device=like.device)


def _denoise(net, x, sigma, obs, sigma_data, sigma_min, clip):
    s = _sigma_vector(sigma, x.shape[0], x)
    c_skip, c_out, c_in = scalings(s[:, None], sigma_data, sigma_min)
    out = c_skip * x + c_out * net(c_in * x, time_input(s), obs)
    return out.clamp(-1.0, 1.0) if clip else out


def _check_net_x_obs(net, x, obs, xname="x"):
    if not callable(net):
        raise TypeError(f"net must be callable as net(x, t, obs), got {type(net).__name__}")
    if x.__class__ is not torch.Tensor or x.dtype not in C.FLOAT_DTYPES:  # (the passing case without a call)
        C.tensor(xname, x)
    if x.dim() not in (2, 3):
        raise ValueError(f"{xname} must be [N, A] or [B, K, A], got shape {tuple(x.shape)}")
    if obs.__class__ is not torch.Tensor or obs.dtype not in C.FLOAT_DTYPES or obs.dim() != 2:
        C.tensor("obs", obs, ndim=2)
    if obs.shape[0] != x.shape[0]:
        raise ValueError(f"obs must have {x.shape[0]} rows, got {obs.shape[0]}")
    if x.shape[-1] == 0 or (x.dim() == 3 and x.shape[1] == 0):
        C.nonempty_samples(xname, x)
    if not (x.is_cpu and obs.is_cpu) and x.device != obs.device:  # (both on the CPU: one device)
        C.same_device(**{xname: x, "obs": obs})
    if x.dtype is not obs.dtype:
        C.same_dtype(**{xname: x, "obs": obs})
    dt = C.module_dtype(net)
    if dt is not None and x.dtype is not dt:
        C.module_inputs("net", net, **{xname: x})


def consistency_denoise(net: Callable, x: torch.Tensor, sigma, obs: torch.Tensor,
                        sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN, clip: bool = True):
    """f(x, sigma | obs): one consistency-function evaluation.

    Args:
        x: [N, A] noisy actions; sigma: float, 0-d tensor or [N]; obs: [N, S].
    Returns: [N, A] denoised actions (clamped to [-1, 1] when clip).
    """
    _check_net_x_obs(net, x, obs)
    if x.dim() != 2:
        raise ValueError(f"x must be [N, A], got shape {tuple(x.shape)}")
    if torch.is_tensor(sigma) and sigma.dim() > 0 and tuple(sigma.shape) != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or [{x.shape[0]}], got shape {tuple(sigma.shape)}")
    return _denoise(net, x, sigma, obs, sigma_data, sigma_min, clip)


def _consistency_sample(net, noise, obs, sigmas, step_noise, sigma_max, sigma_min, sigma_data, clip, generator):
    if noise.dim() == 3:
        B, K, A = noise.shape
        z, o, shape3 = noise.reshape(B * K, A), obs.repeat_interleave(K, dim=0), (B, K, A)
    else:
        z, o, shape3 = noise, obs, None
    a = _denoise(net, sigma_max * z, sigma_max, o, sigma_data, sigma_min, clip)
    for k, s in enumerate(sigmas or ()):
        if step_noise is not None:
            zk = step_noise[k].reshape(z.shape)
        else:
            zk = torch.randn(z.shape, dtype=z.dtype, device=z.device, generator=generator)
        x = a + math.sqrt(max(s * s - sigma_min * sigma_min, 0.0)) * zk
        a = _denoise(net, x, s, o, sigma_data, sigma_min, clip)
    return a.reshape(shape3) if shape3 is not None else a


def check_sigmas(sigma_max, sigma_min, sigma_data, dtype: torch.dtype) -> None:
    """0 < sigma_min < sigma_max <= C.sigma_limit(dtype), 0 < sigma_data <= C.sigma_limit(dtype).

    The limit (9.2e18 in float32, 128 in float16) keeps sigma^2 finite in the dtype the scalings
    are computed in; past it every action would come out 0 (see _checks.sigma_limit)."""
    if not (sigma_max.__class__ is float and sigma_min.__class__ is float and sigma_data.__class__ is float
            and 0.0 < sigma_min < sigma_max <= _LIMIT.get(dtype, 0.0) and 0.0 < sigma_data <= _LIMIT[dtype]):
        C.positive_float("sigma_max", sigma_max)  # (the common case above without a call)
        C.positive_float("sigma_min", sigma_min)
        C.positive_float("sigma_data", sigma_data)
        if not float(sigma_min) < float(sigma_max):
            raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}")
        lim = C.sigma_limit(dtype)
        for name, v in (("sigma_max", sigma_max), ("sigma_data", sigma_data)):
            if float(v) > lim:
                raise ValueError(f"{name} must be <= {lim:.3g} for {dtype} inputs (the Karras scalings square it: "
                                 f"past that sigma^2 overflows and every action is 0), got {v!r}")


_LIMIT = {dt: C.sigma_limit(dt) for dt in C.FLOAT_DTYPES}


def check_consistency_sample(net, noise, obs, sigmas, step_noise, sigma_max, sigma_min, sigma_data):
    _check_net_x_obs(net, noise, obs, "noise")
    check_sigmas(sigma_max, sigma_min, sigma_data, noise.dtype)
    if sigmas is not None:
        if isinstance(sigmas, (str, bytes)) or not hasattr(sigmas, "__len__"):
            raise TypeError(f"sigmas must be a sequence of floats, got {type(sigmas).__name__}")
        for s in sigmas:
            if not (sigma_min <= float(s) <= sigma_max):
                raise ValueError(f"every sigma in sigmas must lie in [sigma_min, sigma_max] = [{sigma_min}, {sigma_max}], got {float(s)}")
    if step_noise is not None:
        n = len(sigmas) if sigmas is not None else 0
        C.tensor("step_noise", step_noise, shape=(n,) + tuple(noise.shape))
        C.same_device(noise=noise, step_noise=step_noise)
        C.same_dtype(noise=noise, step_noise=step_noise)


def consistency_sample(net: Callable, noise: torch.Tensor, obs: torch.Tensor, sigmas: Optional[Sequence[float]] = None,
                       step_noise: Optional[torch.Tensor] = None, sigma_max: float = SIGMA_MAX,
                       sigma_min: float = SIGMA_MIN, sigma_data: float = SIGMA_DATA, clip: bool = True,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Consistency sampling: one step from sigma_max, then optional re-noise/denoise steps.

        a = f(sigma_max z, sigma_max)
        for s in sigmas:  x = a + sqrt(s^2 - sigma_min^2) z_k;  a = f(x, s)

    Args:
        noise: z, [N, A] (obs [N, S]) or [B, K, A] (obs [B, S], K samples per state).
        sigmas: None (one step, CPQL's default) or the extra noise levels: CPQL's multistep (AntMaze) is
            ``cpql_multistep_sigmas()`` = [80.0, 2.2404..., 0.002], the levels ts = [0, 20, 40] of the
            N = 40 Karras grid, clipped to [sigma_min, sigma_max].
        step_noise: z_k for the extra steps, [len(sigmas), *noise.shape]; drawn from ``generator``
            when None.
    Returns: actions with the shape of noise.
    """
    check_consistency_sample(net, noise, obs, sigmas, step_noise, sigma_max, sigma_min, sigma_data)
    sig = [float(s) for s in sigmas] if sigmas is not None else None
    return _consistency_sample(net, noise, obs, sig, step_noise, float(sigma_max), float(sigma_min),
                               float(sigma_data), clip, generator)


def consistency_loss(net: Callable, actions: torch.Tensor, obs: torch.Tensor, sigma_idx: Optional[torch.Tensor] = None,
                     noise: Optional[torch.Tensor] = None, num_scales: int = NUM_SCALES, sigma_min: float = SIGMA_MIN,
                     sigma_max: float = SIGMA_MAX, rho: float = RHO, sigma_data: float = SIGMA_DATA,
                     generator: Optional[torch.Generator] = None, reduction: str = "mean") -> torch.Tensor:
    """CPQL's reconstruction loss with Karras weights.

        i ~ U{0..N-2}, s = sigma_i, x = a + s z
        loss_n = mean_d (f(x, s) - a)^2 * (1 / s^2 + 1 / sigma_data^2)

    Args:
        actions: clean actions [N, A] in [-1, 1]; obs: [N, S].
        sigma_idx: optional int64 indices [N] into karras_sigmas(num_scales) (drawn when None).
        noise: optional z [N, A] (drawn when None).
        reduction: "mean" (scalar) or "none" ([N]).
    """
    _check_net_x_obs(net, actions, obs, "actions")
    if actions.dim() != 2:
        raise ValueError(f"actions must be [N, A], got shape {tuple(actions.shape)}")
    if actions.shape[0] == 0:
        raise ValueError(f"actions must have at least one row (the mean over none is undefined), got shape "
                         f"{tuple(actions.shape)}")
    C.choice("reduction", reduction, ("mean", "none"))
    check_sigmas(sigma_max, sigma_min, sigma_data, actions.dtype)
    n, A = actions.shape
    sig = karras_sigmas(num_scales, sigma_min, sigma_max, rho, dtype=actions.dtype, device=actions.device)
    if sigma_idx is None:
        sigma_idx = torch.randint(0, num_scales - 1, (n,), device=actions.device, generator=generator)
    else:
        C.tensor("sigma_idx", sigma_idx, shape=(n,), dtypes=(torch.int64, torch.int32))
        if int(sigma_idx.min()) < 0 or int(sigma_idx.max()) > num_scales - 2:
            raise ValueError(f"sigma_idx must lie in [0, {num_scales - 2}]")
    if noise is None:
        noise = torch.randn(actions.shape, dtype=actions.dtype, device=actions.device, generator=generator)
    else:
        C.tensor("noise", noise, shape=(n, A))
    s = sig[sigma_idx.long()]
    x = actions + s[:, None] * noise
    den = _denoise(net, x, s, obs, sigma_data, sigma_min, True)
    w = 1.0 / (s * s) + 1.0 / (sigma_data * sigma_data)
    per = ((den - actions) ** 2).mean(-1) * w
    return per.mean() if reduction == "mean" else per
