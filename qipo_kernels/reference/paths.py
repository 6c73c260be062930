"""Probability paths for flow matching / diffusion, in the package's time convention.

Convention (the whole package): **noise at t = 0, data at t = 1**.

    x_t = alpha(t) * a + sigma(t) * z,   a = clean action, z ~ N(0, I)

paths:
    "ot"     alpha = t, sigma = 1 - t; target = velocity  a - z          (rectified flow / FQL)
    "ot-eps" alpha = t, sigma = 1 - t; target = noise     z              (QIPO-OT official code)
    "vp"     linear VP schedule (beta0 = 0.1, beta1 = 20) with s = 1 - t the diffusion time:
             alpha = exp(-s^2 (beta1 - beta0) / 4 - s beta0 / 2), sigma = sqrt(1 - alpha^2);
             target = noise z                                           (QIPO-Diff)

QIPO's official code puts data at t = 0; convert with t_ours = 1 - t_theirs.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .. import _checks as C

PATHS = ("ot", "ot-eps", "vp")
VP_BETA0 = 0.1
VP_BETA1 = 20.0
# The VP path is trained on diffusion times s in [VP_EPS, 1], i.e. t in [0, 1 - VP_EPS].
VP_EPS = 1e-3


def alpha_sigma(t: torch.Tensor, path: str, beta0: float = VP_BETA0, beta1: float = VP_BETA1):
    """(alpha(t), sigma(t)) of a path, elementwise in t (package convention: data at t = 1)."""
    if path in ("ot", "ot-eps"):
        return t, 1.0 - t
    if path == "vp":
        s = 1.0 - t
        log_alpha = -0.25 * s * s * (beta1 - beta0) - 0.5 * s * beta0
        alpha = torch.exp(log_alpha)
        sigma = torch.sqrt(-torch.expm1(2.0 * log_alpha))
        return alpha, sigma
    raise ValueError(f"path must be one of {PATHS}, got {path!r}")


def log_snr(t: torch.Tensor, path: str) -> torch.Tensor:
    """lambda(t) = log(alpha / sigma), increasing in t."""
    if path in ("ot", "ot-eps"):
        return torch.log(t) - torch.log1p(-t)
    alpha, sigma = alpha_sigma(t, path)
    return torch.log(alpha) - torch.log(sigma)


def inverse_log_snr(lam: torch.Tensor, path: str, beta0: float = VP_BETA0, beta1: float = VP_BETA1) -> torch.Tensor:
    """t such that log_snr(t) = lam (closed form for both path families)."""
    if path in ("ot", "ot-eps"):
        return torch.sigmoid(lam)
    if path == "vp":
        # log alpha = -0.5 * log(1 + exp(-2 lam));  solve  (b1-b0)/4 s^2 + b0/2 s + log alpha = 0
        log_alpha = -0.5 * torch.nn.functional.softplus(-2.0 * lam)
        a = 0.25 * (beta1 - beta0)
        b = 0.5 * beta0
        s = 2.0 * (-log_alpha) / (b + torch.sqrt(b * b - 4.0 * a * log_alpha))
        return 1.0 - s
    raise ValueError(f"path must be one of {PATHS}, got {path!r}")


def _flow_path(actions, noise, t, path):
    tt = t.to(actions.dtype).unsqueeze(-1)
    alpha, sigma = alpha_sigma(tt, path)
    x_t = alpha * actions + sigma * noise
    if path == "ot":
        target = actions - noise
    else:
        target = noise
    return x_t, target


def check_flow_path(actions, noise, t, path):
    C.choice("path", path, PATHS)
    C.tensor("actions", actions)
    if actions.dim() < 2:
        raise ValueError(f"actions must be [..., D] with at least 2 dims (e.g. [B, M, D]), got {tuple(actions.shape)}")
    C.tensor("noise", noise)
    if noise.shape != actions.shape:
        raise ValueError(f"noise must have the shape of actions {tuple(actions.shape)}, got {tuple(noise.shape)}")
    C.tensor("t", t)
    if tuple(t.shape) != tuple(actions.shape[:-1]):
        raise ValueError(f"t must have shape {tuple(actions.shape[:-1])} (actions without the last dim), got {tuple(t.shape)}")
    C.same_device(actions=actions, noise=noise, t=t)
    C.same_dtype(actions=actions, noise=noise)


def flow_path(actions: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, path: str = "ot") -> Tuple[torch.Tensor, torch.Tensor]:
    """Point on the path and regression target.

    Args:
        actions: clean actions a, [..., D] (e.g. [B, M, D]).
        noise:   z, same shape.
        t:       times in [0, 1], shape [...] (actions without the last dim).
        path:    "ot" | "ot-eps" | "vp".
    Returns:
        (x_t, target), both [..., D]: target is a - z for "ot", z for "ot-eps" and "vp".
    """
    check_flow_path(actions, noise, t, path)
    return _flow_path(actions, noise, t, path)
