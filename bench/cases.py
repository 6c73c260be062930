"""The benchmark grid: one-axis sweeps around a base case per op, and how to run a case.

Grids (QIPO_BENCH_GRID or ``pytest bench/ --bench-grid``):
    "default"  small enough for a laptop CPU in ~2-3 minutes; larger batches on a GPU
    "full"     every axis at full range (batch, candidates, steps, solvers, widths, depths, dtypes)
A sweep varies one axis of the base case (batch, steps, solver, width, ...); the base case belongs
to every sweep, so "speed vs batch" and "latency vs steps" plots come straight from the sweeps.

torch.compile costs 10-30 s per case on a small CPU, so (QIPO_BENCH_COMPILE):
    "anchors" (CPU default)  the base case of integrate and of the loss forward+backward
    "base"    (GPU default)  the base case of every op
    "all" | "none"
"""
from __future__ import annotations

import itertools
import os
from typing import Dict, List

import torch

from qipo_kernels import ConditionalMLP, DoubleCritic, backends, ops

from . import flops as F
from ._common import Skip, bench_device, budget_s, build_call, peak_memory, rounds_for, timed

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONSISTENCY_SIGMAS = {1: None, 2: [2.0], 3: [2.0, 0.5]}  # extra noise levels after the first step


def grid_mode() -> str:
    g = os.environ.get("QIPO_BENCH_GRID", "default")
    if g not in ("default", "full"):
        raise ValueError(f"QIPO_BENCH_GRID must be 'default' or 'full', got {g!r}")
    return g


def compile_mode() -> str:
    m = os.environ.get("QIPO_BENCH_COMPILE")
    if m:
        if m not in ("anchors", "base", "all", "none"):
            raise ValueError(f"QIPO_BENCH_COMPILE must be anchors|base|all|none, got {m!r}")
        return m
    return "base" if bench_device().type == "cuda" else "anchors"


def _sweeps(op: str, base: Dict, axes: Dict[str, List]) -> List[Dict]:
    """Cases: base plus each axis varied alone. A case records the sweeps it belongs to."""
    out: Dict[tuple, Dict] = {}

    def add(c, sweep):
        key = tuple(sorted((k, str(v)) for k, v in c.items()))
        if key not in out:
            out[key] = dict(c, op=op, sweeps=[], base=(c == base))
        out[key]["sweeps"].append(sweep)

    for axis, values in axes.items():
        for v in values:
            add(dict(base, **{axis: v}), axis)
    if not axes:
        add(dict(base), "base")
    return list(out.values())


def _case_id(c: Dict) -> str:
    skip = {"op", "sweeps", "base"}
    short = {"hidden": "H", "steps": "s", "dtype": "", "solver": "", "normalize": "", "path": "",
             "mode": "", "sampler": "", "n_steps": "n", "pass_": ""}
    parts = []
    for k, v in c.items():
        if k in skip:
            continue
        p = short.get(k, k)
        parts.append(f"{p}{v}")
    return "-".join(parts)


def case_id(c: Dict) -> str:
    return _case_id(c)


def integrate_cases() -> List[Dict]:
    gpu = bench_device().type == "cuda"
    full = grid_mode() == "full"
    base = dict(B=256 if gpu else 64, K=16, A=6, S=17, hidden=256, depth=3, solver="euler", steps=8, dtype="float32")
    if full:
        axes = dict(B=[1, 4, 16, 64, 256, 1024, 4096] + ([16384] if gpu else []), K=[1, 16, 50],
                    steps=[1, 2, 4, 8, 16, 32, 64], solver=list(F.STAGES), hidden=[64, 128, 256, 512],
                    depth=[2, 3, 4], dtype=["float32", "bfloat16", "float16"] if gpu else ["float32", "float64", "bfloat16"])
    elif gpu:
        axes = dict(B=[16, 256, 1024, 4096, 16384], steps=[1, 2, 4, 8, 16, 32], solver=list(F.STAGES),
                    hidden=[64, 256, 512], dtype=["float32", "bfloat16", "float16"])
    else:
        axes = dict(B=[4, 64, 256], steps=[1, 4, 8, 32], solver=["euler", "midpoint", "rk4", "dpm2"], hidden=[64, 256])
    return _sweeps("integrate", base, axes)


