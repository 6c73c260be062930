"""Offline datasets made by rolling out an agent in a Gymnasium env (e.g. a Stable-Baselines3 /
rl-zoo agent zip in a MuJoCo locomotion task), with optional Gaussian action noise.

    from qipo_kernels.data.rollout import make_rollout_dataset
    make_rollout_dataset("qipo/halfcheetah/noisy-sac-v0", env_id="HalfCheetah-v5",
                         agent="sac-HalfCheetah-v3.zip", num_episodes=100, noise=0.5)

Each step the agent's deterministic action a (env units) gets noise: a + noise * (high - low) / 2 * N(0, I),
clipped to the action Box (``noise`` is the standard deviation in the [-1, 1]-rescaled action units
that the package trains on). Reference scores, stored in the Minari metadata for the normalised
score 100 (R - ref_min) / (ref_max - ref_min), are measured on ``ref_episodes`` fixed reset seeds
(10000, 10001, ...): ``ref_min_score`` = mean return of the uniformly random policy (action RNG seed
10000), ``ref_max_score`` = mean return of the noiseless agent. Same arguments on the same machine and
package versions -> same data; MuJoCo rollouts are chaotic, so another CPU or other torch / mujoco / numpy
versions give a slightly different dataset (seen: a Walker2d data score of 73.9 against 74.6). The metadata's
``qipo_made_with`` (``software_stamp()``) says what made it.

The dataset is built in a hidden temporary directory under the datasets directory and renamed into
place (``write_buffers_atomic``), so an interrupted run never leaves a dataset that loads.

``agent`` is a path to an SB3 zip (``load_sb3_agent``: SAC, TD3, DDPG, PPO, A2C; zips saved with
the old ``gym`` package load too, their spaces are taken from the env) or any callable mapping one
observation [S] (numpy) to an action [A] in env units. An agent trained on normalised observations
(rl-zoo's ``normalize: true``, e.g. its A2C / PPO MuJoCo agents) needs its VecNormalize statistics:
``vecnormalize=".../<Env>/vecnormalize.pkl"``. An agent trained with rl-zoo's ``TimeFeatureWrapper``
(its config.yml says ``env_wrapper: sb3_contrib.common.wrappers.TimeFeatureWrapper``, e.g. its PPO MuJoCo
agents) sees the observation plus the feature 1 - t / max_steps: ``time_feature=1000`` (the wrapper's
max_steps) appends it before VecNormalize, as the wrapper did in training; the dataset keeps the env's own
observations. ``ref_agent`` (a zip or callable) sets ref_max_score instead of the rolled-out agent: a
weaker agent's data can then be scored against an expert.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import platform
import shutil
import tempfile
import warnings
import zipfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .._checks import positive_int
from .minari_io import check_dataset_id, dataset_dir, datasets_root, require

GENERATOR_VERSION = 1
REF_SEED0 = 10000
SB3_ALGOS = ("sac", "td3", "ddpg", "ppo", "a2c")

Policy = Callable[[np.ndarray], np.ndarray]


# ---- agents ---------------------------------------------------------------------------------------

def sb3_algo_of(path: str) -> str:
    """The SB3 algorithm a zip was saved by, read from its ``data`` JSON: the policy class module, and for
    the on-policy ActorCriticPolicy that A2C and PPO share, PPO's own fields (n_epochs, clip_range)."""
    try:
        with zipfile.ZipFile(path) as z:
            data = json.loads(z.read("data"))
    except (OSError, KeyError, zipfile.BadZipFile, ValueError) as e:
        raise ValueError(f"agent {path!r} is not a Stable-Baselines3 zip ({type(e).__name__}: {e})") from None
    module = str(data.get("policy_class", {}).get("__module__", ""))
    for algo in SB3_ALGOS:
        if f".{algo}." in module or module.endswith(f".{algo}"):
            return algo
    if module.endswith("common.policies") and "n_steps" in data:  # on-policy: A2C or PPO
        return "ppo" if ("n_epochs" in data or "clip_range" in data) else "a2c"
    raise ValueError(f"agent {path!r}: cannot tell its algorithm from policy class module {module!r}; "
                     f"pass algo= one of {SB3_ALGOS}")


