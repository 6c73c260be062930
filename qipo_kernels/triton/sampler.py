"""Fused Triton samplers: a whole ConditionalMLP, every solver step, in one launch.

Ops registered here (backend "triton"):

    integrate(net, x0, obs, steps, solver, t0, t1, path, return_trajectory)
        x0 [N, A] with obs [N, S], or x0 [B, K, A] with obs [B, S]  ->  x(t1), x0's shape
        (and the trajectory [steps + 1, *x0.shape] when asked).
    consistency_sample(net, noise, obs, sigmas, step_noise, sigma_max, sigma_min, sigma_data, clip, generator)
        noise [N, A] / [B, K, A]  ->  actions, noise's shape.
    act(net, critic, obs, num_candidates, sampler, steps, solver, path, sigmas, mode, temperature,
        noise, step_noise, uniform, generator, clip)
        obs [B, S]  ->  actions [B, A]: K candidates per state sampled, scored by min(Q1, Q2) of the
        DoubleCritic and one chosen (argmax or softmax inverse-CDF draw) -- all in ONE launch.
    sample(net, obs, num_samples, steps, solver, path, seed, return_trajectory)
        obs [B, S]  ->  [B, num_samples, A]: integrate with the noise drawn in the kernel from ``seed``.

How the kernel is organised (one program = a tile of BM samples, persistent over tiles):

* The observation's share of the first layer, W1_obs @ obs + b1, is computed once per tile (i.e.
  once per sample, not once per step) into a float32 scratch row block and re-read at every
  network evaluation.
* The time embedding's share W1_t @ e(t) does not depend on the sample: it is one vector per
  network evaluation, computed on the host for all evaluation times at once (a tiny torch
  computation, [n_evals, H], cached with the packed weights) and read from that table. Any time
  embedding ConditionalMLP has is therefore supported.
* Hidden activations go through a per-program scratch block ([2, BM, H] ping-pong, in the compute
  dtype) that stays in L1/L2; each layer is a loop of tl.dot over BN x BK blocks, so any hidden
  width up to 512 and depth 1..6 is one code path. The state x lives in registers (float32) for
  all steps.
* Solver coefficients (h, h/2, h/6 for euler/midpoint/heun/rk4; alpha, sigma and the DPM-Solver++
  coefficients for ddim/dpm1/dpm2 on "vp" / "ot-eps") are computed on the host in float64 exactly
  as reference.ode does and passed as a small float32 table.

Precision: the compute dtype is x0's dtype. float32 uses tl.dot in IEEE float32 unless
``torch.backends.cuda.matmul.allow_tf32`` is set (then TF32, like torch's own matmuls);
bfloat16 / float16 use float32 accumulation, float32 bias/activation and a float32 state x.
float64 is not supported (``supports`` says so and backend="auto" takes the reference).

Tiles and tuning: rows per tile (BM, 16..128) are picked on the host from the problem size (the
largest tile that still gives every SM work: 4 buckets at most); the column block, warps and
pipeline stages are autotuned on first CUDA use, keyed on stable dimensions only (hidden, action
and obs widths, depth, activation, solver, dtype, BM) -- never the batch size. Set
QIPO_TRITON_AUTOTUNE=0 to skip tuning (one default configuration). act's tile holds whole states:
BM // KP states x KP candidate slots (KP = next power of two >= K), so K <= 256.

The DoubleCritic in act may have layer_norm=True (CPQL's offline critic): LayerNorm over the
hidden width is computed in the kernel after each hidden Linear (two-pass, biased variance).

Randomness: in integrate / consistency_sample / act every random number is an input (x0 / noise /
step_noise / uniform). When act or consistency_sample get None for one of them it is drawn on the
host from ``generator`` in the same order and shape as the reference draws it, so both backends see
the same stream. ``sample`` instead draws x0 inside the kernel (op qipo_kernels::triton_policy_sample_seeded):
x0[b, k, a] = tl.randn(seed, (b K + k) A + a) (Philox on the global element index, 64-bit, so the
numbers do not depend on tiles or programs), rounded to obs' dtype; the noise is never stored (QIPO's
1e6 x 64 support renewal needs no noise tensor). That is another stream than the reference's
torch.Generator: same distribution, not the same numbers; trajectory[0] returns the noise when asked.

torch.compile: the launch is the torch.library custom op ``qipo_kernels::triton_policy_sample``
(tensors and plain scalars only: the packed weight tensors, the time-share / coefficient tables,
x0 / obs / step noise / uniforms, configuration ints and floats) with a fake implementation; the
host tables are the custom ops ``qipo_kernels::triton_sampler_flow_tables`` and
``..._consistency_tables``. Under torch.compile the packing (module -> packed tensors) and the
time-share table are traced as plain torch ops from the live parameters (no cache, so an optimizer
step between compiled calls is seen); eagerly they are cached as described below. A function
calling integrate / consistency_sample / act with backend="triton" compiles with fullgraph=True.

CUDA graphs: the launch path does no host synchronisation. The packed weights and the
coefficient / time tables are cached per (module, dtype, device) and per solver configuration; a
cache miss copies a small table to the device, so run each configuration once before capturing.
The cache is refreshed when any parameter or buffer of the module changes (``_version`` or
``data_ptr``), e.g. after an optimizer step.
"""
from __future__ import annotations

import math
import os
import weakref
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import triton
import triton.language as tl

from .. import backends as _backends
from ..nets import ConditionalMLP, DoubleCritic
from ..reference import consistency as _cons
from ..reference import ode as _ode
from ..reference import paths as _paths
from . import _host

MAX_HIDDEN = 512
MAX_DEPTH = 6
MAX_ACT_DIM = 64
MAX_CANDIDATES = 256

ACT_CODES = {"mish": 0, "silu": 1, "relu": 2, "gelu": 3, "tanh": 4}
SOLVER_CODES = {"euler": 0, "midpoint": 1, "heun": 2, "rk4": 3, "ddim": 4, "dpm1": 4, "dpm2": 5}
MODE_INTEGRATE, MODE_CONSISTENCY, MODE_ACT_FLOW, MODE_ACT_CONSISTENCY = 0, 1, 2, 3
NCOEF = 8  # columns of the per-step coefficient table

