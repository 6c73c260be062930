"""Loading Minari datasets and flattening their episodes into transitions.

Flattening (``flatten_episodes``): a Minari episode of T steps stores T+1 observations; the
transitions are ``obs = observations[:-1]``, ``next_obs = observations[1:]``, so a truncated last
step keeps its true next state. Terminations and truncations are kept apart.

Dict observations are flattened by concatenating their leaves in **sorted key order** (recursively
for nested dicts; tuple spaces in their own order), each leaf reshaped to [T+1, -1]. For example a
Minari AntMaze observation {"achieved_goal": 2, "desired_goal": 2, "observation": 27} becomes
[achieved_goal, desired_goal, observation] (31 values). ``obs_keys`` selects and orders the
top-level keys instead (e.g. ``obs_keys=("observation", "desired_goal")``).
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, Optional, Sequence

import numpy as np
import torch

from .dataset import OfflineDataset

DEMO_DATASET_ID = "qipo/pendulum/mixed-v0"


def datasets_root() -> str:
    """Minari's local datasets directory: $MINARI_DATASETS_PATH or ~/.minari/datasets (read now)."""
    return os.environ.get("MINARI_DATASETS_PATH") or os.path.join(os.path.expanduser("~"), ".minari", "datasets")


def dataset_dir(dataset_id: str) -> str:
    """Directory of a dataset id under datasets_root() (it may not exist)."""
    return os.path.join(datasets_root(), dataset_id)