class _GymAsGymnasium(pickle.Unpickler):
    """Unpickles objects saved when ``gym`` was SB3's env package (old rl-zoo VecNormalize files)."""

    def find_class(self, module, name):
        if module == "gym" or module.startswith("gym."):
            module = "gymnasium" + module[3:]
        return super().find_class(module, name)


def load_obs_normalizer(path: str, obs_dim: int) -> Callable[[np.ndarray], np.ndarray]:
    """The observation map of an SB3 ``VecNormalize`` pickle (rl-zoo's ``vecnormalize.pkl``):
    obs [S] -> clip((obs - mean) / sqrt(var + epsilon), -clip_obs, clip_obs), or the identity when it
    did not normalise observations. A pickle runs code when loaded: pass only files you trust (as the
    agent zip itself)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(os.fspath(path)):
        raise FileNotFoundError(f"vecnormalize {path!r} is not a file (an SB3 VecNormalize pickle)")
    require("stable_baselines3")
    try:
        with open(os.fspath(path), "rb") as f:
            vn = _GymAsGymnasium(f).load()
        norm_obs = bool(getattr(vn, "norm_obs", True))
        mean = np.asarray(vn.obs_rms.mean, dtype=np.float64)
        std = np.sqrt(np.asarray(vn.obs_rms.var, dtype=np.float64) + float(vn.epsilon))
        clip = float(vn.clip_obs)
    except (pickle.UnpicklingError, AttributeError, EOFError, ImportError, TypeError, ValueError) as e:
        raise ValueError(f"vecnormalize {os.fspath(path)!r} is not an SB3 VecNormalize pickle "
                         f"({type(e).__name__}: {e})") from None
    if mean.shape != (obs_dim,):
        raise ValueError(f"vecnormalize {os.fspath(path)!r} normalises observations of shape {mean.shape}, "
                         f"the env's are ({obs_dim},)")
    if not norm_obs:
        return lambda obs: obs
    return lambda obs: np.clip((np.asarray(obs, dtype=np.float64) - mean) / std, -clip, clip).astype(np.float32)


class _TimeFeaturePolicy:
    """obs [S] -> policy([obs, 1 - t / max_steps]), t = the calls since ``reset()`` (rl-zoo's
    TimeFeatureWrapper, which sb3-contrib applies inside VecNormalize). ``rollout_episode`` calls
    ``reset()`` at each episode start."""

    def __init__(self, policy: Policy, max_steps: int):
        self.policy, self.max_steps, self.t = policy, int(max_steps), 0

    def reset(self) -> None:
        self.t = 0

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        feature = 1.0 - self.t / self.max_steps
        self.t += 1
        return self.policy(np.concatenate([np.asarray(obs, dtype=np.float32).reshape(-1),
                                           np.asarray([feature], dtype=np.float32)]))


def load_sb3_agent(path: str, env, algo: str = "auto", vecnormalize: Optional[str] = None,
                   time_feature: Optional[int] = None) -> Policy:
    """Load an SB3 agent zip as a deterministic policy obs [S] -> action [A] (env units).

    The observation / action spaces are taken from ``env`` (so zips pickled with the old ``gym``
    package load under gymnasium); their shapes must match what the networks were built for.
    No replay buffer or optimiser state is built. ``vecnormalize``: the agent's VecNormalize pickle;
    its observation statistics are applied before the agent sees the observation. ``time_feature``:
    the max_steps of the TimeFeatureWrapper the agent was trained with (the agent then sees [S + 1];
    the returned policy has a ``reset()`` to call at each episode start).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"agent must be a path to an SB3 zip or a callable, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"agent zip {path!r} does not exist")
    if algo == "auto":
        algo = sb3_algo_of(path)
    if algo not in SB3_ALGOS:
        raise ValueError(f"algo must be 'auto' or one of {SB3_ALGOS}, got {algo!r}")
    if time_feature is not None:
        positive_int("time_feature", time_feature)
    sb3 = require("stable_baselines3")
    cls = getattr(sb3, algo.upper())
    obs_space = env.observation_space
    obs_dim = int(np.prod(obs_space.shape))
    if time_feature is not None:
        if len(obs_space.shape) != 1:
            raise ValueError(f"time_feature needs a flat Box observation space, env has {obs_space}")
        gym = require("gymnasium")
        obs_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim + 1,), np.float32)
    custom = {"observation_space": obs_space, "action_space": env.action_space,
              "learning_rate": 0.0, "lr_schedule": lambda _: 0.0, "clip_range": lambda _: 0.0}
    if algo in ("sac", "td3", "ddpg"):
        custom["buffer_size"] = 1  # no 1M-transition replay buffer for a rollout
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls.load(path, device="cpu", custom_objects=custom)
    except RuntimeError as e:  # a state_dict of other sizes: the env does not match the agent
        raise ValueError(f"agent {path!r} does not fit env {env.spec.id if env.spec else env} "
                         f"(obs {obs_space.shape}{' with the time feature' if time_feature else ''}, "
                         f"action {env.action_space.shape}): {e}"
                         + ("" if time_feature else "; an rl-zoo agent whose config.yml names TimeFeatureWrapper "
                            "needs time_feature=1000 (--time-feature)")) from None

    norm = (lambda obs: obs) if vecnormalize is None else \
        load_obs_normalizer(vecnormalize, int(np.prod(obs_space.shape)))

    def policy(obs: np.ndarray) -> np.ndarray:
        a, _ = model.predict(norm(obs), deterministic=True)
        return a

    return policy if time_feature is None else _TimeFeaturePolicy(policy, time_feature)


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- rollouts -------------------------------------------------------------------------------------

