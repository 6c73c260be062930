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

Tiles (all of them compile for sm_90a without register spills or local memory for the benchmark
networks; see _CONFIGS and _ACT_MAX_ROWS): rows per tile (BM, 16..128) are picked from the problem
size (the largest tile that still gives half the SMs work, capped per width and dtype by the
register budget: 4 buckets at most); act with more candidates than a spill-free act tile holds is
not offered on a GPU (act_candidates_reason);
the column block, warps and pipeline stages are autotuned on first CUDA use among the spill-free
configurations of ``_CONFIGS``, keyed on stable dimensions only (never the batch size).
QIPO_TRITON_AUTOTUNE=0 skips tuning. act's tile holds whole states: BM // KP states x KP candidate
slots.

The latency case (1 state x 50 candidates, 50 rows): 16-row tiles, so 4 CTAs. Splitting further
cannot pay off in this design: every CTA streams all the weights once per evaluation whatever its
rows, so more row tiles add L2 traffic without shortening any CTA's dependent chain (10
evaluations x (D + 1) layers of weight streaming); shortening it needs the layers' columns split
across CTAs with the activations exchanged between them at every layer (a cluster with distributed
shared memory, which Triton does not expose, or a grid-wide barrier per layer, which costs more
than the layer).
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
# Column block under the interpreter (tests lower it to get several blocks per layer).
INTERPRET_BN = 64

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


# Launch configurations per (width class, tl.dot precision) and rows per tile: (BN, num_warps,
# num_stages) in the order the autotuner tries them. Chosen with the static sm_90a report
# (python -m bench.static_sm90) so that they compile for sm_90a without register spills for the
# benchmark networks (3 x 256 and 3 x 512, obs 17, action 6) in integrate, consistency and act
# (act beyond _ACT_MAX_ROWS candidates is not offered). What bounds the tile: the accumulator of a
# pair's second layer ([HP, BM] float32, registers), the pair's first-layer block [BN, BM], and for
# TF32x3 the high / low halves of every operand (the float32 precisions split the first dot's K,
# mlp._pre). Measured on 2026-12-02 (ptxas of Triton 3.9): TF32x3 64-row tiles at width 512 spill
# (48 / 60 B, and 304 KB of shared memory), IEEE 64-row act tiles at width 256 too (276 / 224 B).
_CONFIGS = {
    (256, PREC_HALF): {128: [(16, 8, 2), (16, 8, 1)], 64: [(32, 8, 2), (16, 8, 2)], 32: [(32, 4, 2)],
                       16: [(32, 4, 2), (64, 4, 2)]},
    (256, PREC_TF32): {64: [(32, 8, 2), (16, 8, 2)], 32: [(32, 4, 2)], 16: [(32, 4, 2)]},
    (256, PREC_TF32X3): {64: [(16, 8, 1)], 32: [(16, 8, 1)]},
    (256, PREC_IEEE): {64: [(16, 8, 1)], 32: [(16, 8, 1)], 16: [(16, 8, 1)]},
    (512, PREC_HALF): {64: [(16, 8, 2), (16, 8, 1)], 32: [(32, 4, 2)], 16: [(32, 4, 2)]},
    (512, PREC_TF32): {32: [(16, 8, 2)], 16: [(16, 4, 2)]},
    (512, PREC_TF32X3): {32: [(16, 8, 1)]},
    (512, PREC_IEEE): {32: [(16, 8, 1)], 16: [(16, 8, 1)]},
}


# Configurations of _CONFIGS that the static report found to spill (or use local memory) for one
# kind of launch: (MODE, SEEDED, width class, precision, BM, (BN, warps, stages)). prune_configs
# never offers them for that launch.
_SPILLING = {
    (1, False, 256, PREC_HALF, 128, (16, 8, 2)),  # consistency: 16 B of stack in the cubin
    (3, False, 512, PREC_HALF, 64, (16, 8, 2)),  # act (consistency sampler), 3 x 512: 16 B of stack
}


def _width_class(hs: int) -> int:
    return 256 if hs <= 256 else 512


