"""Host-side tables of the fused samplers: solver / consistency coefficients (float64 math exactly
as the references do it, stored as float32, NCOEF columns) and the time embedding's share of layer 1
(W1_t @ e(t) per evaluation time, float32 [n_evals, HP])."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..nets import ConditionalMLP
from ..reference import consistency as _cons
from ..reference import ode as _ode
from ..reference import paths as _paths
from .sampler_kernel import NCOEF


def _flow_tables(steps, solver, t0, t1, path):
    """(evaluation times, coefficient rows) for one solver configuration."""
    a, b = _ode.time_grid(steps, float(t0), float(t1), solver, path)
    h = (b - a) / steps
    times, rows = [], []
    for i in range(steps):
        t = a + i * h
        if solver in _ode.VELOCITY_SOLVERS:
            if solver == "euler":
                times += [t]
                rows.append([h, 0.0, 0.0])
            elif solver == "midpoint":
                times += [t, t + 0.5 * h]
                rows.append([h, 0.5 * h, 0.0])
            elif solver == "heun":
                times += [t, t + h]
                rows.append([h, 0.5 * h, 0.0])
            else:
                times += [t, t + 0.5 * h, t + 0.5 * h, t + h]
                rows.append([h, 0.5 * h, h / 6.0])
            continue
        t_next = a + (i + 1) * h if i + 1 < steps else b
        tt = torch.tensor(t, dtype=torch.float64)
        tn = torch.tensor(t_next, dtype=torch.float64)
        a_t, s_t = _paths.alpha_sigma(tt, path)
        a_n, s_n = _paths.alpha_sigma(tn, path)
        if solver in ("ddim", "dpm1"):
            times += [t]
            rows.append([float(s_t), float(a_t), float(s_n / s_t),
                         float(a_n * (1.0 - (s_n * a_t) / (a_n * s_t)))])
        else:
            lam_t, lam_n = _paths.log_snr(tt, path), _paths.log_snr(tn, path)
            hl = lam_n - lam_t
            tm = _paths.inverse_log_snr(lam_t + 0.5 * hl, path)
            a_m, s_m = _paths.alpha_sigma(tm, path)
            phi_m = torch.expm1(-0.5 * hl)
            phi_n = -(1.0 - (s_n * a_t) / (a_n * s_t))
            times += [t, float(tm)]
            rows.append([float(s_t), float(a_t), float(s_m / s_t), float(a_m * phi_m), float(s_m), float(a_m),
                         float(s_n / s_t), float(a_n * phi_n)])
    return times, rows


def _consistency_tables(sigmas, sigma_max, sigma_min, sigma_data, dtype):
    """Per evaluation e (0: sigma_max, then each sigma): [c_skip, c_out, c_in, x-scale] and the
    network time input 250 ln(sigma + 1e-44); scalings computed in the reference's float dtype."""
    levels = [sigma_max] + list(sigmas or [])
    cdt = torch.promote_types(dtype, torch.float32)
    s = torch.tensor(levels, dtype=torch.float64).to(cdt)
    c_skip, c_out, c_in = _cons.scalings(s, sigma_data, sigma_min)
    tin = _cons.time_input(s)
    rows = []
    for e, lv in enumerate(levels):
        scale = sigma_max if e == 0 else math.sqrt(max(lv * lv - sigma_min * sigma_min, 0.0))
        rows.append([float(c_skip[e]), float(c_out[e]), float(c_in[e]), scale])
    return [float(v) for v in tin], rows, cdt


def _ddpm_tables(rows, max_action, clip_denoised):
    """(network time inputs [T-1, ..., 0], coefficient rows) of reference.ddpm._ddpm_sample; ``rows``
    are DDPMSchedule.rows() (float32 values per step i). Evaluation e is step i = T-1-e; its row is
    [sqrt(1/abar_i), sqrt(1/abar_i - 1), c1_i, c2_i, std_i (0 at i = 0), lo, hi, max_action] with
    [lo, hi] the x0_hat clamp (+-max_action, or +-inf without clip_denoised)."""
    T = len(rows)
    lo, hi = (-max_action, max_action) if clip_denoised else (-math.inf, math.inf)
    out = []
    for i in range(T - 1, -1, -1):
        cr, crm1, c1, c2, sd = rows[i]
        out.append([cr, crm1, c1, c2, sd if i > 0 else 0.0, lo, hi, max_action])
    return [float(i) for i in range(T - 1, -1, -1)], out


def _coef_tensor(rows, device):
    c = torch.zeros(max(len(rows), 1), NCOEF, dtype=torch.float64)
    for i, r in enumerate(rows):
        c[i, : len(r)] = torch.tensor(r, dtype=torch.float64)
    return c.to(torch.float32).to(device)


def _time_share(net: ConditionalMLP, times: torch.Tensor, time_dtype: torch.dtype, HP: int) -> torch.Tensor:
    """[len(times), HP] float32: W1_t @ e(t) for each evaluation time (times float64; rows padded with 0).

    The reference rounds each time to the network's float dtype (float32 at least here); the time
    embedding is then evaluated in float32."""
    A, T = net.act_dim, net.t_dim
    with torch.no_grad():
        t = times.to(time_dtype).to(torch.float32)
        if net.time_mlp is None:
            e = t[:, None]
        elif all(p.dtype == torch.float32 for p in net.time_mlp.parameters()):
            e = net.time_mlp(t)
        else:
            state = {k: v.float() for k, v in net.time_mlp.named_parameters()}
            state.update({k: v.float() for k, v in net.time_mlp.named_buffers()})
            e = torch.func.functional_call(net.time_mlp, state, (t,))
        w1t = net.layers[0].weight.detach()[:, A:A + T].float()
        share = e @ w1t.t()
        return F.pad(share, (0, HP - share.shape[1])).contiguous()