def require(module: str):
    """Import an optional dependency of the 'rl' extra, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is needed here but cannot be imported ({e}); "
                          "pip install 'qipo_kernels[rl]'") from e


def check_dataset_id(dataset_id) -> str:
    """Validate a Minari dataset id ``(namespace/)name-v<version>``; returns it."""
    if not isinstance(dataset_id, str):
        raise TypeError(f"dataset_id must be a str such as 'mujoco/halfcheetah/medium-v0', "
                        f"got {type(dataset_id).__name__}")
    require("minari")
    from minari.dataset.minari_dataset import parse_dataset_id

    try:
        parse_dataset_id(dataset_id)
    except (ValueError, TypeError):  # minari raises TypeError for an id without a version
        raise ValueError(f"dataset_id {dataset_id!r} is not a Minari dataset id; expected "
                         "'(namespace/)name-v<version>', e.g. 'mujoco/halfcheetah/medium-v0'") from None
    if dataset_id.startswith("/") or ".." in dataset_id.split("/"):
        raise ValueError(f"dataset_id {dataset_id!r} must be a relative id, not a path")
    return dataset_id


def missing_dataset_message(dataset_id: str) -> str:
    where = dataset_dir(dataset_id)
    msg = (f"Minari dataset {dataset_id!r} is not on this machine (looked in {where}; the datasets directory is "
           f"$MINARI_DATASETS_PATH or ~/.minari/datasets). ")
    if dataset_id.startswith("qipo/"):
        msg += (f"It is made locally, with no network: run `python -c \"from qipo_kernels.data import "
                f"make_local_dataset; make_local_dataset({dataset_id!r})\"` (qipo_kernels.data.make_local_dataset).")
    else:
        msg += (f"Download it with `minari download {dataset_id}` (needs network and huggingface_hub, "
                "which pip install 'qipo_kernels[rl]' brings; `minari list remote` shows the ids).")
    return msg


def _flatten_leaf(x, length: int, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim == 0 or arr.shape[0] != length:
        raise ValueError(f"{what} must have {length} rows, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
            or arr.dtype == np.bool_):
        raise TypeError(f"{what} has dtype {arr.dtype}; only numeric observations/actions can be flattened")
    return arr.reshape(length, -1).astype(np.float64, copy=False)


def flatten_space_value(x, length: int, what: str = "observations", keys: Optional[Sequence[str]] = None
                        ) -> np.ndarray:
    """Flatten a (possibly dict / tuple) batch of ``length`` rows to [length, D].

    Dicts: leaves concatenated in sorted key order (``keys`` selects/orders the top level).
    Tuples: in their order. Arrays (or nested lists): reshaped to [length, -1].
    """
    if isinstance(x, dict):
        if keys is None:
            keys = sorted(x.keys())
        else:
            missing = [k for k in keys if k not in x]
            if missing:
                raise ValueError(f"obs_keys {list(keys)} name keys {missing} that the observations lack "
                                 f"(they have {sorted(x.keys())})")
        parts = [flatten_space_value(x[k], length, f"{what}[{k!r}]") for k in keys]
        return np.concatenate(parts, axis=1) if parts else np.zeros((length, 0))
    if keys is not None:
        raise ValueError("obs_keys was given but the observations are not a dict")
    if isinstance(x, tuple):
        parts = [flatten_space_value(v, length, f"{what}[{i}]") for i, v in enumerate(x)]
        return np.concatenate(parts, axis=1) if parts else np.zeros((length, 0))
    return _flatten_leaf(x, length, what)


def flatten_episodes(episodes: Iterable, obs_keys: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
    """Flatten episodes (Minari EpisodeData or anything with the same fields) into transitions.

    Each episode of T steps has observations with T+1 rows, actions/rewards/terminations/
    truncations with T rows. Returns numpy arrays: obs [N, S], next_obs [N, S], actions [N, A]
    (env units), rewards [N], terminations [N] (bool), truncations [N] (bool),
    episode_returns [E], episode_lengths [E] (episodes with T = 0 are skipped).
    """
    cols = {k: [] for k in ("obs", "next_obs", "actions", "rewards", "terminations", "truncations")}
    returns, lengths = [], []
    for ep in episodes:
        rewards = np.asarray(ep.rewards, dtype=np.float64).reshape(-1)
        t = rewards.shape[0]
        if t == 0:
            continue
        o = flatten_space_value(ep.observations, t + 1, f"episode {getattr(ep, 'id', '?')} observations "
                                "(T+1 rows for T steps)", keys=obs_keys)
        a = flatten_space_value(ep.actions, t, f"episode {getattr(ep, 'id', '?')} actions")
        term = np.asarray(ep.terminations).reshape(-1).astype(bool)
        trunc = np.asarray(ep.truncations).reshape(-1).astype(bool)
        if term.shape[0] != t or trunc.shape[0] != t:
            raise ValueError(f"episode {getattr(ep, 'id', '?')}: terminations/truncations must have {t} rows, "
                             f"got {term.shape[0]}/{trunc.shape[0]}")
        if cols["obs"] and (o.shape[1] != cols["obs"][0].shape[1] or a.shape[1] != cols["actions"][0].shape[1]):
            raise ValueError(f"episode {getattr(ep, 'id', '?')} has obs/action dims {o.shape[1]}/{a.shape[1]}, "
                             f"earlier episodes {cols['obs'][0].shape[1]}/{cols['actions'][0].shape[1]}")
        cols["obs"].append(o[:-1])
        cols["next_obs"].append(o[1:])
        cols["actions"].append(a)
        cols["rewards"].append(rewards)
        cols["terminations"].append(term)
        cols["truncations"].append(trunc)
        returns.append(rewards.sum())
        lengths.append(t)
    if not returns:
        raise ValueError("the dataset has no transitions (every episode is empty)")
    out = {k: np.concatenate(v, axis=0) for k, v in cols.items()}
    out["episode_returns"] = np.asarray(returns, dtype=np.float64)
    out["episode_lengths"] = np.asarray(lengths, dtype=np.int64)
    return out


def open_minari(dataset_id: str):
    """minari.load_dataset with a clear error when the dataset is missing or unreadable."""
    check_dataset_id(dataset_id)
    minari = require("minari")
    if not os.path.isdir(os.path.join(dataset_dir(dataset_id), "data")):
        raise FileNotFoundError(missing_dataset_message(dataset_id))
    try:
        return minari.load_dataset(dataset_id)
    except FileNotFoundError:
        raise FileNotFoundError(missing_dataset_message(dataset_id)) from None
    except ImportError as e:
        raise ImportError(f"reading Minari dataset {dataset_id!r} needs a package that is missing ({e}); "
                          "pip install 'qipo_kernels[rl]' (Arrow-format datasets also need pyarrow)") from e
    except Exception as e:  # corrupt / foreign files: say which dataset and what to do
        raise ValueError(f"Minari dataset {dataset_id!r} at {dataset_dir(dataset_id)} could not be read "
                         f"({type(e).__name__}: {e}); delete that directory and download or make it again") from e


def _env_spec_json(ds) -> tuple:
    """(env_id, EnvSpec JSON) for evaluation: the dataset's eval env if it records one, else its env."""
    from gymnasium.envs.registration import EnvSpec

    meta = ds.storage.metadata
    spec = None
    raw = meta.get("eval_env_spec")
    if isinstance(raw, str):
        # same gymnasium-1.0 compatibility fix-up that minari applies to env_spec
        spec = EnvSpec.from_json(raw.replace('"order_enforce": true,', ""))
    if spec is None:
        spec = ds.env_spec
    if spec is None:
        return None, None
    try:
        return spec.id, spec.to_json()
    except Exception:  # kwargs that are not JSON-serialisable: fall back to the registered id
        return spec.id, None