# The largest rows-per-tile bucket choose_bm picks per (width class, precision) when the problem is
# big enough (act may need more rows: a tile holds all candidates of a state; configs_for then uses
# the configurations of the largest listed bucket below it).
# act's tiles (the critic runs after the sampler, more values live) stop at 64 rows.
_MAX_BM = {(256, PREC_HALF): 128, (256, PREC_TF32): 64, (256, PREC_TF32X3): 64, (256, PREC_IEEE): 64,
           (512, PREC_HALF): 64, (512, PREC_TF32): 32, (512, PREC_TF32X3): 32, (512, PREC_IEEE): 32}
MAX_BM_ACT = 64

# The most rows of an act tile per (width class, precision) that compile for sm_90a without spills
# or local memory (the static report, with the twin critic after the sampler): choose_bm caps act's
# tiles there, and since a tile holds whole states (KP = next_pow2(num_candidates) rows each),
# more candidates than that are not offered on a GPU (sampler.supports_act gives the reason and
# dispatch takes the next backend): a 64-row act tile spills in IEEE float32 at width 256
# (276 / 224 B) and at width 512 in TF32 (16 B of stack) and TF32x3 (136 B, and 304 KB of shared
# memory); 128-row tiles spill in bf16 (48 B).
_ACT_MAX_ROWS = {(256, PREC_HALF): 64, (256, PREC_TF32): 64, (256, PREC_TF32X3): 64, (256, PREC_IEEE): 32,
                 (512, PREC_HALF): 64, (512, PREC_TF32): 32, (512, PREC_TF32X3): 32, (512, PREC_IEEE): 32}
_PREC_NAMES = {PREC_HALF: "bf16 / fp16", PREC_TF32: "float32 TF32", PREC_TF32X3: "float32 TF32x3",
               PREC_IEEE: "IEEE float32"}


def act_candidates_reason(hidden: int, num_candidates: int, dtype, device) -> str:
    """Why the fused act is not offered for this many candidates (empty when it is): see _ACT_MAX_ROWS.
    ``hidden``: the wider of the policy and the critic. Nothing to check under the interpreter or off
    CUDA, or for at most 32 candidates (every width and precision has a spill-free 32-row act tile)."""
    if num_candidates <= 32 or device is None or device.type != "cuda" or interpret():
        return ""
    p = prec(dtype, device)
    w = _width_class(hidden)
    cap = _ACT_MAX_ROWS[(w, p)]
    if next_pow2(num_candidates) <= cap:
        return ""
    return (f"num_candidates = {num_candidates} needs a {next_pow2(num_candidates)}-row act tile, and in "
            f"{_PREC_NAMES[p]} at hidden width {hidden} the fused kernel's act tiles above {cap} rows spill "
            f"registers on sm_90 (at most {cap} candidates here)")


def max_bm(hs: int, precision: int) -> int:
    return _MAX_BM[(_width_class(hs), precision)]


def min_bm(hs: int, precision: int) -> int:
    """The smallest bucket with a configuration (TF32x3 spills in 16-row tiles: its smallest is 32)."""
    return min(_CONFIGS[(_width_class(hs), precision)])


def configs_for(hs: int, precision: int, bm: int, bn_cap: int):
    """(BN, warps, stages) of a tile size (BN at most the narrower network's padded width)."""
    table = _CONFIGS[(_width_class(hs), precision)]
    fit = [b for b in sorted(table) if b <= bm]
    rows = table[fit[-1]] if fit else table[min(table)]
    out = []
    for bn, w, st in rows:
        c = (min(bn, bn_cap), w, st)
        if c not in out:
            out.append(c)
    return out


