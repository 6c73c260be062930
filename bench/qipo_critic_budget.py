"""How many stage-2 (Q-learning) steps QIPO's critic needs before its weights can improve the policy (issue 10).

One command, over finished runs that differ only in ``q_steps`` (bench/time_to_score.py with
``--set q_steps=N --set q_support_refresh=N``; the same seed gives the same behaviour model):

    python bench/qipo_critic_budget.py --ckpts RUN_4k/checkpoint.pt RUN_16k/checkpoint.pt ... \\
        --episodes 30 --out bench/results/qipo_critic_budget

Per checkpoint (its frozen stage-2 critic, its behaviour model, its final EMA policy):
- the critic's scale: mean min-Q of the dataset's (s, a) against the data's discounted Monte-Carlo
  return-to-go (scaled rewards, gamma of the run; episodes cut at their truncation, so a lower bound of
  the behaviour policy's value near episode ends). Polyak tau = 0.005 and gamma = 0.99 make the
  target follow the Bellman fixed point with a time constant of about 1 / (tau (1 - gamma)) = 20,000
  steps, so a short stage 2 leaves Q far below it;
- how well it separates the actions of one state: on --states fixed dataset states, M behaviour samples
  each (fixed noise): the per-state std and range of min-Q, the effective support size 1 / sum w^2 of
  the stage-3 weights softmax(beta Q) at the run's beta, and where the data action ranks;
- what its ranking is worth on the environment: the behaviour model acting with one sample (QIPO's
  evaluation), the behaviour model acting with the argmax-min-Q of --candidates samples (selection by
  this critic: a diagnostic, not QIPO's evaluation), and the final EMA policy (one sample); normalised
  score, mean ± s.e. over --episodes episodes, the same evaluation seeds for every row.

Writes <out>.json and <out>.md (temp file, then rename).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.qipo_stage3_diagnosis import (critic_from, critic_from_note, load_trainer, normalized_se,  # noqa: E402
                                         support_q)
from bench._common import score_text  # noqa: E402
from qipo_kernels.algos.common import atomic_write_json, atomic_write_text  # noqa: E402
from qipo_kernels.evaluation import normalized_score  # noqa: E402
from qipo_kernels.reference.loss import energy_weights  # noqa: E402


def mc_return_to_go(ds, gamma: float) -> torch.Tensor:
    """Discounted return-to-go of every dataset transition: [N] (rows in episode order, as loaded).
    An episode ends at a termination (no bootstrap) or a truncation (cut: the rest is unknown)."""
    r = ds.rewards.double()
    end = ((ds.terminations + ds.truncations) > 0).double()
    g = torch.empty_like(r)
    acc = 0.0
    for i in range(len(r) - 1, -1, -1):
        acc = float(r[i]) + gamma * (1.0 - float(end[i])) * acc
        g[i] = acc
    return g.to(ds.rewards.dtype)


def data_score(ds):
    """The dataset's own normalised score (its mean episode return, evaluation.normalized_score), or None."""
    ep = getattr(ds, "episode_returns", None)
    s = None if ep is None else normalized_score(ep.mean(), ds)
    return None if s is None else round(float(s), 1)


def load_run(path, ds=None):
    """(trainer, checkpoint) of a finished run: its behaviour model, final EMA policy and critics."""
    tr, ck = load_trainer(path, ("behaviour", "ema", "critic", "critic_target"),
                          os.path.join("/tmp", "qipo_critic_budget"), ds)
    tr.step = int(ck["step"])  # (the evaluation generator is seeded by the step)
    return tr, ck


@torch.no_grad()
def critic_stats(tr, n_states: int, M: int, seed: int = 1234):
    """The frozen critic on the data and on M behaviour samples of n fixed states (fixed noise)."""
    d, cfg = tr.dataset, tr.cfg
    q_data = support_q(tr, d.actions[:, None])[:, 0]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(d), generator=g)[:n_states]
    obs, act = d.obs[idx], d.actions[idx]
    noise = torch.randn((len(idx), M, d.act_dim), generator=g)
    sup = tr.behaviour.sample(obs, M, noise=noise, backend=cfg.backend)                       # [n, M, A]
    q = tr.critic.q_min(obs.repeat_interleave(M, 0), sup.reshape(-1, d.act_dim)).reshape(-1, M)  # [n, M]
    w = energy_weights(q, cfg.beta)
    ess = 1.0 / (w ** 2).sum(1)
    above = (q > q_data[idx][:, None]).float().sum(1)
    return {"q_data_mean": float(q_data.mean()),
            "q_std_per_state": float(q.std(1).mean()), "q_range_per_state": float((q.amax(1) - q.amin(1)).mean()),
            "ess_mean": float(ess.mean()), "ess_p10": float(ess.quantile(0.1)), "max_weight_mean": float(w.max(1).values.mean()),
            "data_rank_mean_above": float(above.mean()), "data_best_frac": float((above == 0).float().mean())}


