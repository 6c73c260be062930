"""Diagnosis of QIPO's stage-1 behaviour model: does it imitate the data it was trained on?

For each variant (path / solver / steps / time embedding / lr / batch / EMA) a FlowPolicy is trained
for ``--steps`` steps on the training slice of a dataset (all but the last ``--holdout`` fraction of
transitions, i.e. the last episodes) and measured on ``--states`` held-out states:

    R^2      1 - sum (a - mean_64(s))^2 / sum (a - mean(a))^2, the mean of 64 clipped samples per state
             against the data action (pooled over action dims)
    sat      fraction of clipped samples with |a| >= 0.999 (the data's own fraction is printed too)
    max|a|   largest |a| before the final clip
    spread   (--checkpoints mode) flow: the root-mean-square over states and action dims of the 64 clipped
             samples' per-state standard deviation, the model's own action noise; MLP: the rms of the data
             actions' residual around its prediction, an upper bound on the data's noise around its
             conditional mean (equal to it when the regression is exact)

A plain MLP regression (obs -> action, tanh output, MSE) with the same steps / batch / lr is the
baseline. One torch thread. Writes a markdown table to --out.

    python bench/qipo_bc_diagnosis.py --dataset qipo/halfcheetah/noisy-sac-v0 --steps 1000 --batch 1024

``--checkpoints 1000,3000,6000`` measures instead how imitation grows with training: one flow model per
variant (its first sampler) and the MLP regression, each trained once to the last checkpoint and
measured at every checkpoint: R^2, saturation and the evaluated BC score (``--bc-episodes`` episodes,
one sample per state, as QIPO's evaluation) of each, with the train CPU seconds so far.

    python bench/qipo_bc_diagnosis.py --dataset qipo/walker2d/noisy-sac-v0 --checkpoints 1000,3000,6000 \
        --batch 1024 --lrs 1e-3 --variants default --bc-episodes 5 --out bench/results/qipo_bc_steps_walker2d.md
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qipo_kernels import ops  # noqa: E402
from qipo_kernels.data import load_minari  # noqa: E402
from qipo_kernels.reference.paths import alpha_sigma  # noqa: E402
from qipo_kernels.nets import MLP  # noqa: E402
from qipo_kernels.policies import FlowPolicy  # noqa: E402


def r2(pred: torch.Tensor, target: torch.Tensor) -> float:
    ss_res = ((target - pred) ** 2).sum()
    ss_tot = ((target - target.mean(0, keepdim=True)) ** 2).sum()
    return float(1.0 - ss_res / ss_tot)


def sample_from(policy: FlowPolicy, obs, K, steps, solver, t0, gen):
    """K samples per state, unclipped: integrate from t0 (noise scaled by sigma(t0) on noise paths)."""
    noise = torch.randn((obs.shape[0], K, policy.act_dim), generator=gen)
    if policy.path == "ot":
        return ops.integrate(policy.net, noise, obs, steps=steps, solver=solver, t0=t0)
    _, sig = alpha_sigma(torch.tensor(float(t0), dtype=torch.float64), policy.path)
    return ops.integrate(policy.net, noise * float(sig), obs, steps=steps, solver=solver, t0=t0, path=policy.path)


def measure(policy: FlowPolicy, obs, act, steps=None, solver=None, gen=None, K=64, t0=0.0):
    with torch.no_grad():
        raw = sample_from(policy, obs, K, steps, solver, t0, gen)
    raw = torch.nan_to_num(raw, nan=1e6, posinf=1e6, neginf=-1e6)
    clipped = raw.clamp(-1, 1)
    return {"r2": r2(clipped.mean(1), act), "sat": float((clipped.abs() >= 0.999).float().mean()),
            "max_abs": float(raw.abs().max()), "spread": float(clipped.var(1).mean().sqrt())}


def train_flow(data, train_n, steps, batch, lr, ema_tau=None, seed=0, at=None, **mk):
    """``at``: optional {step: fn(policy, cpu_s, loss_last_50)} called after that many steps."""
    torch.manual_seed(seed)
    pol = FlowPolicy(data.obs_dim, data.act_dim, **mk)
    ema = copy.deepcopy(pol).requires_grad_(False) if ema_tau else None
    opt = torch.optim.Adam(pol.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    t0 = time.process_time()
    for i in range(steps):
        idx = torch.randint(0, train_n, (batch,), generator=g)
        loss = pol.loss(data.obs[idx], data.actions[idx], generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), pol.parameters()):
                    pe.lerp_(p, ema_tau)
        if i < 50 or i >= steps - 50 or at:
            losses.append(loss.item())
        if at and i + 1 in at:
            at[i + 1](pol, time.process_time() - t0, sum(losses[-50:]) / len(losses[-50:]))
    cpu = time.process_time() - t0
    return pol, ema, (sum(losses[:50]) / 50, sum(losses[-50:]) / 50), cpu


def train_mlp(data, train_n, steps, batch, lr, seed=0, at=None):
    torch.manual_seed(seed)
    net = MLP(data.obs_dim, data.act_dim, 256, 3, "mish")
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    t0 = time.process_time()
    for i in range(steps):
        idx = torch.randint(0, train_n, (batch,), generator=g)
        loss = ((torch.tanh(net(data.obs[idx])) - data.actions[idx]) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if at and i + 1 in at:
            at[i + 1](net, time.process_time() - t0, loss.item())
    return net


VARIANTS = {
    # name (default: ot-eps, fourier 30, as QIPO's defaults): (FlowPolicy kwargs, list of (solver, steps, t0))
    # t0: start time of the ODE (noise at 0); on "ot-eps" the package clips it to >= 1e-3
    "default": (dict(path="ot-eps", time_embedding="fourier"),
                [("dpm2", 8, 1e-3), ("ddim", 64, 1e-3), ("dpm2", 8, 0.02), ("dpm2", 8, 0.05), ("dpm2", 8, 0.1)]),
    "oteps-sin": (dict(path="ot-eps", time_embedding="sinusoidal"), [("dpm2", 8, 1e-3), ("dpm2", 8, 0.05)]),
    "ot-fourier": (dict(path="ot", time_embedding="fourier"), [("euler", 10, 0.0), ("euler", 32, 0.0)]),
    "ot-sin": (dict(path="ot", time_embedding="sinusoidal"), [("euler", 10, 0.0)]),
    "vp-fourier": (dict(path="vp", time_embedding="fourier"), [("dpm2", 8, 0.0)]),
}


def bc_score(policy_fn, data, episodes):
    """Normalised score (mean, s.e. over episodes) of obs -> action over ``episodes`` episodes."""
    from qipo_kernels.evaluation import evaluate

    res = evaluate(policy_fn, dataset=data, num_episodes=episodes, seeds=(0,))
    se = res["normalized_se"]
    return float(res["normalized_mean"]), float("nan") if se is None else se


def curve_rows(a, data, train_n, obs_h, act_h, lrs):
    """--checkpoints mode: rows (model, lr, sampler, steps, R^2, sat, max|a|, BC score, s.e., CPU-s, spread)."""
    marks = sorted(int(x) for x in a.checkpoints.split(","))
    rows = []
    for lr in lrs:
        def at_mlp(net, cpu, loss, lr=lr):
            with torch.no_grad():
                pred = torch.tanh(net(obs_h))
                sc, se = bc_score(lambda o: torch.tanh(net(o)), data, a.bc_episodes) if a.bc_episodes else (nan, nan)
            rows.append(("MLP regression (tanh, MSE)", f"{lr:g}", "-", net_steps[0], r2(pred, act_h),
                         float((pred.abs() >= 0.999).float().mean()), float("nan"), sc, se, cpu,
                         float((act_h - pred).pow(2).mean().sqrt())))
            print(rows[-1], flush=True)
        nan = float("nan")
        net_steps = [0]
        hooks = {}
        for m in marks:
            def h(net, cpu, loss, m=m):
                net_steps[0] = m
                at_mlp(net, cpu, loss)
            hooks[m] = h
        if not a.skip_mlp:
            train_mlp(data, train_n, marks[-1], a.batch, lr, at=hooks)
        for name in a.variants.split(","):
            mk, samplers = VARIANTS[name]
            solver, st, s0 = samplers[0] if name != "default" else ("dpm2", 8, 0.05)

            def at_flow(pol, cpu, loss, m, name=name, mk=mk, solver=solver, st=st, s0=s0, lr=lr):
                gen = torch.Generator().manual_seed(7)
                meas = measure(pol, obs_h, act_h, steps=st, solver=solver, gen=gen, t0=s0)
                sc, se = nan, nan
                if a.bc_episodes:
                    pol_eval = copy.deepcopy(pol)
                    pol_eval.t0, pol_eval.steps, pol_eval.solver = float(s0), st, solver
                    eg = torch.Generator().manual_seed(11)
                    sc, se = bc_score(lambda o: pol_eval.sample(o, 1, generator=eg)[:, 0], data, a.bc_episodes)
                rows.append((f"{name} ({mk['path']}, {mk['time_embedding']})", f"{lr:g}",
                             f"{solver} x {st} from t0={s0:g}", m, meas["r2"], meas["sat"], meas["max_abs"], sc, se,
                             cpu, meas["spread"]))
                print(rows[-1], f"loss(last 50) {loss:.3f}", flush=True)
            train_flow(data, train_n, marks[-1], a.batch, lr, at={m: (lambda p, c, l, m=m, f=at_flow: f(p, c, l, m))
                                                                   for m in marks}, **mk)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="qipo/halfcheetah/noisy-sac-v0")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lrs", default="1e-4,1e-3", help="comma-separated learning rates")
    ap.add_argument("--default-lrs", default="1e-4", help="extra learning rates for the default variant only")
    ap.add_argument("--states", type=int, default=500)
    ap.add_argument("--holdout", type=float, default=0.1)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variant names")
    ap.add_argument("--ema", action="store_true", help="also measure an EMA copy (tau 0.005)")
    ap.add_argument("--checkpoints", default=None,
                    help="comma-separated step counts: measure R^2 / saturation / BC score at each (curve mode)")
    ap.add_argument("--bc-episodes", type=int, default=5, help="curve mode: evaluation episodes per checkpoint")
    ap.add_argument("--skip-mlp", action="store_true", help="curve mode: no MLP regression rows")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "qipo_bc_diagnosis.md"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = load_minari(a.dataset)
    n = len(data)
    train_n = int(n * (1 - a.holdout))
    g = torch.Generator().manual_seed(123)
    hold = train_n + torch.randperm(n - train_n, generator=g)[: a.states]
    obs_h, act_h = data.obs[hold], data.actions[hold]
    # obs normalisation: the evaluation path maps raw env observations through info.normalize; check it
    # reproduces the training obs exactly on the held-out rows
    raw = data.obs[hold].double().numpy() * data.info.obs_std + data.info.obs_mean
    norm_gap = float((torch.as_tensor(data.info.normalize(raw)).float() - obs_h).abs().max())
    data_sat = float((act_h.abs() >= 0.999).float().mean())
    rows = []
    lrs = [float(x) for x in a.lrs.split(",")]
    t0 = time.process_time()
    if a.checkpoints:
        rows = curve_rows(a, data, train_n, obs_h, act_h, lrs)
        beh = getattr(data, "episode_returns", None)
        beh_s = "-"
        if beh is not None and data.ref_max_score is not None:
            import numpy as np
            beh_s = f"{100 * (np.mean(np.asarray(beh)) - data.ref_min_score) / (data.ref_max_score - data.ref_min_score):.1f}"
        lines = [f"# QIPO stage-1 behaviour model vs training steps ({a.dataset})", "",
                 f"Batch {a.batch}, one CPU thread; {a.states} held-out states (last {a.holdout:.0%} of transitions), "
                 f"64 samples per state for R^2 / saturation. Data saturation (|a| >= 0.999): {data_sat:.3f}. "
                 f"Behaviour policy (the data's episodes): {beh_s}. BC score: {a.bc_episodes} episodes, one sample "
                 f"per state (MLP: its tanh output), normalised, ± s.e. over episodes. Spread: flow, the rms of each "
                 f"state's sample std (its action noise); MLP, the rms of the data's residual around its prediction "
                 f"(at most the data's noise). Total CPU "
                 f"{time.process_time() - t0:.0f} s.", "",
                 "Command: `python bench/qipo_bc_diagnosis.py " + " ".join(argv if argv is not None else sys.argv[1:])
                 + "`", "",
                 "| model | lr | sampler | steps | R^2 of mean | saturation | max abs before clip | spread | BC score "
                 "| train CPU-s |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            f = lambda x, d=3: "-" if x != x else f"{x:.{d}f}"  # noqa: E731
            lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {f(r[4])} | {f(r[5])} | {f(r[6])} | {f(r[10])} | "
                         f"{f(r[7], 1)} ± {f(r[8], 1)} | {r[9]:.0f} |")
        _write(a.out, lines, {"rows": rows, "data_saturation": data_sat, "norm_gap": norm_gap})
        return
    mlp_r2 = {}
    for lr in lrs:
        mlp = train_mlp(data, train_n, a.steps, a.batch, lr)
        with torch.no_grad():
            mlp_r2[lr] = r2(torch.tanh(mlp(obs_h)), act_h)
        rows.append(("MLP regression (tanh, MSE)", f"{lr:g}", "-", "-", mlp_r2[lr], float("nan"), float("nan"),
                     "-"))
        print(rows[-1], flush=True)
    for name in a.variants.split(","):
        mk, samplers = VARIANTS[name]
        for lr in lrs + ([float(x) for x in a.default_lrs.split(",") if float(x) not in lrs]
                         if name == "default" and a.default_lrs else []):
            pol, ema, (l0, l1), cpu = train_flow(data, train_n, a.steps, a.batch, lr,
                                                 ema_tau=0.005 if a.ema else None, **mk)
            gen = torch.Generator().manual_seed(7)
            for solver, st, t0 in samplers:
                m = measure(pol, obs_h, act_h, steps=st, solver=solver, gen=gen, t0=t0)
                rows.append((f"{name} ({mk['path']}, {mk['time_embedding']})", f"{lr:g}", f"{solver} x {st} from t0={t0:g}", f"{l0:.3f} -> {l1:.3f}", m["r2"], m["sat"],
                             m["max_abs"], f"{cpu:.0f}"))
                print(rows[-1], flush=True)
            if ema is not None:
                m = measure(ema, obs_h, act_h, steps=samplers[0][1], solver=samplers[0][0], gen=gen, t0=samplers[0][2])
                rows.append((name + ", EMA copy (tau 0.005)", f"{lr:g}", f"{samplers[0][0]} x {samplers[0][1]}",
                             "-", m["r2"], m["sat"], m["max_abs"], "-"))
                print(rows[-1], flush=True)
    lines = [f"# QIPO stage-1 behaviour model: imitation diagnosis ({a.dataset})", "",
             f"{a.steps} steps of batch {a.batch}, one CPU thread; {a.states} held-out states (last "
             f"{a.holdout:.0%} of transitions), 64 samples per state. Data saturation (|a| >= 0.999): "
             f"{data_sat:.3f}. Obs normalisation, evaluation map vs training obs, max gap: {norm_gap:.2e}. "
             f"Total CPU {time.process_time() - t0:.0f} s.", "",
             "Command: `python bench/qipo_bc_diagnosis.py " + " ".join(argv if argv is not None else sys.argv[1:])
             + "`", "",
             "| model | lr | sampler | loss first 50 -> last 50 | R^2 of mean | saturation | max abs before clip | train CPU-s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join(x if isinstance(x, str) else f"{x:.3f}" if x == x else "-" for x in r) + " |")
    _write(a.out, lines, {"rows": rows, "data_saturation": data_sat, "norm_gap": norm_gap})


def _write(out, lines, blob):
    """The markdown table and its JSON, each written temp-then-rename."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(out + ".tmp", out)
    js = os.path.splitext(out)[0] + ".json"
    with open(js + ".tmp", "w") as f:
        json.dump(blob, f)
    os.replace(js + ".tmp", js)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
