"""Training infrastructure shared by QIPO and CPQL.

- atomic writes (temp file in the same folder + os.replace) for checkpoints, JSON summaries, CSV;
- RunLogger: one CSV per stream (train, eval, ...), TensorBoard as well when it is installed;
- Trainer: the step loop with a tqdm progress bar (losses, steps/s, samples/s), periodic
  evaluation, periodic atomic checkpoints, resume from the last checkpoint, and a final JSON summary.

A checkpoint holds every network (with target / EMA copies), every optimizer, the step counter, the
training generator and the global RNG states, and whatever state the algorithm adds (e.g. QIPO's
support set): a run killed at any point resumes from its last checkpoint and, because all training
randomness comes from one saved torch.Generator, continues exactly as an uninterrupted run would.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional

import numpy as np
import torch

try:  # progress bars are optional
    from tqdm.auto import tqdm as _tqdm
except Exception:  # pragma: no cover
    _tqdm = None

CHECKPOINT_NAME = "checkpoint.pt"
SUMMARY_NAME = "summary.json"


# ---- atomic writes ---------------------------------------------------------------------------

def _file_mode(path: str) -> int:
    """The mode a new file gets here (0666 less the umask), or the mode of the file being replaced."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _atomic(path: str, write: Callable[[str], None]) -> str:
    path = os.path.abspath(path)
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; results are as readable as the CSV logs
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_torch_save(obj: Any, path: str) -> str:
    """torch.save to a temp file beside ``path``, fsync, then rename over it."""
    def w(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    return _atomic(path, w)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if torch.is_tensor(x):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def atomic_write_json(obj: Any, path: str) -> str:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(_jsonable(obj), f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    return _atomic(path, w)


def atomic_write_text(text: str, path: str) -> str:
    """Write ``text`` to a temp file beside ``path``, fsync, then rename over it (reports, tables)."""
    def w(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return _atomic(path, w)


def atomic_copy(src: str, path: str) -> str:
    """Copy file ``src`` (its bytes and times) to a temp file beside ``path``, fsync, then rename over it: an
    interrupted copy never leaves a half-written file at ``path`` (a checkpoint a trainer would resume)."""
    def w(tmp):
        shutil.copy2(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    return _atomic(path, w)


# ---- RNG -------------------------------------------------------------------------------------

def rng_state(gen: torch.Generator) -> Dict[str, Any]:
    """Every RNG state of a run, as tensors / dicts / numbers only (loadable with weights_only=True)."""
    npst = np.random.get_state(legacy=False)  # {"bit_generator", "state": {"key": uint32[624], "pos"}, ...}
    npst = dict(npst, state=dict(npst["state"], key=torch.from_numpy(npst["state"]["key"].astype(np.int64))))
    return {"gen": gen.get_state(), "torch": torch.get_rng_state(), "numpy": npst,
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(gen: torch.Generator, st: Dict[str, Any]) -> None:
    gen.set_state(st["gen"])
    torch.set_rng_state(st["torch"])
    npst = st["numpy"]
    if isinstance(npst, dict):
        key = npst["state"]["key"]
        key = key.numpy() if torch.is_tensor(key) else np.asarray(key)
        npst = dict(npst, state=dict(npst["state"], key=key.astype(np.uint32)))
    np.random.set_state(npst)
    random.setstate(st["python"])
    if st.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# ---- checkpoint files -----------------------------------------------------------------------

class CheckpointError(ValueError):
    """A checkpoint file cannot be read (corrupt, truncated, not a checkpoint, or unsafe to unpickle)."""


def checkpoint_safe(x: Any) -> Any:
    """``x`` with numpy arrays as tensors and numpy scalars as Python numbers (recursively in dicts, lists
    and tuples), so that ``torch.load(weights_only=True)`` can read it back."""
    if isinstance(x, dict):
        return {k: checkpoint_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [checkpoint_safe(v) for v in x]
    if isinstance(x, tuple):
        return tuple(checkpoint_safe(v) for v in x)
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, np.generic):
        return x.item()
    return x


def read_checkpoint(path: str, map_location: Any = "cpu", mmap: bool = False) -> Dict[str, Any]:
    """Load a checkpoint written by ``Trainer.save_checkpoint`` with ``torch.load(weights_only=True)``
    (``mmap=True``: tensors are mapped, not read, for a caller that only needs the config).

    Raises FileNotFoundError when ``path`` is missing and CheckpointError (a ValueError, one line naming
    ``path`` and what to do) when it is corrupt, truncated, not a qipo-kernels checkpoint, or holds objects
    that a weights-only load refuses (it may then run code: it is not loaded).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    hint = ("delete it (or train with --fresh) to start over, or restore it from a copy")
    try:
        st = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # PytorchStreamReader / EOFError / UnpicklingError / zipfile errors ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "Weights only load failed" in first or "weights_only" in first:
            why = "it holds objects other than tensors, numbers, strings, lists and dicts, and is not loaded " \
                  "(written by an older qipo-kernels, or not by qipo-kernels)"
        else:
            why = f"it is corrupt or truncated ({type(e).__name__}: {first[:160]})"
        raise CheckpointError(f"cannot read checkpoint {path}: {why}; {hint}") from e
    missing = [k for k in ("algo", "config", "step", "modules") if not isinstance(st, dict) or k not in st]
    if missing:
        raise CheckpointError(f"cannot read checkpoint {path}: not a qipo-kernels checkpoint (no {missing}); {hint}")
    return st


# ---- networks --------------------------------------------------------------------------------

@torch.no_grad()
def polyak(target: torch.nn.Module, source: torch.nn.Module, tau: float) -> None:
    """target <- (1 - tau) target + tau source (parameters and float buffers)."""
    for pt, ps in zip(target.parameters(), source.parameters()):
        pt.mul_(1.0 - tau).add_(ps, alpha=tau)
    for bt, bs in zip(target.buffers(), source.buffers()):
        bt.copy_(bs)


@torch.no_grad()
def hard_update(target: torch.nn.Module, source: torch.nn.Module) -> None:
    target.load_state_dict(source.state_dict())


# ---- config helpers --------------------------------------------------------------------------

def config_from_dict(cls, d: Optional[Dict[str, Any]] = None, **overrides):
    """Build a dataclass config from a dict + overrides, rejecting unknown keys by name."""
    d = dict(d or {})
    d.update(overrides)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(names)}")
    return cls(**d)


def parse_value(text: str, like: Any) -> Any:
    """Parse a command-line ``key=value`` value to the type of the current value ``like``."""
    if isinstance(like, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if text.lower() == "none":
        return None
    if isinstance(like, int):
        return int(float(text)) if ("e" in text.lower() and "." not in text) else int(text)
    if isinstance(like, float):
        return float(text)
    if isinstance(like, (list, tuple)):
        return [float(v) for v in text.split(",") if v]
    if like is None:
        for conv in (int, float):
            try:
                return conv(text)
            except ValueError:
                pass
    return text


# ---- logging ---------------------------------------------------------------------------------

class RunLogger:
    """CSV per stream (``<out>/<stream>.csv``), plus TensorBoard scalars when tensorboard is installed.

    Rows are flushed as they are written. ``truncate_after(step)`` drops rows past a checkpoint's step
    when a run resumes, so a resumed run's logs hold each step once.
    """

    def __init__(self, out_dir: str, tensorboard: bool = True):
        self.out_dir = out_dir
        os.makedirs(out_dir, exist_ok=True)
        self._files: Dict[str, Any] = {}
        self._writers: Dict[str, csv.DictWriter] = {}
        self._fields: Dict[str, List[str]] = {}
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

                self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
            except Exception:
                self.tb = None

    def path(self, stream: str) -> str:
        return os.path.join(self.out_dir, f"{stream}.csv")

    def log(self, stream: str, step: int, metrics: Dict[str, Any]) -> None:
        row = {"step": int(step), "time": round(time.time(), 3)}
        row.update({k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) or torch.is_tensor(v) else v)
                    for k, v in metrics.items()})
        if stream not in self._writers:
            p = self.path(stream)
            exists = os.path.exists(p) and os.path.getsize(p) > 0
            if exists:
                with open(p, newline="") as f:
                    header = next(csv.reader(f), None) or list(row)
            else:
                header = list(row)
            f = open(p, "a", newline="")
            w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
            if not exists:
                w.writeheader()
            self._files[stream], self._writers[stream], self._fields[stream] = f, w, header
        self._writers[stream].writerow(row)
        self._files[stream].flush()
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, float):
                    self.tb.add_scalar(f"{stream}/{k}", v, step)

    def truncate_after(self, step: int) -> None:
        """Drop rows with step > ``step`` from every CSV in the folder (atomic rewrite)."""
        self.close()
        for name in os.listdir(self.out_dir):
            if not name.endswith(".csv"):
                continue
            p = os.path.join(self.out_dir, name)
            with open(p, newline="") as f:
                rows = list(csv.reader(f))
            if not rows:
                continue
            header, body = rows[0], rows[1:]
            if "step" not in header:
                continue
            i = header.index("step")
            keep = [r for r in body if r and float(r[i]) <= step]
            if len(keep) != len(body):
                def w(tmp, header=header, keep=keep):
                    with open(tmp, "w", newline="") as f:
                        cw = csv.writer(f)
                        cw.writerow(header)
                        cw.writerows(keep)
                _atomic(p, w)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._writers.clear()
        if self.tb is not None:
            self.tb.flush()


def progress(iterable=None, total=None, desc=None, enabled=True, leave=True, initial=0):
    """A tqdm bar when tqdm is installed and enabled, else a silent stand-in."""
    if enabled and _tqdm is not None:
        return _tqdm(iterable, total=total, desc=desc, leave=leave, initial=initial, dynamic_ncols=True,
                     mininterval=0.5)
    return _Silent(iterable)


class _Silent:
    def __init__(self, iterable=None):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass

    def set_description(self, *a, **k):
        pass

    def close(self):
        pass


# ---- the step loop ---------------------------------------------------------------------------

class StopTraining(Exception):
    """Raised by a callback to stop a run early (tests use it to simulate a kill)."""


class ConfigMismatch(ValueError):
    """A run directory's checkpoint was made with another configuration than the one asked for."""


def _show(v: Any) -> str:
    return repr(tuple(v) if isinstance(v, list) else v)


def config_changes(old: Dict[str, Any], cfg) -> Dict[str, tuple]:
    """{field: (old value, new value)} for every field of dataclass ``cfg`` that differs from the config
    dict ``old`` (a checkpoint's; a field it lacks counts as that field's default)."""
    out: Dict[str, tuple] = {}
    for f in dataclasses.fields(cfg):
        if f.name in old:
            was = old[f.name]
        elif f.default is not dataclasses.MISSING:
            was = f.default
        else:
            continue
        now = getattr(cfg, f.name)
        if _jsonable(was) != _jsonable(now):
            out[f.name] = (was, now)
    return out


@contextlib.contextmanager
def _checkpoint_on_interrupt(trainer: "Trainer"):
    """While training, Ctrl-C (SIGINT) stops the run with a checkpoint instead of losing the steps since the
    last one. Inside a training step the interrupt is deferred to the end of that step (the state is then
    consistent); anywhere else it raises KeyboardInterrupt at once. The trainer saves on its way out.

    Under torch.distributed the ranks agree at the end of each step (DistContext.end_step) and all stop after
    the first step at whose end any of them had been interrupted; ranks other than 0 also defer an
    interrupt that comes between steps, since they only stop together with rank 0."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if trainer._in_step or (trainer.dist is not None and not trainer.is_main):
            if not trainer._interrupted:
                trainer._interrupted = True
                if trainer.is_main:
                    print("\ninterrupt: writing a checkpoint at the end of this step (Ctrl-C again to quit without)",
                          file=sys.stderr, flush=True)
                return
            trainer._ckpt_ok = False  # a second Ctrl-C inside a step: that state is half-updated, not saved
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except (ValueError, OSError):  # not allowed here (e.g. an embedded interpreter)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class Trainer:
    """Base class: subclasses define the networks and ``train_step``.

    Subclass contract:
        self.total_steps                      total number of optimisation steps
        train_step() -> (metrics dict, samples processed)   one step at self.step (0-based)
        _state() -> dict / _load_state(dict)  algorithm state beyond modules/optimizers
        self.modules: Dict[str, nn.Module]; self.optims: Dict[str, Optimizer]
        policy_fn() -> callable(obs [n, S]) -> actions [n, A]  (for evaluation)
        dist_batches: config fields of global batch sizes (torch.distributed: see algos/distributed.py;
            train_step draws global batches, keeps ``rows(x)`` and runs backward passes through
            ``train_call(module, fn)``)
    """

    algo = "base"
    # Config fields that may differ between a run directory's checkpoint and the config it is resumed
    # with (read from the config as the run goes, so a change applies from the resumed step on); any other
    # difference is refused (ConfigMismatch). Subclasses add theirs (e.g. the number of steps).
    resume_fields = frozenset({"eval_every", "eval_episodes", "eval_seeds", "eval_candidates", "eval_select",
                               "log_every", "checkpoint_every", "tensorboard", "backend", "compile"})
    # learning-rate field -> the optimizers (keys of self.optims) it sets; applied on resume
    lr_fields: Dict[str, tuple] = {}
    # torch.distributed (qipo_kernels.algos.distributed): the DistContext attached by its attach(), and
    # the config fields that hold global batch sizes (shared among the processes).
    dist = None
    dist_batches: tuple = ()

    def __init__(self, cfg, out_dir: str, device: str = "cpu", progress_bar: bool = True,
                 callback: Optional[Callable[["Trainer", Dict[str, float]], None]] = None):
        self.cfg = cfg
        self.out_dir = out_dir
        self.device = torch.device(device)
        self.progress_bar = progress_bar
        self.callback = callback
        self.step = 0
        self.modules: Dict[str, torch.nn.Module] = {}
        self.optims: Dict[str, torch.optim.Optimizer] = {}
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(int(cfg.seed))
        self.eval_history: List[Dict[str, Any]] = []
        self.train_time = 0.0        # process CPU seconds spent in train steps (all threads)
        self.train_wall_time = 0.0   # wall-clock seconds spent in train steps
        self.logger: Optional[RunLogger] = None
        self.verbose = True            # one-line notes (resuming, interrupted) on stdout
        self.resume_changes: Dict[str, tuple] = {}   # config fields changed by the last resume
        self._in_step = False          # inside train_step (a Ctrl-C waits for the step to end)
        self._interrupted = False
        self._ckpt_ok = False          # the in-memory state is the run's (a checkpoint of it may be written)

    # -- to be provided by subclasses
    total_steps: int = 0

    def train_step(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _state(self) -> Dict[str, Any]:
        return {}

    def _load_state(self, st: Dict[str, Any]) -> None:
        pass

    def policy_fn(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def evaluate(self, num_episodes: Optional[int] = None, seeds: Optional[Iterable[int]] = None) -> Dict[str, Any]:
        raise NotImplementedError

    def stage(self) -> str:
        return "train"

    @property
    def is_main(self) -> bool:
        """True on the process that writes logs, checkpoints and evaluates (rank 0, or the only one)."""
        return self.dist is None or self.dist.rank == 0

    def rows(self, x):
        """This process's share of a global-batch tensor (all of it on one process)."""
        return x if self.dist is None else self.dist.rows(x)

    def train_call(self, module, fn):
        """``fn(module)``; under torch.distributed through DistributedDataParallel (gradients averaged)."""
        return fn(module) if self.dist is None else self.dist.call(module, fn)

    # -- checkpoints
    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.out_dir, CHECKPOINT_NAME)

    def state_dict(self) -> Dict[str, Any]:
        return {
            "algo": self.algo,
            "config": dataclasses.asdict(self.cfg),
            "dataset_id": getattr(getattr(self, "dataset", None), "dataset_id", None),
            "step": self.step,
            "world_size": self.dist.world_size if self.dist is not None else 1,
            "train_time": self.train_time,
            "train_wall_time": self.train_wall_time,
            "train_time_kind": "cpu",
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optims": {k: o.state_dict() for k, o in self.optims.items()},
            "rng": rng_state(self.gen),
            "eval_history": self.eval_history,
            "algo_state": self._state(),
        }

    def load_state_dict(self, st: Dict[str, Any]) -> None:
        if st.get("algo") != self.algo:
            raise ValueError(f"checkpoint is for algo {st.get('algo')!r}, not {self.algo!r}")
        for k, m in self.modules.items():
            m.load_state_dict(st["modules"][k])
        for k, o in self.optims.items():
            o.load_state_dict(st["optims"][k])
        self.step = int(st["step"])
        if st.get("train_time_kind") == "cpu":
            self.train_time = float(st.get("train_time", 0.0))
            self.train_wall_time = float(st.get("train_wall_time", 0.0))
        else:  # checkpoints before train_time meant CPU time held wall time only
            self.train_time, self.train_wall_time = 0.0, float(st.get("train_time", 0.0))
        self.eval_history = list(st.get("eval_history", []))
        self._load_state(st.get("algo_state", {}))
        set_rng_state(self.gen, st["rng"])  # last: _load_state may draw (e.g. regenerate a support set)

    def save_checkpoint(self) -> str:
        """Write ``<out_dir>/checkpoint.pt`` atomically (tensors, numbers, strings, lists and dicts only)."""
        if not self.is_main:
            return self.checkpoint_path
        return atomic_torch_save(checkpoint_safe(self.state_dict()), self.checkpoint_path)

    def _say(self, msg: str) -> None:
        if self.verbose and self.is_main:
            print(msg, flush=True)

    @classmethod
    def resume_config_changes(cls, old: Dict[str, Any], cfg) -> tuple:
        """(changes, bad): every field of ``cfg`` that differs from the config dict ``old`` (config_changes), and
        those of them a resumed run may not change (not in ``resume_fields`` nor a learning rate)."""
        changes = config_changes(old, cfg)
        return changes, {k: v for k, v in changes.items() if k not in cls.resume_fields and k not in cls.lr_fields}

    def check_resume(self, st: Dict[str, Any]) -> Dict[str, tuple]:
        """Compare checkpoint ``st`` with this trainer's config and dataset; returns the changed fields that
        may change on resume, raises ConfigMismatch (one line, naming the fields and the ways forward) for
        any other difference."""
        where = os.path.dirname(self.checkpoint_path) or "."
        if st.get("algo") != self.algo:
            raise ConfigMismatch(f"run directory {where} holds a {st.get('algo')!r} run, not {self.algo!r}; "
                                 "pass --fresh to start over there or a new --out folder")
        changes, bad = self.resume_config_changes(st.get("config") or {}, self.cfg)
        did = getattr(getattr(self, "dataset", None), "dataset_id", None)
        if st.get("dataset_id") and did and st["dataset_id"] != did:
            bad["dataset"] = (st["dataset_id"], did)
        if bad:
            shown = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in list(bad.items())[:8])
            more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
            raise ConfigMismatch(f"run directory {where} was trained with another configuration ({shown}{more}); "
                                 "pass --fresh to start over there, or a new --out folder for this configuration")
        return changes

    def _apply_resume_changes(self, changes: Dict[str, tuple]) -> None:
        for field, names in self.lr_fields.items():
            if field in changes:
                for name in names:
                    for group in self.optims[name].param_groups:
                        group["lr"] = float(getattr(self.cfg, field))
        if self.step > self.total_steps:
            where = os.path.dirname(self.checkpoint_path) or "."
            raise ConfigMismatch(f"run directory {where} is at step {self.step}, past the {self.total_steps} steps "
                                 "now asked for; ask for at least as many steps, pass --fresh, or a new --out folder")

    def try_resume(self) -> bool:
        """Resume from ``<out_dir>/checkpoint.pt`` if it exists: check its config (``check_resume``), load it
        and apply the fields that changed (e.g. a new learning rate reaches the restored optimizers)."""
        if not os.path.exists(self.checkpoint_path):
            return False
        st = read_checkpoint(self.checkpoint_path, map_location=self.device)
        changes = self.check_resume(st)
        self.load_state_dict(st)
        from .distributed import warn_resume

        warn_resume(self, st.get("world_size", 1))
        self._apply_resume_changes(changes)
        self.resume_changes = changes
        note = ""
        if changes:
            note = " with " + ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in changes.items())
        self._say(f"resuming from step {self.step} of {self.total_steps} in {os.path.dirname(self.checkpoint_path) or '.'}"
                  f"{note}")
        return True

    # -- the loop
    def fit(self, resume: bool = True) -> Dict[str, Any]:
        """Train to ``total_steps`` (resuming from ``<out_dir>/checkpoint.pt`` when resume), evaluate,
        and write ``<out_dir>/summary.json``. Returns the summary.

        The run directory is locked for the duration (rundir.run_lock: a second process is refused with
        RunDirBusy). Ctrl-C writes a checkpoint of the last completed step, then raises KeyboardInterrupt.
        """
        self._ckpt_ok = self._interrupted = False
        with self._run_dir_lock(), _checkpoint_on_interrupt(self):
            try:
                try:
                    return self._fit(resume)
                except Exception as e:
                    if self.dist is None or not self._interrupted:
                        raise
                    # interrupted, then a collective failed: another rank stopped outside a step (rank 0
                    # during an evaluation), so this one stops too; mid-step, its state is half-updated
                    if self._in_step:
                        self._ckpt_ok = False
                    raise KeyboardInterrupt from e
            except KeyboardInterrupt:
                if self._ckpt_ok:
                    self.save_checkpoint()
                    self._say(f"\ninterrupted: checkpoint of step {self.step} written to {self.checkpoint_path}; "
                              "run the same command again to resume")
                else:
                    self._say("\ninterrupted: no new checkpoint written (the last one stands)")
                raise
            finally:
                self._ckpt_ok = self._in_step = False

    def _run_dir_lock(self):
        """The run folder's lock (rundir.run_lock); in a torch.distributed job only rank 0 takes it."""
        from ..rundir import run_lock

        dist = getattr(torch, "distributed", None)
        if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return contextlib.nullcontext()
        return run_lock(self.out_dir)

    def compile_networks(self) -> None:
        """torch.compile the forward of every network that has an optimizer (the trained ones), once.

        The compiled function is set as the instance's ``forward`` (of a policy's inner ``net`` when it
        has one), so parameters, state_dicts and checkpoints are unchanged and the C++ / Triton samplers,
        which read the parameters, are unaffected. One CPU thread, cpu-30min batches, vs the default
        backend (bench/results/train_step_compile_cpu.md; README): QIPO stages 1 / 3 1.1-1.3x, CPQL ~1.1x,
        QIPO stage 2 ~1x. Not under torch.distributed (refused in _fit)."""
        for name in self.optims:
            m = self.modules[name]
            inner = getattr(m, "net", None)
            target = inner if isinstance(inner, torch.nn.Module) else m
            if not getattr(target, "_qipo_compiled", False):
                target.forward = torch.compile(target.forward)
                target._qipo_compiled = True

    def _fit(self, resume: bool) -> Dict[str, Any]:
        cfg = self.cfg
        if getattr(cfg, "compile", False):
            if self.dist is not None:
                raise ValueError("compile=True is not supported under torch.distributed (DDP); pass compile=False")
            self.compile_networks()
        resumed = self.try_resume() if resume else False
        summary_path = os.path.join(self.out_dir, SUMMARY_NAME)
        if resumed and self.step >= self.total_steps and os.path.exists(summary_path) and not self.resume_changes:
            with open(summary_path) as f:  # a finished run, same config: its results stand
                return json.load(f)
        if self.is_main:
            self.logger = RunLogger(self.out_dir, tensorboard=getattr(cfg, "tensorboard", True))
        else:
            from .distributed import NullLogger

            self.logger = NullLogger()
        if resumed:
            self.logger.truncate_after(self.step)
        if self.is_main:
            blob = {"algo": self.algo, "config": dataclasses.asdict(cfg)}
            if getattr(self, "preset", None) is not None:  # the named preset the config started from (CLI --preset)
                blob["preset"] = self.preset
            atomic_write_json(blob, os.path.join(self.out_dir, "config.json"))
        bar = progress(total=self.total_steps, desc=f"{self.algo}", enabled=self.progress_bar, initial=self.step)
        t_last, n_last, s_last = time.perf_counter(), 0, self.step
        self._ckpt_ok = True
        try:
            while self.step < self.total_steps:
                t0, c0 = time.perf_counter(), time.process_time()
                stage = self.stage()
                self._in_step = True   # until the step is logged: a Ctrl-C here waits for the end of it
                metrics, nsamples = self.train_step()
                stop = None  # under torch.distributed: whether any rank was interrupted by the end of this step
                if self.dist is not None:
                    metrics, stop = self.dist.end_step(metrics, self._interrupted)
                self.step += 1
                self.train_time += time.process_time() - c0
                self.train_wall_time += time.perf_counter() - t0
                n_last += nsamples
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps or stage != self.stage():
                    now = time.perf_counter()
                    dt = max(now - t_last, 1e-9)
                    m = {k: float(v) for k, v in metrics.items()}
                    m["steps_per_s"] = (self.step - s_last) / dt
                    m["samples_per_s"] = n_last / dt
                    self.logger.log(stage, self.step, m)
                    bar.set_description(f"{self.algo}:{stage}")
                    post = {k: f"{v:.3g}" for k, v in m.items() if k not in ("steps_per_s", "samples_per_s")}
                    post["samples/s"] = f"{m['samples_per_s']:.3g}"
                    bar.set_postfix(post, refresh=False)
                    t_last, n_last, s_last = now, 0, self.step
                self._in_step = False
                if self._interrupted if stop is None else stop:
                    raise KeyboardInterrupt
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps \
                        and self.is_main and self.should_eval():
                    res = self.evaluate()
                    self._record_eval(res)
                if cfg.checkpoint_every and (self.step % cfg.checkpoint_every == 0) and self.step < self.total_steps:
                    self.save_checkpoint()
                if self.callback is not None:
                    self.callback(self, metrics)
        finally:
            bar.close()
            self.logger.close()
        # final evaluation, checkpoint and summary
        res = self.evaluate() if cfg.eval_episodes > 0 and self.is_main else None
        if res is not None:
            self._record_eval(res)
            self.logger.close()
        self.save_checkpoint()
        summary = self.summary(res)
        if self.is_main:
            atomic_write_json(summary, summary_path)
        if self.dist is not None:
            self.dist.barrier()  # every rank returns once rank 0's files are written
        return summary

    def should_eval(self) -> bool:
        return True

    def _record_eval(self, res: Dict[str, Any]) -> None:
        row = {"step": self.step, "mean": res["mean"], "std": res["std"],
               "normalized_mean": res.get("normalized_mean"), "normalized_std": res.get("normalized_std"),
               "episodes": res.get("episodes"), "train_time_s": round(self.train_time, 3),
               "train_wall_s": round(self.train_wall_time, 3)}
        self.eval_history = [r for r in self.eval_history if r["step"] != self.step] + [row]
        self.logger.log("eval", self.step, {k: (v if v is not None else float("nan")) for k, v in row.items()
                                            if k != "step"})

    def summary(self, final_eval: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        return {
            "algo": self.algo,
            "steps": self.step,
            "train_time_s": round(self.train_time, 3),     # process CPU time of the train steps
            "train_wall_s": round(self.train_wall_time, 3),  # their wall-clock time
            "final_eval": final_eval,
            "eval_history": self.eval_history,
            "config": dataclasses.asdict(self.cfg),
            "checkpoint": self.checkpoint_path,
        }
