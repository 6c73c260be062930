"""Host launcher of the fused sampler kernel: precision, tile sizes, tuning, and launch plans.

A launch is split in two: ``make_plan`` (everything that depends only on the configuration: the
kernel object, grid, constexpr meta-parameters, the weight pointer list) and
``run_plan`` (the per-call tensors and scalars, launch). The kernel needs no scratch memory: hidden
activations and the observation share stay on chip (mlp.mlp_eval). Eager callers
cache plans with the packed weights (sampler_pack.Entry.plans), so a warm call costs a dictionary
lookup and the launch itself.

Precision of float32 inputs (``fp32_precision``): TF32 when torch's own float32 matmuls use TF32
(``torch.backends.cuda.matmul.allow_tf32`` / ``fp32_precision = "tf32"``); IEEE float32 (FMA, no
tensor cores) when ``fp32_precision = "ieee"`` is set explicitly; otherwise TF32x3 (three TF32
tensor-core products of a high / low split: float32-level accuracy). QIPO_TRITON_FP32 = ieee |
tf32 | tf32x3 overrides. bfloat16 / float16 take their own tensor-core path; accumulation, bias,
activation and the state x are float32 in every case. Under the CPU interpreter float32 is IEEE.

Tiles: rows per tile (BM, 16..128) are picked from the problem size (the largest tile that still
gives every SM work: 4 buckets at most); the column block, warps and pipeline stages are autotuned
on first CUDA use, keyed on stable dimensions only (never the batch size). QIPO_TRITON_AUTOTUNE=0
skips tuning. act's tile holds whole states: BM // KP states x KP candidate slots.
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

import torch
import triton

from . import _host
from .mlp import PREC_HALF, PREC_IEEE, PREC_TF32, PREC_TF32X3
from .sampler_kernel import _policy_kernel, is_group

# Programs of the persistent grid under the interpreter (small, so that tests run several tiles
# per program and exercise the persistent loop).
INTERPRET_PROGRAMS = 2

_SM_COUNT: Dict[int, int] = {}
_TUNED: Dict[Tuple, object] = {}


def interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def sm_count(device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def programs(device) -> int:
    """Programs of the persistent grid: two per SM on CUDA (a tile's dependent chain of loads
    leaves room for a second CTA), INTERPRET_PROGRAMS under the interpreter."""
    if interpret() or device.type != "cuda":
        return INTERPRET_PROGRAMS
    return 2 * sm_count(device)


_FP32_MODES = {"ieee": PREC_IEEE, "tf32": PREC_TF32, "tf32x3": PREC_TF32X3}


def fp32_precision() -> int:
    """The tl.dot precision of float32 inputs on a GPU (see the module docstring)."""
    env = os.environ.get("QIPO_TRITON_FP32")
    if env:
        if env not in _FP32_MODES:
            raise ValueError(f"QIPO_TRITON_FP32 must be one of {sorted(_FP32_MODES)}, got {env!r}")
        return _FP32_MODES[env]
    m = torch.backends.cuda.matmul
    p = getattr(m, "fp32_precision", None)
    if p == "tf32":
        return PREC_TF32
    if p == "ieee":
        return PREC_IEEE
    try:
        tf32 = bool(m.allow_tf32)
    except RuntimeError:
        tf32 = False
    return PREC_TF32 if tf32 else PREC_TF32X3


def prec(dtype, device) -> int:
    """PREC_* for tl.dot: half inputs for bf16 / fp16; for float32 see fp32_precision (IEEE under
    the interpreter, which has no tensor cores to emulate)."""
    if dtype != torch.float32:
        return PREC_HALF
    if interpret() or device.type != "cuda":
        return PREC_IEEE
    return fp32_precision()


def _autotune_enabled() -> bool:
    return os.environ.get("QIPO_TRITON_AUTOTUNE", "1") != "0"


def tuned_kernel(hp: int, hpq: int):
    """The autotuned kernel for a width class, created lazily on first CUDA use (never at import).

    Tuned: BN (column block), num_warps, num_stages. The key holds stable dimensions and the
    constexpr configuration only; BM (rows per tile) is chosen on the host from a few size
    buckets (see ``choose_bm``), so a new batch size never recompiles or retunes.
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
                                    "SOLVER", "CLIP", "TRAJ", "SOFTMAX", "PREC", "BM"],
                        prune_configs_by={"early_config_prune": prune_configs})(_policy_kernel)
    _TUNED[key] = k
    return k


def prune_configs(configs, named_args, **meta):
    """Drop the single-stage configs for 16-row tiles: ptxas spills registers in them on sm_90a
    (bench.static_sm90, 1 x 50 x 10 bf16: 32-68 spill bytes at 4 and 8 warps), the two-stage ones
    do not. Never returns an empty list."""
    if meta.get("BM", 0) <= 16:
        kept = [c for c in configs if c.num_stages >= 2]
        return kept or configs
    return configs


def choose_bm(rows: int, min_rows: int, hs: int, programs: int) -> int:
    """Rows per tile: the largest of 16..128 that still gives every SM a tile (a bigger
    tile re-reads the weights fewer times; a smaller one spreads a small batch over more SMs).
    Only these few buckets exist, so the batch size never triggers more than 4 compilations."""
    cap = 128 if hs <= 256 else 64
    bm = 16
    for cand in (32, 64, 128):
        if cand <= cap and triton.cdiv(rows, cand) >= programs:
            bm = cand
    return max(bm, min_rows)


