"""Diagnosis of QIPO's stage-1 behaviour model: does it imitate the data it was trained on?

For each variant (path / solver / steps / time embedding / lr / batch / EMA) a FlowPolicy is trained
for ``--steps`` steps on the training slice of a dataset (all but the last ``--holdout`` fraction of
transitions, i.e. the last episodes) and measured on ``--states`` held-out states:

    R^2      1 - sum (a - mean_64(s))^2 / sum (a - mean(a))^2, the mean of 64 clipped samples per state
             against the data action (pooled over action dims)
    sat      fraction of clipped samples with |a| >= 0.999 (the data's own fraction is printed too)
    max|a|   largest |a| before the final clip

A plain MLP regression (obs -> action, tanh output, MSE) with the same steps / batch / lr is the
baseline. One torch thread. Writes a markdown table to --out.

    python bench/qipo_bc_diagnosis.py --dataset qipo/halfcheetah/noisy-sac-v0 --steps 1000 --batch 1024
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
            "max_abs": float(raw.abs().max())}


def train_flow(data, train_n, steps, batch, lr, ema_tau=None, seed=0, **mk):
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
        if i < 50 or i >= steps - 50:
            losses.append(float(loss))
    cpu = time.process_time() - t0
    return pol, ema, (sum(losses[:50]) / 50, sum(losses[-50:]) / 50), cpu


def train_mlp(data, train_n, steps, batch, lr, seed=0):
    torch.manual_seed(seed)
    net = MLP(data.obs_dim, data.act_dim, 256, 3, "mish")
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, train_n, (batch,), generator=g)
        loss = ((torch.tanh(net(data.obs[idx])) - data.actions[idx]) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
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
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, a.out)
    with open(os.path.splitext(a.out)[0] + ".json.tmp", "w") as f:
        json.dump({"rows": rows, "data_saturation": data_sat, "norm_gap": norm_gap}, f)
    os.replace(os.path.splitext(a.out)[0] + ".json.tmp", os.path.splitext(a.out)[0] + ".json")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
