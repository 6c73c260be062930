"""QIPO support renewal throughput vs number of processes (torch.distributed, one device or CPU per process).

    python bench/bench_distributed.py [--procs 1,2] [--states 4096] [--support 16] [--repeats 3] [--save]

For each process count W, W processes (torch.multiprocessing spawn; gloo on the CPU, NCCL on GPUs, one
GPU per process) build the same QIPO trainer (hidden 256, depth 3, ot-eps, DPM-Solver++(2S) with 8 steps
= 16 network evaluations per action, as the defaults) on a synthetic dataset of ``--states`` states,
and time ``_renew_support()``: each rank samples ``--support`` actions for its share of the states with
the fused sampler and scores them with the critic, then all_gather assembles the full support set.
Throughput = states x support / (wall time of one renewal, median of the repeats, gather included).
Every W runs in the same invocation; the speedup column divides by the W = 1 throughput. The CPU
seconds of the busiest rank (time.process_time, its own process) show how the work divides even when
the machine is shared.

On the CPU each process runs one torch thread, so W processes need W free cores for a speedup.
``--save`` writes bench/results/<device>/<date>-distributed.{json,md} (temp file + rename).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dataset(n: int, seed: int = 0):
    from qipo_kernels import data

    rng = np.random.default_rng(seed)
    S, A = 17, 6
    obs = rng.normal(size=(n, S))
    return data.OfflineDataset.from_arrays(obs, rng.uniform(-1, 1, (n, A)), rng.normal(size=n),
                                           obs + 0.01 * rng.normal(size=(n, S)), np.zeros(n), np.zeros(n),
                                           action_low=-np.ones(A), action_high=np.ones(A), dataset_id="bench",
                                           env_id="HalfCheetah-v5")


def _worker(rank: int, world: int, port: int, args, result_path: str) -> None:
    torch.set_num_threads(1)
    from qipo_kernels.algos import QIPO, QIPOConfig
    from qipo_kernels.algos import distributed

    device = "cuda" if (args.device == "cuda") else "cpu"
    ctx = distributed.init(rank, world, f"tcp://127.0.0.1:{port}", device) if world > 1 else None
    dev = str(ctx.device) if ctx else ("cuda:0" if device == "cuda" else "cpu")
    ds = _dataset(args.states)
    ds = ds.to(dev)
    cfg = QIPOConfig(num_support=args.support, renew_chunk=args.chunk, eval_episodes=0, tensorboard=False)
    tr = QIPO(ds, cfg, out_dir=tempfile.mkdtemp(), device=dev, progress_bar=False)
    if ctx:
        ctx.attach(tr)
    times, cpu = [], []
    for r in range(args.repeats + 1):          # the first is a warm-up
        if ctx:
            ctx.barrier()
        if device == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        tr.step = r
        tr._renew_support()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    with open(f"{result_path}.{rank}", "w") as f:
        json.dump({"times": times[1:], "cpu": cpu[1:], "shape": list(tr.support.shape)}, f)
    if ctx:
        ctx.barrier()
        ctx.close()


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--states", type=int, default=4096)
    ap.add_argument("--support", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args(argv)
    import torch.multiprocessing as mp
    from bench._common import device_name, results_dir, today

    dev = torch.device("cuda" if args.device == "cuda" else "cpu")
    rows = []
    for w in [int(x) for x in args.procs.split(",")]:
        if dev.type == "cuda" and w > torch.cuda.device_count():
            print(f"skip {w} processes: {torch.cuda.device_count()} GPU(s) here")
            continue
        path = os.path.join(tempfile.mkdtemp(), "times")
        t0 = time.perf_counter()
        mp.spawn(_worker, args=(w, _free_port(), args, path), nprocs=w, join=True)
        ranks = []
        for k in range(w):
            with open(f"{path}.{k}") as f:
                ranks.append(json.load(f))
            os.unlink(f"{path}.{k}")
        med = _median(ranks[0]["times"])
        cpu = max(_median(r["cpu"]) for r in ranks)   # the busiest rank's CPU seconds per renewal
        rows.append({"procs": w, "median_s": med, "times_s": ranks[0]["times"], "cpu_s_busiest_rank": cpu,
                     "cpu_s_per_rank": [r["cpu"] for r in ranks],
                     "actions_per_s": args.states * args.support / med, "launch_s": time.perf_counter() - t0})
        print(f"{w} process(es): renewal of {args.states} states x {args.support} actions in {med:.3f} s "
              f"(median of {len(ranks[0]['times'])}) = {rows[-1]['actions_per_s']:.0f} actions/s; "
              f"busiest rank {cpu:.3f} CPU s", flush=True)
    base = rows[0] if rows else None
    for r in rows:
        r["speedup"] = r["actions_per_s"] / base["actions_per_s"]
        r["cpu_ratio"] = base["cpu_s_busiest_rank"] / r["cpu_s_busiest_rank"]
    name = device_name(dev)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    meta = {"device": name, "date": today(), "torch": torch.__version__, "backend": "nccl" if dev.type == "cuda" else "gloo",
            "states": args.states, "support": args.support, "chunk": args.chunk, "repeats": args.repeats,
            "threads_per_process": 1, "cpu_count": os.cpu_count(), "loadavg_after": load,
            "config": "QIPO defaults: hidden 256, depth 3, ot-eps, dpm2 8 steps (16 evaluations), twin critic"}
    lines = [f"# Support renewal vs number of processes: {name}, {meta['date']}", "",
             f"torch {torch.__version__}, backend {meta['backend']}, {args.states} states x {args.support} actions, "
             f"QIPO default networks (16 network evaluations per action), one torch thread per process, "
             f"{os.cpu_count()} logical CPUs, load average after the run {load}.", "",
             "Wall time is what a user waits (it needs a free core per process to shrink); the busiest rank's "
             "CPU seconds show how the work divides, whatever else runs on the machine.", "",
             "| processes | renewal wall (median) | actions/s | wall speedup | busiest rank CPU s | CPU ratio |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['procs']} | {r['median_s']:.3f} s | {r['actions_per_s']:.0f} | {r['speedup']:.2f}x "
              f"| {r['cpu_s_busiest_rank']:.3f} | {r['cpu_ratio']:.2f}x |" for r in rows]
    print("\n".join(lines))
    if args.save:
        from qipo_kernels.algos.common import _atomic, atomic_write_json

        d = results_dir(dev)
        stem = os.path.join(d, f"{meta['date']}-distributed")
        atomic_write_json({"meta": meta, "rows": rows}, stem + ".json")

        def w(tmp):
            with open(tmp, "w") as f:
                f.write("\n".join(lines) + "\n")
        _atomic(stem + ".md", w)
        print(f"saved {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
