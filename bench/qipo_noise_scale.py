"""What QIPO's models score when they sample nearer their mode (issue 10): the initial-noise scale.

One command, over finished QIPO runs (bench/time_to_score.py keeps their checkpoint.pt):

    python bench/qipo_noise_scale.py --ckpts RUN_A/checkpoint.pt RUN_B/checkpoint.pt \\
        --scales 1 0.5 0 --episodes 30 --out bench/results/qipo_noise_scale

Per checkpoint, the stage-1 behaviour model and the final EMA policy act with one sample per state
(QIPO's evaluation) whose initial noise N(0, I) is multiplied by each --scales value
(QIPOConfig.eval_noise_scale / FlowPolicy.sample's noise_scale): 1 is the official evaluation, 0 the
deterministic ODE from the origin. Normalised score, mean ± s.e. over --episodes episodes, the same
evaluation seeds and generator seed for every cell. The data's own score is the reference: on datasets
made by adding noise to an agent's actions (bench/make_datasets.sh), a model that imitates the data
scores like the data at scale 1, and whatever it gains at lower scales is the noise it no longer adds.

Writes <out>.json and <out>.md (temp file, then rename) after every checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.qipo_critic_budget import data_score, score  # noqa: E402
from bench.qipo_stage3_diagnosis import load_trainer  # noqa: E402
from bench._common import score_text  # noqa: E402
from qipo_kernels.algos.common import atomic_write_json, atomic_write_text  # noqa: E402


def write_md(res, out):
    scales = res["scales"]
    L = ["# QIPO's models against the initial-noise scale of their sampler (issue 10)", "",
         "Command:", "", "    " + res["command"], "",
         "One sample per state (QIPO's evaluation), its initial noise N(0, I) multiplied by the scale: 1 = the "
         "official evaluation, 0 = the deterministic ODE from the origin (`eval_noise_scale`, not a paper "
         f"setting). Normalised score, mean ± s.e. over {res['episodes']} episodes, the same evaluation seeds "
         f"for every cell. Evaluation CPU {res['eval_cpu_s']:.0f} s.", "",
         "| run (dataset, seed, settings) | data | " + " | ".join(f"behaviour model, scale {s:g}" for s in scales)
         + " | " + " | ".join(f"final QIPO, scale {s:g}" for s in scales) + " |",
         "|---|---|" + "---|" * (2 * len(scales))]
    for r in res["rows"]:
        L.append(f"| {r['label']} | {r['data_score']} | " + " | ".join(score_text(r['behaviour'][str(s)]) for s in scales)
                 + " | " + " | ".join(score_text(r['final'][str(s)]) for s in scales) + " |")
    L += ["", "Checkpoints:", ""] + [f"- {r['label']}: `{r['ckpt']}`" for r in res["rows"]]
    atomic_write_text("\n".join(L) + "\n", out + ".md")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpts", nargs="+", required=True, help="finished (or budget-stopped) QIPO runs' checkpoint.pt")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5, 0.0])
    ap.add_argument("--episodes", type=int, default=30)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "qipo_noise_scale"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.episodes < 1:
        raise SystemExit(f"--episodes must be >= 1, got {a.episodes}")
    if any(not (s >= 0 and s < float("inf")) for s in a.scales):
        raise SystemExit(f"--scales must be finite and >= 0, got {a.scales}")
    for p in a.ckpts:
        if not os.path.isfile(p):
            raise SystemExit(f"--ckpts: no such file {p!r}")
    res = {"command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]), "scales": a.scales,
           "episodes": a.episodes, "rows": [], "eval_cpu_s": 0.0}
    ds = None
    for p in a.ckpts:
        tr, ck = load_trainer(p, ("behaviour", "ema"), os.path.join("/tmp", "qipo_noise_scale"), ds)
        ds = tr.dataset
        tr.step = int(ck["step"])  # (the evaluation generator is seeded by the step)
        c = tr.cfg
        label = (f"{ds.dataset_id.split('/')[1]}, seed {c.seed}, path {c.path}, beta {c.beta:g}, q_steps {c.q_steps}, "
                 f"policy_lr {c.policy_lr:g}, normalize {c.normalize}")
        row = {"ckpt": p, "label": label, "dataset": ds.dataset_id, "seed": c.seed, "step": tr.step,
               "data_score": data_score(ds), "behaviour": {}, "final": {}}
        t0 = time.process_time()
        for s in a.scales:
            row["behaviour"][str(s)] = score(tr, tr.behaviour, a.episodes, noise_scale=s)
            row["final"][str(s)] = score(tr, tr.ema, a.episodes, noise_scale=s)
            print(f"{label}: scale {s:g}: behaviour {row['behaviour'][str(s)]}, final {row['final'][str(s)]}",
                  flush=True)
        res["eval_cpu_s"] += time.process_time() - t0
        res["rows"].append(row)
        atomic_write_json(res, a.out + ".json")
        write_md(res, a.out)
    print(f"wrote {a.out}.md / .json")


if __name__ == "__main__":
    main()
