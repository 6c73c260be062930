"""Static sm_90a (H100 / H200) report of the fused sampler kernel, made without a GPU.

For each benchmark shape the library's own launcher (sampler_launch.make_plan / run_plan) is run
on stand-in CUDA tensors with the kernel replaced by a recorder (SM count 132), so the grid, the
constexprs and the autotune configurations are exactly those a GPU run would use. Each recorded
(shape, config) is then compiled ahead of time for sm_90a with Triton (``triton.compile`` on an
``ASTSource``, target ``GPUTarget("cuda", 90, 32)``); the ``ptxas -v`` and ``cuobjdump -sass``
bundled with Triton give registers, spills, shared memory and instruction counts. A traffic model
of the kernel as written (global L1/L2 bytes per tile and network evaluation: each weight once,
biases, time row; per tile the row inputs and outputs; no activation scratch exists, see
``traffic`` for what it assumes) gives modelled bytes and FLOP/byte. Cases named h512_* use a
3 x 512 network.

    python -m bench.static_sm90 [--jobs 2] [--only integrate_256] [--out bench/results/static-sm90]

Writes <out>/summary.json and <out>/summary.md (atomically), one row per kernel config, and prints
the table; the bench README carries the latest table. Needs a Triton with the NVIDIA backend
(ptxas ships inside the wheel); TRITON_INTERPRET is removed for the run (importing this module
changes nothing).

Targets (issue 14) for 256 x 50 x 10 bf16: modelled L1/L2 traffic <= 0.30 GB, no global activation
scratch, 0 spills in every config. The report states them as met / not met; it does not adjust.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import triton  # noqa: E402

N_SM = 132  # H100 SXM / H200
DEFAULT_OUT = os.path.join(HERE, "results", "static-sm90")
TARGET_GB = 0.30
_TDT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
        torch.int32: "i32", torch.int64: "i64"}
BF16, F32 = torch.bfloat16, torch.float32

# name -> case: mode (0 integrate, 1 consistency, 2 act flow, 3 act consistency), states B, candidates
# K, steps / evaluations, dtype, float32 precision (QIPO_TRITON_FP32), seeded noise
CASES = {
    "integrate_256x50x10_bf16": dict(mode=0, B=256, K=50, steps=10, dtype=BF16),
    "integrate_256x50x10_fp32-tf32": dict(mode=0, B=256, K=50, steps=10, dtype=F32, fp32="tf32"),
    "integrate_256x50x10_fp32-tf32x3": dict(mode=0, B=256, K=50, steps=10, dtype=F32, fp32="tf32x3"),
    "integrate_256x50x10_fp32-ieee": dict(mode=0, B=256, K=50, steps=10, dtype=F32, fp32="ieee"),
    "integrate_1x50x10_bf16": dict(mode=0, B=1, K=50, steps=10, dtype=BF16),
    "integrate_1x50x10_fp32-tf32x3": dict(mode=0, B=1, K=50, steps=10, dtype=F32, fp32="tf32x3"),
    "consistency_256x50x2_bf16": dict(mode=1, B=256, K=50, steps=0, n_evals=2, dtype=BF16),
    "act_cons_256x50_bf16": dict(mode=3, B=256, K=50, steps=0, n_evals=1, dtype=BF16),
    "act_cons_256x50_fp32-tf32x3": dict(mode=3, B=256, K=50, steps=0, n_evals=1, dtype=F32, fp32="tf32x3"),
    "act_cons_256x50_fp32-ieee": dict(mode=3, B=256, K=50, steps=0, n_evals=1, dtype=F32, fp32="ieee"),
    "act_cons_256x32_fp32-ieee": dict(mode=3, B=256, K=32, steps=0, n_evals=1, dtype=F32, fp32="ieee"),
    "act_flow_1x50x10_bf16": dict(mode=2, B=1, K=50, steps=10, dtype=BF16),
    "sample_seeded_1e6x64x10_bf16": dict(mode=0, B=1_000_000, K=64, steps=10, dtype=BF16, seeded=True),
    "h512_integrate_256x50x10_bf16": dict(mode=0, B=256, K=50, steps=10, dtype=BF16, H=512),
    "h512_integrate_256x50x10_fp32-tf32x3": dict(mode=0, B=256, K=50, steps=10, dtype=F32, fp32="tf32x3", H=512),
    "h512_integrate_1x50x10_bf16": dict(mode=0, B=1, K=50, steps=10, dtype=BF16, H=512),
    "h512_act_cons_256x50_bf16": dict(mode=3, B=256, K=50, steps=0, n_evals=1, dtype=BF16, H=512),
    "h512_act_cons_256x50_fp32-tf32x3": dict(mode=3, B=256, K=50, steps=0, n_evals=1, dtype=F32, fp32="tf32x3",
                                             H=512),
    "h512_act_cons_256x32_fp32-tf32x3": dict(mode=3, B=256, K=32, steps=0, n_evals=1, dtype=F32, fp32="tf32x3",
                                             H=512),
    "h512_act_flow_1x50x10_bf16": dict(mode=2, B=1, K=50, steps=10, dtype=BF16, H=512),
}
NET = dict(A=6, S=17, H=256, D=3)


# ----------------------------------------------------------------------------------------------
# Recording the launcher
# ----------------------------------------------------------------------------------------------
class FakeCuda:
    """Shape / dtype / device of a CUDA tensor, all the launcher reads from its per-call tensors."""

    def __init__(self, shape, dtype):
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.device = torch.device("cuda")

    def is_contiguous(self):
        return True


class Recorder:
    def __init__(self, configs):
        self.configs = configs
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
        return launch


def record(case: dict):
    """(grid, args, kwargs, autotune configs) of the launch the library makes for ``case``."""
    from qipo_kernels.nets import ConditionalMLP, DoubleCritic
    from qipo_kernels.triton import _host, sampler_launch as L
    from qipo_kernels.triton.mlp import ACT_CODES
    from qipo_kernels.triton.sampler_kernel import MODE_ACT_FLOW, NCOEF
    from qipo_kernels.triton.sampler_pack import _critic_meta, _critic_tensors, _policy_tensors

    L.sm_count = lambda device: N_SM
    _host.empty = lambda shape, dtype, device: FakeCuda(shape, dtype)
    if case.get("fp32"):
        os.environ["QIPO_TRITON_FP32"] = case["fp32"]
    dtype, mode = case["dtype"], case["mode"]
    A, S, D = NET["A"], NET["S"], NET["D"]
    H = case.get("H", NET["H"])
    B, K, steps, n_evals = case["B"], case["K"], case["steps"], case.get("n_evals", 0)
    torch.manual_seed(0)
    net = ConditionalMLP(A, S, hidden=H, depth=D, activation="mish").to(dtype)
    pol = _policy_tensors(net, dtype, torch.device("cpu"))
    group = mode >= MODE_ACT_FLOW
    cw, cmeta, cact = [], (1, 1, False, 0.0), 0
    if group:
        critic = DoubleCritic(S, A, hidden=H, depth=D, activation="mish").to(dtype)
        cw, cmeta, cact = _critic_tensors(critic, dtype, torch.device("cpu")), _critic_meta(critic), ACT_CODES["mish"]
    N = B * K
    n_tab = max(steps if mode in (0, 2) else n_evals, 1)
    seeded = case.get("seeded", False)
    p = L.make_plan(mode, pol, cw, B if group else N, K, A, steps, n_evals, 0, ACT_CODES["mish"], D, cact,
                    cmeta[0], cmeta[1], cmeta[2], cmeta[3], mode != 0, False, False, seeded, dtype,
                    torch.device("cuda"))
    rec = Recorder(list(p.kernel.configs))
    p.kernel = rec
    L.run_plan(p, None if seeded else FakeCuda((N, A), dtype), FakeCuda((B, S), dtype), None, None,
               FakeCuda((B, A) if group else (N, A), dtype), None, FakeCuda((n_tab, pol[0].shape[1]), F32),
               FakeCuda((n_tab, NCOEF), F32), N, B, 1.0, 1234 if seeded else 0)
    grid, args, kwargs = rec.calls[0]
    return grid, args, kwargs, rec.configs


def _source(fn, args, kwargs):
    """ASTSource typed as JITFunction.run types a launch (pointers 16-byte divisible)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.compiler import ASTSource

    params = {p.name: p for p in fn.params}
    sig, const, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in kwargs:
            sig[name], const[name] = "constexpr", kwargs[name]
            continue
        v = args[i]
        if isinstance(v, (FakeCuda, torch.Tensor)):
            sig[name] = "*" + _TDT[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
            continue
        ty, spec = native_specialize_impl(BaseBackend, v, False, not params[name].do_not_specialize, True)
        if ty == "constexpr":
            sig[name], const[name] = "constexpr", v
        else:
            sig[name] = ty
            if spec == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, sig, const, attrs), const


