"""Speed-accuracy study on a real offline task: trained policies, their critics, environment return.

    python -m bench.speed_accuracy_env             # training (~70 s on 2 idle cores, as the demo) + ~1 min
    python -m bench.speed_accuracy_env --quick     # fewer solvers / steps / episodes (smoke run)
    python -m bench.speed_accuracy_env --replot bench/results/<device>/speed_accuracy_env/results.json

Where bench/speed_accuracy.py answers "which solver, how many steps" on a synthetic task against a
converged reference, this study asks the question that matters for RL: does a better ODE solution
give a better policy? It trains, on the embedded offline dataset (qipo_kernels.data, Pendulum-v1,
the demo's task), QIPO (path "ot", qipo_kernels.demo.DEMO_QIPO) and CPQL (DEMO_CPQL) with the
package's trainers (qipo_kernels.demo.train_demo; finished runs under --runs are reused, interrupted
ones resume). Then, for the trained QIPO flow policy (the EMA network, as QIPO evaluates) with each
velocity solver (euler, midpoint, heun, rk4) and 1, 2, 4, 8, 16 steps, and for the trained CPQL
consistency policy with 1, 2 and 3 steps (sigmas None, [1.0], [1.0, 0.3]: one step from sigma_max,
then re-noise to each listed sigma and denoise again, CPQL's AntMaze multistep rule; the same levels
as bench/speed_accuracy.py):

  ms        time per sampling call, 64 states x 1 action (median; backend "torch" and "auto", the
            latter naming the backend it chose), and of ``act`` with 50 candidates (backend "auto");
  q_qipo    mean over --states dataset states of the QIPO critic's min(Q1, Q2) of one sampled action
            per state; q_cpql the same under CPQL's target critic (the one its evaluation uses): both
            policies are thus compared under both critics;
  dist      mean ||a - a_ref|| to the rk4 solution with 64 steps from the same noise (flow only);
  return    environment return (qipo_kernels.evaluation.evaluate, --episodes episodes (20) on --eval-seeds,
            the same initial states for every configuration), one action per state (no selection);
  return_sel  the same with candidate selection: QIPO argmax of its critic's min Q over 50 candidates,
            CPQL softmax of its target critic's min Q over 50 (CPQL's own evaluation).

Every sampling draw uses a generator seeded from --seed, so the whole table is reproducible. The
behaviour policy's return (the dataset's mean episode return) and the critics' value of the dataset
actions are recorded for reference.

Outputs in bench/results/<device>/speed_accuracy_env/: results.json, speed_accuracy_env.md,
return_vs_steps.png, return_vs_time.png (Pareto front), critic_vs_steps.png.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch

from qipo_kernels.reference.ode import VELOCITY_SOLVERS

from ._common import atomic_savefig, cpu_model, device_name, place_labels, replot, results_dir, save_study, today
from .speed_accuracy import CM_SIGMAS

STEPS = (1, 2, 4, 8, 16)
QUICK_STEPS = (1, 2, 4)
SOLVERS = tuple(VELOCITY_SOLVERS)  # euler, midpoint, heun, rk4
REF_STEPS = 64
COLORS = {"euler": "C0", "midpoint": "C1", "heun": "C2", "rk4": "C3", "consistency": "k"}


# ----------------------------------------------------------------------------- data and training
@contextlib.contextmanager
def minari_root(runs_dir: str) -> Iterator[str]:
    """$MINARI_DATASETS_PATH when the user set it, else a private one under ``runs_dir`` (set for the
    duration of the block)."""
    old = os.environ.get("MINARI_DATASETS_PATH")
    if old:
        yield old
        return
    root = os.path.abspath(os.path.join(runs_dir, "minari"))
    os.environ["MINARI_DATASETS_PATH"] = root
    try:
        yield root
    finally:
        del os.environ["MINARI_DATASETS_PATH"]


def train(runs_dir: str, seed: int = 0, quick: bool = False, overrides: Optional[Dict[str, Dict[str, Any]]] = None,
          verbose: bool = True):
    """Make / load the embedded dataset and train (or reuse) the demo's QIPO and CPQL in ``runs_dir``.

    Returns (dataset, behaviour summary, training results, trainers) (see qipo_kernels.demo.train_demo).
    """
    from qipo_kernels import data
    from qipo_kernels.demo import _behaviour, train_demo

    with minari_root(runs_dir):
        data.make_local_dataset(data.DEMO_DATASET_ID)
        ds = data.load_minari(data.DEMO_DATASET_ID)
    results, trainers = train_demo(ds, runs_dir, seed=seed, quick=quick, progress_bar=False, verbose=verbose,
                                   overrides=overrides)
    return ds, _behaviour(ds), results, trainers


# ----------------------------------------------------------------------------- measurements
def median_time(fn: Callable[[], Any], budget: float = 0.2, max_reps: int = 50) -> float:
    """Median seconds per call: one warm-up call, then repeats until ``budget`` seconds (at least 3)."""
    fn()
    ts: List[float] = []
    start = time.perf_counter()
    while len(ts) < max_reps and (time.perf_counter() - start < budget or len(ts) < 3):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _eval(policy_fn, ds, episodes: int, seeds: Sequence[int]) -> Dict[str, Any]:
    from qipo_kernels.evaluation import evaluate

    ev = evaluate(policy_fn, dataset=ds, num_episodes=episodes, seeds=tuple(seeds))
    return {"mean": ev["mean"], "std": ev["std"], "normalized_mean": ev["normalized_mean"], "returns": ev["returns"]}


def measure(sample: Callable[..., torch.Tensor], act: Callable[..., torch.Tensor], critics: Dict[str, Any],
            obs: torch.Tensor, noise: torch.Tensor, ds, episodes: int, eval_seeds: Sequence[int], seed: int,
            time_budget: float, candidates: int, ref: Optional[torch.Tensor] = None,
            with_selection: bool = True) -> Dict[str, Any]:
    """All measurements of one sampler configuration.

    sample(obs [B, S], noise [B, 1, A] or None, generator, backend) -> actions [B, A];
    act(obs [B, S], generator) -> [B, A] (candidate selection). obs [N, S]: dataset states for the
    critic values; noise [N, 1, A]: their initial noise; ref [N, A]: reference actions (optional).
    """
    r: Dict[str, Any] = {}
    with torch.no_grad():
        a = sample(obs, noise, _gen(seed + 1), "auto")
        for name, critic in critics.items():
            r[f"q_{name}"] = float(critic.q_min(obs, a).mean())
        if ref is not None:
            r["dist"] = float((a.double() - ref.double()).norm(dim=-1).mean())
        ob64 = obs[:64]
        for b in ("torch", "auto"):
            g = _gen(seed + 2)
            r[f"ms_{b}"] = 1e3 * median_time(lambda: sample(ob64, None, g, b), time_budget)
        r["ms_act"] = 1e3 * median_time(lambda: act(ob64, _gen(seed + 3)), time_budget)

    g_eval = _gen(seed + 4)
    r["return"] = _eval(lambda o: sample(o, None, g_eval, "auto"), ds, episodes, eval_seeds)
    if with_selection:
        g_sel = _gen(seed + 5)
        r["return_sel"] = _eval(lambda o: act(o, g_sel), ds, episodes, eval_seeds)
    return r


def run_study(runs_dir: str = os.path.join("runs", "speed_accuracy_env"), quick: bool = False, seed: int = 0,
              episodes: Optional[int] = None, eval_seeds: Sequence[int] = (0,), n_states: int = 1024,
              candidates: int = 50, steps: Optional[Sequence[int]] = None, solvers: Optional[Sequence[str]] = None,
              with_selection: bool = True, time_budget: Optional[float] = None,
              overrides: Optional[Dict[str, Dict[str, Any]]] = None, verbose: bool = True) -> Dict[str, Any]:
    """Train (or reuse) QIPO and CPQL on the embedded task and measure every sampler configuration.

    Returns a JSON-able dict: {"meta", "behaviour", "training", "reference": {q of dataset actions},
    "flow": {solver: [row per step count]}, "consistency": [row per step count]}; each row holds
    steps, nfe, ms_torch, ms_auto, backend_auto, ms_act, q_qipo, q_cpql, (dist), return, (return_sel)
    (see the module docstring).
    """
    say = print if verbose else (lambda *a, **k: None)
    t_start = time.perf_counter()
    steps = tuple(steps or (QUICK_STEPS if quick else STEPS))
    solvers = tuple(solvers or (("euler", "rk4") if quick else SOLVERS))
    episodes = int(episodes or (2 if quick else 20))
    time_budget = float(time_budget if time_budget is not None else (0.05 if quick else 0.2))
    from qipo_kernels import backends as B
    from qipo_kernels.reference.ode import STAGES

    ds, beh, training, trainers = train(runs_dir, seed=seed, quick=quick, overrides=overrides, verbose=verbose)
    t_train = time.perf_counter() - t_start
    qipo, cpql = trainers["qipo"], trainers["cpql"]
    flow, cons = qipo.ema, cpql.actor
    critics = {"qipo": qipo.critic, "cpql": cpql.critic_target}
    g = _gen(seed)
    idx = torch.randperm(len(ds), generator=g)[:n_states]
    obs = ds.obs[idx].float()
    noise = torch.randn(obs.shape[0], 1, ds.act_dim, generator=g)
    with torch.no_grad():
        reference = {f"q_{k}_dataset_actions": float(c.q_min(obs, ds.actions[idx].float()).mean())
                     for k, c in critics.items()}
        a_ref = flow.sample(obs, 1, steps=REF_STEPS, solver="rk4", noise=noise, backend="torch")[:, 0]

    def auto_backend(op: str, **kw) -> str:
        with torch.no_grad():  # as the timed calls (the fused samplers are inference-only)
            return B.choose(op, "auto", obs.device, None, **kw)[0]

    res: Dict[str, Any] = {
        "meta": {"device": device_name(torch.device("cpu")), "cpu": cpu_model(), "date": today(),
                 "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
                 "quick": quick, "seed": seed, "episodes": episodes, "eval_seeds": list(eval_seeds),
                 "n_states": int(obs.shape[0]), "candidates": candidates, "steps": list(steps),
                 "solvers": list(solvers), "cm_sigmas": {str(k): v for k, v in CM_SIGMAS.items()},
                 "ref": f"rk4 x {REF_STEPS} (float32)", "dataset": ds.dataset_id, "env": ds.env_id,
                 "runs_dir": os.path.abspath(runs_dir), "train_wall_s": t_train},
        "behaviour": beh,
        "training": {k: {kk: v[kk] for kk in ("final_eval", "train_time_s", "steps", "config")}
                     for k, v in training.items()},
        "reference": reference, "flow": {}, "consistency": [],
    }
    common = dict(critics=critics, obs=obs, noise=noise, ds=ds, episodes=episodes, eval_seeds=eval_seeds,
                  time_budget=time_budget, candidates=candidates, with_selection=with_selection)
    for solver in solvers:
        rows = []
        for n in steps:
            t = time.perf_counter()

            def sample(o, z, gen, backend, _n=n, _s=solver):
                return flow.sample(o, 1, steps=_n, solver=_s, noise=z, generator=gen, backend=backend)[:, 0]

            def act(o, gen, _n=n, _s=solver):
                return flow.act(o, qipo.critic, num_candidates=candidates, select="argmax", steps=_n, solver=_s,
                                generator=gen)

            r = measure(sample, act, ref=a_ref, seed=seed + 1000 * n, **common)
            r.update(steps=n, nfe=n * STAGES[solver],
                     backend_auto=auto_backend("integrate", net=flow.net, x0=noise[:64], obs=obs[:64], steps=n,
                                               solver=solver, path=None, return_trajectory=False))
            rows.append(r)
            say(f"flow {solver:>8s} x{n:<3d} return {r['return']['mean']:8.1f}"
                + (f" (sel {r['return_sel']['mean']:8.1f})" if with_selection else "")
                + f"  q_qipo {r['q_qipo']:7.2f}  dist {r['dist']:.3f}  {r['ms_auto']:.2f} ms"
                f" ({time.perf_counter() - t:.1f} s)")
        res["flow"][solver] = rows
    for n, sigmas in sorted(CM_SIGMAS.items()):
        t = time.perf_counter()

        def sample(o, z, gen, backend, _sg=sigmas):
            return cons.sample(o, 1, sigmas=_sg, noise=z, generator=gen, backend=backend)[:, 0]

        def act(o, gen, _sg=sigmas):
            return cons.act(o, critics["cpql"], num_candidates=candidates, select="softmax", sigmas=_sg, generator=gen)

        r = measure(sample, act, seed=seed + 1000 * n + 7, **common)
        r.update(steps=n, nfe=n, sigmas=sigmas,
                 backend_auto=auto_backend("consistency_sample", net=cons.net, noise=noise[:64], obs=obs[:64],
                                           sigmas=sigmas, step_noise=None, clip=True))
        res["consistency"].append(r)
        say(f"consistency x{n} {str(sigmas):>11s} return {r['return']['mean']:8.1f}"
            + (f" (sel {r['return_sel']['mean']:8.1f})" if with_selection else "")
            + f"  q_qipo {r['q_qipo']:7.2f}  q_cpql {r['q_cpql']:7.2f}  {r['ms_auto']:.2f} ms"
            f" ({time.perf_counter() - t:.1f} s)")
    res["meta"]["wall_s"] = time.perf_counter() - t_start
    return res


# ----------------------------------------------------------------------------- report
def markdown(res: Dict[str, Any]) -> str:
    m = res["meta"]
    sel = any("return_sel" in r for rows in res["flow"].values() for r in rows)
    beh = res["behaviour"]
    tr = res["training"]
    L = [f"# Speed-accuracy on {m['env']} ({m['dataset']}): {m['device']}, {m['date']}", "",
         f"torch {m['torch']}, {m['threads']} threads; {m['episodes']} episodes on seeds {m['eval_seeds']} "
         f"(the same initial states for every row); critic values over {m['n_states']} dataset states; "
         f"time: 64 states x 1 action per call, `act` with {m['candidates']} candidates; dist: to {m['ref']}."
         + (" QUICK run." if m["quick"] else ""), "",
         f"Behaviour policy (dataset) return {beh['mean']:.1f} ± {beh['std']:.0f}. Trained: QIPO "
         f"{tr['qipo']['steps']} steps (its own evaluation {tr['qipo']['final_eval']['mean']:.1f}), CPQL "
         f"{tr['cpql']['steps']} steps ({tr['cpql']['final_eval']['mean']:.1f}). Critic value of the dataset "
         f"actions: QIPO critic {res['reference']['q_qipo_dataset_actions']:.2f}, CPQL critic "
         f"{res['reference']['q_cpql_dataset_actions']:.2f}.", "",
         "| sampler | steps | NFE | ms torch | ms auto | ms act | Q (QIPO critic) | Q (CPQL critic) | dist to ref "
         "| return | " + ("return with selection |" if sel else ""),
         "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if sel else "")]

    def row(name, r):
        ret = r["return"]
        s = (f"| {name} | {r['steps']} | {r['nfe']} | {r['ms_torch']:.2f} | {r['ms_auto']:.2f} ({r['backend_auto']}) "
             f"| {r['ms_act']:.2f} | {r['q_qipo']:.2f} | {r['q_cpql']:.2f} | "
             + (f"{r['dist']:.3f}" if "dist" in r else "-") + f" | {ret['mean']:.1f} ± {ret['std']:.0f} |")
        if sel:
            rs = r.get("return_sel")
            s += f" {rs['mean']:.1f} ± {rs['std']:.0f} |" if rs else " - |"
        return s

    for solver, rows in res["flow"].items():
        for r in rows:
            L.append(row(f"flow {solver}", r))
    for r in res["consistency"]:
        L.append(row(f"consistency {r['sigmas']}", r))
    L += ["", "![return vs steps](return_vs_steps.png)", "", "![return vs time](return_vs_time.png)", "",
          "![critic vs steps](critic_vs_steps.png)", ""]
    return "\n".join(L)


def plots(res: Dict[str, Any], out_dir: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    beh = res["behaviour"]["mean"]
    cons = res["consistency"]
    sel = any("return_sel" in r for rows in res["flow"].values() for r in rows)
    keys = [("return", "one action per state")] + ([("return_sel", "best of candidates")] if sel else [])

    # 1. return vs steps
    fig, axes = plt.subplots(1, len(keys), figsize=(6.2 * len(keys), 4.4), squeeze=False, sharey=True)
    for ax, (key, title) in zip(axes[0], keys):
        for solver, rows in res["flow"].items():
            x = [r["steps"] for r in rows]
            y = [r[key]["mean"] for r in rows]
            e = [r[key]["std"] / max(len(r[key]["returns"]), 1) ** 0.5 for r in rows]
            ax.errorbar(x, y, yerr=e, marker="o", ms=4, capsize=2, color=COLORS.get(solver), label=f"flow {solver}")
        ax.errorbar([r["steps"] for r in cons], [r[key]["mean"] for r in cons],
                    yerr=[r[key]["std"] / max(len(r[key]["returns"]), 1) ** 0.5 for r in cons],
                    marker="s", ms=6, capsize=2, color=COLORS["consistency"], ls="--", label="consistency (CPQL)")
        ax.axhline(beh, color="0.5", ls=":", label="behaviour (dataset)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.set_title(f"return, {title}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"episode return (mean ± s.e., {res['meta']['episodes']} episodes)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Does a better ODE solution give a better policy? {res['meta']['env']}, {res['meta']['device']}",
                 fontsize=10)
    fig.tight_layout()
    p = os.path.join(out_dir, "return_vs_steps.png")
    atomic_savefig(fig, p)
    plt.close(fig)
    written.append(p)

    # 2. return vs time per call (Pareto)
    fig, ax = plt.subplots(figsize=(7.6, 5.2))
    pts, labels, label_colors = [], [], []
    for solver, rows in res["flow"].items():
        x = [r["ms_auto"] for r in rows]
        y = [r["return"]["mean"] for r in rows]
        line, = ax.plot(x, y, marker="o", ms=4, color=COLORS.get(solver), label=f"flow {solver}")
        labels += [str(r["steps"]) for r in rows]
        label_colors += [line.get_color()] * len(rows)
        pts += list(zip(x, y))
    x = [r["ms_auto"] for r in cons]
    y = [r["return"]["mean"] for r in cons]
    ax.plot(x, y, marker="s", ms=6, color=COLORS["consistency"], ls="--", label="consistency (CPQL)")
    labels += [str(r["steps"]) for r in cons]
    label_colors += [COLORS["consistency"]] * len(cons)
    pts += list(zip(x, y))
    front, best = [], -float("inf")
    for t, v in sorted(pts):
        if v > best:
            front.append((t, v))
            best = v
    ax.step([f[0] for f in front], [f[1] for f in front], where="post", color="0.3", lw=3, alpha=0.25,
            label="Pareto front")
    ax.axhline(beh, color="0.5", ls=":", label="behaviour (dataset)")
    ax.set_xscale("log")
    ax.set_xlabel("ms per sampling call (64 states x 1 action, backend auto)")
    ax.set_ylabel("episode return (one action per state)")
    ax.set_title("return vs cost (labels: sampling steps, in the colour of their line)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    place_labels(ax, pts, labels, colors=label_colors, fontsize=7)
    p = os.path.join(out_dir, "return_vs_time.png")
    atomic_savefig(fig, p)
    plt.close(fig)
    written.append(p)

    # 3. critic value vs steps, under each critic
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), squeeze=False)
    for ax, crit in zip(axes[0], ("qipo", "cpql")):
        for solver, rows in res["flow"].items():
            ax.plot([r["steps"] for r in rows], [r[f"q_{crit}"] for r in rows], marker="o", ms=4,
                    color=COLORS.get(solver), label=f"flow {solver}")
        ax.plot([r["steps"] for r in cons], [r[f"q_{crit}"] for r in cons], marker="s", ms=6,
                color=COLORS["consistency"], ls="--", label="consistency (CPQL)")
        ax.axhline(res["reference"][f"q_{crit}_dataset_actions"], color="0.5", ls=":", label="dataset actions")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.set_ylabel("mean min(Q1, Q2) of the sampled actions")
        ax.set_title(f"under the {crit.upper()} critic" + (" (target)" if crit == "cpql" else ""), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    p = os.path.join(out_dir, "critic_vs_steps.png")
    atomic_savefig(fig, p)
    plt.close(fig)
    written.append(p)
    return written


def save(res: Dict[str, Any], out_dir: str, make_plots: bool = True) -> List[str]:
    """Write results.json, speed_accuracy_env.md and (make_plots) the PNGs to out_dir (atomic writes)."""
    return save_study(res, out_dir, "speed_accuracy_env.md", markdown, plots if make_plots else None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.speed_accuracy_env", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: demo's quick training, fewer solvers / steps")
    ap.add_argument("--runs", default=os.path.join("runs", "speed_accuracy_env"),
                    help="training run dirs (<runs>/qipo, <runs>/cpql; finished runs are reused)")
    ap.add_argument("--episodes", type=int, default=None, help="episodes per evaluation (default 20, quick 2)")
    ap.add_argument("--eval-seeds", default="0", help="evaluation seeds, comma-separated")
    ap.add_argument("--states", type=int, default=1024, help="dataset states for the critic values")
    ap.add_argument("--candidates", type=int, default=50, help="candidates of the selection variant / act timing")
    ap.add_argument("--no-selection", action="store_true", help="skip the returns with candidate selection")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default=None, help="output dir (default bench/results/<device>/speed_accuracy_env)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replot", metavar="RESULTS_JSON", default=None,
                    help="only redraw the plots and the Markdown from a saved results.json")
    a = ap.parse_args(argv)
    if a.replot:
        return replot(a.replot, a.out, save)
    if a.threads:
        torch.set_num_threads(a.threads)
    res = run_study(runs_dir=a.runs, quick=a.quick, seed=a.seed, episodes=a.episodes,
                    eval_seeds=[int(s) for s in a.eval_seeds.split(",") if s], n_states=a.states,
                    candidates=a.candidates, with_selection=not a.no_selection)
    out = a.out or os.path.join(results_dir(torch.device("cpu")), "speed_accuracy_env")
    for p in save(res, out):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