def rollout_episode(env, policy: Optional[Policy], reset_seed: int, rng: np.random.Generator, noise: float):
    """One episode. policy None = uniformly random actions (from ``rng``). Returns numpy arrays
    observations [T+1, S], actions [T, A] (env units, after noise and clipping), rewards [T],
    terminations [T], truncations [T]."""
    space = env.action_space
    low, high = np.asarray(space.low, dtype=np.float64), np.asarray(space.high, dtype=np.float64)
    half = 0.5 * (high - low)
    reset = getattr(policy, "reset", None)
    if callable(reset):  # a stateful policy (e.g. the time feature) starts its episode
        reset()
    obs, _ = env.reset(seed=int(reset_seed))
    observations, actions, rewards, terms, truncs = [obs], [], [], [], []
    while True:
        if policy is None:
            a = rng.uniform(low, high)
        else:
            a = np.asarray(policy(obs), dtype=np.float64).reshape(space.shape)
            if noise > 0:
                a = a + noise * half * rng.standard_normal(space.shape)
        a = np.clip(a, low, high).astype(space.dtype)
        obs, r, term, trunc, _ = env.step(a)
        observations.append(obs)
        actions.append(a)
        rewards.append(float(r))
        terms.append(bool(term))
        truncs.append(bool(trunc))
        if term or trunc:
            break
    return (np.asarray(observations), np.asarray(actions), np.asarray(rewards, dtype=np.float64),
            np.asarray(terms), np.asarray(truncs))


def reference_scores(env, policy: Policy, episodes: int = 10) -> Tuple[float, float]:
    """(mean return of the uniform random policy, of the noiseless ``policy``) on reset seeds
    REF_SEED0 .. REF_SEED0 + episodes - 1 (``policy``: the reference agent)."""
    rng = np.random.default_rng(REF_SEED0)
    seeds = range(REF_SEED0, REF_SEED0 + episodes)
    rand = [rollout_episode(env, None, s, rng, 0.0)[2].sum() for s in seeds]
    good = [rollout_episode(env, policy, s, rng, 0.0)[2].sum() for s in seeds]
    return float(np.mean(rand)), float(np.mean(good))


# ---- provenance -----------------------------------------------------------------------------------

STAMP_PACKAGES = ("torch", "numpy", "gymnasium", "mujoco", "stable-baselines3", "minari")


