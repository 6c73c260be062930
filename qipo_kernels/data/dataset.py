"""In-memory offline datasets: transitions on the training device, sampled there.

Conventions (fixed for the whole package):

- ``obs`` / ``next_obs`` are [N, S]; when ``normalize_obs`` is on they are already normalised as
  ``(x - obs_mean) / obs_std`` with ``obs_std = std + OBS_STD_EPS`` (statistics over the dataset's
  ``obs`` rows, computed in float64). Policies see normalised observations; ``normalize`` applies
  the same map to raw environment observations.
- ``actions`` are [N, A] in [-1, 1], mapped affinely from the environment's Box bounds
  (``a = 2 (u - low) / (high - low) - 1``, clipped to [-1, 1]); dimensions with an infinite bound
  are left in environment units. ``to_env_action`` is the inverse map.
- ``rewards`` are scaled as ``(r + reward_shift) * reward_multiplier`` (see ``resolve_reward_scale``).
- ``terminations`` and ``truncations`` are kept apart (float 0/1); ``sample`` returns
  ``dones = terminations`` because a truncated transition still bootstraps from its true next state.
"""
from __future__ import annotations

import math
import re
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .._checks import FLOAT_DTYPES, positive_int

OBS_STD_EPS = 1e-3

REWARD_SCALES = ("auto", "locomotion", "antmaze", "cpql-antmaze", "none")

# Environment names whose datasets get locomotion-style reward scaling under reward_scale="auto".
_LOCOMOTION_RE = re.compile(
    r"(^|[/_-])(halfcheetah|hopper|walker2d|ant|humanoid|humanoidstandup|swimmer)([/_-]|$)", re.IGNORECASE)


def _check_device(device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device or a string such as 'cpu' or 'cuda', got {device!r}") from e


def _check_dtype(dtype) -> torch.dtype:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype!r}")
    return dtype


def check_reward_scale(reward_scale):
    """Raise TypeError/ValueError unless reward_scale is one of REWARD_SCALES or a finite float."""
    if isinstance(reward_scale, bool) or not isinstance(reward_scale, (int, float, str)):
        raise TypeError(f"reward_scale must be one of {REWARD_SCALES} or a float multiplier, got {reward_scale!r}")
    if isinstance(reward_scale, str):
        if reward_scale not in REWARD_SCALES:
            raise ValueError(f"reward_scale must be one of {REWARD_SCALES} or a float multiplier, "
                             f"got {reward_scale!r}")
    elif not math.isfinite(float(reward_scale)):
        raise ValueError(f"reward_scale must be finite, got {reward_scale!r}")
    return reward_scale


def resolve_reward_scale(reward_scale, dataset_id: str = "", episode_returns: Optional[np.ndarray] = None
                         ) -> Tuple[str, float, float]:
    """Resolve a reward-scale request to ``(mode, multiplier, shift)``: r' = (r + shift) * multiplier.

    reward_scale:
      - ``"auto"``: ``"antmaze"`` when the id names AntMaze, ``"locomotion"`` for MuJoCo locomotion
        ids (a halfcheetah/hopper/walker2d/ant/humanoid/swimmer component, e.g.
        "mujoco/hopper/medium-v0" or "hopper-medium-v2"), ``"none"`` otherwise (the embedded
        Pendulum task, "mujoco/pusher/...", Adroit, Kitchen included).
      - ``"locomotion"``: r * 1000 / (max episode return - min episode return) (IQL / QIPO style).
      - ``"antmaze"``: r - 1 (QIPO, IQL).   ``"cpql-antmaze"``: (r - 0.5) * 4 (CPQL).
      - ``"none"``: unchanged.   a float: r * float.
    """
    check_reward_scale(reward_scale)
    if not isinstance(reward_scale, str):
        return "multiplier", float(reward_scale), 0.0
    mode = reward_scale
    if mode == "auto":
        did = dataset_id or ""
        if "antmaze" in did.lower():
            mode = "antmaze"
        elif _LOCOMOTION_RE.search(did):
            mode = "locomotion"
        else:
            mode = "none"
    if mode == "none":
        return mode, 1.0, 0.0
    if mode == "antmaze":
        return mode, 1.0, -1.0
    if mode == "cpql-antmaze":
        return mode, 4.0, -0.5
    # locomotion
    if episode_returns is None or len(episode_returns) < 2:
        raise ValueError("reward_scale='locomotion' needs at least 2 episodes (it divides by max - min "
                         "episode return); pass reward_scale='none' or a float for this dataset")
    spread = float(np.max(episode_returns) - np.min(episode_returns))
    if not (spread > 0 and math.isfinite(spread)):
        raise ValueError(f"reward_scale='locomotion' needs episode returns that differ (max - min = {spread}); "
                         "pass reward_scale='none' or a float for this dataset")
    return mode, 1000.0 / spread, 0.0