def check_device_usable(device: torch.device) -> torch.device:
    """Raise ValueError naming ``device`` unless tensors can be made on it here (e.g. "cuda" on a CPU-only
    build of torch, or "cuda:3" on a machine with two GPUs), before any data is read."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but CUDA is not available here (torch {torch.__version__}, "
                         f"{'a CPU-only build' if torch.version.cuda is None else 'no usable GPU'}); use device='cpu'")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"device={str(device)!r} cannot be used here: {first}") from None
    return device


def load_minari(dataset_id: str, device="cpu", reward_scale="auto", normalize_obs: bool = True,
                dtype: torch.dtype = torch.float32, obs_keys: Optional[Sequence[str]] = None) -> OfflineDataset:
    """Load a local Minari dataset, flatten it to transitions and put them on ``device`` once.

    Args:
        dataset_id: Minari id, e.g. "mujoco/halfcheetah/medium-v0" or DEMO_DATASET_ID.
        device: where every tensor lives (batches are sampled there).
        reward_scale: "auto" | "locomotion" | "antmaze" | "cpql-antmaze" | "none" | float
            (see qipo_kernels.data.dataset.resolve_reward_scale).
        normalize_obs: normalise obs/next_obs with the dataset mean and std (+1e-3).
        dtype: float dtype of the tensors.
        obs_keys: for dict observations, the top-level keys to use in this order (default: all,
            sorted).
    Returns:
        OfflineDataset with obs [N, S], actions [N, A] in [-1, 1], rewards [N], next_obs [N, S],
        terminations [N], truncations [N].
    Raises:
        FileNotFoundError naming ``minari download <id>`` (or make_local_dataset for the demo id)
        when the dataset is not on this machine; ValueError when ``device`` cannot be used here
        (e.g. "cuda" on a CPU-only torch).
    """
    from .dataset import _check_device, _check_dtype, check_reward_scale

    check_dataset_id(dataset_id)
    gym = require("gymnasium")
    check_device_usable(_check_device(device))
    _check_dtype(dtype)
    check_reward_scale(reward_scale)
    if not isinstance(normalize_obs, bool):
        raise TypeError(f"normalize_obs must be a bool, got {normalize_obs!r}")
    if obs_keys is not None and (isinstance(obs_keys, str) or not all(isinstance(k, str) for k in obs_keys)):
        raise TypeError(f"obs_keys must be a sequence of str or None, got {obs_keys!r}")
    ds = open_minari(dataset_id)
    space = ds.action_space
    if not isinstance(space, gym.spaces.Box):
        raise ValueError(f"dataset {dataset_id!r} has a {type(space).__name__} action space; only Box "
                         "(continuous) action spaces are supported")
    flat = flatten_episodes(ds.iterate_episodes(), obs_keys=obs_keys)
    meta = ds.storage.metadata
    env_id, spec_json = _env_spec_json(ds)
    if obs_keys is None and isinstance(ds.observation_space, gym.spaces.Dict):
        obs_keys = sorted(ds.observation_space.spaces.keys())
    return OfflineDataset.from_arrays(
        flat["obs"], flat["actions"], flat["rewards"], flat["next_obs"], flat["terminations"], flat["truncations"],
        action_low=np.broadcast_to(space.low, space.shape).reshape(-1),
        action_high=np.broadcast_to(space.high, space.shape).reshape(-1),
        episode_returns=flat["episode_returns"], dataset_id=dataset_id, env_id=env_id, env_spec_json=spec_json,
        ref_min_score=meta.get("ref_min_score"), ref_max_score=meta.get("ref_max_score"), device=device,
        reward_scale=reward_scale, normalize_obs=normalize_obs, dtype=dtype,
        obs_keys=None if obs_keys is None else list(obs_keys))
