"""CPU benchmark of the C++ backend against the PyTorch eager reference (same process, same threads).

Network: ConditionalMLP 3 x 256 Mish, obs 17, action 6, sinusoidal time embedding; DoubleCritic
3 x 256 Mish. Both backends run under torch.no_grad() on identical inputs (noise passed in), with
torch.set_num_threads(n) set to the case's thread count; backend="torch" is the reference.

Cases (the targets of issue 4):
    a  1 state, 1 action, one-step consistency sampling, 1 thread            target >= 10x
    b  1 state, 1 action, 10 Euler steps, 1 thread                            target >= 8x
    a_sampler, b_sampler: a and b as deployed through qipo_kernels.make_sampler (both backends)
    c  1 state x 50 candidates x 10 Euler steps + twin-critic argmax, 1 thread target >= 1.5x and
       >= 60% of the core's measured peak FLOP/s
    d  256 states x 50 candidates x 10 Euler steps + twin-critic argmax, 2 threads: no slower

The peak is measured in the same run twice: a tight FMA loop in the extension (the ISA variant in
use; what the core can do) and a 2048^2 float32 torch matmul on 1 thread (what MKL reaches here).
FLOPs counted: 2 per multiply-add of every Linear actually evaluated by the fused kernel (the obs
part of layer 1 once per state, the time part once per evaluation, all hidden and output layers per
row, both critic heads), not the elementwise work.

    python bench/bench_cpu.py                 # all cases, writes bench/results/cpu-<cpu>-<date>.json
    python bench/bench_cpu.py --cases a,b --no-write
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import statistics
import sys
import tempfile
import time

import torch

import qipo_kernels as qk
from qipo_kernels import _C


def cpu_name() -> str:
    """CPU model name (the package's one reading of it, qipo_kernels.data.rollout.cpu_model)."""
    from qipo_kernels.data.rollout import cpu_model

    return cpu_model()


def timeit(fn, min_time: float, min_reps: int = 5):
    """Per-call seconds: list of samples (each sample = mean over an inner loop of >= ~2 ms)."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(0.002 / one))
    samples = []
    start = time.perf_counter()
    while len(samples) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return samples


def compare(ref, fast, min_time, rounds=3):
    """Interleave reference and fast timings (the machine is shared); medians of all samples."""
    rs, fs = [], []
    for _ in range(rounds):
        rs += timeit(ref, min_time / rounds)
        fs += timeit(fast, min_time / rounds)
    return statistics.median(rs), statistics.median(fs), min(rs), min(fs)


def mlp_flops(rows, H, depth, out):
    return 2.0 * rows * (H * H * (depth - 1) + H * out)


def policy_flops(net, states, rows, evals):
    A, S, T, H = net.act_dim, net.obs_dim, net.t_dim, net.hidden
    per_eval = 2.0 * rows * A * H + mlp_flops(rows, H, net.depth, A) + 2.0 * T * H
    return 2.0 * states * S * H + evals * per_eval


def critic_flops(critic, states, rows):
    H, S, A = critic.hidden, critic.obs_dim, critic.act_dim
    return 2 * (2.0 * states * S * H + 2.0 * rows * A * H + mlp_flops(rows, H, critic.depth, 1))


def torch_matmul_peak(seconds=0.5, n=2048):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2.0 * n ** 3 / (time.perf_counter() - t0))
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="a,b,c,d")
    p.add_argument("--min-time", type=float, default=3.0, help="seconds of timing per backend and case")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]

    torch.manual_seed(0)
    S, A, H = 17, 6, args.hidden
    net = qk.ConditionalMLP(A, S, hidden=H, depth=3, activation="mish").eval()
    critic = qk.DoubleCritic(S, A, hidden=H, depth=3, activation="mish").eval()
    g = torch.Generator().manual_seed(0)
    res = {"cpu": cpu_name(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "python": sys.version.split()[0], "isa": _C.isa(),
           "network": f"ConditionalMLP 3x{H} mish, obs {S}, act {A}, sinusoidal t_dim 16; DoubleCritic 3x{H} mish",
           "load_average_at_start": os.getloadavg(), "cases": {}}
    torch.set_num_threads(1)
    res["peak_fma_gflops_1thread"] = _C.fma_peak(0.5) / 1e9
    res["peak_torch_matmul_gflops_1thread"] = torch_matmul_peak() / 1e9
    print(f"{res['cpu']}  isa={res['isa']}  peak FMA loop {res['peak_fma_gflops_1thread']:.1f} GFLOP/s, "
          f"torch 2048^2 matmul {res['peak_torch_matmul_gflops_1thread']:.1f} GFLOP/s (1 thread)")

    def case(name, desc, threads, ref, fast, target, flops=None):
        torch.set_num_threads(threads)
        with torch.no_grad():
            r, f = ref(), fast()
            err = (r - f).abs().max().item()
            rm, fm, rmin, fmin = compare(ref, fast, args.min_time)
        d = {"description": desc, "threads": threads, "ref_ms": rm * 1e3, "cpp_ms": fm * 1e3,
             "ref_min_ms": rmin * 1e3, "cpp_min_ms": fmin * 1e3, "speedup": rm / fm, "target_speedup": target,
             "met_speedup_target": rm / fm >= target, "max_abs_diff": err}
        if flops is not None:
            d["flops_per_call"] = flops
            d["cpp_gflops"] = flops / fm / 1e9
            d["ref_gflops"] = flops / rm / 1e9
            if threads == 1:
                d["cpp_fraction_of_fma_peak"] = d["cpp_gflops"] / res["peak_fma_gflops_1thread"]
                d["cpp_fraction_of_torch_matmul_peak"] = d["cpp_gflops"] / res["peak_torch_matmul_gflops_1thread"]
        res["cases"][name] = d
        extra = ""
        if flops is not None:
            extra = f"  cpp {d['cpp_gflops']:.1f} GFLOP/s (ref {d['ref_gflops']:.1f})"
            if threads == 1:
                extra += f", {100 * d['cpp_fraction_of_fma_peak']:.0f}% of FMA peak"
        print(f"[{name}] {desc}: ref {rm * 1e6:.1f} us, cpp {fm * 1e6:.1f} us, {rm / fm:.2f}x "
              f"(target {target}x){extra}  max|diff| {err:.2e}")

    if "a" in cases:
        obs1, z1 = torch.randn(1, S, generator=g), torch.randn(1, A, generator=g)
        case("a", "1 state, 1 action, one-step consistency sampling", 1,
             lambda: qk.consistency_sample(net, z1, obs1, backend="torch"),
             lambda: qk.consistency_sample(net, z1, obs1, backend="cpp"), 10.0)
    if "b" in cases:
        obs1, z1 = torch.randn(1, S, generator=g), torch.randn(1, A, generator=g)
        case("b", "1 state, 1 action, 10 Euler steps", 1,
             lambda: qk.integrate(net, z1, obs1, steps=10, backend="torch"),
             lambda: qk.integrate(net, z1, obs1, steps=10, backend="cpp"), 8.0)
    # The same two cases as deployed with make_sampler (draws its own noise from a generator; after
    # the first call of an obs shape it calls the C++ impl directly, see policies.Sampler). The
    # reference is the same sampler on backend="torch"; both generators start from one seed, so the
    # first calls (compared for max|diff|) see identical noise.
    for name, kind, kw, target in (("a_sampler", "consistency", {}, 10.0), ("b_sampler", "flow", {"steps": 10}, 8.0)):
        if name[0] not in cases:
            continue
        obs1 = torch.randn(1, S, generator=g)
        ref_s = qk.make_sampler(net, kind=kind, backend="torch", generator=torch.Generator().manual_seed(1), **kw)
        fast_s = qk.make_sampler(net, kind=kind, backend="cpp", generator=torch.Generator().manual_seed(1), **kw)
        case(name, f"1 state, 1 action, {'one-step consistency' if kind == 'consistency' else '10 Euler steps'}"
             " sampling through make_sampler (noise drawn per call)", 1,
             lambda: ref_s(obs1), lambda: fast_s(obs1), target)
    for name, B, threads, target in (("c", 1, 1, 1.5), ("d", 256, 2, 1.0)):
        if name not in cases:
            continue
        K = 50
        obs, z = torch.randn(B, S, generator=g), torch.randn(B, K, A, generator=g)
        flops = policy_flops(net, B, B * K, 10) + critic_flops(critic, B, B * K)
        case(name, f"{B} state(s) x {K} candidates x 10 Euler steps + twin-critic argmax", threads,
             lambda: qk.act(net, critic, obs, K, steps=10, noise=z, backend="torch"),
             lambda: qk.act(net, critic, obs, K, steps=10, noise=z, backend="cpp"), target, flops)
    if "c" in res["cases"]:
        res["cases"]["c"]["target_fraction_of_peak"] = 0.6
        res["cases"]["c"]["met_peak_target"] = res["cases"]["c"]["cpp_fraction_of_fma_peak"] >= 0.6
    res["load_average_at_end"] = os.getloadavg()

    if not args.no_write:
        os.makedirs(args.out_dir, exist_ok=True)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", res["cpu"]).strip("-").lower()
        path = os.path.join(args.out_dir, f"cpu-{slug}-{_dt.date.today().isoformat()}.json")
        fd, tmp = tempfile.mkstemp(dir=args.out_dir, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(res, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
        print("wrote", path)
    return res


if __name__ == "__main__":
    main()
