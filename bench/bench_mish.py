"""Mish on one CPU thread: PyTorch's F.mish against qipo_kernels.nets.mish (the reformulated exact
Mish the networks use on CPU), forward and forward+backward, in one run (alternating rounds; process
CPU time, best round). Also the max difference to float64 F.mish.

    python bench/bench_mish.py [--rows 4096] [--width 256] [--reps 30] [--out bench/results/mish_cpu.md]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qipo_kernels.nets import mish  # noqa: E402


def timed(fn, reps):
    fn()
    c = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - c) / reps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "mish_cpu.md"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(a.rows, a.width, generator=g) * 3).requires_grad_()
    gy = torch.randn(a.rows, a.width, generator=g)
    fns = {"F.mish": F.mish, "nets.mish": mish}
    res = {(n, k): [] for n in fns for k in ("fwd", "fwd+bwd")}
    for _ in range(a.rounds):
        for n, f in fns.items():
            with torch.no_grad():
                res[(n, "fwd")].append(timed(lambda: f(x), a.reps))
            res[(n, "fwd+bwd")].append(timed(lambda: torch.autograd.grad(f(x), x, gy), a.reps))
    xd = x.detach().double().requires_grad_()
    err = float((mish(x).double() - F.mish(xd)).abs().max())
    lines = ["# Mish on one CPU thread", "",
             f"`python bench/bench_mish.py {' '.join(argv if argv is not None else sys.argv[1:])}`: "
             f"[{a.rows}, {a.width}] float32, {a.reps} calls x {a.rounds} alternating rounds (best), process CPU "
             f"time; max |nets.mish - float64 F.mish| = {err:.1e}. Shared 2-core machine: ratios, not absolute times.",
             "", "| | F.mish ms | nets.mish ms | speed-up |", "|---|---|---|---|"]
    for k in ("fwd", "fwd+bwd"):
        b, f = min(res[("F.mish", k)]), min(res[("nets.mish", k)])
        lines.append(f"| {k} | {b * 1e3:.2f} | {f * 1e3:.2f} | {b / f:.2f}x |")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".tmp", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(a.out + ".tmp", a.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
