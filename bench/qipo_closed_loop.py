"""QIPO's behaviour model in the closed loop: how far is it from the agent that made the data, on the data's
states and on the states it reaches itself? (issue 10)

A development dataset made by ``qipo-kernels make-dataset`` is an SB3 agent's deterministic action plus
Gaussian noise. Given that agent, this script runs two drivers in the dataset's environment:

    data    the agent plus the dataset's noise (``--noise``, a fraction of the action half-range): the
            process that made the data, so its states are the data's distribution;
    model   the behaviour model acting as QIPO evaluates it (one sample per state, the run's sampler).

At every visited state it compares the model's mean action (``--samples`` clipped samples) with the
agent's action, both in [-1, 1]: "error" = the root-mean-square over states and action dims of the
difference, "spread" = the rms of the samples' per-state std (the model's own action noise; the data's is
``--noise``). A model that imitates has a small error on the data driver's states; if its error grows on
its own states, its failures come from states the data does not cover (covariate shift), which held-out
statistics (bench/qipo_bc_diagnosis.py) cannot see. Errors are also split by episode outcome: over the last
``--tail`` steps before a fall (termination) against all steps of the episodes that did not fall.

    python bench/qipo_closed_loop.py --ckpts RUN/checkpoint.pt --agent AGENTS/ppo-Walker2d-v3.zip \\
        --vecnormalize AGENTS/ppo-Walker2d-v3-vecnormalize.pkl --time-feature 1000 --noise 0.1 --episodes 10

One torch thread. Writes OUT.md and OUT.json (temp file, then rename).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import pm  # noqa: E402
from bench.qipo_critic_budget import data_score  # noqa: E402
from bench.qipo_stage3_diagnosis import load_trainer, model_label  # noqa: E402
from qipo_kernels.algos.common import atomic_write_json, atomic_write_text  # noqa: E402
from qipo_kernels.data.rollout import rollout_episode  # noqa: E402
from qipo_kernels.evaluation import normalized_score  # noqa: E402

DRIVERS = ("data", "model")


class Probe:
    """A rollout policy (raw obs [S] -> env action [A]) that records, at each state, the agent's action and
    the model's samples, and acts as the driver says. ``agent``: raw obs -> env action (with ``reset()``
    when stateful, e.g. rl-zoo's time feature); ``model``: a FlowPolicy of the dataset's units."""

    def __init__(self, agent, model, info, driver: str, samples: int, seed: int):
        if driver not in DRIVERS:
            raise ValueError(f"driver must be one of {DRIVERS}, got {driver!r}")
        self.agent, self.model, self.info, self.driver, self.K = agent, model, info, driver, int(samples)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.diff, self.var = [], []  # per step: mean - agent [A], per-dim sample variance [A]

    def reset(self):
        reset = getattr(self.agent, "reset", None)
        if callable(reset):
            reset()
        self.diff, self.var = [], []

    @torch.no_grad()
    def __call__(self, obs):
        a_env = np.asarray(self.agent(obs), dtype=np.float64).reshape(-1)
        o = torch.as_tensor(self.info.normalize(np.asarray(obs, dtype=np.float64)[None]), dtype=torch.float32)
        s = self.model.sample(o, self.K, generator=self.gen)[0].clamp(-1.0, 1.0).double().numpy()  # [K, A]
        self.diff.append(s.mean(0) - self.info.scale_action(a_env))
        self.var.append(s.var(0, ddof=1) if self.K > 1 else np.zeros(s.shape[1]))
        return a_env if self.driver == "data" else self.info.to_env_action(s[0])


def rms(rows) -> float:
    return float(np.sqrt(np.mean(np.square(np.concatenate(rows))))) if rows else float("nan")


def run_driver(agent, model, ds, driver: str, episodes: int, noise: float, samples: int, tail: int,
               seed: int = 0) -> dict:
    """``episodes`` episodes of one driver (reset seeds seed .. seed + episodes - 1)."""
    info = ds.info
    import gymnasium as gym

    env = gym.make(info.env_spec())
    probe = Probe(agent, model, info, driver, samples, seed=1000 + seed)
    rng = np.random.default_rng(seed)
    rets, lens, falls, diffs, vars_, tails, kept = [], [], 0, [], [], [], []
    t0 = time.process_time()
    try:
        for e in range(episodes):
            _, _, r, term, _ = rollout_episode(env, probe, seed + e, rng, noise if driver == "data" else 0.0)
            d, v = np.asarray(probe.diff), np.asarray(probe.var)
            rets.append(float(r.sum()))
            lens.append(len(r))
            diffs.append(d.reshape(-1))
            vars_.append(v.reshape(-1))
            if term[-1]:
                falls += 1
                tails.append(d[-tail:].reshape(-1))
            else:
                kept.append(d.reshape(-1))
    finally:
        env.close()
    norm = [float(normalized_score(x, ds)) for x in rets]
    se = float(np.std(norm, ddof=1) / np.sqrt(len(norm))) if len(norm) > 1 else None
    return {"driver": driver, "episodes": episodes, "normalized": float(np.mean(norm)), "normalized_se": se,
            "mean_length": float(np.mean(lens)), "falls": falls, "error": rms(diffs),
            "error_before_fall": rms(tails), "error_no_fall": rms(kept),
            "spread": float(np.sqrt(np.mean(np.concatenate(vars_)))), "steps": int(sum(lens)),
            "cpu_s": round(time.process_time() - t0, 1)}


def write(res, out):
    f = lambda x: "-" if x is None or x != x else f"{x:.3f}"  # noqa: E731
    L = ["# QIPO's behaviour model in the closed loop (issue 10)", "", "Command:", "", "    " + res["command"], "",
         f"Each driver {res['episodes']} episodes (reset seeds 0..{res['episodes'] - 1}); the data driver is the agent "
         f"plus N(0, {res['noise']:g}^2) noise (the process that made the data), the model driver acts with one "
         f"sample per state (QIPO's evaluation). Error: rms over visited states and action dims of the model's mean "
         f"of {res['samples']} clipped samples minus the agent's action, in [-1, 1]; before a fall: the last "
         f"{res['tail']} steps of the episodes that terminated; no fall: all steps of the others. Spread: rms of the "
         f"samples' per-state std (the data's noise: {res['noise']:g}). Score: normalised, mean ± s.e. over the "
         "episodes. See the script's docstring for the reading.", "",
         "| run | data score | driver | score | mean length | falls | error | error before a fall | error, no fall "
         "| spread | CPU-s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in res["runs"]:
        for d in run["drivers"]:
            L.append(f"| {run['label']} | {run['data_score']} | {d['driver']} | "
                     f"{pm(d['normalized'], d['normalized_se'])} | {d['mean_length']:.0f} | "
                     f"{d['falls']}/{d['episodes']} | {f(d['error'])} | {f(d['error_before_fall'])} | "
                     f"{f(d['error_no_fall'])} | {f(d['spread'])} | {d['cpu_s']:.0f} |")
    L += ["", "Checkpoints:", ""] + [f"- {r['label']}: `{r['ckpt']}`" for r in res["runs"]]
    atomic_write_text("\n".join(L) + "\n", out + ".md")
    atomic_write_json(res, out + ".json")


def main(argv=None, agent=None):
    """``agent``: a callable raw obs -> env action to use instead of --agent (tests)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpts", nargs="+", required=True, help="QIPO runs' checkpoint.pt (their behaviour model)")
    ap.add_argument("--agent", help="the SB3 agent zip that made the dataset")
    ap.add_argument("--vecnormalize", default=None, help="its VecNormalize pickle, if any")
    ap.add_argument("--time-feature", type=int, default=None, help="its TimeFeatureWrapper max_steps, if any")
    ap.add_argument("--noise", type=float, default=0.1, help="the dataset's action noise (make-dataset --noise)")
    ap.add_argument("--episodes", type=int, default=10, help="episodes per driver and run")
    ap.add_argument("--samples", type=int, default=16, help="model samples per visited state")
    ap.add_argument("--tail", type=int, default=50, help="steps before a fall that 'error before a fall' reads")
    ap.add_argument("--drivers", nargs="+", choices=DRIVERS, default=list(DRIVERS))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "qipo_closed_loop"))
    a = ap.parse_args(argv)
    for name, v in (("--episodes", a.episodes), ("--samples", a.samples), ("--tail", a.tail)):
        if v < 1:
            raise SystemExit(f"{name} must be >= 1, got {v}")
    if not a.noise >= 0:
        raise SystemExit(f"--noise must be >= 0, got {a.noise}")
    if agent is None and not a.agent:
        raise SystemExit("--agent: the SB3 agent zip that made the dataset is required")
    for p in a.ckpts:
        if not os.path.isfile(p):
            raise SystemExit(f"--ckpts: no such file {p!r}")
    torch.set_num_threads(1)
    res = {"command": "python bench/qipo_closed_loop.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "episodes": a.episodes, "noise": a.noise, "samples": a.samples, "tail": a.tail, "runs": []}
    ds = None
    with tempfile.TemporaryDirectory() as tmp:
        for p in a.ckpts:
            did = torch.load(p, map_location="cpu", weights_only=False, mmap=True)["dataset_id"]
            if ds is not None and did != ds.dataset_id:
                raise SystemExit(f"--ckpts: {p} is a run on {did!r}, the first on {ds.dataset_id!r}; one agent "
                                 "made one dataset: pass one dataset's runs")
            tr, ck = load_trainer(p, ("behaviour",), tmp, ds=ds)
            ds = tr.dataset
            if agent is None:
                import gymnasium as gym

                from qipo_kernels.data.rollout import load_sb3_agent

                env = gym.make(ds.info.env_spec())
                agent = load_sb3_agent(a.agent, env, vecnormalize=a.vecnormalize, time_feature=a.time_feature)
                env.close()
            label = model_label(tr, ck)
            print(f"{label}: {p}", flush=True)
            run = {"label": label, "ckpt": p, "data_score": data_score(ds), "drivers": []}
            res["runs"].append(run)
            for drv in a.drivers:
                run["drivers"].append(run_driver(agent, tr.behaviour.eval(), ds, drv, a.episodes, a.noise,
                                                 a.samples, a.tail))
                print("   ", run["drivers"][-1], flush=True)
                write(res, a.out)
    print(f"wrote {a.out}.md / .json")


if __name__ == "__main__":
    main()