# ----------------------------------------------------------------------------------------------
# Traffic model of the kernel as written (sampler_kernel / mlp.mlp_eval)
# ----------------------------------------------------------------------------------------------
def traffic(meta: dict, case: dict, programs: int) -> dict:
    """Modelled global (L1/L2) bytes and FLOPs of one launch of the kernel as written (layer pairing,
    mlp.mlp_eval).

    What it counts, per tile of BM rows: every network evaluation reads each weight matrix once
    (W1x [AP, HP], W1o [SP, HP], D - 1 hidden [HP, HP], Wo [OUT_PAD, HP], in the compute dtype; the
    P matrices of a LayerNorm critic twice), its float32 biases and the time row once; nothing else:
    hidden activations and the observation share never leave the SM. Once per tile: the x0 rows
    (unless drawn in-kernel), the obs rows, the output rows, the step noise of consistency sampling,
    the coefficient rows. The critic (act modes) is two more evaluations (OUT_PAD 16, no time row).

    What it assumes: every weight block is fetched from L2 by each tile that uses it (no reuse
    across CTAs in L1, no multicast); padded sizes (powers of two) for weights and FLOPs, unpadded
    widths A and S for the per-row inputs; no cache misses to HBM counted separately (the weights,
    272 KB in bf16 for 3 x 256, stay in L2). FLOPs are those of the padded GEMMs (recomputing the
    obs share each evaluation included), not the activations.
    """
    cb = 2 if case["dtype"] != torch.float32 else 4
    BM, HP, AP, SP, DEPTH = meta["BM"], meta["HP"], meta["AP"], meta["SP"], meta["DEPTH"]
    A, S = NET["A"], NET["S"]

    def eval_bytes(out_pad, hp=HP, depth=DEPTH, ln=False, has_t=True):
        mats = [AP * hp + SP * hp] + [hp * hp] * (depth - 1) + [out_pad * hp]
        start = 1 - depth % 2
        w = sum(mats)
        if ln:  # first-of-pair (blocked) layers with LayerNorm are computed twice
            w += sum(mats[i] for i in range(start, depth, 2))
        weights = w * cb
        small = hp * 4 + (depth - 1) * hp * 4 + out_pad * 4 + (hp * 4 if has_t else 0)
        if ln:
            small += 2 * depth * hp * 4
        return weights + small, weights

    def eval_flops(out_pad, hp=HP, depth=DEPTH):
        return 2 * BM * (AP * hp + SP * hp + (depth - 1) * hp * hp + hp * out_pad)

    mode = case["mode"]
    stages = {0: 1, 1: 2, 2: 2, 3: 4, 4: 1, 5: 2}[meta["SOLVER"]]
    evals = case["steps"] * stages if mode in (0, 2) else case.get("n_evals", 1)
    per_eval, w_eval = eval_bytes(AP)
    group = mode >= 2
    io = BM * S * cb + (0 if case.get("seeded") else BM * A * cb) + evals * 8 * 4
    io += (BM // meta["KP"]) * A * cb if group else BM * A * cb
    if mode in (1, 3):
        io += max(evals - 1, 0) * BM * A * cb
    tile_bytes = evals * per_eval + io
    tile_flops = evals * eval_flops(AP)
    weights = evals * w_eval
    if group:  # twin critic: 2 evaluations
        hq, dq = meta.get("HPQ", HP), meta.get("DEPTHQ", DEPTH)
        c_eval, c_w = eval_bytes(16, hq, dq, ln=bool(meta.get("LNQ")), has_t=False)
        tile_bytes += 2 * c_eval
        tile_flops += 2 * eval_flops(16, hq, dq)
        weights += 2 * c_w
    B, K = case["B"], case["K"]
    KP = meta["KP"]
    tiles = -(-B // (BM // KP)) if group else -(-(B * K) // BM)
    return dict(tiles=tiles, evals_per_tile=evals, bytes_per_tile=tile_bytes, gb=tiles * tile_bytes / 1e9,
                weight_gb=tiles * weights / 1e9, scratch_gb=0.0,
                gflop_padded=tiles * tile_flops / 1e9, flop_per_byte=tile_flops / tile_bytes,
                scratch_bytes_allocated=0)


# ----------------------------------------------------------------------------------------------
# Compile and inspect one config
# ----------------------------------------------------------------------------------------------
_SASS = {"HGMMA": r"\bHGMMA\b", "HMMA": r"\bHMMA\b", "LDG": r"\bLDG\b", "STG": r"\bSTG\b", "LDL": r"\bLDL\b",
         "STL": r"\bSTL\b", "LDS": r"\bLDS\b", "STS": r"\bSTS\b", "FFMA": r"\bFFMA\b", "MUFU": r"\bMUFU\b"}


def _occupancy(regs, smem, warps):
    """Resident CTAs per SM on sm_90 (64K registers, 64 warps, 228 KB shared, 1 KB reserved per CTA)."""
    by_regs = 65536 // (-(-max(regs, 1) * 32 // 256) * 256 * warps)
    by_smem = 233472 // (smem + 1024) if smem else 32
    return max(0, min(by_regs, 64 // warps, by_smem, 32))


def _ptxas() -> str:
    """The ptxas Triton itself uses for sm_90 (it matches the PTX version Triton emits)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path
    except (ImportError, AttributeError, TypeError):
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_one(job):
    name, idx = job
    case = CASES[name]
    try:
        from triton.backends.compiler import GPUTarget

        from qipo_kernels.triton.sampler_kernel import _policy_kernel

        from qipo_kernels.triton.sampler_launch import prune_configs

        grid, args, kwargs, configs = record(case)
        cfg = configs[idx]
        if case["mode"] >= 2:  # act: the launcher's dispatch check may decline the candidate count
            from qipo_kernels.triton.sampler_launch import act_candidates_reason

            why = act_candidates_reason(case.get("H", NET["H"]), case["K"], case["dtype"], torch.device("cuda"))
            if why:
                return dict(case=name, config=f"BN{cfg.kwargs.get('BN')} w{cfg.num_warps} s{cfg.num_stages}",
                            declined=why)
        if cfg not in prune_configs(configs, {}, **kwargs):
            return dict(case=name, config=f"BN{cfg.kwargs.get('BN')} w{cfg.num_warps} s{cfg.num_stages}",
                        pruned=True)
        kw = dict(kwargs, **cfg.kwargs)
        src, const = _source(_policy_kernel, args, kw)
        t0 = time.time()
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        tdir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            ptx, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
            with open(ptx, "w") as f:
                f.write(k.asm["ptx"])
            with open(cubin, "wb") as f:
                f.write(k.asm["cubin"])
            log = subprocess.run([_ptxas(), "-v", "-arch=sm_90a", ptx, "-o",
                                  os.path.join(d, "k.o")], capture_output=True, text=True)
            log = log.stdout + log.stderr
            sass = subprocess.run([os.path.join(tdir, "cuobjdump"), "-sass", cubin], capture_output=True,
                                  text=True).stdout
            # the binary Triton itself built (its ptxas options can differ from the ptxas -v run above)
            res = subprocess.run([os.path.join(tdir, "cuobjdump"), "--dump-resource-usage", cubin],
                                 capture_output=True, text=True).stdout
        m = re.search(r"Used (\d+) registers", log)
        if m is None:
            raise RuntimeError("ptxas -v gave no register count: " + log[-2000:])
        regs = int(m.group(1))
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
        stack, sp_st, sp_ld = (int(x) for x in m.groups()) if m else (0, 0, 0)
        smem = int(k.metadata.shared)
        mres = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", res)
        cubin_regs, cubin_stack, cubin_local = (int(x) for x in mres.groups()) if mres else (-1, -1, -1)
        programs = 1
        for g in (grid if isinstance(grid, tuple) else (grid,)):
            programs *= int(g)
        meta = dict(const)
        tr = traffic(meta, case, programs)
        sass_n = {key: len(re.findall(p, sass)) for key, p in _SASS.items()}
        return dict(case=name, config=f"BN{cfg.kwargs.get('BN')} w{cfg.num_warps} s{cfg.num_stages}",
                    BM=meta["BM"], BN=cfg.kwargs.get("BN"), PREC=meta["PREC"], warps=cfg.num_warps,
                    stages=cfg.num_stages, ctas=programs, regs=regs, stack=stack, cubin_regs=cubin_regs,
                    cubin_stack=cubin_stack, cubin_local=cubin_local, spill_stores=sp_st,
                    spill_loads=sp_ld, smem=smem, ctas_per_sm=_occupancy(regs, smem, cfg.num_warps),
                    wgmma=len(re.findall(r"\bwgmma\.mma_async", k.asm["ptx"])),
                    mma_sync=len(re.findall(r"\bmma\.sync", k.asm["ptx"])), sass=sass_n,
                    global_activation_scratch=any(a in _policy_kernel.arg_names for a in ("hbuf_ptr", "osh_ptr")),
                    compile_s=round(time.time() - t0, 1), **tr)
    except Exception:
        return dict(case=name, config=str(idx), error=traceback.format_exc())


def _jobs(names):
    from qipo_kernels.triton import sampler_launch as L

    out = []
    for n in names:
        h = CASES[n].get("H", NET["H"])
        ncfg = len(L.tuned_kernel(h, h).configs)
        out += [(n, i) for i in range(ncfg)]
    return out


def markdown(rows) -> str:
    head = ("| case | config | BM | CTAs | regs | spill st/ld B | stack B (cubin) | smem KB | CTA/SM | wgmma (PTX) | mma.sync | "
            "HGMMA / HMMA (SASS) | LDL/STL | modelled GB | of it weights GB | FLOP/B | act. scratch |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    declined = set()
    for r in rows:
        if r.get("pruned"):  # (kept in summary.json: configurations the launcher never picks here)
            continue
        if r.get("declined"):  # the fused kernel is not offered for this case: one row, no config
            if r["case"] not in declined:
                declined.add(r["case"])
                lines.append(f"| {r['case']} | not offered | - | - | - | - | - | - | - | - | - | - | - | - | - | - "
                             f"| - |")
            continue
        if "error" in r:
            lines.append(f"| {r['case']} | {r['config']} | ERROR: {r['error'].strip().splitlines()[-1]} |")
            continue
        s = r["sass"]
        lines.append(f"| {r['case']} | {r['config']} | {r['BM']} | {r['ctas']} | {r['regs']} | "
                     f"{r['spill_stores']}/{r['spill_loads']} | {r.get('cubin_stack', '?')} | {r['smem'] / 1024:.0f} | {r['ctas_per_sm']} | "
                     f"{r['wgmma']} | {r['mma_sync']} | {s['HGMMA']} / {s['HMMA']} | {s['LDL']}/{s['STL']} | "
                     f"{r['gb']:.3f} | {r['weight_gb']:.3f} | {r['flop_per_byte']:.0f} | "
                     f"{'global' if r['global_activation_scratch'] else 'none'} |")
    return head + "\n".join(lines) + "\n"


def _local_bytes(r) -> int:
    """Spill stores + loads (ptxas -v) + the stack frame of Triton's own cubin."""
    return r["spill_stores"] + r["spill_loads"] + max(r.get("cubin_stack", 0), 0)


def targets(rows) -> str:
    pruned = sum(1 for r in rows if r.get("pruned"))
    declined = {}
    for r in rows:
        if r.get("declined"):
            declined.setdefault(r["case"], r["declined"])
    rows = [r for r in rows if not r.get("pruned") and not r.get("declined")]
    key = [r for r in rows if r.get("case") == "integrate_256x50x10_bf16" and "error" not in r]
    if not key:
        return "targets: the 256x50x10 bf16 case did not compile\n"
    gb = min(r["gb"] for r in key)
    ok = [r for r in rows if "error" not in r]
    spills = sum(_local_bytes(r) for r in ok)
    local_ops = sum(r["sass"]["LDL"] + r["sass"]["STL"] for r in ok)
    bad_total = f"NOT met ({spills} spill / stack bytes, {local_ops} LDL / STL in total)"
    scratch = any(r["global_activation_scratch"] for r in key)
    names = {0: "IEEE float32", 1: "TF32", 2: "bf16 / fp16", 3: "TF32x3"}
    per = []
    for prec, name in names.items():
        rp = [r for r in ok if r.get("PREC") == prec]
        if rp:
            bad = [f"{r['case']} {r['config']} (ptxas -v {r['spill_stores']}/{r['spill_loads']} B, "
                   f"cubin stack {r.get('cubin_stack')} B)" for r in rp
                   if _local_bytes(r) or r["sass"]["LDL"] + r["sass"]["STL"]]
            per.append(f"{name}: {len(rp)} configs, " + (f"spills / local memory in {', '.join(bad)}" if bad
                                                          else "0 spills, no local memory"))
    return (f"Targets for 256x50x10 bf16: modelled L1/L2 traffic <= {TARGET_GB} GB: {gb:.4f} GB "
            f"({'met' if gb <= TARGET_GB else 'NOT met'}); no global activation scratch: "
            f"{'NOT met (hbuf / obs share in global memory)' if scratch else 'met'}; 0 spills in every config: "
            f"{'met' if spills == 0 and local_ops == 0 else bad_total}.\n\n"
            + "".join(f"- {p}\n" for p in per)
            + ("\nNot offered (the fused act declines these; dispatch takes the next backend):\n"
               + "".join(f"- {c}: {w}\n" for c, w in declined.items()) if declined else "")
            + f"\n({pruned} (case, config) pairs the launcher never picks for these shapes are not compiled; "
              "summary.json lists them.)\n")


def _render(doc) -> str:
    rows = doc["rows"]
    return (f"Static sm_90a report ({doc['date']}, triton {doc['triton']}, {doc['net']}; h512_* cases 3x512; "
            f"`python -m bench.static_sm90`)\n\n" + markdown(rows) + "\n" + targets(rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated substrings of case names")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--render", action="store_true", help="rewrite summary.md from summary.json, compile nothing")
    a = ap.parse_args(argv)
    if a.render:
        from bench._common import atomic_write

        with open(os.path.join(a.out, "summary.json")) as f:
            doc = json.load(f)
        md = _render(doc)
        atomic_write(os.path.join(a.out, "summary.md"), md)
        print(md)
        return 0
    if os.environ.pop("TRITON_INTERPRET", "0") == "1" and "qipo_kernels.triton" in sys.modules:
        print("static_sm90: run it in a fresh process without TRITON_INTERPRET (the kernels were already "
              "decorated for the interpreter here)", file=sys.stderr)
        return 2
    names = [n for n in CASES if not a.only or any(s in n for s in a.only.split(","))]
    jobs = _jobs(names)
    print(f"triton {triton.__version__}, torch {torch.__version__}: {len(jobs)} compiles for sm_90a", flush=True)
    rows = []
    with ProcessPoolExecutor(a.jobs) as ex:
        for r in ex.map(compile_one, jobs):
            rows.append(r)
            if r.get("pruned"):
                print(f"{r['case']:<32} {r['config']:<14} never launched (pruned)", flush=True)
            elif r.get("declined"):
                print(f"{r['case']:<32} {r['config']:<14} not offered: {r['declined']}", flush=True)
            elif "error" in r:
                print(f"!! {r['case']} {r['config']}\n{r['error']}", flush=True)
            else:
                print(f"{r['case']:<32} {r['config']:<14} CTAs {r['ctas']:>5} regs {r['regs']:>3} spills "
                      f"{r['spill_stores']}/{r['spill_loads']} smem {r['smem']:>6} wgmma {r['wgmma']:>3} "
                      f"mma.sync {r['mma_sync']:>3} modelled {r['gb']:.3f} GB ({r['flop_per_byte']:.0f} FLOP/B) "
                      f"[{r['compile_s']}s]", flush=True)
    from bench._common import atomic_write, today

    os.makedirs(a.out, exist_ok=True)
    prev = os.path.join(a.out, "summary.json")
    if a.only and os.path.exists(prev):  # a partial run replaces its own cases, keeps the others
        with open(prev) as f:
            done = {r["case"] for r in rows}
            rows = [r for r in json.load(f)["rows"] if r["case"] not in done] + rows
        rows.sort(key=lambda r: list(CASES).index(r["case"]) if r["case"] in CASES else len(CASES))
    doc = dict(date=today(), triton=triton.__version__, torch=torch.__version__, target="sm_90a", sm_count=N_SM,
               net=f"ConditionalMLP {NET['D']}x{NET['H']} mish, obs {NET['S']}, act {NET['A']}", rows=rows)
    atomic_write(os.path.join(a.out, "summary.json"), json.dumps(doc, indent=1, default=str) + "\n")
    md = _render(doc)
    atomic_write(os.path.join(a.out, "summary.md"), md)
    print(md)
    return 0 if not any("error" in r for r in rows) else 1  # (pruned / declined rows are not errors)


if __name__ == "__main__":
    sys.exit(main())
