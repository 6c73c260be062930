"""The fused sampler as torch.library custom ops, with fake implementations (torch.compile).

    qipo_kernels::triton_policy_sample          one fused launch (integrate / consistency / act)
    qipo_kernels::triton_policy_sample_seeded   integrate with the noise drawn in the kernel
    qipo_kernels::triton_sampler_flow_tables    solver evaluation times + coefficients
    qipo_kernels::triton_sampler_consistency_tables

The ops take tensors and plain scalars only (packed weight tensors, tables, inputs, configuration
ints / floats). Under torch.compile the callers in sampler.py go through these ops (the fake
implementations give the output shapes); eager callers skip the dispatcher and call the launcher
directly (same code, ~20 us less per call). Every output is allocated through _host.empty (tests
poison it with NaN).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ..reference import ode as _ode
from . import _host
from .sampler_kernel import MODE_INTEGRATE, NCOEF, is_group
from .sampler_launch import launch
from .sampler_tables import _coef_tensor, _consistency_tables, _flow_tables

_MAX_TABLES = 64

# The tables as custom ops: their host float64 math (float() of tensors) cannot be traced by
# torch.compile, and as ops they are recomputed when steps / solver / sigmas change instead of
# being frozen into a compiled graph. Eager calls cache them with the packed weights
# (sampler_pack.cached_table).
_OP_TABLES: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def _op_tables(key, build):
    """Device copies of the tables, built once per configuration; the ops return fresh clones
    (device-to-device copies: no host transfer inside a CUDA graph captured after a warm-up call,
    e.g. by torch.compile(mode="reduce-overhead"))."""
    tab = _OP_TABLES.get(key)
    if tab is None:
        if len(_OP_TABLES) >= _MAX_TABLES:
            _OP_TABLES.clear()
        tab = _OP_TABLES[key] = build()
    return tab[0].clone(), tab[1].clone()


@torch.library.custom_op("qipo_kernels::triton_sampler_flow_tables", mutates_args=())
def _flow_tables_op(steps: int, solver: str, t0: float, t1: float, path: Optional[str],
                    device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(evaluation times [steps * STAGES[solver]] float64, coefficients [steps, NCOEF] float32)."""
    def build():
        times, rows = _flow_tables(steps, solver, t0, t1, path)
        return torch.tensor(times, dtype=torch.float64).to(device), _coef_tensor(rows, device)

    return _op_tables(("flow", steps, solver, t0, t1, path, str(device)), build)


@_flow_tables_op.register_fake
def _(steps, solver, t0, t1, path, device):
    return (torch.empty(steps * _ode.STAGES[solver], dtype=torch.float64, device=device),
            torch.empty(max(steps, 1), NCOEF, dtype=torch.float32, device=device))