# Test hook: every buffer the kernels write (outputs and scratch) is allocated through this
# function, so a test can replace it with one that fills the buffer with NaN.
def _new_buffer(shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Programs of the persistent grid under the interpreter (small, so that tests run several tiles
# per program and exercise the persistent loop).
INTERPRET_PROGRAMS = 2


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _tanh(z):
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def _activation(x, ACT: tl.constexpr):
    if ACT == 0:  # mish = x tanh(softplus(x)) = x n / (n + 2), n = e^x (e^x + 2)
        e = tl.exp(tl.minimum(x, 20.0))
        n = e * (e + 2.0)
        y = tl.where(x > 20.0, x, x * n / (n + 2.0))
    elif ACT == 1:  # silu = x sigmoid(x), sigmoid from e^{-|x|} (no overflow)
        e = tl.exp(-tl.abs(x))
        y = x * tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    elif ACT == 2:  # relu
        y = tl.maximum(x, 0.0)
    elif ACT == 3:  # gelu, tanh approximation
        y = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    else:  # tanh
        y = _tanh(x)
    return y


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    # PREC: 0 IEEE float32, 1 TF32, 2 half inputs (bf16 / fp16, float32 accumulation)
    if PREC == 0:
        r = tl.dot(a, b, acc, input_precision="ieee")
    elif PREC == 1:
        r = tl.dot(a, b, acc, input_precision="tf32")
    else:
        r = tl.dot(a, b, acc)
    return r


@triton.jit
def _obs_share(obs_ptr, state, valid, S, w1o, b1, osh,
               HP: tl.constexpr, SP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               BKS: tl.constexpr, PREC: tl.constexpr):
    """osh[m, :] = W1_obs @ obs[state[m]] + b1 (float32 scratch [BM, HP])."""
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_s = tl.arange(0, BKS)
    cdt = w1o.dtype.element_ty
    for n0 in range(0, HP, BN):
        cols = n0 + offs_n
        acc = tl.zeros((BM, BN), tl.float32) + tl.load(b1 + cols)[None, :]
        for s0 in range(0, SP, BKS):
            ss = s0 + offs_s
            o = tl.load(obs_ptr + state[:, None] * S + ss[None, :],
                        mask=valid[:, None] & (ss[None, :] < S), other=0.0)
            w = tl.load(w1o + ss[:, None] * HP + cols[None, :])
            acc = _dot(o.to(cdt), w, acc, PREC)
        tl.store(osh + offs_m[:, None] * HP + cols[None, :], acc)
    tl.debug_barrier()


@triton.jit
def _ln_act(buf, rowsum, lnw, lnb, HT, ln_eps, HP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
            ACT: tl.constexpr):
    """In place on buf [BM, HP] (pre-activations): LayerNorm over the first HT columns (biased
    variance, two passes), affine, activation. Padded columns stay 0 (gamma = beta = 0 there)."""
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    mean = rowsum / HT
    var = tl.zeros((BM,), tl.float32)
    for n0 in range(0, HP, BN):
        cols = n0 + offs_n
        v = tl.load(buf + offs_m[:, None] * HP + cols[None, :]).to(tl.float32)
        d = tl.where(cols[None, :] < HT, v - mean[:, None], 0.0)
        var += tl.sum(d * d, axis=1)
    rstd = 1.0 / tl.sqrt(var / HT + ln_eps)
    for n0 in range(0, HP, BN):
        cols = n0 + offs_n
        ptrs = buf + offs_m[:, None] * HP + cols[None, :]
        v = tl.load(ptrs).to(tl.float32)
        y = (v - mean[:, None]) * rstd[:, None] * tl.load(lnw + cols)[None, :] + tl.load(lnb + cols)[None, :]
        tl.store(ptrs, _activation(y, ACT).to(buf.dtype.element_ty))
    tl.debug_barrier()


@triton.jit
def _mlp_eval(xin, trow, osh, hbuf, w1x, wh, bh, wo, bo, lnw, lnb, HT, ln_eps,
              HP: tl.constexpr, HS: tl.constexpr, IN_PAD: tl.constexpr, OUT_PAD: tl.constexpr,
              DEPTH: tl.constexpr, ACT: tl.constexpr, HAS_T: tl.constexpr, LN: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """One network evaluation for a tile: xin [BM, IN_PAD] float32 -> [BM, OUT_PAD] float32.

    Layer 1 = osh (obs share + b1) + trow (time share, when HAS_T) + xin @ W1x; hidden layers
    and the output layer read their input from the scratch ``hbuf`` ([2, BM, HS] ping-pong).
    With LN, every hidden layer is Linear -> LayerNorm(HT, eps, lnw[l], lnb[l]) -> activation.
    """
    offs_m = tl.arange(0, BM)
    offs_i = tl.arange(0, IN_PAD)
    offs_o = tl.arange(0, OUT_PAD)
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    cdt = w1x.dtype.element_ty
    xa = xin.to(cdt)
    rs = tl.zeros((BM,), tl.float32)
    for n0 in range(0, HP, BN):
        cols = n0 + offs_n
        acc = tl.load(osh + offs_m[:, None] * HP + cols[None, :])
        if HAS_T:
            acc += tl.load(trow + cols)[None, :]
        w = tl.load(w1x + offs_i[:, None] * HP + cols[None, :])
        acc = _dot(xa, w, acc, PREC)
        if LN:
            acc = acc.to(cdt)
            rs += tl.sum(acc.to(tl.float32), axis=1)
        else:
            acc = _activation(acc, ACT).to(cdt)
        tl.store(hbuf + offs_m[:, None] * HP + cols[None, :], acc)
    tl.debug_barrier()
    if LN:
        _ln_act(hbuf, rs, lnw, lnb, HT, ln_eps, HP, BM, BN, ACT)
    for l in range(DEPTH - 1):
        src = hbuf + (l % 2) * (BM * HS)
        dst = hbuf + ((l + 1) % 2) * (BM * HS)
        rs = tl.zeros((BM,), tl.float32)
        for n0 in range(0, HP, BN):
            cols = n0 + offs_n
            acc = tl.zeros((BM, BN), tl.float32) + tl.load(bh + l * HP + cols)[None, :]
            for k0 in range(0, HP, BK):
                ks = k0 + offs_k
                a = tl.load(src + offs_m[:, None] * HP + ks[None, :])
                w = tl.load(wh + l * (HP * HP) + ks[:, None] * HP + cols[None, :])
                acc = _dot(a, w, acc, PREC)
            if LN:
                acc = acc.to(cdt)
                rs += tl.sum(acc.to(tl.float32), axis=1)
            else:
                acc = _activation(acc, ACT).to(cdt)
            tl.store(dst + offs_m[:, None] * HP + cols[None, :], acc)
        tl.debug_barrier()
        if LN:
            _ln_act(dst, rs, lnw + (l + 1) * HP, lnb + (l + 1) * HP, HT, ln_eps, HP, BM, BN, ACT)
    src = hbuf + ((DEPTH - 1) % 2) * (BM * HS)
    out = tl.zeros((BM, OUT_PAD), tl.float32) + tl.load(bo + offs_o)[None, :]
    for k0 in range(0, HP, BK):
        ks = k0 + offs_k
        a = tl.load(src + offs_m[:, None] * HP + ks[None, :])
        w = tl.load(wo + ks[:, None] * OUT_PAD + offs_o[None, :])
        out = _dot(a, w, out, PREC)
    tl.debug_barrier()
    return out


@triton.jit
def _net_eval(xin, trow, osh, hbuf, w1x, wh, bh, wo, bo,
              HP: tl.constexpr, HS: tl.constexpr, IN_PAD: tl.constexpr, OUT_PAD: tl.constexpr,
              DEPTH: tl.constexpr, ACT: tl.constexpr, HAS_T: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """The policy network (no LayerNorm)."""
    return _mlp_eval(xin, trow, osh, hbuf, w1x, wh, bh, wo, bo, bh, bh, 1, 0.0,
                     HP, HS, IN_PAD, OUT_PAD, DEPTH, ACT, HAS_T, False, BM, BN, BK, PREC)


@triton.jit(do_not_specialize=["N", "B", "K", "A", "S", "steps", "n_evals", "temperature", "HQ", "ln_eps", "seed"])
def _policy_kernel(
    x0_ptr, obs_ptr, snoise_ptr, u_ptr, out_ptr, traj_ptr, tvec_ptr, coef_ptr, osh_ptr, hbuf_ptr,
    w1x, w1o, b1, wh, bh, wo, bo,
    qa1, qo1, qb1, qh1, qhb1, qw1, qwb1, qlw1, qlb1,
    qa2, qo2, qb2, qh2, qhb2, qw2, qwb2, qlw2, qlb2,
    N, B, K, A, S, steps, n_evals, temperature, HQ, ln_eps, seed,
    MODE: tl.constexpr, SOLVER: tl.constexpr, CLIP: tl.constexpr, TRAJ: tl.constexpr, SEEDED: tl.constexpr,
    SOFTMAX: tl.constexpr, LNQ: tl.constexpr,
    HP: tl.constexpr, AP: tl.constexpr, SP: tl.constexpr, DEPTH: tl.constexpr, ACT: tl.constexpr,
    HPQ: tl.constexpr, DEPTHQ: tl.constexpr, ACTQ: tl.constexpr, HS: tl.constexpr, KP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BKS: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    osh = osh_ptr + pid.to(tl.int64) * (BM * HS)
    hb = hbuf_ptr + pid.to(tl.int64) * (2 * BM * HS)
    offs_m = tl.arange(0, BM)
    offs_a = tl.arange(0, AP)
    GROUP: tl.constexpr = MODE >= 2
    SB: tl.constexpr = BM // KP
    if GROUP:
        num_tiles = tl.cdiv(B, SB)
    else:
        num_tiles = tl.cdiv(N, BM)
    NA = N.to(tl.int64) * A
    for tile in range(pid, num_tiles, nprog):
        if GROUP:
            kk = offs_m % KP
            state = (offs_m // KP).to(tl.int64) + tile * SB
            valid = (kk < K) & (state < B)
            rows = state * K + kk
        else:
            rows = offs_m.to(tl.int64) + tile * BM
            valid = rows < N
            state = rows // K
        _obs_share(obs_ptr, state, valid, S, w1o, b1, osh, HP, SP, BM, BN, BKS, PREC)
        amask = valid[:, None] & (offs_a[None, :] < A)
        xoff = rows[:, None] * A + offs_a[None, :]
        if SEEDED:
            # x0[row, a] = randn(seed, row * A + a): Philox on the global element index, so the
            # noise does not depend on the tiling; rounded to the output dtype as a stored x0 would be.
            z = tl.randn(seed, xoff)
            x = tl.where(amask, z, 0.0).to(out_ptr.dtype.element_ty).to(tl.float32)
        else:
            x = tl.load(x0_ptr + xoff, mask=amask, other=0.0).to(tl.float32)
        if MODE % 2 == 0:  # MODE 0 (integrate) or 2 (act with the flow sampler)
            # ---------------- ODE solver, all steps ----------------
            if TRAJ:
                tl.store(traj_ptr + xoff, x.to(traj_ptr.dtype.element_ty), mask=amask)
            for i in range(steps):
                c = coef_ptr + i * 8
                if SOLVER == 0:  # euler
                    k1 = _net_eval(x, tvec_ptr + i * HP, osh, hb, w1x, wh, bh, wo, bo,
                                   HP, HS, AP, AP, DEPTH, ACT, True, BM, BN, BK, PREC)
                    x = x + tl.load(c) * k1
                elif SOLVER == 1:  # midpoint
                    e0 = 2 * i
                    k1 = _net_eval(x, tvec_ptr + e0 * HP, osh, hb, w1x, wh, bh, wo, bo,
                                   HP, HS, AP, AP, DEPTH, ACT, True, BM, BN, BK, PREC)
                    k2 = _net_eval(x + tl.load(c + 1) * k1, tvec_ptr + (e0 + 1) * HP, osh, hb, w1x, wh, bh,
                                   wo, bo, HP, HS, AP, AP, DEPTH, ACT, True, BM, BN, BK, PREC)
                    x = x + tl.load(c) * k2
                elif SOLVER == 2:  # heun
                    e0 = 2 * i
                    k1 = _net_eval(x, tvec_ptr + e0 * HP, osh, hb, w1x, wh, bh, wo, bo,
                                   HP, HS, AP, AP, DEPTH, ACT, True, BM, BN, BK, PREC)
                    k2 = _net_eval(x + tl.load(c) * k1, tvec_ptr + (e0 + 1) * HP, osh, hb, w1x, wh, bh,
                                   wo, bo, HP, HS, AP, AP, DEPTH, ACT, True, BM, BN, BK, PREC)
                    x = x + tl.load(c + 1) * (k1 + k2)
                elif SOLVER == 3:  # rk4
                    e0 = 4 * i
                    hh = tl.load(c + 1)
                    k1 = _net_eval(x, tvec_ptr + e0 * HP, osh, hb, w1x, wh, bh, wo, bo,
                                   HP, HS, AP, AP, DEPTH, ACT, True, BM, BN, BK, PREC)
                    k2 = _net_eval(x + hh * k1, tvec_ptr + (e0 + 1) * HP, osh, hb, w1x, wh, bh,
                                   wo, bo, HP, HS, AP, AP, DEPTH, ACT, True, BM, BN, BK, PREC)
                    k3 = _net_eval(x + hh * k2, tvec_ptr + (e0 + 2) * HP, osh, hb, w1x, wh, bh,
                                   wo, bo, HP, HS, AP, AP, DEPTH, ACT, True, BM, BN, BK, PREC)
                    k4 = _net_eval(x + tl.load(c) * k3, tvec_ptr + (e0 + 3) * HP, osh, hb, w1x, wh, bh,
                                   wo, bo, HP, HS, AP, AP, DEPTH, ACT, True, BM, BN, BK, PREC)
                    x = x + tl.load(c + 2) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
                elif SOLVER == 4:  # ddim / dpm1 (DPM-Solver++ 1, data prediction)
                    eps = _net_eval(x, tvec_ptr + i * HP, osh, hb, w1x, wh, bh, wo, bo,
                                    HP, HS, AP, AP, DEPTH, ACT, True, BM, BN, BK, PREC)
                    x0t = (x - tl.load(c) * eps) / tl.load(c + 1)
                    x = tl.load(c + 2) * x + tl.load(c + 3) * x0t
                else:  # dpm2: DPM-Solver++(2S), r1 = 1/2
                    e0 = 2 * i
                    eps = _net_eval(x, tvec_ptr + e0 * HP, osh, hb, w1x, wh, bh, wo, bo,
                                    HP, HS, AP, AP, DEPTH, ACT, True, BM, BN, BK, PREC)
                    x0t = (x - tl.load(c) * eps) / tl.load(c + 1)
                    xm = tl.load(c + 2) * x - tl.load(c + 3) * x0t
                    epm = _net_eval(xm, tvec_ptr + (e0 + 1) * HP, osh, hb, w1x, wh, bh, wo, bo,
                                    HP, HS, AP, AP, DEPTH, ACT, True, BM, BN, BK, PREC)
                    x0m = (xm - tl.load(c + 4) * epm) / tl.load(c + 5)
                    cn = tl.load(c + 7)
                    x = tl.load(c + 6) * x - cn * x0t - cn * (x0m - x0t)
                if TRAJ:
                    tl.store(traj_ptr + (i + 1) * NA + xoff, x.to(traj_ptr.dtype.element_ty), mask=amask)
        else:
            # ---------------- consistency sampling: one step + re-noise / denoise ----------------
            a = x
            for e in range(n_evals):
                c = coef_ptr + e * 8
                if e == 0:
                    xs = tl.load(c + 3) * x  # sigma_max * z
                else:
                    zk = tl.load(snoise_ptr + (e - 1) * NA + xoff, mask=amask, other=0.0).to(tl.float32)
                    xs = a + tl.load(c + 3) * zk
                f = _net_eval(tl.load(c + 2) * xs, tvec_ptr + e * HP, osh, hb, w1x, wh, bh, wo, bo,
                              HP, HS, AP, AP, DEPTH, ACT, True, BM, BN, BK, PREC)
                a = tl.load(c) * xs + tl.load(c + 1) * f
                if CLIP:
                    a = tl.minimum(tl.maximum(a, -1.0), 1.0)
            x = a
        if GROUP:
            # ---------------- twin critic on the K candidates, min, selection ----------------
            cand = x
            if CLIP:
                cand = tl.minimum(tl.maximum(cand, -1.0), 1.0)
            _obs_share(obs_ptr, state, valid, S, qo1, qb1, osh, HPQ, SP, BM, BN, BKS, PREC)
            q1 = _mlp_eval(cand, tvec_ptr, osh, hb, qa1, qh1, qhb1, qw1, qwb1, qlw1, qlb1, HQ, ln_eps,
                           HPQ, HS, AP, 16, DEPTHQ, ACTQ, False, LNQ, BM, BN, BK, PREC)
            _obs_share(obs_ptr, state, valid, S, qo2, qb2, osh, HPQ, SP, BM, BN, BKS, PREC)
            q2 = _mlp_eval(cand, tvec_ptr, osh, hb, qa2, qh2, qhb2, qw2, qwb2, qlw2, qlb2, HQ, ln_eps,
                           HPQ, HS, AP, 16, DEPTHQ, ACTQ, False, LNQ, BM, BN, BK, PREC)
            offs_q = tl.arange(0, 16)
            q = tl.sum(tl.where(offs_q[None, :] == 0, tl.minimum(q1, q2), 0.0), axis=1)  # [BM]
            q2d = tl.reshape(q, (SB, KP))
            v2d = tl.reshape(valid, (SB, KP))
            k2d = tl.reshape(kk, (SB, KP))
            states = tl.arange(0, SB).to(tl.int64) + tile * SB
            svalid = states < B
            if SOFTMAX:
                # padded slots get a finite floor (no inf - inf); a state's sum is >= 1 (its max term)
                qd = tl.where(v2d, q2d.to(tl.float64) / temperature, -1.0e300)
                qmax = tl.max(qd, axis=1)
                p = tl.where(v2d, tl.exp(qd - qmax[:, None]), 0.0)
                p = p / tl.maximum(tl.sum(p, axis=1), 1.0)[:, None]
                cdf = tl.cumsum(p, axis=1)
                u = tl.load(u_ptr + states, mask=svalid, other=0.0)
                idx = tl.sum(((cdf <= u[:, None]) & v2d).to(tl.int32), axis=1)
                idx = tl.minimum(idx, K - 1)
            else:
                idx = tl.argmax(tl.where(v2d, q2d, float("-inf")), axis=1, tie_break_left=True)
            cand3 = tl.reshape(cand, (SB, KP, AP))
            pick = k2d == idx[:, None]
            chosen = tl.sum(tl.where(pick[:, :, None], cand3, 0.0), axis=1)  # [SB, AP]
            tl.store(out_ptr + states[:, None] * A + offs_a[None, :], chosen.to(out_ptr.dtype.element_ty),
                     mask=svalid[:, None] & (offs_a[None, :] < A))
        else:
            tl.store(out_ptr + xoff, x.to(out_ptr.dtype.element_ty), mask=amask)


# ----------------------------------------------------------------------------------------------
# Weight packing. The packed tensors are built from the modules' current parameters by plain
# torch ops: in eager mode the result is cached per (module, dtype, device) and rebuilt when a
# parameter changes; under torch.compile the same functions are traced into the graph (they read
# the live parameters, so an optimizer step between compiled calls is never missed).
# ----------------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _pad_hidden(h: int) -> int:
    """Padded width: a power of two >= 16 up to 64, then a multiple of 64."""
    return max(16, _next_pow2(h)) if h <= 64 else -(-h // 64) * 64


def _pad_small(n: int) -> int:
    """Padded obs / action width (>= 16 for tl.dot): a power of two up to 64, then a multiple of 64."""
    return max(16, _next_pow2(n)) if n <= 64 else -(-n // 64) * 64


def _signature(module: nn.Module) -> Tuple:
    return tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype)
                 for t in list(module.parameters()) + list(module.buffers()))


def _pad2(w: torch.Tensor, rows: int, cols: int, dtype, device) -> torch.Tensor:
    w = w.to(device=device, dtype=dtype)
    return F.pad(w, (0, cols - w.shape[1], 0, rows - w.shape[0])).contiguous()


def _pad1(b: torch.Tensor, n: int, device) -> torch.Tensor:
    return F.pad(b.to(device=device, dtype=torch.float32), (0, n - b.shape[0])).contiguous()


def _mlp_tensors(linears: List[nn.Linear], free_cols: slice, obs_cols: slice, out_pad: int,
                 dtype: torch.dtype, device: torch.device,
                 norms: Optional[List[nn.LayerNorm]] = None) -> List[torch.Tensor]:
    """Packed weights of one MLP with the first layer split in a 'free' part (x / action, read each
    evaluation) and an obs part (folded with b1 into the per-tile obs share):

        [w1x [AP, HP], w1o [SP, HP], b1 [HP], wh [max(depth - 1, 1), HP, HP], bh [.., HP], wo [HP, out_pad],
         bo [out_pad]]  (+ [lnw, lnb] [depth, HP] when ``norms``: LayerNorm after each hidden Linear)

    Weights in ``dtype``, biases / LayerNorm affine in float32, zero padding.
    """
    first, hidden, last = linears[0], linears[1:-1], linears[-1]
    H = first.weight.shape[0]
    HP = _pad_hidden(H)
    AP = _pad_small(free_cols.stop - free_cols.start)
    SP = _pad_small(obs_cols.stop - obs_cols.start)
    with torch.no_grad():
        W1 = first.weight.detach()
        w1x = _pad2(W1[:, free_cols].t(), AP, HP, dtype, device)
        w1o = _pad2(W1[:, obs_cols].t(), SP, HP, dtype, device)
        b1 = _pad1(first.bias.detach(), HP, device)
        if hidden:
            wh = torch.stack([_pad2(lin.weight.detach().t(), HP, HP, dtype, device) for lin in hidden])
            bh = torch.stack([_pad1(lin.bias.detach(), HP, device) for lin in hidden])
        else:
            wh = torch.zeros(1, HP, HP, dtype=dtype, device=device)
            bh = torch.zeros(1, HP, dtype=torch.float32, device=device)
        wo = _pad2(last.weight.detach().t(), HP, out_pad, dtype, device)
        bo = _pad1(last.bias.detach(), out_pad, device)
        out = [w1x, w1o, b1, wh, bh, wo, bo]
        if norms:
            ones = torch.ones(H, dtype=torch.float32, device=device)
            zeros = torch.zeros(H, dtype=torch.float32, device=device)
            out.append(torch.stack([_pad1(ln.weight.detach() if ln.weight is not None else ones, HP, device)
                                    for ln in norms]))
            out.append(torch.stack([_pad1(ln.bias.detach() if ln.bias is not None else zeros, HP, device)
                                    for ln in norms]))
    return out


def _policy_tensors(net: ConditionalMLP, dtype, device) -> List[torch.Tensor]:
    """The policy's 7 packed tensors (see _mlp_tensors); depth = len(net.layers)."""
    A, T, S = net.act_dim, net.t_dim, net.obs_dim
    return _mlp_tensors(list(net.layers) + [net.out], slice(0, A), slice(A + T, A + T + S), _pad_small(A),
                        dtype, device)


def _critic_tensors(critic: DoubleCritic, dtype, device) -> List[torch.Tensor]:
    """Both heads' packed tensors, head 1 then head 2 (7 each, 9 with LayerNorm)."""
    S, A = critic.obs_dim, critic.act_dim
    out: List[torch.Tensor] = []
    for mlp in (critic.q1_net, critic.q2_net):
        lins = [m for m in mlp.net if isinstance(m, nn.Linear)]
        norms = [m for m in mlp.net if isinstance(m, nn.LayerNorm)]
        out += _mlp_tensors(lins, slice(S, S + A), slice(0, S), 16, dtype, device, norms)
    return out


def _critic_meta(critic: DoubleCritic) -> Tuple[int, int, bool, float]:
    """(depth, hidden, layer_norm, LayerNorm eps) of the critic heads."""
    norms = [m for m in critic.q1_net.net if isinstance(m, nn.LayerNorm)]
    return critic.depth, critic.hidden, bool(norms), float(norms[0].eps) if norms else 0.0


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


class _PolicyPack:
    """Eager-mode cache entry: the packed policy tensors and its (time share, coefficient) tables."""

    def __init__(self, net: ConditionalMLP, dtype: torch.dtype, device: torch.device):
        self.tensors = _policy_tensors(net, dtype, device)
        self.tables: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


class _CriticPack:
    def __init__(self, critic: DoubleCritic, dtype, device):
        self.tensors = _critic_tensors(critic, dtype, device)


_PACKS: "weakref.WeakKeyDictionary[nn.Module, Dict]" = weakref.WeakKeyDictionary()
_MAX_TABLES = 64


def _get_pack(module: nn.Module, kind, dtype: torch.dtype, device: torch.device):
    """The cached packed copy of ``module`` for (dtype, device), rebuilt when a parameter changed."""
    entries = _PACKS.setdefault(module, {})
    key = (dtype, str(device))
    sig = _signature(module)
    ent = entries.get(key)
    if ent is None or ent[0] != sig:
        ent = (sig, kind(module, dtype, device))
        entries[key] = ent
    return ent[1]


def _compiling() -> bool:
    return bool(torch.compiler.is_compiling())


def _policy_inputs(net, dtype, device, key, build_tables):
    """(packed policy tensors, (time share, coefficients)): cached in eager mode, traced under torch.compile."""
    if _compiling():
        tensors = _policy_tensors(net, dtype, device)
        return tensors, build_tables(tensors)
    pack = _get_pack(net, _PolicyPack, dtype, device)
    return pack.tensors, _cached_tables(pack, key, lambda: build_tables(pack.tensors))


def _critic_inputs(critic, dtype, device) -> List[torch.Tensor]:
    if _compiling():
        return _critic_tensors(critic, dtype, device)
    return _get_pack(critic, _CriticPack, dtype, device).tensors

# ----------------------------------------------------------------------------------------------
# Host-side tables (float64 math exactly as the references do it, stored as float32)
# ----------------------------------------------------------------------------------------------
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


def _coef_tensor(rows, device):
    c = torch.zeros(max(len(rows), 1), NCOEF, dtype=torch.float64)
    for i, r in enumerate(rows):
        c[i, : len(r)] = torch.tensor(r, dtype=torch.float64)
    return c.to(torch.float32).to(device)


def _cached_tables(pack: _PolicyPack, key, build):
    tab = pack.tables.get(key)
    if tab is None:
        if len(pack.tables) >= _MAX_TABLES:
            pack.tables.clear()
        tab = build()
        pack.tables[key] = tab
    return tab


# The tables as custom ops: their host float64 math (float() of tensors) cannot be traced by
# torch.compile, and as ops they are recomputed when steps / solver / sigmas change instead of
# being frozen into a compiled graph. Eager calls cache them (see _cached_tables).
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


def _flow_inputs(net, steps, solver, t0, t1, path, dtype, device):
    """(packed policy tensors, time share [n_evals, HP], coefficients) of one flow configuration."""
    def build(w):
        times, coef = _flow_tables_op(steps, solver, float(t0), float(t1), path, device)
        return _time_share(net, times, torch.promote_types(dtype, torch.float32), w[0].shape[1]), coef

    pol, (tvec, coef) = _policy_inputs(net, dtype, device, ("flow", steps, solver, float(t0), float(t1), path, dtype),
                                       build)
    return pol, tvec, coef


def _consistency_inputs(net, sig, sigma_max, sigma_min, sigma_data, dtype, device):
    def build(w):
        tin, coef = _consistency_tables_op(list(sig), float(sigma_max), float(sigma_min), float(sigma_data),
                                           dtype, device)
        return _time_share(net, tin, torch.promote_types(dtype, torch.float32), w[0].shape[1]), coef

    pol, (tvec, coef) = _policy_inputs(net, dtype, device, ("cons", tuple(sig), sigma_max, sigma_min, sigma_data,
                                                            dtype), build)
    return pol, tvec, coef

# ----------------------------------------------------------------------------------------------
# Launch
# ----------------------------------------------------------------------------------------------
_SM_COUNT: Dict[int, int] = {}
_TUNED: Dict[Tuple, object] = {}


def _programs(device) -> int:
    if _interpret() or device.type != "cuda":
        return INTERPRET_PROGRAMS
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return 2 * _SM_COUNT[idx]


def _tf32_enabled() -> bool:
    """torch's own switch for float32 matmuls: the new ``fp32_precision`` API when it is set,
    else the legacy ``allow_tf32`` (reading that after the new API was used raises in torch >= 2.9)."""
    m = torch.backends.cuda.matmul
    p = getattr(m, "fp32_precision", None)
    if p in ("tf32", "ieee"):
        return p == "tf32"
    try:
        return bool(m.allow_tf32)
    except RuntimeError:
        return False


def _prec(dtype) -> int:
    """0: IEEE float32 tl.dot, 1: TF32 (only when torch's float32 matmuls use TF32), 2: half inputs."""
    if dtype == torch.float32:
        return 1 if _tf32_enabled() and not _interpret() else 0
    return 2


def _autotune_enabled() -> bool:
    return os.environ.get("QIPO_TRITON_AUTOTUNE", "1") != "0"


def _tuned_kernel(hp: int, hpq: int):
    """The autotuned kernel for a width class, created lazily on first CUDA use (never at import).

    Tuned: BN (column block), num_warps, num_stages. The key holds stable dimensions and the
    constexpr configuration only; BM (rows per tile) is chosen on the host from a few size
    buckets (see ``_choose_bm``), so a new batch size never recompiles or retunes.
    """
    key = (hp, hpq)
    if key in _TUNED:
        return _TUNED[key]
    hmin = min(hp, hpq)
    bn_big = 128 if hp % 128 == 0 and hpq % 128 == 0 else min(32, hmin)
    bn = min(64, hmin)
    cfgs = [triton.Config({"BN": bn}, num_warps=4, num_stages=1),
            triton.Config({"BN": bn}, num_warps=8, num_stages=1),
            triton.Config({"BN": bn}, num_warps=4, num_stages=2)]
    if bn_big != bn:
        cfgs.append(triton.Config({"BN": bn_big}, num_warps=8 if bn_big == 128 else 4, num_stages=2))
    if not _autotune_enabled():
        cfgs = cfgs[:1]
    k = triton.autotune(cfgs, key=["HP", "AP", "SP", "DEPTH", "ACT", "HPQ", "DEPTHQ", "ACTQ", "KP", "MODE", "SEEDED",
                                    "SOLVER", "CLIP", "TRAJ", "SOFTMAX", "PREC", "BM"])(_policy_kernel)
    _TUNED[key] = k
    return k


def _choose_bm(rows: int, min_rows: int, hs: int, programs: int) -> int:
    """Rows per tile: the largest of 16..128 that still gives every SM a tile (a bigger
    tile re-reads the weights fewer times; a smaller one spreads a small batch over more SMs).
    Only these few buckets exist, so the batch size never triggers more than 4 compilations."""
    cap = 128 if hs <= 256 else 64
    bm = 16
    for cand in (32, 64, 128):
        if cand <= cap and triton.cdiv(rows, cand) >= programs:
            bm = cand
    return max(bm, min_rows)


def _launch(mode, pol: List[torch.Tensor], critic: List[torch.Tensor], x0, obs, snoise, u, out, traj, tvec, coef,
            N, B, K, A, S, steps, n_evals, temperature, solver_code, act_code, depth, act_code_q, depth_q, hq,
            lnq, ln_eps, clip, softmax, seed=None):
    """x0 None: the initial noise is drawn in the kernel from ``seed`` (MODE_INTEGRATE only)."""
    device = out.device
    dtype = out.dtype
    HP, AP, SP = pol[0].shape[1], pol[0].shape[0], pol[1].shape[0]
    group = mode >= MODE_ACT_FLOW
    if critic:
        n = 9 if lnq else 7
        h1, h2 = list(critic[:n]), list(critic[n:2 * n])
        if not lnq:  # unused LayerNorm pointers
            h1 += [h1[2], h1[2]]
            h2 += [h2[2], h2[2]]
        qargs = h1 + h2
        hpq, dq = h1[0].shape[1], depth_q
    else:
        qargs = (list(pol) + [pol[2], pol[2]]) * 2
        hpq, dq, hq, lnq, ln_eps = HP, 1, 1, False, 0.0
    HS = max(HP, hpq)
    KP = _next_pow2(K) if group else 1
    BK = min(64, HP, hpq)
    BKS = min(64, SP)
    common = dict(MODE=mode, SOLVER=solver_code, CLIP=bool(clip), TRAJ=traj is not None, SOFTMAX=bool(softmax),
                  SEEDED=x0 is None,
                  LNQ=bool(lnq), HP=HP, AP=AP, SP=SP, DEPTH=depth, ACT=act_code, HPQ=hpq, DEPTHQ=dq,
                  ACTQ=act_code_q, HS=HS, KP=KP, BK=BK, BKS=BKS, PREC=_prec(dtype))
    nprog = _programs(device)
    if group:  # a tile holds whole states: BM // KP states x KP candidate slots
        units, rows = B, B * KP
    else:
        units, rows = N, N
    interp = _interpret() or device.type != "cuda"
    bm = max(16, KP) if interp else _choose_bm(rows, KP, HS, max(1, nprog // 2))  # tiles >= SMs
    n_tiles = triton.cdiv(units, bm // KP) if group else triton.cdiv(units, bm)
    progs = max(1, min(n_tiles, nprog))
    if interp:
        kernel, meta = _policy_kernel, dict(BM=bm, BN=min(64, HP, hpq))
    else:
        kernel, meta = _tuned_kernel(HP, hpq), dict(BM=bm)
    osh = _new_buffer((progs * bm * HS,), torch.float32, device)
    hbuf = _new_buffer((progs * 2 * bm * HS,), dtype, device)
    with _host.device_guard(device):
        xp = x0 if x0 is not None else out  # not read when SEEDED
        kernel[(progs,)](
            xp, obs, snoise if snoise is not None else xp, u if u is not None else coef, out,
            traj if traj is not None else out, tvec, coef, osh, hbuf,
            *pol, *qargs,
            N, B, K, A, S, steps, n_evals, float(temperature), hq, float(ln_eps), int(seed or 0),
            **common, **meta,
        )


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
    group = mode >= MODE_ACT_FLOW
    out = _new_buffer((B, A) if group else (N, A), dtype, device)
    traj = _new_buffer((steps + 1, N, A), dtype, device) if trajectory else torch.empty(0, dtype=dtype, device=device)
    if (B if group else N) > 0:
        _launch(mode, policy, critic, x0, obs, step_noise, uniform, out, traj if trajectory else None, tvec, coef,
                N, B, num_candidates, A, S, steps, n_evals, temperature, solver_code, act_code, depth,
                critic_act_code, critic_depth, critic_hidden, critic_layer_norm, ln_eps, clip, softmax)
    return out, traj


@_policy_sample_op.register_fake
def _(x0, obs, step_noise, uniform, tvec, coef, policy, critic, mode, num_candidates, steps, n_evals, solver_code,
      act_code, depth, critic_act_code, critic_depth, critic_hidden, critic_layer_norm, ln_eps, temperature, clip,
      softmax, trajectory):
    N, A = x0.shape
    out = x0.new_empty((obs.shape[0], A) if mode >= MODE_ACT_FLOW else (N, A))
    traj = x0.new_empty((steps + 1, N, A) if trajectory else (0,))
    return out, traj

def _compile_for_target(mode=0, solver=0, dtype="fp32", prec=0, softmax=False, traj=False, kp=1, bm=64, bn=64,
                        hp=256, depth=3, arch=90, num_warps=4, ln=False, seeded=False):
    """Compile the fused kernel for a CUDA architecture without a GPU (Triton's bundled ptxas);
    a development check that the interpreter cannot make. Needs TRITON_INTERPRET unset."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _policy_kernel
    names = fn.arg_names
    f32 = {"osh_ptr", "tvec_ptr", "coef_ptr", "b1", "bh", "bo", "qb1", "qhb1", "qwb1", "qb2", "qhb2", "qwb2",
           "qlw1", "qlb1", "qlw2", "qlb2"}
    ints = {"N", "B", "K", "A", "S", "steps", "n_evals", "HQ"}
    const = dict(LNQ=ln, SEEDED=seeded, MODE=mode, SOLVER=solver, CLIP=True, TRAJ=traj, SOFTMAX=softmax, HP=hp, AP=16, SP=32,
                 DEPTH=depth, ACT=0, HPQ=hp, DEPTHQ=depth, ACTQ=2, HS=hp, KP=kp, BM=bm, BN=bn, BK=64, BKS=32, PREC=prec)
    sig = {}
    for n in names:
        if n in const:
            sig[n] = "constexpr"
        elif n == "u_ptr":
            sig[n] = "*fp64"
        elif n in f32:
            sig[n] = "*fp32"
        elif n in ints:
            sig[n] = "i32"
        elif n == "seed":
            sig[n] = "i64"
        elif n in ("temperature", "ln_eps"):
            sig[n] = "fp32"
        else:
            sig[n] = "*" + dtype
    src = ASTSource(fn, sig, {(names.index(k),): v for k, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps, num_stages=1))


# ----------------------------------------------------------------------------------------------
# supports(): reasons a call cannot run here
# ----------------------------------------------------------------------------------------------
def _dtype_reasons(name, t) -> List[str]:
    if t is None or not torch.is_tensor(t):
        return []
    if t.dtype == torch.float64:
        return [f"{name} is float64: the Triton kernels compute in float32/bfloat16/float16 (use backend='torch')"]
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return [f"{name} has dtype {t.dtype}; the Triton kernels take float32, bfloat16 or float16"]
    if t.dtype != torch.float32 and (_interpret() or t.device.type != "cuda"):
        return [f"{name} is {t.dtype}: the Triton CPU interpreter computes float32 only (bf16/fp16 need a GPU)"]
    return []


def _module_reasons(name, m, dtype, device) -> List[str]:
    out = []
    ps = list(m.parameters())
    if any(p.dtype != dtype for p in ps):
        out.append(f"{name}'s parameters are {ps[0].dtype} but the inputs are {dtype}")
    if device is not None and any(p.device != device for p in ps):
        out.append(f"{name}'s parameters are on {ps[0].device} but the inputs are on {device}")
    return out


def _grad_reasons(name, m, *tensors) -> List[str]:
    if not torch.is_grad_enabled():
        return []
    if any(t is not None and torch.is_tensor(t) and t.requires_grad for t in tensors) or \
            any(p.requires_grad for p in m.parameters()):
        return [f"gradients are enabled and {name} or the inputs require grad: the fused sampler has no backward "
                "(call it under torch.no_grad() / torch.inference_mode(), or use backend='torch')"]
    return []


def _net_reasons(net) -> List[str]:
    if not isinstance(net, ConditionalMLP) or type(net).forward is not ConditionalMLP.forward \
            or type(net).embed_time is not ConditionalMLP.embed_time:
        return [f"net is a {type(net).__name__}, not a qipo_kernels.nets.ConditionalMLP (the fused kernel implements "
                "exactly that architecture)"]
    out = []
    if net.hidden > MAX_HIDDEN:
        out.append(f"net.hidden = {net.hidden} > {MAX_HIDDEN}")
    if not 1 <= net.depth <= MAX_DEPTH:
        out.append(f"net.depth = {net.depth} is outside 1..{MAX_DEPTH}")
    if net.act_dim > MAX_ACT_DIM:
        out.append(f"net.act_dim = {net.act_dim} > {MAX_ACT_DIM}")
    if net.activation not in ACT_CODES:
        out.append(f"activation {net.activation!r} has no kernel")
    return out


def _policy_call_reasons(net, x, obs) -> List[str]:
    out = _net_reasons(net)
    if out:
        return out
    out += _dtype_reasons("x0" if x is not None else "obs", x if x is not None else obs)
    if x is not None and obs is not None and torch.is_tensor(obs) and obs.dtype != x.dtype:
        out.append(f"obs is {obs.dtype} but the noise is {x.dtype}: they must share a dtype")
    like = x if x is not None else obs
    if like is not None and torch.is_tensor(like):
        out += _module_reasons("net", net, like.dtype, like.device)
        out += _grad_reasons("net", net, x, obs)
    return out


def supports_integrate(net=None, x0=None, obs=None, **_) -> List[str]:
    return _policy_call_reasons(net, x0, obs)


def supports_consistency_sample(net=None, noise=None, obs=None, **_) -> List[str]:
    return _policy_call_reasons(net, noise, obs)


def supports_sample(net=None, obs=None, **_) -> List[str]:
    return _policy_call_reasons(net, None, obs)


def supports_act(net=None, critic=None, obs=None, num_candidates=None, noise=None, **_) -> List[str]:
    out = _policy_call_reasons(net, noise if noise is not None else obs, obs)
    if not isinstance(critic, DoubleCritic) or type(critic).q_min is not DoubleCritic.q_min \
            or type(critic).forward is not DoubleCritic.forward:
        out.append(f"critic is a {type(critic).__name__}, not a qipo_kernels.nets.DoubleCritic")
    else:
        if critic.layer_norm:
            for mlp in (critic.q1_net, critic.q2_net):
                norms = [m for m in mlp.net if isinstance(m, nn.LayerNorm)]
                if any(tuple(m.normalized_shape) != (critic.hidden,) for m in norms) or \
                        len({float(m.eps) for m in norms}) > 1:
                    out.append("critic's LayerNorms are not LayerNorm(hidden) with one eps")
                    break
        if critic.hidden > MAX_HIDDEN:
            out.append(f"critic.hidden = {critic.hidden} > {MAX_HIDDEN}")
        if not 1 <= critic.depth <= MAX_DEPTH:
            out.append(f"critic.depth = {critic.depth} is outside 1..{MAX_DEPTH}")
        if critic.activation not in ACT_CODES:
            out.append(f"critic activation {critic.activation!r} has no kernel")
        if isinstance(net, ConditionalMLP) and (critic.act_dim != net.act_dim or critic.obs_dim != net.obs_dim):
            out.append(f"critic (obs {critic.obs_dim}, act {critic.act_dim}) does not match net "
                       f"(obs {net.obs_dim}, act {net.act_dim})")
        if obs is not None and torch.is_tensor(obs):
            out += _module_reasons("critic", critic, obs.dtype, obs.device)
            out += _grad_reasons("critic", critic)
    if isinstance(num_candidates, int) and num_candidates > MAX_CANDIDATES:
        out.append(f"num_candidates = {num_candidates} > {MAX_CANDIDATES} (one program holds all of a state's "
                   "candidates)")
    return out


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
    out = _new_buffer((B, num_samples, A), dtype, device)
    traj = (_new_buffer((steps + 1, B, num_samples, A), dtype, device) if trajectory
            else torch.empty(0, dtype=dtype, device=device))
    if N > 0:
        _launch(MODE_INTEGRATE, policy, [], None, obs, None, None, out, traj if trajectory else None, tvec, coef,
                N, B, num_samples, A, S, steps, 0, 1.0, solver_code, act_code, depth, 0, 1, 1, False, 0.0, False,
                False, seed=seed)
    return out, traj


@_seeded_sample_op.register_fake
def _(obs, tvec, coef, policy, num_samples, act_dim, seed, steps, solver_code, act_code, depth, trajectory):
    B = obs.shape[0]
    out = obs.new_empty((B, num_samples, act_dim))
    traj = obs.new_empty((steps + 1, B, num_samples, act_dim) if trajectory else (0,))
    return out, traj


# ----------------------------------------------------------------------------------------------
# Implementations (same arguments as the references' private functions)
# ----------------------------------------------------------------------------------------------
def _check_dims(net, x, obs, xname):
    if x.shape[-1] != net.act_dim:
        raise ValueError(f"{xname} must have last dim act_dim = {net.act_dim}, got shape {tuple(x.shape)}")
    if obs.shape[1] != net.obs_dim:
        raise ValueError(f"obs must be [*, {net.obs_dim}] (net.obs_dim), got shape {tuple(obs.shape)}")


def _flat(x):
    x = x.contiguous()
    if x.dim() == 3:
        B, K, A = x.shape
        return x.view(B * K, A), K
    return x, 1


_NO_CRITIC = dict(critic_act_code=0, critic_depth=1, critic_hidden=1, critic_layer_norm=False, ln_eps=0.0)


def integrate(net, x0, obs, steps, solver, t0, t1, path, return_trajectory):
    """Fused ODE sampling; arguments and result as reference.ode._integrate.

    x0 [N, A] with obs [N, S], or x0 [B, K, A] with obs [B, S]; returns x0's shape
    (and the trajectory [steps + 1, *x0.shape] when return_trajectory).
    """
    _check_dims(net, x0, obs, "x0")
    dtype, device = x0.dtype, x0.device
    pol, tvec, coef = _flow_inputs(net, steps, solver, t0, t1, path, dtype, device)
    xf, K = _flat(x0)
    out, traj = _policy_sample_op(xf, obs.contiguous(), None, None, tvec, coef, pol, [], MODE_INTEGRATE, K, steps, 0,
                                  SOLVER_CODES[solver], ACT_CODES[net.activation], len(net.layers),
                                  temperature=1.0, clip=False, softmax=False, trajectory=bool(return_trajectory),
                                  **_NO_CRITIC)
    out = out.view(x0.shape)
    if return_trajectory:
        return out, traj.view((steps + 1,) + tuple(x0.shape))
    return out


def sample(net, obs, num_samples, steps, solver, path, seed, return_trajectory):
    """Fused reference.ode._sample: obs [B, S] -> [B, num_samples, A] (and the trajectory
    [steps + 1, B, num_samples, A], whose first entry is the noise, when asked).

    The initial noise is drawn inside the kernel (Philox, tl.randn) from ``seed``: it is never
    materialised in memory, and it is a different stream from the reference's torch.Generator
    (same distribution: independent standard normals, rounded to obs' dtype).
    """
    if obs.shape[1] != net.obs_dim:
        raise ValueError(f"obs must be [B, {net.obs_dim}] (net.obs_dim), got shape {tuple(obs.shape)}")
    dtype, device = obs.dtype, obs.device
    pol, tvec, coef = _flow_inputs(net, steps, solver, 0.0, 1.0, path, dtype, device)
    out, traj = _seeded_sample_op(obs.contiguous(), tvec, coef, pol, num_samples, net.act_dim, seed, steps,
                                  SOLVER_CODES[solver], ACT_CODES[net.activation], len(net.layers),
                                  bool(return_trajectory))
    if return_trajectory:
        return out, traj
    return out


def _draw_step_noise(sigmas, shape, dtype, device, generator):
    # Same draws, same order and same shapes as reference.consistency._consistency_sample.
    n = len(sigmas or ())
    if n == 0:
        return None
    return torch.stack([torch.randn(shape, dtype=dtype, device=device, generator=generator) for _ in range(n)])


def consistency_sample(net, noise, obs, sigmas, step_noise, sigma_max, sigma_min, sigma_data, clip, generator):
    """Fused one-step / multistep consistency sampling; as reference.consistency._consistency_sample.

    noise [N, A] with obs [N, S] or [B, K, A] with obs [B, S]; step_noise [len(sigmas), *noise.shape]
    or None (then drawn from ``generator`` exactly as the reference draws it). Returns noise's shape.
    """
    _check_dims(net, noise, obs, "noise")
    dtype, device = noise.dtype, noise.device
    zf, K = _flat(noise)
    N, A = zf.shape
    sig = [float(s) for s in (sigmas or ())]
    if sig and step_noise is None:
        step_noise = _draw_step_noise(sig, (N, A), dtype, device, generator)
    sn = step_noise.reshape(len(sig), N, A).contiguous() if step_noise is not None else None
    pol, tvec, coef = _consistency_inputs(net, sig, sigma_max, sigma_min, sigma_data, dtype, device)
    out, _ = _policy_sample_op(zf, obs.contiguous(), sn, None, tvec, coef, pol, [], MODE_CONSISTENCY, K, 0,
                               1 + len(sig), 0, ACT_CODES[net.activation], len(net.layers),
                               temperature=1.0, clip=bool(clip), softmax=False, trajectory=False, **_NO_CRITIC)
    return out.view(noise.shape)


def act(net, critic, obs, num_candidates, sampler, steps, solver, path, sigmas, mode, temperature,
        noise, step_noise, uniform, generator, clip):
    """Sample K candidates per state, score by min(Q1, Q2), choose one -- one launch.

    Arguments and result as ops._act_ref: obs [B, S] -> actions [B, A]. Random inputs that are None
    are drawn from ``generator`` in the reference's order (noise, step noise, uniform).
    """
    B = obs.shape[0]
    K = num_candidates
    A = net.act_dim
    dtype, device = obs.dtype, obs.device
    if obs.shape[1] != net.obs_dim:
        raise ValueError(f"obs must be [B, {net.obs_dim}] (net.obs_dim), got shape {tuple(obs.shape)}")
    if noise is None:
        noise = torch.randn((B, K, A), dtype=dtype, device=device, generator=generator)
    sig = [float(s) for s in (sigmas or ())] if sampler == "consistency" else []
    if sampler == "consistency" and sig and step_noise is None:
        step_noise = _draw_step_noise(sig, (B * K, A), dtype, device, generator)
    if mode == "softmax":
        if uniform is None:
            uniform = torch.rand(B, dtype=torch.float64, device=device, generator=generator)
        u = uniform.to(torch.float64).contiguous()
    else:
        u = None
    zf, _ = _flat(noise)
    if sampler == "flow":
        pol, tvec, coef = _flow_inputs(net, steps, solver, 0.0, 1.0, path, dtype, device)
        m, n_evals, scode, nsteps = MODE_ACT_FLOW, 0, SOLVER_CODES[solver], steps
    else:
        pol, tvec, coef = _consistency_inputs(net, sig, _cons.SIGMA_MAX, _cons.SIGMA_MIN, _cons.SIGMA_DATA,
                                              dtype, device)
        m, n_evals, scode, nsteps = MODE_ACT_CONSISTENCY, 1 + len(sig), 0, 0
    cw = _critic_inputs(critic, dtype, device)
    cdepth, chidden, cln, ceps = _critic_meta(critic)
    sn = step_noise.reshape(len(sig), B * K, A).contiguous() if step_noise is not None else None
    # The consistency sampler always clamps (as the reference); ``clip`` clamps the candidates.
    out, _ = _policy_sample_op(zf, obs.contiguous(), sn, u, tvec, coef, pol, cw, m, K, nsteps, n_evals, scode,
                               ACT_CODES[net.activation], len(net.layers), ACT_CODES[critic.activation], cdepth,
                               chidden, cln, ceps, float(temperature),
                               True if sampler == "consistency" else bool(clip), mode == "softmax", False)
    return out


_backends.register("integrate", "triton", integrate, supports_integrate)
_backends.register("consistency_sample", "triton", consistency_sample, supports_consistency_sample)
_backends.register("act", "triton", act, supports_act)
_backends.register("sample", "triton", sample, supports_sample)
