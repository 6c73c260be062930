"""A real Minari dataset made locally with no network: a scripted Pendulum-v1 controller of mixed quality.

The controller (``pendulum_controller``) swings the pendulum up by energy shaping and balances it
with a PD law near the top; noiseless it scores about -120 per 200-step episode (a uniformly random
policy scores about -1200). Each dataset episode gets one behaviour profile, in fixed proportions
(largest-remainder rounding of the fractions, then shuffled with the seed):

=========  ========  ===================================================  ===================
profile    fraction  actions                                              mean return (seed 0)
=========  ========  ===================================================  ===================
expert     20 %      controller + N(0, (0.05 * 2)^2) torque noise         -149
medium     30 %      controller + N(0, (0.25 * 2)^2), 10 % uniform random -165
poor       30 %      controller + N(0, (0.5 * 2)^2), 40 % uniform random  -517
random     20 %      uniform in [-2, 2]                                   -1266
=========  ========  ===================================================  ===================

(100 episodes, seed 0), so the behaviour policy averages -488 (normalised score 63) and an offline RL algorithm that stitches the good
actions together can approach the controller. Reference scores, stored in the dataset metadata and
used for the normalised score (100 * (R - ref_min) / (ref_max - ref_min)), are measured when the
dataset is made, on 20 fixed reset seeds (10000..10019) independent of ``seed``:
``ref_min_score`` = mean return of the uniform random policy (action RNG seed 10000), -1117.7;
``ref_max_score`` = mean return of the noiseless controller, -121.8.
Each episode's profile is stored in its Minari episode metadata (``profile``, ``noise``,
``epsilon``) together with its reset ``seed``. Same (num_episodes, seed) -> identical data.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import warnings
from typing import List, Optional, Tuple

import numpy as np

from .._checks import positive_int
from .minari_io import DEMO_DATASET_ID, check_dataset_id, datasets_root, dataset_dir, require

PENDULUM_ID = "Pendulum-v1"
MAX_TORQUE = 2.0
GENERATOR_VERSION = 1
REF_SEEDS = tuple(range(10000, 10020))

# (name, fraction, gaussian torque noise as a fraction of MAX_TORQUE, probability of a uniform random action)
PROFILES: Tuple[Tuple[str, float, float, float], ...] = (
    ("expert", 0.2, 0.05, 0.0),
    ("medium", 0.3, 0.25, 0.1),
    ("poor", 0.3, 0.5, 0.4),
    ("random", 0.2, 0.0, 1.0),
)

_env_lock = threading.Lock()


def pendulum_controller(obs, kp: float = 10.0, kd: float = 2.0, ke: float = 1.0) -> np.ndarray:
    """Swing-up controller for gymnasium Pendulum-v1. obs [..., 3] = (cos th, sin th, th_dot) -> torque [..., 1].

    Pendulum-v1 obeys th_dd = 15 sin th + 3 u (th = 0 upright), so H = th_dot^2 / 2 + 15 (cos th - 1)
    (0 at rest upright) changes as dH/dt = 3 u th_dot. Far from the top the controller pumps energy,
    u = ke * sign(th_dot) * (-H); near the top (cos th > 0.85) it balances with u = -kp th - kd th_dot.
    The torque is clipped to [-2, 2].
    """
    obs = np.asarray(obs, dtype=np.float64)
    c, s, w = obs[..., 0], obs[..., 1], obs[..., 2]
    th = np.arctan2(s, c)
    energy = 0.5 * w * w + 15.0 * (c - 1.0)
    direction = np.where(np.abs(w) > 1e-3, np.sign(w), 1.0)
    u = np.where(c > 0.85, -kp * th - kd * w, ke * direction * (-energy))
    return np.clip(u, -MAX_TORQUE, MAX_TORQUE)[..., None]


def episode_profiles(num_episodes: int, seed: int) -> List[str]:
    """The behaviour profile of each episode (deterministic in (num_episodes, seed))."""
    fracs = np.array([p[1] for p in PROFILES])
    raw = fracs * num_episodes
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: num_episodes - counts.sum()]:
        counts[i] += 1
    names = [p[0] for p, c in zip(PROFILES, counts) for _ in range(c)]
    order = np.random.default_rng(np.random.SeedSequence([seed, 1])).permutation(num_episodes)
    return [names[i] for i in order]


def _rollout(env, reset_seed: int, rng: np.random.Generator, noise: float, epsilon: float):
    """One episode; returns (observations [T+1, 3], actions [T, 1], rewards, terminations, truncations)."""
    obs, _ = env.reset(seed=int(reset_seed))
    observations, actions, rewards, terms, truncs = [obs], [], [], [], []
    while True:
        if epsilon >= 1.0 or (epsilon > 0 and rng.random() < epsilon):
            a = rng.uniform(-MAX_TORQUE, MAX_TORQUE, size=1)
        else:
            a = pendulum_controller(obs) + noise * MAX_TORQUE * rng.standard_normal(1)
        a = np.clip(a, -MAX_TORQUE, MAX_TORQUE).astype(np.float32)
        obs, r, term, trunc, _ = env.step(a)
        observations.append(obs)
        actions.append(a)
        rewards.append(float(r))
        terms.append(bool(term))
        truncs.append(bool(trunc))
        if term or trunc:
            break
    return (np.asarray(observations, dtype=np.float32), np.asarray(actions, dtype=np.float32),
            np.asarray(rewards, dtype=np.float64), np.asarray(terms), np.asarray(truncs))


def reference_scores() -> Tuple[float, float]:
    """(ref_min_score, ref_max_score) for Pendulum-v1: mean returns of the uniform random policy and
    of the noiseless controller over the fixed reset seeds REF_SEEDS."""
    import gymnasium as gym

    env = gym.make(PENDULUM_ID)
    try:
        rng = np.random.default_rng(REF_SEEDS[0])
        rand = [_rollout(env, s, rng, 0.0, 1.0)[2].sum() for s in REF_SEEDS]
        good = [_rollout(env, s, rng, 0.0, 0.0)[2].sum() for s in REF_SEEDS]
    finally:
        env.close()
    return float(np.mean(rand)), float(np.mean(good))


def _build_buffers(num_episodes: int, seed: int):
    import gymnasium as gym
    from minari.data_collector import EpisodeBuffer

    profiles = episode_profiles(num_episodes, seed)
    table = {p[0]: p for p in PROFILES}
    reset_seeds = np.random.default_rng(np.random.SeedSequence([seed, 0])).integers(0, 2**31 - 1, num_episodes)
    env = gym.make(PENDULUM_ID)
    buffers, meta = [], []
    try:
        for i, name in enumerate(profiles):
            _, _, noise, eps = table[name]
            rng = np.random.default_rng(np.random.SeedSequence([seed, 2, i]))
            o, a, r, te, tr = _rollout(env, int(reset_seeds[i]), rng, noise, eps)
            buffers.append(EpisodeBuffer(id=i, seed=int(reset_seeds[i]), observations=o, actions=a,
                                         rewards=r.tolist(), terminations=te.tolist(), truncations=tr.tolist(),
                                         infos={}))
            meta.append({"profile": name, "noise": noise, "epsilon": eps})
    finally:
        env.close()
    return buffers, meta


def _existing_params(dataset_id: str) -> Optional[dict]:
    import json

    path = os.path.join(dataset_dir(dataset_id), "data", "metadata.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return {k: meta.get(k) for k in ("qipo_num_episodes", "qipo_seed", "qipo_generator_version")}


def make_local_dataset(dataset_id: str = DEMO_DATASET_ID, num_episodes: int = 100, seed: int = 0,
                       overwrite: bool = False) -> str:
    """Make the embedded offline dataset (Pendulum-v1, mixed-quality scripted controller) with no network.

    ``num_episodes`` episodes of 200 steps (100 -> 20,000 transitions, a few seconds on one CPU core),
    written with minari.create_dataset_from_buffers into $MINARI_DATASETS_PATH (or
    ~/.minari/datasets). The dataset is built in a hidden temporary directory under the datasets
    directory and renamed into place, so an interrupted run never leaves a dataset that loads.
    Idempotent: if the dataset exists with the same (num_episodes, seed) it returns at once; with
    different parameters it raises unless ``overwrite=True``.

    Returns the dataset id (pass it to ``load_minari``).
    """
    check_dataset_id(dataset_id)
    positive_int("num_episodes", num_episodes)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    seed = int(seed)
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool, got {overwrite!r}")
    minari = require("minari")
    require("h5py")
    require("PIL")

    target = dataset_dir(dataset_id)
    want = {"qipo_num_episodes": num_episodes, "qipo_seed": seed, "qipo_generator_version": GENERATOR_VERSION}
    if os.path.isdir(os.path.join(target, "data")) and not overwrite:
        have = _existing_params(dataset_id)
        if have == want:
            return dataset_id
        raise ValueError(f"dataset {dataset_id!r} already exists at {target} with parameters {have}, not {want}; "
                         "pass overwrite=True to replace it")

    ref_min, ref_max = reference_scores()
    buffers, episode_meta = _build_buffers(num_episodes, seed)

    root = datasets_root()
    os.makedirs(root, exist_ok=True)
    _remove_stale_temp_dirs(root)
    tmp_root = tempfile.mkdtemp(prefix=".qipo-tmp-", dir=root)  # hidden: minari's listing skips it
    try:
        with _env_lock:  # minari reads $MINARI_DATASETS_PATH when it writes: point it at the temp dir
            old = os.environ.get("MINARI_DATASETS_PATH")
            os.environ["MINARI_DATASETS_PATH"] = tmp_root
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*(code_permalink|author_email).*")
                    ds = minari.create_dataset_from_buffers(
                        dataset_id=dataset_id, buffer=buffers, env=PENDULUM_ID, eval_env=PENDULUM_ID,
                        algorithm_name="qipo_kernels scripted Pendulum swing-up controller, mixed noise profiles",
                        author="qipo_kernels", ref_min_score=ref_min, ref_max_score=ref_max,
                        num_episodes_average_score=len(REF_SEEDS),
                        description=(f"Pendulum-v1, {num_episodes} episodes from an energy-shaping swing-up + PD "
                                     "controller with per-episode profiles expert/medium/poor/random "
                                     "(20/30/30/20 %); see qipo_kernels/data/local.py. "
                                     f"ref_min_score: uniform random policy, ref_max_score: noiseless "
                                     f"controller, mean over reset seeds {REF_SEEDS[0]}..{REF_SEEDS[-1]}."),
                        data_format="hdf5")
                    ds.storage.update_episode_metadata(episode_meta, range(len(episode_meta)))
                    ds.storage.update_metadata(want)
            finally:
                if old is None:
                    del os.environ["MINARI_DATASETS_PATH"]
                else:
                    os.environ["MINARI_DATASETS_PATH"] = old
        publish_built(tmp_root, root, dataset_id, target,
                      same=lambda: os.path.isdir(os.path.join(target, "data")) and _existing_params(dataset_id) == want)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return dataset_id


def publish_built(tmp_root: str, root: str, dataset_id: str, target: str, same=None) -> None:
    """Move the dataset built under the temp datasets folder ``tmp_root`` into place at ``target``
    (inside ``root``), with its namespace metadata files: an existing dataset there is set aside
    first, and put back if the move fails. ``same()`` True after a failed move means another process
    published the same dataset meanwhile; it is kept and no error is raised."""
    from minari.dataset.minari_dataset import parse_dataset_id

    built = os.path.join(tmp_root, dataset_id)
    namespace = parse_dataset_id(dataset_id)[0]
    if namespace is not None:  # namespace metadata files (minari's listing uses them)
        _copy_namespace_files(tmp_root, root, namespace)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    trash = None
    if os.path.exists(target):
        trash = tempfile.mkdtemp(prefix=".qipo-old-", dir=root)
        os.rename(target, os.path.join(trash, "old"))
    try:
        os.rename(built, target)
    except OSError:
        if trash is not None:
            os.rename(os.path.join(trash, "old"), target)
        if same is not None and same():
            return
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _remove_stale_temp_dirs(root: str, max_age_s: float = 6 * 3600) -> None:
    """Delete temp directories that a killed build left behind (hidden, so minari never lists them)."""
    import time

    try:
        names = os.listdir(root)
    except OSError:
        return
    now = time.time()
    for name in names:
        if name.startswith((".qipo-tmp-", ".qipo-old-")):
            path = os.path.join(root, name)
            try:
                if now - os.path.getmtime(path) > max_age_s:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass


def _copy_namespace_files(tmp_root: str, root: str, namespace: str) -> None:
    parts = namespace.split("/")
    for i in range(1, len(parts) + 1):
        rel = os.path.join(*parts[:i], "namespace_metadata.json")
        src, dst = os.path.join(tmp_root, rel), os.path.join(root, rel)
        if os.path.exists(src) and not os.path.exists(dst):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            tmp = dst + f".tmp{os.getpid()}"
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