class DatasetInfo:
    """What a trained policy needs from its dataset at evaluation time, without the transitions.

    obs_mean, obs_std [S] (numpy float64), action_low, action_high [A] (numpy float64, env units),
    dataset_id, env_id (str or None), env_spec_json (gymnasium EnvSpec JSON or None),
    ref_min_score, ref_max_score (float or None), reward_scale mode with reward_multiplier /
    reward_shift, normalize_obs, obs_keys (dict-observation key order or None).
    Round-trips through ``state_dict()`` / ``DatasetInfo.from_state_dict`` (JSON-serialisable).
    """

    def __init__(self, obs_mean, obs_std, action_low, action_high, dataset_id: str = "custom",
                 env_id: Optional[str] = None, env_spec_json: Optional[str] = None,
                 ref_min_score: Optional[float] = None, ref_max_score: Optional[float] = None,
                 reward_scale: str = "none", reward_multiplier: float = 1.0, reward_shift: float = 0.0,
                 normalize_obs: bool = True, obs_keys: Optional[Sequence[str]] = None):
        self.obs_mean = np.asarray(obs_mean, dtype=np.float64).reshape(-1)
        self.obs_std = np.asarray(obs_std, dtype=np.float64).reshape(-1)
        self.action_low = np.asarray(action_low, dtype=np.float64).reshape(-1)
        self.action_high = np.asarray(action_high, dtype=np.float64).reshape(-1)
        if self.obs_mean.shape != self.obs_std.shape:
            raise ValueError(f"obs_std must have obs_mean's shape {self.obs_mean.shape}, got {self.obs_std.shape}")
        if not (np.all(np.isfinite(self.obs_std)) and np.all(self.obs_std > 0)):
            raise ValueError("obs_std must be finite and > 0")
        if self.action_low.shape != self.action_high.shape:
            raise ValueError(f"action_high must have action_low's shape {self.action_low.shape}, "
                             f"got {self.action_high.shape}")
        if np.any(np.isnan(self.action_low)) or np.any(np.isnan(self.action_high)) or \
                np.any(self.action_high <= self.action_low):
            raise ValueError("action bounds must satisfy action_low < action_high element-wise")
        self.dataset_id = str(dataset_id)
        self.env_id = env_id
        self.env_spec_json = env_spec_json
        self.ref_min_score = None if ref_min_score is None else float(ref_min_score)
        self.ref_max_score = None if ref_max_score is None else float(ref_max_score)
        self.reward_scale = reward_scale
        self.reward_multiplier = float(reward_multiplier)
        self.reward_shift = float(reward_shift)
        self.normalize_obs = bool(normalize_obs)
        self.obs_keys = None if obs_keys is None else list(obs_keys)
        finite = np.isfinite(self.action_low) & np.isfinite(self.action_high)
        lo, hi = np.where(finite, self.action_low, -1.0), np.where(finite, self.action_high, 1.0)
        self._act_center = np.where(finite, (hi + lo) / 2, 0.0)
        self._act_half = np.where(finite, (hi - lo) / 2, 1.0)
        self._act_finite = finite
        self._stats_cache: Dict = {}

    @property
    def obs_dim(self) -> int:
        return int(self.obs_mean.shape[0])

    @property
    def act_dim(self) -> int:
        return int(self.action_low.shape[0])

    # ---- maps between environment units and the dataset's units ----
    def normalize(self, obs):
        """Raw env observations [..., S] (tensor or numpy) -> normalised, same type/device/dtype."""
        if torch.is_tensor(obs):
            if obs.shape[-1:] != (self.obs_dim,):
                raise ValueError(f"obs must have last dimension {self.obs_dim}, got shape {tuple(obs.shape)}")
            if not self.normalize_obs:
                return obs
            key = (obs.device, obs.dtype)
            if key not in self._stats_cache:  # one host-to-device copy per (device, dtype)
                self._stats_cache[key] = (torch.as_tensor(self.obs_mean, device=obs.device, dtype=obs.dtype),
                                          torch.as_tensor(self.obs_std, device=obs.device, dtype=obs.dtype))
            mean, std = self._stats_cache[key]
            return (obs - mean) / std
        arr = np.asarray(obs)
        if arr.shape[-1:] != (self.obs_dim,):
            raise ValueError(f"obs must have last dimension {self.obs_dim}, got shape {arr.shape}")
        if not self.normalize_obs:
            return arr
        out = (arr - self.obs_mean) / self.obs_std
        return out.astype(arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float64, copy=False)

    def scale_action(self, action):
        """Env-unit actions [..., A] (numpy) -> [-1, 1] (clipped); infinite-bound dims unchanged."""
        arr = np.asarray(action, dtype=np.float64)
        if arr.shape[-1:] != (self.act_dim,):
            raise ValueError(f"action must have last dimension {self.act_dim}, got shape {arr.shape}")
        out = (arr - self._act_center) / self._act_half
        return np.where(self._act_finite, np.clip(out, -1.0, 1.0), out)

    def to_env_action(self, action) -> np.ndarray:
        """Actions in [-1, 1] [..., A] (tensor on any device, or numpy) -> env units, numpy float64.

        Values are clipped to [-1, 1] first (dimensions with an infinite bound are passed through).
        """
        if torch.is_tensor(action):
            action = action.detach().to("cpu", torch.float64).numpy()
        arr = np.asarray(action, dtype=np.float64)
        if arr.shape[-1:] != (self.act_dim,):
            raise ValueError(f"action must have last dimension {self.act_dim}, got shape {arr.shape}")
        arr = np.where(self._act_finite, np.clip(arr, -1.0, 1.0), arr)
        return self._act_center + self._act_half * arr

    def scale_reward(self, reward):
        """Apply the dataset's reward scaling, (r + reward_shift) * reward_multiplier (tensor or numpy)."""
        return (reward + self.reward_shift) * self.reward_multiplier

    # ---- environment ----
    def env_spec(self):
        """The gymnasium EnvSpec recorded with the dataset (eval env first), or one made from env_id."""
        from .minari_io import require

        gym = require("gymnasium")
        from gymnasium.envs.registration import EnvSpec

        if self.env_spec_json is not None:
            return EnvSpec.from_json(self.env_spec_json)
        if self.env_id is None:
            raise ValueError(f"dataset {self.dataset_id!r} records no environment; pass env_id explicitly")
        return gym.spec(self.env_id)

    def make_env(self, num_envs: int = 1, seed: Optional[int] = None, max_episode_steps: Optional[int] = None):
        """A gymnasium SyncVectorEnv of ``num_envs`` copies of the dataset's (evaluation) environment.

        With ``seed`` the env is reset once with per-copy seeds derived from it (and its action space
        seeded), so the following ``reset()`` without a seed is deterministic.
        """
        from .minari_io import require

        gym = require("gymnasium")
        positive_int("num_envs", num_envs)
        if max_episode_steps is not None:
            positive_int("max_episode_steps", max_episode_steps)
        kwargs = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
        env = gym.make_vec(self.env_spec(), num_envs=num_envs, vectorization_mode="sync", **kwargs)
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
                raise TypeError(f"seed must be an int or None, got {seed!r}")
            env.reset(seed=env_seeds(int(seed), num_envs))
            env.action_space.seed(int(seed))
        return env

    # ---- checkpoints ----
    def state_dict(self) -> Dict:
        """JSON-serialisable description (lists and floats) for checkpoints."""
        return {
            "obs_mean": self.obs_mean.tolist(), "obs_std": self.obs_std.tolist(),
            "action_low": self.action_low.tolist(), "action_high": self.action_high.tolist(),
            "dataset_id": self.dataset_id, "env_id": self.env_id, "env_spec_json": self.env_spec_json,
            "ref_min_score": self.ref_min_score, "ref_max_score": self.ref_max_score,
            "reward_scale": self.reward_scale, "reward_multiplier": self.reward_multiplier,
            "reward_shift": self.reward_shift, "normalize_obs": self.normalize_obs, "obs_keys": self.obs_keys,
        }

    @classmethod
    def from_state_dict(cls, state: Dict) -> "DatasetInfo":
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        missing = [k for k in ("obs_mean", "obs_std", "action_low", "action_high") if k not in state]
        if missing:
            raise ValueError(f"state is missing keys {missing}; it must come from DatasetInfo.state_dict()")
        return cls(**state)

    @property
    def metadata(self) -> Dict:
        return self.state_dict()

    def __repr__(self) -> str:
        return (f"DatasetInfo(dataset_id={self.dataset_id!r}, env_id={self.env_id!r}, obs_dim={self.obs_dim}, "
                f"act_dim={self.act_dim}, reward_scale={self.reward_scale!r})")


