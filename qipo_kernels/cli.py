"""Command line: ``qipo-kernels train|eval|demo|bench|backends`` (also ``python -m qipo_kernels``).

    qipo-kernels demo [--out runs/demo]                 embedded dataset, QIPO + CPQL, scores, backend speeds
    qipo-kernels train qipo --dataset ID [--out DIR] [--set key=value ...]
    qipo-kernels train cpql --dataset mujoco/halfcheetah/medium-v0 --task halfcheetah-medium
    qipo-kernels train cpql-online --set env_id=Pendulum-v1 --set steps=20000
    qipo-kernels eval DIR_OR_CHECKPOINT [--episodes 10] [--seeds 0,1,2]
    qipo-kernels make-dataset --env HalfCheetah-v5 --agent sac.zip --id qipo/halfcheetah/noisy-v0 [--noise 0.1]
    qipo-kernels bench [NAME ...]                        runs the scripts under bench/ (lists them without NAME)
    qipo-kernels backends                               which backends run here, and why the others don't

Training resumes from ``<out>/checkpoint.pt`` when it exists (``--fresh`` starts over) and writes CSV
logs, atomic checkpoints and ``<out>/summary.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import shutil
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch


def _parse_sets(cfg_cls, sets: Sequence[str], base: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """--set key=value pairs, each value parsed to the type of the field's default."""
    from .algos.common import parse_value

    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else None) for f in dataclasses.fields(cfg_cls)}
    out: Dict[str, Any] = dict(base or {})
    for s in sets or ():
        if "=" not in s:
            raise SystemExit(f"--set expects key=value, got {s!r}")
        k, v = s.split("=", 1)
        k = k.strip().replace("-", "_")
        if k not in defaults:
            raise SystemExit(f"unknown {cfg_cls.__name__} field {k!r}; known: {', '.join(sorted(defaults))}")
        like = out.get(k, defaults[k])
        try:
            out[k] = parse_value(v, like)
        except ValueError as e:
            raise SystemExit(f"--set {k}: {e}") from None
    return out


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available here")
    return name


def _load_dataset(dataset_id: str, device: str, reward_scale="auto", normalize_obs=True, make_local=False):
    from . import data

    if make_local or dataset_id == data.DEMO_DATASET_ID:
        data.make_local_dataset(dataset_id)
    try:
        return data.load_minari(dataset_id, device=device, reward_scale=reward_scale, normalize_obs=normalize_obs)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None


def build_trainer(algo: str, cfg_dict: Dict[str, Any], out_dir: str, device: str, dataset=None, progress_bar=True,
                  callback=None):
    """Make the trainer of ``algo`` ("qipo" | "cpql" | "cpql-online") from a config dict."""
    from .algos import ALGOS
    from .algos.common import config_from_dict

    if algo not in ALGOS:
        raise ValueError(f"algo must be one of {sorted(ALGOS)}, got {algo!r}")
    cls, cfg_cls = ALGOS[algo]
    cfg = config_from_dict(cfg_cls, cfg_dict)
    if algo == "cpql-online":
        return cls(cfg, out_dir=out_dir, device=device, progress_bar=progress_bar, callback=callback)
    if dataset is None:
        raise ValueError(f"algo {algo!r} needs a dataset")
    return cls(dataset, cfg, out_dir=out_dir, device=device, progress_bar=progress_bar, callback=callback)


