"""Command line: ``qipo-kernels train|eval|demo|bench|backends`` (also ``python -m qipo_kernels``).

    qipo-kernels demo [--out runs/demo]                 embedded dataset, QIPO + CPQL, scores, backend speeds
    qipo-kernels train qipo --dataset ID [--out DIR] [--preset cpu-30min] [--set key=value ...]
    qipo-kernels train cpql --dataset mujoco/halfcheetah/medium-v0 --task halfcheetah-medium
    qipo-kernels train cpql-online --set env_id=Pendulum-v1 --set steps=20000
    qipo-kernels eval DIR_OR_CHECKPOINT [--episodes 10] [--seeds 0,1,2]
    qipo-kernels make-dataset --env HalfCheetah-v5 --agent sac.zip --id qipo/halfcheetah/noisy-v0 [--noise 0.1]
    qipo-kernels bench [NAME ...] [-- ARGS]              runs a benchmark under bench/ (lists them without NAME)
    qipo-kernels backends                               which backends run here, and why the others don't

Training resumes from ``<out>/checkpoint.pt`` when it exists (``--fresh`` starts over) and writes CSV
logs, atomic checkpoints and ``<out>/summary.json``. A run folder holds one configuration: a changed
``--set`` on an existing run is refused unless the field may change on resume (steps, learning rates,
evaluation and logging settings); fields the command does not name keep the run's own values. Ctrl-C
writes a checkpoint. train / eval / demo use one torch CPU thread unless ``--threads N`` says otherwise.
Errors are one line; ``--debug`` shows the traceback.
``--preset NAME`` (QIPO) starts from a documented preset of QIPO_PRESETS (schedule lengths, batch sizes
and learning rates only; the papers' values stay the defaults); ``--set`` overrides apply after it.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import glob
import json
import os
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch


class CLIError(Exception):
    """An error the command line reports in one line (exit status 1), without a traceback."""


def parse_field(cfg_cls, name: str, text: str) -> Any:
    """Parse the ``--set`` value ``text`` for field ``name`` of config dataclass ``cfg_cls``, by the field's
    declared type: tuples from comma-separated numbers ("0.5,1,2"), ``Any`` (reward_scale) as a number when
    it is one, else as text; "none" is None for optional fields. Raises ValueError naming what was expected."""
    from .algos.common import parse_value

    f = {f.name: f for f in dataclasses.fields(cfg_cls)}[name]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    default = f.default if f.default is not dataclasses.MISSING else None
    text = text.strip()
    if text.lower() == "none" and (default is None or "Optional" in kind or kind == "Any"):
        return None
    if "tuple" in kind:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise ValueError(f"expected comma-separated numbers, got {text!r}")
        try:
            return tuple(int(p) if p.lstrip("+-").isdigit() else float(p) for p in parts)
        except ValueError:
            raise ValueError(f"expected comma-separated numbers, got {text!r}") from None
    if kind == "Any":
        try:
            return float(text)
        except ValueError:
            return text
    try:
        return parse_value(text, default)
    except ValueError as e:
        kind_name = type(default).__name__ if default is not None else kind
        raise ValueError(f"expected {'an' if kind_name[0] in 'aeiou' else 'a'} {kind_name}, got {text!r}"
                         if "expected" not in str(e) else str(e)) from None


def _set_key(item: str) -> str:
    """The config field a ``--set key=value`` item names (dashes read as underscores)."""
    return item.split("=", 1)[0].strip().replace("-", "_")


def _parse_sets(cfg_cls, sets: Sequence[str], base: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """--set key=value pairs, each value parsed by the field's type (parse_field)."""
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    out: Dict[str, Any] = dict(base or {})
    for s in sets or ():
        if "=" not in s:
            raise CLIError(f"--set expects key=value, got {s!r}")
        k, v = _set_key(s), s.split("=", 1)[1]
        if k not in names:
            raise CLIError(f"unknown {cfg_cls.__name__} field {k!r}; known: {', '.join(sorted(names))}")
        try:
            out[k] = parse_field(cfg_cls, k, v)
        except ValueError as e:
            raise CLIError(f"--set {k}: {e}") from None
    return out


