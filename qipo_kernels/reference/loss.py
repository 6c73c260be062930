"""Energy-weighted flow-matching loss (QIPO / EFM), plain PyTorch reference."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _checks as C

NORMALIZE = ("support", "batch")
# beta is a float32 scalar in the fused kernels: above float32's largest value it would be inf
# there (and inf * 0 = NaN at the maximum energy).
BETA_MAX = float(torch.finfo(torch.float32).max)


def energy_weights(energy: torch.Tensor, beta: float, normalize: str = "support") -> torch.Tensor:
    """w = exp(beta * energy) normalised, [B, M] -> [B, M].

    "support": softmax over each state's M support actions; the weights of one state sum to 1,
               the loss then averages states (QIPO official code).
    "batch":   softmax over all B*M pairs, multiplied by B*M so the weights average to 1
               (w = exp(beta Q) / E_batch[exp(beta Q)], the paper's Algorithm 1).
    The logits are beta * (energy - max energy): the difference is formed first (exact for
    energies within a factor 2 of each other), so large energies with a small spread (Q = 5e3 +
    N(0, 1)) keep their float32 precision and beta * energy can never overflow. Every backend
    computes it this way. float16 / bfloat16 energies are computed in float32 (as the fused
    kernels do); the result has energy's dtype.
    """
    e = energy if energy.dtype in (torch.float32, torch.float64) else energy.float()
    if normalize == "support":
        return torch.softmax(beta * (e - e.amax(dim=1, keepdim=True)), dim=1).to(energy.dtype)
    n = e.numel()
    w = torch.softmax((beta * (e - e.max())).reshape(-1), dim=0).reshape(e.shape) * n
    return w.to(energy.dtype)


def draw_weighted_pairs(energy: torch.Tensor, beta: float, normalize: str = "support",
                        generator: Optional[torch.Generator] = None):
    """Draw (state, support-slot) pairs with probability proportional to the energy weights: the
    sampled estimator of the energy-weighted loss. energy [B, M] -> (rows [B], cols [B]), int64.

    "support": one slot per state, cols[b] ~ softmax_m(beta * energy[b]), rows = arange(B); then
               E[mean_b l[b, cols[b]]] = mean_b sum_m w[b, m] l[b, m], the support-normalised loss.
    "batch":   B pairs drawn with replacement from softmax over all B*M pairs; then
               E[mean_k l[rows[k], cols[k]]] = mean_{b,m} (B M softmax_{b,m}) l[b, m], the batch-normalised loss.
    Plain flow matching on the drawn pairs is thus an unbiased estimate of ``weighted_fm_loss`` and of its
    gradient (for the same t and noise distribution) that runs the network on B rows instead of B*M.
    The weights are ``energy_weights`` (max-subtracted, float32 for half-precision energies).
    """
    C.tensor("energy", energy, ndim=2)
    B, M = energy.shape
    if B == 0 or M == 0:
        raise ValueError(f"energy must be non-empty [B, M], got {tuple(energy.shape)}")
    C.finite("energy", energy)
    _check_weighting(beta, normalize)
    w = energy_weights(energy.detach().float() if energy.dtype != torch.float64 else energy.detach(), float(beta),
                       normalize)
    if normalize == "support":
        rows = torch.arange(B, device=energy.device)
        cols = torch.multinomial(w, 1, generator=generator)[:, 0]
        return rows, cols
    flat = torch.multinomial(w.reshape(-1), B, replacement=True, generator=generator)
    return flat // M, flat % M


def dequantize_bounds(actions: torch.Tensor, sigma: float, z: Optional[torch.Tensor] = None,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Flow-matching targets at the action box's edge, read as censored: actions [..., A] -> same shape.

    An environment clips actions to [-1, 1], so a dataset action at +-1 (19-48% of the coordinates of the
    locomotion datasets here) stands for "at or beyond the bound": an atom that a continuous flow model
    cannot represent (it puts that mass just inside, near 0.94: bench/results/qipo_saturation.md). Each
    coordinate with |a| >= 1 becomes sign(a) (1 + sigma |z|), z ~ N(0, 1) (``z``: fixed draws of actions'
    shape, else drawn from ``generator``): a half-normal tail beyond the bound, which the model can learn
    and the sampler's clamp to [-1, 1] maps back onto the bound. Coordinates inside the box and NaN are
    unchanged; sigma = 0 returns ``actions`` itself. Not part of the papers (FlowPolicy.loss's
    ``bound_dequant``, QIPOConfig.bound_dequant; off by default).
    """
    C.tensor("actions", actions)
    sigma = C.positive_float("sigma", sigma, allow_zero=True)
    if z is not None:
        C.tensor("z", z, shape=tuple(actions.shape))
        C.same_device(actions=actions, z=z)
    if sigma == 0.0:
        return actions
    if z is None:
        z = torch.randn(actions.shape, dtype=actions.dtype, device=actions.device, generator=generator)
    return torch.where(actions.abs() >= 1.0, actions.sign() * (1.0 + sigma * z.abs()), actions)


def _weighted_fm_loss(pred, target, energy, beta, normalize, pair_weight):
    B, M, _ = pred.shape
    per_pair = ((pred - target) ** 2).sum(-1)  # [B, M]
    if pair_weight is not None:
        per_pair = per_pair * pair_weight
    if energy is None:
        return per_pair.mean()  # uniform weights: the same under both normalisations
    # weights from energies in float32 (float64 with float64 pairs), as every fused backend reads them
    wd = torch.float64 if per_pair.dtype == torch.float64 else torch.float32
    w = energy_weights(energy.to(wd), beta, normalize).to(per_pair.dtype).detach()
    if normalize == "support":
        return (per_pair * w).sum(1).mean()
    return (per_pair * w).mean()


def check_weighted_fm_loss(pred, target, energy, beta, normalize, pair_weight):
    C.tensor("pred", pred, ndim=3)
    B, M, D = pred.shape
    if B == 0 or M == 0 or D == 0:
        raise ValueError(f"pred must be non-empty [B, M, D], got {tuple(pred.shape)}")
    C.tensor("target", target, shape=(B, M, D))
    C.same_dtype(pred=pred, target=target)
    if energy is not None:
        C.tensor("energy", energy, shape=(B, M))
        C.finite("energy", energy)
    if pair_weight is not None:
        C.tensor("pair_weight", pair_weight, shape=(B, M))
        C.finite("pair_weight", pair_weight)
    C.same_device(pred=pred, target=target, energy=energy, pair_weight=pair_weight)
    _check_weighting(beta, normalize)


def _check_weighting(beta, normalize):
    """beta and normalize of the energy weights, as every loss and draw_weighted_pairs check them."""
    C.positive_float("beta", beta)
    if float(beta) > BETA_MAX:
        raise ValueError(f"beta must be <= {BETA_MAX:.7g} (the weights are computed in float32), got {beta!r}")
    C.choice("normalize", normalize, NORMALIZE)


def weighted_fm_loss(pred: torch.Tensor, target: torch.Tensor, energy: Optional[torch.Tensor] = None,
                     beta: float = 1.0, normalize: str = "support",
                     pair_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Energy-weighted flow-matching loss.

        per_pair[b, m] = lambda[b, m] * sum_d (pred - target)^2           [B, M]
        "support": loss = mean_b sum_m softmax_m(beta * energy)[b, m] * per_pair[b, m]
        "batch":   loss = mean_{b,m} (B M softmax_{b,m}(beta * energy)) * per_pair
        energy None: loss = mean_{b,m} per_pair  (both normalisations; plain flow matching)

    Args:
        pred, target: [B, M, D] (M support actions per state; M = 1 for plain batches).
        energy: Q values [B, M] (higher is better); finite. The weights are detached.
        beta: inverse temperature > 0 (QIPO default 3.0).
        normalize: "support" | "batch".
        pair_weight: optional lambda(t) per pair [B, M].
    Returns:
        scalar loss (differentiable w.r.t. pred and target).
    """
    check_weighted_fm_loss(pred, target, energy, beta, normalize, pair_weight)
    return _weighted_fm_loss(pred, target, energy, float(beta), normalize, pair_weight)


def check_flow_matching_loss(pred, actions, noise, t, path, energy, beta, normalize, pair_weight):
    from .paths import check_flow_path

    C.tensor("pred", pred, ndim=3)
    check_flow_path(actions, noise, t, path)
    if actions.shape != pred.shape:
        raise ValueError(f"actions must have the shape of pred {tuple(pred.shape)}, got {tuple(actions.shape)}")
    check_weighted_fm_loss(pred, pred, energy, beta, normalize, pair_weight)
    C.same_device(pred=pred, actions=actions)
    C.same_dtype(pred=pred, actions=actions)


def _flow_matching_loss(pred, actions, noise, t, path, energy, beta, normalize, pair_weight):
    from .paths import _flow_path

    _, target = _flow_path(actions, noise, t, path)
    return _weighted_fm_loss(pred, target, energy, beta, normalize, pair_weight)


def flow_matching_loss(pred: torch.Tensor, actions: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                       path: str = "ot", energy: Optional[torch.Tensor] = None, beta: float = 1.0,
                       normalize: str = "support", pair_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """weighted_fm_loss(pred, flow_path(actions, noise, t, path).target, energy, beta, normalize, pair_weight).

    The network saw x_t = flow_path(...)[0]; this forms the target from (actions, noise, t) so a
    fused kernel never materialises it. Shapes: pred/actions/noise [B, M, D], t/energy [B, M].
    Gradient flows to pred only through this function's use (actions, noise and t are data).
    """
    check_flow_matching_loss(pred, actions, noise, t, path, energy, beta, normalize, pair_weight)
    return _flow_matching_loss(pred, actions, noise, t, path, energy, float(beta), normalize, pair_weight)
