"""``qipo-kernels demo``: the whole pipeline on a CPU with no network, in a few minutes.

1. makes the embedded Minari dataset (Pendulum-v1, a scripted controller of mixed quality);
2. trains QIPO (three stages) and CPQL briefly, with scaled-down hyperparameters (DEMO_QIPO, DEMO_CPQL);
3. evaluates both against the behaviour policy (the dataset's mean episode return);
4. times sampling with every backend available here (ops.integrate / ops.consistency_sample /
   ops.act, backend="torch" vs each fused backend vs "auto") and checks they agree.

Runs are resumable: rerunning the demo picks up finished or interrupted runs from their checkpoints
(``--fresh`` starts over). Everything lands in ``out_dir`` (default runs/demo), with
``demo_summary.json`` written atomically at the end.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import torch

# Scaled-down hyperparameters for the demo (paper defaults are the config classes' defaults).
DEMO_QIPO: Dict[str, Any] = dict(
    path="ot", hidden=128, depth=3, time_embedding="sinusoidal", critic_hidden=128, critic_depth=3,
    sample_steps=5, pretrain_steps=1000, pretrain_batch=256, pretrain_lr=1e-3,
    q_steps=2000, q_batch=256, q_lr=1e-3, q_support=8, q_support_refresh=1000, tau=0.02,
    policy_steps=900, policy_batch=128, policy_lr=1e-3, num_support=16, renew_every=150, ema_tau=0.05,
    renew_chunk=4096, eval_every=0, eval_episodes=10, log_every=50, checkpoint_every=500, tensorboard=True,
)
DEMO_CPQL: Dict[str, Any] = dict(
    hidden=128, depth=3, critic_hidden=128, critic_depth=3, steps=2000, batch=256, lr=1e-3, eta=1.0,
    grad_norm=5.0, step_start_ema=200, eval_every=0, eval_episodes=10, eval_candidates=50, log_every=50,
    checkpoint_every=500, tensorboard=True,
)
QUICK = dict(qipo=dict(pretrain_steps=30, q_steps=30, policy_steps=20, renew_every=20, q_support_refresh=30,
                       q_support=2, num_support=4, sample_steps=2, eval_episodes=2, checkpoint_every=25),
             cpql=dict(steps=40, eval_episodes=2, eval_candidates=8, checkpoint_every=25, step_start_ema=20))


def _bench(fn: Callable[[], Any], min_time: float = 0.3, max_reps: int = 50) -> float:
    """Median seconds per call (one warm-up call, then repeats until min_time has passed)."""
    fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (time.perf_counter() - start < min_time or len(times) < 3):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def backend_speeds(flow_net, cons_net, critic, obs_dim: int, act_dim: int, device="cpu", batch: int = 256,
                   samples: int = 16, candidates: int = 50, steps: int = 5, seed: int = 0) -> List[Dict[str, Any]]:
    """Time integrate / consistency_sample / act on every backend that can run them here.

    Returns rows {op, backend, ms, actions_per_s, speedup_vs_torch, max_abs_diff_vs_torch} ("auto" rows
    name the backend it chose).
    """
    from . import backends as B
    from . import ops

    g = torch.Generator(device=device).manual_seed(seed)
    obs = torch.randn(batch, obs_dim, generator=g, device=device)
    noise = torch.randn(batch, samples, act_dim, generator=g, device=device)
    obs_a = obs[:64]
    noise_a = torch.randn(64, candidates, act_dim, generator=g, device=device)
    unif = torch.rand(64, generator=g, device=device, dtype=torch.float64)
    calls = {
        "integrate": (lambda b: ops.integrate(flow_net, noise, obs, steps=steps, solver="euler", backend=b),
                      batch * samples, dict(net=flow_net, x0=noise, obs=obs, steps=steps, solver="euler", path=None,
                                            return_trajectory=False)),
        "consistency_sample": (lambda b: ops.consistency_sample(cons_net, noise, obs, backend=b), batch * samples,
                               dict(net=cons_net, noise=noise, obs=obs, sigmas=None, step_noise=None, clip=True)),
        "act": (lambda b: ops.act(flow_net, critic, obs_a, num_candidates=candidates, steps=steps, noise=noise_a,
                                  mode="argmax", backend=b), 64,
                dict(net=flow_net, critic=critic, obs=obs_a, num_candidates=candidates, sampler="flow", steps=steps,
                     solver="euler", path=None, sigmas=None, mode="argmax", noise=noise_a)),
    }
    del unif
    rows: List[Dict[str, Any]] = []
    with torch.no_grad():
        for op, (call, n, args) in calls.items():
            ref = call("torch")
            t_ref = None
            for b in ("torch",) + tuple(x for x in B.BACKENDS if x != "torch") + ("auto",):
                if b not in ("torch", "auto") and B.reasons(op, b, torch.device(device), **args):
                    continue
                if b == "triton" and torch.device(device).type == "cpu":
                    continue  # the Triton CPU interpreter is for testing, not speed
                label = b
                if b == "auto":
                    label = "auto->" + B.choose(op, "auto", torch.device(device), None, **args)[0]
                out = call(b)
                sec = _bench(lambda: call(b))
                if b == "torch":
                    t_ref = sec
                rows.append(dict(op=op, backend=label, ms=1e3 * sec, actions_per_s=n / sec,
                                 speedup_vs_torch=(t_ref / sec) if t_ref else None,
                                 max_abs_diff_vs_torch=float((out - ref).abs().max())))
    return rows


def _behaviour(ds) -> Dict[str, Any]:
    from .evaluation import normalized_score

    rets = torch.as_tensor(ds.episode_returns, dtype=torch.float64)
    out = {"mean": float(rets.mean()), "std": float(rets.std(unbiased=False)), "episodes": int(rets.numel())}
    ns = normalized_score(rets.numpy(), dataset=ds)
    out["normalized_mean"] = float(ns.mean()) if ns is not None else None
    return out


def demo_configs(seed: int = 0, quick: bool = False, overrides: Optional[Dict[str, Dict[str, Any]]] = None
                 ) -> Dict[str, Dict[str, Any]]:
    """The demo's QIPO and CPQL configs as dicts {"qipo": ..., "cpql": ...} (DEMO_* with the seed, QUICK
    when quick, then ``overrides[name]``)."""
    cfgs = {"qipo": dict(DEMO_QIPO, seed=seed), "cpql": dict(DEMO_CPQL, seed=seed)}
    for name, cfg in cfgs.items():
        if quick:
            cfg.update(QUICK[name])
        cfg.update((overrides or {}).get(name, {}))
    return cfgs


def train_demo(ds, out_dir: str, seed: int = 0, quick: bool = False, device: str = "cpu", progress_bar: bool = True,
               verbose: bool = True, overrides: Optional[Dict[str, Dict[str, Any]]] = None):
    """Train (or resume / reuse finished runs in ``out_dir/qipo``, ``out_dir/cpql``) the demo's QIPO and CPQL
    on the OfflineDataset ``ds``. Returns (results, trainers): results[name] = {final_eval, train_time_s, steps,
    wall_s, config}, trainers[name] = the QIPO / CPQL trainer (its networks hold the trained weights)."""
    from .algos import CPQL, QIPO, CPQLConfig, QIPOConfig

    say = print if verbose else (lambda *a, **k: None)
    cfgs = demo_configs(seed, quick, overrides)
    results: Dict[str, Any] = {}
    trainers = {}
    for name, cls, cfg_cls in (("qipo", QIPO, QIPOConfig), ("cpql", CPQL, CPQLConfig)):
        say(f"training {name.upper()} ...")
        t = time.perf_counter()
        tr = cls(ds, cfg_cls(**cfgs[name]), out_dir=os.path.join(out_dir, name), device=device,
                 progress_bar=progress_bar)
        tr.verbose = verbose
        s = tr.fit(resume=True)
        results[name] = {"final_eval": s["final_eval"], "train_time_s": s["train_time_s"], "steps": s["steps"],
                         "wall_s": time.perf_counter() - t, "config": cfgs[name]}
        trainers[name] = tr
        say(f"  {name.upper()} done in {time.perf_counter() - t:.0f} s: return {s['final_eval']['mean']:.1f}")
    return results, trainers


def run_demo(out_dir: str = os.path.join("runs", "demo"), seed: int = 0, fresh: bool = False, progress_bar: bool = True,
             quick: bool = False, threads: Optional[int] = None, device: str = "cpu", verbose: bool = True) -> Dict[str, Any]:
    """Run the demo; returns (and writes to ``out_dir/demo_summary.json``) its results.

    ``fresh`` empties ``out_dir`` first, only when the demo (or another qipo-kernels run) made it or it is
    empty (rundir.clear_run_dir; anything else is refused, nothing deleted). ``threads``: torch CPU threads
    (None: leave torch's setting). The folder is locked while the demo runs (rundir.run_lock).
    """
    from .rundir import check_writable, clear_run_dir, run_lock

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if threads:
        torch.set_num_threads(threads)
    check_writable(out_dir)
    with run_lock(out_dir):
        if fresh:
            clear_run_dir(out_dir)
        return _run_demo(out_dir, seed, progress_bar, quick, device, verbose)


def _run_demo(out_dir: str, seed: int, progress_bar: bool, quick: bool, device: str, verbose: bool) -> Dict[str, Any]:
    from . import backends as B
    from . import data
    from .algos.common import atomic_write_json

    say = print if verbose else (lambda *a, **k: None)
    t_start = time.perf_counter()
    say(f"qipo-kernels demo: torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"{platform.processor() or platform.machine()}; output in {out_dir}")

    t = time.perf_counter()
    data.make_local_dataset(data.DEMO_DATASET_ID)
    ds = data.load_minari(data.DEMO_DATASET_ID, device=device)
    beh = _behaviour(ds)
    t_data = time.perf_counter() - t
    say(f"dataset {ds.dataset_id}: {len(ds)} transitions, {beh['episodes']} episodes, behaviour return "
        f"{beh['mean']:.1f} ({t_data:.1f} s)")

    results, trainers = train_demo(ds, out_dir, seed=seed, quick=quick, device=device, progress_bar=progress_bar,
                                   verbose=verbose)
    qcfg, ccfg = results["qipo"]["config"], results["cpql"]["config"]
    say("timing the samplers on each backend ...")
    rows = backend_speeds(trainers["qipo"].ema.net, trainers["cpql"].actor.net, trainers["qipo"].critic,
                          ds.obs_dim, ds.act_dim, device=device, steps=DEMO_QIPO["sample_steps"])
    total = time.perf_counter() - t_start

    say("")
    say(f"{'policy':<22s}{'return ± s.d.':>18s}{'normalised':>14s}")
    say(f"{'behaviour (dataset)':<22s}{beh['mean']:>10.1f} ± {beh['std']:<5.0f}"
        f"{(beh['normalized_mean'] if beh['normalized_mean'] is not None else float('nan')):>14.1f}")
    for name in ("qipo", "cpql"):
        ev = results[name]["final_eval"]
        nm = ev.get("normalized_mean")
        say(f"{name.upper():<22s}{ev['mean']:>10.1f} ± {ev['std']:<5.0f}{(nm if nm is not None else float('nan')):>14.1f}"
            f"   ({'beats' if ev['mean'] > beh['mean'] else 'does NOT beat'} the behaviour policy)")
    say("")
    say(f"{'op':<20s}{'backend':<16s}{'ms/call':>10s}{'actions/s':>12s}{'vs torch':>10s}{'max|diff|':>11s}")
    for r in rows:
        sp = f"{r['speedup_vs_torch']:.2f}x" if r["speedup_vs_torch"] else "-"
        say(f"{r['op']:<20s}{r['backend']:<16s}{r['ms']:>10.2f}{r['actions_per_s']:>12.0f}{sp:>10s}"
            f"{r['max_abs_diff_vs_torch']:>11.1e}")
    unavailable = {b: B.backend_reasons(b, torch.device(device)) for b in B.BACKENDS if b != "torch"}
    for b, why in unavailable.items():
        if why:
            say(f"  ({b}: {'; '.join(why)})")
    say(f"\ndemo wall time {total:.0f} s")
    summary = {"behaviour": beh, "qipo": results["qipo"], "cpql": results["cpql"], "backend_speeds": rows,
               "unavailable_backends": unavailable, "wall_s": total, "threads": torch.get_num_threads(),
               "quick": quick, "config": {"qipo": qcfg, "cpql": ccfg}}
    atomic_write_json(summary, os.path.join(out_dir, "demo_summary.json"))
    return summary
