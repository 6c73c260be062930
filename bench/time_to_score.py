"""Time-to-score: normalised score against process CPU seconds on one thread, QIPO and CPQL (and the TD3+BC
peer baseline, bench/peer_td3bc.py, for what the data allows a standard offline RL method).

Run (one process per algorithm x dataset x seed, one torch thread each; a run stops after
``--budget-s`` CPU seconds of training or at the end of its schedule, then evaluates once more):

    python bench/time_to_score.py run --algo cpql --dataset qipo/halfcheetah/noisy-sac-v0 --seed 0 \\
        --budget-s 600 --out bench/results/tts
    python bench/time_to_score.py run ... --budget-s 3600 --resume    # a finished run continued to a larger budget
    python bench/time_to_score.py run ... --set policy_steps=12000 --budget-s 4000 \\
        --resume-from OUT/<run>             # ... and with a longer last stage, into the folder of its new name
    python bench/time_to_score.py collect --from OUT --to bench/results/tts   # finished runs into the results
    python bench/time_to_score.py report --out bench/results/tts      # table + two plots from every run there
    python bench/time_to_score.py gain --dataset ID --label "cpql --set lr=0.001"   # gain over the data, pooled
    python bench/time_to_score.py seeds --dataset ID --label "..." --plot P.png   # mean over seeds at each step
    python bench/time_to_score.py reeval --curve bench/results/tts/<run>/curve.json \
        --ckpt <out>/<run>/run/checkpoint.pt --episodes 30   # a run's final evaluation again, with more episodes

The datasets come from `qipo-kernels make-dataset` (bench/make_datasets.sh). CPQL uses the per-task
"medium" defaults of the dataset's env (cpql_config_for); TD3+BC the paper's values (TD3BCConfig); QIPO the
preset of --preset (default "cpu-quick";
QIPO_PRESETS: schedule lengths, batch and lr only). Each run writes <out>/<algo>-<env>-s<seed>-<kind>/curve.json
(QIPO: <out>/qipo-<preset>-<env>-s<seed>-<kind>/curve.json; run_name): every
evaluation as (step, train CPU seconds, normalised mean, its s.e. over the episodes). QIPO's
behaviour model (end of stage 1) is evaluated too; ``--stage1-only`` stops there (the run's final score is
the behaviour model's; folder <...>-stage1-<env>-...).
"""
from __future__ import annotations

import argparse
import collections
import glob
import dataclasses
import json
import os
import re
import shlex
import sys
import textwrap
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qipo_kernels.algos import CPQL, QIPO, StopTraining, cpql_config_for  # noqa: E402
from qipo_kernels.algos.common import atomic_copy, atomic_write_json, atomic_write_text  # noqa: E402
from qipo_kernels.algos.cpql import CPQLConfig  # noqa: E402
from qipo_kernels.algos.qipo import QIPOConfig, qipo_config_for  # noqa: E402
from qipo_kernels.cli import CLIError, _make_config, _parse_sets  # noqa: E402
from qipo_kernels.data import load_minari  # noqa: E402
from qipo_kernels.data.rollout import existing_params, software_stamp  # noqa: E402
from qipo_kernels.evaluation import standard_error  # noqa: E402

from bench.peer_td3bc import TD3BC, TD3BCConfig  # noqa: E402

# --algo -> (trainer, config class, the config before --set from (args, env)): QIPO its --preset, CPQL the
# env's "medium" task defaults, the TD3+BC peer the paper's values
ALGORITHMS = {"qipo": (QIPO, QIPOConfig, lambda a, env: qipo_config_for(a.preset)),
              "cpql": (CPQL, CPQLConfig, lambda a, env: cpql_config_for(f"{env}-medium")),
              "td3bc": (TD3BC, TD3BCConfig, lambda a, env: TD3BCConfig())}


def _scores(res):
    """The score fields of a curve point from an ``evaluate()`` result."""
    return {"normalized": res.get("normalized_mean"), "normalized_se": res.get("normalized_se"),
            "episodes": res["episodes"], "per_episode": [float(x) for x in np.asarray(res["returns"])]}


def _point(tr, res, tag):
    return {"tag": tag, "step": tr.step, "cpu_s": round(tr.train_time, 2), "wall_s": round(tr.train_wall_time, 2),
            **_scores(res)}


def run_name(algo, preset, sets, dataset, seed, stage1_only=False) -> str:
    """The run's folder: algo[-preset][-key_value...][-stage1]-env-sSEED[-kind], kind the dataset's name without
    its version ("qipo/halfcheetah/medium-a2c-v0" -> halfcheetah-s0-medium-a2c), so runs of one env's datasets
    never share a folder."""
    kind = _dataset_kind(dataset)
    tail = "".join(f"-{kv.replace('=', '_')}" for kv in sets) + ("-stage1" if stage1_only else "")
    head = f"{algo}-{preset}{tail}" if algo == "qipo" else f"{algo}{tail}"
    return f"{head}-{dataset_env(dataset)}-s{seed}" + (f"-{kind}" if kind else "")


def _dataset_kind(dataset) -> str:
    """The dataset's name without its version, the last part of a run's folder ("qipo/halfcheetah/medium-a2c-v0"
    -> "medium-a2c"); "" for an id that is not namespaced."""
    parts = dataset.split("/")
    return re.sub(r"(^|-)v\d+$", "", parts[-1]) if len(parts) >= 3 else ""


def _older_name(name, dataset):
    """The folder the same run had before folder names ended with the dataset's kind (b128512), or None."""
    kind = _dataset_kind(dataset)
    return name[:-len(kind) - 1] if kind and name.endswith(f"-{kind}") else None


def dataset_env(dataset) -> str:
    """The env of a namespaced dataset id ("qipo/halfcheetah/medium-a2c-v0" -> "halfcheetah"), else the id."""
    return dataset.split("/")[1] if dataset.count("/") >= 2 else dataset