def _make_config(cfg_cls, cfg_dict: Dict[str, Any]):
    """The config dataclass from --set values; a value out of range is a one-line error naming the field."""
    from .algos.common import config_from_dict

    try:
        return config_from_dict(cfg_cls, cfg_dict)
    except (TypeError, ValueError) as e:
        raise CLIError(f"--set: {e}") from None


def set_threads(threads: Optional[int], verbose: bool = True) -> int:
    """Set torch's CPU thread count: ``threads`` or, by default, 1, which cannot oversubscribe a shared
    machine (torch's own default, one per core, can make small networks many times slower when other
    processes compete for the cores). Prints the choice when verbose. Returns it."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise CLIError(f"--threads must be an int >= 1, got {threads!r}")
    n = threads or 1
    torch.set_num_threads(n)
    if verbose:
        how = "--threads" if threads else "default; --threads N for more"
        print(f"torch CPU threads: {n} ({how})")
    return n


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError("--device cuda requested but CUDA is not available here")
    try:
        torch.device(name)
    except (RuntimeError, TypeError):
        raise CLIError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    return name


def _load_dataset(dataset_id: str, device: str, reward_scale="auto", normalize_obs=True, make_local=False):
    from . import data

    if make_local or dataset_id == data.DEMO_DATASET_ID:
        data.make_local_dataset(dataset_id)
    try:
        return data.load_minari(dataset_id, device=device, reward_scale=reward_scale, normalize_obs=normalize_obs)
    except (FileNotFoundError, ValueError, TypeError, ImportError) as e:
        raise CLIError(str(e)) from None


def build_trainer(algo: str, cfg_dict: Dict[str, Any], out_dir: str, device: str, dataset=None, progress_bar=True,
                  callback=None, algos=None):
    """Make the trainer of ``algo`` ("qipo" | "cpql" | "cpql-online") from a config dict. ``algos``: name ->
    (trainer class, config class), default qipo_kernels.algos.ALGOS; a caller with trainers of its own (a peer
    baseline on the package's Trainer) passes them in."""
    from .algos import ALGOS
    from .algos.common import config_from_dict

    algos = ALGOS if algos is None else algos
    if algo not in algos:
        raise ValueError(f"algo must be one of {sorted(algos)}, got {algo!r}")
    cls, cfg_cls = algos[algo]
    cfg = config_from_dict(cfg_cls, cfg_dict)
    if algo == "cpql-online":
        return cls(cfg, out_dir=out_dir, device=device, progress_bar=progress_bar, callback=callback)
    if dataset is None:
        raise ValueError(f"algo {algo!r} needs a dataset")
    return cls(dataset, cfg, out_dir=out_dir, device=device, progress_bar=progress_bar, callback=callback)


def _keep_run_config(algo: str, cfg_cls, cfg_dict: Dict[str, Any], given: set, out: str,
                     verbose: bool = True) -> Tuple[Dict[str, Any], Optional[str]]:
    """On a resume (``<out>/checkpoint.pt`` exists), the config fields the command line does not name
    (``given``: --set, --preset, --task, --seed) take the run's own values from its checkpoint instead of
    the defaults, so the same or a shorter command continues the run as it was configured, whether the CLI
    or the Python API made it. Fields the command line names are compared by the trainer as before (a
    change is applied when it may change on resume, refused otherwise). Returns (the config dict to use,
    the name of the preset the run was made with or None)."""
    from .algos.common import config_changes, read_checkpoint

    path = os.path.join(out, "checkpoint.pt")
    cfg = _make_config(cfg_cls, cfg_dict)   # the arguments are checked first
    if not os.path.isfile(path):
        return cfg_dict, None
    st = read_checkpoint(path, mmap=True)   # CheckpointError (one line) when unreadable
    if st.get("algo") != algo:
        return cfg_dict, None                # the trainer refuses it with its own message
    kept = {k: old for k, (old, _) in config_changes(st.get("config") or {}, cfg).items() if k not in given}
    if kept and verbose:
        shown = ", ".join(f"{k}={kept[k]!r}" for k in sorted(kept))
        print(f"resuming {out} with its own settings for the fields not given here: {shown}")
    preset = None
    try:   # the preset the run was made with (config.json), when the command line names none
        with open(os.path.join(out, "config.json")) as f:
            preset = json.load(f).get("preset")
    except (OSError, ValueError, AttributeError):
        pass
    return {**cfg_dict, **kept}, preset


def cmd_train(a) -> int:
    from .algos import distributed

    device = _device(a.device)
    try:  # under torchrun with several processes: join the group (gloo on CPU, NCCL on cuda:LOCAL_RANK)
        ctx = distributed.from_env(device, a.dist_timeout)
    except ValueError as e:
        raise CLIError(str(e)) from None
    try:
        return _train(a, str(ctx.device) if ctx else device, ctx)
    finally:
        if ctx is not None:
            ctx.close()


def _train(a, device: str, ctx) -> int:
    """train's body on one process (ctx None) or on each rank of a torch.distributed job (ctx a
    distributed.DistContext): rank 0 alone checks, locks and clears the run folder and prints."""
    from .algos import ALGOS, cpql_config_for
    from .rundir import check_writable, clear_run_dir, run_lock

    main = ctx is None or ctx.rank == 0
    cls, cfg_cls = ALGOS[a.algo]
    base: Dict[str, Any] = {}
    if a.preset is not None:
        from .algos.qipo import QIPO_PRESETS

        if a.algo != "qipo":
            raise CLIError(f"--preset applies to train qipo only (presets: {', '.join(sorted(QIPO_PRESETS))})")
        if a.preset not in QIPO_PRESETS:
            raise CLIError(f"--preset: unknown preset {a.preset!r}; known presets: {', '.join(sorted(QIPO_PRESETS))}")
        base = dict(QIPO_PRESETS[a.preset])
    if a.task:
        if a.algo != "cpql":
            raise CLIError("--task (per-task defaults) applies to cpql only")
        try:
            base = dataclasses.asdict(cpql_config_for(a.task))
        except ValueError as e:
            raise CLIError(f"--task: {e}") from None
    elif a.algo == "cpql" and a.dataset:
        from .algos.cpql import preset_message, task_key

        if task_key(a.dataset):
            base = dataclasses.asdict(cpql_config_for(a.dataset))
        if main:
            print(preset_message(a.dataset))
    given = set(base) if (a.preset is not None or a.task) else set()   # fields the command line names
    if a.seed is not None:
        base["seed"] = a.seed
        given.add("seed")
    cfg_dict = _parse_sets(cfg_cls, a.set, base)
    given |= {_set_key(s) for s in a.set or ()}
    out = a.out or os.path.join("runs", a.algo)
    run_preset = None
    if not a.fresh:
        cfg_dict, run_preset = _keep_run_config(a.algo, cfg_cls, cfg_dict, given, out, verbose=main)
    probe = _make_config(cfg_cls, cfg_dict)   # every argument is checked before anything is written or removed
    set_threads(a.threads, verbose=main)
    if ctx is not None and a.algo == "cpql-online":
        raise CLIError("cpql-online trains from one environment and runs on one process only; launch it without "
                       "torchrun (or with --nproc_per_node 1)")
    dataset = None
    if a.algo != "cpql-online":
        if not a.dataset:
            raise CLIError(f"train {a.algo} needs --dataset ID (e.g. qipo/pendulum/mixed-v0, the embedded one)")
        if ctx is not None and not main:
            ctx.barrier()  # rank 0 makes the embedded dataset (when it is missing) first
        dataset = _load_dataset(a.dataset, device, probe.reward_scale, probe.normalize_obs, a.make_local)
        if ctx is not None and main:
            ctx.barrier()
    elif a.dataset:
        raise CLIError("train cpql-online takes no --dataset (it collects its own data from --set env_id=...)")
    # (an error raised by rank 0 alone ends the job: torchrun stops the other ranks)
    if main:
        check_writable(out)   # read-only / full / not a folder: one line now, not a traceback later
    with run_lock(out) if main else contextlib.nullcontext():
        if a.fresh and main:  # only a folder qipo-kernels made (marker file), and only under the lock
            clear_run_dir(out)
        if ctx is not None:
            ctx.barrier()     # no rank reads <out> before rank 0 has cleared it
        try:
            tr = build_trainer(a.algo, cfg_dict, out, device, dataset, progress_bar=not a.no_progress)
        except (TypeError, ValueError) as e:
            raise CLIError(str(e)) from None
        tr.dataset_id = a.dataset
        tr.preset = a.preset if a.preset is not None else run_preset
        if ctx is not None:
            try:
                ctx.attach(tr)
            except ValueError as e:  # the same on every rank: rank 0 says it
                raise (CLIError(str(e)) if main else SystemExit(1)) from None
        summary = tr.fit(resume=not a.fresh)
    if main:
        _print_eval(a.algo, summary.get("final_eval"))
        print(f"summary: {os.path.join(out, 'summary.json')}")
    return 0


def load_checkpoint(path: str, device: str = "cpu", dataset=None, algos=None):
    """Rebuild a trained agent from ``<dir>/checkpoint.pt`` (or a checkpoint file). Returns the trainer.

    The dataset (for QIPO / CPQL) is reloaded from the id stored in the checkpoint unless given. ``algos``:
    the trainer classes by name (build_trainer's; default the package's).
    """
    from .algos.common import read_checkpoint

    p = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    st = read_checkpoint(p, map_location=device)   # weights_only=True; CheckpointError names p when unreadable
    algo, cfg = st["algo"], st["config"]
    if dataset is None and algo != "cpql-online":
        did = st.get("dataset_id")
        if not did:
            raise ValueError(f"{p} does not name its dataset; pass dataset=")
        dataset = _load_dataset(did, device, cfg.get("reward_scale", "auto"), cfg.get("normalize_obs", True))
    tr = build_trainer(algo, cfg, os.path.dirname(p), device, dataset, progress_bar=False, algos=algos)
    tr.load_state_dict(st)
    return tr


def parse_seeds(text: Optional[str]) -> Optional[List[int]]:
    """``--seeds 0,1,2`` -> [0, 1, 2] (None for None); a one-line CLIError for anything else."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        seeds = [int(p) for p in parts]
    except ValueError:
        raise CLIError(f"--seeds expects comma-separated integers such as 0,1,2, got {text!r}") from None
    if any(s < 0 for s in seeds):
        raise CLIError(f"--seeds must be >= 0, got {text!r}")
    return seeds


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return v


def cmd_eval(a) -> int:
    device = _device(a.device)
    seeds = parse_seeds(a.seeds)
    if a.json:  # fail now, not after the whole evaluation
        from .rundir import check_writable

        check_writable(os.path.dirname(os.path.abspath(a.json)), run_dir=False)
    set_threads(a.threads)
    try:
        tr = load_checkpoint(a.checkpoint, device)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from None
    if a.set:  # evaluation settings only: the trained networks and the rest of the config stay the run's
        changes = _parse_sets(type(tr.cfg), a.set)
        other = sorted(k for k in changes if not k.startswith("eval_"))
        if other:
            raise CLIError(f"eval --set changes evaluation fields only (eval_*), got {', '.join(other)}")
        tr.cfg = _make_config(type(tr.cfg), {**dataclasses.asdict(tr.cfg), **changes})
    res = tr.evaluate(num_episodes=a.episodes, seeds=seeds)
    _print_eval(tr.algo, res)
    if a.json:
        from .algos.common import atomic_write_json

        atomic_write_json(res, a.json)
    return 0


def _print_eval(name: str, res: Optional[Dict[str, Any]]) -> None:
    """One line: mean ± standard error of the mean over the episodes (labelled "s.e."), and the s.d."""
    if not res:
        return
    n = int(res["episodes"])

    def pm(mean, std):
        from .evaluation import standard_error

        se = standard_error(std, n)
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
                                   algo=a.algo, overwrite=a.overwrite, progress_bar=not a.no_progress,
                                   vecnormalize=a.vecnormalize, ref_agent=a.ref_agent,
                                   time_feature=a.time_feature)
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    from .data.rollout import existing_params
    from .data.minari_io import dataset_dir

    meta = existing_params(did) or {}
    print(f"dataset {did} at {dataset_dir(did)}: ref_min_score {meta.get('ref_min_score')}, ref_max_score "
          f"{meta.get('ref_max_score')}, behaviour normalised score {meta.get('qipo_behaviour_normalized_score')}"
          + (f"; made with {meta['qipo_made_with']}" if meta.get("qipo_made_with") else ""))
    return 0


MICRO_BENCH = "micro"   # `python -m bench`: the pytest-benchmark micro-benchmarks, then the report


def bench_modules(root: str) -> Dict[str, tuple]:
    """The runnable benchmarks under the bench folder ``root``: {name: (module, first docstring line)}.

    A benchmark is a public module (not ``_*``, ``test_*``, ``conftest``) with a ``__main__`` block, run as
    ``python -m bench.<name>`` so its relative imports work; ``micro`` is ``python -m bench`` itself.
    """
    found: Dict[str, tuple] = {}
    if os.path.isfile(os.path.join(root, "__main__.py")):
        found[MICRO_BENCH] = ("bench", "micro-benchmarks of every op x backend (pytest-benchmark), then the report")
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        name = os.path.splitext(os.path.basename(path))[0]
        if name.startswith(("_", "test_")) or name == "conftest":
            continue
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), filename=path)
        except (OSError, SyntaxError, ValueError):
            continue
        has_main = any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)
        if has_main:
            doc = (ast.get_docstring(tree) or "").strip().splitlines()
            found[name] = (f"bench.{name}", doc[0] if doc else "")
    return found


def cmd_bench(a) -> int:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    root = os.path.join(repo, "bench")
    names = bench_modules(root) if os.path.isdir(root) else {}
    if not names:
        print("no bench/ folder next to the package (benchmarks live in the source checkout: bench/*.py);\n"
              "`qipo-kernels demo` prints sampling speed per backend on this machine.")
        return 0
    extra = list(a.args or []) + list(getattr(a, "passthrough", None) or [])
    if not a.names:
        print("benchmarks (run with `qipo-kernels bench NAME [-- ARGS]`; `-- --help` shows a benchmark's options):")
        width = max(len(n) for n in names)
        for n, (_, doc) in names.items():
            print(f"  {n:<{width}s}  {doc}")
        return 0
    unknown = [n for n in a.names if n not in names]
    if unknown:
        raise CLIError(f"unknown benchmark {unknown[0]!r}; known: {', '.join(names)}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    rc = 0
    for n in a.names:
        rc = subprocess.call([sys.executable, "-m", names[n][0]] + extra, env=env) or rc
    return rc


def cmd_backends(a) -> int:
    from . import backends

    print(backends.table())
    return 0


def cmd_demo(a) -> int:
    from .demo import run_demo

    threads = set_threads(a.threads)
    run_demo(out_dir=a.out, seed=a.seed, fresh=a.fresh, progress_bar=not a.no_progress, quick=a.quick,
             threads=threads)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_THREADS_HELP = "torch CPU threads (default 1: never oversubscribes a shared machine)"


def make_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="qipo-kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")

    d = sub.add_parser("demo", help="offline demo on the embedded Pendulum dataset (no network)", parents=[common])
    d.add_argument("--out", default=os.path.join("runs", "demo"))
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--fresh", action="store_true",
                   help="delete previous demo runs first (only a folder the demo made; default: resume them)")
    d.add_argument("--quick", action="store_true", help="a much shorter run (smoke test; scores not meaningful)")
    d.add_argument("--threads", type=_positive_int, default=None, help=_THREADS_HELP)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(fn=cmd_demo)

    t = sub.add_parser("train", help="train QIPO / CPQL (offline) or CPQL (online)", parents=[common])
    t.add_argument("algo", choices=["qipo", "cpql", "cpql-online"])
    t.add_argument("--dataset", help="Minari dataset id (offline algos)")
    t.add_argument("--task", help="CPQL per-task defaults, e.g. halfcheetah-medium")
    t.add_argument("--out", help="output folder (default runs/<algo>)")
    t.add_argument("--device", default="auto")
    t.add_argument("--seed", type=int)
    t.add_argument("--preset", default=None,
                   help="QIPO preset (schedule lengths, batch sizes, learning rates; see QIPO_PRESETS), applied "
                        "before --set; recorded in config.json")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config field override (repeatable)")
    t.add_argument("--fresh", action="store_true",
                   help="start over: empty the --out folder first (only a folder qipo-kernels made)")
    t.add_argument("--threads", type=_positive_int, default=None, help=_THREADS_HELP)
    t.add_argument("--make-local", action="store_true", help="make the embedded dataset first if it is missing")
    t.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                   help="under torchrun: how long a rank waits in a collective (e.g. while rank 0 evaluates) "
                        "before the job fails (default $QIPO_DIST_TIMEOUT_S or 1800)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint", parents=[common])
    e.add_argument("checkpoint", help="run folder or checkpoint file")
    e.add_argument("--episodes", type=_positive_int, default=10, help="episodes per seed (default 10)")
    e.add_argument("--seeds", default=None, help="comma-separated evaluation seeds")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", help="also write the result here (atomic)")
    e.add_argument("--threads", type=_positive_int, default=None, help=_THREADS_HELP)
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an evaluation field of the run's config for this evaluation, e.g. eval_noise_scale=0 "
                        "(QIPO) or eval_candidates=1 (repeatable)")
    e.set_defaults(fn=cmd_eval)

    m = sub.add_parser("make-dataset", help="roll out an SB3 agent zip in a Gymnasium env -> Minari dataset",
                       parents=[common])
    m.add_argument("--env", required=True, help="Gymnasium env id, e.g. HalfCheetah-v5")
    m.add_argument("--agent", required=True, help="Stable-Baselines3 / rl-zoo agent zip")
    m.add_argument("--id", required=True, help="dataset id to write, e.g. qipo/halfcheetah/noisy-sac-v0")
    m.add_argument("--episodes", type=int, default=100)
    m.add_argument("--noise", type=float, default=0.1, help="Gaussian action noise s.d. in [-1, 1] units")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--ref-episodes", type=int, default=10, help="episodes for each of ref_min / ref_max")
    m.add_argument("--max-episode-steps", type=int, default=None)
    m.add_argument("--algo", default="auto", help="SB3 algorithm of the zip (auto: read from it)")
    m.add_argument("--vecnormalize", default=None, metavar="PKL",
                   help="the agent's VecNormalize pickle (rl-zoo agents trained with normalize: true, e.g. A2C / PPO)")
    m.add_argument("--ref-agent", default=None, metavar="ZIP",
                   help="an SB3 zip whose noiseless return is ref_max_score (default: --agent's), e.g. an expert")
    m.add_argument("--time-feature", type=int, nargs="?", const=1000, default=None, metavar="MAX_STEPS",
                   help="the agent was trained with rl-zoo's TimeFeatureWrapper (its config.yml's env_wrapper; "
                        "e.g. PPO MuJoCo agents): feed it [obs, 1 - t / MAX_STEPS] (default 1000)")
    m.add_argument("--root", default=None, help="datasets directory (default $MINARI_DATASETS_PATH or ~/.minari/datasets)")
    m.add_argument("--overwrite", action="store_true")
    m.add_argument("--no-progress", action="store_true")
    m.set_defaults(fn=cmd_make_dataset)

    b = sub.add_parser("bench", help="run a benchmark under bench/ (`bench NAME -- ARGS` passes ARGS on)",
                       parents=[common])
    b.add_argument("names", nargs="*")
    b.add_argument("--args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark (or use `-- ARGS`)")
    b.set_defaults(fn=cmd_bench)

    k = sub.add_parser("backends", help="which backends run here", parents=[common])
    k.set_defaults(fn=cmd_backends)
    return ap


def _one_line(e: BaseException) -> str:
    """The error as one line: the message of an expected error, else its type and message plus a hint."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, (CLIError, ValueError, TypeError, OSError, ImportError)):
        return text
    return f"{type(e).__name__}: {text} (--debug shows the traceback)"


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; an error ends it with one line on stderr (SystemExit), a traceback with --debug.

    Arguments after a ``--`` are passed on to ``bench`` (``qipo-kernels bench NAME -- --help``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1:]
    args = make_parser().parse_args(argv)
    if passthrough and args.cmd != "bench":
        raise SystemExit(f"qipo-kernels {args.cmd}: error: arguments after `--` are for `bench` only")
    args.passthrough = passthrough
    debug = bool(getattr(args, "debug", False))
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("qipo-kernels: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as e:  # every error is one line; --debug shows where it came from
        if debug:
            raise
        raise SystemExit(f"qipo-kernels {args.cmd}: error: {_one_line(e)}") from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
