"""Candidate selection: pick one of K candidate actions per state by its Q value."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _checks as C

SELECT_MODES = ("argmax", "softmax")


def check_select_action(q_values, candidates, mode, temperature, uniform):
    C.tensor("q_values", q_values, ndim=2)
    B, K = q_values.shape
    if B == 0 or K == 0:
        raise ValueError(f"q_values must be non-empty [B, K], got {tuple(q_values.shape)}")
    C.tensor("candidates", candidates, ndim=3)
    if candidates.shape[:2] != (B, K):
        raise ValueError(f"candidates must be [{B}, {K}, D] to match q_values, got {tuple(candidates.shape)}")
    C.finite("q_values", q_values)
    C.choice("mode", mode, SELECT_MODES)
    C.positive_float("temperature", temperature)
    if uniform is not None:
        C.tensor("uniform", uniform, shape=(B,))
        C.unit_interval("uniform", uniform)  # (a host sync: skipped during graph capture / tracing)
    C.same_device(q_values=q_values, candidates=candidates, uniform=uniform)


def select_index(q_values: torch.Tensor, mode: str = "argmax", temperature: float = 1.0,
                 uniform: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Index [B] (int64) of the chosen candidate per state.

    "argmax": the first index of the largest Q.
    "softmax": a draw from softmax(Q / temperature) by inverse CDF with u ~ U[0, 1) per state
               (``uniform`` [B] when given, so every backend can be checked on the same draw):
               the smallest k with cumsum(p)[k] > u. The logits are (Q - max Q) / temperature in
               float64: the difference first, so that a tiny temperature (1e-300) or a huge Q
               cannot overflow (the max gets logit 0, the rest <= 0; ties share the mass).
    """
    if mode == "argmax":
        return q_values.argmax(dim=1)
    q = q_values.double()
    p = torch.softmax((q - q.amax(dim=1, keepdim=True)) / temperature, dim=1)
    if uniform is None:
        uniform = torch.rand(q_values.shape[0], dtype=torch.float64, device=q_values.device, generator=generator)
    cdf = p.cumsum(dim=1)
    idx = (cdf <= uniform.double()[:, None]).sum(dim=1)
    return idx.clamp_max(q_values.shape[1] - 1)


def select_action(q_values: torch.Tensor, candidates: torch.Tensor, mode: str = "argmax", temperature: float = 1.0,
                  uniform: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Choose one candidate per state.

    Args:
        q_values: [B, K] scores (e.g. min(Q1, Q2) of each candidate), finite.
        candidates: [B, K, D].
        mode: "argmax" | "softmax" (Diffusion-QL / CPQL evaluation draws from softmax(Q)).
        temperature: softmax temperature > 0.
        uniform: optional u [B] in [0, 1) for the softmax draw.
    Returns: [B, D].
    """
    check_select_action(q_values, candidates, mode, temperature, uniform)
    idx = select_index(q_values, mode, float(temperature), uniform, generator)
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), idx]