def _resumable(a, out, flag="--resume"):
    """--resume: the finished run in ``out`` (its curve.json with a final evaluation, and run/checkpoint.pt),
    which this command continues to a larger --budget-s; anything else is refused by name (``flag`` names the
    option in the message: --resume, or --resume-from for a run continued into a new folder)."""
    path, ckpt = os.path.join(out, "curve.json"), os.path.join(out, "run", "checkpoint.pt")
    if not (os.path.isfile(path) and os.path.isfile(ckpt)):
        raise SystemExit(f"{flag}: no finished run to continue in {out} (needs curve.json and run/checkpoint.pt)")
    c = json.load(open(path))
    if "final" not in c:
        raise SystemExit(f"{flag}: {path} has no final evaluation (the run did not finish); to start it again, "
                         f"pass another --out or remove {out} yourself")
    if c.get("stage1_only"):
        raise SystemExit(f"{flag}: a --stage1-only run ends with stage 1; there is nothing to continue")
    if a.budget_s <= c["final"]["cpu_s"]:
        raise SystemExit(f"--budget-s must exceed the {c['final']['cpu_s']:.0f} train CPU seconds the run has "
                         f"spent to continue it, got {a.budget_s:g}")
    return c


def _continued_from(a, trainer, cfg, out):
    """--resume-from DIR: the finished run in DIR (of another --set, e.g. a shorter last stage), continued in this
    run's own folder. Refused by name, before the dataset loads, unless DIR ran the same algorithm, dataset, seed
    and preset and its config differs from these arguments' only where the trainer lets a resumed run differ
    (``trainer.resume_fields`` and learning rates: QIPO's policy_steps, CPQL's steps, ...)."""
    src = a.resume_from.rstrip(os.sep)
    if os.path.abspath(src) == os.path.abspath(out):
        raise SystemExit(f"--resume-from: {src} is this run's own folder; continue it there with --resume")
    old = _resumable(a, src, "--resume-from")
    for key in ("algo", "dataset", "seed") + (("preset",) if a.algo == "qipo" else ()):
        mine = getattr(a, key)
        if old.get(key) != mine:
            raise SystemExit(f"--resume-from: the run in {src} has {key} {old.get(key)!r}, these arguments "
                             f"{mine!r}; it can only be continued with its own {key}")
    _, bad = trainer.resume_config_changes(old.get("config") or {}, cfg)
    if bad:
        shown = ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in bad.items())
        raise SystemExit(f"--resume-from: {shown} cannot change when a run is continued (only "
                         f"{', '.join(sorted(set(trainer.resume_fields) | set(trainer.lr_fields)))}); "
                         f"start a new run for this configuration")
    return old


def _copy_run_files(src, dst):
    """Copy the files of a run's folder (checkpoint and logs; not its hidden lock and marker files) into a new
    one, each with atomic_copy: an interrupted copy leaves no half-written checkpoint for the trainer to resume."""
    for f in sorted(os.listdir(src)):
        if os.path.isfile(os.path.join(src, f)) and not f.startswith("."):
            atomic_copy(os.path.join(src, f), os.path.join(dst, f))


def _dataset_build(ds) -> dict:
    """What tells one build of a dataset from another: its reference scores and the data's normalised score
    (the mean episode return; None without episode returns or reference scores)."""
    ep = getattr(ds, "episode_returns", None)
    beh = None
    if ep is not None and ds.ref_max_score is not None and ds.ref_min_score is not None:
        beh = float(100 * (np.mean(np.asarray(ep)) - ds.ref_min_score) / (ds.ref_max_score - ds.ref_min_score))
    return {"ref": [ds.ref_min_score, ds.ref_max_score], "behaviour_normalized": beh}


def _build_key(c) -> tuple:
    """A dataset build's identity, from a curve or a _dataset_build dict: (ref_min, ref_max, data score), rounded
    to 6 decimals (curves of older versions of this script all hold "ref" and "behaviour_normalized")."""
    ref = c.get("ref") or [None, None]
    return tuple(None if v is None else round(float(v), 6) for v in (*ref, c.get("behaviour_normalized")))


def _curve_paths(out):
    """Every run's curve in a run --out or results folder: <out>/<run>/curve.json, sorted."""
    return sorted(glob.glob(os.path.join(out, "*", "curve.json")))


def _load_curves(out):
    return [json.load(open(p)) for p in _curve_paths(out)]