def software_stamp() -> str:
    """What a dataset or a run was made with: "python 3.11.7, torch 2.13.0+cpu, ..., mujoco 4.0.1, ...;
    cpu <model name>" (a package that is not installed reads "absent"). MuJoCo rollouts are chaotic: the same
    agent, seed and command on another CPU or with other versions of these packages gives a slightly different
    dataset (other returns, other reference scores), so what made it is kept beside it."""
    from importlib import metadata

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "absent"
    pkgs = ", ".join(f"{n} {version(n)}" for n in STAMP_PACKAGES)
    return f"python {platform.python_version()}, {pkgs}; cpu {cpu_model()}"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor() / machine(), else "unknown".
    The one reading of it: datasets' and runs' stamps and the benchmarks' result files all use this."""
    try:
        with open("/proc/cpuinfo") as fh:
            for ln in fh:
                if ln.lower().startswith("model name"):
                    return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


# ---- atomic writing -------------------------------------------------------------------------------

def existing_params(dataset_id: str) -> Optional[dict]:
    """The dataset's metadata.json as a dict, or None when it has none (or cannot be read)."""
    path = os.path.join(dataset_dir(dataset_id), "data", "metadata.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_buffers_atomic(dataset_id: str, buffers: List, env_id: str, metadata: Dict, *, ref_min: float,
                         ref_max: float, num_ref_episodes: int, algorithm_name: str, description: str,
                         episode_meta: Optional[List[Dict]] = None, eval_env=None) -> str:
    """Write Minari EpisodeBuffers as ``dataset_id`` under datasets_root(), all or nothing.

    Built in a hidden temp directory under the datasets directory (minari's listing skips it) and
    renamed into place; an existing dataset of that id is moved aside first and restored if the
    rename fails. ``metadata`` (JSON-able) is added to the dataset's metadata.
    """
    from .local import _env_lock, _remove_stale_temp_dirs, publish_built

    minari = require("minari")
    require("h5py")
    require("PIL")

    root = datasets_root()
    target = dataset_dir(dataset_id)
    os.makedirs(root, exist_ok=True)
    _remove_stale_temp_dirs(root)
    tmp_root = tempfile.mkdtemp(prefix=".qipo-tmp-", dir=root)
    try:
        with _env_lock:  # minari reads $MINARI_DATASETS_PATH when it writes: point it at the temp dir
            old = os.environ.get("MINARI_DATASETS_PATH")
            os.environ["MINARI_DATASETS_PATH"] = tmp_root
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*(code_permalink|author_email).*")
                    ds = minari.create_dataset_from_buffers(
                        dataset_id=dataset_id, buffer=buffers, env=env_id, eval_env=eval_env or env_id,
                        algorithm_name=algorithm_name, author="qipo_kernels", ref_min_score=ref_min,
                        ref_max_score=ref_max, num_episodes_average_score=num_ref_episodes,
                        description=description, data_format="hdf5")
                    if episode_meta:
                        ds.storage.update_episode_metadata(episode_meta, range(len(episode_meta)))
                    ds.storage.update_metadata(metadata)
            finally:
                if old is None:
                    del os.environ["MINARI_DATASETS_PATH"]
                else:
                    os.environ["MINARI_DATASETS_PATH"] = old
        publish_built(tmp_root, root, dataset_id, target)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return dataset_id


# ---- the maker ------------------------------------------------------------------------------------

