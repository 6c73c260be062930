"""Where QIPO's models put the data's saturated actions (issue 10, item 2's saturation target).

One command, over finished QIPO runs (bench/time_to_score.py keeps their checkpoint.pt):

    python bench/qipo_saturation.py --ckpts RUN_A/checkpoint.pt RUN_B/checkpoint.pt \\
        --step-factors 1 4 16 --out bench/results/qipo_saturation

The locomotion datasets' actions are clipped to [-1, 1], so a large share of their coordinates sit exactly
at a bound (a point mass). Per checkpoint, the stage-1 behaviour model (``--models``: and / or the final EMA
policy of a run that finished stage 3) draws K samples for each of N
dataset states with the run's own sampler (solver, t0) at the run's step count times each --step-factors
value, the same initial noise for every row. Reported:

    |a| >= thr     fraction of the (clipped) coordinates at or beyond 1 - delta, for the data and the samples
    beyond 1       fraction of the samples outside [-1, 1] before the clip (what the clip turns into a bound)
    at the data's bounds   over the coordinates where the data action is at a bound (|a| >= 0.999): the
                   mean of sign(data) x sample (1 = exactly at the same bound) and the fraction within 0.01

Why a flow's samples land just inside a bound: every deterministic solver here ends with a data prediction
at the last solver time, a posterior mean E[a | x_t] at a noise level above zero, and a posterior mean of a
distribution with mass at the bound and inside it lies strictly inside. Only network error pushes a sample
past the bound (the "beyond 1" column), so the |a| >= 0.999 share falls as the network improves and rises
as the last step's noise level shrinks (more steps). The step-factor rows test that. A run trained with
``QIPOConfig.bound_dequant`` > 0 learned the at-bound mass as a tail beyond the bound instead (its targets
there were sign(a) (1 + sigma |z|)), so its samples cross the bound and the clip puts them on it.

Writes <out>.json and <out>.md (temp file, then rename) after every checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import score_text  # noqa: E402
from bench.qipo_critic_budget import data_score, score  # noqa: E402
from bench.qipo_stage3_diagnosis import SAT as AT_BOUND, load_trainer, model_label  # noqa: E402
from qipo_kernels.algos.common import atomic_write_json, atomic_write_text  # noqa: E402

MODELS = ("behaviour", "ema")
THRESHOLDS = (0.9, 0.95, 0.99, AT_BOUND)   # AT_BOUND: the diagnosis scripts' saturation threshold, 0.999


def profile(a: torch.Tensor) -> dict:
    """Fraction of the coordinates of ``a`` (any shape, values in [-1, 1]) with |a| >= each threshold."""
    return {f"{t:g}": round(float((a.abs() >= t).float().mean()), 4) for t in THRESHOLDS}


@torch.no_grad()
def measure(pol, obs: torch.Tensor, act: torch.Tensor, K: int, factors, seed: int = 0, score_fn=None) -> dict:
    """The data's and the policy's saturation profile on states ``obs`` [N, S] with data actions ``act``
    [N, A], K samples per state, at pol.steps x each factor (the same noise for every factor). ``score_fn``
    (optional): pol -> {"normalized", "se", "episodes"}, called with pol.steps set to each row's count."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((obs.shape[0], K, act.shape[1]), generator=g)
    bound = act.abs() >= AT_BOUND                                  # [N, A] data coordinates at a bound
    sign = torch.sign(act)
    rows = []
    for f in factors:
        steps = pol.steps * int(f)
        t0 = time.process_time()
        raw = pol.sample(obs, K, steps=steps, noise=noise, clip=False)   # [N, K, A]
        x = raw.clamp(-1.0, 1.0)
        pos = (x * sign[:, None, :])[bound[:, None, :].expand_as(x)]    # sign-aligned samples at the data's bounds
        rows.append({"steps": steps, "solver": pol.solver, "profile": profile(x),
                     "beyond_1": round(float((raw.abs() > 1.0).float().mean()), 4),
                     "at_bound_mean": round(float(pos.mean()), 4) if pos.numel() else float("nan"),
                     "at_bound_within_0.01": (round(float((pos >= 0.99).float().mean()), 4) if pos.numel()
                                              else float("nan")),
                     "cpu_s": round(time.process_time() - t0, 1)})
        if score_fn is not None:
            base, pol.steps = pol.steps, steps
            try:
                rows[-1]["score"] = score_fn(pol)
            finally:
                pol.steps = base
        print(f"    {pol.solver} x {steps}: {rows[-1]}", flush=True)
    return {"data": profile(act), "data_at_bound": round(float(bound.float().mean()), 4), "rows": rows}