def run(a):
    if a.stage1_only and a.algo != "qipo":
        raise SystemExit("--stage1-only applies to --algo qipo only (its behaviour model)")
    env = dataset_env(a.dataset)
    trainer, cfg_cls, defaults = ALGORITHMS[a.algo]
    common = dict(seed=a.seed, eval_every=a.eval_every, eval_episodes=a.episodes, checkpoint_every=0, tensorboard=False)
    try:  # as `train` does: defaults, then --set, every value checked before the dataset loads or a folder is made
        base = dataclasses.asdict(defaults(a, env))
        cfg = _make_config(cfg_cls, {**_parse_sets(cfg_cls, a.set, base), **common})
    except (CLIError, ValueError) as e:
        raise SystemExit(str(e)) from None
    name = run_name(a.algo, a.preset, a.set, a.dataset, a.seed, a.stage1_only)
    out = os.path.join(a.out, name)
    if a.resume and a.resume_from:
        raise SystemExit("--resume continues the run of these arguments in its own folder, --resume-from another "
                         "run into this one: pass one of them")
    old = _resumable(a, out) if a.resume else None   # checked before the dataset loads
    if a.resume_from:
        old = _continued_from(a, trainer, cfg, out)
    if (old is None or a.resume_from) and any(os.path.exists(os.path.join(out, *f))
                                             for f in (("curve.json",), ("run", "checkpoint.pt"))):
        # the trainer would start over in it: the finished run's curve and checkpoint overwritten, its logs mixed
        raise SystemExit(f"{out} already holds a run of these arguments (curve.json or run/checkpoint.pt): "
                         f"--resume continues a finished one to a larger --budget-s; to run it again, pass another "
                         f"--out or remove that folder yourself")
    torch.set_num_threads(1)
    ds = load_minari(a.dataset)
    build = _dataset_build(ds)
    if old is not None and _build_key(old) != _build_key(build):
        raise SystemExit(f"{'--resume-from' if a.resume_from else '--resume'}: {a.dataset} here (reference "
                         f"scores {build['ref']}, data score "
                         f"{build['behaviour_normalized']}) is not the build the run in {a.resume_from or out} trained on (reference "
                         f"scores {old.get('ref')}, data score {old.get('behaviour_normalized')}): the dataset was "
                         f"rebuilt (made on another machine or with other package versions); continue the run where "
                         f"its dataset is, or start a new run in another --out")
    tr = trainer(ds, cfg, out_dir=os.path.join(out, "run"), progress_bar=False)   # writes nothing before fit
    if old is not None and old["final"]["step"] >= tr.total_steps:
        if a.resume_from:
            raise SystemExit(f"--resume-from: the run in {a.resume_from} is at step {old['final']['step']}, and these "
                             f"arguments' schedule is no longer; lengthen the last stage with --set (e.g. QIPO "
                             f"policy_steps, CPQL steps)")
        raise SystemExit(f"--resume: the run in {out} ended its schedule ({old['final']['step']} steps), not its "
                         f"budget; a larger --budget-s adds nothing (a longer last stage: --resume-from {out} "
                         f"--set ...)")
    os.makedirs(out, exist_ok=True)
    if a.resume_from:   # a copy of the finished run's files: the run in --resume-from stays as it was
        _copy_run_files(os.path.join(a.resume_from, "run"), os.path.join(out, "run"))
    if old is None:
        curve = {"algo": a.algo, "preset": a.preset if a.algo == "qipo" else None, "set": list(a.set), "dataset": a.dataset, "seed": a.seed,
                 "budget_s": a.budget_s, "final_episodes": a.final_episodes, "stage1_only": bool(a.stage1_only),
                 "behaviour_normalized": None, "points": [], "command": a.command,
                 "config": dict(vars(cfg))}
    else:  # the finished run's curve goes on; its final evaluation stays on it as a "budget_end" point
        curve = {k: v for k, v in old.items() if k != "final"}
        curve.update(budget_s=a.budget_s, final_episodes=a.final_episodes,
                     points=[dict(p, tag="budget_end") if p["tag"] == "final" else p for p in old["points"]],
                     resume_commands=old.get("resume_commands", []) + [a.command])
        if a.resume_from:   # this run's arguments from here on: its name, grouping and config are the new ones
            curve.update(set=list(a.set), config=dict(vars(cfg)),
                         continued_from=os.path.abspath(a.resume_from))
    curve["ref"] = build["ref"]
    if build["behaviour_normalized"] is not None:
        curve["behaviour_normalized"] = build["behaviour_normalized"]
    stamp = software_stamp()   # what each leg of the run (start, every --resume) ran with, and the dataset's maker
    curve["made_with"] = [x for x in curve.get("made_with", []) if x != stamp] + [stamp]
    curve["dataset_made_with"] = (existing_params(a.dataset) or {}).get("qipo_made_with")
    deadline = time.time() + a.wall_limit_s if a.wall_limit_s else None

    def save():
        atomic_write_json(curve, os.path.join(out, "curve.json"))

    def callback(t, metrics):
        if a.algo == "qipo" and t.step == t.P:  # the behaviour model, at the end of stage 1
            curve["points"].append(_point(t, t.evaluate(num_episodes=a.final_episodes), "behaviour"))
            save()
            if a.stage1_only:
                raise StopTraining("stage 1 only")
        for h in t.eval_history:
            if h["step"] == t.step and not any(p["step"] == t.step and p["tag"] == "train" for p in curve["points"]):
                n = h["episodes"]
                se = standard_error(h.get("normalized_std"), n)
                curve["points"].append({"tag": "train", "step": t.step, "cpu_s": h["train_time_s"],
                                        "wall_s": h["train_wall_s"], "normalized": h["normalized_mean"],
                                        "normalized_se": se, "episodes": n})
                save()
        if t.train_time >= a.budget_s or (deadline is not None and time.time() > deadline):
            raise StopTraining("budget")

    tr.callback = callback
    try:
        tr.fit(resume=old is not None)
    except StopTraining:  # budget spent: keep the models, so the run can be diagnosed or resumed like a finished one
        tr.save_checkpoint()
    beh = [p for p in curve["points"] if p["tag"] == "behaviour"]
    if a.stage1_only and beh:  # the run's model is the behaviour model, evaluated already with --final-episodes
        curve["final"] = dict(beh[-1], tag="final")
    else:
        if a.stage1_only:  # the budget ran out inside stage 1: the partly trained behaviour model
            print("--stage1-only: the budget stopped stage 1 before its end; evaluating the model as it is")
        res = tr.evaluate(num_episodes=a.final_episodes)
        curve["points"].append(_point(tr, res, "final"))
        curve["final"] = curve["points"][-1]
    save()
    print(json.dumps({k: v for k, v in curve["final"].items() if k != "per_episode"}))


