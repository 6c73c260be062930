"""Policy evaluation on gymnasium vector environments, with normalised scores.

``evaluate`` runs ``num_episodes`` episodes per seed on ``num_envs`` copies of the dataset's
(evaluation) environment stepped together. Observations are normalised like the dataset before the
policy sees them and the policy's [-1, 1] actions are mapped to environment units. Copy i of seed s
is reset with a seed derived from (s, i) and then runs a fixed quota of episodes (so short episodes
are not over-represented); results are deterministic for given (seeds, num_envs, policy).

Normalised score = 100 * (R - ref_min) / (ref_max - ref_min), where (ref_min, ref_max) are, in
order of preference: D4RL's constants when the dataset id is a D4RL name
(halfcheetah/hopper/walker2d-<random|medium|expert|medium-replay|medium-expert|full-replay>-v<k>, or
"D4RL/..." ids of those tasks); the dataset's own ref_min_score / ref_max_score (Minari metadata);
D4RL's constants for an env id of HalfCheetah/Hopper/Walker2d (an approximation: D4RL measured them
on the v2 environments); otherwise None.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._checks import positive_int
from .data.dataset import DatasetInfo, OfflineDataset, _check_device, _check_dtype, env_seeds, info_of
from .data.minari_io import require

# D4RL reference returns (random, expert), from d4rl/infos.py (REF_MIN_SCORE / REF_MAX_SCORE).
D4RL_REF_SCORES: Dict[str, Tuple[float, float]] = {
    "halfcheetah": (-280.178953, 12135.0),
    "hopper": (-20.272305, 3234.3),
    "walker2d": (1.629008, 4592.3),
}
_D4RL_DATASET_RE = re.compile(
    r"^(?:d4rl/)?(halfcheetah|hopper|walker2d)[-/](random|medium|expert|medium-replay|medium-expert|full-replay)"
    r"-v\d+$", re.IGNORECASE)
_D4RL_ENV_RE = re.compile(r"^(halfcheetah|hopper|walker2d)-v\d+$", re.IGNORECASE)


def reference_scores(dataset: Union[OfflineDataset, DatasetInfo, Dict, None] = None,
                     env_id: Optional[str] = None) -> Optional[Tuple[float, float]]:
    """(ref_min, ref_max) used for the normalised score, or None (see the module docstring)."""
    info = None if dataset is None else info_of(dataset)
    if info is not None:
        m = _D4RL_DATASET_RE.match(info.dataset_id)
        if m:
            return D4RL_REF_SCORES[m.group(1).lower()]
        if info.ref_min_score is not None and info.ref_max_score is not None:
            return info.ref_min_score, info.ref_max_score
    eid = env_id if env_id is not None else (info.env_id if info is not None else None)
    if eid is not None:
        m = _D4RL_ENV_RE.match(eid)
        if m:
            return D4RL_REF_SCORES[m.group(1).lower()]
    return None


def standard_error(std: Optional[float], n: int) -> Optional[float]:
    """Standard error of the mean of n values from their population s.d. (ddof 0, as evaluate() reports
    "std"): std / sqrt(n - 1), i.e. the sample s.d. over sqrt(n). None when std is None or n < 2."""
    if std is None or n < 2:
        return None
    return float(std) / (n - 1) ** 0.5


def normalized_score(returns, dataset: Union[OfflineDataset, DatasetInfo, Dict, None] = None,
                     env_id: Optional[str] = None) -> Optional[np.ndarray]:
    """100 * (R - ref_min) / (ref_max - ref_min) for returns [E] (numpy float64), or None when no
    reference scores are known for the dataset / env."""
    r = np.asarray(returns, dtype=np.float64)
    ref = reference_scores(dataset, env_id)
    if ref is None:
        return None
    lo, hi = ref
    if not hi > lo:
        raise ValueError(f"reference scores must satisfy ref_max > ref_min, got {lo}, {hi}")
    return 100.0 * (r - lo) / (hi - lo)


def _check_policy_output(a, n: int, act_dim: int) -> torch.Tensor:
    if not torch.is_tensor(a):
        a = torch.as_tensor(np.asarray(a))
    if tuple(a.shape) != (n, act_dim):
        raise ValueError(f"policy_fn must return actions of shape [{n}, {act_dim}], got {tuple(a.shape)}")
    if not a.is_floating_point():
        raise TypeError(f"policy_fn must return float actions, got dtype {a.dtype}")
    if not bool(torch.isfinite(a).all()):
        raise ValueError("policy_fn returned NaN or inf actions")
    return a


def evaluate(policy_fn: Callable[[torch.Tensor], torch.Tensor],
             dataset: Union[OfflineDataset, DatasetInfo, Dict, None] = None, env_id: Optional[str] = None,
             num_episodes: int = 10, seeds: Sequence[int] = (0,), num_envs: Optional[int] = None,
             max_episode_steps: Optional[int] = None, progress: bool = False,
             device=None, dtype: torch.dtype = torch.float32) -> Dict:
    """Run a policy for ``num_episodes`` episodes per seed and summarise the returns.

    Args:
        policy_fn: obs [n, S] (normalised like the dataset, on ``device``) -> actions [n, A] in
            [-1, 1] (clipped before they are mapped to env units). Called under torch.no_grad().
        dataset: OfflineDataset, DatasetInfo or its state_dict(): gives the environment (from the
            Minari metadata), obs normalisation, action bounds and reference scores.
        env_id: a gymnasium id; overrides the dataset's environment. Without a dataset,
            observations are raw and action bounds come from the env's Box action space.
        num_episodes: episodes per seed. seeds: one evaluation per seed.
        num_envs: copies stepped together (default min(num_episodes, 10)).
        max_episode_steps: overrides the env's time limit.
        progress: show a tqdm progress bar (if tqdm is installed).
        device / dtype: of the obs tensors given to policy_fn (default: the dataset's device, else cpu).
    Returns:
        {"returns": [E*len(seeds)], "lengths": [...], "mean", "std" (over all episodes and seeds),
         "per_seed_mean": [...], "normalized_mean", "normalized_std" (None when no reference
         scores), "se", "normalized_se" (standard errors of the means over the episodes; None for one
         episode or no reference scores), "episodes": int, "seeds": [...], "env_id": str}
    """
    if not callable(policy_fn):
        raise TypeError(f"policy_fn must be callable (obs tensor -> action tensor), got {type(policy_fn).__name__}")
    info = None if dataset is None else info_of(dataset)
    if info is None and env_id is None:
        raise ValueError("evaluate needs a dataset or an env_id")
    if env_id is not None and not isinstance(env_id, str):
        raise TypeError(f"env_id must be a str, got {type(env_id).__name__}")
    positive_int("num_episodes", num_episodes)
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        seeds = (int(seeds),)
    try:
        seeds = list(seeds)
    except TypeError:
        raise TypeError(f"seeds must be a sequence of ints, got {seeds!r}") from None
    if not seeds or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty sequence of ints >= 0, got {seeds!r}")
    seeds = [int(s) for s in seeds]
    if num_envs is None:
        num_envs = min(num_episodes, 10)
    positive_int("num_envs", num_envs)
    num_envs = min(num_envs, num_episodes)
    if max_episode_steps is not None:
        positive_int("max_episode_steps", max_episode_steps)
    if device is None:
        device = dataset.device if isinstance(dataset, OfflineDataset) else torch.device("cpu")
    device = _check_device(device)
    _check_dtype(dtype)

    gym = require("gymnasium")
    kwargs = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
    if env_id is not None:
        try:
            spec = gym.spec(env_id)
        except gym.error.Error as e:
            raise ValueError(f"env_id {env_id!r} is not a registered gymnasium environment ({e})") from None
    else:
        spec = info.env_spec()
    env = gym.make_vec(spec, num_envs=num_envs, vectorization_mode="sync", **kwargs)
    try:
        if not isinstance(env.single_action_space, gym.spaces.Box):
            raise ValueError(f"{spec.id} has a {type(env.single_action_space).__name__} action space; "
                             "only Box action spaces are supported")
        obs_dim = int(np.prod(env.single_observation_space.shape))
        if info is None:
            space = env.single_action_space
            info = DatasetInfo(np.zeros(obs_dim), np.ones(obs_dim), space.low.reshape(-1), space.high.reshape(-1),
                               dataset_id="", env_id=spec.id, normalize_obs=False)
        elif info.obs_dim != obs_dim:
            raise ValueError(f"the environment {spec.id} has {obs_dim}-dim observations but the dataset "
                             f"{info.dataset_id!r} has {info.obs_dim}")
        autoreset_mode = env.metadata.get("autoreset_mode", None)
        if autoreset_mode is not None and getattr(autoreset_mode, "value", autoreset_mode) != "NextStep":
            raise RuntimeError(f"evaluate expects gymnasium's NextStep autoreset, got {autoreset_mode}")

        bar = None
        if progress:
            try:
                from tqdm.auto import tqdm
                bar = tqdm(total=num_episodes * len(seeds), desc=f"eval {spec.id}", unit="ep")
            except ImportError:
                bar = None
        returns, lengths, per_seed = [], [], []
        quota = np.array([num_episodes // num_envs + (i < num_episodes % num_envs) for i in range(num_envs)])
        for s in seeds:
            obs, _ = env.reset(seed=env_seeds(s, num_envs))
            done_count = np.zeros(num_envs, dtype=np.int64)
            ep_ret = np.zeros(num_envs)
            ep_len = np.zeros(num_envs, dtype=np.int64)
            resetting = np.zeros(num_envs, dtype=bool)
            seed_returns = []
            while (done_count < quota).any():
                o = torch.as_tensor(np.asarray(obs, dtype=np.float64).reshape(num_envs, -1), dtype=dtype,
                                    device=device)
                with torch.no_grad():
                    a = _check_policy_output(policy_fn(info.normalize(o)), num_envs, info.act_dim)
                act = info.to_env_action(a).reshape((num_envs,) + env.single_action_space.shape)
                obs, r, term, trunc, _ = env.step(act.astype(env.single_action_space.dtype))
                active = (done_count < quota) & ~resetting
                ep_ret[active] += np.asarray(r, dtype=np.float64)[active]
                ep_len[active] += 1
                ended = np.asarray(term) | np.asarray(trunc)
                for i in np.flatnonzero(active & ended):
                    seed_returns.append(float(ep_ret[i]))
                    lengths.append(int(ep_len[i]))
                    done_count[i] += 1
                    ep_ret[i], ep_len[i] = 0.0, 0
                    if bar is not None:
                        bar.update(1)
                resetting = ended  # NextStep autoreset: the next step of these copies only resets them
            returns.extend(seed_returns)
            per_seed.append(float(np.mean(seed_returns)))
        if bar is not None:
            bar.close()
    finally:
        env.close()

    rets = np.asarray(returns, dtype=np.float64)
    norm = normalized_score(rets, info if dataset is not None else None, env_id=spec.id)
    return {
        "returns": rets.tolist(), "lengths": lengths, "mean": float(rets.mean()), "std": float(rets.std()),
        "per_seed_mean": per_seed,
        "normalized_mean": None if norm is None else float(norm.mean()),
        "normalized_std": None if norm is None else float(norm.std()),
        "se": standard_error(float(rets.std()), int(rets.size)),
        "normalized_se": None if norm is None else standard_error(float(norm.std()), int(rets.size)),
        "episodes": int(rets.size), "seeds": seeds, "env_id": spec.id,
    }


__all__ = ["evaluate", "normalized_score", "standard_error", "reference_scores", "D4RL_REF_SCORES"]