def cmd_train(a) -> int:
    from .algos import ALGOS, cpql_config_for

    device = _device(a.device)
    cls, cfg_cls = ALGOS[a.algo]
    base: Dict[str, Any] = {}
    if a.task:
        if a.algo != "cpql":
            raise SystemExit("--task (per-task defaults) applies to cpql only")
        base = dataclasses.asdict(cpql_config_for(a.task))
    elif a.algo == "cpql" and a.dataset:
        from .algos.cpql import preset_message, task_key

        if task_key(a.dataset):
            base = dataclasses.asdict(cpql_config_for(a.dataset))
        print(preset_message(a.dataset))
    if a.seed is not None:
        base["seed"] = a.seed
    cfg_dict = _parse_sets(cfg_cls, a.set, base)
    out = a.out or os.path.join("runs", a.algo)
    if a.fresh and os.path.exists(out):
        shutil.rmtree(out)
    dataset = None
    if a.algo != "cpql-online":
        if not a.dataset:
            raise SystemExit(f"train {a.algo} needs --dataset ID (e.g. qipo/pendulum/mixed-v0, the embedded one)")
        probe = cfg_cls(**cfg_dict)
        dataset = _load_dataset(a.dataset, device, probe.reward_scale, probe.normalize_obs, a.make_local)
    tr = build_trainer(a.algo, cfg_dict, out, device, dataset, progress_bar=not a.no_progress)
    tr.dataset_id = a.dataset
    summary = tr.fit(resume=not a.fresh)
    _print_eval(a.algo, summary.get("final_eval"))
    print(f"summary: {os.path.join(out, 'summary.json')}")
    return 0


def load_checkpoint(path: str, device: str = "cpu", dataset=None):
    """Rebuild a trained agent from ``<dir>/checkpoint.pt`` (or a checkpoint file). Returns the trainer.

    The dataset (for QIPO / CPQL) is reloaded from the id stored in the checkpoint unless given.
    """
    p = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    if not os.path.exists(p):
        raise FileNotFoundError(f"no checkpoint at {p}")
    st = torch.load(p, map_location=device, weights_only=False)
    algo, cfg = st["algo"], st["config"]
    if dataset is None and algo != "cpql-online":
        did = st.get("dataset_id")
        if not did:
            raise ValueError(f"{p} does not name its dataset; pass dataset=")
        dataset = _load_dataset(did, device, cfg.get("reward_scale", "auto"), cfg.get("normalize_obs", True))
    tr = build_trainer(algo, cfg, os.path.dirname(p), device, dataset, progress_bar=False)
    tr.load_state_dict(st)
    return tr