def reeval(a):
    """Evaluate a finished run's final checkpoint again with --episodes episodes (the run's evaluation
    seeds; deterministic for a given checkpoint and episode count) and make that the curve's final point;
    for QIPO also its stage-1 behaviour model (kept unchanged in the checkpoint) for the "behaviour" point.
    The run's own evaluations are kept under "final_at_train_end" / "behaviour_at_train_end", and this
    command is added to the curve's commands, so the table stays reproducible."""
    from qipo_kernels.cli import load_checkpoint

    torch.set_num_threads(1)
    c = json.load(open(a.curve))
    if "final" not in c:
        raise SystemExit(f"--curve {a.curve}: the run has no final evaluation (stopped before its end)")
    if a.episodes < 2:
        raise SystemExit(f"--episodes must be >= 2 (a standard error needs two episodes), got {a.episodes}")
    tr = load_checkpoint(a.ckpt, "cpu", algos={k: v[:2] for k, v in ALGORITHMS.items()})
    if tr.algo != c["algo"]:
        raise SystemExit(f"--ckpt {a.ckpt} is a checkpoint of {tr.algo!r}, the curve's run is {c['algo']!r}")
    if tr.step != c["final"]["step"]:
        raise SystemExit(f"--ckpt {a.ckpt} is at step {tr.step}, the curve's final evaluation at step "
                         f"{c['final']['step']}: not this run's final checkpoint")
    if tr.dataset.dataset_id != c["dataset"] or int(tr.cfg.seed) != int(c["seed"]):
        raise SystemExit(f"--ckpt {a.ckpt} is a run of {tr.dataset.dataset_id} seed {tr.cfg.seed}, the curve's of "
                         f"{c['dataset']} seed {c['seed']}")
    tags = {"final": None}
    if any(p["tag"] == "behaviour" for p in c["points"]):  # QIPO: its stage-1 model is in the checkpoint too
        tags["behaviour"] = tr.behaviour
    for tag, policy in tags.items():
        res = tr.evaluate(num_episodes=a.episodes) if policy is None else \
            tr.evaluate(num_episodes=a.episodes, policy=policy)
        point = next(p for p in c["points"] if p["tag"] == tag)
        key = f"{tag}_at_train_end"
        old = c.get(key) or {k: point[k] for k in ("normalized", "normalized_se", "episodes")}
        new = {**point, **_scores(res)}  # same step and CPU seconds, new scores
        c["points"] = [new if p["tag"] == tag else p for p in c["points"]]
        c[key] = old
        if tag == "final":
            c["final"] = new
        print(f"{c['dataset']} seed {c['seed']}: {tag} {old['normalized']:.1f} ± {old['normalized_se'] or 0:.1f} "
              f"({old['episodes']} episodes) -> {new['normalized']:.1f} ± {new['normalized_se']:.1f} "
              f"({new['episodes']} episodes)")
    cmd = f"bench/time_to_score.py reeval --curve {a.curve} --ckpt {a.ckpt} --episodes {a.episodes}"
    c["reeval_commands"] = [x for x in c.get("reeval_commands", []) if x != cmd] + [cmd]
    atomic_write_json(c, a.curve)


