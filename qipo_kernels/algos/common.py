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

import csv
import dataclasses
import json
import math
import os
import random
import tempfile
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

def _atomic(path: str, write: Callable[[str], None]) -> str:
    path = os.path.abspath(path)
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        write(tmp)
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


# ---- RNG -------------------------------------------------------------------------------------

def rng_state(gen: torch.Generator) -> Dict[str, Any]:
    return {"gen": gen.get_state(), "torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(gen: torch.Generator, st: Dict[str, Any]) -> None:
    gen.set_state(st["gen"])
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if st.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


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


class Trainer:
    """Base class: subclasses define the networks and ``train_step``.

    Subclass contract:
        self.total_steps                      total number of optimisation steps
        train_step() -> (metrics dict, samples processed)   one step at self.step (0-based)
        _state() -> dict / _load_state(dict)  algorithm state beyond modules/optimizers
        self.modules: Dict[str, nn.Module]; self.optims: Dict[str, Optimizer]
        policy_fn() -> callable(obs [n, S]) -> actions [n, A]  (for evaluation)
    """

    algo = "base"

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
        return atomic_torch_save(self.state_dict(), self.checkpoint_path)

    def try_resume(self) -> bool:
        if not os.path.exists(self.checkpoint_path):
            return False
        st = torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)
        self.load_state_dict(st)
        return True

    # -- the loop
    def fit(self, resume: bool = True) -> Dict[str, Any]:
        """Train to ``total_steps`` (resuming from ``<out_dir>/checkpoint.pt`` when resume), evaluate,
        and write ``<out_dir>/summary.json``. Returns the summary."""
        cfg = self.cfg
        os.makedirs(self.out_dir, exist_ok=True)
        resumed = self.try_resume() if resume else False
        summary_path = os.path.join(self.out_dir, SUMMARY_NAME)
        if resumed and self.step >= self.total_steps and os.path.exists(summary_path):
            with open(summary_path) as f:  # a finished run: its results stand
                return json.load(f)
        self.logger = RunLogger(self.out_dir, tensorboard=getattr(cfg, "tensorboard", True))
        if resumed:
            self.logger.truncate_after(self.step)
        atomic_write_json({"algo": self.algo, "config": dataclasses.asdict(cfg)}, os.path.join(self.out_dir, "config.json"))
        bar = progress(total=self.total_steps, desc=f"{self.algo}", enabled=self.progress_bar, initial=self.step)
        t_last, n_last, s_last = time.perf_counter(), 0, self.step
        try:
            while self.step < self.total_steps:
                t0, c0 = time.perf_counter(), time.process_time()
                stage = self.stage()
                metrics, nsamples = self.train_step()
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
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps \
                        and self.should_eval():
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
        res = self.evaluate() if cfg.eval_episodes > 0 else None
        if res is not None:
            self._record_eval(res)
            self.logger.close()
        self.save_checkpoint()
        summary = self.summary(res)
        atomic_write_json(summary, summary_path)
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