def consistency_cases() -> List[Dict]:
    gpu = bench_device().type == "cuda"
    full = grid_mode() == "full"
    base = dict(B=256 if gpu else 64, K=16, A=6, S=17, hidden=256, depth=3, n_steps=1, dtype="float32")
    if full or gpu:
        axes = dict(B=[16, 256, 1024, 4096] + ([16384] if gpu else []), n_steps=[1, 2, 3],
                    dtype=["float32", "bfloat16"] if (gpu or full) else ["float32"])
    else:
        axes = dict(B=[4, 64, 256], n_steps=[1, 2, 3])
    return _sweeps("consistency_sample", base, axes)


def act_cases() -> List[Dict]:
    gpu = bench_device().type == "cuda"
    full = grid_mode() == "full"
    base = dict(B=256 if gpu else 32, K=50, A=6, S=17, hidden=256, depth=3, sampler="flow", steps=8, dtype="float32")
    if full or gpu:
        axes = dict(B=[1, 16, 256, 1024, 4096], sampler=["flow", "consistency"], K=[10, 50])
    else:
        axes = dict(B=[1, 32], sampler=["flow", "consistency"])
    return _sweeps("act", base, axes)


def select_cases() -> List[Dict]:
    gpu = bench_device().type == "cuda"
    full = grid_mode() == "full"
    base = dict(B=4096 if gpu else 1024, K=50, D=6, mode="argmax", dtype="float32")
    if full or gpu:
        axes = dict(B=[64, 1024, 16384, 262144], K=[10, 50, 256], mode=["argmax", "softmax"])
    else:
        axes = dict(B=[64, 1024, 16384], mode=["argmax", "softmax"])
    return _sweeps("select_action", base, axes)


def loss_cases(op: str) -> List[Dict]:
    gpu = bench_device().type == "cuda"
    full = grid_mode() == "full"
    base = dict(B=256, M=64, D=6, normalize="support", pass_="fwd+bwd", dtype="float32")
    if op == "flow_matching_loss":
        base["path"] = "ot"
    axes: Dict[str, List] = dict(B=[32, 256, 2048] + ([16384, 65536] if (gpu or full) else []), M=[1, 16, 64],
                                 pass_=["fwd", "fwd+bwd"])
    if full or gpu:
        axes.update(D=[3, 6, 17, 64], normalize=["support", "batch"],
                    dtype=["float32", "bfloat16", "float16"] if gpu else ["float32", "float64"])
    if op == "flow_matching_loss":
        axes["path"] = ["ot", "vp"]
    return _sweeps(op, base, axes)


def flow_path_cases() -> List[Dict]:
    gpu = bench_device().type == "cuda"
    full = grid_mode() == "full"
    base = dict(B=256, M=64, D=6, path="ot", dtype="float32")
    axes: Dict[str, List] = dict(B=[32, 256, 2048] + ([16384, 65536] if (gpu or full) else []), path=["ot", "vp"])
    if gpu or full:
        axes["dtype"] = ["float32", "bfloat16", "float16"] if gpu else ["float32", "float64"]
    return _sweeps("flow_path", base, axes)


def compile_ok(case: Dict) -> bool:
    m = compile_mode()
    if m == "all":
        return True
    if m == "none" or not case["base"]:
        return False
    if m == "base":
        return True
    return case["op"] in ("integrate", "weighted_fm_loss")  # anchors


# ----------------------------------------------------------------------------- building a case
_NETS: Dict[tuple, torch.nn.Module] = {}


def _net(kind: str, A: int, S: int, hidden: int, depth: int, dtype: torch.dtype, device) -> torch.nn.Module:
    key = (kind, A, S, hidden, depth, dtype, str(device))
    if key not in _NETS:
        torch.manual_seed(0)
        m = ConditionalMLP(A, S, hidden=hidden, depth=depth) if kind == "policy" else DoubleCritic(S, A, hidden=256, depth=3)
        _NETS[key] = m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return _NETS[key]