class Plan:
    """One launch configuration: see make_plan."""
    __slots__ = ("kernel", "grid", "meta", "weights", "hq", "ln_eps", "K", "A", "steps",
                 "n_evals", "dtype", "device", "traj", "scratch")


def make_plan(mode, pol: List[torch.Tensor], critic: List[torch.Tensor], units: int, K: int, A: int, steps: int,
              n_evals: int, solver_code: int, act_code: int, depth: int, act_code_q: int, depth_q: int, hq: int,
              lnq: bool, ln_eps: float, clip: bool, softmax: bool, traj: bool, seeded: bool,
              dtype: torch.dtype, device: torch.device) -> Plan:
    """Everything about a launch that the per-call tensors do not change. ``units``: samples
    (MODE_INTEGRATE / MODE_CONSISTENCY) or states (act modes); it only picks the tile bucket and grid."""
    HP, AP, SP = pol[0].shape[1], pol[0].shape[0], pol[1].shape[0]
    group = is_group(mode)
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
    KP = next_pow2(K) if group else 1
    meta = dict(MODE=mode, SOLVER=solver_code, CLIP=bool(clip), TRAJ=bool(traj), SOFTMAX=bool(softmax),
                SEEDED=bool(seeded), LNQ=bool(lnq), HP=HP, AP=AP, SP=SP, DEPTH=depth, ACT=act_code, HPQ=hpq,
                DEPTHQ=dq, ACTQ=act_code_q, KP=KP, PREC=prec(dtype, device))
    nprog = programs(device)
    rows = units * KP if group else units
    interp = interpret() or device.type != "cuda"
    bm = max(16, KP) if interp else choose_bm(rows, KP, HS, max(1, nprog // 2))  # tiles >= SMs
    n_tiles = triton.cdiv(units, bm // KP) if group else triton.cdiv(units, bm)
    progs = max(1, min(n_tiles, nprog))
    p = Plan()
    if interp:
        p.kernel = _policy_kernel
        meta.update(BM=bm, BN=min(64, HP, hpq))
    else:
        p.kernel = tuned_kernel(HP, hpq)
        meta.update(BM=bm)
    p.grid = (progs,)
    p.meta = meta
    p.weights = tuple(pol) + tuple(qargs)
    p.hq, p.ln_eps = int(hq), float(ln_eps)
    p.K, p.A, p.steps, p.n_evals = K, A, steps, n_evals
    p.dtype, p.device, p.traj = dtype, device, bool(traj)
    p.scratch = {}  # always empty: the kernel has no global scratch (kept for callers that snapshot it)
    return p


def run_plan(p: Plan, x0, obs, snoise, u, out, traj, tvec, coef, N: int, B: int, temperature: float = 1.0,
             seed: int = 0) -> None:
    """Launch ``p`` on this call's tensors (x0 None: the noise is drawn in the kernel from ``seed``).
    No host synchronisation: capturable in a CUDA graph once the plan and tables exist."""
    xp = x0 if x0 is not None else out  # not read when SEEDED
    args = (xp, obs, snoise if snoise is not None else xp, u if u is not None else coef, out,
            traj if traj is not None else out, tvec, coef) + p.weights + \
        (N, B, p.K, p.A, obs.shape[1], p.steps, p.n_evals, temperature, p.hq, p.ln_eps, seed)
    device = p.device
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            p.kernel[p.grid](*args, **p.meta)
    else:
        p.kernel[p.grid](*args, **p.meta)


def launch(mode, pol, critic, x0, obs, snoise, u, out, traj, tvec, coef, N, B, K, A, S, steps, n_evals,
           temperature, solver_code, act_code, depth, act_code_q, depth_q, hq, lnq, ln_eps, clip, softmax,
           seed=None) -> None:
    """make_plan + run_plan in one call (no plan cache: the custom ops and torch.compile use this)."""
    group = is_group(mode)
    p = make_plan(mode, pol, critic, B if group else N, K, A, steps, n_evals, solver_code, act_code, depth,
                  act_code_q, depth_q, hq, lnq, ln_eps, clip, softmax, traj is not None, x0 is None, out.dtype,
                  out.device)
    run_plan(p, x0, obs, snoise, u, out, traj, tvec, coef, N, B, float(temperature), int(seed or 0))


def compile_for_target(mode=0, solver=0, dtype="fp32", prec=0, softmax=False, traj=False, kp=1, bm=64, bn=64,
                        hp=256, depth=3, arch=90, num_warps=4, ln=False, seeded=False):
    """Compile the fused kernel for a CUDA architecture without a GPU (Triton's bundled ptxas);
    a development check that the interpreter cannot make. Needs TRITON_INTERPRET unset."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _policy_kernel
    names = fn.arg_names
    f32 = {"tvec_ptr", "coef_ptr", "b1", "bh", "bo", "qb1", "qhb1", "qwb1", "qb2", "qhb2", "qwb2",
           "qlw1", "qlb1", "qlw2", "qlb2"}
    ints = {"N", "B", "K", "A", "S", "steps", "n_evals", "HQ"}
    const = dict(LNQ=ln, SEEDED=seeded, MODE=mode, SOLVER=solver, CLIP=True, TRAJ=traj, SOFTMAX=softmax, HP=hp, AP=16, SP=32,
                 DEPTH=depth, ACT=0, HPQ=hp, DEPTHQ=depth, ACTQ=2, KP=kp, BM=bm, BN=bn, PREC=prec)
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