def report(a):
    curves = _load_curves(a.out)
    if not curves:
        raise SystemExit(f"no runs under {a.out}")
    curves = _name_builds(curves)   # runs on two builds of one dataset are never pooled
    groups = {}
    for c in curves:  # runs of one label on one dataset with different budgets are rows of their own
        groups.setdefault((_label(c), c["dataset"], float(c["budget_s"])), []).append(c)
    n_budgets = collections.Counter((label, dataset) for label, dataset, _ in groups)

    def budget_tag(label, dataset, budget):
        """" (budget N s)" where it tells apart the rows (and curves) of one label on one dataset, else ""."""
        return f" (budget {budget:.0f} s)" if n_budgets[(label, dataset)] > 1 else ""
    lines = ["# Time-to-score on one CPU thread", "",
             "Normalised score 100 (R - ref_min) / (ref_max - ref_min) of the final policy; mean ± s.e. over all "
             "evaluation episodes of all seeds (s.e. of the seed means in brackets when there are >= 2 seeds). "
             "CPU seconds are the process CPU time of the train steps (evaluation excluded). The machine's 2 cores "
             "were shared with other jobs: wall time was ~3-5x the CPU time.", "",
             "| algorithm | dataset | behaviour (data) | seeds | steps | train CPU-s | QIPO behaviour model | final score | final episodes per seed | best evaluation on the curve |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    finals_summary = []   # one entry per finished row, for the final-scores plot
    for (algo, dataset, budget), cs in sorted(groups.items()):
        algo += budget_tag(algo, dataset, budget)
        done = [c for c in cs if "final" in c]
        if not done:  # killed before its final evaluation: one row per run, up to its last evaluation
            for c in cs:
                if c["points"]:
                    lines.append(_partial_row(algo, dataset, c))
            continue
        cs = done
        finals = [c["final"] for c in cs]
        eps = np.concatenate([np.asarray(_norm_eps(c, f)) for c, f in zip(cs, finals)])
        se = eps.std(ddof=1) / np.sqrt(len(eps)) if len(eps) > 1 else float("nan")
        seed_means = [f["normalized"] for f in finals]
        seed_se = f" [{np.std(seed_means, ddof=1) / np.sqrt(len(seed_means)):.1f}]" if len(seed_means) > 1 else ""
        beh = _behaviour_points([p for c in cs for p in c["points"]])
        beh_s = _behaviour_cell(beh)
        best = [_best(c) for c in cs]
        finals_summary.append({"label": algo, "dataset": dataset, "data": cs[0]["behaviour_normalized"],
                               "mean": float(eps.mean()), "se": float(se), "seed_means": seed_means,
                               "behaviour": float(np.mean([p["normalized"] for p in beh])) if beh else None})
        lines.append(f"| {algo} | {dataset} | {cs[0]['behaviour_normalized']:.1f} | {len(finals)} | "
                     f"{int(np.mean([f['step'] for f in finals]))} | {np.mean([f['cpu_s'] for f in finals]):.0f} | "
                     f"{beh_s} | {eps.mean():.1f} ± {se:.1f}{seed_se} | {'/'.join(str(f['episodes']) for f in finals)} | "
                     f"{np.mean(best):.1f} |")
    lines += ["", "Commands (one per run; after it the commands that continued it to a larger budget (--resume) "
              "or repeated its final evaluation with more episodes (reeval)):", ""]
    listed = set()  # a resumed run's command is also that of the shorter run kept beside it: listed once
    for c in curves:
        for x in [c["command"]] + c.get("resume_commands", []) + _reeval_lines(c):
            if c.get("build_named"):   # the same command on another build of the dataset: say which
                x += f"   # on {c['dataset']}"
            if x not in listed:
                listed.add(x)
                lines.append(f"    {x}")
    atomic_write_text("\n".join(lines) + "\n", os.path.join(a.out, "README.md"))
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    path = os.path.join(a.out, "time_to_score.png")
    plot_curves(plt, curves, path, budget_tag)
    print(f"plot: {path}")
    path = os.path.join(a.out, "final_scores.png")
    if finals_summary:
        plot_finals(plt, finals_summary, path)
        print(f"plot: {path}")
    else:
        print("no finished run (final evaluation): no final-scores plot")


ALGO_COLOURS = {"cpql": "tab:blue", "qipo": "tab:orange", "td3bc": "tab:green"}   # final_scores.png


def plot_finals(plt, rows, path):
    """The table at a glance: one panel per dataset (build), one line per finished row (configuration and
    budget), sorted by score. Each row: its final score, mean ± s.e. over all final episodes (bar), each seed's
    mean (small dots) and, for QIPO, its behaviour model (black star); the data's score (dashed) and the data
    + 20 target (dotted) as vertical lines. ``rows``: dicts with label, dataset, data, mean, se, seed_means,
    behaviour (None for CPQL)."""
    datasets = sorted({r["dataset"] for r in rows})
    heights = [0.9 + 0.36 * sum(r["dataset"] == d for r in rows) for d in datasets]
    fig, axes = plt.subplots(len(datasets), 1, figsize=(11, sum(heights) + 0.6 * len(datasets)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, dataset in zip(axes.flat, datasets):
        rs = sorted((r for r in rows if r["dataset"] == dataset), key=lambda r: r["mean"])
        y = np.arange(len(rs))
        for i, r in enumerate(rs):
            colour = ALGO_COLOURS.get(r["label"].split()[0], "tab:gray")
            se = r["se"] if np.isfinite(r["se"]) else 0.0
            ax.errorbar([r["mean"]], [i], xerr=[se], fmt="o", color=colour, capsize=3, markersize=5)
            ax.plot(r["seed_means"], [i] * len(r["seed_means"]), ".", color=colour, alpha=0.5, markersize=4)
            if r["behaviour"] is not None:
                ax.plot([r["behaviour"]], [i], "k*", markersize=7)
        data = rs[0]["data"]
        ax.axvline(data, color="gray", ls="--", lw=1)
        ax.axvline(data + 20, color="gray", ls=":", lw=1)
        ax.set_yticks(y)
        ax.set_yticklabels([textwrap.fill(r["label"], 75, subsequent_indent="  ") for r in rs], fontsize=7)
        ax.set_ylim(-0.7, len(rs) - 0.3)
        ax.set_title(f"{dataset}: final score (dashed: data {data:.1f}; dotted: data + 20)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes.flat[-1].set_xlabel("normalised score: mean ± s.e. over final episodes; dots: seed means; "
                             "black star: QIPO behaviour model (blue CPQL, orange QIPO, green TD3+BC peer)",
                             fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)


def collect(a):
    """Copy the finished runs of a run --out (``<src>/<run>/curve.json``) into a results folder (``--to``), where
    report and gain read them. Nothing there is overwritten. A folder's name says the run's arguments; within it:
    the same dataset build and budget is the same run, left as it is even when it differs (reeval rewrites the
    results copy in place); the same build and another budget (a run continued with --resume) goes to
    ``<run>-<budget>s`` beside it; another build of the dataset (rebuilt elsewhere: the same run name) goes to
    ``<run>-rebuilt`` (``-rebuilt2``, ... for yet other builds). A run whose folder had an older name (without the
    dataset's kind: ``qipo-cpu-30min-walker2d-s0`` for ``...-walker2d-s0-noisy-sac``) counts as the run of that
    name. Prints what it did per run."""
    src = _curve_paths(a.src)
    if not src:
        raise SystemExit(f"--from: no runs in {a.src} (expected {a.src}/<run>/curve.json, as `run --out` writes)")

    def load(dest):
        path = os.path.join(a.to, dest, "curve.json")
        return path, (json.load(open(path)) if os.path.exists(path) else None)

    for path in src:
        c = json.load(open(path))
        name = os.path.basename(os.path.dirname(path))
        if "final" not in c:
            print(f"{name}: not finished (no final evaluation), not collected")
            continue
        k, older = 0, _older_name(name, c.get("dataset", ""))
        while True:   # the folder of this build: the first that is free or holds a run on the same build
            dest = name if k == 0 else f"{name}-rebuilt" + ("" if k == 1 else str(k))
            target, old = load(dest)
            if k == 0 and old is None and older is not None:  # the run may sit under its folder's older name
                t, o = load(older)
                if o is not None and o.get("dataset") == c.get("dataset"):
                    dest, target, old = older, t, o
            if old is None or _build_key(old) == _build_key(c):
                break
            k += 1
        if old is not None and old.get("budget_s") != c.get("budget_s"):
            target, old = load(f"{dest}-{c.get('budget_s'):g}s")
        if old is None:
            atomic_write_json(c, target)
            print(f"{name}: -> {target}")
        else:
            same = "identical" if old == c else "differs from this copy (a reeval there?); left as it is"
            print(f"{name}: already in {target} ({same})")
    return 0


def _name_builds(curves):
    """The curves, each with its "dataset" named apart where one dataset id has runs on more than one build of
    it (other reference scores or data score: the dataset was rebuilt on another machine or with other package
    versions): "qipo/walker2d/medium-ppo-v0 (data 73.9, ref max 3905.5)". Ids with one build keep their name."""
    builds = collections.defaultdict(set)
    for c in curves:
        builds[c["dataset"]].add(_build_key(c))

    def name(c):
        if len(builds[c["dataset"]]) == 1:
            return c["dataset"]
        _, ref_max, beh = _build_key(c)
        return (f"{c['dataset']} (data {'-' if beh is None else f'{beh:.1f}'}, "
                f"ref max {'-' if ref_max is None else f'{ref_max:.1f}'})")
    return [dict(c, dataset=name(c), build_named=name(c) != c["dataset"]) for c in curves]


def _select_runs(a, curves):
    """The finished runs of configuration ``a.label`` on dataset id ``a.dataset`` (every build), of budget
    ``a.budget_s`` where the configuration's runs have several; refused by name when there are none."""
    on = [c for c in curves if c["dataset"] == a.dataset and "final" in c]
    sel = [c for c in on if _label(c) == a.label]
    if not sel:
        raise SystemExit(f"--label {a.label!r}: no finished run of it on {a.dataset} under {a.out}; its labels "
                         f"there: {sorted({_label(c) for c in on}) or 'none'}")
    budgets = sorted({float(c["budget_s"]) for c in sel})
    if a.budget_s is not None:
        sel = [c for c in sel if float(c["budget_s"]) == a.budget_s]
        if not sel:
            raise SystemExit(f"--budget-s {a.budget_s:g}: the runs of {a.label!r} on {a.dataset} have budgets {budgets}")
    elif len(budgets) > 1:
        raise SystemExit(f"the runs of {a.label!r} on {a.dataset} have budgets {budgets}: pick one with --budget-s")
    return sel


def seeds(a):
    """One configuration's curve averaged over its seeds, on one build of a dataset: at every step that all its
    runs evaluated, the seeds' mean score ± the s.e. of the seeds' scores, their mean train CPU seconds and the
    gain over the data; ``--plot PATH`` draws it (and each seed) against CPU seconds with the data and the
    target (data + 20). What a reader needs to see how much time a configuration needs to reach a score."""
    curves = _load_curves(a.out)
    sel = _select_runs(a, curves)
    builds = sorted({_build_key(c) for c in sel}, key=lambda b: (b[2] is None, b[2] or 0.0, str(b)))
    if a.data is not None:
        sel = [c for c in sel if c.get("behaviour_normalized") is not None
               and round(c["behaviour_normalized"], 1) == round(a.data, 1)]
        if not sel:
            raise SystemExit(f"--data {a.data:g}: the runs of {a.label!r} on {a.dataset} are on builds with data "
                             f"scores {[b[2] for b in builds]}")
    elif len(builds) > 1:
        raise SystemExit(f"the runs of {a.label!r} on {a.dataset} are on {len(builds)} builds of it (data scores "
                         f"{[b[2] for b in builds]}): pick one with --data (scores of two builds are not averaged)")
    sel = sorted(sel, key=lambda c: c["seed"])
    data = sel[0].get("behaviour_normalized")
    by_step = [{p["step"]: p for p in c["points"] if p["normalized"] is not None} for c in sel]
    steps = sorted(set.intersection(*(set(d) for d in by_step)))
    if not steps:
        raise SystemExit(f"the runs of {a.label!r} on {a.dataset} share no evaluated step")
    rows = []
    for st in steps:
        ps = [d[st] for d in by_step]
        v = np.array([p["normalized"] for p in ps], dtype=np.float64)
        se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
        rows.append(dict(step=st, tag=ps[0]["tag"], cpu_s=float(np.mean([p["cpu_s"] for p in ps])),
                         mean=float(v.mean()), se=float(se), each=v.tolist(),
                         episodes=sum(int(p.get("episodes") or 0) for p in ps)))
    head = f"{a.label} on {a.dataset}" + ("" if data is None else f" (data {data:.1f}, target {data + 20:.1f})")
    lines = [head + f": seeds {', '.join(str(c['seed']) for c in sel)}", "",
             "| step | point | train CPU-s (mean) | score, mean ± s.e. over seeds | each seed | gain over the data | "
             "episodes |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        g = "-" if data is None else f"{r['mean'] - data:+.1f}"
        lines.append(f"| {r['step']} | {r['tag']} | {r['cpu_s']:.0f} | {r['mean']:.1f} ± {r['se']:.1f} | "
                     f"{' / '.join(f'{x:.1f}' for x in r['each'])} | {g} | {r['episodes']} |")
    print("\n".join(lines))
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        for c, d in zip(sel, by_step):
            pts = [d[k] for k in sorted(d)]
            ax.plot([p["cpu_s"] for p in pts], [p["normalized"] for p in pts], color="tab:orange", alpha=0.3,
                    lw=0.8, marker=".", label="each seed" if c is sel[0] else None)
        ax.errorbar([r["cpu_s"] for r in rows], [r["mean"] for r in rows], yerr=[r["se"] for r in rows],
                    color="tab:orange", lw=1.8, marker="o", capsize=3, label=f"mean ± s.e. over {len(sel)} seeds")
        beh = [r for r in rows if r["tag"] == "behaviour"]
        if beh:
            ax.plot([r["cpu_s"] for r in beh], [r["mean"] for r in beh], "k*", markersize=11,
                    label="behaviour model (end of stage 1)")
        if data is not None:
            ax.axhline(data, color="gray", ls="--", label="behaviour (data)")
            ax.axhline(data + 20, color="gray", ls=":", label="behaviour + 20 (target)")
            lo, hi = ax.get_ylim()
            ax.set_ylim(min(lo, data - 3), max(hi, data + 23))   # both lines inside, clear of the frame
        ax.set_title(textwrap.fill(head, 90), fontsize=8)
        ax.set_xlabel("train CPU seconds (one thread)")
        ax.set_ylabel("normalised score")
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        _save_figure(fig, a.plot)
        print(f"wrote {a.plot}")


def gain(a):
    """The final score minus each run's own data score, for the runs of one configuration (``--label``, as the
    report's first column without a budget) on one dataset id, pooled over the builds of that id (a dataset
    rebuilt on another machine has a slightly different data score, _name_builds): one line per run, then the
    mean gain ± s.e. over all final episodes, [s.e. of the runs' gains]."""
    curves = _load_curves(a.out)
    sel = _select_runs(a, curves)
    missing = [c["seed"] for c in sel if c.get("behaviour_normalized") is None]
    if missing:
        raise SystemExit(f"the runs of seeds {missing} have no data score (their dataset has no reference scores "
                         f"or episode returns): no gain over the data to compute")
    named = {id(c): n["dataset"] for c, n in zip(curves, _name_builds(curves))}
    lines = [f"{a.label} on {a.dataset}: final score minus the run's own data score", "",
             "| seed | dataset build | data | final | gain |", "|---|---|---|---|---|"]
    eps, gains = [], []
    for c in sorted(sel, key=lambda c: (named[id(c)], c["seed"])):
        g = _norm_eps(c, c["final"]) - c["behaviour_normalized"]
        eps.append(g)
        gains.append(float(g.mean()))
        lines.append(f"| {c['seed']} | {named[id(c)]} | {c['behaviour_normalized']:.1f} | "
                     f"{c['final']['normalized']:.1f} | {gains[-1]:+.1f} |")
    e = np.concatenate(eps)
    se = e.std(ddof=1) / np.sqrt(len(e)) if len(e) > 1 else float("nan")
    seed_se = f" [{np.std(gains, ddof=1) / np.sqrt(len(gains)):.1f}]" if len(gains) > 1 else ""
    lines += ["", f"{len(sel)} run{'s' * (len(sel) != 1)}, {len(e)} final episodes: gain {e.mean():+.1f} ± {se:.1f}{seed_se}"]
    print("\n".join(lines))


def plot_curves(plt, curves, path, budget_tag):
    """Score against train CPU seconds, one panel per dataset (one below the other). One colour per configuration
    (algorithm, preset, --set values, budget), one marker per seed; the legend (outside the panel) lists
    the configurations with their seed counts. Black stars: QIPO's behaviour model (end of stage 1)."""
    datasets = sorted({c["dataset"] for c in curves})
    fig, axes = plt.subplots(len(datasets), 1, figsize=(9, 4.2 * len(datasets)), squeeze=False)
    markers = "osD^vP*Xh"
    for ax, dataset in zip(axes.flat, datasets):
        configs = {}
        for c in curves:
            if c["dataset"] == dataset:
                key = _label(c) + budget_tag(_label(c), dataset, float(c["budget_s"]))
                configs.setdefault(key, []).append(c)
        for i, (key, cs) in enumerate(configs.items()):
            colour = plt.get_cmap("tab10" if len(configs) <= 10 else "tab20")(i % 20)
            seeds = sorted({c["seed"] for c in cs})
            for j, c in enumerate(sorted(cs, key=lambda c: c["seed"])):
                pts = [p for p in c["points"] if p["normalized"] is not None]
                ax.errorbar([p["cpu_s"] for p in pts], [p["normalized"] for p in pts],
                            yerr=[p["normalized_se"] or 0 for p in pts], color=colour, alpha=0.85, lw=1.2,
                            marker=markers[seeds.index(c["seed"]) % len(markers)], markersize=4, capsize=2,
                            label=textwrap.fill(f"{key} (seeds {', '.join(str(s) for s in seeds)})", 70,
                                                subsequent_indent="    ") if j == 0 else None)
                beh = [p for p in pts if p["tag"] == "behaviour"]
                if beh:
                    ax.plot([p["cpu_s"] for p in beh], [p["normalized"] for p in beh], "k*", markersize=10)
        b = [c["behaviour_normalized"] for c in curves if c["dataset"] == dataset][0]
        ax.axhline(b, color="gray", ls="--", label="behaviour (data)")
        ax.axhline(b + 20, color="gray", ls=":", label="behaviour + 20 (target)")
        ax.set_title(dataset)
        ax.set_xlabel("train CPU seconds (one thread)")
        ax.set_ylabel("normalised score")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                  title="marker = seed; black star = QIPO behaviour model", title_fontsize=7)
    # long configuration names are wrapped (70 characters) so that tight_layout fits the outside legends
    # and keeps each panel's title clear of the x label above it
    fig.tight_layout()
    _save_figure(fig, path)


def _save_figure(fig, path):
    """Write a report figure to path.tmp.png, then rename it into place (never a half-written plot);
    bbox "tight" keeps the legends and labels outside the panels."""
    fig.savefig(path + ".tmp.png", dpi=90, bbox_inches="tight")
    os.replace(path + ".tmp.png", path)


def _behaviour_points(points):
    """The evaluations tagged "behaviour" (QIPO's behaviour model at the end of stage 1, one per run) that
    have a score; never a training evaluation."""
    return [p for p in points if p["tag"] == "behaviour" and p["normalized"] is not None]


def _behaviour_cell(points) -> str:
    """The "QIPO behaviour model" cell: the mean score of the evaluations tagged "behaviour" (the one
    at the end of QIPO's stage 1, one per run), "-" when there is none (CPQL, or a QIPO run stopped
    before stage 1 ended): a training evaluation is never shown as the behaviour model."""
    beh = _behaviour_points(points)
    if not beh:
        return "-"
    return f"{np.mean([p['normalized'] for p in beh]):.1f} (at {beh[0]['cpu_s']:.0f} CPU-s)"


def _best(c) -> float:
    """The best evaluation on a run's curve (every tag: behaviour, train, final)."""
    return max(p["normalized"] for p in c["points"] if p["normalized"] is not None)


def _partial_row(algo, dataset, c) -> str:
    """The row of a run stopped before its final evaluation: its steps and CPU seconds up to its last
    evaluation, the behaviour model only from the end of stage 1, the best evaluation so far."""
    p = c["points"][-1]
    best = [q["normalized"] for q in c["points"] if q["normalized"] is not None]
    return (f"| {algo} | {dataset} | {c['behaviour_normalized']:.1f} | 1 | {p['step']} | {p['cpu_s']:.0f} | "
            f"{_behaviour_cell(c['points'])} | not reached: the run was stopped before its next evaluation | - | "
            f"{f'{max(best):.1f} (so far)' if best else '-'} |")


def _label(c):
    """The algorithm and, for QIPO, its preset (older curves: parsed from the command, default cpu-quick)."""
    if c["algo"] != "qipo":
        return " ".join([c["algo"]] + [f"--set {kv}" for kv in c.get("set", [])])
    preset = c.get("preset")
    if preset is None:
        words = c.get("command", "").split()
        preset = words[words.index("--preset") + 1] if "--preset" in words[:-1] else "cpu-quick"
    return " ".join([f"qipo {preset}"] + [f"--set {kv}" for kv in c.get("set", [])]
                    + (["--stage1-only"] if c.get("stage1_only") else []))


def _norm_eps(c, final):
    """Per-episode normalised scores of a final evaluation."""
    lo, hi = c["ref"]
    return 100 * (np.asarray(final["per_episode"], dtype=np.float64) - lo) / (hi - lo)


def _parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--algo", choices=list(ALGORITHMS), required=True,
                   help="td3bc: the TD3+BC peer baseline (bench/peer_td3bc.py), the paper's defaults")
    r.add_argument("--dataset", required=True)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--budget-s", type=float, default=1800.0, help="train CPU seconds")
    r.add_argument("--wall-limit-s", type=float, default=None, help="also stop after this many wall seconds")
    r.add_argument("--eval-every", type=int, default=1000,
                   help="evaluate with --episodes episodes at every global step that is a multiple of this; QIPO "
                        "only inside stage 3, as the official code (its behaviour model once, at the end of stage "
                        "1): cpu-30min's stage 3 is steps 16,000-18,000, so 2000 gives no point there besides the "
                        "final, 500 three")
    r.add_argument("--episodes", type=int, default=5, help="episodes of each evaluation during training")
    r.add_argument("--final-episodes", type=int, default=30,
                   help="episodes of the final evaluation and of QIPO's behaviour-model evaluation (Walker2d: "
                        "5 episodes gave s.e. up to 14 points, bench/results/qipo_stage3_diagnosis.md)")
    r.add_argument("--preset", default="cpu-quick", help="QIPO preset (QIPO_PRESETS)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a QIPOConfig (after the preset), CPQLConfig (after the task defaults) or TD3BCConfig override; "
                        "a diagnostic run, named and grouped apart")
    r.add_argument("--stage1-only", action="store_true",
                   help="QIPO: stop after stage 1 and its behaviour-model evaluation (the run's final score is that "
                        "model's; folder <...>-stage1-<env>-...)")
    r.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tts"))
    r.add_argument("--resume", action="store_true",
                   help="continue the finished run of these arguments in --out from its checkpoint to a larger "
                        "--budget-s; its final evaluation stays on the curve as a \"budget_end\" point")
    r.add_argument("--resume-from", metavar="RUN_DIR", default=None,
                   help="continue the finished run in RUN_DIR (its curve.json and run/) into the folder of these "
                        "arguments, which may differ from its own only in what a resumed run may change: the "
                        "last stage's length (QIPO --set policy_steps=N, CPQL/TD3+BC steps), learning rates, "
                        "evaluation settings; RUN_DIR is copied, not changed, and its points stay on the new curve")
    r.set_defaults(fn=run)
    p = sub.add_parser("report")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tts"))
    p.set_defaults(fn=report)
    def runs_of_one_configuration(q):   # gain's and seeds' selection (_select_runs)
        q.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tts"))
        q.add_argument("--dataset", required=True, help="the dataset id (every build of it)")
        q.add_argument("--label", required=True, help='the configuration, as the report\'s first column without its '
                                                       'budget, e.g. "cpql --set lr=0.001"')
        q.add_argument("--budget-s", type=float, default=None,
                       help="where the configuration's runs have several budgets")
        return q

    g = runs_of_one_configuration(sub.add_parser(
        "gain", help="final score minus each run's data score, pooled over builds of one dataset"))
    g.set_defaults(fn=gain)
    m = runs_of_one_configuration(sub.add_parser(
        "seeds", help="one configuration's curve averaged over its seeds (table, optional plot)"))
    m.add_argument("--data", type=float, default=None,
                   help="the build's data score (1 decimal) where the runs are on several builds of the dataset")
    m.add_argument("--plot", default=None, metavar="PATH.png", help="also draw it, against train CPU seconds")
    m.set_defaults(fn=seeds)
    k = sub.add_parser("collect", help="copy finished runs into a results folder, never overwriting one")
    k.add_argument("--from", dest="src", required=True, help="a run --out folder")
    k.add_argument("--to", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tts"))
    k.set_defaults(fn=collect)
    e = sub.add_parser("reeval", help="a finished run's final evaluation again, with more episodes")
    e.add_argument("--curve", required=True, help="the run's curve.json (rewritten in place, atomically)")
    e.add_argument("--ckpt", required=True, help="the run's checkpoint.pt (its run/ folder's)")
    e.add_argument("--episodes", type=int, default=30)
    e.set_defaults(fn=reeval)
    return ap


def _reeval_lines(c):
    """The curve's reeval commands with --ckpt where its run command puts the checkpoint today
    (<--out>/<run_name>/run/checkpoint.pt): runs made before a folder-naming change recorded the old folder,
    and a reader repeating the run command gets the new one. Commands that do not parse are shown as recorded."""
    if not c.get("reeval_commands"):
        return []
    try:
        a = _parser().parse_args(shlex.split(c["command"])[1:])
        ckpt = os.path.join(a.out, run_name(a.algo, a.preset, a.set, a.dataset, a.seed, a.stage1_only),
                            "run", "checkpoint.pt")
    except (SystemExit, ValueError, KeyError, IndexError, AttributeError):
        return list(c["reeval_commands"])
    return [re.sub(r"--ckpt \S+", lambda _: f"--ckpt {ckpt}", x) for x in c["reeval_commands"]]


def main(argv=None):
    a = _parser().parse_args(argv)
    # the command as a reader would type it (called from Python: this script's path and the arguments given)
    a.command = " ".join(sys.argv if argv is None else ["bench/time_to_score.py", *argv])
    a.fn(a)


if __name__ == "__main__":
    main()