def prepare(case: Dict, device) -> Dict:
    """Inputs, the op call and its cost for one case: dict(run, args, reasons, backward, extra)."""
    device = torch.device(device)
    dt = DTYPES[case["dtype"]]
    g = torch.Generator().manual_seed(0)
    op = case["op"]
    itemsize = torch.empty((), dtype=dt).element_size()

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt)

    backward = None
    extra: Dict[str, object] = {}
    if op == "integrate":
        B, K, A, S = case["B"], case["K"], case["A"], case["S"]
        net = _net("policy", A, S, case["hidden"], case["depth"], dt, device)
        solver, steps = case["solver"], case["steps"]
        path = "vp" if solver in ("ddim", "dpm1", "dpm2") else None
        args = (rnd(B, K, A), rnd(B, S))

        def run(backend, x0, obs):
            with torch.no_grad():
                return ops.integrate(net, x0, obs, steps=steps, solver=solver, path=path, backend=backend)

        def reasons(b):
            with torch.no_grad():  # as run() calls it
                return backends.reasons("integrate", b, device, net=net, x0=args[0], obs=args[1], steps=steps,
                                    solver=solver, path=path, return_trajectory=False)
        fl, by = F.integrate_cost(net, B * K, steps, solver, obs_rows=B, itemsize=itemsize)
        extra.update(rows=B * K, evaluations=F.evaluations(solver, steps))
    elif op == "consistency_sample":
        B, K, A, S = case["B"], case["K"], case["A"], case["S"]
        net = _net("policy", A, S, case["hidden"], case["depth"], dt, device)
        sig = CONSISTENCY_SIGMAS[case["n_steps"]]
        step_noise = rnd(len(sig), B, K, A) if sig else None
        args = (rnd(B, K, A), rnd(B, S))

        def run(backend, noise, obs):
            with torch.no_grad():
                return ops.consistency_sample(net, noise, obs, sigmas=sig, step_noise=step_noise, backend=backend)

        def reasons(b):
            with torch.no_grad():
                return backends.reasons("consistency_sample", b, device, net=net, noise=args[0], obs=args[1],
                                    sigmas=sig, step_noise=step_noise, clip=True)
        fl, by = F.consistency_cost(net, B * K, case["n_steps"], obs_rows=B, itemsize=itemsize)
        extra.update(rows=B * K, evaluations=case["n_steps"])
    elif op == "act":
        B, K, A, S = case["B"], case["K"], case["A"], case["S"]
        net = _net("policy", A, S, case["hidden"], case["depth"], dt, device)
        critic = _net("critic", A, S, 256, 3, dt, device)
        sampler, steps = case["sampler"], case["steps"]
        args = (rnd(B, S), rnd(B, K, A))

        def run(backend, obs, noise):
            with torch.no_grad():
                return ops.act(net, critic, obs, num_candidates=K, sampler=sampler, steps=steps, solver="euler",
                               mode="argmax", noise=noise, backend=backend)

        def reasons(b):
            with torch.no_grad():
                return backends.reasons("act", b, device, net=net, critic=critic, obs=args[0], num_candidates=K,
                                    sampler=sampler, steps=steps, solver="euler", path=None, sigmas=None,
                                    mode="argmax", noise=args[1])
        if sampler == "flow":
            fl, by = F.act_cost(net, critic, B, K, steps, "euler", itemsize=itemsize)
            ev = steps
        else:
            fl, by = F.act_cost(net, critic, B, K, 1, "euler", itemsize=itemsize)
            ev = 1
        extra.update(rows=B * K, evaluations=ev)
    elif op == "select_action":
        B, K, D, mode = case["B"], case["K"], case["D"], case["mode"]
        uniform = torch.rand(B, generator=g).to(device) if mode == "softmax" else None
        args = (rnd(B, K), rnd(B, K, D))

        def run(backend, q, cand):
            return ops.select_action(q, cand, mode=mode, uniform=uniform, backend=backend)

        def reasons(b):
            return backends.reasons("select_action", b, device, q_values=args[0], candidates=args[1], mode=mode)
        fl, by = F.select_cost(B, K, D, itemsize=itemsize)
        extra.update(rows=B)
    elif op == "flow_path":
        B, M, D, path = case["B"], case["M"], case["D"], case["path"]
        t = torch.rand(B, M, generator=g).to(device=device, dtype=dt) * 0.998 + 0.001
        args = (rnd(B, M, D), rnd(B, M, D), t)

        def run(backend, a, z, tt):
            return ops.flow_path(a, z, tt, path=path, backend=backend)

        def reasons(b):
            return backends.reasons("flow_path", b, device, actions=args[0], noise=args[1], t=args[2], path=path)
        n = B * M * D
        fl, by = 3 * n, itemsize * (4 * n + B * M)  # x_t = alpha a + sigma z; reads a, z, t; writes x_t, target
        extra.update(rows=B * M)
    elif op in ("weighted_fm_loss", "flow_matching_loss"):
        B, M, D = case["B"], case["M"], case["D"]
        bwd = case["pass_"] == "fwd+bwd"
        normalize = case["normalize"]
        energy = rnd(B, M)
        pred = rnd(B, M, D).requires_grad_(bwd)
        if op == "weighted_fm_loss":
            args = (pred, rnd(B, M, D))

            def run(backend, p, tgt):
                return ops.weighted_fm_loss(p, tgt, energy, beta=3.0, normalize=normalize, backend=backend)

            def reasons(b):
                return backends.reasons(op, b, device, pred=args[0], target=args[1], energy=energy,
                                        normalize=normalize, pair_weight=None)
            fl, by = F.loss_cost(B, M, D, backward=bwd, itemsize=itemsize, inputs_per_element=2)
        else:
            path = case["path"]
            t = torch.rand(B, M, generator=g).to(device=device, dtype=dt) * 0.998 + 0.001
            args = (pred, rnd(B, M, D), rnd(B, M, D), t)

            def run(backend, p, a, z, tt):
                return ops.flow_matching_loss(p, a, z, tt, path=path, energy=energy, beta=3.0, normalize=normalize,
                                              backend=backend)

            def reasons(b):
                return backends.reasons(op, b, device, pred=args[0], actions=args[1], noise=args[2], t=args[3],
                                        path=path, energy=energy, normalize=normalize, pair_weight=None)
            fl, by = F.loss_cost(B, M, D, backward=bwd, itemsize=itemsize, inputs_per_element=3)
        if bwd:
            def backward(out, a):
                out.backward()
                a[0].grad = None  # no accumulation from call to call
        extra.update(rows=B * M)
    else:
        raise ValueError(f"unknown op {op!r}")
    extra.update(flops=int(fl), bytes=int(by))
    return dict(run=run, args=args, reasons=reasons, backward=backward, extra=extra)


