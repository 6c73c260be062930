"""The fused policy-sampling kernel: a whole ConditionalMLP, every solver step, (for act) the twin
critic and the selection, in one launch. The host side is in sampler_launch (launcher, tiles,
tuning), sampler_pack (weights), sampler_tables (solver coefficients) and sampler_ops (custom ops).

How the kernel is organised (one program = a tile of BM samples, persistent over tiles):

* Nothing but the inputs, the tables, the weights and the outputs lives in global memory: the
  state x (float32) and the tile's observation rows (compute dtype) stay in registers for all steps,
  and each network evaluation keeps its hidden activations on chip by layer pairing (mlp.mlp_eval):
  every weight block is read once per tile and evaluation, the observation's share of layer 1 is
  recomputed by a K = SP dot per column block instead of being stored.
* The time embedding's share W1_t @ e(t) does not depend on the sample: it is one vector per
  network evaluation, computed on the host for all evaluation times at once and read from that table.
* Solver coefficients come from a small float32 table [*, NCOEF] computed on the host in float64.
* Modes: 0 integrate (ODE solvers), 1 consistency sampling, 2 / 3 act with the flow / consistency
  sampler (twin critic + selection), 4 DDPM (Diffusion-QL's ancestral steps; its coefficient row e
  holds step i = T-1-e's sqrt(1/abar), sqrt(1/abar - 1), posterior c1, c2, std, the x0_hat clamp
  bounds and the final bound; SOLVER 1 = eps prediction, 0 = x0 prediction).
* Clamps to [-1, 1] propagate NaN (as torch.clamp does): a NaN input gives a NaN action, never a
  valid-looking bound.
"""
import triton
import triton.language as tl
from triton.language.random import uint_to_uniform_float

from .mlp import load_obs_t, mlp_eval, net_eval

SOLVER_CODES = {"euler": 0, "midpoint": 1, "heun": 2, "rk4": 3, "ddim": 4, "dpm1": 4, "dpm2": 5}
MODE_INTEGRATE, MODE_CONSISTENCY, MODE_ACT_FLOW, MODE_ACT_CONSISTENCY, MODE_DDPM = 0, 1, 2, 3, 4
NCOEF = 8  # columns of the per-step coefficient table


def is_group(mode: int) -> bool:
    """Whether a mode works on whole states (act: K candidates, the critic, one action per state)."""
    return mode == MODE_ACT_FLOW or mode == MODE_ACT_CONSISTENCY


@triton.jit
def clamp_unit(x):
    """Clamp to [-1, 1], NaN stays NaN (tl.minimum / tl.maximum would turn it into a bound)."""
    return tl.where(x != x, x, tl.minimum(tl.maximum(x, -1.0), 1.0))


@triton.jit
def clamp_nan(x, lo, hi):
    """Clamp to [lo, hi] (infinite bounds: no clamp), NaN stays NaN."""
    return tl.where(x != x, x, tl.minimum(tl.maximum(x, lo), hi))


@triton.jit
def cos_2pi(u):
    """cos(2 pi u) for float32 u in [0, 1] without libdevice's cosf: reduced to x = 2 pi s, s in
    [0, 1/4], by the symmetries of cos, then its Taylor polynomial to x^14 (truncation error below
    2e-9 on [0, pi/2]; float32 rounding dominates). libdevice's cosf carries a Payne-Hanek
    reduction for huge arguments that keeps a 28-byte array in local memory (the seeded kernel's
    stack frame), although Box-Muller's argument never leaves [0, 2 pi)."""
    v = u - tl.floor(u + 0.5)  # [-1/2, 1/2), cos(2 pi v) = cos(2 pi u)
    w = tl.abs(v)  # [0, 1/2]
    far = w > 0.25
    x = 6.283185307179586 * tl.where(far, 0.5 - w, w)  # cos(2 pi w) = -cos(2 pi (1/2 - w))
    x2 = x * x
    c = -1.0 / 87178291200.0
    c = c * x2 + 1.0 / 479001600.0
    c = c * x2 - 1.0 / 3628800.0
    c = c * x2 + 1.0 / 40320.0
    c = c * x2 - 1.0 / 720.0
    c = c * x2 + 1.0 / 24.0
    c = c * x2 - 0.5
    c = c * x2 + 1.0
    return tl.where(far, -c, c)