def write(res, out):
    atomic_write_json(res, out + ".json")
    th = [f"{t:g}" for t in THRESHOLDS]
    L = ["# Where QIPO's models put the data's saturated actions (issue 10)", "", "Command:", "",
         "    " + res["command"], "",
         f"{res['states']} dataset states (a fixed random draw) x {res['K']} samples of the model (row label: the stage-1 "
         "behaviour model, or the final EMA policy of a finished run), "
         "the run's solver and t0, its step count times a factor, the same initial noise in every row. "
         "Columns |a| >= x: fraction of the clipped coordinates at or beyond x (data row: the data actions of "
         "the same states). beyond 1: samples outside [-1, 1] before the clip. At the data's bounds: over the "
         "coordinates where the data action is at +-1, the mean of sign(data) x sample and the fraction within "
         "0.01 of that bound. Score: the model acting with one sample per state at that step count "
         "(QIPO's evaluation), normalised, mean ± s.e. over the episodes, the same evaluation seeds and sampler "
         "noise in every row. See the script's docstring for the reading.", "",
         "| run | row | " + " | ".join(f"\\|a\\| >= {t}" for t in th) + " | beyond 1 | at the data's bounds: mean | "
         "within 0.01 | score | CPU-s |", "|---|---|" + "---|" * (len(th) + 5)]
    for r in res["runs"]:
        m = r["measure"]
        L.append(f"| {r['label']} | data | " + " | ".join(f"{m['data'][t]:.3f}" for t in th)
                 + f" | - | 1 | 1 | {'-' if r['data_score'] is None else r['data_score']} | - |")
        for x in m["rows"]:
            L.append(f"| {r['label']} | model, {x['solver']} x {x['steps']} | "
                     + " | ".join(f"{x['profile'][t]:.3f}" for t in th)
                     + f" | {x['beyond_1']:.3f} | {x['at_bound_mean']:.3f} | {x['at_bound_within_0.01']:.3f} | "
                     + (score_text(x["score"]) if "score" in x else "-")
                     + f" | {x['cpu_s']} |")
    L += ["", "Checkpoints:", ""] + [f"- {r['label']}: `{r['ckpt']}`" for r in res["runs"]]
    atomic_write_text("\n".join(L) + "\n", out + ".md")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpts", nargs="+", required=True, help="finished QIPO runs' checkpoint.pt")
    ap.add_argument("--states", type=int, default=1024, help="dataset states (a fixed random draw)")
    ap.add_argument("--samples", type=int, default=32, help="samples per state")
    ap.add_argument("--step-factors", type=int, nargs="+", default=[1, 4, 16],
                    help="sampler steps = the run's steps x each factor")
    ap.add_argument("--episodes", type=int, default=0,
                    help="also score the behaviour model at each step count over this many episodes (0: no scores)")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=["behaviour"],
                    help="which of each run's models: the stage-1 behaviour model and / or the final EMA policy "
                         "(a run that finished stage 3)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "qipo_saturation"))
    a = ap.parse_args(argv)
    for name, v in (("--states", a.states), ("--samples", a.samples), *(("--step-factors", f) for f in a.step_factors)):
        if v < 1:
            raise SystemExit(f"{name} must be >= 1, got {v}")
    if a.episodes < 0:
        raise SystemExit(f"--episodes must be >= 0, got {a.episodes}")
    for p in a.ckpts:
        if not os.path.isfile(p):
            raise SystemExit(f"--ckpts: no such file {p!r}")
    torch.set_num_threads(1)
    res = {"command": "python bench/qipo_saturation.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "states": a.states, "K": a.samples, "step_factors": a.step_factors, "runs": []}
    ds = None
    with tempfile.TemporaryDirectory() as tmp:
        for p in a.ckpts:
            tr, ck = load_trainer(p, tuple(a.models), tmp, ds=ds)
            ds = tr.dataset
            if "ema" in a.models and ck["step"] <= tr.P + tr.Q:
                raise SystemExit(f"--models ema: {p} stopped at step {ck['step']}, before stage 3 (its EMA policy "
                                 f"is not trained); use --models behaviour")
            g = torch.Generator().manual_seed(1234)
            idx = torch.randperm(len(ds.actions), generator=g)[:a.states]
            for name in a.models:
                label = model_label(tr, ck, name)
                print(f"{label}: {p}", flush=True)
                fn = (lambda pol, tr=tr: score(tr, pol, a.episodes)) if a.episodes else None
                res["runs"].append({"label": label, "model": name, "ckpt": p, "data_score": data_score(ds),
                                    "measure": measure(tr.modules[name], ds.obs[idx], ds.actions[idx], a.samples,
                                                       a.step_factors, score_fn=fn)})
                write(res, a.out)
    print(f"wrote {a.out}.md / .json")


if __name__ == "__main__":
    main()