def score(tr, policy, episodes: int, candidates: int = 1, noise_scale: float = 1.0):
    """Normalised score (mean, s.e.) of ``policy`` under tr's evaluation, acting by the argmax-Q of
    ``candidates`` samples (1: one sample) drawn at initial-noise scale ``noise_scale``."""
    tr.cfg.eval_candidates, tr.cfg.eval_noise_scale = candidates, float(noise_scale)
    try:
        r = tr.evaluate(num_episodes=episodes, policy=policy)
    finally:
        tr.cfg.eval_candidates, tr.cfg.eval_noise_scale = 1, 1.0
    return {"normalized": float(r["normalized_mean"]), "se": normalized_se(r), "episodes": r["episodes"]}


def write_md(res, out):
    L = ["# QIPO's stage-2 critic against its training steps (issue 10)", "",
         "Command:", "", "    " + res["command"], "",
         f"Dataset {res['dataset']}; data (behaviour policy) score {res['data_score']}. The runs differ only in "
         "q_steps (stage 2): same seed, same stage 1, the cpu-30min preset otherwise. Data's discounted "
         f"Monte-Carlo return-to-go (scaled rewards, cut at truncations): mean {res['mc_rtg_mean']:.1f}. "
         f"Critic statistics on {res['states']} fixed dataset states x {res['support']} behaviour samples "
         f"(fixed noise); ESS = 1 / sum w^2 of softmax(beta Q) over a state's samples (uniform: {res['support']}). "
         f"Scores: normalised, mean ± s.e. over {res['episodes']} episodes, same evaluation seeds; "
         f"'argmax of {res['candidates']}' = the behaviour model choosing among {res['candidates']} of its own "
         "samples by this critic (a diagnostic of the critic's ranking, not QIPO's evaluation). "
         f"Evaluation CPU {res['eval_cpu_s']:.0f} s.", ""]
    L += critic_from_note(res.get("critic_from"), "every row's critic columns and argmax; the behaviour model and "
                          "final policy are the QIPO run's")
    L += ["| q_steps | mean Q on data | Q / MC return-to-go | per-state Q std (range) | ESS at beta | "
          "samples above data action | behaviour model, 1 sample | behaviour, argmax of K by Q | final QIPO policy |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        c = r["critic"]
        L.append(f"| {r['q_steps']} | {c['q_data_mean']:.1f} | {c['q_data_mean'] / res['mc_rtg_mean']:.2f} | "
                 f"{c['q_std_per_state']:.3f} ({c['q_range_per_state']:.2f}) | {c['ess_mean']:.1f} (beta {r['beta']:g}) | "
                 f"{c['data_rank_mean_above']:.1f} of {res['support']} | {score_text(r['behaviour'])} | {score_text(r['behaviour_argmax'])} | "
                 f"{score_text(r['final'])} |")
    atomic_write_text("\n".join(L) + "\n", out + ".md")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpts", nargs="+", required=True, help="finished QIPO runs' checkpoint.pt")
    ap.add_argument("--states", type=int, default=2048)
    ap.add_argument("--support", type=int, default=64, help="behaviour samples per state for the critic statistics")
    ap.add_argument("--candidates", type=int, default=64, help="K of the argmax-by-critic diagnostic")
    ap.add_argument("--episodes", type=int, default=30)
    ap.add_argument("--critic-from", default=None, metavar="CKPT",
                    help="score with this run's target critic (e.g. a CPQL checkpoint on the same dataset) instead "
                         "of each QIPO run's own stage-2 critic")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "qipo_critic_budget"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    for name, v in (("states", a.states), ("support", a.support), ("candidates", a.candidates),
                    ("episodes", a.episodes)):
        if v < 1:
            raise SystemExit(f"--{name} must be >= 1, got {v}")
    runs, ds = [], None
    for p in a.ckpts:
        tr, ck = load_run(p, ds)
        ds = tr.dataset
        src = critic_from(tr, a.critic_from) if a.critic_from else None
        runs.append((p, tr))
    if len({tr.dataset.dataset_id for _, tr in runs}) != 1:
        raise SystemExit("--ckpts must be runs on one dataset")
    runs.sort(key=lambda x: x[1].cfg.q_steps)
    tr0 = runs[0][1]
    mc = mc_return_to_go(ds, tr0.cfg.gamma)
    res = {"command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]), "dataset": ds.dataset_id,
           "data_score": data_score(ds),
           "mc_rtg_mean": float(mc.mean()), "states": a.states, "support": a.support, "candidates": a.candidates,
           "episodes": a.episodes, "rows": [], "eval_cpu_s": 0.0, "critic_from": src}
    for p, tr in runs:
        t0 = time.process_time()
        row = {"ckpt": p, "q_steps": tr.cfg.q_steps, "seed": tr.cfg.seed, "beta": tr.cfg.beta,
               "critic": critic_stats(tr, a.states, a.support)}
        row["behaviour"] = score(tr, tr.behaviour, a.episodes)
        row["behaviour_argmax"] = score(tr, tr.behaviour, a.episodes, a.candidates)
        row["final"] = score(tr, tr.ema, a.episodes)
        res["eval_cpu_s"] += time.process_time() - t0
        res["rows"].append(row)
        print(p, row, flush=True)
        atomic_write_json(res, a.out + ".json")
        write_md(res, a.out)


if __name__ == "__main__":
    main()