def cmd_eval(a) -> int:
    device = _device(a.device)
    try:
        tr = load_checkpoint(a.checkpoint, device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else None
    res = tr.evaluate(num_episodes=a.episodes, seeds=seeds)
    _print_eval(tr.algo, res)
    if a.json:
        from .algos.common import atomic_write_json

        atomic_write_json(res, a.json)
    return 0


def _stderr(std: Optional[float], n: int) -> Optional[float]:
    """Standard error of a mean of n values from their population s.d. (ddof 0): s.d. / sqrt(n - 1)."""
    if std is None or n < 2:
        return None
    return float(std) / (n - 1) ** 0.5


def _print_eval(name: str, res: Optional[Dict[str, Any]]) -> None:
    """One line: mean ± standard error of the mean over the episodes (labelled "s.e."), and the s.d."""
    if not res:
        return
    n = int(res["episodes"])

    def pm(mean, std):
        se = _stderr(std, n)
        return f"{mean:.1f} ± {se:.1f} s.e." if se is not None else f"{mean:.1f} (s.e. n/a, 1 episode)"

    norm = res.get("normalized_mean")
    ns = f"  normalised {pm(norm, res.get('normalized_std') or 0.0)}" if norm is not None else ""
    print(f"{name:>12s}: return {pm(res['mean'], res['std'])} (s.d. {res['std']:.1f}) over {n} episodes{ns}")


def cmd_make_dataset(a) -> int:
    """Roll out an agent zip in a Gymnasium env and write a Minari dataset (qipo_kernels.data.rollout)."""
    from .data.rollout import make_rollout_dataset

    if a.root:
        os.environ["MINARI_DATASETS_PATH"] = a.root
    try:
        did = make_rollout_dataset(a.id, env_id=a.env, agent=a.agent, num_episodes=a.episodes, noise=a.noise,
                                   seed=a.seed, ref_episodes=a.ref_episodes, max_episode_steps=a.max_episode_steps,
                                   algo=a.algo, overwrite=a.overwrite, progress_bar=not a.no_progress)
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise SystemExit(str(e)) from None
    from .data.rollout import existing_params
    from .data.minari_io import dataset_dir

    meta = existing_params(did) or {}
    print(f"dataset {did} at {dataset_dir(did)}: ref_min_score {meta.get('ref_min_score')}, ref_max_score "
          f"{meta.get('ref_max_score')}, behaviour normalised score {meta.get('qipo_behaviour_normalized_score')}")
    return 0


def cmd_bench(a) -> int:
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    scripts = sorted(glob.glob(os.path.join(root, "*.py")))
    if not scripts:
        print("no bench/ folder next to the package (benchmarks live in the source checkout: bench/*.py);\n"
              "`qipo-kernels demo` prints sampling speed per backend on this machine.")
        return 0
    names = {os.path.splitext(os.path.basename(s))[0]: s for s in scripts}
    if not a.names:
        print("benchmarks (run with `qipo-kernels bench NAME [-- args]`):")
        for n in names:
            print(f"  {n}")
        return 0
    rc = 0
    for n in a.names:
        if n not in names:
            raise SystemExit(f"unknown benchmark {n!r}; known: {', '.join(names)}")
        rc = subprocess.call([sys.executable, names[n]] + list(a.args or [])) or rc
    return rc


def cmd_backends(a) -> int:
    from . import backends

    print(backends.table())
    return 0


def cmd_demo(a) -> int:
    from .demo import run_demo

    run_demo(out_dir=a.out, seed=a.seed, fresh=a.fresh, progress_bar=not a.no_progress, quick=a.quick,
             threads=a.threads)
    return 0


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qipo-kernels", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="offline demo on the embedded Pendulum dataset (no network)")
    d.add_argument("--out", default=os.path.join("runs", "demo"))
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--fresh", action="store_true", help="delete previous demo runs first (default: resume them)")
    d.add_argument("--quick", action="store_true", help="a much shorter run (smoke test; scores not meaningful)")
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(fn=cmd_demo)

    t = sub.add_parser("train", help="train QIPO / CPQL (offline) or CPQL (online)")
    t.add_argument("algo", choices=["qipo", "cpql", "cpql-online"])
    t.add_argument("--dataset", help="Minari dataset id (offline algos)")
    t.add_argument("--task", help="CPQL per-task defaults, e.g. halfcheetah-medium")
    t.add_argument("--out", help="output folder (default runs/<algo>)")
    t.add_argument("--device", default="auto")
    t.add_argument("--seed", type=int)
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config field override (repeatable)")
    t.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    t.add_argument("--make-local", action="store_true", help="make the embedded dataset first if it is missing")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint")
    e.add_argument("checkpoint", help="run folder or checkpoint file")
    e.add_argument("--episodes", type=int, default=10)
    e.add_argument("--seeds", default=None, help="comma-separated evaluation seeds")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", help="also write the result here (atomic)")
    e.set_defaults(fn=cmd_eval)

    m = sub.add_parser("make-dataset", help="roll out an SB3 agent zip in a Gymnasium env -> Minari dataset")
    m.add_argument("--env", required=True, help="Gymnasium env id, e.g. HalfCheetah-v5")
    m.add_argument("--agent", required=True, help="Stable-Baselines3 / rl-zoo agent zip")
    m.add_argument("--id", required=True, help="dataset id to write, e.g. qipo/halfcheetah/noisy-sac-v0")
    m.add_argument("--episodes", type=int, default=100)
    m.add_argument("--noise", type=float, default=0.1, help="Gaussian action noise s.d. in [-1, 1] units")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--ref-episodes", type=int, default=10, help="episodes for each of ref_min / ref_max")
    m.add_argument("--max-episode-steps", type=int, default=None)
    m.add_argument("--algo", default="auto", help="SB3 algorithm of the zip (auto: read from it)")
    m.add_argument("--root", default=None, help="datasets directory (default $MINARI_DATASETS_PATH or ~/.minari/datasets)")
    m.add_argument("--overwrite", action="store_true")
    m.add_argument("--no-progress", action="store_true")
    m.set_defaults(fn=cmd_make_dataset)

    b = sub.add_parser("bench", help="run the benchmark scripts under bench/")
    b.add_argument("names", nargs="*")
    b.add_argument("--args", nargs=argparse.REMAINDER, help="arguments passed to the scripts")
    b.set_defaults(fn=cmd_bench)

    k = sub.add_parser("backends", help="which backends run here")
    k.set_defaults(fn=cmd_backends)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