def execute(benchmark, case: Dict, variant: str, device) -> None:
    """Time one case x variant with pytest-benchmark and record what the report needs in extra_info."""
    import pytest

    device = torch.device(device)
    if variant == "cudagraph" and case["op"] == "integrate" and case["solver"] in ("ddim", "dpm1", "dpm2"):
        # qipo_kernels.reference.ode._noise_step turns device tensors into Python floats (a host sync)
        pytest.skip("cudagraph: the reference noise-solver step reads its coefficients back to the host "
                    "(float(tensor)), which cannot be captured in a CUDA graph")
    p = prepare(case, device)
    try:
        call = build_call(variant, case["op"], p["run"], p["args"], device, p["reasons"], p["backward"],
                          compile_ok=compile_ok(case))
    except Skip as e:
        pytest.skip(str(e))
    fn = timed(call, device)
    fn()  # warm-up: compilation, autotuning, lazy init happen here, outside the timing
    fn()
    mem, how = peak_memory(call, device)
    rounds = rounds_for(fn, budget_s())
    params = {k: v for k, v in case.items() if k not in ("sweeps", "base", "op")}
    benchmark.group = f"{case['op']}[{case_id(case)}]"
    benchmark.extra_info.update(
        op=case["op"], variant=variant, device=str(device), case=case_id(case), sweeps=list(case["sweeps"]),
        base=bool(case["base"]), params=params, peak_mem_bytes=mem, peak_mem_method=how, **p["extra"],
    )
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


def params_for(cases: List[Dict], variants=None):
    """pytest parametrisation over cases x variants with readable ids."""
    from ._common import VARIANTS

    variants = variants or VARIANTS
    out = []
    import pytest
    for c, v in itertools.product(cases, variants):
        out.append(pytest.param(c, v, id=f"{case_id(c)}-{v}"))
    return out


__all__ = ["integrate_cases", "consistency_cases", "act_cases", "select_cases", "loss_cases", "execute",
           "params_for", "prepare", "case_id", "grid_mode", "compile_mode"]
