"""The C++ CPU sampler against its peers on the same network, ratios from one run.

Network: ConditionalMLP 3 x 256 Mish (obs 17, action 6, sinusoidal time), float32, Euler, 10 steps.
Cases: latency (1 state x 50 candidates) and throughput (256 states x 50 candidates).
Variants, all on the same inputs and weights, timed round-robin in one process:

    cpp            ops.integrate(..., backend="cpp")  (the qipo_kernels._C extension)
    torch          the plain-PyTorch reference loop, eager (reference.ode._integrate)
    torch.compile  torch.compile of that reference loop (default mode; compile time excluded)
    onnxruntime    the whole 10-step loop exported to ONNX (torch.onnx.export, unrolled: one
                   session.run per sampling call), ONNX Runtime CPU provider, all graph optimisations

Threads: ``--threads`` (default 1) for torch, the C++ backend (torch.get_num_threads) and ONNX
Runtime (intra-op; inter-op 1). Each variant's result is compared with the reference (max abs
difference recorded). Results: bench/results/cpu-peers/<cpu>-<date>.json (atomic) and a table.

    python -m bench.bench_cpu_peers [--threads 1] [--rounds 7]
A variant that cannot run here (onnxruntime not installed, no C++ compiler for torch.compile) is
reported with its error, never silently dropped.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

A, S, H, D, K, T = 6, 17, 256, 3, 50, 10


class _Loop(torch.nn.Module):
    """The reference Euler loop as a module (for the ONNX export): x0 [N, A], obs [N, S] -> x(1)."""

    def __init__(self, net, steps):
        super().__init__()
        self.net, self.steps = net, steps

    def forward(self, x, obs):
        n = x.shape[0]
        h = 1.0 / self.steps
        for i in range(self.steps):
            t = torch.full((n,), i * h, dtype=x.dtype)
            x = x + h * self.net(x, t, obs)
        return x


def _onnx_session(net, x, obs, threads):
    import onnxruntime as ort

    buf = io.BytesIO()
    kw = dict(input_names=["x", "obs"], output_names=["out"], opset_version=18)
    try:
        torch.onnx.export(_Loop(net, T), (x, obs), buf, dynamo=False, **kw)
    except TypeError:  # an older torch without the dynamo switch
        torch.onnx.export(_Loop(net, T), (x, obs), buf, **kw)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
    feeds = {"x": x.numpy(), "obs": obs.numpy()}
    return lambda: sess.run(None, feeds)[0], ort.__version__


def measure(threads: int = 1, rounds: int = 7) -> dict:
    from bench._common import cpu_model, today
    from qipo_kernels import backends, ops
    from qipo_kernels.nets import ConditionalMLP
    from qipo_kernels.reference import ode as ref_ode

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = ConditionalMLP(A, S, hidden=H, depth=D, activation="mish").eval()
    for p in net.parameters():
        p.requires_grad_(False)
    res = {"cpu": cpu_model(), "date": today(), "torch": torch.__version__, "threads": threads, "rounds": rounds,
           "net": f"ConditionalMLP {D}x{H} mish, obs {S}, act {A}, sinusoidal time, float32, euler {T} steps",
           "cases": {}}
    for label, B in (("latency_1x50x10", 1), ("throughput_256x50x10", 256)):
        x0 = torch.randn(B * K, A)
        obs = torch.randn(B, S).repeat_interleave(K, 0)
        with torch.no_grad():
            ref = ref_ode._integrate(net, x0, obs, T, "euler", 0.0, 1.0, None, False)
            calls, errors, diffs = {}, {}, {}
            calls["torch"] = lambda: ref_ode._integrate(net, x0, obs, T, "euler", 0.0, 1.0, None, False)
            why = backends.reasons("integrate", "cpp", x0.device, net=net, x0=x0, obs=obs)
            if why:
                errors["cpp"] = "; ".join(why)
            else:
                calls["cpp"] = lambda: ops.integrate(net, x0, obs, steps=T, backend="cpp")
            try:
                comp = torch.compile(lambda: ref_ode._integrate(net, x0, obs, T, "euler", 0.0, 1.0, None, False))
                comp()
                calls["torch.compile"] = comp
            except Exception as e:  # report, do not hide
                errors["torch.compile"] = f"{type(e).__name__}: {str(e)[:300]}"
            try:
                run_ort, ver = _onnx_session(net, x0, obs, threads)
                res["onnxruntime"] = ver
                calls["onnxruntime"] = lambda run_ort=run_ort: torch.from_numpy(run_ort())
            except Exception as e:
                errors["onnxruntime"] = f"{type(e).__name__}: {str(e)[:300]}"
            for name, fn in calls.items():
                diffs[name] = (fn() - ref).abs().max().item()
            n_inner = max(1, int(0.05 / max(1e-6, _once(calls["torch"]))))
            times = {name: [] for name in calls}
            for _ in range(rounds):  # round-robin: every variant sees the same machine load
                for name, fn in calls.items():
                    t = time.perf_counter()
                    for _ in range(n_inner):
                        fn()
                    times[name].append((time.perf_counter() - t) / n_inner)
        med = {name: statistics.median(v) * 1e6 for name, v in times.items()}
        case = {"us_per_call": med, "max_abs_diff_vs_reference": diffs, "errors": errors, "inner_calls": n_inner}
        if "cpp" in med:
            case["cpp_speedup"] = {name: med[name] / med["cpp"] for name in med if name != "cpp"}
        res["cases"][label] = case
    return res


def _once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cpu-peers"))
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    res = measure(args.threads, args.rounds)
    print(f"{res['net']}; {res['cpu']}, {args.threads} thread(s), {res['date']}, torch {res['torch']}, "
          f"onnxruntime {res.get('onnxruntime', '-')}")
    for label, c in res["cases"].items():
        print(f"  {label}:")
        for name, us in sorted(c["us_per_call"].items(), key=lambda kv: kv[1]):
            sp = c.get("cpp_speedup", {}).get(name)
            print(f"    {name:14s} {us:10.1f} us" + (f"   cpp is {sp:.2f}x faster" if sp else "") +
                  f"   (max |diff| vs reference {c['max_abs_diff_vs_reference'][name]:.2e})")
        for name, e in c["errors"].items():
            print(f"    {name:14s} not run: {e}")
    if not args.no_save:
        from bench._common import atomic_write, slug

        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"{slug(res['cpu'])}-{res['date']}.json")
        atomic_write(path, json.dumps(res, indent=2, sort_keys=True) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