def env_seeds(seed: int, num_envs: int):
    """Per-copy reset seeds derived from one seed (distinct streams for distinct (seed, copy))."""
    return [int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0] & 0x7FFFFFFF) for i in range(num_envs)]


class OfflineDataset:
    """Transitions of an offline dataset, every tensor on ``device`` (loaded there once).

    obs [N, S], actions [N, A] in [-1, 1], rewards [N] (scaled), next_obs [N, S], terminations [N],
    truncations [N] (float 0/1), obs_mean / obs_std [S] (tensors on device), action_low /
    action_high [A] (numpy, env units); ``info`` is the DatasetInfo (normalisation, env, scores).
    Build one with ``load_minari`` or ``OfflineDataset.from_arrays``.
    """

    def __init__(self, info: DatasetInfo, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
                 next_obs: torch.Tensor, terminations: torch.Tensor, truncations: torch.Tensor,
                 episode_returns: Optional[np.ndarray] = None):
        n = obs.shape[0]
        for name, t, shape in (("obs", obs, (n, info.obs_dim)), ("actions", actions, (n, info.act_dim)),
                               ("rewards", rewards, (n,)), ("next_obs", next_obs, (n, info.obs_dim)),
                               ("terminations", terminations, (n,)), ("truncations", truncations, (n,))):
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
        self.info = info
        self.obs, self.actions, self.rewards, self.next_obs = obs, actions, rewards, next_obs
        self.terminations, self.truncations = terminations, truncations
        self.device = obs.device
        self.obs_mean = torch.as_tensor(info.obs_mean, dtype=obs.dtype, device=self.device)
        self.obs_std = torch.as_tensor(info.obs_std, dtype=obs.dtype, device=self.device)
        self.episode_returns = None if episode_returns is None else np.asarray(episode_returns, dtype=np.float64)

    # ---- construction ----
    @classmethod
    def from_arrays(cls, obs, actions, rewards, next_obs, terminations, truncations, *, action_low, action_high,
                    episode_returns=None, dataset_id: str = "custom", env_id: Optional[str] = None,
                    env_spec_json: Optional[str] = None, ref_min_score: Optional[float] = None,
                    ref_max_score: Optional[float] = None, device="cpu", reward_scale="auto",
                    normalize_obs: bool = True, dtype: torch.dtype = torch.float32,
                    obs_keys: Optional[Sequence[str]] = None) -> "OfflineDataset":
        """Build from raw numpy transitions in environment units.

        obs, next_obs [N, S]; actions [N, A] (env units, scaled here to [-1, 1]); rewards,
        terminations, truncations [N]; episode_returns [E] (raw returns, needed by
        reward_scale="locomotion"). Everything is converted once and moved to ``device``.
        """
        device = _check_device(device)
        _check_dtype(dtype)
        if not isinstance(normalize_obs, bool):
            raise TypeError(f"normalize_obs must be a bool, got {normalize_obs!r}")
        obs = np.asarray(obs, dtype=np.float64)
        next_obs = np.asarray(next_obs, dtype=np.float64)
        actions = np.asarray(actions, dtype=np.float64)
        rewards = np.asarray(rewards, dtype=np.float64)
        terminations = np.asarray(terminations).astype(np.float64)
        truncations = np.asarray(truncations).astype(np.float64)
        if obs.ndim != 2 or obs.shape[0] == 0:
            raise ValueError(f"obs must be [N, S] with N >= 1, got shape {obs.shape}")
        n = obs.shape[0]
        if next_obs.shape != obs.shape:
            raise ValueError(f"next_obs must have obs's shape {obs.shape}, got {next_obs.shape}")
        if actions.ndim != 2 or actions.shape[0] != n:
            raise ValueError(f"actions must be [N={n}, A], got shape {actions.shape}")
        for name, v in (("rewards", rewards), ("terminations", terminations), ("truncations", truncations)):
            if v.shape != (n,):
                raise ValueError(f"{name} must have shape [{n}], got {v.shape}")
        for name, v in (("obs", obs), ("next_obs", next_obs), ("actions", actions), ("rewards", rewards)):
            if not np.all(np.isfinite(v)):
                raise ValueError(f"{name} contains NaN or inf values")
        mode, mult, shift = resolve_reward_scale(reward_scale, dataset_id, episode_returns)
        if normalize_obs:
            mean = obs.mean(axis=0)
            std = obs.std(axis=0) + OBS_STD_EPS
        else:
            mean = np.zeros(obs.shape[1])
            std = np.ones(obs.shape[1])
        info = DatasetInfo(mean, std, action_low, action_high, dataset_id=dataset_id, env_id=env_id,
                           env_spec_json=env_spec_json, ref_min_score=ref_min_score, ref_max_score=ref_max_score,
                           reward_scale=mode, reward_multiplier=mult, reward_shift=shift,
                           normalize_obs=normalize_obs, obs_keys=obs_keys)
        if info.act_dim != actions.shape[1]:
            raise ValueError(f"action_low/action_high have {info.act_dim} dims but actions have {actions.shape[1]}")

        def t(x):
            return torch.as_tensor(np.ascontiguousarray(x), dtype=dtype).to(device)

        return cls(info, t(info.normalize(obs)), t(info.scale_action(actions)), t(info.scale_reward(rewards)),
                   t(info.normalize(next_obs)), t(terminations), t(truncations), episode_returns)

    # ---- contract attributes ----
    def __len__(self) -> int:
        return int(self.obs.shape[0])

    obs_dim = property(lambda self: self.info.obs_dim)
    act_dim = property(lambda self: self.info.act_dim)
    dataset_id = property(lambda self: self.info.dataset_id)
    env_id = property(lambda self: self.info.env_id)
    ref_min_score = property(lambda self: self.info.ref_min_score)
    ref_max_score = property(lambda self: self.info.ref_max_score)
    action_low = property(lambda self: self.info.action_low)
    action_high = property(lambda self: self.info.action_high)
    reward_scale = property(lambda self: self.info.reward_scale)

    def sample(self, batch_size: int, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """Uniform minibatch with replacement, drawn on the dataset's device.

        Returns dict(obs [B, S], actions [B, A], rewards [B], next_obs [B, S], dones [B]) where
        dones = terminations (truncated transitions still bootstrap). ``generator`` may live on
        the CPU or on the dataset's device; the same generator state gives the same batch.
        """
        positive_int("batch_size", batch_size)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        gdev = generator.device if generator is not None else self.device
        idx = torch.randint(len(self), (batch_size,), generator=generator, device=gdev).to(self.device)
        return {"obs": self.obs[idx], "actions": self.actions[idx], "rewards": self.rewards[idx],
                "next_obs": self.next_obs[idx], "dones": self.terminations[idx]}

    def normalize(self, obs):
        """Raw env observations [..., S] (tensor or numpy) -> normalised like ``self.obs``."""
        return self.info.normalize(obs)

    def to_env_action(self, action) -> np.ndarray:
        """Actions in [-1, 1] [..., A] (tensor or numpy) -> env units (numpy float64)."""
        return self.info.to_env_action(action)

    def make_env(self, num_envs: int = 1, seed: Optional[int] = None, max_episode_steps: Optional[int] = None):
        """Gymnasium vector env of the dataset's environment; see DatasetInfo.make_env."""
        return self.info.make_env(num_envs=num_envs, seed=seed, max_episode_steps=max_episode_steps)

    def state_dict(self) -> Dict:
        """Normalisation, action bounds, ids and scores (not the transitions); JSON-serialisable."""
        return self.info.state_dict()

    @property
    def metadata(self) -> Dict:
        return self.info.state_dict()

    def to(self, device) -> "OfflineDataset":
        """A copy with every tensor on ``device``."""
        device = _check_device(device)
        return OfflineDataset(self.info, self.obs.to(device), self.actions.to(device), self.rewards.to(device),
                              self.next_obs.to(device), self.terminations.to(device), self.truncations.to(device),
                              self.episode_returns)

    def __repr__(self) -> str:
        return (f"OfflineDataset({self.dataset_id!r}, env_id={self.env_id!r}, transitions={len(self)}, "
                f"obs_dim={self.obs_dim}, act_dim={self.act_dim}, device={self.device}, "
                f"reward_scale={self.reward_scale!r})")


def info_of(source: Union[OfflineDataset, DatasetInfo, Dict]) -> DatasetInfo:
    """DatasetInfo of an OfflineDataset, a DatasetInfo, or a state_dict()."""
    if isinstance(source, OfflineDataset):
        return source.info
    if isinstance(source, DatasetInfo):
        return source
    if isinstance(source, dict):
        return DatasetInfo.from_state_dict(source)
    raise TypeError(f"dataset must be an OfflineDataset, DatasetInfo or state_dict, got {type(source).__name__}")