def make_rollout_dataset(dataset_id: str, env_id: str, agent: Union[str, Policy], num_episodes: int = 100,
                         noise: float = 0.1, seed: int = 0, ref_episodes: int = 10,
                         max_episode_steps: Optional[int] = None, algo: str = "auto", overwrite: bool = False,
                         progress_bar: bool = True, vecnormalize: Optional[str] = None,
                         ref_agent: Union[str, Policy, None] = None, time_feature: Optional[int] = None) -> str:
    """Roll out ``agent`` in ``env_id`` for ``num_episodes`` episodes with Gaussian action noise and
    write a Minari dataset (hdf5) with ref_min_score / ref_max_score (see the module docstring).

    Args:
        dataset_id: Minari id to write, e.g. "qipo/hopper/noisy-sac-v0".
        env_id: a registered Gymnasium env with a Box action space, e.g. "HalfCheetah-v5".
        agent: path to a Stable-Baselines3 zip, or a callable obs [S] -> action [A] (env units).
        num_episodes: episodes to record (each up to the env's time limit).
        noise: std of the Gaussian action noise in [-1, 1]-rescaled units (0 = the agent itself).
        seed: seeds the reset seeds and the noise; same arguments -> identical data.
        ref_episodes: episodes (fixed reset seeds) for each reference score.
        max_episode_steps: override the env's time limit (None: the registered one).
        algo: SB3 algorithm of the zip ("auto": read from the zip).
        overwrite: replace an existing dataset made with other arguments (the same arguments return
            at once, nothing is redone).
        vecnormalize: the SB3 agent's VecNormalize pickle, for agents trained on normalised observations
            (rl-zoo's A2C / PPO MuJoCo agents: ``<algo>/<Env>_1/<Env>/vecnormalize.pkl``).
        ref_agent: an SB3 zip (without VecNormalize) or callable whose noiseless mean return is
            ref_max_score (None: ``agent``'s), e.g. an expert when ``agent`` is a medium policy.
        time_feature: max_steps of the TimeFeatureWrapper the SB3 agent was trained with (rl-zoo's PPO
            MuJoCo agents: 1000); the agent then sees [obs, 1 - t / max_steps]. None: no time feature.
    Returns:
        dataset_id (pass it to ``load_minari``).
    """
    check_dataset_id(dataset_id)
    if not isinstance(env_id, str) or not env_id:
        raise TypeError(f"env_id must be a registered Gymnasium env id (str), got {env_id!r}")
    positive_int("num_episodes", num_episodes)
    positive_int("ref_episodes", ref_episodes)
    if max_episode_steps is not None:
        positive_int("max_episode_steps", max_episode_steps)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not np.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite float >= 0, got {noise!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool, got {overwrite!r}")
    if not (callable(agent) or isinstance(agent, (str, os.PathLike))):
        raise TypeError(f"agent must be a path to an SB3 zip or a callable obs -> action, got {type(agent).__name__}")
    if not callable(agent) and not os.path.isfile(os.fspath(agent)):
        raise FileNotFoundError(f"agent zip {os.fspath(agent)!r} does not exist")
    if vecnormalize is not None:
        if callable(agent):
            raise ValueError("vecnormalize applies to an SB3 agent zip; a callable agent normalises its own input")
        if not isinstance(vecnormalize, (str, os.PathLike)) or not os.path.isfile(os.fspath(vecnormalize)):
            raise FileNotFoundError(f"vecnormalize {vecnormalize!r} is not a file (an SB3 VecNormalize pickle)")
    if time_feature is not None:
        positive_int("time_feature", time_feature)
        if callable(agent):
            raise ValueError("time_feature applies to an SB3 agent zip; a callable agent builds its own input")
    if ref_agent is not None:
        if not (callable(ref_agent) or isinstance(ref_agent, (str, os.PathLike))):
            raise TypeError(f"ref_agent must be a path to an SB3 zip or a callable, got {type(ref_agent).__name__}")
        if not callable(ref_agent) and not os.path.isfile(os.fspath(ref_agent)):
            raise FileNotFoundError(f"ref_agent zip {os.fspath(ref_agent)!r} does not exist")
    gym = require("gymnasium")
    require("minari")
    from minari.data_collector import EpisodeBuffer

    from ..algos.common import progress

    def describe(a):
        return ("callable " + getattr(a, "__name__", type(a).__name__)) if callable(a) \
            else f"{os.path.basename(os.fspath(a))} (sha256 {_file_sha256(os.fspath(a))[:16]})"

    agent_desc = describe(agent)
    want = {"qipo_env_id": env_id, "qipo_agent": agent_desc, "qipo_noise": float(noise), "qipo_seed": int(seed),
            "qipo_num_episodes": int(num_episodes), "qipo_ref_episodes": int(ref_episodes),
            "qipo_max_episode_steps": max_episode_steps, "qipo_rollout_version": GENERATOR_VERSION}
    if vecnormalize is not None:  # (absent otherwise: datasets made before these options keep matching)
        want["qipo_vecnormalize"] = describe(vecnormalize)
    if ref_agent is not None:
        want["qipo_ref_agent"] = describe(ref_agent)
    if time_feature is not None:
        want["qipo_time_feature"] = int(time_feature)
    target = dataset_dir(dataset_id)
    if os.path.isdir(os.path.join(target, "data")) and not overwrite:
        have = existing_params(dataset_id) or {}
        keys = set(want) | ({"qipo_vecnormalize", "qipo_ref_agent", "qipo_time_feature"} & set(have))
        have = {k: have.get(k) for k in sorted(keys)}
        if have == {k: want.get(k) for k in sorted(keys)} and not callable(agent) and not callable(ref_agent):
            return dataset_id
        raise ValueError(f"dataset {dataset_id!r} already exists at {target} with parameters {have}; "
                         "pass overwrite=True (--overwrite) to replace it")

    try:
        env = gym.make(env_id, max_episode_steps=max_episode_steps) if max_episode_steps else gym.make(env_id)
    except gym.error.Error as e:
        raise ValueError(f"env_id {env_id!r} cannot be made: {e}") from None
    try:
        if not isinstance(env.action_space, gym.spaces.Box):
            raise ValueError(f"env {env_id!r} has a {type(env.action_space).__name__} action space; a Box is needed")
        policy = agent if callable(agent) else load_sb3_agent(agent, env, algo, vecnormalize=vecnormalize,
                                                                   time_feature=time_feature)
        ref_policy = policy if ref_agent is None else ref_agent if callable(ref_agent) else load_sb3_agent(ref_agent, env)
        ref_min, ref_max = reference_scores(env, ref_policy, ref_episodes)
        reset_seeds = np.random.default_rng(np.random.SeedSequence([seed, 0])).integers(0, 2**31 - 1, num_episodes)
        buffers, meta, returns = [], [], []
        bar = progress(range(num_episodes), total=num_episodes, desc=f"rollouts {env_id}", enabled=progress_bar)
        for i in bar:
            rng = np.random.default_rng(np.random.SeedSequence([seed, 2, i]))
            o, a, r, te, tr = rollout_episode(env, policy, int(reset_seeds[i]), rng, float(noise))
            buffers.append(EpisodeBuffer(id=i, seed=int(reset_seeds[i]), observations=o, actions=a,
                                         rewards=r.tolist(), terminations=te.tolist(), truncations=tr.tolist(),
                                         infos={}))
            meta.append({"noise": float(noise), "return": float(r.sum()), "length": int(r.shape[0])})
            returns.append(float(r.sum()))
        bar.close()
    finally:
        env.close()
    behaviour = 100.0 * (np.mean(returns) - ref_min) / (ref_max - ref_min) if ref_max != ref_min else float("nan")
    want["qipo_behaviour_normalized_score"] = float(behaviour)
    want["qipo_made_with"] = software_stamp()   # (not compared when an existing dataset is reused)
    desc = (f"{env_id}, {num_episodes} episodes of {agent_desc} with N(0, {noise}^2) action noise in [-1, 1] "
            f"units (seed {seed}); ref_min_score: uniform random policy, ref_max_score: the noiseless "
            f"{'agent' if ref_agent is None else 'reference agent ' + want['qipo_ref_agent']}, "
            f"mean over reset seeds {REF_SEED0}..{REF_SEED0 + ref_episodes - 1}. Behaviour normalised score "
            f"{behaviour:.1f}. Made by qipo_kernels.data.rollout.")
    return write_buffers_atomic(dataset_id, buffers, env_id, want, ref_min=ref_min, ref_max=ref_max,
                                num_ref_episodes=ref_episodes, algorithm_name=f"{agent_desc} + Gaussian noise {noise}",
                                description=desc, episode_meta=meta)
