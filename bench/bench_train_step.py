"""Per-step training cost on one CPU thread: PyTorch's F.mish against the package's reformulated
Mish (qipo_kernels.nets.mish), for QIPO's three stages and offline CPQL, plus a profile of each stage;
or (--compare compile) eager against torch.compile of the networks' forward (issue 10, item 3).

Synthetic data of HalfCheetah's sizes (obs 17, action 6); the trainers' own train_step, with their
default batch sizes (QIPO stage 1: 4096; stage 2: 256 x 64 support; stage 3: 256 x 64 support;
CPQL: 256). Both variants are timed in one run, alternating, in process CPU seconds.

    python bench/bench_train_step.py [--steps 20] [--profile] [--out bench/results/train_step_cpu.md]
    python bench/bench_train_step.py --compare compile [--batch-preset cpu-30min] --out bench/results/train_step_compile_cpu.md

--compare compile times three variants of the same trainers: backend "auto" (the package's default:
the C++ fused loss, eager networks), backend "torch" eager, and backend "torch" with the trained
networks compiled as ``--set compile=true`` compiles them (Trainer.compile_networks); compile time is
reported apart, not in the per-step time.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qipo_kernels import nets  # noqa: E402
from qipo_kernels.algos import CPQL, QIPO, CPQLConfig, QIPOConfig  # noqa: E402
from qipo_kernels.algos.common import atomic_write_text  # noqa: E402
from qipo_kernels.data import OfflineDataset  # noqa: E402


def synthetic(n=2000, S=17, A=6, seed=0):
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n, S))
    act = np.tanh(obs[:, :A] + 0.3 * rng.normal(size=(n, A)))
    nobs = obs + 0.1 * rng.normal(size=obs.shape)
    rew = obs[:, 0] - 0.1 * (act ** 2).sum(1)
    term, trunc = np.zeros(n), np.zeros(n)
    trunc[999::1000] = 1
    return OfflineDataset.from_arrays(obs, act, rew, nobs, term, trunc, action_low=-np.ones(A),
                                      action_high=np.ones(A), dataset_id="synthetic", env_id=None)


def trainers(ds, out, backend="auto", batches=None):
    """name -> trainer positioned at the start of that stage (batches: QIPO batch overrides, e.g. a preset's)."""
    b = {"pretrain_batch": 4096, "q_batch": 256, "policy_batch": 256, **(batches or {})}
    qcfg = QIPOConfig(pretrain_steps=10_000, q_steps=10_000, policy_steps=10_000, eval_episodes=0,
                      tensorboard=False, checkpoint_every=0, renew_every=10 ** 9, q_support_refresh=10 ** 9,
                      backend=backend, **b)
    out_map = {}
    for stage, step in ((f"qipo stage 1 (batch {b['pretrain_batch']})", 0), (f"qipo stage 2 ({b['q_batch']} x 64)", 10_000),
                        (f"qipo stage 3 ({b['policy_batch']} x 64)", 20_000)):
        tr = QIPO(ds, qcfg, out_dir=out, progress_bar=False)
        tr.step = step
        tr.train_step()  # draws the support sets once (not timed); later steps of the stage reuse them
        tr.step = step + 1
        out_map[stage] = tr
    ccfg = CPQLConfig(steps=10_000, eval_episodes=0, tensorboard=False, checkpoint_every=0, step_start_ema=0,
                      backend=backend)
    out_map["cpql (batch 256)"] = CPQL(ds, ccfg, out_dir=out, progress_bar=False)
    return out_map


def time_steps(tr, steps):
    s0 = tr.step
    tr.train_step()
    c = time.process_time()
    for _ in range(steps):
        tr.train_step()
    dt = (time.process_time() - c) / steps
    tr.step = s0
    return dt


def alternate(variants, rounds, steps):
    """{variant: {stage: trainer}} -> {variant: {stage: [CPU s per step, one per round]}}, the variants
    timed in turn within each round."""
    res = {name: {k: [] for k in variants[name]} for name in variants}
    for _ in range(rounds):
        for name, trs in variants.items():
            for k, tr in trs.items():
                res[name][k].append(time_steps(tr, steps))
                print(name, k, f"{res[name][k][-1] * 1e3:.1f} ms", flush=True)
    return res


def _compiled(tr):
    tr.compile_networks()  # what --set compile=true does (Trainer.compile_networks)
    return tr


def compare_compile(a, ds, out, argv):
    from qipo_kernels.algos.qipo import QIPO_PRESETS

    batches = None
    if a.batch_preset:
        p = QIPO_PRESETS[a.batch_preset]
        batches = {k: p[k] for k in ("pretrain_batch", "q_batch", "policy_batch") if k in p}
    variants = {"auto (C++ loss)": trainers(ds, out, "auto", batches), "torch eager": trainers(ds, out, "torch", batches),
                "torch + compile": {k: _compiled(tr) for k, tr in trainers(ds, out, "torch", batches).items()}}
    compile_s = {}
    for k, tr in variants["torch + compile"].items():  # first calls compile (not in the per-step times)
        c = time.process_time()
        time_steps(tr, 1)
        compile_s[k] = time.process_time() - c
    res = alternate(variants, a.rounds, a.steps)
    names = list(variants)
    lines = ["# Training step cost with torch.compile, one CPU thread (process CPU time per step)", "",
             f"`python bench/bench_train_step.py {' '.join(argv)}`; torch {torch.__version__}; {a.steps} steps x "
             f"{a.rounds} alternating rounds per variant (best round); synthetic data, obs 17, action 6; "
             f"{os.cpu_count()} CPUs shared with other jobs, so ratios (measured in one run) are the result. "
             "Compile CPU-s: the first step of the compiled variant (not in its per-step time).", "",
             "| stage | " + " | ".join(f"{n} ms/step" for n in names) + " | compile vs eager | compile vs auto | "
             "compile CPU-s |", "|---|" + "---|" * (len(names) + 3)]
    for k in res[names[0]]:
        t = [min(res[n][k]) for n in names]
        lines.append(f"| {k} | " + " | ".join(f"{x * 1e3:.1f}" for x in t) +
                     f" | {t[1] / t[2]:.2f}x | {t[0] / t[2]:.2f}x | {compile_s[k]:.1f} |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two variants")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler tables (fast Mish)")
    ap.add_argument("--compare", choices=["mish", "compile"], default="mish")
    ap.add_argument("--batch-preset", default=None, help="QIPO batch sizes of this preset (e.g. cpu-30min)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "train_step_cpu.md"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ds = synthetic()
    out = "/tmp/qipo_bench_train_step"
    argv_list = list(argv if argv is not None else sys.argv[1:])
    if a.compare == "compile":
        _write(a.out, compare_compile(a, ds, out, argv_list))
        return
    variants = {}
    for name, fn in (("F.mish", F.mish), ("fast mish", nets.mish)):
        orig = nets.mish
        nets.mish = fn  # activation_fn("mish") returns nets.mish when the networks are built
        try:
            variants[name] = trainers(ds, out)
        finally:
            nets.mish = orig
    res = alternate(variants, a.rounds, a.steps)
    lines = ["# Training step cost, one CPU thread (process CPU time per step)", "",
             f"`python bench/bench_train_step.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
             f"{a.steps} steps x {a.rounds} alternating rounds per variant (best round); synthetic data, obs 17, "
             f"action 6; {os.cpu_count()} CPUs shared with other jobs, so ratios (measured in one run) are the "
             "result, not absolute times.", "",
             "| stage | F.mish ms/step | fast mish ms/step | speed-up |", "|---|---|---|---|"]
    for k in res["F.mish"]:
        b, f = min(res["F.mish"][k]), min(res["fast mish"][k])
        lines.append(f"| {k} | {b * 1e3:.1f} | {f * 1e3:.1f} | {b / f:.2f}x |")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        for k, tr in variants["fast mish"].items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                time_steps(tr, max(2, a.steps // 4))
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)
            lines += ["", f"## profile: {k} (fast mish)", "", "```", table, "```"]
    _write(a.out, lines)


def _write(path, lines):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text("\n".join(lines) + "\n", path)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