@torch.library.custom_op("qipo_kernels::triton_sampler_consistency_tables", mutates_args=())
def _consistency_tables_op(sigmas: List[float], sigma_max: float, sigma_min: float, sigma_data: float,
                           dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(network time inputs [1 + len(sigmas)] float64, coefficients [1 + len(sigmas), NCOEF] float32)."""
    def build():
        tin, rows, _ = _consistency_tables(sigmas, sigma_max, sigma_min, sigma_data, dtype)
        return torch.tensor(tin, dtype=torch.float64).to(device), _coef_tensor(rows, device)

    return _op_tables(("cons", tuple(sigmas), sigma_max, sigma_min, sigma_data, dtype, str(device)), build)


@_consistency_tables_op.register_fake
def _(sigmas, sigma_max, sigma_min, sigma_data, dtype, device):
    n = 1 + len(sigmas)
    return (torch.empty(n, dtype=torch.float64, device=device),
            torch.empty(n, NCOEF, dtype=torch.float32, device=device))


# ---- the launch as a torch.library custom op (torch.compile traces it; fake impl below) ----
@torch.library.custom_op("qipo_kernels::triton_policy_sample", mutates_args=())
def _policy_sample_op(x0: torch.Tensor, obs: torch.Tensor, step_noise: Optional[torch.Tensor],
                      uniform: Optional[torch.Tensor], tvec: torch.Tensor, coef: torch.Tensor,
                      policy: List[torch.Tensor], critic: List[torch.Tensor], mode: int, num_candidates: int,
                      steps: int, n_evals: int, solver_code: int, act_code: int, depth: int, critic_act_code: int,
                      critic_depth: int, critic_hidden: int, critic_layer_norm: bool, ln_eps: float,
                      temperature: float, clip: bool, softmax: bool,
                      trajectory: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """One fused launch. x0 [N, A] (N = B * num_candidates in the act modes), obs [B or N, S],
    step_noise [n_evals - 1, N, A] | None, uniform [B] float64 | None, tvec [n_evals, HP] float32,
    coef [*, NCOEF] float32, policy: 7 packed tensors, critic: 14 / 18 packed tensors (act modes) or [].

    Returns (actions, trajectory): actions [N, A] (MODE_INTEGRATE / MODE_CONSISTENCY) or [B, A] (act
    modes); trajectory [steps + 1, N, A] when ``trajectory`` else an empty [0] tensor.
    """
    N, A = x0.shape
    B, S = obs.shape
    dtype, device = x0.dtype, x0.device
    group = is_group(mode)
    out = _host.empty((B, A) if group else (N, A), dtype, device)
    traj = _host.empty((steps + 1, N, A), dtype, device) if trajectory else torch.empty(0, dtype=dtype, device=device)
    if (B if group else N) > 0:
        launch(mode, policy, critic, x0, obs, step_noise, uniform, out, traj if trajectory else None, tvec, coef,
                N, B, num_candidates, A, S, steps, n_evals, temperature, solver_code, act_code, depth,
                critic_act_code, critic_depth, critic_hidden, critic_layer_norm, ln_eps, clip, softmax)
    return out, traj


@_policy_sample_op.register_fake
def _(x0, obs, step_noise, uniform, tvec, coef, policy, critic, mode, num_candidates, steps, n_evals, solver_code,
      act_code, depth, critic_act_code, critic_depth, critic_hidden, critic_layer_norm, ln_eps, temperature, clip,
      softmax, trajectory):
    N, A = x0.shape
    out = x0.new_empty((obs.shape[0], A) if is_group(mode) else (N, A))
    traj = x0.new_empty((steps + 1, N, A) if trajectory else (0,))
    return out, traj



@torch.library.custom_op("qipo_kernels::triton_policy_sample_seeded", mutates_args=())
def _seeded_sample_op(obs: torch.Tensor, tvec: torch.Tensor, coef: torch.Tensor, policy: List[torch.Tensor],
                      num_samples: int, act_dim: int, seed: int, steps: int, solver_code: int, act_code: int,
                      depth: int, trajectory: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """ODE sampling with the initial noise drawn in the kernel: obs [B, S] -> ([B, num_samples, act_dim],
    trajectory [steps + 1, B, num_samples, act_dim] or an empty [0]); x0[b, k, a] =
    tl.randn(seed, (b * num_samples + k) * act_dim + a), never stored (except as trajectory[0])."""
    B, S = obs.shape
    N, A = B * num_samples, act_dim
    dtype, device = obs.dtype, obs.device
    out = _host.empty((B, num_samples, A), dtype, device)
    traj = (_host.empty((steps + 1, B, num_samples, A), dtype, device) if trajectory
            else torch.empty(0, dtype=dtype, device=device))
    if N > 0:
        launch(MODE_INTEGRATE, policy, [], None, obs, None, None, out, traj if trajectory else None, tvec, coef,
                N, B, num_samples, A, S, steps, 0, 1.0, solver_code, act_code, depth, 0, 1, 1, False, 0.0, False,
                False, seed=seed)
    return out, traj


@_seeded_sample_op.register_fake
def _(obs, tvec, coef, policy, num_samples, act_dim, seed, steps, solver_code, act_code, depth, trajectory):
    B = obs.shape[0]
    out = obs.new_empty((B, num_samples, act_dim))
    traj = obs.new_empty((steps + 1, B, num_samples, act_dim) if trajectory else (0,))
    return out, traj