@triton.jit
def philox_randn(seed, offset):
    """Standard normal float32 from Philox at ``offset`` (int64): tl.randn's draw (the same two
    uniforms of tl.randint4x, Box-Muller's cosine branch) with cos_2pi for the cosine, so the kernel
    needs no local memory."""
    i1, i2, _, _ = tl.randint4x(seed, offset)
    u1 = tl.maximum(1.0e-7, uint_to_uniform_float(i1))
    u2 = uint_to_uniform_float(i2)
    return tl.sqrt(-2.0 * tl.log(u1)) * cos_2pi(u2)


@triton.jit(do_not_specialize=["N", "B", "K", "A", "S", "steps", "n_evals", "temperature", "HQ", "ln_eps", "seed"])
def _policy_kernel(
    x0_ptr, obs_ptr, snoise_ptr, u_ptr, out_ptr, traj_ptr, tvec_ptr, coef_ptr,
    w1x, w1o, b1, wh, bh, wo, bo,
    qa1, qo1, qb1, qh1, qhb1, qw1, qwb1, qlw1, qlb1,
    qa2, qo2, qb2, qh2, qhb2, qw2, qwb2, qlw2, qlb2,
    N, B, K, A, S, steps, n_evals, temperature, HQ, ln_eps, seed,
    MODE: tl.constexpr, SOLVER: tl.constexpr, CLIP: tl.constexpr, TRAJ: tl.constexpr, SEEDED: tl.constexpr,
    SOFTMAX: tl.constexpr, LNQ: tl.constexpr,
    HP: tl.constexpr, AP: tl.constexpr, SP: tl.constexpr, DEPTH: tl.constexpr, ACT: tl.constexpr,
    HPQ: tl.constexpr, DEPTHQ: tl.constexpr, ACTQ: tl.constexpr, KP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_m = tl.arange(0, BM)
    offs_a = tl.arange(0, AP)
    GROUP: tl.constexpr = MODE // 2 == 1  # MODE 2 / 3 (act)
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
        oa = load_obs_t(obs_ptr, state, valid, S, SP, w1x.dtype.element_ty)  # [SP, BM], registers, all steps
        amask = valid[:, None] & (offs_a[None, :] < A)
        xoff = rows[:, None] * A + offs_a[None, :]
        if SEEDED:
            # x0[row, a] = philox_randn(seed, row * A + a): Philox on the global element index, so the
            # noise does not depend on the tiling; rounded to the output dtype as a stored x0 would be.
            z = philox_randn(seed, xoff)
            x = tl.where(amask, z, 0.0).to(out_ptr.dtype.element_ty).to(tl.float32)
        else:
            x = tl.load(x0_ptr + xoff, mask=amask, other=0.0).to(tl.float32)
        if MODE == 4:
            # ---------------- DDPM ancestral sampling (Diffusion-QL), eval e = step i = T-1-e ----------------
            # coef row e: [sqrt(1/abar), sqrt(1/abar - 1), c1, c2, std (0 at the last step), lo, hi, bound]
            # (lo / hi: the x0_hat clamp, +-inf without clip_denoised; bound: the final clamp)
            for e in range(n_evals):
                c = coef_ptr + e * 8
                f = net_eval(x, oa, tvec_ptr + e * HP, w1x, w1o, b1, wh, bh, wo, bo,
                              HP, AP, SP, AP, DEPTH, ACT, True, BM, BN, PREC)
                if SOLVER == 1:  # the network predicts eps
                    x0h = tl.load(c) * x - tl.load(c + 1) * f
                else:  # it predicts x0
                    x0h = f
                x0h = clamp_nan(x0h, tl.load(c + 5), tl.load(c + 6))
                mean = tl.load(c + 2) * x0h + tl.load(c + 3) * x
                # step noise z_e for every step but the last (there std = 0 and nothing is read)
                zmask = amask & ((xoff * 0 + e) < n_evals - 1)
                zk = tl.load(snoise_ptr + e * NA + xoff, mask=zmask, other=0.0).to(tl.float32)
                x = mean + tl.load(c + 4) * zk
            if CLIP:
                bnd = tl.load(coef_ptr + 7)
                x = clamp_nan(x, -bnd, bnd)
        elif MODE % 2 == 0:  # MODE 0 (integrate) or 2 (act with the flow sampler)
            # ---------------- ODE solver, all steps ----------------
            if TRAJ:
                tl.store(traj_ptr + xoff, x.to(traj_ptr.dtype.element_ty), mask=amask)
            for i in range(steps):
                c = coef_ptr + i * 8
                if SOLVER == 0:  # euler
                    k1 = net_eval(x, oa, tvec_ptr + i * HP, w1x, w1o, b1, wh, bh, wo, bo,
                                   HP, AP, SP, AP, DEPTH, ACT, True, BM, BN, PREC)
                    x = x + tl.load(c) * k1
                elif SOLVER == 1:  # midpoint
                    e0 = 2 * i
                    k1 = net_eval(x, oa, tvec_ptr + e0 * HP, w1x, w1o, b1, wh, bh, wo, bo,
                                   HP, AP, SP, AP, DEPTH, ACT, True, BM, BN, PREC)
                    k2 = net_eval(x + tl.load(c + 1) * k1, oa, tvec_ptr + (e0 + 1) * HP, w1x, w1o, b1, wh, bh,
                                   wo, bo, HP, AP, SP, AP, DEPTH, ACT, True, BM, BN, PREC)
                    x = x + tl.load(c) * k2
                elif SOLVER == 2:  # heun
                    e0 = 2 * i
                    k1 = net_eval(x, oa, tvec_ptr + e0 * HP, w1x, w1o, b1, wh, bh, wo, bo,
                                   HP, AP, SP, AP, DEPTH, ACT, True, BM, BN, PREC)
                    k2 = net_eval(x + tl.load(c) * k1, oa, tvec_ptr + (e0 + 1) * HP, w1x, w1o, b1, wh, bh,
                                   wo, bo, HP, AP, SP, AP, DEPTH, ACT, True, BM, BN, PREC)
                    x = x + tl.load(c + 1) * (k1 + k2)
                elif SOLVER == 3:  # rk4
                    e0 = 4 * i
                    hh = tl.load(c + 1)
                    k1 = net_eval(x, oa, tvec_ptr + e0 * HP, w1x, w1o, b1, wh, bh, wo, bo,
                                   HP, AP, SP, AP, DEPTH, ACT, True, BM, BN, PREC)
                    k2 = net_eval(x + hh * k1, oa, tvec_ptr + (e0 + 1) * HP, w1x, w1o, b1, wh, bh,
                                   wo, bo, HP, AP, SP, AP, DEPTH, ACT, True, BM, BN, PREC)
                    k3 = net_eval(x + hh * k2, oa, tvec_ptr + (e0 + 2) * HP, w1x, w1o, b1, wh, bh,
                                   wo, bo, HP, AP, SP, AP, DEPTH, ACT, True, BM, BN, PREC)
                    k4 = net_eval(x + tl.load(c) * k3, oa, tvec_ptr + (e0 + 3) * HP, w1x, w1o, b1, wh, bh,
                                   wo, bo, HP, AP, SP, AP, DEPTH, ACT, True, BM, BN, PREC)
                    x = x + tl.load(c + 2) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
                elif SOLVER == 4:  # ddim / dpm1 (DPM-Solver++ 1, data prediction)
                    eps = net_eval(x, oa, tvec_ptr + i * HP, w1x, w1o, b1, wh, bh, wo, bo,
                                    HP, AP, SP, AP, DEPTH, ACT, True, BM, BN, PREC)
                    x0t = (x - tl.load(c) * eps) / tl.load(c + 1)
                    x = tl.load(c + 2) * x + tl.load(c + 3) * x0t
                else:  # dpm2: DPM-Solver++(2S), r1 = 1/2
                    e0 = 2 * i
                    eps = net_eval(x, oa, tvec_ptr + e0 * HP, w1x, w1o, b1, wh, bh, wo, bo,
                                    HP, AP, SP, AP, DEPTH, ACT, True, BM, BN, PREC)
                    x0t = (x - tl.load(c) * eps) / tl.load(c + 1)
                    xm = tl.load(c + 2) * x - tl.load(c + 3) * x0t
                    epm = net_eval(xm, oa, tvec_ptr + (e0 + 1) * HP, w1x, w1o, b1, wh, bh, wo, bo,
                                    HP, AP, SP, AP, DEPTH, ACT, True, BM, BN, PREC)
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
                f = net_eval(tl.load(c + 2) * xs, oa, tvec_ptr + e * HP, w1x, w1o, b1, wh, bh, wo, bo,
                              HP, AP, SP, AP, DEPTH, ACT, True, BM, BN, PREC)
                a = tl.load(c) * xs + tl.load(c + 1) * f
                if CLIP:
                    a = clamp_unit(a)
            x = a
        if GROUP:
            # ---------------- twin critic on the K candidates, min, selection ----------------
            cand = x
            if CLIP:
                cand = clamp_unit(cand)
            q1 = mlp_eval(cand, oa, tvec_ptr, qa1, qo1, qb1, qh1, qhb1, qw1, qwb1, qlw1, qlb1, HQ, ln_eps,
                          HPQ, AP, SP, 16, DEPTHQ, ACTQ, False, LNQ, BM, BN, PREC)
            q2 = mlp_eval(cand, oa, tvec_ptr, qa2, qo2, qb2, qh2, qhb2, qw2, qwb2, qlw2, qlb2, HQ, ln_eps,
                          HPQ, AP, SP, 16, DEPTHQ, ACTQ, False, LNQ, BM, BN, PREC)
            offs_q = tl.arange(0, 16)
            qmin = tl.minimum(q1, q2, propagate_nan=tl.PropagateNan.ALL)  # (a NaN of either head is kept)
            q = tl.sum(tl.where(offs_q[None, :] == 0, qmin, 0.0), axis=1)  # [BM]
            q2d = tl.reshape(q, (SB, KP))
            v2d = tl.reshape(valid, (SB, KP))
            # a state with a NaN / inf candidate score cannot be ranked: it is ranked on zeros here and
            # its action written as NaN, which the host turns into act's error (as the reference and
            # C++ raise)
            qbad = tl.sum(tl.where(v2d & ((q2d != q2d) | (tl.abs(q2d) == float("inf"))), 1, 0), axis=1) > 0
            q2d = tl.where(qbad[:, None], 0.0, q2d)
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
            chosen = tl.where(qbad[:, None], float("nan"), chosen)
            tl.store(out_ptr + states[:, None] * A + offs_a[None, :], chosen.to(out_ptr.dtype.element_ty),
                     mask=svalid[:, None] & (offs_a[None, :] < A))
        else:
            if MODE != 4:  # (ddpm: its own clamp to the action bound, above)
                if CLIP:  # (integrate for make_sampler: the final clamp; consistency: already clamped)
                    x = clamp_unit(x)
            tl.store(out_ptr + xoff, x.to(out_ptr.dtype.element_ty), mask=amask)