def tuned_kernel(hp: int, hpq: int):
    """The autotuned kernel for a width class, created lazily on first CUDA use (never at import).

    Tuned: BN (column block), num_warps, num_stages among the configurations of ``_CONFIGS``; the
    key holds stable dimensions and the constexpr configuration only. BM (rows per tile) is chosen
    on the host from a few size buckets (see ``choose_bm``) and selects which configurations the
    autotuner may try (``prune_configs``), so a new batch size never recompiles or retunes.
    """
    key = (hp, hpq)
    if key in _TUNED:
        return _TUNED[key]
    hs, cap = max(hp, hpq), min(hp, hpq)
    seen = []
    for precision in (PREC_HALF, PREC_TF32, PREC_TF32X3, PREC_IEEE):
        for bm in _CONFIGS[(_width_class(hs), precision)]:
            for c in configs_for(hs, precision, bm, cap):
                if c not in seen:
                    seen.append(c)
    cfgs = [triton.Config({"BN": bn}, num_warps=w, num_stages=st) for bn, w, st in seen]
    k = triton.autotune(cfgs, key=["HP", "AP", "SP", "DEPTH", "ACT", "HPQ", "DEPTHQ", "ACTQ", "KP", "MODE", "SEEDED",
                                    "SOLVER", "CLIP", "TRAJ", "SOFTMAX", "PREC", "BM"],
                        prune_configs_by={"early_config_prune": prune_configs})(_policy_kernel)
    _TUNED[key] = k
    return k


def prune_configs(configs, named_args, **meta):
    """Keep the configurations listed in ``_CONFIGS`` for this launch's width, dtype and BM (the
    first only with QIPO_TRITON_AUTOTUNE=0). Never returns an empty list."""
    hp, hpq, bm = meta.get("HP", 256), meta.get("HPQ", 256), meta.get("BM", 64)
    hs, prec_ = max(hp, hpq), meta.get("PREC", PREC_HALF)
    want = configs_for(hs, prec_, bm, min(hp, hpq))
    kind = (meta.get("MODE", 0), bool(meta.get("SEEDED", False)), _width_class(hs), prec_, bm)
    want = [c for c in want if kind + (c,) not in _SPILLING] or want[-1:]
    if not _autotune_enabled():
        want = want[:1]
    kept = [c for c in configs if (c.kwargs.get("BN"), c.num_warps, c.num_stages) in want]
    kept.sort(key=lambda c: want.index((c.kwargs.get("BN"), c.num_warps, c.num_stages)))
    return kept or list(configs)[:1]


def choose_bm(rows: int, min_rows: int, hs: int, programs: int, precision: int = PREC_HALF,
              group: bool = False) -> int:
    """Rows per tile: the largest bucket of 16..max_bm(hs, precision) that still gives at least half
    the SMs a tile. Each weight byte read feeds 2 * BM FLOPs, so a 64-row bf16 tile is bound by
    L2 bandwidth on an H100 / H200 (~64 FLOP/B against a ridge near 100) where a 128-row one is
    not: fewer, fuller CTAs pay until the grid leaves most SMs idle. Only these few buckets exist,
    so the batch size never triggers more than 4 compilations."""
    cap = max_bm(hs, precision)
    if group:
        cap = min(cap, MAX_BM_ACT, _ACT_MAX_ROWS[(_width_class(hs), precision)])
    bm = min_bm(hs, precision)
    for cand in (32, 64, 128):
        if cand <= cap and triton.cdiv(rows, cand) >= max(1, programs // 2):
            bm = cand
    return max(bm, min_rows)


class Plan:
    """One launch configuration: see make_plan."""
    __slots__ = ("kernel", "grid", "meta", "weights", "hq", "ln_eps", "K", "A", "steps",
                 "n_evals", "dtype", "device", "traj")


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
    bm = max(16, KP) if interp else choose_bm(rows, KP, HS, max(1, nprog // 2), meta["PREC"], group)  # programs = SMs
    n_tiles = triton.cdiv(units, bm // KP) if group else triton.cdiv(units, bm)
    progs = max(1, min(n_tiles, nprog))
    p = Plan()
    if interp:
        p.kernel = _policy_kernel
        meta.update(BM=bm, BN=min(INTERPRET_BN, HP, hpq))
    else:
        p.kernel = tuned_kernel(HP, hpq)
        meta.update(BM=bm)
    p.grid = (progs,)
    p.meta = meta
    p.weights = tuple(pol) + tuple(qargs)
    p.hq, p.ln_eps = int(hq), float(ln_eps)
    p.K, p.A, p.steps, p.n_evals = K, A, steps, n_evals
    p.dtype, p.device, p.traj = dtype, device, bool(traj)
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
